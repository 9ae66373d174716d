"""Reward-model losses (pairs and K-wise rankings) and the metrics used to evaluate a reward model.

Notation: ``b`` prompts in the batch, ``k`` responses per prompt. Rankings are stored best first: response 0
is the most preferred, response ``k - 1`` the least.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from alignlab.losses.common import masked_mean

__all__ = [
    "bradley_terry_loss",
    "kendall_tau",
    "kwise_ranking_loss",
    "pairwise_accuracy",
    "ranking_top1_accuracy",
    "response_mask",
    "reward_centering_term",
]


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Pairwise Bradley-Terry loss of a reward model (Ouyang et al. 2022; margin as in Llama 2, Touvron 2023).

    Intuition: the reward model defines ``P(chosen > rejected) = sigmoid(r_c - r_r)``; minimise the negative
    log-likelihood of the human choices. A margin asks the chosen reward to exceed the rejected one by at
    least that much before the loss relaxes (larger margins for pairs the annotators found clearer).

    Formula: ``loss = -log sigmoid(r_c - r_r - margin)``.

    Args:
        chosen_rewards: ``(b,)`` scalar reward of each chosen response.
        rejected_rewards: ``(b,)`` scalar reward of each rejected response.
        margin: ``(b,)`` or None (no margin).

    Returns:
        ``(b,)`` per-pair losses; the trainer takes the mean.
    """
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits)


def response_mask(
    rewards: torch.Tensor, mask: torch.Tensor | None = None, num_responses: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool ``(b, k)`` mask of the real responses, from either ``mask`` or ``num_responses``.

    Args:
        rewards: ``(b, k)``; gives the shape and device.
        mask: ``(b, k)`` 1 on real responses, or None.
        num_responses: ``(b,)`` number of real responses of each prompt (the first ones), or None.

    Returns:
        ``(b, k)`` bool; all True when neither is given.
    """
    if mask is not None and num_responses is not None:
        raise ValueError("give either mask or num_responses, not both")
    if mask is not None:
        return mask.bool()
    if num_responses is not None:
        positions = torch.arange(rewards.shape[-1], device=rewards.device)
        return positions.unsqueeze(0) < num_responses.to(rewards.device).unsqueeze(-1)
    return torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)


def kwise_ranking_loss(
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    num_responses: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """InstructGPT K-wise ranking loss (Ouyang et al. 2022, eq. 1), one value per prompt.

    Intuition: a ranking of K responses holds ``C(K, 2)`` pairwise preferences. Scoring all K responses in
    one batch and averaging the Bradley-Terry loss over every pair of the same prompt uses each forward pass
    ``K - 1`` times and, by keeping a prompt's pairs together, avoids the overfitting InstructGPT saw when the
    pairs were shuffled into separate batches. Prompts with different K share a batch through ``mask``.

    Formula, for one prompt with real responses ``0..K-1`` best first:
    ``loss = 1 / C(K, 2) * sum_{i < j} -log sigmoid(r_i - r_j - m_ij)`` with ``m_ij = score_i - score_j``
    when ``scores`` are given, else 0.

    Args:
        rewards: ``(b, k)`` reward of each response, responses of a prompt ordered best first.
        mask: ``(b, k)`` 1 on real responses (padding slots may hold any finite value).
        num_responses: ``(b,)`` alternative to ``mask``: the first ``num_responses[i]`` slots are real.
        scores: ``(b, k)`` per-response quality scores (e.g. annotator ratings) giving pair margins, or None.

    Returns:
        ``(b,)`` per-prompt losses; a prompt with fewer than two responses has no pair and loss 0.
    """
    valid = response_mask(rewards, mask, num_responses)
    k = rewards.shape[-1]
    logits = rewards.unsqueeze(-1) - rewards.unsqueeze(-2)  # (b, k, k): logits[., i, j] = r_i - r_j
    if scores is not None:
        logits = logits - (scores.unsqueeze(-1) - scores.unsqueeze(-2))
    # pairs i < j: response i is ranked above response j
    upper = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(diagonal=1)
    pair_mask = upper & valid.unsqueeze(-1) & valid.unsqueeze(-2)
    pair_losses = -F.logsigmoid(logits)
    return masked_mean(pair_losses.flatten(-2), pair_mask.flatten(-2), dim=-1)


def reward_centering_term(
    rewards: torch.Tensor, coef: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Auxiliary loss that keeps rewards centred on zero (Eisenstein et al. 2023, "Helping or Herding").

    Intuition: the Bradley-Terry loss only sees reward differences, so the reward's offset drifts freely;
    a small penalty on the squared rewards pins it near 0, which keeps PPO's rewards and KL on one scale.

    Formula: ``coef * mean(r ** 2)`` over the real entries. TRL's reward trainer applies it to the sum of a
    pair, ``coef * mean((r_c + r_r) ** 2)``: pass ``chosen_rewards + rejected_rewards`` to get that form.

    Args:
        rewards: any shape, e.g. ``(b,)`` or ``(b, k)``.
        coef: weight of the term (TRL suggests 0.01).
        mask: same shape as ``rewards``, 1 on real entries, or None for all.

    Returns:
        A scalar tensor to add to the ranking loss.
    """
    if mask is None:
        return coef * (rewards**2).mean()
    return coef * masked_mean(rewards**2, mask)


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Fraction of pairs whose chosen reward is higher; a tie counts as half right (a coin flip).

    Args:
        chosen_rewards: ``(b,)``.
        rejected_rewards: ``(b,)``.

    Returns:
        A float in [0, 1] (``nan`` for an empty batch).
    """
    if chosen_rewards.numel() == 0:
        return float("nan")
    wins = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
    return wins.mean().item()


def ranking_top1_accuracy(
    rewards: torch.Tensor, mask: torch.Tensor | None = None, num_responses: torch.Tensor | None = None
) -> float:
    """Fraction of prompts whose best response (slot 0) gets a reward strictly above every other real one.

    Args:
        rewards: ``(b, k)`` responses ordered best first.
        mask: ``(b, k)`` 1 on real responses, or None.
        num_responses: ``(b,)`` alternative to ``mask``.

    Returns:
        A float in [0, 1]; prompts with a single response are left out (``nan`` when none is left).
    """
    valid = response_mask(rewards, mask, num_responses)
    others = valid.clone()
    others[:, 0] = False
    beaten = (rewards[:, :1] > rewards) | ~others  # slot 0 beats each other real response
    counted = valid[:, 0] & others.any(dim=-1)
    if not counted.any():
        return float("nan")
    return beaten.all(dim=-1)[counted].float().mean().item()


def kendall_tau(
    pred_scores: Sequence[float] | torch.Tensor, true_order: Sequence[int] | torch.Tensor
) -> float:
    """Kendall's tau-a between the predicted scores of K responses and their true ranking.

    ``tau = (concordant - discordant) / C(K, 2)``: 1 when the scores order the responses exactly as the true
    ranking, -1 when they reverse it, about 0 when unrelated. Tied predicted scores count as neither.

    Args:
        pred_scores: ``(k,)`` predicted score of each response (higher = better).
        true_order: ``(k,)`` response indices from best to worst, e.g. ``[2, 0, 1]`` says response 2 is best.

    Returns:
        A float in [-1, 1] (``nan`` when ``k < 2``).
    """
    if isinstance(pred_scores, torch.Tensor):
        pred_scores = pred_scores.tolist()
    if isinstance(true_order, torch.Tensor):
        true_order = true_order.tolist()
    scores = [float(s) for s in pred_scores]
    order = [int(i) for i in true_order]
    if sorted(order) != list(range(len(scores))):
        raise ValueError(f"true_order {order} is not a permutation of 0..{len(scores) - 1}")
    k = len(order)
    if k < 2:
        return float("nan")
    concordant = discordant = 0
    for a in range(k):
        for b in range(a + 1, k):
            better, worse = scores[order[a]], scores[order[b]]  # order[a] is truly better than order[b]
            if better > worse:
                concordant += 1
            elif better < worse:
                discordant += 1
    return (concordant - discordant) / (k * (k - 1) / 2)
