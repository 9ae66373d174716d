"""Best-of-n and rejection sampling: selection, the KL formula, the k-curve, learning, resume."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from alignlab.config import BoNConfig, RSConfig, build_config
from alignlab.errors import AlignlabError
from alignlab.generation import SamplingConfig, generate
from alignlab.models import load_model, load_tokenizer
from alignlab.train.rejection import (
    best_of_first_k,
    best_of_n_kl,
    expected_best_of_k,
    run_bon,
    run_rs,
    select,
)

REWARD = '''
def spaces(prompts, responses):
    """Fraction of characters that are spaces: easy for a byte-level tiny model to learn."""
    return [r.count(" ") / max(1, len(r)) for r in responses]

def broken(prompts, responses):
    return [float("nan") if "x" in r else 0.0 for r in responses]
'''


@pytest.fixture
def reward_file(tmp_path) -> Path:
    path = tmp_path / "toy_reward.py"
    path.write_text(REWARD)
    return path


def test_selection_argmax_topk_threshold_with_ties():
    scores = [0.5, 0.9, 0.9, 0.1]
    assert select(scores) == [1]  # tie: the earliest
    assert select(scores, mode="top_k", top_k=3) == [1, 2, 0]
    assert select(scores, mode="threshold", threshold=0.5) == [1, 2, 0]
    with pytest.raises(AlignlabError):
        select(scores, mode="median")


def test_analytic_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    with pytest.raises(AlignlabError, match="at least 1"):
        best_of_n_kl(0)


def test_subsampled_best_of_k_equals_direct_best_of_k():
    scores = [0.3, -0.2, 0.8, 0.1, 0.5, 0.8, -1.0]
    for k in range(1, len(scores) + 1):
        subsets = list(itertools.combinations(scores, k))
        brute = sum(max(s) for s in subsets) / len(subsets)
        assert expected_best_of_k(scores, k) == pytest.approx(brute)
        assert best_of_first_k(scores, k) == max(scores[:k])


def test_bon_writes_every_sample_and_marks_the_best(tmp_path, reward_file):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The movie\nI think\n")
    cfg = build_config(BoNConfig, overrides=dict(model="tiny-random", reward=f"{reward_file}:spaces",
                                                 prompts=str(prompts), n=4, max_new_tokens=6, template="none",
                                                 output_dir=str(tmp_path / "bon")))
    summary = run_bon(cfg)
    rows = [json.loads(line) for line in (tmp_path / "bon" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for p in (0, 1):
        group = [r for r in rows if r["prompt_index"] == p]
        kept = [r for r in group if r["kept"]]
        assert len(kept) == 1 and kept[0]["score"] == max(r["score"] for r in group)
    rewards = [pt["reward"] for pt in summary["curve"]]
    assert rewards == sorted(rewards)  # the expected best of k never falls with k
    assert [pt["n"] for pt in summary["curve"]] == [1, 2, 4]


def test_nan_reward_is_an_error_or_a_counted_skip(tmp_path, reward_file):
    from alignlab.scoring import load_scorer

    scorer = load_scorer(f"{reward_file}:broken")
    with pytest.raises(AlignlabError, match="broken"):
        scorer.score(["p"], ["x"])


def test_two_rounds_raise_the_reward_and_resume(tmp_path, reward_file):
    prompts = tmp_path / "p.txt"
    train = [f"Review {i}:" for i in range(24)]
    prompts.write_text("\n".join(train))
    held_file = tmp_path / "held.txt"
    held_file.write_text("\n".join(f"Opinion {i}:" for i in range(48)))
    overrides = dict(model="tiny-random", reward=f"{reward_file}:spaces", prompts=str(prompts), n=8,
                     eval_prompts=str(held_file),
                     max_new_tokens=12, template="none", output_dir=str(tmp_path / "rs"), rounds=2, max_steps=12,
                     batch_size=6, lr=5e-3, warmup_ratio=0, eval_fraction=0, progress=False, precision="fp32")
    final = run_rs(build_config(RSConfig, overrides=overrides))
    tokenizer = load_tokenizer("tiny-random")
    held = [f"Opinion {i}:" for i in range(16)]
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=123)

    def mean_reward(model_path) -> float:
        outs = generate(load_model(model_path), tokenizer, held * 4, sampling, template="none")
        return sum(o.text.count(" ") / max(1, len(o.text)) for o in outs) / len(outs)

    before, after = mean_reward("tiny-random"), mean_reward(final)
    assert after > before + 0.03, (before, after)
    rounds = json.loads((tmp_path / "rs" / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    # the run's own held-out evaluation sees the same rise, and its price in KL from the start model
    start = json.loads((tmp_path / "rs" / "start_eval.json").read_text())
    assert start["n"] == 48 and start["kl"] == pytest.approx(0.0, abs=1e-4)
    assert rounds[-1]["eval"]["score"] > start["score"] + 0.03, (start["score"], rounds[-1]["eval"]["score"])
    assert rounds[-1]["eval"]["kl"] > 0.1
    # resume: a rerun reuses both finished rounds without sampling again
    stamp = (tmp_path / "rs" / "round-1" / "samples.jsonl").stat().st_mtime_ns
    again = run_rs(build_config(RSConfig, overrides=overrides))
    assert again == final
    assert (tmp_path / "rs" / "round-1" / "samples.jsonl").stat().st_mtime_ns == stamp
    # ... but another run into the folder is refused, not handed the finished rounds
    with pytest.raises(AlignlabError, match="holds another run.*lr"):
        run_rs(build_config(RSConfig, overrides={**overrides, "lr": 1e-3}))
    # the SFT data marks the kept samples cut at max_new_tokens, which it trains without EOS
    samples = [json.loads(x) for x in (tmp_path / "rs" / "round-1" / "samples.jsonl").read_text().splitlines()]
    kept = [json.loads(x) for x in (tmp_path / "rs" / "round-1" / "kept.jsonl").read_text().splitlines()]
    assert [k["unfinished"] for k in kept] == [not s["finished"] for s in samples if s["kept"]]
