"""PPO for language models: KL penalty, GAE, clipped policy and value losses, entropy, KL controllers.

Notation: ``b`` responses in the rollout batch, ``t`` response tokens, ``v`` vocabulary. ``mask`` is 1 on the
response tokens, which are left-aligned: ``mask[i] = [1, 1, ..., 1, 0, ..., 0]``; positions after the last
real token (padding after EOS) are ignored and get 0 in every per-token output.

References: Schulman et al. 2017 (PPO); Schulman et al. 2016 (GAE); Ziegler et al. 2019 (RLHF for language,
adaptive KL); Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from alignlab.errors import AlignlabError
from alignlab.losses.common import masked_mean, masked_var, row_chunks

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KL_ESTIMATORS",
    "PolicyLossOutput",
    "ValueLossOutput",
    "compute_gae",
    "entropy_from_logits",
    "explained_variance",
    "kl_penalty",
    "ppo_policy_loss",
    "ppo_value_loss",
]

KLEstimator = Literal["k1", "k3", "abs", "mse"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k3", "abs", "mse")


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || ref)`` from the log-probs of the sampled tokens.

    The tokens were sampled from ``pi``, so each estimator's expectation under ``pi`` relates to the KL
    (Schulman, "Approximating KL divergence", 2020). With ``log_ratio = logp - ref_logp``:

    - ``k1``: ``log_ratio``. Unbiased, but high variance and negative on some tokens. Standard in RLHF
      (Ziegler 2019, InstructGPT) as the per-token reward penalty.
    - ``k3``: ``(r - 1) - log r`` with ``r = exp(ref_logp - logp) = pi_ref / pi``. Unbiased, always >= 0,
      lower variance (GRPO's KL term).
    - ``abs``: ``|log_ratio|``; ``mse``: ``0.5 * log_ratio ** 2`` (the ``k2`` estimator): biased but >= 0.

    Args:
        logps: ``(b, t)`` log-probs of the sampled tokens under the policy.
        ref_logps: ``(b, t)`` under the reference model.
        estimator: ``"k1" | "k3" | "abs" | "mse"``.

    Returns:
        ``(b, t)`` per-token KL estimates (mask them yourself).
    """
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r, with log r = -log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    if estimator == "mse":
        return 0.5 * log_ratio.square()
    raise AlignlabError(
        f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}", field="kl_estimator"
    )


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over ragged, right-padded responses.

    Each response is one episode whose steps are its tokens; the episode ends after the last real token, so
    the value after it is 0 (no bootstrap). Runs backwards over ``t``:

    ``delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t``,
    ``A_t = (delta_t + gamma * lam * A_{t+1}) * m_t``, ``returns_t = (A_t + V_t) * m_t``.

    With ``gamma = lam = 1``: ``A_t = sum_{s >= t} r_s - V_t`` and the returns are the rewards-to-go.
    Runs under ``no_grad``: advantages and returns are targets.

    Args:
        rewards: ``(b, t)`` per-token rewards (typically ``-kl_coef * kl`` plus the score on the last token).
        values: ``(b, t)`` value estimates ``V_t`` of the state before each token.
        mask: ``(b, t)`` 1 on response tokens (a prefix of each row).
        gamma: discount.
        lam: GAE's lambda (bias/variance trade-off; 1 = Monte Carlo returns minus the value baseline).

    Returns:
        ``(advantages (b, t), returns (b, t))``, both 0 at padded positions.
    """
    mask = mask.bool()
    zeros = torch.zeros_like(values)
    rewards = torch.where(mask, rewards, zeros)
    values = torch.where(mask, values, zeros)  # V after the last real token is 0: the episode has ended
    length = rewards.shape[-1]
    advantages = torch.zeros_like(values)
    last_advantage = torch.zeros_like(values[:, 0])
    for step in reversed(range(length)):
        next_values = values[:, step + 1] if step + 1 < length else torch.zeros_like(last_advantage)
        delta = rewards[:, step] + gamma * next_values - values[:, step]
        last_advantage = torch.where(mask[:, step], delta + gamma * lam * last_advantage, 0.0)
        advantages[:, step] = last_advantage
    returns = torch.where(mask, advantages + values, zeros)
    return advantages, returns


class PolicyLossOutput(NamedTuple):
    """What :func:`ppo_policy_loss` returns; the statistics are detached scalars."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    approx_kl_k3: torch.Tensor


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> PolicyLossOutput:
    """PPO's clipped surrogate objective (Schulman et al. 2017, eq. 7), averaged over response tokens.

    Intuition: raise the probability of tokens with positive advantage and lower the others, but take no
    credit for moving the probability ratio beyond ``1 +- clip_range``: the pessimistic max of the clipped
    and unclipped losses removes the incentive to step far from the policy that collected the data.

    Formula: ``ratio = exp(logp - old_logp)``,
    ``loss = mean_tokens max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``.

    Args:
        logps: ``(b, t)`` log-probs of the sampled tokens under the current policy (with gradient).
        old_logps: ``(b, t)`` under the policy that sampled them (rollout time).
        advantages: ``(b, t)`` (usually whitened over the batch).
        mask: ``(b, t)`` 1 on response tokens.
        clip_range: ``eps``.

    Returns:
        ``PolicyLossOutput(loss, clip_fraction, approx_kl, approx_kl_k3)``: the scalar loss; the fraction of
        tokens where the clipped term was the active one; ``0.5 * mean((logp - old) ** 2)``; the k3 estimate
        of ``KL(old || new)``, ``mean((ratio - 1) - log ratio)``.
    """
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logps.dtype), mask)
        approx_kl = 0.5 * masked_mean(log_ratio.square(), mask)
        approx_kl_k3 = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return PolicyLossOutput(loss, clip_fraction, approx_kl, approx_kl_k3)


class ValueLossOutput(NamedTuple):
    """What :func:`ppo_value_loss` returns; ``clip_fraction`` is detached."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float | None = 0.2,
) -> ValueLossOutput:
    """Clipped value loss (as in OpenAI baselines' PPO2 and the RLHF PPO implementations).

    Intuition: the value head gets the same trust region as the policy: its prediction may move at most
    ``clip_range_value`` from the rollout-time value before the loss stops rewarding the move.

    Formula: ``v_clip = old_v + clip(v - old_v, -c, c)``,
    ``loss = 0.5 * mean_tokens max((v - R) ** 2, (v_clip - R) ** 2)``; ``c = None`` gives ``0.5 * MSE``.

    Args:
        values: ``(b, t)`` current value predictions (with gradient).
        old_values: ``(b, t)`` value predictions at rollout time.
        returns: ``(b, t)`` targets ``R`` from :func:`compute_gae`.
        mask: ``(b, t)`` 1 on response tokens.
        clip_range_value: ``c``, or None for no clipping.

    Returns:
        ``ValueLossOutput(loss, clip_fraction)``: fraction of tokens where the clipped error was larger.
    """
    unclipped = (values - returns).square()
    if clip_range_value is None:
        clipped = unclipped
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
        clipped = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return ValueLossOutput(loss, clip_fraction)


def entropy_from_logits(
    logits: torch.Tensor, mask: torch.Tensor | None = None, chunk_size: int = 256
) -> torch.Tensor:
    """Entropy of the next-token distribution at each position, a chunk of rows at a time.

    ``H = logsumexp(z) - sum softmax(z) * z``. Only ``chunk_size`` rows of ``v`` probabilities exist at once
    (in float32 even for bf16 logits), instead of a full ``(b, t, v)`` softmax.

    Args:
        logits: ``(b, t, v)``.
        mask: ``(b, t)`` 1 on the positions wanted, or None for all.
        chunk_size: rows processed at once.

    Returns:
        ``(b, t)`` entropies in nats (float32), 0 where ``mask`` is 0; differentiable. Logits of ``-inf``
        (tokens filtered out) are allowed.
    """
    pieces = []
    for chunk in row_chunks(logits, chunk_size):
        chunk = chunk.float()
        probs = F.softmax(chunk, dim=-1)
        # 0 * -inf would be nan for logits masked to -inf (top-k filtering): those tokens contribute 0
        expected_logit = (probs * chunk.masked_fill(probs == 0, 0.0)).sum(dim=-1)
        pieces.append(torch.logsumexp(chunk, dim=-1) - expected_logit)
    if not pieces:
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    entropy = torch.cat(pieces).reshape(logits.shape[:-1])
    if mask is not None:
        entropy = torch.where(mask.bool(), entropy, 0.0)
    return entropy


def explained_variance(
    predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> float:
    """How much of the variance of ``targets`` the ``predictions`` explain: ``1 - Var(y - y_hat) / Var(y)``.

    1 is perfect, 0 is no better than predicting the mean, negative is worse. Logged for the value head
    (predictions = values, targets = returns).

    Args:
        predictions: ``(b, t)`` (any shape).
        targets: same shape.
        mask: same shape, 1 on the entries to count, or None for all.

    Returns:
        A float; ``nan`` when the targets have zero variance.
    """
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    predictions, targets = predictions.detach().double(), targets.detach().double()
    target_variance = masked_var(targets, mask, unbiased=False)
    if target_variance.item() == 0.0:
        return float("nan")
    return (1.0 - masked_var(targets - predictions, mask, unbiased=False) / target_variance).item()


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (section 2.2): steer the measured KL towards a target.

    ``error = clip(current_kl / target - 1, -0.2, 0.2)``; ``value *= 1 + error * n_steps / horizon``.
    KL above target raises the coefficient (a stronger penalty), below target lowers it; the clip bounds the
    change per update.

    Args:
        init_kl_coef: starting coefficient.
        target: desired KL (nats per response).
        horizon: number of samples over which an error is corrected (Ziegler: 10000).
    """

    init_kl_coef: float
    target: float
    horizon: float

    def __post_init__(self) -> None:
        self.value = self.init_kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adjust ``value`` after ``n_steps`` samples of mean KL ``current_kl``; return the new value."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


@dataclass
class FixedKLController:
    """A constant KL coefficient with the same interface as :class:`AdaptiveKLController`."""

    kl_coef: float

    def __post_init__(self) -> None:
        self.value = self.kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        """Do nothing; return the (unchanged) value."""
        return self.value
