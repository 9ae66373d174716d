"""``alignlab demo``: fine-tune the real model on the built-in instruction set and show what changed.

Until the lab (which compares every method) is in place, the demo is the first stage of the pipeline: an
SFT run of SmolLM2-135M-Instruct on ``tasks/demo_instructions.json`` (32 short Alpaca-format
demonstrations written for this project), followed by generations for held-out instructions from the
model before and after training.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

from alignlab.config import SFTConfig
from alignlab.generation import SamplingConfig, generate
from alignlab.models import load_model, load_tokenizer
from alignlab.train.sft import train_sft

HELD_OUT = [
    "Write a one-sentence review of a movie that made you laugh.",
    "Give two tips for sleeping better.",
    "What is the capital of Italy?",
]


def builtin_instructions() -> Path:
    """Path of the built-in Alpaca-format demonstration file."""
    return Path(str(resources.files("alignlab.tasks") / "demo_instructions.json"))


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny-random model, few steps (seconds, for tests)")
    parser.add_argument("--model", default=None, help="model to fine-tune (default smollm2-135m-instruct)")
    parser.add_argument("--steps", type=int, default=None, help="SFT optimizer steps (default 12, quick: 6)")
    parser.add_argument("--output-dir", default="runs/demo", help="run folder")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per held-out prompt")


def run_demo(args: argparse.Namespace) -> dict:
    model_name = args.model or ("tiny-random" if args.quick else "smollm2-135m-instruct")
    steps = args.steps or (6 if args.quick else 12)
    out = Path(args.output_dir)
    cfg = SFTConfig(
        model=model_name, data=str(builtin_instructions()), output_dir=str(out / "sft"), max_steps=steps,
        batch_size=8, lr=1e-3 if args.quick else 2e-5, warmup_ratio=0.1, eval_fraction=0.1, resume="never",
        template="alpaca", max_length=256,
    )
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, batch_size=len(HELD_OUT))
    tokenizer = load_tokenizer(model_name)
    before = generate(load_model(model_name), tokenizer, HELD_OUT, sampling, template="alpaca")
    print(f"== SFT of {model_name} on {cfg.data} for {steps} steps")
    run_dir = train_sft(cfg)
    after = generate(load_model(run_dir / "final"), tokenizer, HELD_OUT, sampling, template="alpaca")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = {
        "model": model_name,
        "steps": steps,
        "first_loss": metrics[0]["loss"],
        "last_loss": metrics[-1]["loss"],
        "eval_loss": metrics[-1].get("eval_loss"),
        "generations": [{"prompt": p, "before": b.text, "after": a.text} for p, b, a in zip(HELD_OUT, before, after)],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\ntraining loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; "
          f"held-out loss {summary['eval_loss']}")
    for g in summary["generations"]:
        print(f"\n### {g['prompt']}\n-- before SFT:\n{g['before']}\n-- after SFT:\n{g['after']}")
    print(f"\nrun folder: {out}")
    return summary
