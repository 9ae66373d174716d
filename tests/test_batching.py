"""Length-grouped batches are a deterministic permutation; padding masks labels."""

from __future__ import annotations

import random

import pytest
import torch

from alignlab.data.batching import length_grouped_batches, pad_batch, sequential_batches
from alignlab.data.tokenize import TokenizedExample
from alignlab.errors import AlignlabError


def test_length_grouped_batches_are_a_deterministic_permutation() -> None:
    lengths = [random.Random(0).randint(1, 500) for _ in range(1003)]
    batches = length_grouped_batches(lengths, 8, seed=1, epoch=0, group_size_multiplier=10)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(1003))
    assert sorted(len(b) for b in batches)[0] == 1003 % 8 and sum(len(b) == 8 for b in batches) == 1003 // 8
    assert batches == length_grouped_batches(lengths, 8, seed=1, epoch=0, group_size_multiplier=10)
    assert batches != length_grouped_batches(lengths, 8, seed=1, epoch=1, group_size_multiplier=10)
    assert batches != length_grouped_batches(lengths, 8, seed=2, epoch=0, group_size_multiplier=10)
    # grouping: the spread of lengths inside a batch is much smaller than across the data set
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 60


def test_length_grouped_batches_without_shuffle() -> None:
    assert length_grouped_batches([1, 5, 3, 2, 4], 2, seed=0, epoch=0, shuffle=False) == [[1, 4], [2, 3], [0]]
    assert length_grouped_batches([], 4, seed=0, epoch=0) == []
    with pytest.raises(AlignlabError):
        length_grouped_batches([1], 0, seed=0, epoch=0)
    assert sequential_batches(5, 2) == [[0, 1], [2, 3], [4]]


def test_pad_batch_right_and_left() -> None:
    examples = [TokenizedExample([5, 6, 7], [-100, 6, 7], 1), TokenizedExample([8], [8], 2)]
    batch = pad_batch(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    left = pad_batch(examples, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    plain = pad_batch([{"input_ids": [1, 2]}, {"input_ids": [3]}], pad_token_id=9)
    assert plain["labels"].tolist() == [[1, 2], [3, -100]]
    with pytest.raises(AlignlabError):
        pad_batch([], pad_token_id=0)


def test_max_tokens_cuts_slices_into_as_many_pieces_on_every_process() -> None:
    from alignlab.config import TrainConfig
    from alignlab.train.loop import micro_batches

    lengths = [random.Random(3).randint(10, 300) for _ in range(16)]
    sizes = [2 * n for n in lengths]
    step = list(range(16))
    whole = TrainConfig(grad_accum=2, max_tokens=0)
    assert [len(m) for r in range(2) for m in micro_batches(step, lengths, whole, r, 2, sizes)] == [4] * 4
    cut = TrainConfig(grad_accum=2, max_tokens=600)
    per_rank = [micro_batches(step, lengths, cut, r, 2, sizes) for r in range(2)]
    # the same number of forward passes on both processes, the same examples in all
    assert len(per_rank[0]) == len(per_rank[1]) > 2  # two slices each when whole
    assert sorted(i for pieces in per_rank for piece in pieces for i in piece) == step
    assert all(piece for pieces in per_rank for piece in pieces)
    # each process still takes its own slices, only cut: rank 0 has slices 0 and 2 of the whole plan
    wholes = [micro_batches(step, lengths, whole, r, 2, sizes) for r in range(2)]
    for r in range(2):
        assert sorted(i for piece in per_rank[r] for i in piece) == sorted(i for m in wholes[r] for i in m)
    # pieces are about even in tokens: none holds more than the budget plus its largest example
    biggest = max(sizes)
    assert all(sum(sizes[i] for i in piece) <= 600 + biggest for pieces in per_rank for piece in pieces)
    # never more pieces than examples: one example longer than the budget is a piece of its own
    tight = TrainConfig(grad_accum=1, max_tokens=1)
    assert micro_batches(step[:3], lengths, tight, 0, 1, sizes) == [[i] for i in sorted(step[:3],
                                                                                          key=lambda i: lengths[i])]
