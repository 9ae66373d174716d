"""What every trainer shares about the model it trains: load it (with LoRA and gradient checkpointing as
configured), hold out part of its data, and read a training checkpoint back as a model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignlab.errors import AlignlabError
from alignlab.models import add_lora, is_peft, load_model
from alignlab.train.checkpoints import load_trainable_weights, verify_checkpoint


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of the examples (at least one when fraction > 0), chosen by ``seed``."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    n_eval = max(1, int(round(fraction * len(examples))))
    order = np.random.default_rng(seed).permutation(len(examples))
    held = set(order[:n_eval].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def prepare_policy(cfg: Any, tokenizer: Any, head: str = "causal_lm") -> torch.nn.Module:
    """Load the model to train, with LoRA and gradient checkpointing as configured."""
    model = load_model(cfg.model, head=head, allow_pickle=cfg.allow_pickle,
                       trust_remote_code=cfg.trust_remote_code, tokenizer=tokenizer)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora:
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                         target_modules=cfg.lora_targets,
                         modules_to_save=["score"] if head == "score" else None)
    return model


def policy_from_checkpoint(cfg: Any, checkpoint: str | Path, tokenizer: Any, *, prefix: str = "") -> torch.nn.Module:
    """The model a training checkpoint holds, ready to sample or score (eval mode, a LoRA adapter merged):
    :func:`prepare_policy` on ``cfg`` (the run's config, so the adapter is wrapped the same way) with the
    checkpoint's trainable weights loaded (``prefix``: see :func:`load_trainable_weights`)."""
    checkpoint = Path(checkpoint)
    problem = verify_checkpoint(checkpoint)
    if problem:
        raise AlignlabError(f"cannot load the checkpoint: {problem}", file=str(checkpoint))
    model = prepare_policy(dataclasses.replace(cfg, gradient_checkpointing=False), tokenizer)
    load_trainable_weights(model, checkpoint, prefix)
    model.eval()
    return model.merge_and_unload() if is_peft(model) else model
