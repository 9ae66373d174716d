"""The reward model: last-token scoring, learning a synthetic preference, K-wise vs pairs, LoRA, stats, the
Python scorer, ``rm score`` and exact resume."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHARED, needs_shared

from alignlab.cli import main as cli_main
from alignlab.config import RewardConfig
from alignlab.data.preference import PreferenceRecord, expand_to_pairs
from alignlab.errors import AlignlabError
from alignlab.losses.reward_model import bradley_terry_loss, kwise_ranking_loss
from alignlab.models import load_model, load_tokenizer
from alignlab.scoring import (
    ModelScorer,
    fit_to_length,
    load_scorer,
    pad_right,
    prepare_reward_tokenizer,
    score_last_token,
)
from alignlab.train.checkpoints import list_checkpoints
from alignlab.train.reward_model import (
    collate_rankings,
    encode_preferences,
    ranking_rewards,
    rewards_grid,
    train_reward,
)

GOOD = ["great", "wonderful", "lovely", "delightful", "beautiful", "happy"]
BAD = ["awful", "terrible", "boring", "hated", "long", "bad"]
SUBJECTS = ["movie", "film", "story", "music", "day", "ending", "acting", "dialogue"]
PROMPTS = ["Tell me about the {}.", "What did you think of the {}?", "Describe the {}.", "How was the {}?"]


def _pair(rng: random.Random) -> dict:
    subject = rng.choice(SUBJECTS)
    good, bad = rng.choice(GOOD), rng.choice(BAD)
    filler = rng.choice(["I think", "Honestly,", "Well,", "To me"])
    return {
        "prompt": rng.choice(PROMPTS).format(subject),
        "chosen": f"{filler} the {subject} was {good}.",
        "rejected": f"{filler} the {subject} was {bad}.",
    }


def _ranking(rng: random.Random, k: int) -> dict:
    subject = rng.choice(SUBJECTS)
    # more good words is better: k responses with k-1 .. 0 good words among k-1 slots
    responses = []
    for goods in range(k - 1, -1, -1):
        words = [rng.choice(GOOD) for _ in range(goods)] + [rng.choice(BAD) for _ in range(k - 1 - goods)]
        responses.append(f"The {subject} was " + " and ".join(words) + f" #{goods}.")
    return {"prompt": rng.choice(PROMPTS).format(subject), "responses": responses}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _pairs_file(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    return _write_jsonl(path, [_pair(rng) for _ in range(n)])


def _cfg(tmp_path: Path, name: str, **kw) -> RewardConfig:
    base = dict(model="tiny-random", output_dir=str(tmp_path / name), batch_size=8, lr=3e-3, precision="fp32",
                progress=False, warmup_ratio=0.0, max_length=64, eval_fraction=0.0, save_final=False)
    base.update(kw)
    return RewardConfig(**base)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on a shared CPU spinning threads cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_rm(tiny_tokenizer):
    torch.manual_seed(0)
    tok = prepare_reward_tokenizer(load_tokenizer("tiny-random"))
    model = load_model("tiny-random", head="score", tokenizer=tok).eval()
    return model, tok


# ------------------------------------------------------------------------------------------ scoring


def test_score_sits_on_the_last_real_token(tiny_rm):
    model, tok = tiny_rm
    texts = ["The movie was great.", "The film was terrible, boring and far too long. I hated it.", "Hi"]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    with torch.no_grad():
        alone = [score_last_token(model, *pad_right([s], tok.pad_token_id)).item() for s in seqs]
        batched = score_last_token(model, *pad_right(seqs, tok.pad_token_id)).tolist()
        # the score is the head's value at the last real token (the EOS), read from the full hidden states
        ids, mask = pad_right(seqs, tok.pad_token_id)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        by_hand = [model.score(hidden[i, len(s) - 1]).item() for i, s in enumerate(seqs)]
    assert len(set(round(a, 4) for a in alone)) == 3  # a random head still tells the sequences apart
    assert batched == pytest.approx(alone, abs=1e-5)
    assert by_hand == pytest.approx(alone, abs=1e-5)
    assert tok.pad_token_id != tok.eos_token_id


def test_scorer_encodes_a_shared_prompt_once_with_the_same_scores(tiny_rm):
    """Several responses per prompt (best-of-n, rejection sampling) are scored with each prompt encoded once;
    the scores equal scoring every pair alone, in fp32, whatever the grouping and order."""
    scorer = ModelScorer(*tiny_rm, template="none", max_length=64, batch_size=5)
    prompts = ["Review: the film", "Review: the film", "Another prompt here", "Review: the film",
               "Another prompt here", "Lonely prompt", "Review: the film"]
    responses = ["was great.", "was awful and long.", "Fine", "was great.", "Not fine at all", "ok", "w"]
    shared = scorer.score(prompts, responses)
    alone = [scorer.score([p], [r])[0] for p, r in zip(prompts, responses)]
    assert len(set(round(a, 4) for a in alone)) >= 5
    assert shared == pytest.approx(alone, abs=1e-5)
    assert shared[0] == pytest.approx(shared[3], abs=1e-6)  # the same pair, two places in the batch


def test_score_sequences_encodes_a_common_preamble_once_with_the_same_scores(tiny_rm):
    """Sequences that start with the same preamble (a template's text): scored with the preamble encoded once
    (fewer tokens embedded), each score equal to the sequence's own plain forward (1e-5)."""
    from alignlab.data.tokenize import SHARED_PREFIX_MIN
    from alignlab.scoring import score_sequences

    model, tok = tiny_rm
    preamble = tok("Below is an instruction that describes a task, paired with an input.",
                   add_special_tokens=False)["input_ids"]
    assert len(preamble) >= SHARED_PREFIX_MIN
    texts = ["The movie was great.", "Terrible, boring and far too long. I hated it.", "Hi", "Fine"]
    seqs = [preamble + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    embedded = {"tokens": 0}
    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, args: embedded.__setitem__("tokens", embedded["tokens"] + args[0].numel()))
    try:
        scores = score_sequences(model, seqs, tok.pad_token_id, batch_size=4)
        tokens = embedded["tokens"]
    finally:
        hook.remove()
    with torch.no_grad():
        alone = [score_last_token(model, *pad_right([s], tok.pad_token_id)).item() for s in seqs]
    assert scores == pytest.approx(alone, abs=1e-5)
    assert tokens == len(preamble) + 4 * (max(len(s) for s in seqs) - len(preamble))


def test_pad_equal_to_eos_is_fixed_or_refused(tiny_rm):
    _, tok = tiny_rm
    other = load_tokenizer("tiny-random")
    other.pad_token = other.eos_token
    prepare_reward_tokenizer(other)
    assert other.pad_token_id not in (None, other.eos_token_id)
    with pytest.raises(AlignlabError, match="ends with the pad token"):
        pad_right([[5, 6, tok.pad_token_id]], tok.pad_token_id)


def test_truncation_policies():
    prompt, completion = [1, 10, 11, 12], [20, 21, 2]
    assert fit_to_length(prompt, completion, max_length=10, truncation="right", bos_token_id=1) == (
        prompt + completion, None)
    assert fit_to_length(prompt, completion, max_length=5, truncation="right", bos_token_id=1) == (
        [1, 10, 11, 12, 20], "truncated")
    assert fit_to_length(prompt, completion, max_length=5, truncation="left", bos_token_id=1) == (
        [1, 12, 20, 21, 2], "truncated")
    assert fit_to_length(prompt, completion, max_length=5, truncation="drop", bos_token_id=1)[0] is None
    assert fit_to_length(prompt, completion, max_length=4, truncation="right", bos_token_id=1) == (
        None, "prompt fills max_length")


def test_kwise_loss_equals_mean_of_expanded_pairs(tiny_rm):
    model, tok = tiny_rm
    rng = random.Random(1)
    records = [PreferenceRecord(**_ranking(rng, k), record=i + 1) for i, k in enumerate([4, 2, 3, 5])]
    examples, _ = encode_preferences(records, tok, template="none", max_length=128)
    with torch.no_grad():
        batch = collate_rankings(examples, tok.pad_token_id)  # each prompt encoded once
        assert batch.encoded < batch.tokens
        rewards = rewards_grid(ranking_rewards(model, batch), batch.mask)
        kwise = kwise_ranking_loss(rewards, mask=batch.mask)  # (b,)
        pairs = expand_to_pairs(records)
        pair_examples, _ = encode_preferences(pairs, tok, template="none", max_length=128)
        pair_batch = collate_rankings(pair_examples, tok.pad_token_id, shared=False)  # one padded row each
        pair_rewards = rewards_grid(score_last_token(model, pair_batch.input_ids, pair_batch.attention_mask),
                                    pair_batch.mask)
        pair_losses = bradley_terry_loss(pair_rewards[:, 0], pair_rewards[:, 1])
    assert batch.mask.sum(-1).tolist() == [4, 2, 3, 5]
    start = 0
    for prompt, k in enumerate([4, 2, 3, 5]):
        n = k * (k - 1) // 2
        assert kwise[prompt].item() == pytest.approx(pair_losses[start : start + n].mean().item(), abs=1e-5)
        start += n
    assert start == len(pairs)


# ------------------------------------------------------------------------------------------ training


def test_learns_a_synthetic_preference(tmp_path, tiny_rm):
    data = _pairs_file(tmp_path / "train.jsonl", 160, seed=0)
    held = _pairs_file(tmp_path / "held.jsonl", 64, seed=123)
    pairs = [json.loads(line) for line in held.read_text().splitlines()]
    untrained = ModelScorer(*tiny_rm, template="none", max_length=64)
    chosen = untrained.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = untrained.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(pairs) < 0.75  # a fresh head is no judge
    cfg = _cfg(tmp_path, "learn", data=str(data), eval_data=str(held), max_steps=20, eval_every=10,
               center_rewards_coef=0.01, save_final=True)
    run = train_reward(cfg)
    evals = [m for m in _metrics(run) if "eval_accuracy" in m]
    assert len(evals) == 2
    assert evals[-1]["eval_accuracy"] > 0.9, evals
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] or evals[0]["eval_accuracy"] > 0.9
    stats = json.loads((run / "final" / "reward_stats.json").read_text())
    assert stats == json.loads((run / "reward_stats.json").read_text())
    assert stats["count"] == 2 * 160 and stats["std"] > 0.1
    assert abs(stats["mean"]) < 3 * stats["std"]  # centring keeps the offset small
    assert stats["quantiles"]["p05"] <= stats["quantiles"]["p50"] <= stats["quantiles"]["p95"]
    assert stats["encoding"] == {"template": "none", "max_length": 64, "truncation": "right"}
    assert (run / "reward_hist.png").stat().st_size > 1000
    held_out = json.loads((run / "eval_stats.json").read_text())
    assert held_out["eval_accuracy"] == evals[-1]["eval_accuracy"] and held_out["prompts"] == 64
    assert held_out["best"]["mean"] > held_out["worst"]["mean"] and held_out["scores"]["count"] == 128
    # the saved model scores the held-out file as the trainer did, and rm score writes the same numbers
    scored = [json.loads(line) for line in (run / "eval_scores.jsonl").read_text().splitlines()]
    out = tmp_path / "held.scored.jsonl"
    assert cli_main(["rm", "score", "--model", str(run / "final"), "--data", str(held), "--output", str(out)]) == 0
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(again) == 64 and [a["responses"] for a in again] == [s["responses"] for s in scored]
    for a, s in zip(again, scored):
        assert a["rewards"] == pytest.approx(s["rewards"], abs=1e-4)
    # normalised scores use the stats
    scorer = load_scorer(run / "final", normalize=True)
    raw = load_scorer(run / "final").score([again[0]["prompt"]], [again[0]["responses"][0]])[0]
    norm = scorer.score([again[0]["prompt"]], [again[0]["responses"][0]])[0]
    assert norm == pytest.approx((raw - stats["mean"]) / stats["std"], abs=1e-5)


def test_rankings_train_and_report_top1_and_tau(tmp_path):
    rng = random.Random(3)
    data = _write_jsonl(tmp_path / "rank.jsonl", [_ranking(rng, rng.choice([2, 3, 4])) for _ in range(40)])
    run = train_reward(_cfg(tmp_path, "rank", data=str(data), eval_fraction=0.25, max_steps=2, batch_size=4))
    last = _metrics(run)[-1]
    for key in ("eval_accuracy", "eval_top1_accuracy", "eval_kendall_tau", "eval_reward_std"):
        assert key in last
    assert -1 <= last["eval_kendall_tau"] <= 1
    # expand_pairs trains on pairs but evaluates the same held-out rankings
    expanded = train_reward(_cfg(tmp_path, "rank-pairs", data=str(data), eval_fraction=0.25, max_steps=2,
                                 batch_size=4, expand_pairs=True))
    assert "eval_kendall_tau" in _metrics(expanded)[-1]
    held = [json.loads(x)["record"] for x in (run / "eval_scores.jsonl").read_text().splitlines()]
    held2 = [json.loads(x)["record"] for x in (expanded / "eval_scores.jsonl").read_text().splitlines()]
    assert held == held2 and len(held) == 10


def test_margin_needs_a_margin_column(tmp_path):
    data = _pairs_file(tmp_path / "p.jsonl", 8)
    with pytest.raises(AlignlabError, match="no record has a margin"):
        train_reward(_cfg(tmp_path, "m", data=str(data), max_steps=1, margin="margin"))
    rows = [dict(json.loads(x), margin=float(i % 3)) for i, x in enumerate(data.read_text().splitlines())]
    run = train_reward(_cfg(tmp_path, "m2", data=str(_write_jsonl(tmp_path / "m.jsonl", rows)), max_steps=1,
                            margin="margin"))
    assert _metrics(run)[0]["loss"] > 0


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state (mixed precision included): reset it around a bf16 run."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_lora_keeps_base_weights_and_saves_the_score_head(tmp_path, fresh_accelerator_state):
    data = _pairs_file(tmp_path / "train.jsonl", 32)
    held = _pairs_file(tmp_path / "held.jsonl", 8, seed=9)
    # bf16 training: held-out scores and stats are still computed in fp32, as a reloaded scorer computes them
    run = train_reward(_cfg(tmp_path, "lora", data=str(data), eval_data=str(held), max_steps=4, lora=True,
                            lora_r=4, merge_lora=False, save_final=True, precision="bf16"))
    from safetensors.torch import load_file

    checkpoint = load_file(str(list_checkpoints(run / "checkpoints")[-1] / "trainable.safetensors"))
    assert checkpoint and all("lora_" in k or "score" in k for k in checkpoint)
    assert any("score" in k for k in checkpoint)
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert any("score" in k for k in adapter)
    # the adapter reloads on the untouched base model
    tok = prepare_reward_tokenizer(load_tokenizer("tiny-random"))
    base = load_model("tiny-random", head="causal_lm").state_dict()
    reloaded = load_model(run / "final", head="score", tokenizer=tok)
    for name, value in reloaded.named_parameters():
        if "base_layer" in name or ("lora_" not in name and "score" not in name):
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(value, base[key], rtol=0, atol=0)
    # reloading gives the trainer's scores, from the adapter and from the merged model
    scored = [json.loads(line) for line in (run / "eval_scores.jsonl").read_text().splitlines()]
    prompts = [s["prompt"] for s in scored for _ in s["responses"]]
    responses = [r for s in scored for r in s["responses"]]
    expected = [v for s in scored for v in s["rewards"]]
    assert load_scorer(run / "final").score(prompts, responses) == pytest.approx(expected, abs=1e-5)
    merged = ModelScorer(reloaded.merge_and_unload(), tok, template="none", max_length=64)
    assert merged.score(prompts, responses) == pytest.approx(expected, abs=1e-4)


def test_resume_gives_the_same_losses(tmp_path):
    data = _pairs_file(tmp_path / "train.jsonl", 48)
    straight = _metrics(train_reward(_cfg(tmp_path, "straight", data=str(data), max_steps=6, save_every=3,
                                          batch_size=4, eval_fraction=0.2)))
    out = tmp_path / "killed"
    args = ["rm", "train", "--model", "tiny-random", "--data", str(data), "--output-dir", str(out),
            "max_steps=6", "save_every=3", "batch_size=4", "eval_fraction=0.2", "lr=3e-3", "precision=fp32",
            "progress=false", "warmup_ratio=0", "max_length=64", "save_final=false"]
    assert cli_main(args) == 0
    ckpts = list_checkpoints(out / "checkpoints")
    assert [c.name for c in ckpts] == ["step-0000003", "step-0000006"]
    shutil.rmtree(ckpts[-1])
    kept = [m for m in _metrics(out) if m["step"] <= 3]
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))
    assert cli_main(args) == 0
    resumed = _metrics(out)
    assert [m["step"] for m in resumed] == [m["step"] for m in straight] == list(range(1, 7))
    for a, b in zip(straight, resumed):
        for key in ("loss", "accuracy", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    assert straight[-1]["eval_accuracy"] == pytest.approx(resumed[-1]["eval_accuracy"])
    assert straight[-1]["eval_loss"] == pytest.approx(resumed[-1]["eval_loss"], rel=1e-6)


def test_accumulation_and_max_tokens_pieces_match_one_big_batch(tmp_path, monkeypatch):
    import alignlab.train.reward_model as reward

    forwards: list[int] = []
    real = reward.ranking_rewards
    monkeypatch.setattr(reward, "ranking_rewards", lambda model, batch: forwards.append(batch.mask.shape[0])
                        or real(model, batch))
    rng = random.Random(5)
    rows = [_ranking(rng, rng.choice([2, 3])) for _ in range(16)]
    data = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    one = _metrics(train_reward(_cfg(tmp_path, "b8", data=str(data), max_steps=2, batch_size=8, max_tokens=0)))
    acc = _metrics(train_reward(_cfg(tmp_path, "b2x4", data=str(data), max_steps=2, batch_size=2, grad_accum=4)))
    forwards.clear()
    cut = _metrics(train_reward(_cfg(tmp_path, "b8cut", data=str(data), max_steps=2, batch_size=8, max_tokens=30)))
    assert len(forwards) > 2 and sum(forwards) == 16  # each step's 8 prompts in several forward passes
    for a, b in [*zip(one, acc), *zip(one, cut)]:
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


# ------------------------------------------------------------------------------------------ python scorers


def test_function_scorer_from_a_file(tmp_path):
    module = tmp_path / "my_rewards.py"
    module.write_text(
        "import math\n"
        "def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n"
        "def boom(prompts, responses):\n"
        "    if any('bad' in r for r in responses):\n        raise ValueError('no bad words')\n"
        "    return [1.0] * len(responses)\n"
        "def short(prompts, responses):\n    return [1.0] * (len(responses) - 1)\n"
        "def nan(prompts, responses):\n    return [0.0, math.nan][: len(responses)]\n"
        "def text(prompts, responses):\n    return ['high' for _ in responses]\n"
        "def scalar(prompts, responses):\n    return 1.0\n"
        "NOT_A_FUNCTION = 3\n"
    )
    scorer = load_scorer(f"{module}:length")
    assert scorer.score(["a", [{"role": "user", "content": "b"}]], ["xy", "xyz"]) == [2.0, 3.0]
    with pytest.raises(AlignlabError, match=r"boom raised ValueError: no bad words \(on item 1"):
        load_scorer(f"{module}:boom").score(["p", "q", "r"], ["good", "bad", "fine"])
    with pytest.raises(AlignlabError, match=r"short returned 1 scores for 2 .*\(item 1 has no score\)"):
        load_scorer(f"{module}:short").score(["p", "q"], ["a", "b"])
    with pytest.raises(AlignlabError, match=r"nan: item 1: the score is nan"):
        load_scorer(f"{module}:nan").score(["p", "q"], ["a", "b"])
    with pytest.raises(AlignlabError, match=r"text: item 0: the score 'high' \(str\) is not a number"):
        load_scorer(f"{module}:text").score(["p"], ["a"])
    with pytest.raises(AlignlabError, match="returned float, expected a list of 1 numbers"):
        load_scorer(f"{module}:scalar").score(["p"], ["a"])
    with pytest.raises(AlignlabError, match="has no function 'missing'"):
        load_scorer(f"{module}:missing")
    with pytest.raises(AlignlabError, match="not callable"):
        load_scorer(f"{module}:NOT_A_FUNCTION")
    with pytest.raises(AlignlabError, match="does not exist"):
        load_scorer(f"{tmp_path / 'nope.py'}:f")
    with pytest.raises(AlignlabError, match="cannot import module"):
        load_scorer("no_such_module_xyz:f")
    with pytest.raises(AlignlabError, match="2 prompts but 1 responses"):
        scorer.score(["a", "b"], ["x"])


def test_rm_score_with_a_function_and_a_non_reward_model(tmp_path):
    module = tmp_path / "r.py"
    module.write_text("def good_words(prompts, responses):\n"
                      "    return [sum(w in r for w in ('great', 'wonderful', 'lovely', 'delightful', 'beautiful',"
                      " 'happy')) for r in responses]\n")
    data = _pairs_file(tmp_path / "d.jsonl", 10)
    out = tmp_path / "scored.jsonl"
    assert cli_main(["rm", "score", "--model", f"{module}:good_words", "--data", str(data), "--output",
                     str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 10 and all(line["rewards"] == [1.0, 0.0] for line in lines)
    # prompt/response records get a score field
    samples = _write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "response": "a great day", "id": 7}])
    assert cli_main(["rm", "score", "--model", f"{module}:good_words", "--data", str(samples), "--output",
                     str(out)]) == 0
    assert json.loads(out.read_text()) == {"prompt": "p", "response": "a great day", "id": 7, "reward": 1.0}
    with pytest.raises(AlignlabError, match="not a reward model"):
        load_scorer("tiny-random")


# ------------------------------------------------------------------------------------------ real data


@needs_shared
@pytest.mark.parametrize("name,expect_rankings", [("oasst_en_100_tree.jsonl", True),
                                                    ("hh_rlhf_helpful_base_test.jsonl.gz", False)])
def test_shared_data_trains_one_step(tmp_path, name, expect_rankings):
    run = train_reward(_cfg(tmp_path, name, data=str(SHARED / name), limit=12, max_steps=1, batch_size=4,
                            max_length=128, eval_fraction=0.25))
    last = _metrics(run)[-1]
    assert last["loss"] > 0 and "eval_accuracy" in last
    assert ("eval_kendall_tau" in last) == expect_rankings
    assert json.loads((run / "reward_stats.json").read_text())["encoding"]["template"] == "chat"
