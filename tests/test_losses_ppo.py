"""PPO pieces against hand computations: KL estimators, GAE, clipped losses, entropy, KL controllers."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.errors import AlignlabError
from alignlab.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    ppo_policy_loss,
    ppo_value_loss,
)

NAN = float("nan")

# ---------------------------------------------------------------- KL penalty


def test_kl_estimators_hand_values():
    logps = torch.tensor([[-1.0, -2.0, -0.5]])
    ref_logps = torch.tensor([[-2.0, -1.0, -0.5]])
    torch.testing.assert_close(kl_penalty(logps, ref_logps, "k1"), torch.tensor([[1.0, -1.0, 0.0]]))
    # k3 = (r - 1) - log r with r = exp(ref - logp): r = e^-1, e^1, 1
    k3 = [(math.exp(-1) - 1) + 1, (math.e - 1) - 1, 0.0]
    torch.testing.assert_close(kl_penalty(logps, ref_logps, "k3"), torch.tensor([k3]))
    torch.testing.assert_close(kl_penalty(logps, ref_logps, "abs"), torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(kl_penalty(logps, ref_logps, "mse"), torch.tensor([[0.5, 0.5, 0.0]]))
    with pytest.raises(AlignlabError):
        kl_penalty(logps, ref_logps, "k2")  # type: ignore[arg-type]


def test_k1_and_k3_are_unbiased_estimates_of_the_kl():
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    logps, ref_logps = p.log()[tokens], q.log()[tokens]
    k1 = kl_penalty(logps, ref_logps, "k1")
    k3 = kl_penalty(logps, ref_logps, "k3")
    assert k1.mean().item() == pytest.approx(exact, abs=0.01)
    assert k3.mean().item() == pytest.approx(exact, abs=0.01)
    assert (k3 >= 0).all() and (k1 < 0).any()  # k3 is never negative, k1 is on some tokens
    assert k3.var().item() < k1.var().item()


# ---------------------------------------------------------------- GAE


def gae_by_hand(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list, list]:
    """The textbook reverse loop over one episode (only its real tokens)."""
    advantages = [0.0] * len(rewards)
    last = 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    return advantages, [a + v for a, v in zip(advantages, values)]


def test_gae_small_hand_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0, NAN]])
    values = torch.tensor([[0.5, 0.5, 0.5, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=2: delta = 1 - 0.5 = 0.5; t=1: delta = 0.9 * 0.5 - 0.5 = -0.05, A = -0.05 + 0.45 * 0.5 = 0.175
    # t=0: delta = -0.05, A = -0.05 + 0.45 * 0.175 = 0.02875
    torch.testing.assert_close(advantages, torch.tensor([[0.02875, 0.175, 0.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.52875, 0.675, 1.0, 0.0]]))


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9), (0.8, 1.0), (1.0, 0.0)])
def test_gae_matches_reverse_loop_on_ragged_batch(gamma, lam):
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 2, 7, 1]
    rewards = torch.randn(4, 7, generator=generator, dtype=torch.float64)
    values = torch.randn(4, 7, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    rewards_padded = rewards.masked_fill(mask == 0, NAN)  # padding must not leak, even as nan
    values_padded = values.masked_fill(mask == 0, 1e6)
    advantages, returns = compute_gae(rewards_padded, values_padded, mask, gamma, lam)
    for i, n in enumerate(lengths):
        expected_advantages, expected_returns = gae_by_hand(
            rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam
        )
        assert advantages[i, :n].tolist() == pytest.approx(expected_advantages)
        assert returns[i, :n].tolist() == pytest.approx(expected_returns)
        assert advantages[i, n:].tolist() == [0.0] * (7 - n)
        assert returns[i, n:].tolist() == [0.0] * (7 - n)


def test_gae_with_gamma_and_lambda_one_gives_reward_to_go():
    generator = torch.Generator().manual_seed(2)
    lengths = [4, 1, 3]
    rewards = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    values = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1] * n + [0] * (4 - n) for n in lengths])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert not advantages.requires_grad and not returns.requires_grad
    for i, n in enumerate(lengths):
        row = rewards[i, :n].tolist()
        reward_to_go = [sum(row[t:]) for t in range(n)]
        assert returns[i, :n].tolist() == pytest.approx(reward_to_go)
        assert advantages[i, :n].tolist() == pytest.approx(
            [g - v for g, v in zip(reward_to_go, values[i, :n].tolist())]
        )


# ---------------------------------------------------------------- clipped policy loss


def test_policy_loss_at_points_inside_and_outside_the_clip_range():
    # clip 0.2: cases (advantage, ratio) -> per-token loss max(-A r, -A clip(r))
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, 5.0]])
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])  # the last token is padding
    old_logps = torch.tensor([[-1.0, -2.0, -3.0, -1.5, -0.5, -1.0]])
    logps = (old_logps + ratios.log()).requires_grad_()
    out = ppo_policy_loss(logps, old_logps, advantages, mask, clip_range=0.2)
    per_token = [
        -1.2,  # A > 0, ratio above 1 + eps: clipped, -1.2 > -1.5
        -0.5,  # A > 0, ratio below 1 - eps: unclipped is the larger (pessimistic) term
        1.5,  # A < 0, ratio above: unclipped 1.5 > clipped 1.2
        0.8,  # A < 0, ratio below 1 - eps: clipped 0.8 > 0.5
        -1.1,  # inside the range: both equal
    ]
    assert out.loss.item() == pytest.approx(sum(per_token) / 5)
    assert out.clip_fraction.item() == pytest.approx(2 / 5)
    log_ratios = ratios.log()[0, :5].tolist()
    assert out.approx_kl.item() == pytest.approx(0.5 * sum(x * x for x in log_ratios) / 5)
    assert out.approx_kl_k3.item() == pytest.approx(sum(math.expm1(x) - x for x in log_ratios) / 5)
    out.loss.backward()
    # d/dlogp of -A * ratio = -A * ratio / n where unclipped is active; 0 where the clipped term is
    expected_grad = [0.0, -0.5 / 5, 1.5 / 5, 0.0, -1.1 / 5, 0.0]
    assert logps.grad[0].tolist() == pytest.approx(expected_grad)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    advantages = torch.tensor([[0.5, -1.5, 4.0]])
    mask = torch.tensor([[1, 1, 0]])
    out = ppo_policy_loss(logps, logps.clone(), advantages, mask)
    assert out.loss.item() == pytest.approx(0.5)  # -(0.5 - 1.5) / 2
    assert out.clip_fraction.item() == 0.0 and out.approx_kl.item() == 0.0


# ---------------------------------------------------------------- clipped value loss


def test_value_loss_at_points_inside_and_outside_the_clip_range():
    old_values = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.1, -0.5, 1.5, 42.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = ppo_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    per_token = [
        0.64,  # moved 0.5 towards the target, clipped to 0.2: (0.2 - 1)^2 = 0.64 > 0.25
        0.81,  # inside the range: both (0.1 - 1)^2
        2.25,  # moved away from the target: unclipped (-1.5)^2 > clipped (-1.2)^2
        2.25,  # old 1, moved +0.5 away from target 0: unclipped 2.25 > clipped 1.44
    ]
    assert out.loss.item() == pytest.approx(0.5 * sum(per_token) / 4)
    assert out.clip_fraction.item() == pytest.approx(1 / 4)
    out.loss.backward()
    expected_grad = [0.0, 0.5 * 2 * (0.1 - 1) / 4, 0.5 * 2 * (-0.5 - 1) / 4, 0.5 * 2 * 1.5 / 4, 0.0]
    assert values.grad[0].tolist() == pytest.approx(expected_grad)
    unclipped = ppo_value_loss(values, old_values, returns, mask, clip_range_value=None)
    assert unclipped.loss.item() == pytest.approx(0.5 * (0.25 + 0.81 + 2.25 + 2.25) / 4)
    assert unclipped.clip_fraction.item() == 0.0


# ---------------------------------------------------------------- entropy, explained variance


def test_entropy_hand_values_mask_and_chunks():
    logits = torch.tensor(
        [
            [[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf]],
            [[50.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]],
        ]
    )
    mask = torch.tensor([[1, 1], [1, 0]])
    entropy = entropy_from_logits(logits, mask, chunk_size=1)
    expected = [[math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))], [0.0, 0.0]]
    torch.testing.assert_close(entropy, torch.tensor(expected), atol=1e-6, rtol=1e-6)
    # -inf logits (filtered tokens) give finite gradients too
    logits.requires_grad_()
    entropy_from_logits(logits, mask).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_matches_full_softmax_formula_with_gradients():
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 4, 9, generator=generator) * 3).requires_grad_()
    naive = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    chunked = entropy_from_logits(logits, chunk_size=5)
    torch.testing.assert_close(chunked, naive)
    (naive_grad,) = torch.autograd.grad(naive.sum(), logits)
    (chunked_grad,) = torch.autograd.grad(chunked.sum(), logits)
    torch.testing.assert_close(chunked_grad, naive_grad)
    bf16 = entropy_from_logits(logits.detach().bfloat16())
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, naive.detach(), atol=0.05, rtol=0.02)


def test_explained_variance():
    targets = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(targets, targets) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), targets) == pytest.approx(0.0)
    # residuals [0, 0, 0, 1]: var 0.1875; var(targets) 1.25
    assert explained_variance(torch.tensor([1.0, 2.0, 3.0, 3.0]), targets) == pytest.approx(1 - 0.1875 / 1.25)
    padded_targets = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, -99.0]])
    padded_predictions = torch.tensor([[1.0, 2.0, 0.0], [3.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert explained_variance(padded_predictions, padded_targets, mask) == pytest.approx(1 - 0.1875 / 1.25)
    assert math.isnan(explained_variance(targets, torch.ones(4)))


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_follows_ziegler():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    assert controller.value == 0.2
    # far above target: error clipped to +0.2
    assert controller.update(current_kl=12.0, n_steps=256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10_000))
    # slightly above: proportional error 0.1
    before = controller.value
    assert controller.update(current_kl=6.6, n_steps=256) == pytest.approx(before * (1 + 0.1 * 256 / 10_000))
    # below target: error clipped to -0.2, the coefficient falls
    before = controller.value
    assert controller.update(current_kl=0.0, n_steps=1000) == pytest.approx(
        before * (1 - 0.2 * 1000 / 10_000)
    )
    # at target: unchanged
    before = controller.value
    assert controller.update(current_kl=6.0, n_steps=1000) == pytest.approx(before)


def test_adaptive_kl_controller_moves_in_the_right_direction():
    high = AdaptiveKLController(0.1, target=1.0, horizon=100)
    low = AdaptiveKLController(0.1, target=1.0, horizon=100)
    high_values, low_values = [], []
    for _ in range(5):
        high_values.append(high.update(3.0, n_steps=10))
        low_values.append(low.update(0.5, n_steps=10))
    assert all(b > a for a, b in zip([0.1] + high_values, high_values))
    assert all(b < a for a, b in zip([0.1] + low_values, low_values))


def test_fixed_kl_controller():
    controller = FixedKLController(0.05)
    assert controller.update(100.0, 1000) == 0.05
    assert controller.value == 0.05
