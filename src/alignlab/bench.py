"""Side-by-side benchmarks against TRL: ``alignlab bench STAGE``.

``alignlab bench sft --model smollm2-135m-instruct --data ../shared/data/alpaca_en_demo.json`` trains the
same model on the same data with the same batch size, maximum length and dtype, first with our trainer and
then with TRL's, each in its own process (``python -m alignlab.bench _worker SPEC OUT``), so one library's
imports and allocations never count against the other and the peak resident memory of each is its own.

What is measured, per library
-----------------------------
- **step seconds**: wall time from the end of one optimizer step to the end of the next, so everything the
  loop does (collation, forward, backward, clipping, optimizer, logging) is in it; the first step is timed
  from the start of the loop. The first ``warmup_steps`` steps are left out of every number below.
- **tokens/s**: non-pad tokens (attention-mask ones) of the timed steps / their summed seconds.
- **tokens per CPU-second**: the same tokens over the worker's CPU time (all threads) in those steps; on a
  shared machine this moves less with other processes' load than wall time, and ``cpu_utilisation`` (CPU
  seconds / wall seconds, about the thread count on an idle machine) shows how contended the run was.
  **tokens/s, uncontended steps** keeps only the timed steps whose CPU utilisation was at least 85 % of the
  worker's torch threads (no other process took its cores then). ``--rounds N`` runs each library N times in
  ABBA order and pools the timed steps.
- **s/step**: mean seconds of the timed steps.
- **peak RSS**: the worker process's maximum resident set size, read by the parent with ``os.wait4``.
- **final loss**: the training loss (mean NLL per loss token) of the last step.
- **MFU** (model FLOPs utilisation) = ``6 * N * tokens_per_s / peak_flops``: ``N`` is the number of trainable
  parameters (tied embeddings counted once), ``6 N`` the forward (2N) plus backward (4N) FLOPs per token of the
  dense layers (Kaplan et al. 2020), without the attention-score term; ``peak_flops`` is this machine's
  *measured* ``torch.matmul`` throughput in the dtype the library computed in (:func:`measure_matmul_peak`,
  cached per CPU, torch version and thread count). Both libraries get the same formula, so the MFU ratio
  equals the tokens/s ratio; MFU says how far from the hardware's matmul speed the loop is.

Settings
--------
- ``matched``: both libraries in the same dtype (``fp32``, or ``bf16`` autocast with fp32 weights), no
  gradient checkpointing, the same truncation, batch size and no accumulation, the same optimizer
  (``torch.optim.AdamW``, same lr and betas, no weight decay, clip 1.0, constant schedule), no
  logging/evaluation/saving inside the timed loop, and the *same batches in the same order*: TRL gets our step
  plan's records, in order, with a sequential sampler.
- ``defaults``: each library at its own defaults (ours: ``precision=auto``, length-grouped batches, cosine
  schedule; TRL's ``SFTConfig``: bf16, gradient checkpointing, fused AdamW, random sampler, logging every 10
  steps), except batch size, max length, steps and the output folder. Evaluation and saving stay off for both.

Adding a stage (``bench rm``, ``bench dpo``, ``bench ppo``)
------------------------------------------------------------
1. Write two runners, ``def ours_dpo(spec: BenchSpec) -> dict`` and ``def trl_dpo(spec: BenchSpec) -> dict``
   (here or in your own module; import torch, TRL and alignlab trainers *inside* the function). A runner
   trains ``spec.warmup_steps + spec.steps`` optimizer steps in ``spec.workdir`` and returns raw measurements:

   ``step_seconds`` (list, one per step, warmup included), ``step_tokens`` (non-pad tokens per step),
   ``losses`` (per step), ``trainable_params``, ``total_params``, ``precision`` (``"fp32"``/``"bf16"``, what
   it really computed in) and optionally ``step_cpu_seconds`` (``time.process_time`` per step), ``settings``
   (a dict of what it configured) and ``notes``. Stamp the time at the end of each step (a TRL
   ``TrainerCallback.on_step_end``; for our trainers, wrap ``Run.log`` as :func:`ours_sft` does).

   :func:`summarize` turns these into the reported numbers, so every stage is measured the same way.
2. Register them: ``PAIRS["dpo"] = Pair("alignlab.bench:ours_dpo", "alignlab.bench:trl_dpo",
   default_data="dpo_en_demo.json", help="...")``. The CLI picks the new stage up by itself; stage-specific
   options travel in ``spec.extra`` (``alignlab bench dpo --set beta=0.1``).
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


# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Pair:
    """One benchmarked stage: our runner and TRL's, as ``"module:function"`` paths (imported lazily)."""

    ours: str
    trl: str
    default_data: str = ""  # a file name in ../shared/data, used when --data is not given
    help: str = ""


PAIRS: dict[str, Pair] = {
    "sft": Pair("alignlab.bench:ours_sft", "alignlab.bench:trl_sft", default_data="alpaca_en_demo.json",
                help="supervised fine-tuning: alignlab train_sft vs trl.SFTTrainer"),
    # "rm": Pair(...), "dpo": Pair(...), "ppo": Pair(...): added by their stages
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

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps


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


def mfu(params: int, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: ``6 * params * tokens_per_s / peak_flops`` (a fraction, not a percentage).

    ``6 * params`` FLOPs per token = forward (one multiply-add, 2 FLOPs, per parameter) + backward (twice the
    forward). The attention-score FLOPs are left out; ``peak_flops`` is FLOP/s of the dtype computed in.
    """
    if peak_flops <= 0:
        raise ValueError("peak_flops must be positive")
    return 6.0 * params * tokens_per_s / peak_flops


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


def summarize(raws: dict[str, Any] | list[dict[str, Any]], warmup_steps: int,
              peak_flops: dict[str, float] | None) -> dict[str, Any]:
    """Reported numbers from a runner's raw measurements (see the module docstring): one dict per round,
    each round's first ``warmup_steps`` steps left out, the timed steps of all rounds pooled."""
    rounds = [raws] if isinstance(raws, dict) else list(raws)
    seconds = [x for raw in rounds for x in list(raw["step_seconds"])[warmup_steps:]]
    tokens = [x for raw in rounds for x in list(raw["step_tokens"])[warmup_steps:]]
    first = rounds[0]
    losses = list(first["losses"])
    if not seconds or sum(seconds) <= 0:
        raise AlignlabError(f"no timed steps: {len(first['step_seconds'])} steps ran, {warmup_steps} of them warmup")
    tokens_per_s = sum(tokens) / sum(seconds)
    rss = [raw["peak_rss_mib"] for raw in rounds if raw.get("peak_rss_mib") is not None]
    out: dict[str, Any] = {
        "tokens_per_s": tokens_per_s,
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
    cpu = [x for raw in rounds for x in list(raw.get("step_cpu_seconds") or [])[warmup_steps:]]
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
    peak = (peak_flops or {}).get(first.get("precision") or "")
    if peak and first.get("trainable_params"):
        out["peak_flops"] = peak
        out["mfu"] = mfu(first["trainable_params"], tokens_per_s, peak)
    return out


def ratios(ours: dict[str, Any], trl: dict[str, Any]) -> dict[str, float]:
    """ours / TRL for every number both have."""
    out = {}
    for key in ("tokens_per_s", "tokens_per_s_uncontended", "tokens_per_cpu_s", "s_per_step", "peak_rss_mib",
                "final_loss", "mfu"):
        a, b = ours.get(key), trl.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            out[key] = a / b
    return out


# ------------------------------------------------------------------------------------------------ workers


def run_worker(spec_path: str, out_path: str) -> int:
    """The worker process: run one runner and write its raw measurements (or the error) as JSON."""
    import resource
    import traceback

    spec = BenchSpec(**json.loads(Path(spec_path).read_text()))
    pair = PAIRS[spec.stage]
    runner = _import(pair.ours if spec.library == "ours" else pair.trl)
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


def launch(spec: BenchSpec, workdir: Path, *, name: str = "", echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run one library's worker in a fresh process; returns its raw measurements plus ``peak_rss_mib`` (the
    child's maximum RSS from ``os.wait4``) and ``wall_s``. Output goes to ``workdir/<name>.log``."""
    name = name or spec.library
    spec_file = workdir / f"{name}.spec.json"
    out_file = workdir / f"{name}.result.json"
    log_file = workdir / f"{name}.log"
    spec_file.write_text(json.dumps(dataclasses.asdict(spec)))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               TRANSFORMERS_OFFLINE=os.environ.get("TRANSFORMERS_OFFLINE", "1"),
               HF_HUB_DISABLE_TELEMETRY="1", DISABLE_MLFLOW_INTEGRATION="TRUE", WANDB_DISABLED="true")
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "alignlab.bench", "_worker", str(spec_file), str(out_file)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
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
                  rounds: int = 1, keep_workdir: str = "", echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run ``stage`` with our trainer and/or TRL's (``which``), one after the other, each in its own process;
    returns the report (machine, settings, per-library summaries, ours/TRL ratios, raw measurements)."""
    import datetime

    if stage not in PAIRS:
        raise AlignlabError(f"no benchmark for stage '{stage}' (known: {', '.join(PAIRS)})")
    if settings not in SETTINGS:
        raise AlignlabError(f"settings must be one of {SETTINGS}, got '{settings}'", field="settings")
    if steps < 1 or warmup_steps < 0 or batch_size < 1 or rounds < 1:
        raise AlignlabError("need steps >= 1, warmup_steps >= 0, batch_size >= 1 and rounds >= 1")
    pair = PAIRS[stage]
    if not data:
        found = shared_data_file(pair.default_data) if pair.default_data else None
        if found is None:
            raise AlignlabError(f"no data: pass --data FILE (default {pair.default_data} not found in ../shared/data)",
                                field="data")
        data = str(found)
    if not Path(data).exists():
        raise AlignlabError("data file does not exist", file=data)
    from alignlab.train.loop import resolve_precision

    resolved = resolve_precision(precision)
    libraries = LIBRARIES if which == "both" else (which,)
    started = datetime.datetime.now().astimezone()
    report: dict[str, Any] = {
        "stage": stage, "settings": settings, "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["alignlab", *sys.argv[1:]]) if sys.argv and "alignlab" in sys.argv[0] else None,
        "config": {"model": model, "data": data, "batch_size": batch_size, "max_length": max_length,
                   "steps": steps, "warmup_steps": warmup_steps, "rounds": rounds, "seed": seed, "lr": LEARNING_RATE,
                   "precision": resolved if settings == "matched" else "each library's default",
                   "extra": extra or {}},
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
                name = library if rounds == 1 else f"{library}-r{round_index + 1}"
                echo(f"running {name} {stage} ({settings}, {warmup_steps}+{steps} steps) ...")
                spec = BenchSpec(stage=stage, library=library, model=model, data=data, batch_size=batch_size,
                                 max_length=max_length, steps=steps, warmup_steps=warmup_steps,
                                 precision=resolved, settings=settings, seed=seed, workdir=str(workdir / name),
                                 extra=dict(extra or {}))
                Path(spec.workdir).mkdir(parents=True, exist_ok=True)
                raws[library].append(launch(spec, workdir, name=name, echo=echo))
    finally:
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["results"] = {lib: summarize(runs, warmup_steps, peaks) for lib, runs in raws.items()}
    for lib, runs in raws.items():
        for key in ("settings", "notes", "worker_maxrss_mib", "torch_threads"):
            if key in runs[0]:
                report["results"][lib][key] = runs[0][key]
        report["results"][lib]["wall_s"] = [raw["wall_s"] for raw in runs]
    if len(raws) == 2:
        report["ratios"] = ratios(report["results"]["ours"], report["results"]["trl"])
    report["raw"] = {lib: [{k: raw[k] for k in ("step_seconds", "step_cpu_seconds", "step_tokens", "losses",
                                                "peak_rss_mib") if k in raw} for raw in runs]
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


TABLE_ROWS = (  # (label, key, format)
    ("tokens/s (non-pad)", "tokens_per_s", "1"),
    ("tokens per CPU-second", "tokens_per_cpu_s", "1"),
    ("CPU utilisation (cores)", "cpu_utilisation", "2"),
    ("tokens/s, uncontended steps", "tokens_per_s_uncontended", "1"),
    ("uncontended steps", "uncontended_steps", "int"),
    ("s/step", "s_per_step", "2"),
    ("tokens/step", "tokens_per_step", "1"),
    ("peak RSS (MiB)", "peak_rss_mib", "0"),
    ("final loss", "final_loss", "4"),
    ("MFU (6N, measured peak)", "mfu", "pct"),
    ("precision", "precision", "str"),
    ("trainable params", "trainable_params", "int"),
    ("timed steps", "timed_steps", "int"),
)


def format_table(report: dict[str, Any]) -> Any:
    """A rich Table of the report: one row per number, one column per library, and ours/TRL."""
    from rich.table import Table

    cfg = report["config"]
    results = report["results"]
    title = (f"alignlab bench {report['stage']} ({report['settings']}): {cfg['model']}, batch {cfg['batch_size']}, "
             f"max_length {cfg['max_length']}, {cfg['warmup_steps']}+{cfg['steps']} steps")
    table = Table(title=title)
    table.add_column("")
    for lib in results:
        table.add_column("alignlab" if lib == "ours" else "TRL", justify="right")
    if "ratios" in report:
        table.add_column("ours / TRL", justify="right")
    for label, key, kind in TABLE_ROWS:
        cells = [str(results[lib].get(key) or "-") if kind == "str" else _fmt(results[lib].get(key), kind)
                 for lib in results]
        if "ratios" in report:
            cells.append(_fmt(report["ratios"].get(key), "ratio"))
        table.add_row(label, *cells)
    return table


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    console.print(format_table(report))
    peaks = report.get("matmul_peak_flops")
    if peaks:
        console.print(f"measured matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
                      f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s; machine: {report['machine']['cpu']}, "
                      f"{report['machine']['nproc']} CPUs")


# ------------------------------------------------------------------------------------------------ CLI


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=sorted(PAIRS),
                        help="which stage to benchmark: " + "; ".join(f"{k}: {v.help}" for k, v in PAIRS.items()))
    parser.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint folder, hub id or built-in")
    parser.add_argument("--data", help="training data (default: the stage's file in ../shared/data)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step (no accumulation)")
    parser.add_argument("--max-length", type=int, default=512, help="maximum tokens per example (truncated)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per library")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="compute dtype for --settings matched (auto: bf16 where the hardware has it)")
    parser.add_argument("--settings", default="matched", choices=list(SETTINGS),
                        help="matched: same dtype/optimizer/batches for both; defaults: each library's defaults")
    parser.add_argument("--which", default="both", choices=["both", *LIBRARIES], help="which libraries to run")
    parser.add_argument("--seed", type=int, default=0, help="data order and initialisation seed")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run each library this many times, alternating the order (ours, TRL, TRL, ours, ...), "
                        "and pool the timed steps: evens out a shared machine's changing load")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="stage-specific option passed to the runners (repeatable)")
    parser.add_argument("--json", dest="json_out", metavar="OUT",
                        help="write the report here (default: runs/bench/STAGE-SETTINGS.json)")
    parser.add_argument("--remeasure-peak", action="store_true",
                        help="measure the matmul peak again instead of using the cached value")
    parser.add_argument("--keep-workdir", default="", metavar="DIR",
                        help="run the workers in DIR and keep their logs and run folders")


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
                           keep_workdir=args.keep_workdir)
    print_report(report)
    out = Path(args.json_out or f"runs/bench/{args.stage}-{args.settings}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out}")
    return report


# ------------------------------------------------------------------------------------------------ SFT runners


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


def _ours_sft_config(spec: BenchSpec) -> Any:
    """Our SFTConfig for ``spec``. Both settings: no evaluation split, no final model, a fresh run folder."""
    from alignlab.config import SFTConfig

    values: dict[str, Any] = dict(
        model=spec.model, data=spec.data, batch_size=spec.batch_size, grad_accum=1, max_length=spec.max_length,
        max_steps=spec.total_steps, seed=spec.seed, output_dir=str(Path(spec.workdir) / "run"), resume="never",
        eval_fraction=0.0, save_final=False,
    )
    if spec.settings == "matched":
        values.update(precision=spec.precision, gradient_checkpointing=False, lr=spec.lr, schedule="constant",
                      warmup_ratio=0.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
                      progress=False, log_every=1)
    return SFTConfig(**values)


def ours_sft(spec: BenchSpec) -> dict[str, Any]:
    """Our SFT trainer, unmodified (``train_sft``); per-step tokens and losses read back from its
    ``metrics.jsonl``.

    Timing: ``Run.progress`` (called right before the loop) and ``Run.log`` (called after each step) are
    wrapped to stamp the wall clock and this process's CPU time, so a step's seconds run from the end of the
    previous step (or the start of the loop) to its own end. The wrappers only record; the loop is ours as
    shipped."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignlab.models import resolve_model
    from alignlab.train import loop
    from alignlab.train.sft import train_sft

    stamps: list[tuple[float, float]] = []
    original_log, original_progress = loop.Run.log, loop.Run.progress

    def stamped_log(self: Any, step: int, metrics: dict[str, Any], **kw: Any) -> None:
        if kw.get("file", "metrics.jsonl") == "metrics.jsonl" and "tokens" in metrics:
            stamps.append((time.perf_counter(), time.process_time()))
        original_log(self, step, metrics, **kw)

    def stamped_progress(self: Any, *args: Any, **kw: Any) -> Any:
        bar = original_progress(self, *args, **kw)
        stamps.append((time.perf_counter(), time.process_time()))
        return bar

    cfg = _ours_sft_config(spec)
    loop.Run.log, loop.Run.progress = stamped_log, stamped_progress
    try:
        run_dir = train_sft(cfg)
    finally:
        loop.Run.log, loop.Run.progress = original_log, original_progress
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    records = [r for r in records if "tokens" in r]
    if len(records) != spec.total_steps or len(stamps) != spec.total_steps + 1:
        raise AlignlabError(f"expected {spec.total_steps} logged steps, found {len(records)}")
    seconds = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu_seconds = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    with torch.device("meta"):  # count parameters without allocating weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(spec.model)))
    model.tie_weights()
    trainable, total = count_params(model)
    return {
        "step_seconds": seconds,
        "step_cpu_seconds": cpu_seconds,
        "step_tokens": [r["tokens"] for r in records],
        "losses": [r["loss"] for r in records],
        "trainable_params": trainable,
        "total_params": total,
        "precision": loop.resolve_precision(cfg.precision),
        "settings": {"gradient_checkpointing": cfg.gradient_checkpointing, "optimizer": "torch.optim.AdamW",
                     "schedule": cfg.schedule, "warmup_ratio": cfg.warmup_ratio, "lr": cfg.lr,
                     "group_by_length": cfg.group_by_length},
    }


def _name(value: Any) -> str:
    """An enum's value (``OptimizerNames.ADAMW_TORCH`` -> ``adamw_torch``), else ``str(value)``."""
    return str(getattr(value, "value", value))


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

    Timing: a callback stamps the end of every optimizer step (the first step from its start). Tokens and
    loss: ``training_step`` is wrapped to count the batch's attention-mask ones and keep the returned loss;
    nothing else of TRL's is changed."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    from alignlab.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(spec.model)
    rows, examples = trl_records(spec, tokenizer)
    if spec.settings == "matched":
        rows, examples = rows[: spec.total_steps * spec.batch_size], examples[: spec.total_steps * spec.batch_size]

    class StepClock(TrainerCallback):
        """(wall, CPU) stamps: the start of the first step, then the end of every step."""

        def __init__(self) -> None:
            self.stamps: list[tuple[float, float]] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not self.stamps:
                self.stamps.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.stamps.append((time.perf_counter(), time.process_time()))

    class MeasuredSFTTrainer(SFTTrainer):
        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
            self.bench_tokens.append(int(inputs["attention_mask"].sum()))
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.bench_losses.append(loss.detach())
            return loss

    common: dict[str, Any] = dict(
        output_dir=str(Path(spec.workdir) / "run"), use_cpu=True, report_to=[], save_strategy="no",
        eval_strategy="no", dataloader_num_workers=0, per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=1, max_steps=spec.total_steps, max_length=spec.max_length, seed=spec.seed,
        completion_only_loss=True, dataset_num_proc=None,
    )
    if spec.settings == "matched":
        common.update(
            bf16=spec.precision == "bf16", fp16=False, gradient_checkpointing=False, optim="adamw_torch",
            learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, logging_strategy="no", disable_tqdm=True,
            train_sampling_strategy="sequential", packing=False, padding_free=False,
            model_init_kwargs={"dtype": torch.float32},
        )
    args = TRLConfig(**common)
    clock = StepClock()
    trainer = MeasuredSFTTrainer(model=resolve_model(spec.model), args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer, callbacks=[clock])
    trainer.bench_tokens, trainer.bench_losses = [], []
    # fairness check: did TRL's own tokenization give exactly our input ids and loss positions?
    prepared = trainer.train_dataset
    same = None
    if len(prepared) == len(examples):
        same = sum(list(ids) == list(ex.input_ids) and list(lab) == list(ex.labels)
                   for ids, lab, ex in zip(prepared["input_ids"], prepared["labels"], examples))
    trainer.train()
    if len(clock.stamps) != spec.total_steps + 1:
        raise AlignlabError(f"TRL ran {len(clock.stamps) - 1} steps, expected {spec.total_steps}")
    seconds = [b[0] - a[0] for a, b in zip(clock.stamps, clock.stamps[1:])]
    cpu_seconds = [b[1] - a[1] for a, b in zip(clock.stamps, clock.stamps[1:])]
    trainable, total = count_params(trainer.model)
    return {
        "step_seconds": seconds,
        "step_cpu_seconds": cpu_seconds,
        "step_tokens": trainer.bench_tokens,
        "losses": [float(x) for x in trainer.bench_losses],
        "trainable_params": trainable,
        "total_params": total,
        "precision": "bf16" if args.bf16 else "fp32",
        "settings": {"gradient_checkpointing": args.gradient_checkpointing, "optimizer": _name(args.optim),
                     "schedule": _name(args.lr_scheduler_type), "lr": args.learning_rate,
                     "sampler": _name(args.train_sampling_strategy), "logging_steps": args.logging_steps,
                     "logging": _name(args.logging_strategy)},
        "notes": {"examples_identical_to_ours": same, "examples_compared": len(prepared)
                  if same is not None else 0},
    }


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_worker":
        sys.exit(run_worker(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m alignlab.bench _worker SPEC.json OUT.json (use `alignlab bench` instead)")
