"""The lab: the whole pipeline on one task, every method on the same data and budget, then one report.

    base model -> SFT (task demonstrations, Alpaca template)
               -> preference data (K samples per train prompt from the SFT model, ranked by simulated
                  annotators who see the gold score through Plackett-Luce noise)
               -> reward model (K-wise loss on those rankings)
               -> methods, each starting from the SFT model:
                    ppo (KL penalty), ppo_nokl (beta = 0), dpo, ipo, simpo (the preference pairs),
                    rs (rejection sampling with the reward model, in rounds), bon (best-of-n at inference)
               -> evaluation on held-out prompts -> report (markdown + self-contained html + plots)

Every stage is cached by its inputs: its folder holds ``stage.json`` with a key (a hash of the stage's
parameters and the keys of the stages it reads); a rerun reuses a stage whose key matches and recomputes it
(and what depends on it) when anything changed. Within a method, time and peak memory are measured around
the training stage (peak RSS is reset before each stage through ``/proc/self/clear_refs``).

All prompts are rendered once with the Alpaca template, and every trainer reads them as plain text
(template ``none``), so every method sees exactly the same tokens.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alignlab import __version__
from alignlab.config import Checked, opt
from alignlab.data.templates import render_alpaca_prompt
from alignlab.errors import AlignlabError

ALL_METHODS = ["ppo", "ppo_nokl", "dpo", "ipo", "simpo", "rs", "bon"]
PAIRWISE_METHODS = ("dpo", "ipo", "simpo")  # learn from the preference pairs directly, no reward model
CHECKPOINTING_METHODS = ("ppo", "ppo_nokl", *PAIRWISE_METHODS)  # evaluated along training at their checkpoints
MODELS_IN_MEMORY = {  # what each method holds while training (with LoRA the reference is the adapter-off policy)
    "sft": "1 (policy)",
    "ppo": "4 roles: policy, reference, reward, value (reference = policy without adapter with LoRA; value = a "
           "head on the policy with ppo_share_backbone), and a bf16 copy of the policy for sampling",
    "ppo_nokl": "4 roles, as ppo (the reference is not needed at beta = 0; kept for logging the KL)",
    "dpo": "2: policy, reference (adapter-off policy with LoRA)",
    "ipo": "2: policy, reference (adapter-off policy with LoRA)",
    "simpo": "1: policy (reference-free)",
    "rs": "2: policy, reward model (and a bf16 copy of the policy for sampling)",
    "bon": "2 at inference: policy, reward model",
}


@dataclass
class LabConfig(Checked):
    """One lab run: a task, a base model, the methods and their budgets."""

    name: str = opt("demo", "run name: the report goes to OUTPUT_ROOT/NAME/report.md")
    output_root: str = opt("runs", "folder holding lab runs")
    task: str = opt("sentiment", "task: a built-in name or module:function returning a Task")
    prompts: str = opt("", "replace the task's prompts with this file (e.g. IMDb review prefixes)")
    model: str = opt("smollm2-135m-instruct", "base model")
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS),
                               metadata={"help": f"methods to compare (comma list of {', '.join(ALL_METHODS)})"})
    seed: int = opt(0, "one seed for everything")
    n_eval: int = opt(32, "held-out prompts for evaluation", ge=1)
    n_train: int = opt(48, "training prompts used by every method", ge=1)
    lora: bool = opt(True, "train LoRA adapters (r=16) instead of all weights")
    max_new_tokens: int = opt(32, "response length for sampling (annotation, PPO, RS, BoN, evaluation)", ge=1)
    gen_batch_size: int = opt(144, "sequences generated together (PPO: at most its rollout); larger batches decode "
                              "more tokens per pass over the weights (144 against 48: 1.61x, BENCHMARKS.md, fp32)",
                              ge=1)
    # SFT
    sft_steps: int = opt(8, "SFT optimizer steps on the task demonstrations", ge=1)
    sft_lr: float = opt(5e-4, "SFT learning rate", gt=0)
    # preference data
    k_annotate: int = opt(6, "answers sampled per training prompt for the annotators to rank", ge=2)
    annotator_temperature: float = opt(0.1, "annotator noise: Plackett-Luce temperature on the gold score", gt=0)
    # reward model
    rm_steps: int = opt(48, "reward-model optimizer steps", ge=1)
    rm_lr: float = opt(3e-3, "reward-model learning rate", gt=0)
    rm_batch_size: int = opt(4, "rankings (prompts with all their answers) per reward-model step", ge=1)
    # DPO family
    dpo_steps: int = opt(24, "optimizer steps for dpo, ipo and simpo", ge=1)
    dpo_lr: float = opt(1e-3, "learning rate for dpo, ipo and simpo", gt=0)
    dpo_beta: float = opt(0.15, "DPO's beta", gt=0)
    ipo_beta: float = opt(0.5, "IPO's beta (tau): it pulls the log-ratio margin to 1/(2 tau), so a small tau lets it "
                          "drift far (0.15: 17.6 nats on seed 0)", gt=0)
    dpo_batch_size: int = opt(3, "rankings per dpo, ipo and simpo step, each with all its pairs (15 for 6 answers, "
                              "each answer encoded once): about the sequences of 8 separate pairs", ge=1)
    # PPO
    ppo_iterations: int = opt(8, "PPO iterations (rollouts)", ge=1)
    ppo_rollout: int = opt(48, "responses per PPO rollout", ge=1)
    ppo_lr: float = opt(1e-3, "PPO learning rate", gt=0)
    ppo_kl_coef: float = opt(0.05, "KL penalty coefficient of the 'ppo' method (ppo_nokl uses 0)", ge=0)
    ppo_epochs: int = opt(2, "PPO passes over each rollout", ge=1)
    ppo_responses_per_prompt: int = opt(4, "PPO responses per prompt in a rollout (each prompt encoded once for "
                                        "them)", ge=1)
    ppo_share_backbone: bool = opt(True, "PPO value head on the policy's backbone instead of a separate value "
                                   "model (about half the update's compute)")
    # rejection sampling / best-of-n
    rs_rounds: int = opt(2, "rejection-sampling rounds: sample from the current policy, keep the best, fine-tune "
                            "(the next round samples from the fine-tuned model)", ge=1)
    rs_n: int = opt(6, "samples per prompt in each rejection-sampling round", ge=1)
    rs_steps: int = opt(8, "SFT steps on each round's kept samples", ge=1)
    rs_lr: float = opt(2e-3, "rejection-sampling fine-tuning learning rate", gt=0)
    bon_n: int = opt(8, "largest n of best-of-n (the curve covers 1, 2, 4, ... n)", ge=1)
    batch_size: int = opt(16, "training micro-batch size for every method", ge=1)
    curve_points: int = opt(2, "checkpoints along each method's training (evenly spaced, besides its end) evaluated "
                            "on the held-out prompts like the final models: the frontier plot's lines "
                            "(rejection sampling: the ends of its rounds); 0 = final models only", ge=0)
    progress: bool = opt(True, "show progress bars")


def quick_config(**overrides: Any) -> LabConfig:
    """The ``--quick`` lab: the tiny model and small budgets (about a minute; used in the test suite)."""
    base = dict(name="quick", model="tiny-random", n_eval=8, n_train=8, max_new_tokens=8, sft_steps=3,
                sft_lr=3e-3, k_annotate=3, rm_steps=3, rm_lr=3e-3, dpo_steps=2, dpo_lr=3e-3, ppo_iterations=2,
                ppo_rollout=8, ppo_lr=3e-3, rs_n=3, rs_steps=2, rs_lr=3e-3, bon_n=4, batch_size=8,
                gen_batch_size=48, lora=False)
    base.update(overrides)
    return LabConfig(**base)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- memory


def _trim_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (Linux: write 5 to /proc/self/clear_refs); a no-op elsewhere."""
    _trim_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak RSS since the last reset, in MiB (VmHWM), else the process's lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------- stages


class Lab:
    """Runs stages with caching and keeps their results."""

    def __init__(self, cfg: LabConfig) -> None:
        self.cfg = cfg
        self.root = Path(cfg.output_root) / cfg.name
        self.root.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, str] = {}

    def stage(self, name: str, params: dict[str, Any], after: list[str], fn: Callable[[Path], dict]) -> dict:
        """Run ``fn(folder)`` unless a finished stage with the same key exists. The key hashes ``params``,
        the keys of the stages in ``after`` and the alignlab version."""
        key_src = json.dumps({"params": params, "after": {a: self.keys[a] for a in after},
                              "version": __version__}, sort_keys=True, default=str)
        key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
        folder = self.root / name
        marker = folder / "stage.json"
        if marker.exists():
            saved = json.loads(marker.read_text())
            if saved.get("key") == key:
                print(f"[lab] {name}: cached ({folder})")
                self.keys[name], self.results[name] = key, saved["result"]
                return saved["result"]
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        print(f"[lab] {name}: running")
        reset_peak_rss()
        start = time.perf_counter()
        result = fn(folder)
        result.setdefault("wall_s", time.perf_counter() - start)
        result.setdefault("peak_rss_mb", peak_rss_mb())
        marker.write_text(json.dumps({"key": key, "params": params, "result": result}, indent=1, default=float))
        self.keys[name], self.results[name] = key, result
        print(f"[lab] {name}: done in {result['wall_s']:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MiB")
        return result


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def run_lab(cfg: LabConfig) -> Path:
    """Run (or reuse) every stage and write the report; returns the report's path."""
    from alignlab.lab import stages
    from alignlab.lab.report import write_report
    from alignlab.tasks import load_task

    unknown = [m for m in cfg.methods if m not in ALL_METHODS]
    if unknown:
        raise AlignlabError(f"unknown methods {unknown} (choose from {', '.join(ALL_METHODS)})", field="methods")
    task = load_task(cfg.task, prompts_file=cfg.prompts or None, n_eval=cfg.n_eval, seed=cfg.seed)
    if cfg.curve_points < 0:
        raise AlignlabError(f"curve_points must be >= 0, got {cfg.curve_points}", field="curve_points")
    if len(task.train_prompts) < cfg.n_train:
        raise AlignlabError(f"the task has {len(task.train_prompts)} training prompts, fewer than n_train="
                            f"{cfg.n_train}", field="n_train")
    lab = Lab(cfg)
    (lab.root / "lab_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    train_prompts = [render_alpaca_prompt(task.instruction, p) for p in task.train_prompts[: cfg.n_train]]
    eval_prompts = [render_alpaca_prompt(task.instruction, p) for p in task.eval_prompts]
    ctx = stages.Context(cfg=cfg, task=task, lab=lab, train_prompts=train_prompts, eval_prompts=eval_prompts)
    common = {"model": cfg.model, "task": cfg.task, "prompts": cfg.prompts, "seed": cfg.seed,
              "n_train": cfg.n_train, "n_eval": cfg.n_eval, "lora": cfg.lora, "max_new_tokens": cfg.max_new_tokens,
              "batch_size": cfg.batch_size}

    lab.stage("sft", {**common, "steps": cfg.sft_steps, "lr": cfg.sft_lr}, [], ctx.sft)
    # "unfinished": the file marks answers cut at max_new_tokens (trained without EOS); older runs lack the flags
    lab.stage("preferences", {**common, "k": cfg.k_annotate, "temperature": cfg.annotator_temperature,
                              "unfinished": True}, ["sft"], ctx.preferences)
    lab.stage("reward_model", {**common, "steps": cfg.rm_steps, "lr": cfg.rm_lr}, ["preferences"],
              ctx.reward_model)
    lab.stage("eval_sft", {**common}, ["sft", "reward_model"], ctx.evaluate_sft)
    ppo_params = {"iterations": cfg.ppo_iterations, "rollout": cfg.ppo_rollout, "lr": cfg.ppo_lr,
                  "epochs": cfg.ppo_epochs, "share_backbone": cfg.ppo_share_backbone,
                  "responses_per_prompt": cfg.ppo_responses_per_prompt}
    method_params = {
        "ppo": {**ppo_params, "kl_coef": cfg.ppo_kl_coef},
        "ppo_nokl": {**ppo_params, "kl_coef": 0.0},
        "dpo": {"steps": cfg.dpo_steps, "lr": cfg.dpo_lr, "beta": cfg.dpo_beta,
                "rankings_per_step": cfg.dpo_batch_size},
        "ipo": {"steps": cfg.dpo_steps, "lr": cfg.dpo_lr, "beta": cfg.ipo_beta,
                "rankings_per_step": cfg.dpo_batch_size},
        "simpo": {"steps": cfg.dpo_steps, "lr": cfg.dpo_lr, "rankings_per_step": cfg.dpo_batch_size},
        "rs": {"rounds": cfg.rs_rounds, "n": cfg.rs_n, "steps": cfg.rs_steps, "lr": cfg.rs_lr},
        "bon": {"n": cfg.bon_n},
    }
    for method in cfg.methods:
        params = {**common, **method_params[method]}
        if method in CHECKPOINTING_METHODS:  # the trainer keeps the checkpoints the evaluation along training reads
            params["curve_points"] = cfg.curve_points
        # the DPO family learns from the pairs alone; the others need the reward model (which needs the pairs)
        needs = ["sft", "preferences"] if method in PAIRWISE_METHODS else ["sft", "reward_model"]
        lab.stage(method, params, needs, ctx.method(method))
        eval_params = {**params, "curve_points": cfg.curve_points} if method != "bon" else params
        lab.stage(f"eval_{method}", eval_params, [method, "eval_sft"], ctx.evaluate_method(method))
    report = write_report(lab, task)
    print(f"[lab] report: {report} (and {report.with_suffix('.html')})")
    return report
