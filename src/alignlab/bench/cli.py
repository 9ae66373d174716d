"""``alignlab bench STAGE``: the command's options (:func:`add_bench_arguments`), the command
(:func:`cmd_bench`) and :func:`run_benchmark`, which checks the options, runs the two runners one after the
other, each in its own worker process, and builds the report."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignlab.bench.measure import RATIO_KEYS, machine_info, matmul_peaks, ratios, summarize, summarize_stopped
from alignlab.bench.registry import LEARNING_RATE, PAIRS, SETTINGS, BenchSpec, import_path, shared_data_file
from alignlab.bench.report import print_report
from alignlab.bench.worker import launch
from alignlab.errors import AlignlabError


def _stage_help() -> str:
    return "; ".join(f"{k}: {v.help}" for k, v in PAIRS.items())


def _options_help() -> str:
    lines = [f"{key}={default}: {help_}" for pair in PAIRS.values() for key, default, help_ in pair.options]
    return "stage option passed to the runners (repeatable): " + "; ".join(lines)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``alignlab bench``, the stages' ``--set`` options listed in their help."""
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
    """``alignlab bench``: run the benchmark, print the report and write it as JSON (``--json``)."""
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
    known = set(pair.option_defaults)
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
    from alignlab.models import resolve_precision

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
                                 option_defaults=pair.option_defaults)
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
            report["comparison"] = import_path(pair.compare)(report)
    report["raw"] = {lib: [{k: raw[k] for k in ("step_seconds", "step_cpu_seconds", "step_tokens", "losses",
                                                "step_counts", "step_times", "step_values", "peak_rss_mib")
                            if k in raw} for raw in runs]
                     for lib, runs in raws.items()}
    return report
