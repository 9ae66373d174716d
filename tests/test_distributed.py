"""DDP on CPU (gloo): two processes give the same run as one process with the same global batch."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from alignlab.config import SFTConfig, build_config
from alignlab.train.sft import train_sft


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_process_ddp_matches_single_process(tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([
        {"instruction": f"Say something nice number {i}.", "input": "", "output": f"The day is great {i}."}
        for i in range(32)
    ]))
    common = ["model=tiny-random", f"data={data}", "max_steps=3", "precision=fp32", "eval_fraction=0",
              "progress=false", "save_final=false", "lr=1e-3", "warmup_ratio=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "alignlab.cli", "sft", f"output_dir={tmp_path / 'ddp'}", "batch_size=2",
           *common]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout + done.stderr
    overrides = dict(c.split("=", 1) for c in common)
    single = train_sft(build_config(SFTConfig, overrides={**overrides, "output_dir": str(tmp_path / "single"),
                                                          "batch_size": 4}))
    ddp, one = _metrics(tmp_path / "ddp"), _metrics(single)
    assert len(ddp) == len(one) == 3
    for a, b in zip(ddp, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
