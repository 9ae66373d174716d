"""The benchmark harness: numbers from hand computations, and one tiny run of each library per setting."""

from __future__ import annotations

import json
import math

import pytest

from alignlab.bench.measure import measure_matmul_peak, mfu, ratios, summarize
from alignlab.bench.registry import PAIRS


def test_mfu_matches_hand_computation():
    # 135M parameters at 1,000 tokens/s: 6 * 135e6 * 1e3 = 8.1e11 FLOP/s; against a 1.62e12 FLOP/s peak: 50 %
    assert mfu(135_000_000, 1_000.0, 1.62e12) == pytest.approx(0.5)
    assert mfu(10, 2.0, 120.0) == pytest.approx(6 * 10 * 2 / 120)
    with pytest.raises(ValueError):
        mfu(10, 1.0, 0.0)


def test_summarize_leaves_out_warmup_and_uses_the_precision_peak():
    raw = {"step_seconds": [9.0, 2.0, 3.0], "step_tokens": [999, 100, 150], "losses": [3.0, 2.5, 2.0],
           "trainable_params": 1000, "precision": "bf16", "peak_rss_mib": 512.0}
    out = summarize(raw, warmup_steps=1, peak_flops={"fp32": 1e6, "bf16": 2e6})
    assert out["tokens_per_s"] == pytest.approx(250 / 5)
    assert out["s_per_step"] == pytest.approx(2.5)
    assert out["timed_steps"] == 2 and out["final_loss"] == 2.0
    assert out["mfu"] == pytest.approx(6 * 1000 * 50 / 2e6)
    assert "tokens_per_cpu_s" not in out  # no CPU times given

    # CPU times: step 2 kept both threads busy (4 CPU-s in 2 s), step 3 shared its cores (3 CPU-s in 3 s)
    timed = summarize(dict(raw, step_cpu_seconds=[9.0, 4.0, 3.0], torch_threads=2), warmup_steps=1, peak_flops=None)
    assert timed["tokens_per_cpu_s"] == pytest.approx(250 / 7)
    assert timed["cpu_utilisation"] == pytest.approx(7 / 5)
    assert timed["uncontended_steps"] == 1 and timed["tokens_per_s_uncontended"] == pytest.approx(100 / 2)
    # rounds pool their timed steps, each round's warmup left out
    pooled = summarize([raw, dict(raw, step_seconds=[1.0, 1.0, 1.0], peak_rss_mib=600.0)], 1, None)
    assert pooled["tokens_per_s"] == pytest.approx(500 / 7) and pooled["timed_steps"] == 4
    assert pooled["peak_rss_mib"] == 600.0

    other = dict(out, tokens_per_s=25.0, peak_rss_mib=1024.0)
    assert ratios(out, other)["tokens_per_s"] == pytest.approx(2.0)
    assert ratios(out, other)["peak_rss_mib"] == pytest.approx(0.5)


def test_measured_matmul_peak_is_positive():
    for precision in ("fp32", "bf16"):
        peak = measure_matmul_peak(precision, size=256, repeats=2)
        assert math.isfinite(peak) and peak > 0


def test_bench_is_a_cli_command():
    from alignlab.cli import build_parser

    args = build_parser().parse_args(["bench", "sft", "--model", "tiny-random", "--steps", "2", "--which", "ours"])
    assert args.stage == "sft" and args.steps == 2 and args.which == "ours" and args.settings == "matched"
    assert "sft" in PAIRS


@pytest.fixture
def tiny_alpaca(tmp_path):
    words = "the quick brown fox jumps over the lazy dog and then runs far away".split()
    records = [
        {"instruction": f"Say {i} words.", "input": "" if i % 3 else "some input",
         "output": " ".join(words[j % len(words)] for j in range(3 + 2 * i))}
        for i in range(24)
    ]
    path = tmp_path / "tiny_alpaca.json"
    path.write_text(json.dumps(records))
    return str(path)


@pytest.mark.parametrize("settings", ["matched", "defaults"])
def test_harness_runs_both_libraries_on_tiny_random(tiny_alpaca, settings):
    pytest.importorskip("trl")
    from alignlab.bench.cli import run_benchmark

    report = run_benchmark("sft", model="tiny-random", data=tiny_alpaca, batch_size=4, max_length=64, steps=2,
                           warmup_steps=1, precision="fp32", settings=settings, measure_peak=False,
                           echo=lambda *_: None)
    ours, trl = report["results"]["ours"], report["results"]["trl"]
    for result in (ours, trl):
        assert result["tokens_per_s"] > 0 and result["tokens_per_cpu_s"] > 0 and result["timed_steps"] == 2
        assert math.isfinite(result["final_loss"])
        assert result["peak_rss_mib"] > 100  # torch alone is more than that
    assert all(math.isfinite(v) and v > 0 for v in report["ratios"].values())
    assert {"tokens_per_s", "s_per_step", "peak_rss_mib", "final_loss"} <= set(report["ratios"])
    if settings == "matched":
        # same batches, same dtype, same optimizer: the same token counts and (nearly) the same losses
        assert report["raw"]["ours"][0]["step_tokens"] == report["raw"]["trl"][0]["step_tokens"]
        assert report["raw"]["ours"][0]["losses"] == pytest.approx(report["raw"]["trl"][0]["losses"], rel=1e-4)
        assert trl["notes"]["examples_identical_to_ours"] == trl["notes"]["examples_compared"] == 12
        assert ours["precision"] == trl["precision"] == "fp32"
    else:
        assert trl["settings"]["gradient_checkpointing"] is True  # TRL's default


# ------------------------------------------------------------------------------------------------ rm, dpo, ppo

WORDS = "good great fine nice happy bad poor sad awful the movie was really very quite and".split()


@pytest.fixture
def tiny_pairs(tmp_path):
    """24 explicit pairs with message prompts (so both libraries apply the chat template)."""
    records = [
        {"prompt": [{"role": "user", "content": f"Tell me about movie {i}."}],
         "chosen": [{"role": "assistant", "content": " ".join(WORDS[(i + j) % 8] for j in range(3 + i % 5))}],
         "rejected": [{"role": "assistant", "content": " ".join(WORDS[8 + (i + j) % 8] for j in range(2 + i % 4))}]}
        for i in range(24)
    ]
    path = tmp_path / "tiny_pairs.json"
    path.write_text(json.dumps(records))
    return str(path)


def _run(stage, data, **kw):
    from alignlab.bench.cli import run_benchmark

    values = dict(model="tiny-random", data=data, batch_size=4, max_length=64, steps=1, warmup_steps=1,
                  precision="fp32", settings="matched", measure_peak=False, echo=lambda *_: None)
    values.update(kw)
    return run_benchmark(stage, **values)


def _check_both(report, first="ours", second="trl"):
    results = report["results"]
    for result in (results[first], results[second]):
        assert result["tokens_per_s"] > 0 and result["timed_steps"] == report["config"]["steps"]
        assert result["peak_rss_mib"] > 100
    assert report["ratios"]["tokens_per_s"] > 0 and report["ratios"]["peak_rss_mib"] > 0
    return results[first], results[second]


def test_bench_rm_matches_reward_trainer(tiny_pairs):
    pytest.importorskip("trl")
    report = _run("rm", tiny_pairs)
    ours, trl = _check_both(report)
    raw_ours, raw_trl = report["raw"]["ours"][0], report["raw"]["trl"][0]
    # the same pairs in the same batches, the same score-head initialisation: the same pairwise losses
    assert raw_ours["step_tokens"] == raw_trl["step_tokens"]
    assert raw_ours["losses"][0] == pytest.approx(raw_trl["losses"][0], rel=1e-5)  # first step: same start
    assert raw_ours["losses"] == pytest.approx(raw_trl["losses"], rel=1e-4)  # after one AdamW step too
    assert abs(raw_ours["losses"][1] - raw_ours["losses"][0]) > 1e-6  # and the step did change the model
    assert raw_ours["step_values"]["accuracy"] == raw_trl["step_values"]["accuracy"]
    assert trl["notes"]["examples_compared"] == 8  # 2 steps x 4 pairs, none truncated at 64 tokens


def test_bench_dpo_matches_dpo_trainer(tiny_pairs):
    pytest.importorskip("trl")
    report = _run("dpo", tiny_pairs)
    ours, trl = _check_both(report)
    raw_ours, raw_trl = report["raw"]["ours"][0], report["raw"]["trl"][0]
    assert raw_ours["step_tokens"] == raw_trl["step_tokens"]  # our token ids, our batches
    # step 1: policy == reference, so both losses are log 2; step 2: after one identical AdamW update
    assert raw_ours["losses"][0] == pytest.approx(math.log(2), rel=1e-5)
    assert raw_trl["losses"][0] == pytest.approx(math.log(2), rel=1e-5)
    assert raw_ours["losses"][1] != pytest.approx(math.log(2), rel=1e-6)
    assert raw_ours["losses"][1] == pytest.approx(raw_trl["losses"][1], rel=1e-4)
    margins_ours, margins_trl = raw_ours["step_values"]["reward_margin"], raw_trl["step_values"]["reward_margin"]
    assert margins_ours[1] == pytest.approx(margins_trl[1], rel=1e-3, abs=1e-6)
    assert trl["settings"]["reference"] == "frozen copy" and trl["settings"]["gradient_checkpointing"] is False


def test_bench_rm_kwise_reports_the_token_saving(tmp_path):
    rankings = [{"prompt": f"Rank answers to question {i}.",
                 "responses": [" ".join(WORDS[(i + j + r) % 16] for j in range(4 + r)) for r in range(2 + i % 3)]}
                for i in range(12)]
    path = tmp_path / "rankings.json"
    path.write_text(json.dumps(rankings))
    report = _run("rm-kwise", str(path), batch_size=3, warmup_steps=0)
    kwise, pairs = _check_both(report, "kwise", "pairs")
    # 12 prompts with K = 2, 3, 4: 4 x (1 + 3 + 6) = 40 comparisons, 36 answers encoded once vs 80 sequences
    assert kwise["dataset"] == {**kwise["dataset"], "examples": 12, "pairs": 40, "sequences": 36}
    assert pairs["dataset"] == {**pairs["dataset"], "examples": 40, "pairs": 40, "sequences": 80}
    comparison = report["comparison"]
    assert comparison["token_factor"] == pytest.approx(pairs["dataset"]["tokens"] / kwise["dataset"]["tokens"])
    assert comparison["token_factor"] > 2
    assert comparison["speed_factor"] == pytest.approx(comparison["token_factor"] * report["ratios"]["tokens_per_s"])
    assert pairs["settings"]["batch_size"] == 4  # automatic: 3 prompts x mean K 3 / 2 sequences per pair
    assert kwise["pairs_per_step"] > 0 and pairs["pairs_per_step"] == 4


def test_bench_ppo_against_rloo(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("vaderSentiment")
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"Write a short review of movie {i}." for i in range(10)))
    report = _run("ppo", str(path), warmup_steps=0, extra={"max_new_tokens": "6"})
    ours, trl = _check_both(report)
    for result in (ours, trl):
        assert result["responses_per_step"] == 4
        assert 0 < result["tokens_per_step"] <= 4 * 6
        assert result["ms_per_token"] == pytest.approx(1000 / result["tokens_per_s"])
        parts = sum(result[f"time_{k}"] for k in ("generation", "scoring", "forward", "update"))
        assert parts == pytest.approx(result["s_per_step"], rel=0.05)  # the split adds up to the iteration
        assert -1 <= result["final_score"] <= 1 and "mfu" not in result
    assert trl["notes"]["prompt_ids_identical_to_ours"] == trl["notes"]["prompts_compared"] == 2  # 4 / 2 per prompt
    assert trl["settings"]["num_iterations"] == ours["settings"]["ppo_epochs"] == 1
    assert any("critic" in line for line in ours["notes"]["unmatched"])


def test_bench_stage_options_are_checked():
    from alignlab.bench.cli import run_benchmark
    from alignlab.cli import build_parser

    args = build_parser().parse_args(["bench", "rm-kwise", "--which", "kwise", "--set", "pairs_batch_size=3"])
    assert args.stage == "rm-kwise" and args.which == "kwise" and args.extra == ["pairs_batch_size=3"]
    from alignlab.errors import AlignlabError

    with pytest.raises(AlignlabError, match="unknown option"):
        run_benchmark("dpo", model="tiny-random", data=__file__, extra={"bogus": "1"}, measure_peak=False)
    with pytest.raises(AlignlabError, match="expected int"):
        run_benchmark("ppo", model="tiny-random", data=__file__, extra={"max_new_tokens": "many"}, measure_peak=False)
    with pytest.raises(AlignlabError, match="--which"):
        run_benchmark("rm-kwise", model="tiny-random", data=__file__, which="trl", measure_peak=False)


def test_bench_gen_shared_prefill_against_plain_generate():
    """``bench gen`` on the built-in task: both runners draw the same answers (same seeds, same tokens generated),
    the shared runner reports the Alpaca preamble it encodes once, the plain one none."""
    report = _run("gen", "", batch_size=8, steps=2, warmup_steps=1, extra={"max_new_tokens": "5"})
    assert report["config"]["data"] == "task:sentiment"
    shared, plain = _check_both(report, "shared", "plain")
    assert report["raw"]["shared"][0]["step_tokens"] == report["raw"]["plain"][0]["step_tokens"]
    assert 0 < shared["tokens_per_step"] <= 8 * 5
    assert shared["prompt_tokens"] == plain["prompt_tokens"] > shared["common_prefix_tokens"] > 20
    assert plain["common_prefix_tokens"] == 0 and "mfu" not in shared
    assert shared["settings"]["samples_per_prompt"] == 4 and shared["settings"]["share_prefix"] is True


# ------------------------------------------------------------------------------------------------ --time-limit

SLOW_RUNNERS = '''
import time
from alignlab.bench.worker import stamp_progress

def fast(spec):
    return {"step_seconds": [1.0, 2.0], "step_tokens": [50, 300], "losses": [], "trainable_params": 1,
            "total_params": 1, "precision": "fp32"}

def stuck(spec):
    stamp_progress("start")
    time.sleep(0.3)
    stamp_progress("step")
    time.sleep(300)  # never finishes its second step
'''


def test_time_limit_stops_a_stuck_worker_and_bounds_its_speed(tmp_path, monkeypatch, capsys):
    from alignlab.bench.cli import run_benchmark
    from alignlab.bench.registry import Pair
    from alignlab.bench.report import print_report

    (tmp_path / "slowbench.py").write_text(SLOW_RUNNERS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the worker process imports the runners from here
    monkeypatch.setitem(PAIRS, "slow", Pair("slowbench:fast", "slowbench:stuck", sequences_per_example=2))
    data = tmp_path / "data.json"
    data.write_text("[]")
    report = run_benchmark("slow", model="tiny-random", data=str(data), batch_size=4, max_length=64, steps=1,
                           warmup_steps=1, measure_peak=False, time_limit=8.0, echo=lambda *_: None)
    fast, stuck = report["results"]["ours"], report["results"]["trl"]
    assert fast["tokens_per_s"] == pytest.approx(300 / 2.0) and not fast.get("timed_out")
    assert stuck["timed_out"] and stuck["steps_done"] == 1 and stuck["loop_started"]
    assert stuck["step_seconds_done"][0] >= 0.3
    assert stuck["wall_s"][0] < 30  # killed at the limit, not after its 300 s sleep
    assert stuck["unfinished_step_s"] > 2.0 and not stuck["bound_from_warmup"]  # it slept in its first timed step
    assert stuck["max_step_tokens"] == 4 * 2 * 64
    assert stuck["tokens_per_s_upper_bound"] == pytest.approx(512 / stuck["unfinished_step_s"])
    assert report["ratios"]["tokens_per_s_at_least"] == pytest.approx(150 / stuck["tokens_per_s_upper_bound"])
    assert "tokens_per_s" not in report["ratios"]
    print_report(report)
    out = capsys.readouterr().out
    assert "stopped at the time limit (8 s): 1 step(s) finished" in out and ">= " in out


def test_stopped_worker_that_never_started_its_loop(tmp_path):
    from alignlab.bench.worker import stopped_worker

    result = stopped_worker(tmp_path / "missing.jsonl", launched=100.0, stopped=160.0, time_limit=60.0,
                            max_step_tokens=1024)
    assert result["timed_out"] and not result["loop_started"] and result["steps_done"] == 0
    assert result["load_s"] == 60.0 and "tokens_per_s_upper_bound" not in result
    progress = tmp_path / "progress.jsonl"
    progress.write_text('{"event": "start", "time": 110.0}\n{"event": "step", "time": 130.0}\n'
                        '{"event": "step", "time": 135.0}\n')
    result = stopped_worker(progress, launched=100.0, stopped=160.0, time_limit=60.0, max_step_tokens=1000,
                            warmup_steps=1)
    assert result["load_s"] == 10.0 and result["step_seconds_done"] == [20.0, 5.0]
    # the timed stretch: step 2 (5 s) and the unfinished step 3 (25 s), at most 1,000 tokens each
    assert result["unfinished_step_s"] == 25.0 and result["tokens_per_s_upper_bound"] == pytest.approx(2000 / 30)
    assert not result["bound_from_warmup"]
    # still in warmup (3 warmup steps): only the unfinished step bounds anything
    warm = stopped_worker(progress, launched=100.0, stopped=160.0, time_limit=60.0, max_step_tokens=1000,
                          warmup_steps=3)
    assert warm["bound_from_warmup"] and warm["tokens_per_s_upper_bound"] == 40.0


def test_bench_grpo_against_trl(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("vaderSentiment")
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"Write a short review of movie {i}." for i in range(10)))
    report = _run("grpo", str(path), warmup_steps=0, extra={"max_new_tokens": "6", "num_generations": "2"})
    ours, trl = _check_both(report)
    for result in (ours, trl):
        assert result["responses_per_step"] == 4
        assert 0 < result["tokens_per_step"] <= 4 * 6
        parts = sum(result[f"time_{k}"] for k in ("generation", "scoring", "forward", "update"))
        assert parts == pytest.approx(result["s_per_step"], rel=0.05)  # the split adds up to the iteration
        assert -1 <= result["final_score"] <= 1
    assert trl["notes"]["prompt_ids_identical_to_ours"] == trl["notes"]["prompts_compared"] == 2
    assert trl["settings"]["loss_type"] == "grpo" and ours["settings"]["loss_aggregation"] == "sequence_mean"
    assert trl["settings"]["num_generations"] == ours["settings"]["num_generations"] == 2
