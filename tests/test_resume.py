"""Kill and resume: SIGKILL mid-run then resume ends with the same weights and loss curve; SIGTERM writes a
checkpoint and exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def _data(path: Path) -> Path:
    path.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))}
                                for i in range(1, 25)]))
    return path


def _cmd(data: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "alignlab.cli", "sft", "--model", "tiny-random", "--data", str(data),
            "--output-dir", str(out), f"max_steps={steps}", "batch_size=2", "save_every=3", "precision=fp32",
            "eval_fraction=0", "progress=false", "lr=1e-3", "keep_checkpoints=2"]


def _wait_for(path_glob: str, root: Path, proc: subprocess.Popen, timeout: float = 300,
              log: Path | None = None) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if list(root.glob(path_glob)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path_glob} appeared: {_tail(log)}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out waiting for {path_glob} after {timeout} s: {_tail(log)}")


def _tail(log: Path | None) -> str:
    return log.read_text()[-3000:] if log is not None and log.exists() else ""


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    data = _data(tmp_path / "d.json")
    steps = 60
    straight = subprocess.run(_cmd(data, tmp_path / "straight", steps), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(data, killed, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # any checkpoint: a fixed one may already be rotated away (keep_checkpoints=2) before the next poll
    _wait_for("checkpoints/step-*/manifest.json", killed, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(_cmd(data, killed, steps), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr

    got, want = _losses(killed), _losses(tmp_path / "straight")
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, steps + 1))
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_sigterm_writes_a_checkpoint_and_exits(tmp_path):
    data = _data(tmp_path / "d.json")
    out = tmp_path / "term"
    log = tmp_path / "term.log"
    # output to a file, not a pipe: nobody reads a pipe until the end, and a full one would block the run
    with open(log, "w") as sink:
        proc = subprocess.Popen(_cmd(data, out, 100000), stdout=sink, stderr=subprocess.STDOUT, text=True)
        _wait_for("checkpoints/step-*/manifest.json", out, proc, log=log)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM: checkpoint written at step" in err
    step = int(err.split("checkpoint written at step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step-{step:07d}" / "manifest.json").exists()
