"""Masked reductions and log-probability helpers shared by every loss.

Notation: ``b`` batch, ``t`` sequence (response) length, ``v`` vocabulary. A ``mask`` is 1 on the tokens that
count (response tokens) and 0 on padding; it has the shape of the values it masks and may be bool, int or
float (only 0 and 1 are meaningful). Padded values never reach a result, not even ``nan``; keep them finite
when gradients flow through them (``0 * nan`` is still ``nan`` in the backward pass).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = [
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "row_chunks",
    "selective_log_softmax",
    "sequence_logps",
]


def _where_mask(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` where ``mask`` is 1, exactly 0 elsewhere (so ``nan``/``inf`` padding cannot leak)."""
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` over the positions where ``mask`` is 1.

    Args:
        values: any shape, e.g. ``(b, t)``.
        mask: same shape as ``values``.
        dim: dimension to sum over; ``None`` sums everything to a scalar.

    Returns:
        A scalar when ``dim`` is None, else ``values`` with ``dim`` removed (e.g. ``(b,)``).
    """
    masked = _where_mask(values, mask)
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1.

    A row (or batch) with no real token has mean 0 rather than ``nan``: its denominator is clamped to 1.

    Args:
        values: any shape, e.g. ``(b, t)``.
        mask: same shape as ``values``.
        dim: dimension to average over; ``None`` averages over every real token of the batch.

    Returns:
        A scalar when ``dim`` is None, else ``values`` with ``dim`` removed.
    """
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over all positions where ``mask`` is 1 (one number for the whole batch).

    Args:
        values: any shape, e.g. ``(b, t)``.
        mask: same shape as ``values``.
        unbiased: apply Bessel's correction ``n / (n - 1)``, ``n`` the number of real tokens (as TRL does).

    Returns:
        A scalar tensor.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.to(values.dtype).sum()
        variance = variance * count / (count - 1).clamp(min=1.0)
    return variance


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``values`` to zero mean and unit variance using statistics of the real tokens only.

    PPO whitens advantages over the batch; padding must not enter the mean or the variance, or short
    responses would drag both towards the pad value.

    Args:
        values: ``(b, t)`` (any shape works; statistics are over every real token).
        mask: same shape as ``values``.
        shift_mean: when False the mean is added back (only the scale changes), as for whitening rewards.
        eps: added to the variance before the square root.

    Returns:
        Same shape as ``values``; padded positions are 0.
    """
    mean = masked_mean(values, mask)
    variance = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _where_mask(whitened, mask)


def row_chunks(tensor: torch.Tensor, chunk_size: int) -> Iterator[torch.Tensor]:
    """Views of at most ``chunk_size`` consecutive rows of a ``(..., n, v)`` tensor, in row-major order.

    Never copies the tensor: ``tensor.reshape(-1, v)`` would, for a non-contiguous input such as the usual
    shifted ``logits[:, :-1]``, allocate the very ``(b, t, v)`` buffer chunking is meant to avoid.
    """
    if tensor.dim() <= 2:
        yield from tensor.split(chunk_size)
    else:
        for row in tensor:
            yield from row_chunks(row, chunk_size)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """Log-probability of the token ids ``index`` under ``logits``, without a full ``(b, t, v)`` log-softmax.

    Equals ``torch.log_softmax(logits.float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)`` but only ever
    holds ``chunk_size`` rows of ``v`` values beyond the input. Half-precision logits (bf16/fp16) are
    normalised in float32 by the fused kernel itself (``log_softmax(..., dtype=float32)``): no float32 copy of
    the logits is made, and the result keeps float32 precision, which preference losses need (they difference
    sums of hundreds of token log-probs; bf16 keeps 8 bits of mantissa). The fused ``log_softmax`` is also
    faster than gathering and subtracting a ``logsumexp``, forward and backward (measured on SmolLM2's 49k
    vocabulary).

    Args:
        logits: ``(b, t, v)`` (any leading shape ``(..., v)`` works).
        index: ``(b, t)`` integer token ids, the leading shape of ``logits``.
        chunk_size: rows of ``v`` logits processed at once.

    Returns:
        ``(b, t)`` log-probabilities: float32 for half-precision logits, else the dtype of ``logits``.
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and index {tuple(index.shape)} do not match")
    dtype = torch.float32 if logits.dtype in (torch.bfloat16, torch.float16) else logits.dtype
    chunks = zip(row_chunks(logits, chunk_size), row_chunks(index.long().unsqueeze(-1), chunk_size))
    pieces = [F.log_softmax(chunk, dim=-1, dtype=dtype).gather(-1, i).squeeze(-1) for chunk, i in chunks]
    if not pieces:
        return logits.new_zeros(index.shape, dtype=dtype)
    return torch.cat(pieces).reshape(index.shape)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-probability of each whole response: the sum (or the mean) of its token log-probabilities.

    Args:
        token_logps: ``(b, t)`` per-token log-probabilities.
        mask: ``(b, t)`` 1 on response tokens.
        average: divide by the number of response tokens (length-normalised log-prob, as SimPO, ORPO and
            TRL's IPO use); a response with no token gives 0.

    Returns:
        ``(b,)``.
    """
    if average:
        return masked_mean(token_logps, mask, dim=-1)
    return masked_sum(token_logps, mask, dim=-1)
