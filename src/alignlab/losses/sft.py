"""Supervised fine-tuning loss: negative log-likelihood of the response tokens."""

from __future__ import annotations

import torch

from alignlab.losses.common import masked_sum

__all__ = ["sft_loss"]


def sft_loss(
    token_logps: torch.Tensor, mask: torch.Tensor, num_items: int | float | torch.Tensor | None = None
) -> torch.Tensor:
    """Negative log-likelihood of the response tokens, averaged over the loss tokens of the global batch.

    Intuition: maximise the probability the model gives to each response token (prompt and padding tokens
    are masked out). Dividing by the token count of the *whole* optimiser step, not of this micro-batch,
    makes gradient accumulation and data-parallel runs give the same gradient as one big batch: each token
    weighs the same whatever micro-batch it landed in. (Dividing each micro-batch by its own token count
    over-weights the tokens of short micro-batches.)

    Formula: ``loss = -sum_{i,j} mask[i,j] * token_logps[i,j] / N`` with ``N = num_items`` or ``sum(mask)``.

    Args:
        token_logps: ``(b, t)`` log-probability of each target token.
        mask: ``(b, t)`` 1 on the tokens that are trained on.
        num_items: number of loss tokens in the whole global batch (all micro-batches of the step, all
            processes). ``None`` uses this batch's ``mask.sum()``. Clamped to at least 1.

    Returns:
        A scalar tensor.
    """
    total = masked_sum(token_logps, mask)
    if num_items is None:
        num_items = mask.to(token_logps.dtype).sum()
    denominator = torch.as_tensor(num_items, dtype=token_logps.dtype, device=token_logps.device)
    return -total / denominator.clamp(min=1.0)
