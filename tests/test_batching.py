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
