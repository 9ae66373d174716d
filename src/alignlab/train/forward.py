"""Batches laid out so the LM head only runs where a loss is taken, and the log-probs of those tokens.

Layout ("aligned" batches): each row is left-padded so that its first loss token sits at the same column
for every row, and right-padded to a common length. The positions that predict loss tokens are then the
last ``k`` columns for every row, so the model's own ``logits_to_keep=k`` argument slices the hidden states
before the LM head: no logits are ever computed for prompt tokens (on SmolLM2 the LM head over a 49k
vocabulary costs as much as the rest of the model for short answers). Position ids are derived from the
attention mask, so left padding does not shift RoPE positions. Because the slicing happens inside the
model's own ``forward``, this works unchanged under DDP, FSDP and DeepSpeed wrappers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from accelerate.utils import extract_model_from_parallel

from alignlab.losses.common import selective_log_softmax

IGNORE = -100


@dataclass
class AlignedBatch:
    """A padded batch whose loss positions are the last ``keep`` columns.

    Shapes: ``input_ids``, ``attention_mask``, ``position_ids``: (b, t); ``targets``, ``loss_mask``: (b, k)
    with ``k = keep``: the token predicted at each kept column and whether it carries loss.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    keep: int

    def to(self, device: torch.device | str) -> AlignedBatch:
        return AlignedBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
            self.targets.to(device), self.loss_mask.to(device), self.keep,
        )

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def collate_aligned(
    sequences: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_token_id: int,
) -> AlignedBatch:
    """Pad ``sequences`` (token ids) with ``labels`` (same length; ``-100`` where no loss, else the token id
    itself, as Hugging Face labels are) into an :class:`AlignedBatch`.

    Row ``i`` with first loss token at index ``f_i`` (at least 1: token 0 has nothing to predict it) gets
    ``S - (f_i - 1)`` pads on the left, ``S = max_i (f_i - 1)``; column ``S + j`` then predicts the token in
    column ``S + j + 1`` for every row.
    """
    if len(sequences) != len(labels):
        raise ValueError("sequences and labels differ in count")
    starts = []
    for ids, lab in zip(sequences, labels):
        if len(ids) != len(lab):
            raise ValueError("a sequence and its labels differ in length")
        first = next((i for i, t in enumerate(lab) if t != IGNORE and i > 0), None)
        starts.append((first if first is not None else len(ids)) - 1)
    shift = max(starts)
    width = max(shift - s + len(ids) for s, ids in zip(starts, sequences))
    b = len(sequences)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    full_labels = torch.full((b, width), IGNORE, dtype=torch.long)
    for row, (ids, lab, s) in enumerate(zip(sequences, labels, starts)):
        left = shift - s
        input_ids[row, left : left + len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, left : left + len(ids)] = 1
        lab_t = torch.as_tensor(lab, dtype=torch.long)
        lab_t[0] = IGNORE
        full_labels[row, left : left + len(ids)] = lab_t
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(1, width - shift - 1)
    # column shift + j predicts column shift + j + 1; the last column predicts nothing
    targets = full_labels[:, shift + 1 : shift + 1 + keep]
    if targets.shape[1] < keep:
        targets = torch.nn.functional.pad(targets, (0, keep - targets.shape[1]), value=IGNORE)
    loss_mask = targets != IGNORE
    return AlignedBatch(input_ids, attention_mask, position_ids, targets.clamp(min=0), loss_mask, keep)


def aligned_logits(model: torch.nn.Module, batch: AlignedBatch) -> torch.Tensor:
    """Logits (b, k, v) of the kept columns only. The last kept column is ``t - 2`` (the final column
    predicts nothing), so we ask the model for ``k + 1`` columns and drop the last."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=batch.keep + 1,
        use_cache=False,
    )
    return out.logits[:, :-1, :]


def completion_logps(model: torch.nn.Module, batch: AlignedBatch, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs (b, k) of the targets, zero where ``loss_mask`` is 0. No (b, t, v) log-softmax
    is materialised: only the kept columns get logits, and the log-prob is gathered then normalised."""
    logits = aligned_logits(model, batch)
    if temperature != 1.0:
        logits = logits / temperature
    logps = selective_log_softmax(logits, batch.targets)
    return logps * batch.loss_mask


def sum_token_cross_entropy(model: torch.nn.Module, batch: AlignedBatch) -> torch.Tensor:
    """The summed negative log-likelihood of the loss tokens (a scalar), via the fused cross-entropy
    kernel; divide by the global token count for the SFT loss.

    Positions without loss are left out with ``ignore_index`` rather than a boolean gather of the logits:
    the same sum and the same gradients, without the (rows, v) gather and its zero-filled scatter in the
    backward pass (about 2.5 % of an SFT step on SmolLM2-135M, see BENCHMARKS.md)."""
    logits = aligned_logits(model, batch)
    targets = batch.targets.masked_fill(~batch.loss_mask, IGNORE)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


# --------------------------------------------------------------------------- SFT: the LM head on loss rows only


@dataclass
class PaddedBatch:
    """A right-padded batch, the layout with the least padding when a loss covers whole rows.

    Shapes: ``input_ids``, ``attention_mask``: (b, t); ``targets``: (b, t - 1), the token column ``j`` predicts
    (``-100`` where there is no loss).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device | str) -> PaddedBatch:
        return PaddedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device))

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


def collate_right(sequences: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                  pad_token_id: int) -> PaddedBatch:
    """Right-pad ``sequences`` and their Hugging Face style ``labels`` (``-100`` where no loss)."""
    if len(sequences) != len(labels) or any(len(s) != len(lab) for s, lab in zip(sequences, labels)):
        raise ValueError("sequences and labels differ in count or length")
    b, width = len(sequences), max(len(s) for s in sequences)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    full_labels = torch.full((b, width), IGNORE, dtype=torch.long)
    for row, (ids, lab) in enumerate(zip(sequences, labels)):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        full_labels[row, : len(lab)] = torch.as_tensor(lab, dtype=torch.long)
    return PaddedBatch(input_ids, attention_mask, full_labels[:, 1:])


def loss_rows_cross_entropy(model: torch.nn.Module, batch: PaddedBatch) -> torch.Tensor:
    """The summed NLL of the loss tokens (a scalar), with the LM head applied to those positions only.

    Why not ``logits_to_keep``: it keeps the same columns for every row, so with right padding it would
    still run the head over other rows' prompts and padding. Here the model returns its final (normed) hidden
    states, the loss positions are gathered into one (n, d) matrix, and the head runs on those n rows: on
    SmolLM2-135M (49k vocabulary) about 1.1x faster per SFT step than the aligned layout (BENCHMARKS.md).

    The head's weight is used outside the model's ``forward``, which is right for a plain or DDP model
    (DDP hooks gradients by parameter) but not for engines that shard weights between calls (FSDP,
    DeepSpeed ZeRO-3): use :func:`collate_aligned` with :func:`sum_token_cross_entropy` there.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1,
                output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[-1][:, :-1]
    rows = batch.targets != IGNORE
    head = extract_model_from_parallel(model).get_output_embeddings()
    logits = head(hidden[rows])
    return torch.nn.functional.cross_entropy(logits.float(), batch.targets[rows], reduction="sum")


def _head_token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def loss_rows_logps(model: torch.nn.Module, batch: PaddedBatch, chunk_rows: int = 1024) -> torch.Tensor:
    """Per-token log-probs ``(b, t - 1)`` (float32) of the targets, zero where there is no loss.

    As :func:`loss_rows_cross_entropy`, the head runs on the loss positions only. The ``(n, v)`` logits are
    never all held at once: each chunk of ``chunk_rows`` rows goes through the head and its log-softmax (in
    float32, as preference losses difference sums of hundreds of log-probs) under activation checkpointing,
    so the backward pass recomputes that chunk's logits instead of keeping them (on SmolLM2 with 8 DPO pairs
    of ~500 tokens, the kept logits alone would be several GiB). Same caveat as the cross-entropy: plain and
    DDP models only; FSDP/DeepSpeed use the aligned layout.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1,
                output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[-1][:, :-1]
    rows = batch.targets != IGNORE
    picked, targets = hidden[rows], batch.targets[rows]
    head = extract_model_from_parallel(model).get_output_embeddings()
    pieces = []
    for start in range(0, picked.shape[0], chunk_rows):
        h, t = picked[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled():
            pieces.append(torch.utils.checkpoint.checkpoint(_head_token_logps, head, h, t, use_reentrant=False))
        else:
            pieces.append(_head_token_logps(head, h, t))
    logps = torch.zeros(rows.shape, dtype=torch.float32, device=hidden.device)
    if pieces:
        logps = logps.masked_scatter(rows, torch.cat(pieces))
    return logps
