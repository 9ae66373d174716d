"""Side-by-side benchmarks against TRL: ``alignlab bench STAGE``.

``alignlab bench sft --model smollm2-135m-instruct --data ../shared/data/alpaca_en_demo.json`` trains the
same model on the same data with the same batch size, maximum length and dtype, first with our trainer and
then with TRL's, each in its own process (``python -m alignlab.bench _worker SPEC OUT``), so one library's
imports and allocations never count against the other and the peak resident memory of each is its own.

Stages (``PAIRS``):

- ``sft``: ``train_sft`` vs ``trl.SFTTrainer`` (instruction data, completion-only loss);
- ``rm``: ``train_reward`` vs ``trl.RewardTrainer`` on the same preference pairs (rankings are expanded to
  their pairs for both, since RewardTrainer takes pairs only);
- ``rm-kwise``: ours against ours: the K-wise ranking loss (one example = a prompt with its K answers, each
  answer encoded once) vs the same rankings expanded to their K(K-1)/2 pairs (each answer encoded K-1 times),
  on ranking data (OpenAssistant trees). Reports the encoded-token factor the K-wise path saves and the speed
  factor it gets (``comparison``);
- ``dpo``: ``train_dpo`` (sigmoid loss, frozen reference copy) vs ``trl.DPOTrainer``;
- ``ppo``: ``train_ppo`` (policy + critic + reference, a programmatic reward) vs ``trl.RLOOTrainer`` (TRL's
  online-RL trainer nearest to PPO; TRL ships no PPO trainer any more) with the same reward function, prompts,
  responses per iteration and generation length. A timed unit is one *iteration* (rollout, scoring,
  no-grad forwards, update), and the tokens are the *generated* ones, so ``ms per generated token`` is the
  number to compare.

What is measured, per library
-----------------------------
- **step seconds**: wall time from the end of one optimizer step (PPO: iteration) to the end of the next, so
  everything the loop does (collation, forward, backward, clipping, optimizer, logging; PPO also generation
  and scoring) is in it; the first step is timed from the start of the loop. The first ``warmup_steps`` steps
  are left out of every number below.
- **tokens/s**: non-pad tokens (attention-mask ones) of the timed steps / their summed seconds (PPO: generated
  response tokens).
- **tokens per CPU-second**: the same tokens over the worker's CPU time (all threads) in those steps; on a
  shared machine this moves less with other processes' load than wall time, and ``cpu_utilisation`` (CPU
  seconds / wall seconds, about the thread count on an idle machine) shows how contended the run was.
  **tokens/s, uncontended steps** keeps only the timed steps whose CPU utilisation was at least 85 % of the
  worker's torch threads (no other process took its cores then). ``--rounds N`` runs each library N times in
  ABBA order and pools the timed steps.
- **s/step**: mean seconds of the timed steps.
- **peak RSS**: the worker process's maximum resident set size, read by the parent with ``os.wait4``.
- ``--time-limit S``: a worker still running S seconds after it started is killed (with its process group),
  and its column reports what it got done: the steps it finished, the seconds spent in the step it was in, and
  (where the stage bounds a step's tokens: ``batch_size x sequences per example x max_length``) an upper bound
  on its tokens/s over its timed steps and the unfinished one (over the unfinished warmup step when it never got
  past warmup); the ratio row then bounds the speed ratio (``>=`` when the second runner stopped, ``<=`` when
  the first did). Later rounds of a stopped runner are skipped. For a library whose defaults cannot finish a
  step in reasonable time on a machine (TRL's bf16 on a CPU without bf16 instructions), instead of a run that
  never ends.
- **final loss**: the training loss of the last step (SFT: mean NLL per loss token; RM: mean pairwise loss;
  DPO: mean sigmoid loss). PPO and RLOO optimise different objectives: their scores are reported instead.
- **MFU** (model FLOPs utilisation) = ``c * N * tokens_per_s / peak_flops``: ``N`` is the number of
  parameters a token meets in a matmul (SFT: the trainable parameters, tied embeddings counted once, i.e. the
  LM head; reward models: all but the embedding table), ``c = 6`` the forward (2N) plus backward (4N) FLOPs per
  token (Kaplan et al. 2020) and ``c = 8`` for DPO (plus the reference model's forward, 2N), without the
  attention-score term; ``peak_flops`` is this machine's *measured* ``torch.matmul`` throughput in the dtype the
  library computed in (:func:`measure_matmul_peak`, cached per CPU, torch version and thread count). Both
  libraries get the same formula, so the MFU ratio equals the tokens/s ratio; MFU says how far from the
  hardware's matmul speed the loop is. Not reported for PPO (generation, scoring and several forwards per
  token do not fit one per-token formula).

Settings
--------
- ``matched``: both libraries in the same dtype (``fp32``, or ``bf16`` autocast with fp32 weights), no
  gradient checkpointing, the same truncation, batch size and no accumulation (ours still cuts a batch into
  forward passes of at most ``max_tokens`` tokens, its default: the same update), the same optimizer
  (``torch.optim.AdamW(fused=True)``, same lr and betas, no weight decay, clip 1.0, constant schedule), no
  logging/evaluation/saving inside the timed loop, and the *same batches in the same order*: TRL gets our step
  plan's records, in order, with a sequential sampler. For ``rm`` and ``dpo`` TRL gets our token ids (so both
  train on exactly the same tokens); the notes say how many examples TRL's own tokenization would have
  given identically. What cannot be matched is listed in the notes (``unmatched``).
- ``defaults``: each library at its own defaults (ours: ``precision=auto``, length-grouped batches, cosine
  schedule; TRL's configs: bf16, gradient checkpointing, fused AdamW, random sampler, logging every 10
  steps), except batch size, max length, steps and the output folder. Evaluation and saving stay off for both.
  TRL tokenizes the text records itself.

Adding a stage
--------------
1. Write two runners, ``def ours_x(spec: BenchSpec) -> dict`` and ``def trl_x(spec: BenchSpec) -> dict``
   (here or in your own module; import torch, TRL and alignlab trainers *inside* the function). A runner
   trains ``spec.warmup_steps + spec.steps`` optimizer steps in ``spec.workdir`` and returns raw measurements:

   ``step_seconds`` (list, one per step, warmup included), ``step_tokens`` (non-pad tokens per step),
   ``losses`` (per step; may be empty), ``trainable_params``, ``total_params``, ``precision``
   (``"fp32"``/``"bf16"``, what it really computed in) and optionally ``step_cpu_seconds``
   (``time.process_time`` per step), ``flops_params`` and ``flops_per_token_factor`` (MFU; factor 0 = none),
   ``step_counts`` (``{name: per-step counts}``, reported as ``name_per_s``), ``step_times`` (``{name:
   per-step seconds}``, reported as the mean ``time_name``), ``step_values`` (``{name: per-step values}``,
   reported as ``final_name``), ``dataset`` (a dict about the data), ``settings`` (a dict of what it
   configured) and ``notes`` (``unmatched``: a list of what differs from the other library). Stamp the time at
   the end of each step: :func:`stamped_run` for our trainers, :func:`step_clock` (a TRL callback) for TRL's
   (both also call :func:`stamp_progress`, which ``--time-limit`` reads; a runner with its own loop calls it with
   ``"start"`` before its first step and ``"step"`` after each).

   :func:`summarize` turns these into the reported numbers, so every stage is measured the same way.
2. Register them: ``PAIRS["x"] = Pair("alignlab.bench:ours_x", "alignlab.bench:trl_x",
   default_data="file.json", help="...", options=(("beta", 0.1, "help"),), sequences_per_example=2)``
   (``sequences_per_example``: what bounds a step's tokens for ``--time-limit``; 0 if nothing does). The CLI
   picks the new stage up by itself; stage options travel in ``spec.extra`` (``alignlab bench x --set
   beta=0.2``) and are listed in ``alignlab bench --help``.
3. Add a tiny-random case to ``tests/test_bench.py``.

TRL is a development dependency: it is imported only inside the TRL runners, in the worker process.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignlab.errors import AlignlabError

LIBRARIES = ("ours", "trl")
SETTINGS = ("matched", "defaults")
LEARNING_RATE = 2e-5  # the default of both libraries
UNCONTENDED = 0.85  # a step is "uncontended" when its CPU seconds >= this x threads x wall seconds
SENTIMENT = "alignlab.rewards:sentiment"


# ------------------------------------------------------------------------------------------------ registry


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


PAIRS: dict[str, Pair] = {
    "sft": Pair("alignlab.bench:ours_sft", "alignlab.bench:trl_sft", default_data="alpaca_en_demo.json",
                help="supervised fine-tuning: alignlab train_sft vs trl.SFTTrainer", sequences_per_example=1),
    "rm": Pair("alignlab.bench:ours_rm", "alignlab.bench:trl_rm", default_data="hh_rlhf_helpful_base_test.jsonl.gz",
               help="reward model on preference pairs (--batch-size pairs): alignlab train_reward vs "
               "trl.RewardTrainer",
               rows=(("final pairwise accuracy", "final_accuracy", "3"),), sequences_per_example=2),
    "rm-kwise": Pair("alignlab.bench:ours_rm_kwise", "alignlab.bench:ours_rm_pairs",
                     default_data="oasst_en_100_tree.jsonl",
                     help="alignlab reward model on rankings: K-wise loss (--batch-size prompts, each answer "
                     "encoded once) vs the rankings expanded to pairs (each answer encoded K-1 times)",
                     names=("kwise", "pairs"), labels=("K-wise", "pairs"),
                     options=(("pairs_batch_size", 0, "rm-kwise: pairs per step of the expanded run (0 = as many "
                               "sequences per step as the K-wise run has on average)"),),
                     rows=(("pairs (comparisons)/s", "pairs_per_s", "2"),
                           ("sequences/s", "sequences_per_s", "2"),
                           ("sequences/step", "sequences_per_step", "1")),
                     compare="alignlab.bench:compare_rankings"),
    "dpo": Pair("alignlab.bench:ours_dpo", "alignlab.bench:trl_dpo", default_data="dpo_en_demo.json",
                help="DPO (sigmoid loss, frozen reference copy) on preference pairs (--batch-size pairs): "
                "alignlab train_dpo vs trl.DPOTrainer",
                options=(("beta", 0.1, "dpo: DPO beta (both libraries)"),),
                rows=(("final reward margin", "final_reward_margin", "4"),
                      ("final reward accuracy", "final_reward_accuracy", "3")), sequences_per_example=2),
    "ppo": Pair("alignlab.bench:ours_ppo", "alignlab.bench:trl_ppo", default_data="alpaca_en_demo.json",
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
    "gen": Pair("alignlab.bench:ours_gen_shared", "alignlab.bench:ours_gen_plain", default_data="task:sentiment",
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
        defaults = self.option_defaults or {k: d for k, d, _ in PAIRS[self.stage].options}
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


def _import(path: str) -> Callable[..., Any]:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def shared_data_file(name: str) -> Path | None:
    """``name`` in the shared data folder (``../shared/data`` from here or from the repository), if present."""
    for root in (Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"):
        if (root / name).is_file():
            return root / name
    return None


# ------------------------------------------------------------------------------------------------ numbers


def mfu(params: int, tokens_per_s: float, peak_flops: float, factor: float = 6.0) -> float:
    """Model FLOPs utilisation: ``factor * params * tokens_per_s / peak_flops`` (a fraction, not a percentage).

    ``6 * params`` FLOPs per token = forward (one multiply-add, 2 FLOPs, per parameter) + backward (twice the
    forward); DPO uses ``8`` (plus the reference model's forward). The attention-score FLOPs are left out;
    ``peak_flops`` is FLOP/s of the dtype computed in.
    """
    if peak_flops <= 0:
        raise ValueError("peak_flops must be positive")
    return factor * params * tokens_per_s / peak_flops


def measure_matmul_peak(precision: str = "fp32", size: int = 2048, repeats: int = 10) -> float:
    """This machine's matmul throughput (FLOP/s) in ``precision`` (``fp32`` or ``bf16``): the best of
    ``repeats`` timings of a ``size x size`` ``torch.matmul`` (2 size^3 FLOPs), after one untimed call."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    out = torch.matmul(a, b)
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def matmul_peaks(*, cache: bool = True, refresh: bool = False) -> dict[str, float]:
    """Measured peak FLOP/s for ``fp32`` and ``bf16``, cached in ``<alignlab cache>/bench/matmul_peak.json``
    under a key naming the CPU, torch version and thread count (``refresh`` measures again)."""
    import torch

    key = f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = None
    stored: dict[str, Any] = {}
    if cache:
        from alignlab.models import cache_dir

        path = cache_dir() / "bench" / "matmul_peak.json"
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except ValueError:
                stored = {}
        if not refresh and key in stored:
            return stored[key]
    peaks = {p: measure_matmul_peak(p) for p in ("fp32", "bf16")}
    if path is not None:
        stored[key] = peaks
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stored, indent=1))
    return peaks


def _timed(raw: dict[str, Any], key: str, warmup_steps: int) -> list[float]:
    return list(raw.get(key) or [])[warmup_steps:]


def summarize(raws: dict[str, Any] | list[dict[str, Any]], warmup_steps: int,
              peak_flops: dict[str, float] | None) -> dict[str, Any]:
    """Reported numbers from a runner's raw measurements (see the module docstring): one dict per round,
    each round's first ``warmup_steps`` steps left out, the timed steps of all rounds pooled."""
    rounds = [raws] if isinstance(raws, dict) else list(raws)
    seconds = [x for raw in rounds for x in _timed(raw, "step_seconds", warmup_steps)]
    tokens = [x for raw in rounds for x in _timed(raw, "step_tokens", warmup_steps)]
    first = rounds[0]
    losses = list(first.get("losses") or [])
    if not seconds or sum(seconds) <= 0:
        raise AlignlabError(f"no timed steps: {len(first['step_seconds'])} steps ran, {warmup_steps} of them warmup")
    tokens_per_s = sum(tokens) / sum(seconds)
    rss = [raw["peak_rss_mib"] for raw in rounds if raw.get("peak_rss_mib") is not None]
    out: dict[str, Any] = {
        "tokens_per_s": tokens_per_s,
        "ms_per_token": 1000.0 / tokens_per_s if tokens_per_s > 0 else None,
        "s_per_step": sum(seconds) / len(seconds),
        "tokens_per_step": sum(tokens) / len(tokens),
        "timed_steps": len(seconds),
        "rounds": len(rounds),
        "final_loss": float(losses[-1]) if losses else float("nan"),
        "peak_rss_mib": max(rss) if rss else None,
        "precision": first.get("precision"),
        "trainable_params": first.get("trainable_params"),
        "total_params": first.get("total_params"),
    }
    cpu = [x for raw in rounds for x in _timed(raw, "step_cpu_seconds", warmup_steps)]
    if len(cpu) == len(seconds) and sum(cpu) > 0:
        # CPU seconds of the worker (all its threads): less sensitive than wall time to other processes on a
        # shared machine; cpu_utilisation ~ the thread count when the machine is otherwise idle
        out["tokens_per_cpu_s"] = sum(tokens) / sum(cpu)
        out["cpu_utilisation"] = sum(cpu) / sum(seconds)
        threads = first.get("torch_threads")
        if threads:
            # steps during which the worker kept ~all its threads busy: the machine was not shared then
            quiet = [i for i, (c, s) in enumerate(zip(cpu, seconds)) if c / s >= UNCONTENDED * threads]
            out["uncontended_steps"] = len(quiet)
            if quiet:
                out["tokens_per_s_uncontended"] = sum(tokens[i] for i in quiet) / sum(seconds[i] for i in quiet)
    for name in first.get("step_counts") or {}:  # e.g. pairs or sequences per step -> pairs_per_s
        counts = [x for raw in rounds for x in _timed(raw["step_counts"], name, warmup_steps)]
        out[f"{name}_per_s"] = sum(counts) / sum(seconds)
        out[f"{name}_per_step"] = sum(counts) / len(counts)
    for name in first.get("step_times") or {}:  # e.g. PPO's generation seconds per iteration
        times = [x for raw in rounds for x in _timed(raw["step_times"], name, warmup_steps)]
        out[f"time_{name}"] = sum(times) / len(times)
    out.update(first.get("reported") or {})  # numbers a runner reports as they are (bench gen's prompt lengths)
    for name, values in (first.get("step_values") or {}).items():  # e.g. DPO's reward margin at the last step
        out[f"final_{name}"] = float(values[-1]) if values else None
    peak = (peak_flops or {}).get(first.get("precision") or "")
    params = first.get("flops_params") or first.get("trainable_params")
    factor = first.get("flops_per_token_factor", 6.0)
    if peak and params and factor:
        out["peak_flops"] = peak
        out["mfu"] = mfu(params, tokens_per_s, peak, factor)
    return out


def summarize_stopped(raws: list[dict[str, Any]]) -> dict[str, Any]:
    """The reported numbers of a runner one of whose rounds was stopped at the time limit: that round's
    progress (:func:`stopped_worker`) and the largest peak RSS of all rounds; no speed is measured."""
    stopped = next(raw for raw in raws if raw.get("timed_out"))
    keys = ("timed_out", "time_limit_s", "steps_done", "step_seconds_done", "loop_started", "load_s",
            "unfinished_step_s", "max_step_tokens", "bound_from_warmup", "tokens_per_s_upper_bound")
    out = {key: stopped[key] for key in keys if key in stopped}
    out["peak_rss_mib"] = max(raw["peak_rss_mib"] for raw in raws)
    return out


RATIO_KEYS = ("tokens_per_s", "tokens_per_s_uncontended", "tokens_per_cpu_s", "s_per_step", "peak_rss_mib",
              "final_loss", "mfu")


def ratios(ours: dict[str, Any], trl: dict[str, Any], keys: tuple[str, ...] = RATIO_KEYS) -> dict[str, float]:
    """ours / TRL (first / second runner) for every number of ``keys`` both have."""
    out = {}
    for key in keys:
        a, b = ours.get(key), trl.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            out[key] = a / b
    return out


def compare_rankings(report: dict[str, Any]) -> dict[str, Any]:
    """``rm-kwise``: what the K-wise path saves over expanding rankings to pairs, over one epoch of the data.

    ``token_factor`` = tokens of the expanded pairs / of the K-wise examples, each sequence (prompt + answer)
    counted whole, i.e. what a trainer that encodes every sequence separately would run (each answer once in
    K-wise, K - 1 times as pairs); ``run_token_factor``: the same with every prompt encoded once per example (a
    prompt once per K-wise example, once per pair when expanded), the most our shared-prompt layout saves;
    ``epoch_s`` = those tokens / each run's measured tokens/s; ``speed_factor`` = pairs epoch / K-wise epoch
    (``= token_factor x`` the tokens/s ratio). The issue's target: ``speed_factor >= token_factor``, i.e. the
    K-wise batches are processed at least as fast per token as the pairs."""
    kwise, pairs = report["results"]["kwise"], report["results"]["pairs"]
    tokens = {"kwise": kwise["dataset"]["tokens"], "pairs": pairs["dataset"]["tokens"]}
    encoded = {"kwise": kwise["dataset"].get("encoded_tokens"), "pairs": pairs["dataset"].get("encoded_tokens")}
    epoch = {name: tokens[name] / report["results"][name]["tokens_per_s"] for name in tokens}
    token_factor = tokens["pairs"] / tokens["kwise"]
    speed_factor = epoch["pairs"] / epoch["kwise"]
    return {
        "encoded_tokens_per_epoch": tokens,
        "run_tokens_per_epoch": encoded,
        "run_token_factor": encoded["pairs"] / encoded["kwise"] if encoded["kwise"] else None,
        "comparisons_per_epoch": kwise["dataset"]["pairs"],
        "token_factor": token_factor,
        "epoch_s_estimate": epoch,
        "speed_factor": speed_factor,
        "pairs_per_s_ratio": kwise["pairs_per_s"] / pairs["pairs_per_s"],
        "target_met": speed_factor >= token_factor,
    }


# ------------------------------------------------------------------------------------------------ workers

PROGRESS_ENV = "ALIGNLAB_BENCH_PROGRESS"  # the file a worker stamps its loop's start and steps in


def stamp_progress(event: str) -> None:
    """Append ``{"event": "start" | "step", "time": time.monotonic()}`` to the worker's progress file (set by
    :func:`launch` under ``--time-limit``), so the parent knows how far a worker it stops there got."""
    path = os.environ.get(PROGRESS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, "time": time.monotonic()}) + "\n")  # system-wide on Linux


def stopped_worker(progress: Path, launched: float, stopped: float, time_limit: float,
                   max_step_tokens: int | None, warmup_steps: int = 0) -> dict[str, Any]:
    """The raw result of a worker killed at ``time_limit``, from its progress stamps (``time.monotonic``): the
    steps it finished and their seconds, the seconds it had spent in the step it was in (or loading, when its loop
    never started) and, given ``max_step_tokens``, an upper bound on its tokens/s: over its timed steps so far
    (those after ``warmup_steps``) and the unfinished one, at most ``max_step_tokens`` tokens each, or over the
    unfinished warmup step alone when it never got past warmup (``bound_from_warmup``)."""
    events = []
    if progress.exists():
        events = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    starts = [e["time"] for e in events if e["event"] == "start"]
    steps = [e["time"] for e in events if e["event"] == "step"]
    out: dict[str, Any] = {"timed_out": True, "time_limit_s": time_limit, "steps_done": len(steps),
                           "step_seconds_done": [], "loop_started": bool(starts)}
    if not starts:
        out["load_s"] = stopped - launched  # still loading when stopped
        return out
    marks = [starts[0], *steps]
    out["load_s"] = starts[0] - launched
    out["step_seconds_done"] = [b - a for a, b in zip(marks, marks[1:])]
    out["unfinished_step_s"] = stopped - marks[-1]
    timed = out["step_seconds_done"][warmup_steps:]
    seconds = sum(timed) + out["unfinished_step_s"]
    if max_step_tokens and seconds > 0:
        out["max_step_tokens"] = max_step_tokens
        out["bound_from_warmup"] = len(steps) < warmup_steps
        out["tokens_per_s_upper_bound"] = (len(timed) + 1) * max_step_tokens / seconds
    return out


def run_worker(spec_path: str, out_path: str) -> int:
    """The worker process: run one runner and write its raw measurements (or the error) as JSON."""
    import resource
    import traceback

    spec = BenchSpec(**json.loads(Path(spec_path).read_text()))
    runner = _import(spec.runner or PAIRS[spec.stage].runner(spec.library))
    try:
        raw = runner(spec)
        rc = 0
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        raw = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        rc = 1
    raw["worker_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        import torch

        raw["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    Path(out_path).write_text(json.dumps(raw, default=float))
    return rc


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass


def launch(spec: BenchSpec, workdir: Path, *, name: str = "", echo: Callable[[str], Any] = print,
           time_limit: float = 0.0, max_step_tokens: int | None = None) -> dict[str, Any]:
    """Run one library's worker in a fresh process; returns its raw measurements plus ``peak_rss_mib`` (the
    child's maximum RSS from ``os.wait4``) and ``wall_s``. Output goes to ``workdir/<name>.log``. A worker still
    running after ``time_limit`` seconds (0: no limit) is killed and :func:`stopped_worker` says how far it got."""
    name = name or spec.library
    spec_file = workdir / f"{name}.spec.json"
    out_file = workdir / f"{name}.result.json"
    log_file = workdir / f"{name}.log"
    progress_file = workdir / f"{name}.progress.jsonl"
    progress_file.unlink(missing_ok=True)
    spec_file.write_text(json.dumps(dataclasses.asdict(spec)))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               TRANSFORMERS_OFFLINE=os.environ.get("TRANSFORMERS_OFFLINE", "1"),
               HF_HUB_DISABLE_TELEMETRY="1", DISABLE_MLFLOW_INTEGRATION="TRUE", WANDB_DISABLED="true")
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if time_limit > 0:
        env[PROGRESS_ENV] = str(progress_file)
    t0, launched = time.perf_counter(), time.monotonic()
    stopped = 0.0
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "alignlab.bench", "_worker", str(spec_file), str(out_file)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                start_new_session=True)  # its own process group: a kill reaches its children
        reaped = False
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG if time_limit > 0 else 0)
                if pid:
                    reaped = True
                    break
                if time.perf_counter() - t0 >= time_limit:
                    stopped = time.monotonic()
                    _kill_group(proc.pid)
                    _, status, usage = os.wait4(proc.pid, 0)
                    reaped = True
                    break
                time.sleep(min(0.5, time_limit / 20))
        finally:  # the parent interrupted or failing must not leave a worker running in its own session
            if not reaped:
                _kill_group(proc.pid)
                proc.wait()
        _kill_group(proc.pid)  # anything the worker left behind in its group
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if stopped and out_file.exists():  # it had finished and written its result, and was stopped tearing down
        stopped = 0.0
        proc.returncode = 0
    if stopped:
        raw = stopped_worker(progress_file, launched, stopped, time_limit, max_step_tokens, spec.warmup_steps)
        raw.update(peak_rss_mib=usage.ru_maxrss / 1024, wall_s=wall)
        echo(f"  {name}: stopped at the time limit ({time_limit:.0f} s) after {raw['steps_done']} step(s)")
        return raw
    raw: dict[str, Any] = json.loads(out_file.read_text()) if out_file.exists() else {}
    if proc.returncode != 0 or "error" in raw:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-25:])
        raise AlignlabError(f"the {spec.library} {spec.stage} worker failed (exit {proc.returncode}): "
                            f"{raw.get('error', 'no result')}\n--- last lines of {log_file} ---\n{tail}")
    raw["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    raw["wall_s"] = wall
    echo(f"  {name}: done in {wall:.1f} s")
    return raw


def machine_info() -> dict[str, Any]:
    import platform

    import psutil

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    for pkg in ("torch", "transformers", "accelerate", "trl"):
        try:
            info[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = None
    return info


def run_benchmark(stage: str, *, model: str = "smollm2-135m-instruct", data: str = "", batch_size: int = 8,
                  max_length: int = 512, steps: int = 5, warmup_steps: int = 1, precision: str = "auto",
                  settings: str = "matched", which: str = "both", seed: int = 0,
                  extra: dict[str, Any] | None = None, measure_peak: bool = True, refresh_peak: bool = False,
                  rounds: int = 1, keep_workdir: str = "", time_limit: float = 0.0,
                  echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run ``stage`` with both runners (ours and TRL's, or the stage's ``names``) or one of them (``which``),
    one after the other, each in its own process; returns the report (machine, settings, per-runner summaries,
    first/second ratios, the stage's comparison, raw measurements). A worker running longer than ``time_limit``
    seconds (0: no limit) is stopped and reported by how far it got (:func:`stopped_worker`)."""
    import datetime

    if stage not in PAIRS:
        raise AlignlabError(f"no benchmark for stage '{stage}' (known: {', '.join(PAIRS)})")
    if settings not in SETTINGS:
        raise AlignlabError(f"settings must be one of {SETTINGS}, got '{settings}'", field="settings")
    if steps < 1 or warmup_steps < 0 or batch_size < 1 or rounds < 1 or time_limit < 0:
        raise AlignlabError("need steps >= 1, warmup_steps >= 0, batch_size >= 1, rounds >= 1 and time_limit >= 0")
    pair = PAIRS[stage]
    if which not in ("both", *pair.names):
        raise AlignlabError(f"--which for {stage} must be both, {' or '.join(pair.names)}; got '{which}'",
                            field="which")
    known = {key for key, _, _ in pair.options}
    unknown = sorted(set(extra or {}) - known)
    if unknown:
        raise AlignlabError(f"unknown option(s) {', '.join(unknown)} for bench {stage} (known: "
                            f"{', '.join(sorted(known)) or 'none'})", field="set")
    for key in extra or {}:  # a wrong type fails here, before any worker starts
        BenchSpec(stage=stage, library=pair.names[0], model=model, data=data, extra=dict(extra or {})).option(key)
    builtin_task = stage == "gen" and (data or pair.default_data).startswith("task:")
    if not data and builtin_task:
        data = pair.default_data
    if not data:
        found = shared_data_file(pair.default_data) if pair.default_data else None
        if found is None:
            raise AlignlabError(f"no data: pass --data FILE (default {pair.default_data} not found in ../shared/data)",
                                field="data")
        data = str(found)
    if not builtin_task and not Path(data).exists():
        raise AlignlabError("data file does not exist", file=data)
    from alignlab.train.loop import resolve_precision

    resolved = resolve_precision(precision)
    libraries = pair.names if which == "both" else (which,)
    started = datetime.datetime.now().astimezone()
    report: dict[str, Any] = {
        "stage": stage, "settings": settings, "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["alignlab", *sys.argv[1:]]) if sys.argv and "alignlab" in sys.argv[0] else None,
        "config": {"model": model, "data": data, "batch_size": batch_size, "max_length": max_length,
                   "steps": steps, "warmup_steps": warmup_steps, "rounds": rounds, "seed": seed, "lr": LEARNING_RATE,
                   "time_limit_s": time_limit or None,
                   "precision": resolved if settings == "matched" else "each library's default",
                   "extra": extra or {}},
        "names": list(pair.names), "labels": list(pair.labels), "unit": pair.unit, "tokens": pair.tokens,
        "machine": machine_info(),
    }
    peaks = None
    if measure_peak:
        echo("measuring matmul peak (fp32, bf16) ...")
        peaks = matmul_peaks(refresh=refresh_peak)
        report["matmul_peak_flops"] = peaks
    # resolve the model once here (a built-in model is converted into the cache before either worker starts)
    from alignlab.models import resolve_model

    resolve_model(model)
    workdir = Path(keep_workdir) if keep_workdir else Path(tempfile.mkdtemp(prefix=f"alignlab-bench-{stage}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    raws: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libraries}
    try:
        for round_index in range(rounds):
            # ABBA order over rounds, so a drift in the machine's load does not favour one library
            order = libraries if round_index % 2 == 0 else tuple(reversed(libraries))
            for library in order:
                if any(raw.get("timed_out") for raw in raws[library]):
                    continue  # it did not finish within the limit once; another round would not either
                name = library if rounds == 1 else f"{library}-r{round_index + 1}"
                echo(f"running {name} {stage} ({settings}, {warmup_steps}+{steps} {pair.unit}s) ...")
                spec = BenchSpec(stage=stage, library=library, model=model, data=data, batch_size=batch_size,
                                 max_length=max_length, steps=steps, warmup_steps=warmup_steps,
                                 precision=resolved, settings=settings, seed=seed, workdir=str(workdir / name),
                                 extra=dict(extra or {}), runner=pair.runner(library),
                                 option_defaults={k: d for k, d, _ in pair.options})
                Path(spec.workdir).mkdir(parents=True, exist_ok=True)
                max_step_tokens = batch_size * pair.sequences_per_example * max_length or None
                raws[library].append(launch(spec, workdir, name=name, echo=echo, time_limit=time_limit,
                                            max_step_tokens=max_step_tokens))
    finally:
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["results"] = {lib: summarize_stopped(runs) if any(r.get("timed_out") for r in runs)
                         else summarize(runs, warmup_steps, peaks) for lib, runs in raws.items()}
    for lib, runs in raws.items():
        for key in ("settings", "notes", "dataset", "worker_maxrss_mib", "torch_threads"):
            if key in runs[0]:
                report["results"][lib][key] = runs[0][key]
        report["results"][lib]["wall_s"] = [raw["wall_s"] for raw in runs]
    if len(raws) == 2:
        first, second = (report["results"][name] for name in pair.names)
        keys = RATIO_KEYS + tuple(key for _, key, kind in pair.rows
                                  if kind not in ("str", "int") and not key.startswith("final_"))
        report["ratios"] = ratios(first, second, keys)
        # a stopped runner has only a bound on its speed, so the ratio is a bound too
        if second.get("tokens_per_s_upper_bound") and first.get("tokens_per_s"):
            report["ratios"]["tokens_per_s_at_least"] = first["tokens_per_s"] / second["tokens_per_s_upper_bound"]
        if first.get("tokens_per_s_upper_bound") and second.get("tokens_per_s"):
            report["ratios"]["tokens_per_s_at_most"] = first["tokens_per_s_upper_bound"] / second["tokens_per_s"]
        if pair.compare and not (first.get("timed_out") or second.get("timed_out")):
            report["comparison"] = _import(pair.compare)(report)
    report["raw"] = {lib: [{k: raw[k] for k in ("step_seconds", "step_cpu_seconds", "step_tokens", "losses",
                                                "step_counts", "step_times", "step_values", "peak_rss_mib")
                            if k in raw} for raw in runs]
                     for lib, runs in raws.items()}
    return report


# ------------------------------------------------------------------------------------------------ output


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "int":
        return f"{value:,.0f}"
    if kind == "pct":
        return f"{100 * value:.2f} %"
    if kind == "ratio":
        return f"{value:.2f}x"
    return f"{value:,.{kind}f}"


TABLE_ROWS = (  # (label, key, format); TOKENS and UNIT are replaced by the stage's words
    ("TOKENS/s", "tokens_per_s", "1"),
    ("TOKENS per CPU-second", "tokens_per_cpu_s", "1"),
    ("CPU utilisation (cores)", "cpu_utilisation", "2"),
    ("TOKENS/s, uncontended UNITs", "tokens_per_s_uncontended", "1"),
    ("uncontended UNITs", "uncontended_steps", "int"),
    ("s/UNIT", "s_per_step", "2"),
    ("TOKENS/UNIT", "tokens_per_step", "1"),
    ("peak RSS (MiB)", "peak_rss_mib", "0"),
    ("final loss", "final_loss", "4"),
    ("MFU (measured peak)", "mfu", "pct"),
    ("precision", "precision", "str"),
    ("trainable params", "trainable_params", "int"),
    ("timed UNITs", "timed_steps", "int"),
)
STOPPED_ROWS = (  # shown when a worker was stopped at --time-limit
    ("stopped at the time limit (s)", "time_limit_s", "0"),
    ("UNITs finished before the stop", "steps_done", "int"),
    ("s spent in the unfinished UNIT", "unfinished_step_s", "1"),
    ("TOKENS/s, upper bound", "tokens_per_s_upper_bound", "2"),
)


def format_table(report: dict[str, Any]) -> Any:
    """A rich Table of the report: one row per number, one column per runner, and first / second."""
    from rich.table import Table

    cfg = report["config"]
    results = report["results"]
    pair = PAIRS[report["stage"]]
    names = report.get("names") or list(pair.names)
    labels = dict(zip(names, report.get("labels") or pair.labels))
    unit, tokens = report.get("unit", pair.unit), report.get("tokens", pair.tokens)
    title = (f"alignlab bench {report['stage']} ({report['settings']}): {cfg['model']}, batch {cfg['batch_size']}, "
             f"max_length {cfg['max_length']}, {cfg['warmup_steps']}+{cfg['steps']} {unit}s")
    table = Table(title=title)
    table.add_column("")
    for lib in results:
        table.add_column(labels.get(lib, lib), justify="right")
    if "ratios" in report:
        table.add_column(" / ".join(labels[name] for name in names), justify="right")
    stopped = any(result.get("timed_out") for result in results.values())
    for label, key, kind in TABLE_ROWS + pair.rows + (STOPPED_ROWS if stopped else ()):
        cells = [str(results[lib].get(key) or "-") if kind == "str" else _fmt(results[lib].get(key), kind)
                 for lib in results]
        if "ratios" in report:
            ratio, ratios_ = _fmt(report["ratios"].get(key), "ratio"), report["ratios"]
            if key == "tokens_per_s" and "tokens_per_s_at_least" in ratios_:
                ratio = f">= {_fmt(ratios_['tokens_per_s_at_least'], 'ratio')}"
            elif key == "tokens_per_s" and "tokens_per_s_at_most" in ratios_:
                ratio = f"<= {_fmt(ratios_['tokens_per_s_at_most'], 'ratio')}"
            cells.append(ratio)
        table.add_row(label.replace("TOKENS", tokens).replace("UNIT", unit), *cells)
    return table


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    console.print(format_table(report))
    labels = dict(zip(report.get("names") or [], report.get("labels") or []))
    for lib, result in report["results"].items():
        for line in (result.get("notes") or {}).get("unmatched") or []:
            console.print(f"not matched ({labels.get(lib, lib)}): {escape(line)}")
    unit = report.get("unit", "step")
    for lib, result in report["results"].items():
        if not result.get("timed_out"):
            continue
        label = labels.get(lib, lib)
        if not result.get("loop_started"):
            console.print(f"{label}: stopped at the time limit ({result['time_limit_s']:.0f} s) before its first "
                          f"{unit} began (loading took all of it); no speed measured")
            continue
        line = (f"{label}: stopped at the time limit ({result['time_limit_s']:.0f} s): {result['steps_done']} "
                f"{unit}(s) finished after {result['load_s']:.0f} s of loading, then "
                f"{result['unfinished_step_s']:.0f} s in the next without finishing it")
        if result.get("tokens_per_s_upper_bound"):
            stretch = f"its warmup {unit}" if result.get("bound_from_warmup") else f"its timed {unit}s so far"
            line += (f"; a {unit} holds at most {result['max_step_tokens']:,} tokens, so {stretch} ran at under "
                     f"{result['tokens_per_s_upper_bound']:.2f} tokens/s")
        console.print(line + " (its peak RSS is the peak up to the stop, a lower bound)")
    comparison = report.get("comparison")
    if comparison and report["stage"] == "rm-kwise":
        tokens, epoch = comparison["encoded_tokens_per_epoch"], comparison["epoch_s_estimate"]
        console.print(
            f"one epoch = {comparison['comparisons_per_epoch']:,} comparisons: K-wise encodes {tokens['kwise']:,} "
            f"tokens, pairs {tokens['pairs']:,} (token factor {comparison['token_factor']:.2f}x); estimated epoch "
            f"{epoch['kwise']:.1f} s vs {epoch['pairs']:.1f} s: speed factor {comparison['speed_factor']:.2f}x "
            f"(target >= token factor: {'met' if comparison['target_met'] else 'NOT met'})")
        run = comparison.get("run_tokens_per_epoch") or {}
        if run.get("kwise"):
            console.print(f"tokens with each example's prompt encoded once: K-wise {run['kwise']:,}, "
                          f"pairs {run['pairs']:,} (factor {comparison['run_token_factor']:.2f}x)")
    peaks = report.get("matmul_peak_flops")
    if peaks:
        console.print(f"measured matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
                      f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s; machine: {report['machine']['cpu']}, "
                      f"{report['machine']['nproc']} CPUs")


# ------------------------------------------------------------------------------------------------ CLI


def _stage_help() -> str:
    return "; ".join(f"{k}: {v.help}" for k, v in PAIRS.items())


def _options_help() -> str:
    lines = [f"{key}={default}: {help_}" for pair in PAIRS.values() for key, default, help_ in pair.options]
    return "stage option passed to the runners (repeatable): " + "; ".join(lines)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=list(PAIRS), help="which stage to benchmark: " + _stage_help())
    parser.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint folder, hub id or built-in")
    parser.add_argument("--data", help="training data; ppo: the prompts (default: the stage's file in ../shared/data: "
                        + ", ".join(f"{k} {v.default_data}" for k, v in PAIRS.items()) + ")")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="examples per optimizer step, no accumulation (sft: examples; rm, dpo: pairs; rm-kwise: "
                        "prompts with all their answers; ppo: responses per iteration)")
    parser.add_argument("--max-length", type=int, default=512,
                        help="maximum tokens per example, truncated (ppo: the longest prompt; longer ones are dropped)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per library (ppo: iterations)")
    parser.add_argument("--warmup-steps", type=int, default=1,
                        help="untimed steps (ppo: iterations) before the timed ones")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="compute dtype for --settings matched (auto: bf16 where the hardware has it)")
    parser.add_argument("--settings", default="matched", choices=list(SETTINGS),
                        help="matched: same dtype/optimizer/batches for both; defaults: each library's defaults")
    names = sorted({name for pair in PAIRS.values() for name in pair.names})
    parser.add_argument("--which", default="both", choices=["both", *names],
                        help="which runners to run: both, or one by name (ours/trl; rm-kwise: kwise/pairs)")
    parser.add_argument("--seed", type=int, default=0, help="data order and initialisation seed")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run each library this many times, alternating the order (ours, TRL, TRL, ours, ...), "
                        "and pool the timed steps: evens out a shared machine's changing load")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help=_options_help())
    parser.add_argument("--json", dest="json_out", metavar="OUT",
                        help="write the report here (default: runs/bench/STAGE-SETTINGS.json)")
    parser.add_argument("--remeasure-peak", action="store_true",
                        help="measure the matmul peak again instead of using the cached value")
    parser.add_argument("--keep-workdir", default="", metavar="DIR",
                        help="run the workers in DIR and keep their logs and run folders")
    parser.add_argument("--time-limit", type=float, default=0.0, metavar="SECONDS",
                        help="stop a worker still running after this many seconds and report how far it got, with "
                        "an upper bound on its tokens/s (sft, rm, dpo); 0 = no limit")


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    extra = {}
    for word in args.extra:
        if "=" not in word:
            raise AlignlabError(f"expected KEY=VALUE, got '{word}'", field="set")
        key, value = word.split("=", 1)
        extra[key.strip()] = value
    report = run_benchmark(args.stage, model=args.model, data=args.data or "", batch_size=args.batch_size,
                           max_length=args.max_length, steps=args.steps, warmup_steps=args.warmup_steps,
                           precision=args.precision, settings=args.settings, which=args.which, seed=args.seed,
                           extra=extra, refresh_peak=args.remeasure_peak, rounds=args.rounds,
                           keep_workdir=args.keep_workdir, time_limit=args.time_limit)
    print_report(report)
    out = Path(args.json_out or f"runs/bench/{args.stage}-{args.settings}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out}")
    return report


# ------------------------------------------------------------------------------------------------ runner helpers


def count_params(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; shared (tied) tensors counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def matmul_params(model: Any) -> int:
    """Parameters every token meets in a matmul: all but the input embedding table (a lookup), plus the LM head
    (once, tied or not) where the model has one. For a causal LM with tied embeddings this is all parameters;
    for a reward model (a score head instead of the LM head) it leaves the embedding table out."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen and p is not embedding:
            n += p.numel()
        seen.add(id(p))
    if head is not None and head.weight is embedding:
        n += embedding.numel()
    return n


def meta_params(name: str, head: str = "causal_lm") -> tuple[int, int, int]:
    """(trainable, total, matmul) parameters of model ``name`` with ``head`` (``causal_lm`` or ``score``), counted
    on the meta device (no weights allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignlab.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(name))
    with torch.device("meta"):
        if head == "score":
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return (*count_params(model), matmul_params(model))


def trainer_params(model: Any) -> tuple[int, int, int]:
    """(trainable, total, matmul) parameters of a loaded model."""
    return (*count_params(model), matmul_params(model))


class _Quiet:
    """Stands in for a ``Run`` where a data helper only prints."""

    def print(self, *args: Any) -> None:
        pass


def stamped_run(train: Callable[[], Any], key: str, steps: int) -> tuple[list[float], list[float], list[dict]]:
    """Run one of our trainers, unmodified (``train()`` returns its run folder), and time its steps.

    ``Run.progress`` (called right before the loop) and ``Run.log`` (called after each step, for records holding
    ``key``) are wrapped to stamp the wall clock and this process's CPU time, so a step's seconds run from the
    end of the previous step (or the start of the loop) to its own end. The wrappers only record.

    Returns:
        ``(seconds, cpu_seconds, records)``: per step, and the step records of the run's ``metrics.jsonl``.
    """
    from alignlab.train import loop

    stamps: list[tuple[float, float]] = []
    original_log, original_progress = loop.Run.log, loop.Run.progress

    def stamped_log(self: Any, step: int, metrics: dict[str, Any], **kw: Any) -> None:
        if kw.get("file", "metrics.jsonl") == "metrics.jsonl" and key in metrics:
            stamps.append((time.perf_counter(), time.process_time()))
            stamp_progress("step")
        original_log(self, step, metrics, **kw)

    def stamped_progress(self: Any, *args: Any, **kw: Any) -> Any:
        bar = original_progress(self, *args, **kw)
        stamps.append((time.perf_counter(), time.process_time()))
        stamp_progress("start")
        return bar

    loop.Run.log, loop.Run.progress = stamped_log, stamped_progress
    try:
        run_dir = train()
    finally:
        loop.Run.log, loop.Run.progress = original_log, original_progress
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    records = [r for r in records if key in r]
    if len(records) != steps or len(stamps) != steps + 1:
        raise AlignlabError(f"expected {steps} logged steps, found {len(records)}")
    seconds = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu_seconds = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    return seconds, cpu_seconds, records


def _ours_config(cls: type, spec: BenchSpec, **values: Any) -> Any:
    """Our config ``cls`` for ``spec``: no final model, a fresh run folder, no accumulation, the stage's
    ``values``; with ``matched`` settings the shared optimizer, schedule, dtype and logging settings. Our
    ``max_tokens`` stays at its default (a batch in forward passes of at most that many tokens: the same update,
    so it is an implementation choice like the shared-prompt layout, not a setting to match)."""
    base: dict[str, Any] = dict(model=spec.model, batch_size=spec.batch_size, grad_accum=1, seed=spec.seed,
                                output_dir=str(Path(spec.workdir) / "run"), resume="never", save_final=False)
    base.update(values)
    if spec.settings == "matched":
        base.update(precision=spec.precision, gradient_checkpointing=False, lr=spec.lr, schedule="constant",
                    warmup_ratio=0.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
                    progress=False, log_every=1)
    return cls(**base)


def _ours_settings(cfg: Any, **more: Any) -> dict[str, Any]:
    return {"gradient_checkpointing": cfg.gradient_checkpointing, "optimizer": "torch.optim.AdamW(fused=True)",
            "schedule": cfg.schedule, "warmup_ratio": cfg.warmup_ratio, "lr": cfg.lr,
            "group_by_length": cfg.group_by_length, "batch_size": cfg.batch_size,
            "max_tokens_per_forward": cfg.max_tokens, **more}


def _result(seconds: list[float], cpu_seconds: list[float], tokens: list[int], losses: list[float], *,
            params: tuple[int, int, int], precision: str, settings: dict[str, Any],
            notes: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    """A runner's raw measurements (see the module docstring)."""
    out = {"step_seconds": seconds, "step_cpu_seconds": cpu_seconds, "step_tokens": tokens,
           "losses": [float(x) for x in losses], "trainable_params": params[0], "total_params": params[1],
           "flops_params": params[2], "precision": precision, "settings": settings, **more}
    if notes:
        out["notes"] = notes
    return out


def _name(value: Any) -> str:
    """An enum's value (``OptimizerNames.ADAMW_TORCH`` -> ``adamw_torch``), else ``str(value)``."""
    return str(getattr(value, "value", value))


def trl_args(spec: BenchSpec, matched: dict[str, Any] | None = None, **stage: Any) -> dict[str, Any]:
    """Keyword arguments of a TRL config for ``spec``: CPU, no reporting, saving or evaluation, no accumulation,
    ``spec``'s batch, steps and seed; with ``matched`` settings our optimizer, schedule, dtype (fp32 weights),
    no gradient checkpointing, no logging and a sequential sampler, plus ``matched``; then ``stage``."""
    import torch

    args: dict[str, Any] = dict(
        output_dir=str(Path(spec.workdir) / "run"), use_cpu=True, report_to=[], save_strategy="no",
        eval_strategy="no", dataloader_num_workers=0, per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=1, max_steps=spec.total_steps, seed=spec.seed,
    )
    if spec.settings == "matched":
        args.update(
            bf16=spec.precision == "bf16", fp16=False, gradient_checkpointing=False, optim="adamw_torch_fused",
            learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, logging_strategy="no", disable_tqdm=True,
            train_sampling_strategy="sequential", model_init_kwargs={"dtype": torch.float32}, **(matched or {}),
        )
    args.update(stage)
    return args


def trl_settings(args: Any, **more: Any) -> dict[str, Any]:
    return {"gradient_checkpointing": args.gradient_checkpointing, "optimizer": _name(args.optim),
            "schedule": _name(args.lr_scheduler_type), "lr": args.learning_rate,
            "sampler": _name(args.train_sampling_strategy), "logging_steps": args.logging_steps,
            "logging": _name(args.logging_strategy), "batch_size": args.per_device_train_batch_size, **more}


def step_clock() -> Any:
    """A TRL ``TrainerCallback`` that stamps (wall, CPU) at the start of the first optimizer step and at the end
    of every step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[tuple[float, float]] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not self.stamps:
                self.stamps.append((time.perf_counter(), time.process_time()))
                stamp_progress("start")

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.stamps.append((time.perf_counter(), time.process_time()))
            stamp_progress("step")

    return StepClock()


def clock_seconds(clock: Any, units: int, per: int = 1) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each of ``units`` timed units of ``per`` optimizer steps, from a :func:`step_clock`."""
    if len(clock.stamps) != units * per + 1:
        raise AlignlabError(f"TRL ran {len(clock.stamps) - 1} optimizer steps, expected {units * per}")
    stamps = clock.stamps[::per]
    return [b[0] - a[0] for a, b in zip(stamps, stamps[1:])], [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]


def measured(trainer_cls: type, values: dict[str, str] | None = None) -> type:
    """A subclass of a TRL trainer whose ``training_step`` also records the batch's attention-mask ones
    (``bench_tokens``), the returned loss (``bench_losses``) and, for ``values`` (``{name: key}``), the step's
    entry ``key`` of the trainer's ``_metrics["train"]`` (``bench_values``). Nothing else of TRL's changes."""
    import torch

    class Measured(trainer_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.bench_tokens: list[int] = []
            self.bench_losses: list[float] = []
            self.bench_values: dict[str, list[float]] = {name: [] for name in values or {}}

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
            self.bench_tokens.append(int(inputs["attention_mask"].sum()))
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.bench_losses.append(float(loss.detach()))
            for name, key in (values or {}).items():
                self.bench_values[name].append(float(self._metrics["train"][key][-1]))
            return loss

    Measured.__name__ = Measured.__qualname__ = f"Measured{trainer_cls.__name__}"
    return Measured


def _trl_result(trainer: Any, clock: Any, spec: BenchSpec, *, notes: dict[str, Any] | None = None,
                **settings: Any) -> dict[str, Any]:
    """The raw measurements of a :func:`measured` TRL trainer that has trained ``spec.total_steps`` steps."""
    seconds, cpu_seconds = clock_seconds(clock, spec.total_steps)
    return _result(seconds, cpu_seconds, trainer.bench_tokens, trainer.bench_losses,
                   params=trainer_params(trainer.model), precision="bf16" if trainer.args.bf16 else "fp32",
                   settings=trl_settings(trainer.args, **settings), notes=notes,
                   step_values=trainer.bench_values)


def _plan_order(plan: list[list[int]], spec: BenchSpec) -> list[int]:
    """Example indices of the first ``spec.total_steps`` steps of our plan, in order: with a sequential sampler
    and the same batch size, TRL then trains on our batches."""
    return [i for step in plan[: spec.total_steps] for i in step]


# ------------------------------------------------------------------------------------------------ SFT runners


def _ours_sft_config(spec: BenchSpec) -> Any:
    """Our SFTConfig for ``spec``. Both settings: no evaluation split, no final model, a fresh run folder."""
    from alignlab.config import SFTConfig

    return _ours_config(SFTConfig, spec, data=spec.data, max_length=spec.max_length, max_steps=spec.total_steps,
                        eval_fraction=0.0)


def ours_sft(spec: BenchSpec) -> dict[str, Any]:
    """Our SFT trainer, unmodified (``train_sft``), timed by :func:`stamped_run`; per-step tokens and losses read
    back from its ``metrics.jsonl``."""
    from alignlab.train.loop import resolve_precision
    from alignlab.train.sft import train_sft

    cfg = _ours_sft_config(spec)
    seconds, cpu_seconds, records = stamped_run(lambda: train_sft(cfg), "tokens", spec.total_steps)
    return _result(seconds, cpu_seconds, [r["tokens"] for r in records], [r["loss"] for r in records],
                   params=meta_params(spec.model), precision=resolve_precision(cfg.precision),
                   settings=_ours_settings(cfg))


def trl_records(spec: BenchSpec, tokenizer: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """The records TRL trains on, in TRL's prompt/completion format, and our tokenized examples of them.

    Our loader tokenizes the file (so both libraries get the records ours keeps); each kept record is turned
    into ``{"prompt", "completion"}`` exactly as our template renders it (Alpaca: the Alpaca prompt text and the
    output; conversations: the messages before the last assistant turn, and that turn). With ``matched``
    settings the records come in the order of our step plan, so a sequential sampler gives TRL our batches.
    """
    from alignlab.config import parse_columns
    from alignlab.data.formats import default_template, iter_instruction_records, load_sft_dataset
    from alignlab.data.templates import render_alpaca_prompt
    from alignlab.train.loop import plan_steps

    cfg = _ours_sft_config(spec)
    examples, _ = load_sft_dataset(spec.data, tokenizer, format=cfg.format, template=cfg.template,
                                   columns=parse_columns(cfg.columns), max_length=cfg.max_length,
                                   truncation=cfg.truncation)
    by_number = {r.record: r for r in iter_instruction_records(spec.data, format=cfg.format,
                                                               columns=parse_columns(cfg.columns))}
    if spec.settings == "matched":
        plan = plan_steps([len(e.input_ids) for e in examples], cfg)
        examples = [examples[i] for step in plan for i in step]

    def convert(record: Any) -> dict[str, Any]:
        template = default_template(record.kind, record.prompt) if cfg.template == "auto" else cfg.template
        if record.kind == "alpaca" and template == "alpaca":
            return {"prompt": render_alpaca_prompt(record.instruction, record.input), "completion": record.output}
        if record.kind == "prompt_completion" and isinstance(record.prompt, str) and template == "none":
            return {"prompt": record.prompt, "completion": record.output}
        if record.kind == "conversation" and record.messages and record.messages[-1]["role"] == "assistant" \
                and sum(m["role"] == "assistant" for m in record.messages) == 1:
            return {"prompt": record.messages[:-1], "completion": record.messages[-1:]}
        raise AlignlabError(f"bench sft cannot give TRL this record ({record.kind}, template {template}): use "
                            "Alpaca, string prompt/completion, or single-answer conversations", record=record.record)

    return [convert(by_number[e.record]) for e in examples], examples


def trl_sft(spec: BenchSpec) -> dict[str, Any]:
    """``trl.SFTTrainer`` with ``SFTConfig`` on the same records (prompt/completion, completion-only loss).

    Timing: :func:`step_clock`. Tokens and loss: :func:`measured` (``training_step`` wrapped to count the
    batch's attention-mask ones and keep the returned loss); nothing else of TRL's is changed."""
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    from alignlab.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(spec.model)
    rows, examples = trl_records(spec, tokenizer)
    if spec.settings == "matched":
        rows, examples = rows[: spec.total_steps * spec.batch_size], examples[: spec.total_steps * spec.batch_size]
    args = TRLConfig(**trl_args(spec, matched=dict(packing=False, padding_free=False), max_length=spec.max_length,
                                completion_only_loss=True, dataset_num_proc=None))
    clock = step_clock()
    trainer = measured(SFTTrainer)(model=resolve_model(spec.model), args=args, train_dataset=Dataset.from_list(rows),
                                   processing_class=tokenizer, callbacks=[clock])
    # fairness check: did TRL's own tokenization give exactly our input ids and loss positions?
    prepared = trainer.train_dataset
    same = None
    if len(prepared) == len(examples):
        same = sum(list(ids) == list(ex.input_ids) and list(lab) == list(ex.labels)
                   for ids, lab, ex in zip(prepared["input_ids"], prepared["labels"], examples))
    trainer.train()
    return _trl_result(trainer, clock, spec, notes={"examples_identical_to_ours": same,
                                                    "examples_compared": len(prepared) if same is not None else 0})


# ------------------------------------------------------------------------------------------------ preference data


def _preference_records(cfg: Any, *, expand: bool) -> list[Any]:
    """The preference records our trainers read from ``cfg.data`` (invalid ones skipped and counted by the
    loader, as ``skip_invalid=true`` does), rankings expanded to their pairs when ``expand``."""
    from alignlab.config import parse_columns
    from alignlab.data.preference import expand_to_pairs, load_preferences

    records, _ = load_preferences(cfg.data, format=cfg.format, columns=parse_columns(cfg.columns), skip_invalid=True,
                                  limit=cfg.limit or None)
    return expand_to_pairs(records) if expand else records


def _encode_each(cfg: Any, records: list[Any], encode: Callable[[Any], list[Any]]
                 ) -> tuple[list[Any], list[Any], list[list[int]]]:
    """Encode every record alone (``encode([record]) -> examples``, so each example keeps its record), and plan
    the steps over the examples as our trainer does: ``(records kept, examples, plan)``."""
    from alignlab.train.loop import plan_steps

    kept = [(item, examples[0]) for item in records if (examples := encode(item))]
    if not kept:
        raise AlignlabError("no examples left after encoding", file=cfg.data)
    items, examples = [k[0] for k in kept], [k[1] for k in kept]
    return items, examples, plan_steps([len(e) for e in examples], cfg)


def trl_text_pair(item: Any) -> dict[str, Any]:
    """A preference pair (``responses == [chosen, rejected]``) in TRL's format, rendered as our ``auto``
    template does: messages (TRL applies the chat template) or plain text (prompt + response + EOS)."""
    chosen, rejected = item.responses[0], item.responses[-1]
    if isinstance(item.prompt, list):
        return {"prompt": item.prompt, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    if isinstance(item.prompt, str):
        return {"prompt": item.prompt, "chosen": chosen, "rejected": rejected}
    raise AlignlabError("cannot give TRL this prompt (use text or message prompts)", record=item.record)


def _same_tokens(prepared: Any, examples: list[Any], ours: Callable[[Any], tuple], theirs: Callable[[Any], tuple]
                 ) -> dict[str, Any]:
    """How many of ``examples`` not truncated by us TRL's own tokenization (``prepared``) gives identically, and
    how many of the others differ only by tokens TRL keeps after the end of ours (a chat template's text after
    the final EOS, e.g. ``"\\n"`` after ``<|im_end|>``: TRL trains on it and a reward model would score it)."""
    compared = [(ours(e), theirs(row)) for row, e in zip(prepared, examples) if not e.truncated]
    same = sum(a == b for a, b in compared)
    longer = sum(a != b and all(list(y[: len(x)]) == list(x) for x, y in zip(a, b)) for a, b in compared)
    out: dict[str, Any] = {"examples_identical_to_ours": same, "examples_compared": len(compared)}
    if same < len(compared):
        out["unmatched"] = [f"TRL's own tokenization of the text differs from ours on {len(compared) - same} of "
                            f"{len(compared)} untruncated examples ({longer} of them only by tokens after the end of "
                            "our sequences, e.g. the chat template's text after the final EOS); TRL was given our "
                            "token ids, so both trained on the same tokens"]
    return out


def _trl_tokenization(trainer: Any, prepare: Callable[..., Any], rows: list[dict[str, Any]]) -> Any:
    """``rows`` (text) through TRL's own preprocessing (``prepare``: the trainer class's ``_prepare_dataset``)
    with no length limit, to compare with our token ids."""
    from datasets import Dataset

    saved = trainer.args.max_length
    trainer.args.max_length = None  # compare whole sequences; nothing filtered, so rows stay aligned
    try:
        return prepare(trainer, Dataset.from_list(rows), trainer.processing_class, trainer.args, "check")
    finally:
        trainer.args.max_length = saved


# ------------------------------------------------------------------------------------------------ RM runners


def _ours_rm_config(spec: BenchSpec, *, expand_pairs: bool, batch_size: int = 0) -> Any:
    """Our RewardConfig: invalid records skipped (counted), rankings expanded to pairs when ``expand_pairs``,
    reward statistics after training computed on a handful of responses only (untimed either way)."""
    from alignlab.config import RewardConfig

    return _ours_config(RewardConfig, spec, data=spec.data, max_length=spec.max_length, max_steps=spec.total_steps,
                        eval_fraction=0.0, skip_invalid=True, expand_pairs=expand_pairs, stats_samples=spec.batch_size,
                        **({"batch_size": batch_size} if batch_size else {}))


def reward_examples(cfg: Any, tokenizer: Any) -> tuple[list[Any], list[Any], list[list[int]]]:
    """``(records, examples, plan)`` as ``train_reward`` builds them for ``cfg`` (no held-out split)."""
    from alignlab.train.reward import encode_preferences

    encode = dict(template=cfg.template, max_length=cfg.max_length, truncation=cfg.truncation, skip_invalid=True,
                  margin=cfg.margin, margin_scale=cfg.margin_scale, source=cfg.data)
    return _encode_each(cfg, _preference_records(cfg, expand=cfg.expand_pairs),
                        lambda item: encode_preferences([item], tokenizer, **encode)[0])


def _comparisons(k: int) -> int:
    return k * (k - 1) // 2


def _ours_rm(spec: BenchSpec, *, expand_pairs: bool, batch_size: int = 0,
             notes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Our reward trainer (``train_reward``, unmodified) timed by :func:`stamped_run`, with per-step pairs
    (comparisons) and sequences from our step plan, and the dataset's totals (``dataset``)."""
    from alignlab.models import load_tokenizer
    from alignlab.reward import prepare_reward_tokenizer
    from alignlab.train.loop import resolve_precision
    from alignlab.train.reward import train_reward

    cfg = _ours_rm_config(spec, expand_pairs=expand_pairs, batch_size=batch_size)
    _, examples, plan = reward_examples(cfg, prepare_reward_tokenizer(load_tokenizer(spec.model)))
    seconds, cpu_seconds, records = stamped_run(lambda: train_reward(cfg), "tokens", spec.total_steps)
    tokens = [r["tokens"] for r in records]
    if tokens != [sum(len(examples[i]) for i in step) for step in plan]:
        raise AlignlabError("train_reward's batches differ from the bench's reconstruction of its step plan "
                            "(alignlab.bench.reward_examples): update the bench")
    sequences = [len(e.sequences) for e in examples]
    return _result(
        seconds, cpu_seconds, tokens, [r["loss"] for r in records], params=meta_params(spec.model, "score"),
        precision=resolve_precision(cfg.precision), settings=_ours_settings(cfg, expand_pairs=expand_pairs),
        notes=notes if notes and any(notes.values()) else None,
        step_values={"accuracy": [r["accuracy"] for r in records]},
        step_counts={"pairs": [sum(_comparisons(sequences[i]) for i in step) for step in plan],
                     "sequences": [sum(sequences[i] for i in step) for step in plan]},
        dataset={"examples": len(examples), "pairs": sum(map(_comparisons, sequences)), "sequences": sum(sequences),
                 "tokens": sum(len(e) for e in examples), "encoded_tokens": sum(e.encoded for e in examples)},
    )


def ours_rm(spec: BenchSpec) -> dict[str, Any]:
    """``bench rm``, ours: pairs (a ranking becomes its pairs, as RewardTrainer needs)."""
    return _ours_rm(spec, expand_pairs=True)


def kept_rankings(spec: BenchSpec) -> tuple[BenchSpec, int, int]:
    """``rm-kwise``: the rankings of ``spec.data`` that the K-wise path keeps, written as ranking records
    (``{prompt, responses}``, best first) to ``spec.workdir``, so both runs train on exactly the same rankings
    (a ranking whose K answers encode gives pairs that all encode too; the other way round, a truncation that
    makes two answers identical drops the whole ranking but only one of its pairs). Returns ``spec`` pointing at
    that file, and (rankings kept, rankings read)."""
    from alignlab.models import load_tokenizer
    from alignlab.reward import prepare_reward_tokenizer

    cfg = _ours_rm_config(spec, expand_pairs=False)
    items, _, _ = reward_examples(cfg, prepare_reward_tokenizer(load_tokenizer(spec.model)))
    path = Path(spec.workdir) / "rankings.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps({"prompt": item.prompt, "responses": item.responses}, ensure_ascii=False) + "\n")
    return dataclasses.replace(spec, data=str(path)), len(items), len(_preference_records(cfg, expand=False))


def _ranking_notes(kept: int, read: int) -> list[str]:
    if kept == read:
        return []
    return [f"{read - kept} of {read} rankings cannot be encoded K-wise at this max_length (e.g. truncation made "
            "two answers identical) and are left out of both runs"]


def ours_rm_kwise(spec: BenchSpec) -> dict[str, Any]:
    """``bench rm-kwise``, the K-wise path: one example = a prompt with all its answers, each encoded once."""
    spec, kept, read = kept_rankings(spec)
    return _ours_rm(spec, expand_pairs=False, notes={"unmatched": _ranking_notes(kept, read)})


def ours_rm_pairs(spec: BenchSpec) -> dict[str, Any]:
    """``bench rm-kwise``, the expanded path: the same rankings as their K(K-1)/2 pairs. Its batch (option
    ``pairs_batch_size``; 0 = automatic) holds as many sequences per step as the K-wise run's on average
    (``batch_size x mean K / 2`` pairs), so both runs hold about the same activations per step."""
    spec, kept, read = kept_rankings(spec)
    rankings = _preference_records(_ours_rm_config(spec, expand_pairs=False), expand=False)
    mean_k = sum(len(r.responses) for r in rankings) / len(rankings)
    batch = spec.option("pairs_batch_size")
    if batch <= 0:
        batch = max(1, round(spec.batch_size * mean_k / 2))
    why = f"{batch} pairs per step ({'set' if spec.option('pairs_batch_size') > 0 else 'automatic'}: batch " \
          f"{spec.batch_size} prompts x mean K {mean_k:.2f} / 2 sequences per pair)"
    return _ours_rm(spec, expand_pairs=True, batch_size=batch, notes={"unmatched": [why, *_ranking_notes(kept, read)]})


def trl_rm(spec: BenchSpec) -> dict[str, Any]:
    """``trl.RewardTrainer`` with ``RewardConfig`` on the same pairs.

    ``matched``: TRL gets our token ids (``chosen_ids``/``rejected_ids``, which RewardTrainer takes as they are)
    of our step plan's pairs in order; the notes say how many of them TRL's own tokenization of the text would
    have given identically. ``defaults``: TRL gets the text records ours kept and tokenizes them itself
    (dropping, not truncating, pairs over ``max_length``). Timing and tokens as :func:`trl_sft`."""
    from datasets import Dataset
    from trl import RewardConfig as TRLConfig
    from trl import RewardTrainer

    from alignlab.models import load_tokenizer, resolve_model
    from alignlab.reward import prepare_reward_tokenizer

    tokenizer = prepare_reward_tokenizer(load_tokenizer(spec.model))
    items, examples, plan = reward_examples(_ours_rm_config(spec, expand_pairs=True), tokenizer)
    matched = spec.settings == "matched"
    order = _plan_order(plan, spec) if matched else list(range(len(items)))
    if matched:
        rows = [{"chosen_ids": examples[i].sequences[0], "rejected_ids": examples[i].sequences[1]} for i in order]
    else:
        rows = [trl_text_pair(items[i]) for i in order]
    args = TRLConfig(**trl_args(spec, max_length=spec.max_length, dataset_num_proc=None))
    clock = step_clock()
    trainer = measured(RewardTrainer, {"accuracy": "accuracy"})(
        model=resolve_model(spec.model), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        callbacks=[clock])
    if matched:
        prepared = _trl_tokenization(trainer, RewardTrainer._prepare_dataset, [trl_text_pair(items[i]) for i in order])
        notes = _same_tokens(prepared, [examples[i] for i in order], lambda e: (e.sequences[0], e.sequences[-1]),
                             lambda row: (list(row["chosen_ids"]), list(row["rejected_ids"])))
    else:
        notes = {"pairs_given": len(rows), "pairs_kept_by_trl": len(trainer.train_dataset),
                 "unmatched": ["TRL tokenizes the text itself and drops pairs longer than max_length (ours truncates "
                               "them); each library draws its own batches"]}
    trainer.train()
    return _trl_result(trainer, clock, spec, notes=notes)


# ------------------------------------------------------------------------------------------------ DPO runners


def _ours_dpo_config(spec: BenchSpec) -> Any:
    from alignlab.config import DPOConfig

    return _ours_config(DPOConfig, spec, data=spec.data, max_length=spec.max_length, max_steps=spec.total_steps,
                        eval_fraction=0.0, skip_invalid=True, loss="dpo", beta=spec.option("beta"))


def dpo_examples(cfg: Any, tokenizer: Any) -> tuple[list[Any], list[Any], list[list[int]]]:
    """``(pairs, examples, plan)`` as ``train_dpo`` builds them for ``cfg`` (no held-out split)."""
    from alignlab.train.dpo import prepare_pairs

    return _encode_each(cfg, _preference_records(cfg, expand=True),
                        lambda item: prepare_pairs([item], tokenizer, cfg, cfg.data)[0])


def ours_dpo(spec: BenchSpec) -> dict[str, Any]:
    """Our DPO trainer (``train_dpo``, sigmoid loss, a frozen reference copy), unmodified, timed by
    :func:`stamped_run`. MFU counts 8N FLOPs per token: policy forward and backward (6N) + reference forward."""
    from alignlab.train.dpo import train_dpo
    from alignlab.train.loop import resolve_precision

    cfg = _ours_dpo_config(spec)
    seconds, cpu_seconds, records = stamped_run(lambda: train_dpo(cfg), "tokens", spec.total_steps)
    return _result(seconds, cpu_seconds, [r["tokens"] for r in records], [r["loss"] for r in records],
                   params=meta_params(spec.model), precision=resolve_precision(cfg.precision),
                   settings=_ours_settings(cfg, beta=cfg.beta, reference="frozen copy"), flops_per_token_factor=8.0,
                   step_values={"reward_margin": [r.get("rewards/margins") for r in records],
                                "reward_accuracy": [r.get("rewards/accuracies") for r in records]})


def trl_dpo(spec: BenchSpec) -> dict[str, Any]:
    """``trl.DPOTrainer`` (sigmoid loss, its default reference: a frozen copy of the model) on the same pairs.

    ``matched``: TRL trains on our token ids (prompt, chosen and rejected ids of our step plan's pairs, in
    order; its ``_prepare_dataset`` passes pre-tokenized rows through instead of tokenizing) and the notes say
    how many pairs TRL's own tokenization would have given identically. ``defaults``: TRL gets the text pairs
    ours kept and tokenizes and truncates them itself. Timing and tokens as :func:`trl_sft`."""
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from alignlab.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(spec.model)
    items, examples, plan = dpo_examples(_ours_dpo_config(spec), tokenizer)
    matched = spec.settings == "matched"
    order = _plan_order(plan, spec) if matched else list(range(len(items)))

    class OurTokensDPOTrainer(measured(DPOTrainer, {"reward_margin": "rewards/margins",  # type: ignore[misc]
                                                    "reward_accuracy": "rewards/accuracies"})):
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            if "prompt_ids" in dataset.column_names:  # our token ids, already within max_length
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    if matched:
        rows = [{"prompt_ids": examples[i].prompt_ids, "chosen_ids": examples[i].chosen_ids,
                 "rejected_ids": examples[i].rejected_ids} for i in order]
    else:
        rows = [trl_text_pair(items[i]) for i in order]
    args = TRLConfig(**trl_args(spec, matched=dict(loss_type=["sigmoid"], precompute_ref_log_probs=False),
                                max_length=spec.max_length, beta=spec.option("beta"), dataset_num_proc=None))
    clock = step_clock()
    trainer = OurTokensDPOTrainer(model=resolve_model(spec.model), args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, callbacks=[clock])
    if matched:
        prepared = _trl_tokenization(trainer, DPOTrainer._prepare_dataset, [trl_text_pair(items[i]) for i in order])
        notes = _same_tokens(prepared, [examples[i] for i in order],
                             lambda e: (e.prompt_ids, e.chosen_ids, e.rejected_ids),
                             lambda row: (list(row["prompt_ids"]), list(row["chosen_ids"]), list(row["rejected_ids"])))
    else:
        notes = {"pairs_given": len(rows), "pairs_kept_by_trl": len(trainer.train_dataset),
                 "unmatched": ["TRL tokenizes and truncates the text itself; each library draws its own batches"]}
    trainer.train()
    out = _trl_result(trainer, clock, spec, notes=notes, beta=args.beta, loss_type=list(args.loss_type),
                      reference="frozen copy" if trainer.ref_model is not None else "none/precomputed")
    out["flops_per_token_factor"] = 8.0
    return out


# ------------------------------------------------------------------------------------------------ PPO runners


def _ours_ppo_config(spec: BenchSpec) -> Any:
    """Our PPOConfig: ``batch_size`` responses per iteration in one micro-batch and one minibatch, prompts up to
    ``max_length`` tokens (longer ones dropped), no held-out prompts; ``matched``: also ``ppo_epochs``, sampling
    at temperature 1 with no top-p/top-k, and KL coefficient 0.05 (RLOO's default beta)."""
    from alignlab.config import PPOConfig

    values: dict[str, Any] = dict(
        prompts=spec.data, iterations=spec.total_steps, reward=spec.option("reward"),
        max_new_tokens=spec.option("max_new_tokens"), max_prompt_length=spec.max_length, long_prompts="drop",
        eval_fraction=0.0, num_mini_batches=1, share_backbone=spec.option("share_backbone"),
    )
    if spec.settings == "matched":
        values.update(ppo_epochs=spec.option("ppo_epochs"), temperature=1.0, top_p=1.0, top_k=0, kl_coef=0.05)
    return _ours_config(PPOConfig, spec, **values)


def ppo_prompts(cfg: Any, tokenizer: Any) -> tuple[list[Any], list[list[int]], list[list[int]]]:
    """``(prompts, their token ids, prompt indices of every iteration)`` as ``train_ppo`` builds them."""
    from transformers import AutoConfig

    from alignlab.data.prompts import load_prompts
    from alignlab.models import resolve_model
    from alignlab.train.ppo import encode_prompts, prompt_batches

    context = getattr(AutoConfig.from_pretrained(resolve_model(cfg.model)), "max_position_embeddings", None)
    prompts, ids = encode_prompts(load_prompts(cfg.prompts, limit=cfg.limit or None), tokenizer, cfg, context,
                                  cfg.prompts, _Quiet())
    rollout = cfg.batch_size * cfg.grad_accum * cfg.num_mini_batches
    return prompts, ids, prompt_batches(len(prompts), rollout, cfg.iterations, cfg.seed)


def ours_ppo(spec: BenchSpec) -> dict[str, Any]:
    """Our PPO trainer (``train_ppo``: policy, reference, critic, the reward function), unmodified, timed per
    iteration by :func:`stamped_run`; tokens are the generated response tokens, the time split is the trainer's
    own (generation, scoring, no-grad forwards, update)."""
    from alignlab.train.loop import resolve_precision
    from alignlab.train.ppo import train_ppo

    cfg = _ours_ppo_config(spec)
    seconds, cpu_seconds, records = stamped_run(lambda: train_ppo(cfg), "time/iteration", spec.total_steps)
    responses = [cfg.batch_size - int(r["empty_responses"]) for r in records]
    policy = meta_params(spec.model)
    critic = (0, 0, 0) if cfg.share_backbone else meta_params(spec.model, "score")
    critic_words = ("a value head on the policy's backbone" if cfg.share_backbone else
                    "a separate value model (critic)")
    return _result(
        seconds, cpu_seconds, [round(r["response_length"] * n) for r, n in zip(records, responses)], [],
        params=tuple(a + b for a, b in zip(policy, critic)),  # type: ignore[arg-type]
        precision=resolve_precision(cfg.precision), flops_per_token_factor=0,
        settings=_ours_settings(cfg, ppo_epochs=cfg.ppo_epochs, prompts_per_iteration=cfg.batch_size,
                                samples_per_prompt=1, kl_coef=cfg.kl_coef, max_new_tokens=cfg.max_new_tokens,
                                critic=critic_words),
        notes={"unmatched": [f"ours also runs and trains {critic_words} for its GAE advantages (RLOO has no "
                             "critic: its baseline is the mean score of the prompt's other completions)"]},
        step_counts={"responses": responses},
        step_times={name: [r[f"time/{name}"] for r in records] for name in ("generation", "scoring", "forward",
                                                                             "update")},
        step_values={"score": [r["score"] for r in records], "kl": [r["kl"] for r in records]},
    )


def _ours_gen(spec: BenchSpec, share_prefix: bool) -> dict[str, Any]:
    """``bench gen``: ``generate_from_ids`` as the lab's sampling stages call it. Prompts: the task's training
    prompts rendered with the Alpaca template (``--data task:NAME``, or a prompts file replacing the sentiment
    task's), each repeated ``samples_per_prompt`` times in a row, cycled to fill ``--batch-size`` x steps
    sequences; one timed step per ``generate`` call, each with its own seed, the same for both runners (so they
    draw the same answers up to float rounding). fp32 weights, or bf16 weights when the precision is bf16 (as
    the lab loads a model it only samples from)."""
    import dataclasses as dc

    import torch

    from alignlab.data.templates import render_alpaca_prompt
    from alignlab.data.tokenize import encode_prompt, shared_prefix_length
    from alignlab.generation import SamplingConfig, generate_from_ids
    from alignlab.models import load_model, load_tokenizer
    from alignlab.tasks import load_task

    if spec.data.startswith("task:"):
        task = load_task(spec.data[len("task:"):], seed=spec.seed)
    else:
        task = load_task("sentiment", prompts_file=spec.data, seed=spec.seed)
    tokenizer = load_tokenizer(spec.model)
    model = load_model(spec.model, dtype=torch.bfloat16 if spec.precision == "bf16" else torch.float32)
    ids = [encode_prompt(tokenizer, render_alpaca_prompt(task.instruction, p), template="none")
           for p in task.train_prompts]
    k, b = spec.option("samples_per_prompt"), spec.batch_size
    flat = [ids[(j // k) % len(ids)] for j in range(spec.total_steps * b)]
    sampling = SamplingConfig(max_new_tokens=spec.option("max_new_tokens"), temperature=1.0, batch_size=b,
                              share_prefix=share_prefix)
    seconds, cpu_seconds, tokens, shared = [], [], [], []
    stamp_progress("start")
    for step in range(spec.total_steps):
        chunk = flat[step * b : (step + 1) * b]
        wall, cpu = time.perf_counter(), time.process_time()
        samples = generate_from_ids(model, tokenizer, chunk, dc.replace(sampling, seed=spec.seed + step))
        seconds.append(time.perf_counter() - wall)
        stamp_progress("step")
        cpu_seconds.append(time.process_time() - cpu)
        tokens.append(sum(len(x.response_ids) for x in samples))
        shared.append(shared_prefix_length(chunk))
    timed = spec.warmup_steps
    return _result(
        seconds, cpu_seconds, tokens, [], params=meta_params(spec.model), precision=spec.precision,
        flops_per_token_factor=0,
        settings={"share_prefix": share_prefix, "batch_size": b, "samples_per_prompt": k,
                  "max_new_tokens": sampling.max_new_tokens, "temperature": 1.0, "prompts": len(ids)},
        reported={"prompt_tokens": sum(len(x) for x in flat[timed * b :]) / max(1, len(flat) - timed * b),
                  "common_prefix_tokens": sum(shared[timed:]) / max(1, len(shared) - timed) if share_prefix else 0.0},
    )


def ours_gen_shared(spec: BenchSpec) -> dict[str, Any]:
    """``bench gen`` with the shared prefill (:func:`alignlab.generation._shared_prefill`)."""
    return _ours_gen(spec, share_prefix=True)


def ours_gen_plain(spec: BenchSpec) -> dict[str, Any]:
    """``bench gen`` with every prompt encoded whole, as plain ``model.generate`` on a left-padded batch does."""
    return _ours_gen(spec, share_prefix=False)


def trl_reward(spec: str, log: list[float]) -> Callable[..., list[float]]:
    """Our reward function ``spec`` (``module:function(prompts, responses)``) in TRL's reward-function form
    ``f(prompts, completions, **kw)``; the mean score of every call is appended to ``log``."""
    from alignlab.reward import load_scorer

    scorer = load_scorer(spec)

    def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = [float(s) for s in scorer.score(list(prompts), texts)]
        log.append(sum(scores) / max(1, len(scores)))
        return scores

    reward.__name__ = reward.__qualname__ = spec.rsplit(":", 1)[-1]
    return reward


def trl_prompt(prompt: Any, tokenizer: Any, cfg: Any) -> Any:
    """A prompt as TRL's online trainers take it, rendered as ours renders it: chat messages, or plain text."""
    from alignlab.data.tokenize import _as_messages
    from alignlab.train.ppo import resolve_prompt_template

    template = resolve_prompt_template(cfg.template, tokenizer, prompt)
    if template == "chat":
        return _as_messages(prompt)
    if template == "none" and isinstance(prompt, str):
        return prompt
    raise AlignlabError(f"bench ppo gives TRL chat or plain-text prompts only (this one renders as {template})")


def trl_ppo(spec: BenchSpec) -> dict[str, Any]:
    """``trl.RLOOTrainer`` (REINFORCE leave-one-out: TRL's online-RL trainer nearest to PPO) with the same reward
    function, prompts, responses per iteration (``batch_size``) and generation length.

    One iteration = one generation batch of ``batch_size`` completions (``num_generations`` per prompt) and
    its ``num_iterations`` optimizer steps (one per pass, as ours with one minibatch). ``matched``: the
    prompts of each iteration are the first ``batch_size / num_generations`` of ours, in order (no shuffling).
    Timing: :func:`step_clock` summed per iteration; tokens: the generated completion tokens
    (``completion_mask``); the time split from wrappers around ``_generate`` (tokenization and generation),
    ``_calculate_rewards`` (scoring) and ``_generate_and_score_completions`` (the rest of it: old and reference
    log-probs); the update is the iteration's remaining time."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from alignlab.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(spec.model)
    cfg = _ours_ppo_config(spec)
    prompts, ids, batches = ppo_prompts(cfg, tokenizer)
    k, size = spec.option("num_generations"), spec.batch_size
    if k < 2 or size % k:
        raise AlignlabError(f"RLOO samples num_generations={k} (>= 2) completions per prompt: --batch-size {size} "
                            "must be a multiple of it", field="num_generations")
    matched = spec.settings == "matched"
    epochs = spec.option("ppo_epochs") if matched else 1
    chosen = [i for batch in batches for i in batch[: size // k]] if matched else list(range(len(prompts)))
    rows = [{"prompt": trl_prompt(prompts[i], tokenizer, cfg)} for i in chosen]
    scores: list[float] = []

    class MeasuredRLOOTrainer(RLOOTrainer):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.bench_rollouts: list[dict[str, float]] = []
            self.bench_split = {"generation": 0.0, "scoring": 0.0}

        def _generate(self, prompts: list[Any]) -> Any:
            t = time.perf_counter()
            out = super()._generate(prompts)
            self.bench_split["generation"] += time.perf_counter() - t
            return out

        def _calculate_rewards(self, *args: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            out = super()._calculate_rewards(*args, **kw)
            self.bench_split["scoring"] += time.perf_counter() - t
            return out

        def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
            self.bench_split = {"generation": 0.0, "scoring": 0.0}
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            tokens = float(out["completion_mask"].sum())
            kl = self._metrics["train"]["kl"][-1] * tokens / len(inputs) if self.beta else 0.0  # per completion
            self.bench_rollouts.append({"seconds": time.perf_counter() - t, "tokens": tokens, "kl": kl,
                                        "completions": len(inputs), **self.bench_split})
            return out

    args = RLOOConfig(**trl_args(
        spec, matched=dict(num_iterations=epochs, temperature=1.0, top_p=1.0, top_k=0, beta=0.05,
                           shuffle_dataset=False, disable_dropout=True),
        max_steps=spec.total_steps * epochs, num_generations=k, max_completion_length=cfg.max_new_tokens))
    clock = step_clock()
    trainer = MeasuredRLOOTrainer(model=resolve_model(spec.model), reward_funcs=trl_reward(cfg.reward, scores),
                                  args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                  callbacks=[clock])
    their_ids = trainer._tokenize_prompts([row["prompt"] for row in rows])[0]
    same = sum(list(a) == list(ids[i]) for a, i in zip(their_ids, chosen))
    trainer.train()
    seconds, cpu_seconds = clock_seconds(clock, spec.total_steps, per=args.num_iterations)
    rollouts = trainer.bench_rollouts
    if len(rollouts) != spec.total_steps:
        raise AlignlabError(f"RLOO generated {len(rollouts)} times, expected {spec.total_steps}")
    unmatched = [f"RLOO samples {k} completions for each of {size // k} prompts per iteration; ours one for each of "
                 f"{size} prompts" + (" (RLOO's prompts are the first of ours)" if matched else ""),
                 "RLOO's KL penalty is one number per completion (summed log-ratio, on the reward); ours is per "
                 "token, before GAE"]
    if not matched:
        unmatched.append(f"passes per rollout: ours ppo_epochs={cfg.ppo_epochs}, RLOO num_iterations="
                         f"{args.num_iterations} (each library's default)")
    return _result(
        seconds, cpu_seconds, [round(r["tokens"]) for r in rollouts], [], params=trainer_params(trainer.model),
        precision="bf16" if args.bf16 else "fp32", flops_per_token_factor=0,
        settings=trl_settings(args, shuffle_dataset=args.shuffle_dataset, num_iterations=args.num_iterations,
                              num_generations=k, prompts_per_iteration=size // k, beta=args.beta,
                              max_new_tokens=args.max_completion_length),
        notes={"prompt_ids_identical_to_ours": same, "prompts_compared": len(rows), "unmatched": unmatched},
        step_counts={"responses": [r["completions"] for r in rollouts]},
        step_times={"generation": [r["generation"] for r in rollouts], "scoring": [r["scoring"] for r in rollouts],
                    "forward": [r["seconds"] - r["generation"] - r["scoring"] for r in rollouts],
                    "update": [s - r["seconds"] for s, r in zip(seconds, rollouts)]},
        step_values={"score": scores[: len(rollouts)], "kl": [r["kl"] for r in rollouts]},
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_worker":
        sys.exit(run_worker(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m alignlab.bench _worker SPEC.json OUT.json (use `alignlab bench` instead)")
