"""The benchmark harness: numbers from hand computations, and one tiny run of each library per setting."""

from __future__ import annotations

import json
import math

import pytest

from alignlab.bench import PAIRS, measure_matmul_peak, mfu, ratios, summarize


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
    from alignlab.bench import run_benchmark

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
