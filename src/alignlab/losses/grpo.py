"""Critic-free policy gradients for language models: GRPO, Dr. GRPO, RLOO, REINFORCE++ and DAPO's fixes.

No value model: the baseline that turns a reward into an advantage comes from the other responses to the same
prompt (a *group* of ``k`` samples), or from the batch. Notation: ``b`` responses in the rollout, listed group
by group (``b = g * k``, rows ``[j*k, (j+1)*k)`` answer prompt ``j``); ``t`` response tokens; ``mask`` is 1 on
response tokens (left-aligned, as in :mod:`alignlab.losses.ppo`).

References: Shao et al. 2024 (DeepSeekMath, GRPO); Liu et al. 2025 (Dr. GRPO, "Understanding R1-Zero-Like
Training"); Ahmadian et al. 2024 (RLOO, "Back to Basics"); Hu 2025 (REINFORCE++); Yu et al. 2025 (DAPO:
clip-higher, dynamic sampling, token-level loss, overlong handling); Yao et al. 2025 (truncated importance
sampling for the sampler/trainer mismatch). TRL's ``GRPOTrainer`` and ``RLOOTrainer`` compute the same
quantities (tests/test_grpo.py checks them against TRL's own expressions).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from alignlab.errors import AlignlabError
from alignlab.losses.common import masked_mean, masked_sum, masked_whiten

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "GRPOLossOutput",
    "aggregate_loss",
    "equal_reward_groups",
    "group_advantages",
    "grpo_policy_loss",
    "reinforce_pp_advantages",
    "truncated_importance_weights",
]

AdvantageEstimator = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
Aggregation = Literal["token_mean", "sequence_mean", "constant"]
LOSS_AGGREGATIONS: tuple[str, ...] = ("token_mean", "sequence_mean", "constant")
STD_EPS = 1e-4  # added to a standard deviation before dividing by it (TRL's value)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise AlignlabError(f"{rewards.numel()} rewards do not split into groups of {group_size}",
                            field="group_size")
    return rewards.view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: AdvantageEstimator = "grpo",
                     eps: float = STD_EPS) -> torch.Tensor:
    """One advantage per response from its group's rewards.

    With ``r_i`` the reward of response ``i`` and ``mean_g``, ``std_g`` its group's mean and (unbiased)
    standard deviation over the ``k`` responses:

    - ``grpo``: ``A_i = (r_i - mean_g) / (std_g + eps)`` (DeepSeekMath);
    - ``dr_grpo``: ``A_i = r_i - mean_g``: no division by ``std_g``, which up-weights groups that are almost all
      right or all wrong (Liu et al. 2025);
    - ``rloo``: ``A_i = r_i - (sum_g - r_i) / (k - 1)``, the mean of the *other* responses: an unbiased
      baseline (Ahmadian et al. 2024); equals ``k / (k - 1) * (r_i - mean_g)``.

    Args:
        rewards: ``(b,)`` scalar rewards, group by group (``b`` a multiple of ``group_size``).
        group_size: ``k >= 2`` (a baseline needs another sample).
        estimator: ``grpo``, ``dr_grpo`` or ``rloo`` (``reinforce_pp``: :func:`reinforce_pp_advantages`).
        eps: added to ``std_g``.

    Returns:
        ``(b,)`` advantages (float32).
    """
    if group_size < 2:
        raise AlignlabError(f"estimator {estimator} needs a baseline from the other responses to the same prompt: "
                            f"group_size must be at least 2, found {group_size}", field="group_size")
    grouped = _grouped(rewards.float(), group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        out = (grouped - mean) / (grouped.std(dim=1, keepdim=True) + eps)
    elif estimator == "dr_grpo":
        out = grouped - mean
    elif estimator == "rloo":
        out = grouped - (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    else:
        raise AlignlabError(f"unknown group advantage estimator {estimator!r}; choose one of grpo, dr_grpo, rloo",
                            field="advantage")
    return out.reshape(-1)


def reinforce_pp_advantages(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
                            ) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): per-token returns of the KL-shaped reward, normalised over the whole batch.

    Per-token rewards ``r_t = -beta * kl_t + [t is the last real token] * score``; the return is the reward to
    go ``G_t = sum_{s >= t} r_s`` (no discount, no critic); advantages are ``G`` whitened over every real token
    of the batch (the batch, not the group, is the baseline, so ``group_size = 1`` works).

    Args:
        scores: ``(b,)`` response scores.
        kl: ``(b, t)`` per-token KL estimates to the reference (k1 in the reward); zeros when ``beta = 0``.
        mask: ``(b, t)`` 1 on response tokens.
        kl_coef: ``beta``.

    Returns:
        ``(b, t)`` advantages, 0 off the mask.
    """
    rewards = torch.where(mask.bool(), -kl_coef * kl.float(), 0.0)
    lengths = mask.long().sum(-1)
    rows = torch.nonzero(lengths > 0).squeeze(-1)
    rewards[rows, lengths[rows] - 1] += scores.float()[rows]
    returns = rewards.flip(-1).cumsum(-1).flip(-1)
    return masked_whiten(returns, mask)


def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(g,)`` bool: the groups whose ``k`` rewards are all equal. Their group advantages are all 0, so they
    carry no gradient (only the KL term) and DAPO's dynamic sampling drops them."""
    grouped = _grouped(rewards, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def truncated_importance_weights(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS, Yao et al. 2025) for a sampler that is not the trained model (a bf16
    copy, a vLLM engine): the tokens came from ``pi_sampler`` but the loss assumes ``pi_old``, so each token's
    loss is weighted by ``w_t = min(pi_old(y_t) / pi_sampler(y_t), C)`` (TRL's ``token_truncate``).

    Args:
        trainer_logps: ``(b, t)`` log-probs of the sampled tokens under the trained model at rollout time.
        sampler_logps: ``(b, t)`` under the sampler.
        mask: ``(b, t)`` 1 on response tokens.
        cap: ``C > 0``.

    Returns:
        ``(b, t)`` weights (no gradient), 1 off the mask.
    """
    weights = torch.exp(trainer_logps.detach().float() - sampler_logps.float()).clamp(max=cap)
    return torch.where(mask.bool(), weights, 1.0)


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation,
                   max_tokens: int | None = None) -> torch.Tensor:
    """A per-token loss ``(b, t)`` reduced to a scalar.

    - ``token_mean``: ``sum_{i,t} l_it m_it / sum_{i,t} m_it``: every token weighs the same (DAPO; TRL's
      ``bnpo``/``dapo``); long responses are not diluted.
    - ``sequence_mean``: ``mean_i (sum_t l_it m_it / |o_i|)``: each response weighs the same (the GRPO paper;
      TRL's ``grpo``), which favours short correct answers and long wrong ones.
    - ``constant``: ``sum_{i,t} l_it m_it / (b * L)`` with ``L = max_tokens`` (Dr. GRPO; TRL's ``dr_grpo``): no
      length normalisation at all.
    """
    if aggregation == "token_mean":
        return masked_mean(per_token, mask)
    if aggregation == "sequence_mean":
        return masked_mean(per_token, mask, dim=-1).mean()
    if aggregation == "constant":
        if not max_tokens or max_tokens < 1:
            raise AlignlabError("the constant loss normaliser needs max_tokens >= 1", field="max_new_tokens")
        return masked_sum(per_token, mask) / (per_token.shape[0] * max_tokens)
    raise AlignlabError(f"unknown loss aggregation {aggregation!r}; choose one of {', '.join(LOSS_AGGREGATIONS)}",
                        field="loss_aggregation")


class GRPOLossOutput(NamedTuple):
    """What :func:`grpo_policy_loss` returns; everything but ``loss`` is a detached scalar (token means)."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    clip_low_fraction: torch.Tensor
    clip_high_fraction: torch.Tensor
    kl: torch.Tensor


def grpo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     clip_low: float = 0.2, clip_high: float = 0.2, aggregation: Aggregation = "sequence_mean",
                     max_tokens: int | None = None, ref_logps: torch.Tensor | None = None, kl_coef: float = 0.0,
                     is_weights: torch.Tensor | None = None) -> GRPOLossOutput:
    """The clipped policy-gradient loss of GRPO and its variants, with an optional k3 KL term in the loss.

    Formula, per token: ``ratio = exp(logp - old_logp)``,
    ``l_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) * w_t + beta * k3_t``, with
    ``k3_t = exp(ref - logp) - (ref - logp) - 1`` (Schulman's estimator, >= 0; GRPO's KL term) and ``w_t`` the
    truncated importance weights of a mismatched sampler (1 otherwise); then :func:`aggregate_loss`. A separate
    ``eps_high > eps_low`` is DAPO's clip-higher: unlikely tokens with positive advantage may grow further, which
    keeps the policy's entropy from collapsing.

    Args:
        logps: ``(b, t)`` log-probs of the sampled tokens under the current policy (with gradient).
        old_logps: ``(b, t)`` under the policy that produced the rollout (``logps.detach()`` on the first update).
        advantages: ``(b,)`` one per response, or ``(b, t)`` per token (REINFORCE++).
        mask: ``(b, t)`` 1 on response tokens.
        clip_low / clip_high: ``eps_low``, ``eps_high``.
        aggregation: ``token_mean``, ``sequence_mean`` or ``constant`` (:func:`aggregate_loss`).
        max_tokens: ``L`` of the ``constant`` aggregation (the run's ``max_new_tokens``).
        ref_logps: ``(b, t)`` under the reference, for the KL term (needed when ``kl_coef > 0``).
        kl_coef: ``beta`` of the KL term in the loss (0 = none).
        is_weights: ``(b, t)`` :func:`truncated_importance_weights`, or None.

    Returns:
        ``GRPOLossOutput(loss, clip_fraction, clip_low_fraction, clip_high_fraction, kl)``: the scalar loss; the
        token fractions where the ratio was clipped (either side, below ``1 - eps_low`` with ``A < 0``, above
        ``1 + eps_high`` with ``A > 0``); the mean k3 KL to the reference (0 without it).
    """
    if advantages.ndim == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = torch.zeros((), device=logps.device)
    if kl_coef:
        if ref_logps is None:
            raise AlignlabError("a KL term in the loss needs the reference's log-probs", field="beta")
        delta = ref_logps - logps
        per_token_kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + kl_coef * per_token_kl
        kl = masked_mean(per_token_kl.detach(), mask)
    loss = aggregate_loss(per_token, mask, aggregation, max_tokens)
    with torch.no_grad():
        low = (ratio < 1.0 - clip_low) & (advantages < 0)
        high = (ratio > 1.0 + clip_high) & (advantages > 0)
        low_fraction = masked_mean(low.float(), mask)
        high_fraction = masked_mean(high.float(), mask)
    return GRPOLossOutput(loss, low_fraction + high_fraction, low_fraction, high_fraction, kl)
