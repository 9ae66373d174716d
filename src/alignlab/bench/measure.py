"""The measuring, the same for every stage: clocks that stamp a runner's steps, parameter counts, the machine's
matmul peak, and the reported numbers made from a runner's raw measurements (:func:`summarize`, :func:`ratios`).

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
  the first did). Later rounds of a stopped runner are skipped. It is meant for a library whose defaults cannot
  finish a step in reasonable time on a machine (TRL's bf16 on a CPU without bf16 instructions), instead of a
  run that never ends.
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
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignlab.bench.worker import stamp_progress
from alignlab.errors import AlignlabError

UNCONTENDED = 0.85  # a step is "uncontended" when its CPU seconds >= this x threads x wall seconds


# ------------------------------------------------------------------------------------------------ the machine


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


def _pooled(rounds: list[dict[str, Any]], key: str, warmup_steps: int, group: str = "") -> list[float]:
    """The per-step values ``key`` (of ``raw[group]`` when ``group`` is given) of every round, each round's first
    ``warmup_steps`` left out, in one list."""
    return [x for raw in rounds for x in list((raw[group] if group else raw).get(key) or [])[warmup_steps:]]


def summarize(raws: dict[str, Any] | list[dict[str, Any]], warmup_steps: int,
              peak_flops: dict[str, float] | None) -> dict[str, Any]:
    """Reported numbers from a runner's raw measurements (see the module docstring): one dict per round,
    each round's first ``warmup_steps`` steps left out, the timed steps of all rounds pooled."""
    rounds = [raws] if isinstance(raws, dict) else list(raws)
    seconds = _pooled(rounds, "step_seconds", warmup_steps)
    tokens = _pooled(rounds, "step_tokens", warmup_steps)
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
    cpu = _pooled(rounds, "step_cpu_seconds", warmup_steps)
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
        counts = _pooled(rounds, name, warmup_steps, group="step_counts")
        out[f"{name}_per_s"] = sum(counts) / sum(seconds)
        out[f"{name}_per_step"] = sum(counts) / len(counts)
    for name in first.get("step_times") or {}:  # e.g. PPO's generation seconds per iteration
        times = _pooled(rounds, name, warmup_steps, group="step_times")
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


# ------------------------------------------------------------------------------------------------ parameters


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
    return trainer_params(model)


def trainer_params(model: Any) -> tuple[int, int, int]:
    """(trainable, total, matmul) parameters of a loaded model."""
    return (*count_params(model), matmul_params(model))


# ------------------------------------------------------------------------------------------------ clocks


def _intervals(stamps: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds between consecutive ``(wall, cpu)`` stamps."""
    return [b[0] - a[0] for a, b in zip(stamps, stamps[1:])], [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]


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
    return (*_intervals(stamps), records)


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
    return _intervals(clock.stamps[::per])


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
