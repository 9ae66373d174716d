"""The worker process and its launcher: each runner runs alone in a fresh process
(``python -m alignlab.bench _worker SPEC OUT``, see ``__main__.py``), so one library's imports and allocations
never count against the other and the peak resident memory of each is its own. :func:`launch` starts it in its
own process group, reads its peak RSS with ``os.wait4`` and, under ``--time-limit``, stops it and says how far
it got from the progress stamps it wrote (:func:`stamp_progress`, :func:`stopped_worker`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignlab.bench.registry import PAIRS, BenchSpec, import_path
from alignlab.errors import AlignlabError

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
    runner = import_path(spec.runner or PAIRS[spec.stage].runner(spec.library))
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
    src = str(Path(__file__).resolve().parents[2])  # the folder holding the alignlab package
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
