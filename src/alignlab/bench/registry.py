"""The benchmarked stages: :class:`Pair` (two runners and how to report them), ``PAIRS`` and :class:`BenchSpec`
(what a runner is given).

Adding a stage
--------------
1. Write two runners, ``def ours_x(spec: BenchSpec) -> dict`` and ``def trl_x(spec: BenchSpec) -> dict``
   (in a stage module of this package or in your own module; import torch, TRL and alignlab trainers *inside*
   the function). A runner trains ``spec.warmup_steps + spec.steps`` optimizer steps in ``spec.workdir`` and
   returns raw measurements:

   ``step_seconds`` (list, one per step, warmup included), ``step_tokens`` (non-pad tokens per step),
   ``losses`` (per step; may be empty), ``trainable_params``, ``total_params``, ``precision``
   (``"fp32"``/``"bf16"``, what it really computed in) and optionally ``step_cpu_seconds``
   (``time.process_time`` per step), ``flops_params`` and ``flops_per_token_factor`` (MFU; factor 0 = none),
   ``step_counts`` (``{name: per-step counts}``, reported as ``name_per_s``), ``step_times`` (``{name:
   per-step seconds}``, reported as the mean ``time_name``), ``step_values`` (``{name: per-step values}``,
   reported as ``final_name``), ``dataset`` (a dict about the data), ``settings`` (a dict of what it
   configured) and ``notes`` (``unmatched``: a list of what differs from the other library). Stamp the time at
   the end of each step: :func:`~alignlab.bench.measure.stamped_run` for our trainers,
   :func:`~alignlab.bench.measure.step_clock` (a TRL callback) for TRL's (both also call
   :func:`~alignlab.bench.worker.stamp_progress`, which ``--time-limit`` reads; a runner with its own loop calls
   it with ``"start"`` before its first step and ``"step"`` after each).

   :func:`~alignlab.bench.measure.summarize` turns these into the reported numbers, so every stage is measured
   the same way.
2. Register them: ``PAIRS["x"] = Pair("my_module:ours_x", "my_module:trl_x", default_data="file.json",
   help="...", options=(("beta", 0.1, "help"),), sequences_per_example=2)`` (``from alignlab.bench import
   PAIRS, Pair``; ``sequences_per_example``: what bounds a step's tokens for ``--time-limit``; 0 if nothing
   does). The runners are named as ``"module:function"`` so the worker process imports them by name, which is
   why a stage registered at run time works there too. The CLI picks the new stage up by itself; stage options
   travel in ``spec.extra`` (``alignlab bench x --set beta=0.2``) and are listed in ``alignlab bench --help``.
3. Add a tiny-random case to ``tests/test_bench.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignlab.errors import AlignlabError

LIBRARIES = ("ours", "trl")
SETTINGS = ("matched", "defaults")
LEARNING_RATE = 2e-5  # the default of both libraries
SENTIMENT = "alignlab.reward_functions:sentiment"


@dataclass(frozen=True)
class Pair:
    """One benchmarked stage: two runners as ``"module:function"`` paths (imported lazily), by default ours and
    TRL's.

    ``names`` are the two runners' keys in the report (and values of ``--which``), ``labels`` their column
    headers; ``options`` the stage's ``--set KEY=VALUE`` options as ``(key, default, help)``; ``rows`` extra
    table rows ``(label, key, format)``; ``unit`` what one timed step is and ``tokens`` what its tokens are;
    ``compare`` an optional ``"module:function"`` taking the report and returning a stage-level comparison."""

    ours: str
    trl: str
    default_data: str = ""  # a file name in ../shared/data, used when --data is not given
    help: str = ""
    names: tuple[str, str] = LIBRARIES
    labels: tuple[str, str] = ("alignlab", "TRL")
    options: tuple[tuple[str, Any, str], ...] = ()
    rows: tuple[tuple[str, str, str], ...] = ()
    unit: str = "step"
    tokens: str = "tokens (non-pad)"
    compare: str = ""
    sequences_per_example: int = 0  # bounds a step's tokens (batch x this x max_length) for --time-limit; 0: none

    def runner(self, name: str) -> str:
        return self.ours if name == self.names[0] else self.trl

    @property
    def option_defaults(self) -> dict[str, Any]:
        """The stage's options as ``{key: default}``."""
        return {key: default for key, default, _ in self.options}


PAIRS: dict[str, Pair] = {
    "sft": Pair("alignlab.bench.sft:ours_sft", "alignlab.bench.sft:trl_sft", default_data="alpaca_en_demo.json",
                help="supervised fine-tuning: alignlab train_sft vs trl.SFTTrainer", sequences_per_example=1),
    "rm": Pair("alignlab.bench.reward_model:ours_rm", "alignlab.bench.reward_model:trl_rm",
               default_data="hh_rlhf_helpful_base_test.jsonl.gz",
               help="reward model on preference pairs (--batch-size pairs): alignlab train_reward vs "
               "trl.RewardTrainer",
               rows=(("final pairwise accuracy", "final_accuracy", "3"),), sequences_per_example=2),
    "rm-kwise": Pair("alignlab.bench.reward_model:ours_rm_kwise",
                     "alignlab.bench.reward_model:ours_rm_pairs",
                     default_data="oasst_en_100_tree.jsonl",
                     help="alignlab reward model on rankings: K-wise loss (--batch-size prompts, each answer "
                     "encoded once) vs the rankings expanded to pairs (each answer encoded K-1 times)",
                     names=("kwise", "pairs"), labels=("K-wise", "pairs"),
                     options=(("pairs_batch_size", 0, "rm-kwise: pairs per step of the expanded run (0 = as many "
                               "sequences per step as the K-wise run has on average)"),),
                     rows=(("pairs (comparisons)/s", "pairs_per_s", "2"),
                           ("sequences/s", "sequences_per_s", "2"),
                           ("sequences/step", "sequences_per_step", "1")),
                     compare="alignlab.bench.reward_model:compare_rankings"),
    "dpo": Pair("alignlab.bench.dpo:ours_dpo", "alignlab.bench.dpo:trl_dpo", default_data="dpo_en_demo.json",
                help="DPO (sigmoid loss, frozen reference copy) on preference pairs (--batch-size pairs): "
                "alignlab train_dpo vs trl.DPOTrainer",
                options=(("beta", 0.1, "dpo: DPO beta (both libraries)"),),
                rows=(("final reward margin", "final_reward_margin", "4"),
                      ("final reward accuracy", "final_reward_accuracy", "3")), sequences_per_example=2),
    "ppo": Pair("alignlab.bench.ppo:ours_ppo", "alignlab.bench.ppo:trl_ppo", default_data="alpaca_en_demo.json",
                help="online RL from a reward function (--batch-size responses per iteration, --steps iterations, "
                "--max-length longest prompt): alignlab train_ppo vs trl.RLOOTrainer",
                options=(("max_new_tokens", 64, "ppo: longest response in tokens (both libraries)"),
                         ("ppo_epochs", 1, "ppo: passes over each rollout (ours ppo_epochs, RLOO num_iterations; "
                          "matched only: at defaults each library keeps its own)"),
                         ("num_generations", 2, "ppo: RLOO's samples per prompt (>= 2; ours samples one per "
                          "prompt)"),
                         ("share_backbone", False, "ppo: our value head on the policy's backbone instead of a "
                          "separate critic model"),
                         ("reward", SENTIMENT, "ppo: the reward function module:function f(prompts, responses)")),
                rows=(("ms per generated token", "ms_per_token", "1"),
                      ("generation s/iteration", "time_generation", "2"),
                      ("scoring s/iteration", "time_scoring", "3"),
                      ("no-grad forwards s/iteration", "time_forward", "2"),
                      ("update s/iteration", "time_update", "2"),
                      ("final mean score", "final_score", "4"),
                      ("final KL", "final_kl", "4")),
                unit="iteration", tokens="generated tokens"),
    "grpo": Pair("alignlab.bench.grpo:ours_grpo", "alignlab.bench.grpo:trl_grpo", default_data="alpaca_en_demo.json",
                 help="critic-free online RL from a reward function (--batch-size completions per iteration in groups "
                 "of num_generations, --steps iterations, one update each): alignlab train_grpo vs trl.GRPOTrainer",
                 options=(("max_new_tokens", 64, "grpo: longest completion in tokens (both libraries)"),
                          ("num_generations", 4, "grpo: completions per prompt (the group >= 2, divides --batch-size)"),
                          ("reward", SENTIMENT, "grpo: the reward function module:function f(prompts, completions)")),
                 rows=(("ms per generated token", "ms_per_token", "1"),
                       ("generation s/iteration", "time_generation", "2"),
                       ("scoring s/iteration", "time_scoring", "3"),
                       ("no-grad forwards s/iteration", "time_forward", "2"),
                       ("update s/iteration", "time_update", "2"),
                       ("final mean score", "final_score", "4")),
                 unit="iteration", tokens="generated tokens"),
    "gen": Pair("alignlab.bench.gen:ours_gen_shared", "alignlab.bench.gen:ours_gen_plain",
                default_data="task:sentiment",
                help="sampling as the lab samples (a task's training prompts in the Alpaca template, several "
                "answers each; --batch-size sequences per generate call, --steps calls): alignlab's shared prefill "
                "(common preamble and repeated prompts encoded once) vs plain Hugging Face generate on the same "
                "prompts and seeds. --data: task:NAME or a prompts file for the sentiment task",
                names=("shared", "plain"), labels=("shared prefill", "plain generate"),
                options=(("samples_per_prompt", 4, "gen: answers per prompt, consecutive in a batch (PPO in the "
                          "lab: 4; preference data 6; rejection sampling 12)"),
                         ("max_new_tokens", 32, "gen: longest response in tokens")),
                rows=(("ms per generated token", "ms_per_token", "1"),
                      ("prompt tokens per sequence", "prompt_tokens", "1"),
                      ("encoded once per batch (common prefix)", "common_prefix_tokens", "1")),
                unit="call", tokens="generated tokens"),
}


@dataclass
class BenchSpec:
    """Everything a runner needs; written as JSON for the worker process."""

    stage: str
    library: str
    model: str
    data: str
    batch_size: int = 8
    max_length: int = 512
    steps: int = 5
    warmup_steps: int = 1
    precision: str = "bf16"  # resolved: fp32 or bf16 (``matched`` only; ``defaults`` uses each library's own)
    settings: str = "matched"
    seed: int = 0
    lr: float = LEARNING_RATE
    workdir: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    runner: str = ""  # "module:function"; the worker imports it (PAIRS there lacks stages registered at run time)
    option_defaults: dict[str, Any] = field(default_factory=dict)  # the stage's options, for the same reason

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    def option(self, key: str) -> Any:
        """A stage option (``--set key=value``) converted to its default's type, or the default."""
        defaults = self.option_defaults or PAIRS[self.stage].option_defaults
        default = defaults[key]
        value = self.extra.get(key, default)
        if isinstance(default, bool):
            if isinstance(value, bool) or str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        else:
            try:
                return type(default)(value)
            except (TypeError, ValueError):
                pass
        raise AlignlabError(f"--set {key}={value}: expected {type(default).__name__}", field=key)


def import_path(path: str) -> Callable[..., Any]:
    """The function named by ``"module:function"``."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def shared_data_file(name: str) -> Path | None:
    """``name`` in the shared data folder (``../shared/data`` from here or from the repository), if present."""
    for root in (Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[4] / "shared" / "data"):
        if (root / name).is_file():
            return root / name
    return None
