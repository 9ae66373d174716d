"""Cross-check alignlab's losses against TRL's own loss code on the same random tensors.

TRL computes most losses inside trainer methods. We call those methods on trainers built with
``object.__new__`` (no model, no dataset, no accelerator set-up) carrying only the attributes the method
reads, and a fake model whose "forward" returns the per-token log-probs we chose. Where TRL only returns the
batch mean, we compare one example at a time as well as the whole batch.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from trl.trainer.utils import entropy_from_logits as trl_entropy_from_logits  # noqa: E402
from trl.trainer.utils import selective_log_softmax as trl_selective_log_softmax  # noqa: E402

from alignlab.losses.common import selective_log_softmax, sequence_logps  # noqa: E402
from alignlab.losses.dpo import (  # noqa: E402
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_kl_reference_point,
    kto_loss,
    orpo_log_odds,
    orpo_loss,
    robust_dpo_loss,
    rpo_sft_term,
    simpo_loss,
)
from alignlab.losses.ppo import entropy_from_logits  # noqa: E402
from alignlab.losses.reward_model import bradley_terry_loss, reward_centering_term  # noqa: E402

RTOL = 1e-5
ATOL = 1e-6


def close(actual: torch.Tensor, expected: torch.Tensor | float) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=RTOL,
        atol=ATOL,
    )


class FakeAccelerator:
    """Single process: gathering is the identity."""

    device = torch.device("cpu")

    @staticmethod
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    gather_for_metrics = gather


class FakeCausalLM:
    """Stands in for TRL's fused-LM-head forward: returns the per-token log-probs we chose.

    ``log_probs_by_width`` maps the input width ``T`` to a ``(n, T - 1)`` tensor of per-token log-probs that
    are already 0 where the label is -100 (which is what TRL's fused head returns).
    """

    training = True

    def __init__(self, log_probs_by_width: dict[int, torch.Tensor]) -> None:
        self.log_probs_by_width = log_probs_by_width

    def __call__(self, input_ids: torch.Tensor, **kwargs: object) -> SimpleNamespace:
        log_probs = self.log_probs_by_width[input_ids.shape[1]]
        shape = log_probs.shape
        return SimpleNamespace(
            log_probs=log_probs,
            entropy=torch.zeros(shape),
            mean_logits=torch.zeros(shape),
            is_top1=torch.zeros(shape, dtype=torch.bool),
        )


def random_completions(
    generator: torch.Generator, n: int, width: int = 8, prompt_length: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(n, width)`` completion mask (prompt, then 1..width-prompt_length tokens, then padding) and the
    ``(n, width - 1)`` per-token log-probs of the shifted labels (0 off the completion)."""
    lengths = torch.randint(1, width - prompt_length + 1, (n,), generator=generator)
    positions = torch.arange(width)
    completion_mask = (positions >= prompt_length) & (positions < prompt_length + lengths.unsqueeze(1))
    token_logps = -torch.rand(n, width - 1, generator=generator, dtype=torch.float64) * 3
    token_logps = token_logps * completion_mask[:, 1:]
    return completion_mask.long(), token_logps


# ------------------------------------------------------- DPO trainer (sigmoid, robust, ipo, hinge, sft)


def make_dpo_trainer(loss_types: list[str], beta: float, label_smoothing: float = 0.0, loss_weights=None):
    from trl import DPOTrainer

    trainer = object.__new__(DPOTrainer)
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = FakeAccelerator()
    trainer.aux_loss_enabled = False
    trainer.precompute_ref_logps = True
    trainer.ld_alpha = None
    trainer.f_divergence_type = "reverse_kl"
    trainer.loss_types = loss_types
    trainer.loss_weights = loss_weights or [1.0] * len(loss_types)
    trainer.beta = beta
    trainer.label_smoothing = label_smoothing
    trainer.use_weighting = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    return trainer


def trl_dpo_loss(trainer, completion_mask, token_logps, ref_chosen_logps, ref_rejected_logps) -> torch.Tensor:
    """TRL's DPO loss for a batch laid out as TRL does: ``[chosen..., rejected...]``."""
    model = FakeCausalLM({completion_mask.shape[1]: token_logps})
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    return trainer._compute_loss(model, inputs, return_outputs=False)


@pytest.fixture(scope="module")
def pair_batch():
    """8 preference pairs: per-token policy log-probs and masks, summed reference log-probs."""
    generator = torch.Generator().manual_seed(0)
    b = 8
    completion_mask, token_logps = random_completions(generator, 2 * b)
    reference = -torch.rand(2 * b, generator=generator, dtype=torch.float64) * 12
    shift_mask = completion_mask[:, 1:]
    logps = sequence_logps(token_logps, shift_mask)
    lengths = shift_mask.sum(dim=1)
    return SimpleNamespace(
        b=b,
        completion_mask=completion_mask,
        token_logps=token_logps,
        shift_mask=shift_mask,
        policy_chosen=logps[:b],
        policy_rejected=logps[b:],
        reference_chosen=reference[:b],
        reference_rejected=reference[b:],
        chosen_lengths=lengths[:b],
        rejected_lengths=lengths[b:],
    )


def pick(batch, indices: list[int]):
    """The sub-batch of pairs ``indices``, in TRL's ``[chosen, rejected]`` layout."""
    rows = indices + [i + batch.b for i in indices]
    return batch.completion_mask[rows], batch.token_logps[rows]


def our_paired_losses(name: str, batch, beta: float, label_smoothing: float) -> torch.Tensor:
    args = (batch.policy_chosen, batch.policy_rejected, batch.reference_chosen, batch.reference_rejected)
    if name == "sigmoid":
        return dpo_loss(*args, beta=beta)[0]
    if name == "robust":
        return robust_dpo_loss(*args, beta=beta, label_smoothing=label_smoothing)[0]
    if name == "ipo":
        lengths = {"chosen_lengths": batch.chosen_lengths, "rejected_lengths": batch.rejected_lengths}
        return ipo_loss(*args, beta=beta, **lengths)[0]
    if name == "hinge":
        return hinge_loss(*args, beta=beta)[0]
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("loss_type", "beta", "label_smoothing"),
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 0.7, 0.0),
        ("robust", 0.1, 0.2),
        ("ipo", 0.1, 0.0),
        ("ipo", 0.5, 0.0),
        ("hinge", 0.3, 0.0),
    ],
)
def test_dpo_family_matches_trl_dpo_trainer(pair_batch, loss_type, beta, label_smoothing):
    ours = our_paired_losses(loss_type, pair_batch, beta, label_smoothing)
    trainer = make_dpo_trainer([loss_type], beta, label_smoothing)
    # the whole batch: TRL returns the mean
    mask, logps = pick(pair_batch, list(range(pair_batch.b)))
    trl_loss = trl_dpo_loss(trainer, mask, logps, pair_batch.reference_chosen, pair_batch.reference_rejected)
    close(ours.mean(), trl_loss)
    # one pair at a time: each per-example loss
    for i in range(pair_batch.b):
        mask, logps = pick(pair_batch, [i])
        trl_loss = trl_dpo_loss(
            trainer,
            mask,
            logps,
            pair_batch.reference_chosen[i : i + 1],
            pair_batch.reference_rejected[i : i + 1],
        )
        close(ours[i], trl_loss)


def test_dpo_rewards_match_trl_metrics(pair_batch):
    beta = 0.3
    trainer = make_dpo_trainer(["sigmoid"], beta)
    mask, logps = pick(pair_batch, list(range(pair_batch.b)))
    trl_dpo_loss(trainer, mask, logps, pair_batch.reference_chosen, pair_batch.reference_rejected)
    _, chosen_rewards, rejected_rewards = dpo_loss(
        pair_batch.policy_chosen,
        pair_batch.policy_rejected,
        pair_batch.reference_chosen,
        pair_batch.reference_rejected,
        beta=beta,
    )
    metrics = trainer._metrics["train"]
    close(chosen_rewards.mean(), metrics["rewards/chosen"][-1])
    close(rejected_rewards.mean(), metrics["rewards/rejected"][-1])
    close((chosen_rewards - rejected_rewards).mean(), metrics["rewards/margins"][-1])


def test_rpo_sft_term_matches_trl_sigmoid_plus_sft(pair_batch):
    beta, alpha = 0.1, 0.6
    trainer = make_dpo_trainer(["sigmoid", "sft"], beta, loss_weights=[1.0, alpha])
    mask, logps = pick(pair_batch, list(range(pair_batch.b)))
    trl_loss = trl_dpo_loss(trainer, mask, logps, pair_batch.reference_chosen, pair_batch.reference_rejected)
    losses, _, _ = dpo_loss(
        pair_batch.policy_chosen,
        pair_batch.policy_rejected,
        pair_batch.reference_chosen,
        pair_batch.reference_rejected,
        beta=beta,
    )
    b = pair_batch.b
    ours = losses.mean() + rpo_sft_term(pair_batch.token_logps[:b], pair_batch.shift_mask[:b], alpha)
    close(ours, trl_loss)


# ---------------------------------------------------------------- CPO trainer (cDPO form, SimPO)


def make_cpo_trainer(loss_type: str, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5):
    from trl.experimental.cpo import CPOTrainer

    trainer = object.__new__(CPOTrainer)
    trainer.alpha = 0.0  # AlphaPO off
    trainer.loss_type = loss_type
    trainer.beta = beta
    trainer.label_smoothing = label_smoothing
    trainer.simpo_gamma = simpo_gamma
    trainer.accelerator = FakeAccelerator()
    return trainer


@pytest.mark.parametrize(("beta", "label_smoothing"), [(0.1, 0.1), (0.5, 0.3)])
def test_cdpo_matches_trl_label_smoothed_sigmoid(pair_batch, beta, label_smoothing):
    # TRL 1.16's DPOTrainer no longer applies label_smoothing to "sigmoid"; its CPOTrainer keeps the cDPO
    # formula. Feeding CPO the DPO log-ratios (pi - ref) as its "log-probs" gives exactly cDPO.
    chosen_logratios = pair_batch.policy_chosen - pair_batch.reference_chosen
    rejected_logratios = pair_batch.policy_rejected - pair_batch.reference_rejected
    trl_losses, _, _ = make_cpo_trainer("sigmoid", beta, label_smoothing).cpo_loss(
        chosen_logratios, rejected_logratios
    )
    ours, _, _ = dpo_loss(
        pair_batch.policy_chosen,
        pair_batch.policy_rejected,
        pair_batch.reference_chosen,
        pair_batch.reference_rejected,
        beta=beta,
        label_smoothing=label_smoothing,
    )
    close(ours, trl_losses)


@pytest.mark.parametrize(
    ("beta", "gamma", "label_smoothing"), [(2.0, 1.0, 0.0), (2.5, 1.375, 0.0), (0.1, 0.5, 0.1)]
)
def test_simpo_matches_trl_cpo_simpo(pair_batch, beta, gamma, label_smoothing):
    chosen_avg = sequence_logps(
        pair_batch.token_logps[: pair_batch.b], pair_batch.shift_mask[: pair_batch.b], True
    )
    rejected_avg = sequence_logps(
        pair_batch.token_logps[pair_batch.b :], pair_batch.shift_mask[pair_batch.b :], True
    )
    trainer = make_cpo_trainer("simpo", beta, label_smoothing, simpo_gamma=gamma)
    trl_losses, trl_chosen_rewards, trl_rejected_rewards = trainer.cpo_loss(chosen_avg, rejected_avg)
    ours, chosen_rewards, rejected_rewards = simpo_loss(
        chosen_avg, rejected_avg, beta, gamma, label_smoothing
    )
    close(ours, trl_losses)
    close(chosen_rewards, trl_chosen_rewards)
    close(rejected_rewards, trl_rejected_rewards)


# ---------------------------------------------------------------- ORPO trainer


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_matches_trl_odds_ratio_loss(pair_batch, beta):
    from trl.experimental.orpo import ORPOTrainer

    trainer = object.__new__(ORPOTrainer)
    trainer.beta = beta
    trainer.accelerator = FakeAccelerator()
    b = pair_batch.b
    chosen_avg = sequence_logps(pair_batch.token_logps[:b], pair_batch.shift_mask[:b], average=True)
    rejected_avg = sequence_logps(pair_batch.token_logps[b:], pair_batch.shift_mask[b:], average=True)
    # include log-probs on both sides of log1mexp's branch point -log 2, and one very close to 0
    chosen_avg = torch.cat([chosen_avg, torch.tensor([-0.3, -1e-4], dtype=torch.float64)])
    rejected_avg = torch.cat([rejected_avg, torch.tensor([-2.0, -0.69], dtype=torch.float64)])
    trl_losses, trl_chosen_rewards, trl_rejected_rewards, trl_mean_ratio, trl_mean_log_odds = (
        trainer.odds_ratio_loss(chosen_avg, rejected_avg)
    )
    ours, chosen_rewards, rejected_rewards = orpo_loss(chosen_avg, rejected_avg, beta)
    close(ours, -trl_losses)  # TRL returns beta * log sigma(.) and subtracts its mean from the NLL
    close(chosen_rewards, trl_chosen_rewards)
    close(rejected_rewards, trl_rejected_rewards)
    close(orpo_log_odds(chosen_avg, rejected_avg).mean(), trl_mean_log_odds)
    close(-ours.mean() / beta, trl_mean_ratio)


# ---------------------------------------------------------------- KTO trainer


def make_kto_trainer(beta: float, desirable_weight: float, undesirable_weight: float):
    from trl import KTOTrainer

    trainer = object.__new__(KTOTrainer)
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = FakeAccelerator()
    trainer.calculate_KL = True
    trainer.precompute_ref_logps = True
    trainer.aux_loss_enabled = False
    trainer.loss_type = "kto"
    trainer.beta = beta
    trainer.desirable_weight = desirable_weight
    trainer.undesirable_weight = undesirable_weight
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    return trainer


@pytest.mark.parametrize(
    ("beta", "desirable_weight", "undesirable_weight", "kl_shift"),
    [(0.1, 1.0, 1.0, 0.0), (0.5, 1.33, 0.8, 0.0), (0.2, 1.0, 1.0, -30.0)],
)
def test_kto_matches_trl_kto_trainer(beta, desirable_weight, undesirable_weight, kl_shift):
    generator = torch.Generator().manual_seed(1)
    n = 10
    labels = torch.tensor([True, False, True, True, False, False, True, False, False, True])
    completion_mask, token_logps = random_completions(generator, n, width=8)
    kl_completion_mask, kl_token_logps = random_completions(generator, n, width=9)  # other width: KL pass
    reference_logps = -torch.rand(n, generator=generator, dtype=torch.float64) * 12
    # kl_shift < 0 makes the reference much likelier on the KL pairs: the KL estimate is negative and clamped
    reference_kl_logps = -torch.rand(n, generator=generator, dtype=torch.float64) * 12 - kl_shift
    trainer = make_kto_trainer(beta, desirable_weight, undesirable_weight)
    model = FakeCausalLM({8: token_logps, 9: kl_token_logps})
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "KL_input_ids": torch.zeros_like(kl_completion_mask),
        "KL_attention_mask": torch.ones_like(kl_completion_mask),
        "KL_completion_mask": kl_completion_mask,
        "label": labels,
        "ref_logps": reference_logps,
        "ref_KL_logps": reference_kl_logps,
    }
    trl_loss = trainer._compute_loss(model, inputs, return_outputs=False)

    policy_logps = sequence_logps(token_logps, completion_mask[:, 1:])
    policy_kl_logps = sequence_logps(kl_token_logps, kl_completion_mask[:, 1:])
    reference_point = kto_kl_reference_point(policy_kl_logps, reference_kl_logps)
    close(reference_point, trainer._metrics["train"]["kl"][-1])
    if kl_shift < 0:
        assert reference_point.item() == 0.0
    losses, chosen_rewards, rejected_rewards = kto_loss(
        policy_logps[labels],
        policy_logps[~labels],
        reference_logps[labels],
        reference_logps[~labels],
        reference_point,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    close(losses.mean(), trl_loss)
    close(chosen_rewards.mean(), trainer._metrics["train"]["rewards/chosen"][-1])
    close(rejected_rewards.mean(), trainer._metrics["train"]["rewards/rejected"][-1])


# ---------------------------------------------------------------- reward trainer


@pytest.mark.parametrize(("with_margin", "center_coef"), [(False, None), (True, None), (True, 0.01)])
def test_bradley_terry_matches_trl_reward_trainer(with_margin, center_coef):
    from trl import RewardTrainer

    generator = torch.Generator().manual_seed(2)
    b = 6
    rewards = torch.randn(2 * b, 1, generator=generator, dtype=torch.float64) * 2
    margin = torch.rand(b, generator=generator, dtype=torch.float64)
    trainer = object.__new__(RewardTrainer)
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = FakeAccelerator()
    trainer.args = SimpleNamespace(center_rewards_coefficient=center_coef)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    inputs = {"input_ids": torch.zeros(2 * b, 3, dtype=torch.long), "attention_mask": torch.ones(2 * b, 3)}
    if with_margin:
        inputs["margin"] = margin
    trl_loss = trainer.compute_loss(lambda **kwargs: SimpleNamespace(logits=rewards), inputs)

    chosen, rejected = rewards[:b, 0], rewards[b:, 0]
    ours = bradley_terry_loss(chosen, rejected, margin if with_margin else None).mean()
    if center_coef is not None:
        ours = ours + reward_centering_term(chosen + rejected, center_coef)
    close(ours, trl_loss)


# ---------------------------------------------------------------- shared utilities


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_matches_trl(dtype):
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 5, 11, generator=generator) * 4).to(dtype)
    index = torch.randint(0, 11, (3, 5), generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = trl_selective_log_softmax(logits, index)
    actual = selective_log_softmax(logits, index, chunk_size=4)
    if dtype == torch.float32:
        assert actual.dtype == dtype
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    else:  # ours normalises bf16 logits in float32 (TRL in bf16): equal to TRL on the upcast logits
        assert actual.dtype == torch.float32
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            upcast = trl_selective_log_softmax(logits.float(), index)
        torch.testing.assert_close(actual, upcast, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(actual, expected.float(), rtol=3e-2, atol=3e-2)  # and TRL's bf16 result


def test_entropy_matches_trl():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, 13, generator=generator) * 3
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=5), trl_entropy_from_logits(logits))
