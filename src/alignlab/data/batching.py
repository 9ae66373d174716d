"""Batches: length-grouped sampling and padding.

Length grouping puts examples of similar length in the same batch so little compute goes to padding, while
the order stays random: shuffle all indices, cut them into mega-batches of ``batch_size * multiplier``,
sort each mega-batch by length (longest first), cut it into batches, and shuffle the order of the batches.
This is the "megabatch" scheme of Hugging Face's ``LengthGroupedSampler``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from alignlab.data.tokenize import IGNORE_INDEX
from alignlab.errors import AlignlabError

__all__ = ["length_grouped_batches", "sequential_batches", "pad_batch"]


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    group_size_multiplier: int = 50,
) -> list[list[int]]:
    """Split ``range(len(lengths))`` into batches of similar lengths.

    Args:
        lengths: the length of every example.
        batch_size: examples per batch; the last batch may be smaller (it is kept).
        seed: with ``epoch``, fixes the order (same seed and epoch, same batches).
        epoch: the epoch number; every epoch gets a different order.
        shuffle: when False, no randomness: indices are grouped in order within mega-batches, sorted by
            length, and batches keep their order.
        group_size_multiplier: a mega-batch holds ``batch_size * group_size_multiplier`` examples.

    Returns:
        A list of batches (lists of indices); every index appears exactly once.
    """
    if batch_size < 1:
        raise AlignlabError(f"batch_size must be positive, found {batch_size}", field="batch_size")
    if group_size_multiplier < 1:
        raise AlignlabError(
            f"group_size_multiplier must be positive, found {group_size_multiplier}",
            field="group_size_multiplier",
        )
    rng = random.Random(f"{seed}:{epoch}")
    indices = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(indices)
    group = batch_size * group_size_multiplier
    batches: list[list[int]] = []
    for start in range(0, len(indices), group):
        # sorted() is stable, so ties keep the (shuffled) order and the result is deterministic.
        mega = sorted(indices[start : start + group], key=lambda i: -lengths[i])
        batches.extend(mega[i : i + batch_size] for i in range(0, len(mega), batch_size))
    if shuffle:
        rng.shuffle(batches)
    return batches


def sequential_batches(count: int, batch_size: int) -> list[list[int]]:
    """``range(count)`` in order, cut into batches (evaluation)."""
    if batch_size < 1:
        raise AlignlabError(f"batch_size must be positive, found {batch_size}", field="batch_size")
    return [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]


def pad_batch(
    examples: Sequence[Any], pad_token_id: int, *, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad examples into tensors.

    Args:
        examples: objects with ``input_ids`` and ``labels`` (e.g. :class:`~alignlab.data.tokenize.
            TokenizedExample`) or mappings with those keys; ``labels`` may be absent (then a copy of
            ``input_ids``).
        pad_token_id: the id written at padding positions of ``input_ids``.
        padding_side: ``"right"`` (training) or ``"left"`` (generation).

    Returns:
        ``input_ids`` ``(b, t)`` long, ``attention_mask`` ``(b, t)`` long (1 on real tokens), ``labels``
        ``(b, t)`` long with ``-100`` at padding.
    """
    if padding_side not in ("right", "left"):
        raise AlignlabError(
            f"padding_side must be 'right' or 'left', found {padding_side!r}", field="padding_side"
        )
    if not examples:
        raise AlignlabError("cannot pad an empty batch", field="examples")
    if pad_token_id is None:
        raise AlignlabError("the tokenizer has no pad token; set tokenizer.pad_token", field="pad_token")
    rows = []
    for example in examples:
        if isinstance(example, dict):
            ids, labels = example["input_ids"], example.get("labels")
        else:
            ids, labels = example.input_ids, getattr(example, "labels", None)
        ids = list(ids)
        labels = list(ids) if labels is None else list(labels)
        if len(labels) != len(ids):
            raise AlignlabError(f"labels ({len(labels)}) and input_ids ({len(ids)}) differ in length")
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels_tensor = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labels) in enumerate(rows):
        n = len(ids)
        if n == 0:
            continue
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
        labels_tensor[row, span] = torch.tensor(labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels_tensor}
