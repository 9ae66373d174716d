"""``gradient_checkpointing=true``: activations are recomputed in the backward pass instead of stored, which
changes memory, not the numbers. The same SFT and DPO runs, with and without it (full weights and LoRA), give
the same losses and gradient norms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignlab.config import DPOConfig, SFTConfig
from alignlab.models import load_tokenizer
from alignlab.train.dpo import train_dpo
from alignlab.train.policy import prepare_policy
from alignlab.train.sft import train_sft

COMMON = dict(model="tiny-random", precision="fp32", progress=False, save_final=False, eval_fraction=0.0,
              max_steps=3, batch_size=4, warmup_ratio=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same(a: Path, b: Path, keys: tuple[str, ...]) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert len(ma) == len(mb) == 3
    for x, y in zip(ma, mb):
        for key in keys:
            assert x[key] == pytest.approx(y[key], rel=1e-5), (key, x["step"])


def test_the_option_turns_checkpointing_on():
    tokenizer = load_tokenizer("tiny-random")
    for lora in (False, True):
        model = prepare_policy(SFTConfig(**COMMON, gradient_checkpointing=True, lora=lora), tokenizer)
        base = model.get_base_model() if lora else model
        on = getattr(base, "is_activation_checkpointing", None)  # the newer name (transformers 5)
        assert (on if on is not None else base.is_gradient_checkpointing) and not base.config.use_cache


@pytest.mark.parametrize("lora", [False, True])
def test_sft_same_numbers_with_checkpointing(tmp_path, lora):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": f"Say something nice number {i}.", "input": "",
                                 "output": f"The day is great {i}."} for i in range(16)]))
    runs = [train_sft(SFTConfig(**COMMON, data=str(data), lr=1e-3, lora=lora, gradient_checkpointing=gc,
                                output_dir=str(tmp_path / f"gc-{gc}"))) for gc in (False, True)]
    _same(*runs, ("loss", "grad_norm"))


def test_dpo_same_numbers_with_checkpointing(tmp_path):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([{"prompt": f"Tell me about movie {i}.", "chosen": f" It was great {i}.",
                                 "rejected": f" It was awful and long {i}."} for i in range(12)]))
    runs = [train_dpo(DPOConfig(**COMMON, data=str(data), lr=5e-3, gradient_checkpointing=gc, max_length=64,
                                output_dir=str(tmp_path / f"gc-{gc}"))) for gc in (False, True)]
    _same(*runs, ("loss", "grad_norm", "rewards/margins"))
