"""The critic-free family (GRPO, Dr. GRPO, RLOO, REINFORCE++): losses and advantages against TRL's own
expressions and hand computations, the arithmetic task, a learning run on the tiny model, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignlab.config import GRPOConfig
from alignlab.errors import AlignlabError
from alignlab.losses.grpo import (
    aggregate_loss,
    equal_reward_groups,
    group_advantages,
    grpo_policy_loss,
    reinforce_pp_advantages,
    truncated_importance_weights,
)
from alignlab.tasks import load_task
from alignlab.tasks.arithmetic import all_problems, answer_of, arithmetic_reward, correct, final_number
from alignlab.train.grpo import train_grpo

HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------------------------- TRL's expressions


def trl_grpo_loss(per_token_logps, old_per_token_logps, advantages, completion_mask, loss_type, epsilon_low,
                  epsilon_high, beta=0.0, ref_per_token_logps=None, max_completion_length=None):
    """TRL 1.16's loss, copied expression by expression from ``GRPOTrainer._compute_loss``
    (trl/trainer/grpo_trainer.py: token-level importance sampling, one process, no gradient accumulation, so
    ``normalizer = 1`` and dapo's ``num_items_in_batch`` is the batch's completion tokens)."""
    advantages = advantages.unsqueeze(1)
    mask = completion_mask
    log_ratio = per_token_logps - old_per_token_logps
    coef_1 = torch.exp(log_ratio)
    if beta != 0.0:
        per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps)
                        - 1)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type == "dapo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    raise ValueError(loss_type)


def trl_grpo_advantages(rewards, num_generations, scale_rewards="group"):
    """``GRPOTrainer._generate_and_score_completions``'s advantages (sum_then_normalize), with TRL's own
    ``nanstd``."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return advantages


def trl_rloo_advantages(rewards, num_generations):
    """``RLOOTrainer``'s leave-one-out advantages (trl/trainer/rloo_trainer.py, no NaN rewards, no
    normalisation)."""
    grouped = rewards.view(-1, num_generations)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped) / (counts - 1)).view(-1)
    return rewards - baselines


def _batch(b=6, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(b, t, generator=g, dtype=torch.float32) * 3
    old = logps + 0.3 * torch.randn(b, t, generator=g)  # ratios well outside [0.8, 1.28]: clipping matters
    ref = logps + 0.2 * torch.randn(b, t, generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])[:b]
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    advantages = torch.randn(b, generator=g)
    return logps, old, ref, mask, advantages


@pytest.mark.parametrize("loss_type,aggregation", [("grpo", "sequence_mean"), ("dr_grpo", "constant"),
                                                   ("bnpo", "token_mean"), ("dapo", "token_mean")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_equals_trls(loss_type, aggregation, beta):
    logps, old, ref, mask, advantages = _batch()
    eps_low, eps_high = 0.2, 0.28  # DAPO's clip-higher
    ours = grpo_policy_loss(logps, old, advantages, mask, eps_low, eps_high, aggregation, max_tokens=7,
                            ref_logps=ref, kl_coef=beta)
    theirs = trl_grpo_loss(logps, old, advantages, mask, loss_type, eps_low, eps_high, beta, ref, 7)
    assert abs(float(ours.loss) - float(theirs)) < 1e-6, (float(ours.loss), float(theirs))
    assert 0 < float(ours.clip_fraction) < 1  # the batch exercises the clipping
    # and the gradients agree too (the loss is what is differentiated)
    a = logps.clone().requires_grad_(True)
    b = logps.clone().requires_grad_(True)
    grpo_policy_loss(a, old, advantages, mask, eps_low, eps_high, aggregation, 7, ref, beta).loss.backward()
    trl_grpo_loss(b, old, advantages, mask, loss_type, eps_low, eps_high, beta, ref, 7).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_group_advantages_equal_trls_and_hand_computations():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 2.5])
    assert torch.allclose(group_advantages(rewards, 4, "grpo"), trl_grpo_advantages(rewards, 4), atol=1e-6)
    assert torch.allclose(group_advantages(rewards, 4, "dr_grpo"), trl_grpo_advantages(rewards, 4, "none"))
    assert torch.allclose(group_advantages(rewards, 4, "rloo"), trl_rloo_advantages(rewards, 4))
    # by hand: group 1 has mean 0.5, unbiased std sqrt(1/3); group 2 mean 1.0, std 1.0
    s = (1 / 3) ** 0.5
    hand_grpo = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4),
                 -0.5 / 1.0001, -0.5 / 1.0001, -0.5 / 1.0001, 1.5 / 1.0001]
    assert torch.allclose(group_advantages(rewards, 4, "grpo"), torch.tensor(hand_grpo), atol=1e-6)
    assert group_advantages(rewards, 4, "dr_grpo").tolist() == [0.5, -0.5, -0.5, 0.5, -0.5, -0.5, -0.5, 1.5]
    # RLOO: r_i minus the mean of the other three
    assert torch.allclose(group_advantages(rewards, 4, "rloo"),
                          torch.tensor([1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3, 0.5 - 3.5 / 3, 0.5 - 3.5 / 3,
                                        0.5 - 3.5 / 3, 2.5 - 0.5]))
    assert equal_reward_groups(torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0]), 2).tolist() == [True, False, True]


def test_reinforce_pp_and_aggregations_by_hand():
    scores = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    adv = reinforce_pp_advantages(scores, kl, mask, 0.5)
    # rewards: row 0: [-0.05, -0.1, -0.15 + 1]; row 1: [-0.2, -0.25 - 1]; returns to go
    returns = torch.tensor([0.7, 0.75, 0.85, -1.45, -1.25])
    whitened = (returns - returns.mean()) / (returns.var() + 1e-8).sqrt()
    assert torch.allclose(adv[mask.bool()], whitened, atol=1e-5) and adv[1, 2] == 0
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    assert aggregate_loss(per_token, mask, "token_mean") == pytest.approx(15 / 5)
    assert aggregate_loss(per_token, mask, "sequence_mean") == pytest.approx((2.0 + 4.5) / 2)
    assert aggregate_loss(per_token, mask, "constant", max_tokens=4) == pytest.approx(15 / 8)
    w = truncated_importance_weights(torch.tensor([[0.0, -1.0]]), torch.tensor([[-2.0, -1.1]]),
                                     torch.tensor([[1.0, 1.0]]), cap=2.0)
    assert w[0, 0] == 2.0 and w[0, 1] == pytest.approx(float(torch.tensor(0.1).exp()))


# ----------------------------------------------------------------------------------------------- the task


def test_arithmetic_task_answers_split_and_reward():
    problems = all_problems()
    assert len({p for p, _ in problems}) == len(problems) > 1000
    for text, solution in problems[:200]:  # every worked solution is right, by the task's own checker
        assert final_number(solution) == answer_of(text) >= 0
    task = load_task("arithmetic", n_eval=50, seed=3)
    assert not set(task.train_prompts) & set(task.eval_prompts) and len(task.eval_prompts) == 50
    assert load_task("arithmetic", n_eval=50, seed=4).eval_prompts != task.eval_prompts  # split by seed
    p = "Mia has 3 apples. She buys 4 more, then gives away 2. How many apples does Mia have now?"
    assert answer_of(p) == 5
    prompt = task.as_prompt(p)  # the mapping a trainer sees, or any text that holds the problem
    assert correct([prompt, p, p], ["3 + 4 = 7. 7 - 2 = 5. The answer is 5.", "7, then 6", "no number"]) == [1, 0, 0]
    assert arithmetic_reward([p, p], ["The answer is 5.", "It is 5"]) == [1.1, 1.0]


# ----------------------------------------------------------------------------------------------- training


def prefers_e(prompts, responses):
    """Toy reward: the fraction of the response's characters that are 'e' (dense on the tiny model's vocabulary)."""
    return [sum(c == "e" for c in r) / max(1, len(r)) for r in responses]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    words = ["movie", "film", "story", "sky", "fox", "dog", "music", "plot", "book", "song", "city", "water"]
    path.write_text("\n".join(f"{t} {w}." for w in words for t in ("Tell me about the", "Describe the")) + "\n")
    return path


def _cfg(tmp_path: Path, name: str, prompts: Path, **kw) -> GRPOConfig:
    base = dict(model="tiny-random", prompts=str(prompts), output_dir=str(tmp_path / name), precision="fp32",
                progress=False, lr=5e-3, batch_size=32, max_new_tokens=8, iterations=2, prompts_per_iteration=4,
                group_size=4, eval_fraction=0.0, save_final=False, log_samples=1, resume="never")
    base.update(kw)
    return GRPOConfig(**base)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_learns_the_toy_reward(tmp_path, prompts_file, advantage):
    """The score (the fraction of 'e') must rise well above where a random tiny policy starts."""
    out = train_grpo(_cfg(tmp_path, advantage, prompts_file, iterations=24, advantage=advantage, clip_high=0.28,
                          lr=1e-2),
                     reward=prefers_e)
    rows = [r for r in _metrics(out) if "score" in r]
    first = sum(r["score"] for r in rows[:3]) / 3
    last = sum(r["score"] for r in rows[-3:]) / 3
    assert last > 2 * first + 0.05, (first, last)
    assert {"dropped_groups", "filtered_overlong", "clip_high_fraction", "time/generation"} <= set(rows[-1])
    assert "kl" not in rows[-1]  # beta = 0: no reference was loaded


def test_kl_in_the_loss_with_several_updates_and_reinforce_pp(tmp_path, prompts_file):
    out = train_grpo(_cfg(tmp_path, "kl", prompts_file, beta=0.1, update_epochs=2, num_mini_batches=2,
                          overlong="penalty", overlong_penalty=0.5, batch_size=4), reward=prefers_e)
    last = _metrics(out)[-1]
    assert last["kl"] > 0 and last["kl_loss"] > 0 and last["reward"] < last["score"]  # cut answers penalised
    out = train_grpo(_cfg(tmp_path, "rpp", prompts_file, advantage="reinforce_pp", group_size=1, beta=0.05,
                          prompts_per_iteration=8), reward=prefers_e)
    assert _metrics(out)[-1]["kl"] > 0 and _metrics(out)[-1]["trained_responses"] > 0
    out = train_grpo(_cfg(tmp_path, "filter", prompts_file, advantage="reinforce_pp", group_size=1,
                          prompts_per_iteration=8, overlong="filter", iterations=1), reward=prefers_e)
    last = _metrics(out)[-1]  # 8 new tokens: most answers are cut, and each is counted
    assert last["filtered_overlong"] > 0
    assert last["filtered_overlong"] + last["trained_responses"] + last["empty_responses"] == 8


def test_equal_reward_groups_are_dropped_and_counted(tmp_path, prompts_file):
    out = train_grpo(_cfg(tmp_path, "flat", prompts_file), reward=lambda p, r: [1.0] * len(r))
    rows = _metrics(out)
    assert [r["dropped_groups"] for r in rows] == [4, 4] and all(r["trained_responses"] == 0 for r in rows)


def test_bf16_sampler_mismatch_is_logged(tmp_path, prompts_file):
    from alignlab.models import resolve_precision

    if resolve_precision("auto") != "bf16":
        pytest.skip("this CPU has no bf16: the sampler is the trained model itself")
    out = train_grpo(_cfg(tmp_path, "bf16", prompts_file, precision="bf16", iterations=1), reward=prefers_e)
    last = _metrics(out)[-1]
    assert 0 < last["mismatch/logp_gap_mean"] <= last["mismatch/logp_gap_max"]
    assert last["mismatch/ratio_max"] >= last["mismatch/ratio_mean"] > 0


def test_arithmetic_task_reward_and_accuracy_are_evaluated(tmp_path):
    out = train_grpo(_cfg(tmp_path, "arith", Path("task:arithmetic:train"), eval_prompts="task:arithmetic:eval",
                          limit=16, reward="task:arithmetic", iterations=1, prompts_per_iteration=2))
    first = _metrics(out)[0]
    assert first["step"] == 0 and 0 <= first["eval/gold"] <= 1 and "eval/gold_ci95" in first


# ----------------------------------------------------------------------------------------------- bad input


def raises(prompts, responses):
    raise ValueError("boom")


def returns_nan(prompts, responses):
    return [float("nan")] * len(responses)


def too_few(prompts, responses):
    return [0.0]


def test_bad_input_is_one_clear_error(tmp_path, prompts_file):
    with pytest.raises(AlignlabError, match="group_size must be at least 2") as e:
        train_grpo(_cfg(tmp_path, "g1", prompts_file, group_size=1), reward=prefers_e)
    assert e.value.field == "group_size"
    with pytest.raises(AlignlabError, match="no_such_module"):
        train_grpo(_cfg(tmp_path, "imp", prompts_file, reward="no_such_module:f"))
    with pytest.raises(AlignlabError, match="raised ValueError: boom"):
        train_grpo(_cfg(tmp_path, "raise", prompts_file), reward=raises)
    with pytest.raises(AlignlabError, match="returned 1 scores for 16"):
        train_grpo(_cfg(tmp_path, "count", prompts_file), reward=too_few)
    with pytest.raises(AlignlabError, match="weights for"):
        train_grpo(_cfg(tmp_path, "w", prompts_file, reward=f"{HERE}:prefers_e", reward_weights=[1.0, 2.0]))
    long = tmp_path / "long.txt"
    long.write_text("short prompt\n" + "word " * 300 + "\n")
    with pytest.raises(AlignlabError, match="max_prompt_length") as e:
        train_grpo(_cfg(tmp_path, "long", long, max_prompt_length=64), reward=prefers_e)
    assert e.value.record == 2


def test_nan_reward_stops_and_keeps_the_last_good_checkpoint(tmp_path, prompts_file):
    calls = {"n": 0}

    def nan_on_third_call(prompts, responses):
        calls["n"] += 1
        return [float("nan") if calls["n"] == 3 else 0.1 * i for i in range(len(responses))]

    cfg = _cfg(tmp_path, "nan", prompts_file, iterations=4, save_every=1)
    with pytest.raises(AlignlabError, match=r"iteration 3: .*nan.*last good checkpoint is .*step-0000002"):
        train_grpo(cfg, reward=nan_on_third_call)
    assert (tmp_path / "nan" / "checkpoints" / "step-0000002").is_dir()


def test_weighted_rewards_from_files(tmp_path, prompts_file):
    """--reward a,b --reward-weights: the score is the weighted sum (here 2 x prefers_e - 1 x prefers_e)."""
    spec = f"{HERE}:prefers_e"
    out = train_grpo(_cfg(tmp_path, "weighted", prompts_file, reward=f"{spec},{spec}", reward_weights=[2.0, -1.0],
                          iterations=1))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["score"] == pytest.approx(prefers_e([s["prompt"]], [s["response"]])[0])
                           for s in samples)


def test_the_lab_on_the_verifiable_task(tmp_path):
    """``demo --task arithmetic``: the RL methods and best-of-n run on the checked reward; gold = accuracy."""
    from alignlab.config import VERIFIABLE_METHODS, quick_config
    from alignlab.lab.pipeline import run_lab

    cfg = quick_config(task="arithmetic", output_root=str(tmp_path), curve_points=0, progress=False)
    report = run_lab(cfg)
    assert cfg.methods == VERIFIABLE_METHODS == ["ppo", "grpo", "rloo", "rs", "bon"]
    rows = json.loads((report.parent / "summary.json").read_text())
    assert [r["method"] for r in rows] == ["sft", *VERIFIABLE_METHODS]
    assert all(r["gold"] in {i / 8 for i in range(9)} for r in rows)  # accuracy on 8 held-out problems
    grpo = json.loads((report.parent / "grpo" / "stage.json").read_text())
    assert grpo["params"]["reward"] == "verifiable"
    assert "verifiable reward itself" in report.read_text()
