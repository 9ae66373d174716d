"""PPO: EOS truncation and score placement, the shaped reward by hand, a toy task PPO must learn, the adaptive KL
controller, exact resume, the value-model options, bad prompts and bad reward functions, NaN stop, the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from alignlab.cli import main as cli_main
from alignlab.config import PPOConfig
from alignlab.errors import AlignlabError
from alignlab.generation import cut_response
from alignlab.losses.ppo import kl_penalty
from alignlab.models import load_model
from alignlab.train import ppo as ppo_module
from alignlab.train.checkpoints import list_checkpoints
from alignlab.train.forward import aligned_logits
from alignlab.train.loop import NonFiniteError
from alignlab.train.ppo import (
    PolicyAndValue,
    RunningMoments,
    collate_rollout,
    penalize_unfinished,
    prompt_batches,
    scores_on_last_token,
    shaped_rewards,
    train_ppo,
)

HERE = Path(__file__).resolve()
WORDS = ["movie", "film", "story", "day", "sky", "fox", "dog", "music", "ending", "plot", "answer", "question",
         "text", "sentence", "water", "capital", "city", "friend", "book", "song"]
TEMPLATES = ["Tell me about the {}.", "Write a line about the {}.", "What do you think of the {}?",
             "Describe the {}.", "Why is the {} good?"]


# ----------------------------------------------------------------------------------------------- rewards


def frac_e(prompts, responses):
    """The toy task: the fraction of the response's characters that are the letter 'e' (dense: many tokens of
    the tiny model's vocabulary contain an 'e', so a random policy scores ~0.08 and there is room up to 1)."""
    return [sum(c == "e" for c in r) / max(1, len(r)) for r in responses]


def raises(prompts, responses):
    raise ValueError("boom")


def returns_nan(prompts, responses):
    return [float("nan")] * len(responses)


def wrong_count(prompts, responses):
    return [0.0] * (len(responses) + 1)


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is several times faster than contended two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(t.format(w) for w in WORDS for t in TEMPLATES[:3]) + "\n")  # 60 prompts
    return path


def _cfg(tmp_path: Path, name: str, prompts: Path, **kw) -> PPOConfig:
    base = dict(policy="tiny-random", prompts=str(prompts), output_dir=str(tmp_path / name), precision="fp32",
                progress=False, schedule="constant", lr=5e-3, batch_size=32, max_new_tokens=8, iterations=2,
                eval_fraction=0.25, save_final=False, log_samples=2)
    base.update(kw)
    return PPOConfig(**base)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "score" in r]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# ----------------------------------------------------------------------------------------------- pure parts


def test_eos_truncation_and_score_placement_on_padded_batches(tiny_tokenizer):
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    # what generate returns for three prompts of different lengths: padding after EOS, and one response that
    # hit the length limit
    raw = [[11, 12, eos, pad, pad, pad], [21, 22, 23, 24, 25, 26], [31, eos, 32, eos, pad, pad]]
    cut = [cut_response(r, eos, pad, tiny_tokenizer) for r in raw]
    responses = [ids for ids, _ in cut]
    finished = torch.tensor([f for _, f in cut])
    assert responses == [[11, 12, eos], [21, 22, 23, 24, 25, 26], [31, eos]]
    assert finished.tolist() == [True, False, True]

    prompts = [[1, 5], [1, 6, 7, 8], [1]]
    batch = collate_rollout(prompts, responses, pad)
    mask = batch.loss_mask
    assert mask.shape == (3, 6)
    assert mask.long().sum(-1).tolist() == [3, 6, 2]
    for row, ids in enumerate(responses):  # every response starts at column 0 of the kept columns
        assert batch.targets[row, : len(ids)].tolist() == ids

    scores = penalize_unfinished(torch.tensor([1.0, 2.0, 3.0]), finished, penalty=0.5)
    assert scores.tolist() == [1.0, 1.5, 3.0]  # only the response that never finished pays
    placed = scores_on_last_token(scores, mask)
    expected = torch.zeros(3, 6)
    expected[0, 2], expected[1, 5], expected[2, 1] = 1.0, 1.5, 3.0  # on the last real token, EOS included
    assert torch.equal(placed, expected)


def test_shaped_reward_is_score_on_last_token_minus_beta_kl_by_hand():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -9.0, -9.0]])  # row 1's last column is padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([2.0, -1.0])
    beta = 0.1
    rewards, kl = shaped_rewards(scores, logps, ref, mask, beta, "k1")
    k1 = [[0.5, -1.0, 0.0], [-0.2, 8.3, 0.0]]  # logp - ref_logp, 0 on padding
    by_hand = [[-beta * 0.5, -beta * -1.0, -beta * 0.0 + 2.0], [-beta * -0.2, -beta * 8.3 - 1.0, 0.0]]
    assert torch.allclose(kl, torch.tensor(k1))
    assert torch.allclose(rewards, torch.tensor(by_hand))
    rewards3, kl3 = shaped_rewards(scores, logps, ref, mask, beta, "k3")
    r = torch.exp(ref - logps)  # k3 = (r - 1) - log r with r = ref / pi
    assert torch.allclose(kl3, ((r - 1) - torch.log(r)) * mask)
    assert (kl3 >= 0).all()
    assert torch.allclose(rewards3, -beta * kl3 + scores_on_last_token(scores, mask))
    assert torch.allclose(kl3, kl_penalty(logps, ref, "k3") * mask)


def test_running_moments_and_prompt_batches():
    running = RunningMoments()
    data = torch.randn(50, dtype=torch.float64) * 3 + 1
    for chunk in data.split(7):
        running.update(chunk)
    assert math.isclose(running.mean, data.mean().item(), rel_tol=1e-9)
    assert math.isclose(running.var, data.var(unbiased=False).item(), rel_tol=1e-9)
    plan = prompt_batches(10, 4, 6, seed=0)
    assert plan == prompt_batches(10, 4, 6, seed=0) and len(plan) == 6
    assert sorted(plan[0] + plan[1] + plan[2][:2]) == list(range(10))  # one epoch covers every prompt once


def test_shared_backbone_logits_match_the_policy(tiny_tokenizer):
    policy = load_model("tiny-random")
    model = PolicyAndValue(policy, value_head=torch.nn.Linear(policy.config.hidden_size, 1, bias=False))
    batch = collate_rollout([[1, 5, 6], [1, 7]], [[8, 9, 2], [10]], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        logits, values = model(batch.input_ids, batch.attention_mask, batch.position_ids, batch.keep)
        assert torch.allclose(logits, aligned_logits(policy, batch), atol=1e-5)
    assert values.shape == batch.loss_mask.shape


def test_shared_prompt_rollouts_give_the_aligned_numbers(tiny_tokenizer):
    """Rows sharing a prompt, encoded after one copy of it, give the old log-probs, entropies, values and reference
    log-probs of the aligned layout (fp32), with a shared value head and with a separate critic; and the
    training forward (the update's) agrees as well."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from alignlab.train.forward import shared_prompt_layout
    from alignlab.train.ppo import prompt_groups, rollout_forward

    torch.manual_seed(0)
    policy = load_model("tiny-random")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))  # the policy has moved away from the reference
    reference = load_model("tiny-random").eval()
    critic = load_model("tiny-random", head="score", tokenizer=tiny_tokenizer)
    prompts = [[1, 5, 6]] * 3 + [[1, 7]] + [[1, 9, 9, 4]] * 2
    responses = [[8, 9, 2], [10], [11, 12, 13, 14], [15, 16], [17], [18, 19, 20]]
    assert prompt_groups(prompts) == [[0, 1, 2], [3], [4, 5]]
    run = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m, autocast=nullcontext),
                          device=torch.device("cpu"))
    cfg = PPOConfig(batch_size=4, temperature=0.7)
    for model in (PolicyAndValue(policy, value_head=torch.nn.Linear(policy.config.hidden_size, 1)),
                  PolicyAndValue(policy, critic=critic)):
        model.eval()
        layout = shared_prompt_layout(model)
        assert layout == {"segments": True}  # sdpa models run segment attention
        aligned = rollout_forward(model, reference, prompts, responses, 0, cfg, run)
        shared = rollout_forward(model, reference, prompts, responses, 0, cfg, run, layout)
        for a, b in zip(aligned, shared):
            assert a.shape == b.shape
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
        assert aligned[0].abs().sum() > 0 and not torch.allclose(aligned[0], aligned[3])
        with torch.no_grad():
            batch = collate_rollout(prompts, responses, 0, layout)
            logits, values = model(**batch.inputs, keep=batch.keep, predictors=batch.predictors)
        assert torch.allclose(values * batch.loss_mask, shared[2], atol=1e-5)


# ----------------------------------------------------------------------------------------------- learning


def test_toy_task_ppo_raises_the_reward(tmp_path, prompts_file):
    cfg = _cfg(tmp_path, "toy", prompts_file, iterations=24, kl_coef=0.01, eval_every=12)
    out = train_ppo(cfg, reward=frac_e)
    rows = _metrics(out)
    train = _train_rows(rows)
    first, last = _mean(r["score"] for r in train[:4]), _mean(r["score"] for r in train[-4:])
    assert first < 0.15 and last > 2 * first + 0.05, (first, last)
    evals = [r["eval/score"] for r in rows if "eval/score" in r]
    assert len(evals) == 3  # before training, half-way, at the end
    assert evals[-1] > evals[0] + 0.1, evals
    assert all(r["kl"] == r["kl"] for r in train) and train[-1]["kl"] > 0
    logged = {"score", "kl", "reward", "entropy", "clip_fraction", "approx_kl", "value_loss", "explained_variance",
              "response_length", "time/generation", "time/scoring", "time/update", "eval/kl"}
    assert logged <= set().union(*rows)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {"prompt", "response", "score"} <= set(samples[0]) and {s["split"] for s in samples} == {"train", "eval"}


def test_several_responses_per_prompt_learn_the_toy_task(tmp_path, prompts_file):
    """responses_per_prompt=4: 8 prompts x 4 responses per rollout, each prompt encoded once in the forward passes
    (micro-batches of 8 under gradient accumulation); the reward still rises."""
    cfg = _cfg(tmp_path, "k4", prompts_file, iterations=24, kl_coef=0.01, eval_fraction=0.0, responses_per_prompt=4,
               share_backbone=True, batch_size=16, grad_accum=2)
    train = _train_rows(_metrics(train_ppo(cfg, reward=frac_e)))
    first, last = _mean(r["score"] for r in train[:4]), _mean(r["score"] for r in train[-4:])
    assert first < 0.15 and last > 2 * first + 0.05, (first, last)
    with pytest.raises(AlignlabError, match="multiple of responses_per_prompt"):
        train_ppo(_cfg(tmp_path, "k5", prompts_file, responses_per_prompt=5), reward=frac_e)


def test_adaptive_kl_keeps_kl_near_its_target(tmp_path, prompts_file):
    target = 2.0
    cfg = _cfg(tmp_path, "adaptive", prompts_file, iterations=36, kl_coef=0.1, target_kl=target, kl_horizon=64,
               eval_fraction=0.0)
    train = _train_rows(_metrics(train_ppo(cfg, reward=frac_e)))
    coefs = [r["kl_coef"] for r in train]
    assert min(coefs) < 0.07 and coefs[0] == 0.1  # the coefficient adapts
    late_kl = _mean(r["kl"] for r in train[-12:])
    assert target / 2 < late_kl < 2 * target, [round(r["kl"], 2) for r in train]


def test_resume_continues_exactly(tmp_path, prompts_file):
    """LoRA (adapter-off reference, LoRA critic), running reward normalisation and an adaptive KL controller: all
    their state goes through the checkpoint, and the random streams continue."""
    kw = dict(iterations=4, save_every=2, batch_size=4, grad_accum=2, num_mini_batches=2, ppo_epochs=2, lora=True,
              lora_r=4, kl_coef=0.05, target_kl=1.0, kl_horizon=32, reward_normalization="running", eval_every=2,
              unfinished_penalty=0.1)
    full_cfg = _cfg(tmp_path, "full", prompts_file, **kw, save_final=True)
    full = train_ppo(full_cfg, reward=frac_e)
    # the last checkpoint read back as a policy (PPO saves it under "policy.", beside the critic) is the final model
    from alignlab.models import load_tokenizer
    from alignlab.train.policy import policy_from_checkpoint

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    restored = policy_from_checkpoint(full_cfg, full / "checkpoints" / "step-0000004", load_tokenizer("tiny-random"),
                                      prefix="policy.")
    earlier = policy_from_checkpoint(full_cfg, full / "checkpoints" / "step-0000002", load_tokenizer("tiny-random"),
                                     prefix="policy.")
    with torch.no_grad():
        final_logits = load_model(full / "final")(ids).logits
        assert torch.allclose(restored(ids).logits, final_logits, atol=1e-5)
        assert not torch.allclose(earlier(ids).logits, final_logits, atol=1e-3)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-0000002", resumed_dir / "checkpoints" / "step-0000002")
    shutil.copy(full / "run.json", resumed_dir / "run.json")  # the same run (a folder without one is refused)
    resumed = train_ppo(_cfg(tmp_path, "resumed", prompts_file, **kw), reward=frac_e)

    def comparable(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows if r["step"] > 2]

    expected, got = comparable(_metrics(full)), comparable(_metrics(resumed))
    assert [r["step"] for r in got] == [3, 4] and len(expected) == len(got)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert [p.name for p in list_checkpoints(resumed / "checkpoints")] == ["step-0000002", "step-0000004"]


def test_value_model_from_a_reward_model_and_its_stats(tmp_path, prompts_file, tiny_tokenizer):
    """A reward-model folder drives PPO, initialises the critic (its score head) and normalises the scores with
    its reward_stats.json; the first PPO epoch starts at ratio 1 (old log-probs reused exactly)."""
    rm = load_model("tiny-random", head="score", tokenizer=tiny_tokenizer)
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    folder = tmp_path / "rm"
    rm.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    (folder / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0}))
    cfg = _cfg(tmp_path, "rm-run", prompts_file, reward_model=str(folder),
               iterations=1, ppo_epochs=1, reward_normalization="stats", reward_clip=0.2, eval_fraction=0.0,
               batch_size=8, save_every=1)
    row = _train_rows(_metrics(train_ppo(cfg)))[0]
    assert row["clip_fraction"] == 0.0 and row["approx_kl"] == pytest.approx(0.0, abs=1e-10)
    assert abs(row["score_shaped"]) <= 0.2 + 1e-6  # normalised by the stats, then clipped
    from safetensors.torch import load_file

    saved = load_file(str(cfg_checkpoint(cfg) / "trainable.safetensors"))
    assert "critic.score.weight" in saved and "value_head.weight" not in saved

    shared = _cfg(tmp_path, "shared", prompts_file, reward=f"{HERE}:frac_e", share_backbone=True, iterations=1,
                  batch_size=8, eval_fraction=0.0, save_every=1)
    row = _train_rows(_metrics(train_ppo(shared)))[0]
    assert row["approx_kl"] >= 0 and "value_head.weight" in load_file(
        str(cfg_checkpoint(shared) / "trainable.safetensors"))


def cfg_checkpoint(cfg: PPOConfig) -> Path:
    return list_checkpoints(Path(cfg.output_dir) / "checkpoints")[-1]


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn, words", [("raises", ["raises", "ValueError", "boom"]),
                                       ("returns_nan", ["returns_nan", "nan"]),
                                       ("wrong_count", ["wrong_count", "9 scores for 8"])])
def test_reward_function_errors_name_the_function(tmp_path, prompts_file, fn, words):
    cfg = _cfg(tmp_path, fn, prompts_file, reward=f"{HERE}:{fn}", iterations=1, batch_size=8, eval_fraction=0.0)
    with pytest.raises(AlignlabError) as info:
        train_ppo(cfg)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_bad_prompts_are_clear(tmp_path, prompts_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(AlignlabError, match="no prompts"):
        train_ppo(_cfg(tmp_path, "empty", empty, reward=f"{HERE}:frac_e"))
    long = tmp_path / "long.txt"
    long.write_text("Hello\n" + "word " * 400 + "\nWhy?\n")
    with pytest.raises(AlignlabError) as info:
        train_ppo(_cfg(tmp_path, "long", long, reward=f"{HERE}:frac_e", max_prompt_length=64))
    assert "record 2" in str(info.value) and "max_prompt_length is 64" in str(info.value)
    out = train_ppo(_cfg(tmp_path, "dropped", long, reward=f"{HERE}:frac_e", max_prompt_length=64,
                         long_prompts="drop", iterations=1, batch_size=2, eval_fraction=0.0))
    assert _train_rows(_metrics(out))
    with pytest.raises(AlignlabError, match="exactly one of"):
        train_ppo(_cfg(tmp_path, "noreward", prompts_file))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, prompts_file, monkeypatch):
    real = ppo_module.ppo_policy_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if calls["n"] > 4 else out  # iteration 2 goes bad

    monkeypatch.setattr(ppo_module, "ppo_policy_loss", poisoned)
    cfg = _cfg(tmp_path, "nan", prompts_file, reward=f"{HERE}:frac_e", iterations=3, batch_size=8, save_every=1,
               eval_fraction=0.0)
    with pytest.raises(NonFiniteError, match="step-0000001"):
        train_ppo(cfg)
    assert [p.name for p in list_checkpoints(tmp_path / "nan" / "checkpoints")] == ["step-0000001"]


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_runs_ppo_and_reports_errors(tmp_path, prompts_file, capsys):
    out = tmp_path / "cli"
    code = cli_main(["ppo", "--policy", "tiny-random", "--reward", f"{HERE}:frac_e", "--prompts", str(prompts_file),
                     "--output-dir", str(out), "--iterations", "1", "--batch-size", "8", "--max-new-tokens", "6",
                     "--precision", "fp32", "--progress", "false", "--stop-strings", "\\n,###",
                     "eval_fraction=0.1", "lora=true"])
    assert code == 0
    assert (out / "final" / "config.json").exists() and _train_rows(_metrics(out))
    code = cli_main(["ppo", "--policy", "tiny-random", "--reward", f"{HERE}:missing_function",
                     "--prompts", str(prompts_file), "--output-dir", str(tmp_path / "bad"), "--precision", "fp32"])
    assert code == 2 and "missing_function" in capsys.readouterr().err


def test_builtin_sentiment_reward():
    from alignlab.scoring import load_scorer

    scorer = load_scorer("alignlab.reward_functions:sentiment")
    good, bad, flat = scorer.score(["a"] * 3, ["I love it, wonderful!", "This is awful and sad.", "It is a table."])
    assert good > 0.5 and bad < -0.5 and flat == 0.0
