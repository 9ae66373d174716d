"""Golden numbers: a fixed 20-step fp32 run on ``tiny-random`` for SFT, the reward model, DPO and PPO, whose
per-step losses (and gradient norms) must match the numbers committed in ``tests/golden/<trainer>.json``.

Any change to what a trainer computes (loss normalisation, masking, the optimizer, the schedule, the data order,
sampling) moves these numbers, far beyond the tolerance ``rel 1e-4`` (+ ``abs 1e-6`` for values near 0); a
change that only reorders floating-point sums moves them by ~1e-7. The runs use one thread, so the CPU's thread
count does not change the summation order.

After an intended numerical change, regenerate and commit the files (the diff shows what moved):

    .venv/bin/pytest tests/test_golden.py --update-golden

Each file records the torch and transformers versions it was made with: other versions may initialise the tiny
model or sample differently, in which case regenerate rather than loosen the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from alignlab.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig
from alignlab.train.dpo import train_dpo
from alignlab.train.ppo import train_ppo
from alignlab.train.reward_model import train_reward
from alignlab.train.sft import train_sft

GOLDEN = Path(__file__).parent / "golden"
REL, ABS = 1e-4, 1e-6
STEPS = 20
COMMON = dict(model="tiny-random", precision="fp32", progress=False, save_final=False, seed=0, warmup_ratio=0.1,
              schedule="cosine")

GOOD = ["great", "wonderful", "lovely", "delightful", "beautiful", "happy", "good"]
BAD = ["awful", "terrible", "boring", "bad", "long", "sad", "dull"]
THINGS = ["movie", "film", "story", "music", "day", "ending", "book", "song"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _instructions() -> list[dict]:
    return [{"instruction": f"Describe the {THINGS[i % 8]} in a few words.", "input": "",
             "output": f"The {THINGS[i % 8]} was {GOOD[i % 7]}{' and ' + GOOD[(i + 2) % 7] if i % 3 else ''}."}
            for i in range(40)]


def _pairs() -> list[dict]:
    return [{"prompt": f"What did you think of the {THINGS[i % 8]}?",
             "chosen": f" The {THINGS[i % 8]} was {GOOD[i % 7]}{'!' * (i % 3)}",
             "rejected": f" The {THINGS[i % 8]} was {BAD[i % 7]}{' and too long' * (i % 2)}."} for i in range(40)]


def letter_e(prompts: list[Any], responses: list[str]) -> list[float]:
    """The PPO reward: the fraction of the response's characters that are the letter 'e'."""
    return [sum(c == "e" for c in r) / max(1, len(r)) for r in responses]


def _write(path: Path, records: list[dict]) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def run_sft(tmp: Path) -> Path:
    return train_sft(SFTConfig(**COMMON, data=_write(tmp / "sft.json", _instructions()), output_dir=str(tmp / "run"),
                               max_steps=STEPS, batch_size=4, lr=1e-3, eval_fraction=0.0))


def run_reward(tmp: Path) -> Path:
    return train_reward(RewardConfig(**COMMON, data=_write(tmp / "pairs.json", _pairs()), output_dir=str(tmp / "run"),
                                     max_steps=STEPS, batch_size=4, lr=1e-3, eval_fraction=0.0, stats_samples=8))


def run_dpo(tmp: Path) -> Path:
    return train_dpo(DPOConfig(**COMMON, data=_write(tmp / "pairs.json", _pairs()), output_dir=str(tmp / "run"),
                               max_steps=STEPS, batch_size=4, lr=5e-4, eval_fraction=0.0, max_length=64))


def run_ppo(tmp: Path) -> Path:
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me about the {t}." for t in THINGS) + "\n")
    cfg = PPOConfig(**{**COMMON, "warmup_ratio": 0.0, "schedule": "linear"}, prompts=str(prompts),
                    output_dir=str(tmp / "run"), iterations=STEPS, batch_size=2, num_mini_batches=2, ppo_epochs=2,
                    max_new_tokens=6, lr=1e-3, eval_fraction=0.0, log_samples=0)
    return train_ppo(cfg, reward=letter_e)


# trainer -> (run function, the per-step numbers compared)
TRAINERS = {
    "sft": (run_sft, ["loss", "grad_norm"]),
    "reward": (run_reward, ["loss", "accuracy", "grad_norm"]),
    "dpo": (run_dpo, ["loss", "rewards/margins", "grad_norm"]),
    "ppo": (run_ppo, ["policy_loss", "value_loss", "score", "kl", "grad_norm"]),
}


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_golden_numbers(trainer, tmp_path, request):
    run, keys = TRAINERS[trainer]
    lines = [json.loads(line) for line in (run(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    steps = [{"step": m["step"], **{k: m[k] for k in keys}} for m in lines if "loss" in m or "policy_loss" in m]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    path = GOLDEN / f"{trainer}.json"
    if request.config.getoption("--update-golden"):
        path.write_text(json.dumps({"trainer": trainer, "regenerate": "pytest tests/test_golden.py --update-golden",
                                    "torch": torch.__version__, "transformers": transformers.__version__,
                                    "steps": steps}, indent=1) + "\n")
        return
    assert path.exists(), f"{path} is missing: run `pytest tests/test_golden.py --update-golden`"
    golden = json.loads(path.read_text())
    assert len(golden["steps"]) == STEPS
    versions = f"(golden made with torch {golden['torch']}, transformers {golden['transformers']})"
    for got, want in zip(steps, golden["steps"]):
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=REL, abs=ABS), (
                f"{trainer} step {got['step']} {key}: {got[key]!r} != golden {want[key]!r} {versions}; if the "
                f"change is intended, regenerate with `pytest tests/test_golden.py --update-golden`")
