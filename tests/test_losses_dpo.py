"""The DPO family against hand computations (TRL cross-checks are in test_losses_vs_trl.py)."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.errors import AlignlabError
from alignlab.losses.dpo import (
    LOSSES,
    PAIRED_LOSSES,
    dpo_loss,
    hinge_loss,
    implicit_rewards,
    ipo_loss,
    kto_kl_reference_point,
    kto_loss,
    orpo_log_odds,
    orpo_loss,
    preference_loss,
    robust_dpo_loss,
    rpo_sft_term,
    simpo_loss,
)


def nls(x: float) -> float:
    """-log sigmoid(x)."""
    return math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Two pairs. Chosen log-ratios (pi - ref): [1, -1]; rejected: [-1, 1]; logits = [2, -2].
POLICY_CHOSEN = torch.tensor([-1.0, -5.0])
POLICY_REJECTED = torch.tensor([-3.0, -2.0])
REFERENCE_CHOSEN = torch.tensor([-2.0, -4.0])
REFERENCE_REJECTED = torch.tensor([-2.0, -3.0])
FOUR = (POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED)


def assert_values(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype))


def test_implicit_rewards_are_beta_log_ratios_and_detached():
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    chosen, rejected = implicit_rewards(
        0.5, policy_chosen, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED
    )
    assert_values(chosen, [0.5, -0.5])
    assert_values(rejected, [-0.5, 0.5])
    assert not chosen.requires_grad
    reference_free, _ = implicit_rewards(2.0, policy_chosen, POLICY_REJECTED)
    assert_values(reference_free, [-2.0, -10.0])


def test_dpo_loss_hand_values_and_rewards():
    losses, chosen_rewards, rejected_rewards = dpo_loss(*FOUR, beta=0.5)
    assert_values(losses, [nls(1.0), nls(-1.0)])
    assert_values(chosen_rewards, [0.5, -0.5])
    assert_values(rejected_rewards, [-0.5, 0.5])


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    policy_rejected = POLICY_REJECTED.clone().requires_grad_()
    losses, chosen_rewards, _ = dpo_loss(
        policy_chosen, policy_rejected, REFERENCE_CHOSEN, REFERENCE_REJECTED, 0.5
    )
    losses.sum().backward()
    # d/d pi_c of -log sigma(beta x) = -beta * sigma(-beta x)
    assert_values(policy_chosen.grad, [-0.5 * sigmoid(-1.0), -0.5 * sigmoid(1.0)])
    assert_values(policy_rejected.grad, [0.5 * sigmoid(-1.0), 0.5 * sigmoid(1.0)])
    assert not chosen_rewards.requires_grad


def test_conservative_dpo_label_smoothing():
    losses, _, _ = dpo_loss(*FOUR, beta=0.5, label_smoothing=0.2)
    assert_values(losses, [0.8 * nls(1.0) + 0.2 * nls(-1.0), 0.8 * nls(-1.0) + 0.2 * nls(1.0)])
    # the cDPO gradient vanishes where sigma(beta x) = 1 - eps, plain DPO's never does
    logits = torch.tensor([math.log(0.8 / 0.2)], requires_grad=True)  # sigma(logits) = 0.8
    zero = torch.zeros(1)
    dpo_loss(logits, zero, zero, zero, beta=1.0, label_smoothing=0.2)[0].sum().backward()
    assert logits.grad.abs().item() < 1e-6


def test_robust_dpo_hand_values_and_unbiasedness():
    eps = 0.2
    losses, _, _ = robust_dpo_loss(*FOUR, beta=0.5, label_smoothing=eps)
    expected = [((1 - eps) * nls(x) - eps * nls(-x)) / (1 - 2 * eps) for x in (1.0, -1.0)]
    assert_values(losses, expected)
    # unbiased: averaged over a label flipped with probability eps, rDPO equals the clean DPO loss
    swapped, _, _ = robust_dpo_loss(
        POLICY_REJECTED, POLICY_CHOSEN, REFERENCE_REJECTED, REFERENCE_CHOSEN, 0.5, eps
    )
    clean, _, _ = dpo_loss(*FOUR, beta=0.5)
    torch.testing.assert_close((1 - eps) * losses + eps * swapped, clean)
    # eps = 0 is DPO
    torch.testing.assert_close(robust_dpo_loss(*FOUR, beta=0.5, label_smoothing=0.0)[0], clean)
    with pytest.raises(AlignlabError):
        robust_dpo_loss(*FOUR, beta=0.5, label_smoothing=0.5)


def test_ipo_loss_summed_and_length_averaged():
    losses, chosen_rewards, _ = ipo_loss(*FOUR, beta=0.5)  # target 1 / (2 * 0.5) = 1
    assert_values(losses, [(2.0 - 1.0) ** 2, (-2.0 - 1.0) ** 2])
    # averaged: chosen log-ratios [1/2, -1/1], rejected [-1/1, 1/4]
    averaged, averaged_rewards, _ = ipo_loss(
        *FOUR, beta=0.5, chosen_lengths=torch.tensor([2, 1]), rejected_lengths=torch.tensor([1, 4])
    )
    assert_values(averaged, [(0.5 + 1.0 - 1.0) ** 2, (-1.0 - 0.25 - 1.0) ** 2])
    torch.testing.assert_close(averaged_rewards, chosen_rewards)  # rewards stay on summed log-probs
    with pytest.raises(ValueError):
        ipo_loss(*FOUR, beta=0.5, chosen_lengths=torch.tensor([2, 1]))


def test_ipo_is_minimised_at_the_target_margin():
    margin = torch.tensor([0.0], requires_grad=True)
    zero = torch.zeros(1)
    ipo_loss(margin + 1 / (2 * 0.25), zero, zero, zero, beta=0.25)[0].sum().backward()
    assert margin.grad.item() == 0.0


def test_hinge_loss_inside_and_outside_the_margin():
    losses, _, _ = hinge_loss(*FOUR, beta=0.5)  # beta * logits = [1, -1]
    assert_values(losses, [0.0, 2.0])
    logits = torch.tensor([3.0, 1.0], requires_grad=True)  # beta * logits = [1.5, 0.5]
    zero = torch.zeros(2)
    losses, _, _ = hinge_loss(logits, zero, zero, zero, beta=0.5)
    assert_values(losses, [0.0, 0.5])
    losses.sum().backward()
    assert_values(logits.grad, [0.0, -0.5])  # satisfied pair gets no gradient


def test_simpo_loss_hand_values():
    chosen_avg = torch.tensor([-0.5, -1.0])
    rejected_avg = torch.tensor([-1.0, -0.5])
    losses, chosen_rewards, rejected_rewards = simpo_loss(chosen_avg, rejected_avg, beta=2.0, gamma=1.0)
    assert_values(losses, [math.log(2.0), nls(-2.0)])  # x = 2 * 0.5 - 1 = 0; 2 * -0.5 - 1 = -2
    assert_values(chosen_rewards, [-1.0, -2.0])
    assert_values(rejected_rewards, [-2.0, -1.0])
    smoothed, _, _ = simpo_loss(chosen_avg, rejected_avg, beta=2.0, gamma=1.0, label_smoothing=0.1)
    assert_values(smoothed, [math.log(2.0), 0.9 * nls(-2.0) + 0.1 * nls(2.0)])


def test_orpo_loss_hand_values():
    chosen_avg = torch.tensor([math.log(0.5)])  # odds 1
    rejected_avg = torch.tensor([math.log(0.2)])  # odds 1/4
    assert orpo_log_odds(chosen_avg, rejected_avg).item() == pytest.approx(math.log(4.0))
    losses, chosen_rewards, _ = orpo_loss(chosen_avg, rejected_avg, beta=0.1)
    assert losses.item() == pytest.approx(-0.1 * math.log(0.8))  # -beta * log sigma(log 4) = -beta * log(4/5)
    assert chosen_rewards.item() == pytest.approx(0.1 * math.log(0.5))


def test_orpo_log_odds_is_stable_near_probability_one():
    chosen_avg = torch.tensor([-1e-9, -1e-3, -0.6931, -0.6932, -30.0], dtype=torch.float32)
    rejected_avg = torch.full_like(chosen_avg, math.log(0.5))
    log_odds = orpo_log_odds(chosen_avg, rejected_avg)
    assert torch.isfinite(log_odds).all()

    def log_odds_by_hand(avg_logp: float) -> float:  # log(p / (1 - p))
        return avg_logp - math.log(-math.expm1(avg_logp))

    rejected = rejected_avg[0].item()
    for value, got in zip(chosen_avg.tolist(), log_odds.tolist()):
        expected = log_odds_by_hand(value) - log_odds_by_hand(rejected)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_kto_loss_hand_values():
    # desirable log-ratio 1; undesirable log-ratios -1 and 1; z0 = 0.5
    losses, chosen_rewards, rejected_rewards = kto_loss(
        torch.tensor([-1.0]),
        torch.tensor([-3.0, -1.0]),
        torch.tensor([-2.0]),
        torch.tensor([-2.0, -2.0]),
        kl_reference_point=torch.tensor(0.5),
        beta=2.0,
        desirable_weight=1.5,
        undesirable_weight=0.5,
    )
    expected = [
        1.5 * (1 - sigmoid(2.0 * 0.5)),
        0.5 * (1 - sigmoid(2.0 * 1.5)),
        0.5 * (1 - sigmoid(2.0 * -0.5)),
    ]
    assert_values(losses, expected)
    assert_values(chosen_rewards, [2.0])
    assert_values(rejected_rewards, [-2.0, 2.0])


def test_kto_loss_with_only_undesirable_examples():
    empty = torch.zeros(0)
    losses, chosen_rewards, _ = kto_loss(
        empty, torch.tensor([-1.0]), empty, torch.tensor([-1.0]), 0.0, beta=1.0
    )
    assert_values(losses, [0.5])  # 1 - sigma(0)
    assert chosen_rewards.numel() == 0


def test_kto_kl_reference_point():
    assert kto_kl_reference_point(torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -3.0])).item() == 1.5
    assert kto_kl_reference_point(torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0])).item() == 0.0
    policy = torch.tensor([-5.0, -5.0], requires_grad=True)
    point = kto_kl_reference_point(policy, torch.tensor([-1.0, -1.0]))  # mean -4 -> clamped
    assert point.item() == 0.0
    assert not point.requires_grad


def test_rpo_sft_term():
    token_logps = torch.tensor([[-1.0, -2.0], [-3.0, -50.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert rpo_sft_term(token_logps, mask, alpha=0.5).item() == pytest.approx(0.5 * 6 / 3)
    assert rpo_sft_term(token_logps, mask, alpha=1.0, num_items=12).item() == pytest.approx(0.5)


def test_registry_names():
    assert set(LOSSES) == {"dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo", "kto"}
    assert set(PAIRED_LOSSES) == set(LOSSES) - {"kto"}


@pytest.mark.parametrize("name", PAIRED_LOSSES)
def test_preference_loss_dispatches_to_the_right_function(name):
    chosen_lengths = torch.tensor([2, 4])
    rejected_lengths = torch.tensor([1, 5])
    result = preference_loss(
        name, *FOUR, chosen_lengths, rejected_lengths, beta=0.5, label_smoothing=0.1, simpo_gamma=0.3
    )
    chosen_avg = POLICY_CHOSEN / chosen_lengths
    rejected_avg = POLICY_REJECTED / rejected_lengths
    expected = {
        "dpo": lambda: dpo_loss(*FOUR, 0.5, 0.1),
        "cdpo": lambda: dpo_loss(*FOUR, 0.5, 0.1),
        "robust": lambda: robust_dpo_loss(*FOUR, 0.5, 0.1),
        "ipo": lambda: ipo_loss(*FOUR, 0.5, chosen_lengths, rejected_lengths),
        "hinge": lambda: hinge_loss(*FOUR, 0.5),
        "simpo": lambda: simpo_loss(chosen_avg, rejected_avg, 0.5, 0.3, 0.1),
        "orpo": lambda: orpo_loss(chosen_avg, rejected_avg, 0.5),
    }[name]()
    for got, want in zip(result, expected):
        torch.testing.assert_close(got, want)


def test_preference_loss_errors():
    with pytest.raises(AlignlabError, match="kto_loss"):
        preference_loss("kto", *FOUR)
    with pytest.raises(AlignlabError, match="unknown"):
        preference_loss("dop", *FOUR)
    with pytest.raises(AlignlabError, match="reference"):
        preference_loss("dpo", POLICY_CHOSEN, POLICY_REJECTED)
    with pytest.raises(AlignlabError, match="lengths"):
        preference_loss("ipo", *FOUR)
    with pytest.raises(AlignlabError, match="label_smoothing"):
        preference_loss("cdpo", *FOUR, label_smoothing=0.0)
