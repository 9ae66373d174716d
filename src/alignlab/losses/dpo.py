"""The DPO family: preference losses computed directly from policy (and reference) log-probabilities.

Every paired loss takes per-sequence log-probabilities of shape ``(b,)`` (the sum over response tokens unless
the docstring says "average") and returns ``(losses (b,), chosen_rewards (b,), rejected_rewards (b,))``:

- ``losses``: one value per pair; the trainer takes ``losses.mean()``.
- ``chosen_rewards``/``rejected_rewards``: the implicit rewards ``beta * (policy_logps - reference_logps)``,
  detached, for logging (accuracy = chosen > rejected, margin = chosen - rejected). Reference-free losses
  (SimPO, ORPO) have no reference, so their rewards are ``beta * policy_logps``. They are computed once, in
  :func:`implicit_rewards`.

Notation: ``logits = (pi_c - ref_c) - (pi_r - ref_r)`` is the difference of the log-ratios of chosen and
rejected; ``sigma`` is the logistic sigmoid.

An NLL term on the chosen responses can be added to any of them (RPO, ORPO, CPO):
``loss = losses.mean() + rpo_sft_term(chosen_token_logps, chosen_mask, alpha)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from alignlab.errors import AlignlabError
from alignlab.losses.sft import sft_loss

__all__ = [
    "LOSSES",
    "PAIRED_LOSSES",
    "dpo_loss",
    "hinge_loss",
    "implicit_rewards",
    "ipo_loss",
    "kto_kl_reference_point",
    "kto_loss",
    "orpo_log_odds",
    "orpo_loss",
    "preference_loss",
    "robust_dpo_loss",
    "rpo_sft_term",
    "simpo_loss",
]

LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def implicit_rewards(
    beta: float,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards DPO assigns to each response, detached (for logging only).

    DPO's policy is the optimum of a KL-regularised reward maximisation whose reward is, up to a per-prompt
    constant, ``r(x, y) = beta * log(pi(y|x) / ref(y|x))``.

    Args:
        beta: the loss's beta.
        policy_chosen_logps: ``(b,)``.
        policy_rejected_logps: ``(b,)``.
        reference_chosen_logps: ``(b,)``, or None for reference-free losses (reference taken as 0).
        reference_rejected_logps: ``(b,)``, or None.

    Returns:
        ``(chosen_rewards (b,), rejected_rewards (b,))``.
    """
    chosen = policy_chosen_logps.detach()
    rejected = policy_rejected_logps.detach()
    if reference_chosen_logps is not None:
        chosen = chosen - reference_chosen_logps.detach()
    if reference_rejected_logps is not None:
        rejected = rejected - reference_rejected_logps.detach()
    return beta * chosen, beta * rejected


def _log_ratios(
    beta: float,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """What every reference-based paired loss starts from and returns beside its losses.

    Returns:
        ``(chosen_logratios (b,), rejected_logratios (b,), (chosen_rewards (b,), rejected_rewards (b,)))`` with
        ``chosen_logratios = pi_c - ref_c``, ``rejected_logratios = pi_r - ref_r`` (so ``logits`` is their
        difference) and the implicit rewards of :func:`implicit_rewards`.
    """
    chosen = policy_chosen_logps - reference_chosen_logps
    rejected = policy_rejected_logps - reference_rejected_logps
    rewards = implicit_rewards(
        beta, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return chosen, rejected, rewards


def _smoothed_logistic_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - eps) * log sigma(logits) - eps * log sigma(-logits)``: cross-entropy with soft labels."""
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Direct Preference Optimization (Rafailov et al. 2023), with conservative DPO (cDPO, Mitchell 2023).

    Intuition: the Bradley-Terry likelihood of the preferences, written with the implicit reward
    ``beta * log(pi / ref)`` instead of a learned reward model, so the policy is fitted directly. Beta sets
    how far the policy may move from the reference (larger = closer). cDPO assumes each label is flipped with
    probability ``label_smoothing`` and fits the soft label instead, so the loss stops pushing once the
    implied preference probability reaches ``1 - label_smoothing``.

    Formula: ``loss = -(1 - eps) * log sigma(beta * logits) - eps * log sigma(-beta * logits)`` with
    ``logits = (pi_c - ref_c) - (pi_r - ref_r)``; ``eps = 0`` is plain DPO.

    Args:
        policy_chosen_logps: ``(b,)`` summed log-prob of each chosen response under the policy.
        policy_rejected_logps: ``(b,)`` same for the rejected responses.
        reference_chosen_logps: ``(b,)`` under the frozen reference model.
        reference_rejected_logps: ``(b,)``.
        beta: KL-regularisation strength (0.1 is common).
        label_smoothing: cDPO's label-flip probability, in [0, 0.5).

    Returns:
        ``(losses (b,), chosen_rewards (b,), rejected_rewards (b,))``.
    """
    chosen, rejected, rewards = _log_ratios(
        beta, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return _smoothed_logistic_loss(beta * (chosen - rejected), label_smoothing), *rewards


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> LossOutput:
    """Robust DPO, rDPO (Chowdhury et al. 2024, "Provably Robust DPO"), as TRL's ``loss_type="robust"``.

    Intuition: when each preference label is flipped with a known probability ``eps``, the plain DPO loss
    is biased. rDPO de-biases it: it is an unbiased estimate of the clean-label loss, obtained by subtracting
    a scaled loss on the flipped label and renormalising. Unlike cDPO it keeps pushing the margin up (the
    flipped term has a negative sign), so its optimum matches DPO on clean data.

    Formula, with ``x = beta * logits``:
    ``loss = [(1 - eps) * -log sigma(x) - eps * -log sigma(-x)] / (1 - 2 eps)``.

    Args:
        policy_chosen_logps: ``(b,)``.
        policy_rejected_logps: ``(b,)``.
        reference_chosen_logps: ``(b,)``.
        reference_rejected_logps: ``(b,)``.
        beta: KL-regularisation strength.
        label_smoothing: the label-flip probability ``eps``, in [0, 0.5) (the paper suggests 0.1).

    Returns:
        ``(losses (b,), chosen_rewards (b,), rejected_rewards (b,))``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise AlignlabError(
            f"must lie in [0, 0.5) for robust DPO, got {label_smoothing}", field="label_smoothing"
        )
    chosen, rejected, rewards = _log_ratios(
        beta, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = beta * (chosen - rejected)
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * label_smoothing), *rewards


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> LossOutput:
    """Identity Preference Optimisation, IPO (Azar et al. 2023, "A General Theoretical Paradigm...", eq. 17).

    Intuition: DPO's logistic loss keeps rewarding a larger margin even when the preference is already
    certain, so with deterministic preferences it drives the policy arbitrarily far from the reference.
    IPO regresses the log-ratio margin onto a fixed target ``1 / (2 beta)`` with a squared loss, so the
    regularisation towards the reference always holds (``beta`` is the paper's ``tau``).

    Formula: ``loss = (logits - 1 / (2 beta)) ** 2``.

    Length normalisation (``average_log_prob``): TRL computes IPO on log-ratios *averaged* over the completion
    tokens, ``(pi_c - ref_c) / len_c - (pi_r - ref_r) / len_r``, which keeps the target margin independent of
    the response length; the IPO authors confirmed their reported results use this form. Pass
    ``chosen_lengths`` and ``rejected_lengths`` to get it (what :func:`preference_loss` does); leave them None
    for the paper's summed log-probabilities. The logged rewards always use the summed log-probabilities.

    Args:
        policy_chosen_logps: ``(b,)`` summed log-probs.
        policy_rejected_logps: ``(b,)``.
        reference_chosen_logps: ``(b,)``.
        reference_rejected_logps: ``(b,)``.
        beta: regularisation ``tau``; the target margin is ``1 / (2 beta)``.
        chosen_lengths: ``(b,)`` number of response tokens of each chosen response, or None.
        rejected_lengths: ``(b,)`` same for rejected, or None (both or neither).

    Returns:
        ``(losses (b,), chosen_rewards (b,), rejected_rewards (b,))``.
    """
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
    chosen, rejected, rewards = _log_ratios(
        beta, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    if chosen_lengths is not None and rejected_lengths is not None:
        chosen = chosen / chosen_lengths.to(chosen.dtype).clamp(min=1.0)
        rejected = rejected / rejected_lengths.to(rejected.dtype).clamp(min=1.0)
    return (chosen - rejected - 1 / (2 * beta)) ** 2, *rewards


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """Hinge loss of SLiC-HF (Zhao et al. 2023) as used by RSO (Liu et al. 2023), TRL's ``loss_type="hinge"``.

    Intuition: a max-margin version of DPO: pairs whose scaled log-ratio margin already exceeds 1 contribute
    nothing; the others are pushed linearly. ``1 / beta`` is the margin in log-ratio units.

    Formula: ``loss = relu(1 - beta * logits)``.

    Args:
        policy_chosen_logps: ``(b,)``.
        policy_rejected_logps: ``(b,)``.
        reference_chosen_logps: ``(b,)``.
        reference_rejected_logps: ``(b,)``.
        beta: inverse margin.

    Returns:
        ``(losses (b,), chosen_rewards (b,), rejected_rewards (b,))``.
    """
    chosen, rejected, rewards = _log_ratios(
        beta, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return torch.relu(1 - beta * (chosen - rejected)), *rewards


def simpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO (Meng et al. 2024, "Simple Preference Optimization with a Reference-Free Reward").

    Intuition: replace DPO's reward by the length-normalised log-likelihood ``beta / |y| * log pi(y|x)``:
    no reference model is needed, the reward matches the quantity generation ranks by, and long responses
    gain no advantage. A target margin ``gamma`` asks the chosen reward to beat the rejected one by a gap.
    Same as TRL's CPO trainer with ``loss_type="simpo"`` (``simpo_gamma = gamma``).

    Formula: ``loss = -(1 - eps) * log sigma(x) - eps * log sigma(-x)`` with
    ``x = beta * (avg_c - avg_r) - gamma``.

    Args:
        policy_chosen_avg_logps: ``(b,)`` log-prob of each chosen response *averaged* over its tokens.
        policy_rejected_avg_logps: ``(b,)`` same for rejected.
        beta: reward scale (the paper uses 2.0 to 2.5; it is much larger than DPO's beta).
        gamma: target reward margin (the paper finds ``gamma / beta`` around 0.5 works well).
        label_smoothing: label-flip probability, as in cDPO.

    Returns:
        ``(losses (b,), chosen_rewards (b,), rejected_rewards (b,))``, rewards ``beta * avg_logps``.
    """
    logits = beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - gamma
    losses = _smoothed_logistic_loss(logits, label_smoothing)
    return losses, *implicit_rewards(beta, policy_chosen_avg_logps, policy_rejected_avg_logps)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2`` (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(
    policy_chosen_avg_logps: torch.Tensor, policy_rejected_avg_logps: torch.Tensor
) -> torch.Tensor:
    """Log odds ratio ``log(odds_c / odds_r)`` with ``odds(y) = p / (1 - p)``, ``p = exp(avg_logp)``.

    Args:
        policy_chosen_avg_logps: ``(b,)`` length-averaged log-probs (strictly negative).
        policy_rejected_avg_logps: ``(b,)``.

    Returns:
        ``(b,)`` in float32 (the ``log(1 - p)`` part needs the precision).
    """
    chosen = policy_chosen_avg_logps.float()
    rejected = policy_rejected_avg_logps.float()
    return (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))


def orpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """The odds-ratio term of ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization...").

    Intuition: ORPO folds preference learning into SFT, with no reference model and no separate SFT stage.
    The SFT loss raises the chosen response's likelihood; the odds-ratio term additionally contrasts it with
    the rejected one, pushing up the odds ``p / (1 - p)`` of chosen relative to rejected. Odds (not plain
    probabilities) give a mild, saturating penalty that does not collapse the rejected likelihood.

    Formula: ``L_OR = -beta * log sigma(log_odds)`` with ``log_odds = log odds(y_c) - log odds(y_r)`` and
    ``log odds(y) = avg_logp - log(1 - exp(avg_logp))`` (see :func:`orpo_log_odds`); ``beta`` is the paper's
    ``lambda`` (TRL's ``ORPOConfig.beta``).

    The full ORPO objective adds the NLL of the chosen response (response tokens, as in the paper; TRL's
    ORPO trainer also counts the prompt tokens)::

        loss = sft_loss(chosen_token_logps, chosen_mask) + orpo_loss(avg_c, avg_r, beta)[0].mean()
             = orpo_loss(avg_c, avg_r, beta)[0].mean() + rpo_sft_term(chosen_token_logps, chosen_mask, 1.0)

    Args:
        policy_chosen_avg_logps: ``(b,)`` log-prob of each chosen response averaged over its tokens.
        policy_rejected_avg_logps: ``(b,)`` same for rejected.
        beta: weight ``lambda`` of the odds-ratio term (0.1 in the paper).

    Returns:
        ``(losses (b,), chosen_rewards (b,), rejected_rewards (b,))``: ``losses`` is the weighted OR term
        (float32), rewards ``beta * avg_logps``.
    """
    losses = -beta * F.logsigmoid(orpo_log_odds(policy_chosen_avg_logps, policy_rejected_avg_logps))
    return losses, *implicit_rewards(beta, policy_chosen_avg_logps, policy_rejected_avg_logps)


def kto_kl_reference_point(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0``: a batch estimate of ``KL(pi || ref)``, detached and clamped at 0.

    It is estimated on *mismatched* pairs (each prompt with the completion of another example in the batch),
    so it measures how far the policy drifted in general, not on the examples being scored. In a multi-process
    run average it across processes before passing it to :func:`kto_loss` (TRL gathers it the same way).

    Args:
        policy_kl_logps: ``(m,)`` summed log-probs of the mismatched completions under the policy.
        reference_kl_logps: ``(m,)`` same under the reference.

    Returns:
        A scalar tensor ``max(0, mean(policy - reference))``, no gradient.
    """
    return (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    kl_reference_point: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """Kahneman-Tversky Optimisation, KTO (Ethayarajh et al. 2024, eq. 7), as TRL's ``KTOTrainer``.

    Intuition: learns from *unpaired* thumbs-up/thumbs-down labels. Each response's implicit reward
    ``beta * log(pi / ref)`` is compared with a reference point ``z0`` (the policy's KL from the reference):
    desirable responses are pushed above it, undesirable ones below, through a saturating sigmoid "value
    function" as in prospect theory. The weights rebalance datasets with unequal numbers of each kind (the
    paper suggests ``desirable_weight * n_d / (undesirable_weight * n_u)`` in [1, 4/3]).

    Formula: desirable ``w_d * (1 - sigma(beta * (log_ratio - z0)))``,
    undesirable ``w_u * (1 - sigma(beta * (z0 - log_ratio)))``, ``log_ratio = pi - ref``.

    Args:
        policy_chosen_logps: ``(n_d,)`` summed log-probs of the desirable examples under the policy.
        policy_rejected_logps: ``(n_u,)`` of the undesirable examples (either count may be 0).
        reference_chosen_logps: ``(n_d,)`` under the reference.
        reference_rejected_logps: ``(n_u,)``.
        kl_reference_point: ``z0``, scalar, from :func:`kto_kl_reference_point` (0 gives KTO without KL).
        beta: reward scale.
        desirable_weight: ``w_d``.
        undesirable_weight: ``w_u``.

    Returns:
        ``(losses (n_d + n_u,), chosen_rewards (n_d,), rejected_rewards (n_u,))``: the desirable losses then
        the undesirable ones; the trainer takes ``losses.mean()``.
    """
    chosen, rejected, rewards = _log_ratios(
        beta, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    chosen_losses = 1 - torch.sigmoid(beta * (chosen - kl_reference_point))
    rejected_losses = 1 - torch.sigmoid(beta * (kl_reference_point - rejected))
    return torch.cat([desirable_weight * chosen_losses, undesirable_weight * rejected_losses]), *rewards


def rpo_sft_term(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    alpha: float = 1.0,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``alpha`` times the NLL of the chosen responses, to add to any preference loss (RPO, Pang et al. 2024).

    Intuition: preference losses only constrain the *difference* between chosen and rejected, so both
    likelihoods can fall together; an SFT term on the chosen responses anchors them (RPO, CPO's ``cpo_alpha``,
    ORPO with ``alpha = 1``). Averaged per token over the batch, as TRL's DPO ``loss_type=["sigmoid", "sft"]``
    with ``loss_weights=[1, alpha]`` (the RPO paper normalises per response instead; the two agree when all
    chosen responses have the same length).

    Formula: ``alpha * -sum(mask * logps) / N`` (see :func:`alignlab.losses.sft.sft_loss`).

    Args:
        chosen_token_logps: ``(b, t)`` policy log-probs of the chosen response tokens.
        chosen_mask: ``(b, t)`` 1 on chosen response tokens.
        alpha: weight of the NLL term.
        num_items: loss tokens in the global batch (gradient accumulation), or None for this batch's.

    Returns:
        A scalar: ``total = losses.mean() + rpo_sft_term(...)``.
    """
    return alpha * sft_loss(chosen_token_logps, chosen_mask, num_items)


PAIRED_LOSSES = ("dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo")

LOSSES: dict[str, Callable[..., LossOutput]] = {
    "dpo": dpo_loss,
    "cdpo": dpo_loss,  # with label_smoothing > 0
    "robust": robust_dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "kto": kto_loss,  # unpaired: call kto_loss directly, not preference_loss
}
"""The preference losses by CLI name."""


def preference_loss(
    name: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 1.0,
) -> LossOutput:
    """Compute the paired loss called ``name`` from summed log-probs and response lengths.

    The trainer computes the same inputs for every loss; this picks what each needs: summed log-ratios
    (dpo, cdpo, robust, hinge), length-averaged log-ratios (ipo, as TRL), length-averaged policy log-probs
    without a reference (simpo, orpo).

    Args:
        name: one of :data:`PAIRED_LOSSES`: ``dpo|cdpo|robust|ipo|hinge|simpo|orpo``.
        policy_chosen_logps: ``(b,)`` summed log-probs of the chosen responses.
        policy_rejected_logps: ``(b,)``.
        reference_chosen_logps: ``(b,)``; needed except for simpo and orpo.
        reference_rejected_logps: ``(b,)``.
        chosen_lengths: ``(b,)`` response token counts; needed for ipo, simpo and orpo.
        rejected_lengths: ``(b,)``.
        beta: the loss's beta (ORPO's lambda).
        label_smoothing: cdpo and robust flip probability (and SimPO's label smoothing).
        simpo_gamma: SimPO's target margin.

    Returns:
        ``(losses (b,), chosen_rewards (b,), rejected_rewards (b,))``.
    """
    if name not in PAIRED_LOSSES:
        hint = " (KTO is unpaired: call kto_loss)" if name == "kto" else ""
        raise AlignlabError(
            f"unknown paired loss {name!r}{hint}; choose one of {', '.join(PAIRED_LOSSES)}", field="loss"
        )
    needs_reference = name not in ("simpo", "orpo")
    if needs_reference and (reference_chosen_logps is None or reference_rejected_logps is None):
        raise AlignlabError(f"loss {name!r} needs reference log-probs", field="loss")
    needs_lengths = name in ("ipo", "simpo", "orpo")
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise AlignlabError(f"loss {name!r} needs the response lengths", field="loss")
    if name == "cdpo" and label_smoothing <= 0:
        raise AlignlabError(
            "cdpo needs label_smoothing > 0 (with 0 it is plain dpo)", field="label_smoothing"
        )

    paired = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    if name in ("dpo", "cdpo"):
        return dpo_loss(*paired, beta, label_smoothing)
    if name == "robust":
        return robust_dpo_loss(*paired, beta, label_smoothing)
    if name == "ipo":
        return ipo_loss(*paired, beta, chosen_lengths, rejected_lengths)
    if name == "hinge":
        return hinge_loss(*paired, beta)
    chosen_avg = policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1.0)
    rejected_avg = policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype).clamp(min=1.0)
    if name == "simpo":
        return simpo_loss(chosen_avg, rejected_avg, beta, simpo_gamma, label_smoothing)
    return orpo_loss(chosen_avg, rejected_avg, beta)
