"""Masked reductions, log-prob helpers, the SFT loss and the reward-model losses against hand computations."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch

from alignlab.losses.common import (
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    row_chunks,
    selective_log_softmax,
    sequence_logps,
)
from alignlab.losses.reward_model import (
    bradley_terry_loss,
    kendall_tau,
    kwise_ranking_loss,
    pairwise_accuracy,
    ranking_top1_accuracy,
    response_mask,
    reward_centering_term,
)
from alignlab.losses.sft import sft_loss

NAN, INF = float("nan"), float("inf")


def neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


# ---------------------------------------------------------------- masked reductions

VALUES = torch.tensor([[1.0, 2.0, NAN], [4.0, INF, -INF]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_and_mean_ignore_padding_even_nan():
    assert masked_sum(VALUES, MASK).item() == 7.0
    assert masked_sum(VALUES, MASK, dim=-1).tolist() == [3.0, 4.0]
    assert masked_mean(VALUES, MASK).item() == pytest.approx(7 / 3)
    assert masked_mean(VALUES, MASK, dim=-1).tolist() == [1.5, 4.0]
    assert masked_mean(VALUES, MASK.bool(), dim=0).tolist() == [2.5, 2.0, 0.0]  # bool mask; empty column -> 0


def test_masked_mean_of_empty_row_is_zero_not_nan():
    values = torch.tensor([[1.0, 2.0], [5.0, 6.0]])
    mask = torch.tensor([[0, 0], [1, 1]])
    assert masked_mean(values, mask, dim=1).tolist() == [0.0, 5.5]


def test_masked_var_biased_and_unbiased():
    values = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert masked_var(values, mask).item() == pytest.approx(statistics.variance([1, 2, 3]))  # 1.0
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(statistics.pvariance([1, 2, 3]))


def test_masked_whiten_uses_only_real_tokens_and_zeroes_padding():
    values = torch.tensor([[2.0, 4.0, 1000.0], [6.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # real tokens 2, 4, 6: mean 4, unbiased std 2
    whitened = masked_whiten(values, mask)
    torch.testing.assert_close(whitened, torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    # shift_mean=False rescales but keeps the mean: (x - 4) / 2 + 4
    kept = masked_whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(kept, torch.tensor([[3.0, 4.0, 0.0], [5.0, 0.0, 0.0]]))
    # changing a padded value changes nothing
    values[0, 2] = -1e6
    torch.testing.assert_close(masked_whiten(values, mask), whitened)


def test_masked_whiten_matches_plain_python_statistics_on_ragged_batch():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    lengths = [6, 2, 4, 1]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    real = [values[i, j].item() for i, n in enumerate(lengths) for j in range(n)]
    mean, std = statistics.mean(real), statistics.stdev(real)
    whitened = masked_whiten(values, mask)
    for i, n in enumerate(lengths):
        for j in range(6):
            expected = (values[i, j].item() - mean) / std if j < n else 0.0
            assert whitened[i, j].item() == pytest.approx(expected, abs=1e-7)


# ---------------------------------------------------------------- log-probs


def test_selective_log_softmax_hand_values():
    logits = torch.tensor(
        [[[0.0, math.log(3.0)], [math.log(2.0), math.log(2.0)]]]
    )  # softmax (1/4, 3/4), (1/2, 1/2)
    index = torch.tensor([[1, 0]])
    result = selective_log_softmax(logits, index)
    assert result.shape == (1, 2)
    torch.testing.assert_close(result, torch.tensor([[math.log(0.75), math.log(0.5)]]))


@pytest.mark.parametrize("chunk_size", [1, 4, 256])
def test_selective_log_softmax_equals_log_softmax_gather_fp32(chunk_size):
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 5, 17, generator=generator) * 5).requires_grad_()
    index = torch.randint(0, 17, (3, 5), generator=generator)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    actual = selective_log_softmax(logits, index, chunk_size=chunk_size)
    torch.testing.assert_close(actual, expected)
    # same gradient too
    weights = torch.randn(3, 5, generator=generator)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    (actual_grad,) = torch.autograd.grad((actual * weights).sum(), logits)
    torch.testing.assert_close(actual_grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_log_softmax_equals_log_softmax_gather_half(dtype):
    generator = torch.Generator().manual_seed(2)
    logits32 = (
        torch.randn(2, 7, 33, generator=generator) * 8 + 40
    )  # large offset: logsumexp would lose digits
    logits = logits32.to(dtype)
    index = torch.randint(0, 33, (2, 7), generator=generator)
    actual = selective_log_softmax(logits, index, chunk_size=3)
    assert actual.dtype == torch.float32  # normalised in float32, not rounded back to half precision
    # the float32 truth of the same (rounded) logits, to float32 precision
    truth = torch.log_softmax(logits.float(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(actual, truth)


def test_selective_log_softmax_on_shifted_non_contiguous_logits():
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 6, 10, generator=generator)[:, :-1]  # the usual shift: not contiguous
    index = torch.randint(0, 10, (2, 6), generator=generator)[:, 1:]
    assert not logits.is_contiguous()
    expected = torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index, chunk_size=3), expected)
    flat = torch.randn(7, 10, generator=generator)  # (n, v) with index (n,) works too
    flat_index = torch.randint(0, 10, (7,), generator=generator)
    torch.testing.assert_close(
        selective_log_softmax(flat, flat_index, chunk_size=2),
        torch.log_softmax(flat, -1)[torch.arange(7), flat_index],
    )


def test_row_chunks_are_views_in_row_major_order():
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)[:, :-1]
    chunks = list(row_chunks(logits, 3))
    assert [tuple(c.shape) for c in chunks] == [(3, 3), (1, 3), (3, 3), (1, 3)]
    assert all(c.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr() for c in chunks)
    torch.testing.assert_close(torch.cat(chunks), logits.reshape(-1, 3))


def test_selective_log_softmax_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        selective_log_softmax(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_sequence_logps_sum_and_average():
    token_logps = torch.tensor([[-1.0, -2.0, NAN], [-3.0, -9.0, -9.0], [-5.0, -5.0, -5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert sequence_logps(token_logps, mask).tolist() == [-3.0, -3.0, 0.0]
    assert sequence_logps(token_logps, mask, average=True).tolist() == [-1.5, -3.0, 0.0]


# ---------------------------------------------------------------- SFT


def test_sft_loss_hand_values():
    token_logps = torch.tensor([[-1.0, -2.0, -100.0], [-3.0, -100.0, -100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sft_loss(token_logps, mask).item() == pytest.approx(6 / 3)
    assert sft_loss(token_logps, mask, num_items=6).item() == pytest.approx(1.0)
    assert sft_loss(token_logps, mask, num_items=torch.tensor(12)).item() == pytest.approx(0.5)


def test_sft_loss_with_global_num_items_makes_accumulation_equal_one_big_batch():
    generator = torch.Generator().manual_seed(3)
    token_logps = -torch.rand(4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    full = sft_loss(token_logps, mask)
    (full_grad,) = torch.autograd.grad(full, token_logps)
    total_tokens = int(mask.sum())
    accumulated = sft_loss(token_logps[:2], mask[:2], total_tokens) + sft_loss(
        token_logps[2:], mask[2:], total_tokens
    )
    (accumulated_grad,) = torch.autograd.grad(accumulated, token_logps)
    torch.testing.assert_close(accumulated, full)
    torch.testing.assert_close(accumulated_grad, full_grad)
    # averaging per micro-batch instead weighs tokens differently: this is what num_items fixes
    naive = (sft_loss(token_logps[:2], mask[:2]) + sft_loss(token_logps[2:], mask[2:])) / 2
    assert abs(naive.item() - full.item()) > 1e-3


# ---------------------------------------------------------------- reward model


def test_bradley_terry_hand_values_with_and_without_margin():
    chosen = torch.tensor([1.0, 0.0, -2.0])
    rejected = torch.tensor([0.0, 0.0, 1.0])
    expected = [neg_log_sigmoid(1.0), math.log(2.0), neg_log_sigmoid(-3.0)]
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), torch.tensor(expected))
    margin = torch.tensor([0.5, -1.0, 0.0])
    expected = [neg_log_sigmoid(0.5), neg_log_sigmoid(1.0), neg_log_sigmoid(-3.0)]
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin), torch.tensor(expected))


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.3], requires_grad=True)
    rejected = torch.tensor([0.1], requires_grad=True)
    bradley_terry_loss(chosen, rejected).sum().backward()
    sigma = 1 / (1 + math.exp(-0.2))
    assert chosen.grad.item() == pytest.approx(-(1 - sigma))
    assert rejected.grad.item() == pytest.approx(1 - sigma)


def test_kwise_loss_is_mean_of_its_pairwise_losses():
    generator = torch.Generator().manual_seed(4)
    rewards = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    losses = kwise_ranking_loss(rewards)
    assert losses.shape == (3,)
    for prompt in range(3):
        r = rewards[prompt].tolist()
        pairs = list(itertools.combinations(range(4), 2))  # (i, j), i better than j
        by_hand = sum(neg_log_sigmoid(r[i] - r[j]) for i, j in pairs) / len(pairs)
        assert losses[prompt].item() == pytest.approx(by_hand)
        chosen = torch.tensor([r[i] for i, _ in pairs], dtype=torch.float64)
        rejected = torch.tensor([r[j] for _, j in pairs], dtype=torch.float64)
        assert losses[prompt].item() == pytest.approx(bradley_terry_loss(chosen, rejected).mean().item())


def test_kwise_loss_with_two_responses_is_bradley_terry():
    rewards = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])
    torch.testing.assert_close(kwise_ranking_loss(rewards), bradley_terry_loss(rewards[:, 0], rewards[:, 1]))


def test_kwise_loss_mixed_k_in_one_batch():
    generator = torch.Generator().manual_seed(5)
    rewards = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    num_responses = torch.tensor([4, 2, 3, 1])
    padded = rewards.clone()
    for prompt, k in enumerate(num_responses.tolist()):
        padded[prompt, k:] = 1e4  # padding slots hold junk that would dominate if it leaked in
    by_count = kwise_ranking_loss(padded, num_responses=num_responses)
    mask = response_mask(padded, num_responses=num_responses)
    by_mask = kwise_ranking_loss(padded, mask=mask.long())
    torch.testing.assert_close(by_count, by_mask)
    for prompt, k in enumerate(num_responses.tolist()):
        if k < 2:
            assert by_count[prompt].item() == 0.0  # no pair
            continue
        alone = kwise_ranking_loss(rewards[prompt : prompt + 1, :k])
        assert by_count[prompt].item() == pytest.approx(alone.item())
    # gradients reach only the real responses
    padded.requires_grad_()
    kwise_ranking_loss(padded, num_responses=num_responses).sum().backward()
    assert torch.all(padded.grad[~mask] == 0)
    assert torch.all(padded.grad[mask][:-1] != 0)  # all real responses but the single one of prompt 3


def test_kwise_loss_margins_from_scores():
    rewards = torch.tensor([[3.0, 1.0, 0.0]])
    scores = torch.tensor([[7.0, 5.0, 4.5]])  # margins: (0,1) 2, (0,2) 2.5, (1,2) 0.5
    expected = (neg_log_sigmoid(2.0 - 2.0) + neg_log_sigmoid(3.0 - 2.5) + neg_log_sigmoid(1.0 - 0.5)) / 3
    assert kwise_ranking_loss(rewards, scores=scores).item() == pytest.approx(expected)
    # and the margin form of one pair is bradley_terry_loss with that margin
    pair = kwise_ranking_loss(rewards[:, :2], scores=scores[:, :2])
    torch.testing.assert_close(pair, bradley_terry_loss(rewards[:, 0], rewards[:, 1], torch.tensor([2.0])))


def test_response_mask_rejects_both_forms():
    with pytest.raises(ValueError):
        response_mask(torch.zeros(1, 2), mask=torch.ones(1, 2), num_responses=torch.tensor([2]))


def test_reward_centering_term():
    rewards = torch.tensor([1.0, 2.0, 3.0])
    assert reward_centering_term(rewards, 0.1).item() == pytest.approx(0.1 * 14 / 3)
    grid = torch.tensor([[1.0, 2.0], [3.0, 50.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert reward_centering_term(grid, 0.01, mask).item() == pytest.approx(0.01 * 14 / 3)
    # its gradient pulls rewards towards 0: 2 * coef * r / n
    rewards.requires_grad_()
    reward_centering_term(rewards, 0.3).backward()
    torch.testing.assert_close(rewards.grad, torch.tensor([0.2, 0.4, 0.6]))


def test_pairwise_accuracy_counts_ties_as_half():
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([0.0, 2.0, 4.0, 1.0])) == 0.625
    assert math.isnan(pairwise_accuracy(torch.tensor([]), torch.tensor([])))


def test_ranking_top1_accuracy():
    rewards = torch.tensor(
        [
            [5.0, 1.0, 2.0],  # best first: right
            [1.0, 3.0, 0.0],  # wrong
            [2.0, 2.0, 0.0],  # tie with the best: not strictly above, wrong
            [1.0, 9.0, 9.0],  # only one real response: not counted
            [3.0, 0.0, 99.0],  # two real responses, padding 99 ignored: right
        ]
    )
    num_responses = torch.tensor([3, 3, 3, 1, 2])
    assert ranking_top1_accuracy(rewards, num_responses=num_responses) == pytest.approx(2 / 4)


def test_kendall_tau():
    assert kendall_tau([3.0, 2.0, 1.0], [0, 1, 2]) == 1.0
    assert kendall_tau([1.0, 2.0, 3.0], [0, 1, 2]) == -1.0
    # pairs (0,1) concordant, (0,2) concordant, (1,2) discordant
    assert kendall_tau(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0, 1, 2])) == pytest.approx(1 / 3)
    # true order lists response 2 as best: scores agree perfectly
    assert kendall_tau([0.5, 0.1, 0.9], [2, 0, 1]) == 1.0
    # a tied pair counts as neither: (0,1) tie, (0,2) and (1,2) concordant
    assert kendall_tau([1.0, 1.0, 0.0], [0, 1, 2]) == pytest.approx(2 / 3)
    assert math.isnan(kendall_tau([1.0], [0]))
    with pytest.raises(ValueError):
        kendall_tau([1.0, 2.0], [0, 0])
