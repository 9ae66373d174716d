"""The lab's task plug-in and its evaluation measures."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.errors import AlignlabError
from alignlab.evaluate import distinct_n, evaluate_samples, mean_ci95, response_logps, win_rate
from alignlab.generation import SamplingConfig, generate
from alignlab.models import load_model
from alignlab.tasks import load_task


def test_sentiment_task_splits_and_scores():
    task = load_task("sentiment", n_eval=50)
    assert len(task.train_prompts) + len(task.eval_prompts) == 360
    assert not set(task.train_prompts) & set(task.eval_prompts)
    assert len(task.demonstrations) == 128
    assert all(d["input"] in task.train_prompts for d in task.demonstrations)
    good, neutral, bad = task.gold_score(None, ["A wonderful, great film.", "It is a film.", "Awful and boring."])
    assert good > 0.5 and neutral == 0.0 and bad < -0.5
    assert load_task("sentiment", n_eval=50).eval_prompts == task.eval_prompts  # fixed by the seed


def test_prompt_file_replaces_prompts_and_bad_files_fail_early(tmp_path):
    ok = tmp_path / "p.txt"
    ok.write_text("\n".join(f"Opening number {i}." for i in range(40)))
    task = load_task("sentiment", prompts_file=str(ok), n_eval=10)
    assert len(task.train_prompts) == 30 and len(task.eval_prompts) == 10
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(AlignlabError, match="no prompts"):
        load_task("sentiment", prompts_file=str(empty))
    small = tmp_path / "small.txt"
    small.write_text("one\ntwo\n")
    with pytest.raises(AlignlabError, match="too few"):
        load_task("sentiment", prompts_file=str(small), n_eval=10)
    with pytest.raises(AlignlabError, match="unknown task"):
        load_task("poetry")


def test_measures_against_hand_computation():
    mean, ci = mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and ci == pytest.approx(1.96 * 1.0 / math.sqrt(3))
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert win_rate([1, 0, 0.5], [0, 1, 0.5]) == pytest.approx(0.5)


def test_kl_is_zero_against_itself_and_positive_against_another_model(tiny_tokenizer):
    model = load_model("tiny-random")
    other = load_model("tiny-random")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = ["The movie was", "I think", "Hello there"]
    samples = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=6, seed=0), template="none")
    same = evaluate_samples(samples, prompts, gold_score=lambda p, r: [0.0] * len(r), policy=model,
                            reference=model, pad_token_id=tiny_tokenizer.pad_token_id)
    assert same["kl"] == pytest.approx(0.0, abs=1e-5)
    logps = response_logps(model, samples, tiny_tokenizer.pad_token_id)
    tokens = sum(len(x) for x in logps)
    assert same["fluency_nll"] == pytest.approx(-sum(float(x.sum()) for x in logps) / tokens)
    diff = evaluate_samples(samples, prompts, gold_score=lambda p, r: [0.0] * len(r), policy=model,
                            reference=other, pad_token_id=tiny_tokenizer.pad_token_id, baseline_gold=[0.0] * 3)
    assert diff["kl"] != pytest.approx(0.0, abs=1e-3)
    assert diff["win_rate"] == 0.5


def test_annotators_exact_at_zero_temperature_and_noisy_above():
    import random

    from alignlab.lab.annotate import annotate, plackett_luce_order

    assert plackett_luce_order([0.1, 0.9, 0.5], 0.0, random.Random(0)) == [1, 2, 0]
    rng = random.Random(0)
    firsts = [plackett_luce_order([1.0, 0.0], 1.0, rng)[0] for _ in range(4000)]
    # Bradley-Terry: P(0 first) = sigmoid(1) = 0.731
    assert firsts.count(0) / 4000 == pytest.approx(1 / (1 + math.exp(-1)), abs=0.03)
    records, report = annotate(["p1", "p2"], [["good", "bad", "good"], ["same", "same"]],
                               [[0.9, -0.5, 0.9], [0.0, 0.0]], temperature=0.0, seed=0)
    assert len(records) == 1 and records[0].responses == ["good", "bad"]
    assert report["skipped"]["fewer than 2 distinct responses"] == 1
    assert report["pairwise_agreement_with_gold"] == 1.0
    records, _ = annotate(["p"], [["meh", "great and", "great and", "bad"]], [[0.1, 0.9, 0.9, -0.5]],
                          temperature=0.0, seed=0, unfinished=[[False, True, False, True]])
    assert records[0].responses == ["great and", "meh", "bad"] and records[0].unfinished == [True, False, True]


def test_task_prompt_sources_give_the_task_splits():
    from alignlab.tasks.loading import load_prompts

    task = load_task("sentiment")
    train, held = load_prompts("task:sentiment:train"), load_prompts("task:sentiment:eval")
    assert train == [task.as_prompt(p) for p in task.train_prompts]
    assert held == [task.as_prompt(p) for p in task.eval_prompts]
    assert not {p["input"] for p in train} & {p["input"] for p in held}
    with pytest.raises(AlignlabError, match="task:NAME:train or task:NAME:eval"):
        load_prompts("task:sentiment:test")


def test_response_logps_with_a_shared_preamble_equal_each_sequence_alone(tiny_tokenizer):
    """Prompts sharing a preamble: the preamble is encoded once and its cache copied to every row (fewer tokens
    embedded); each response's token log-probs equal those of a plain forward over its own prompt + response."""
    from alignlab.generation import Sample

    model = load_model("tiny-random").eval()
    preamble = tiny_tokenizer("Below is an instruction that describes a task.\n\n", add_special_tokens=False).input_ids
    samples = []
    for rest, answer in [("The movie was", " great fun"), ("I watched it twice and", " it was bad"),
                         ("Why", " not?")]:
        prompt = preamble + tiny_tokenizer(rest, add_special_tokens=False).input_ids
        samples.append(Sample(prompt, tiny_tokenizer(answer, add_special_tokens=False).input_ids, answer, True))
    embedded = {"tokens": 0}
    model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, args: embedded.__setitem__("tokens", embedded["tokens"] + args[0].numel()))
    got = response_logps(model, samples, tiny_tokenizer.pad_token_id)
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    assert embedded["tokens"] <= len(preamble) + len(samples) * (width - len(preamble))
    with torch.no_grad():
        for s, logps in zip(samples, got):
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            full = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            want = full[len(s.prompt_ids) - 1 :].gather(-1, ids[0, len(s.prompt_ids) :, None])[:, 0]
            torch.testing.assert_close(logps, want, rtol=1e-5, atol=1e-5)


def test_checkpoints_along_training_are_evenly_spaced_and_checked(tmp_path):
    from alignlab.config import quick_config
    from alignlab.lab.pipeline import run_lab
    from alignlab.lab.stages import Context

    def settings(points: int, total: int) -> dict[str, int]:
        return Context(cfg=quick_config(curve_points=points), task=None, lab=None, train_prompts=[],
                       eval_prompts=[]).checkpointing(total)

    # the lab's defaults: DPO-family steps 8 and 16 of 24, PPO iterations 3 and 6 of 8, each run keeping them all
    assert settings(2, 24) == {"save_every": 8, "keep_checkpoints": 4}
    assert settings(2, 8)["save_every"] == 3 and settings(1, 24)["save_every"] == 12
    assert settings(0, 24)["save_every"] == 0  # final models only
    # PPO at beta = 0 runs its own 24 iterations with 5 checkpoints: 4, 8, ..., 20, so its gold's peak and fall show
    from alignlab.config import LabConfig

    default = Context(cfg=LabConfig(), task=None, lab=None, train_prompts=[], eval_prompts=[])
    assert (default.ppo_iterations("ppo_nokl"), default.curve_points("ppo_nokl")) == (24, 5)
    assert (default.ppo_iterations("ppo"), default.curve_points("ppo")) == (8, 2)
    assert default.checkpointing(24, default.curve_points("ppo_nokl")) == {"save_every": 4, "keep_checkpoints": 7}
    with pytest.raises(AlignlabError, match="curve_points"):
        run_lab(quick_config(curve_points=-1, output_root=str(tmp_path)))
