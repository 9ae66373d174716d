"""Gao et al.'s overoptimization fits and verdicts (src/alignlab/lab/overoptimization.py), on hand-made numbers."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest

from alignlab.errors import AlignlabError
from alignlab.lab.overoptimization import (
    analyze,
    calibrate_proxy,
    fit_bon,
    fit_rl,
    json_safe,
    overoptimization_onset,
    standardize_proxy,
)

D = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0]


@pytest.mark.parametrize(("fit", "shape"), [(fit_bon, lambda d: d), (fit_rl, math.log)])
def test_the_forms_recover_known_coefficients(fit, shape):
    a, b = 0.30, 0.07
    exact = [d * (a - b * shape(d)) for d in D]
    got = fit(D, exact)
    assert got.a == pytest.approx(a, abs=1e-9) and got.b == pytest.approx(b, abs=1e-9)
    assert got.r2 == pytest.approx(1.0) and got.rmse == pytest.approx(0.0, abs=1e-9) and got.n == len(D)
    assert got(2.5) == pytest.approx(2.5 * (a - b * shape(2.5)))
    rng = random.Random(0)
    noisy = fit(D, [g + rng.gauss(0.0, 0.005) for g in exact])
    assert noisy.a == pytest.approx(a, abs=0.02) and noisy.b == pytest.approx(b, abs=0.01)
    assert 0.95 < noisy.r2 < 1.0 and 0.0 < noisy.rmse < 0.01


def test_the_forms_skip_the_origin_and_need_two_distinct_points():
    # d = 0 (the SFT model) carries no information: both forms pass through the origin
    with_origin = fit_rl([0.0, *D], [0.0, *(d * (0.2 - 0.05 * math.log(d)) for d in D)])
    assert with_origin.n == len(D) and with_origin.a == pytest.approx(0.2)
    for fit in (fit_bon, fit_rl):
        with pytest.raises(AlignlabError, match="at least 2 points"):
            fit([0.0, 1.5], [0.0, 0.3])
        with pytest.raises(AlignlabError, match="at least 2 points"):
            fit([2.0, 2.0, float("nan")], [0.1, 0.2, 0.3])
    with pytest.raises(AlignlabError, match="gains"):
        fit_bon([1.0, 2.0], [0.1])


def test_calibration_maps_the_proxy_onto_the_gold_line():
    proxy = [-2.0, -1.0, 0.5, 1.0, 3.0]
    slope, intercept, r = calibrate_proxy(proxy, [0.25 * p + 0.1 for p in proxy])
    assert (slope, intercept, r) == (pytest.approx(0.25), pytest.approx(0.1), pytest.approx(1.0))
    # a noisy line: proxy 0, 1, 2, 3 (sd sqrt(1.25)), gold 0, 2, 1, 3 (sd sqrt(1.25)): the least-squares slope would
    # be r = 0.8, shrinking the proxy's gains; the ratio of the spreads is 1, intercept matching the means (1.5)
    line = calibrate_proxy([0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 1.0, 3.0])
    assert line.slope == pytest.approx(1.0) and line.intercept == pytest.approx(0.0) and line.r == pytest.approx(0.8)
    # twice the gold's spread, negatively correlated: slope -sd_gold / sd_proxy = -0.5, through the means
    line = calibrate_proxy([0.0, 2.0, 4.0, 6.0], [3.0, 1.0, 2.0, 0.0])
    assert line.slope == pytest.approx(-0.5) and line.r == pytest.approx(-0.8)
    assert line.intercept == pytest.approx(1.5 + 0.5 * 3.0)
    for flat in (([1.0, 1.0, 1.0], [0.1, 0.2, 0.3]), ([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])):
        with pytest.raises(AlignlabError, match="differ"):
            calibrate_proxy(*flat)
    with pytest.raises(AlignlabError, match="at least 2"):
        calibrate_proxy([1.0], [0.1])
    # without per-answer scores: the gold's mean and spread (intervals over the same answers)
    assert standardize_proxy(2.0, 0.4, 0.5, 0.1) == (pytest.approx(0.25), pytest.approx(0.0), None)
    assert standardize_proxy(2.0, 0.4, 0.5, 0.0) == (1.0, -1.5, None)  # the gold has no spread: the proxy unscaled


def point(kl: float, gold: float, ci: float | None, proxy: float, step: int | None = None) -> dict[str, float]:
    return {"kl": kl, "gold": gold, "gold_ci95": ci, "proxy": proxy, **({"step": step} if step else {})}


def test_onset_is_the_first_fall_past_the_combined_interval_while_the_proxy_rises():
    rising = [point(0, 0.10, 0.05, 0.0), point(4, 0.40, 0.05, 1.0), point(12, 0.55, 0.05, 2.0)]
    falls = [*rising, point(25, 0.50, 0.06, 2.6), point(40, 0.30, 0.06, 3.1), point(59, 0.10, 0.05, 3.5)]
    onset = overoptimization_onset(falls)
    assert onset is not None and (onset.peak_index, onset.index) == (2, 4)  # 0.05 below the peak is within
    assert (onset.peak_kl, onset.kl, onset.peak_proxy, onset.proxy) == (12, 40, 2.0, 3.1)
    assert onset.drop == pytest.approx(0.25) and (onset.peak_gold_ci95, onset.gold_ci95) == (0.05, 0.06)
    assert onset.combined_ci95 == pytest.approx(math.sqrt(0.05**2 + 0.06**2))  # 0.0781
    # every later point within its interval of the peak: no fall
    assert overoptimization_onset([*rising, point(25, 0.50, 0.06, 2.6), point(40, 0.47, 0.1, 3.1)]) is None
    # a fall of 0.07: more than the later point's 0.05 but not the combined sqrt(0.05^2 + 0.05^2) = 0.0707
    assert overoptimization_onset([*rising, point(25, 0.48, 0.05, 2.6)]) is None
    assert overoptimization_onset([*rising, point(25, 0.47, 0.05, 2.6)]) is not None  # 0.08 > 0.0707
    # gold falls but so does the proxy: the policy got worse by both, not hacked
    assert overoptimization_onset([*rising, point(25, 0.30, 0.05, 1.5)]) is None
    assert overoptimization_onset(rising) is None and overoptimization_onset([]) is None
    assert overoptimization_onset([*rising, point(25, 0.30, float("nan"), 2.5)]) is None  # one answer: no interval
    peak_without_interval = [*rising[:2], point(12, 0.55, None, 2.0), point(25, 0.30, 0.05, 2.5)]
    assert overoptimization_onset(peak_without_interval) is None


def lab_results(proxy_scores: bool) -> dict[str, dict]:
    """Stage results of a made-up lab run: the SFT model, PPO with and without the penalty, best-of-n, SimPO."""
    sft = {"gold": 0.1, "gold_ci95": 0.05, "proxy": 0.0, "proxy_ci95": 0.2, "kl": 0.0,
           "gold_scores": [0.0, 0.1, 0.2], **({"proxy_scores": [-1.0, 0.0, 1.0]} if proxy_scores else {})}
    nokl = [point(4, 0.40, 0.05, 1.0, step=8), point(12, 0.55, 0.05, 2.0, step=16), point(30, 0.35, 0.05, 3.0, 32),
            point(59, 0.15, 0.05, 3.6, step=48)]
    ppo = [point(3, 0.35, 0.05, 0.8, step=6), point(8, 0.45, 0.05, 1.2, step=11), point(12, 0.50, 0.05, 1.4, 16)]
    return {"eval_sft": sft, "eval_ppo_nokl": {**nokl[-1], "curve": nokl}, "eval_ppo": {**ppo[-1], "curve": ppo},
            "bon": {"curve": [{"n": n, "kl": math.log(n) - (n - 1) / n, "gold": g, "proxy": p}
                              for n, g, p in ((1, 0.1, 0.0), (2, 0.2, 0.5), (4, 0.28, 0.9), (8, 0.33, 1.2))]},
            "eval_simpo": {"kl": 21.5}}


def test_analyze_gives_the_verdicts_and_fits_of_a_lab_run():
    got = analyze(lab_results(proxy_scores=True))
    cal = got["calibration"]
    assert cal["slope"] == pytest.approx(0.1) and cal["r"] == pytest.approx(1.0) and "sd_gold" in cal["how"]
    assert set(got["runs"]) == {"ppo", "ppo_nokl", "bon"}
    nokl = got["runs"]["ppo_nokl"]
    assert nokl["points"][0]["d"] == 0.0 and nokl["points"][-1]["d"] == pytest.approx(math.sqrt(59))
    assert nokl["points"][-1]["gold_gain"] == pytest.approx(0.05)
    assert nokl["points"][-1]["proxy_gain"] == pytest.approx(0.36)  # 0.1 x (3.6 - 0.0)
    assert nokl["fit_gold"]["n"] == 4 and nokl["fit_gold"]["form"] == "rl"
    assert got["runs"]["bon"]["fit_gold"]["form"] == "bon" and got["runs"]["bon"]["fit_gold"]["n"] == 3
    assert got["gold_falls_while_proxy_rises"] and got["onset"]["kl"] == 30 and got["onset"]["peak_kl"] == 12
    assert got["onset"]["combined_ci95"] == pytest.approx(math.sqrt(2) * 0.05)
    assert got["penalty_halves_kl"] is True and (got["penalized_kl"], got["unpenalized_kl"]) == (12, 59)
    # the runs differ in length: the unpenalized run's KL after the penalized run's 16 steps, beside the ends
    assert (got["penalized_steps"], got["unpenalized_kl_at_penalized_steps"]) == (16, 12)
    assert got["unpenalized_steps"] == 48
    assert [p["step"] for p in nokl["points"]] == [0, 8, 16, 32, 48]
    assert got["simpo_over_target"] and got["simpo_kl"] == 21.5
    # current evaluations store no per-answer proxy: the standardized line, 0.05 / 0.2
    fallback = analyze(lab_results(proxy_scores=False))["calibration"]
    assert fallback["slope"] == pytest.approx(0.25) and "standardized" in fallback["how"] and fallback["r"] is None
    # one point each: no fit, said in words; JSON without nan
    few = lab_results(proxy_scores=True)
    few["eval_ppo"] = {**point(3, 0.3, float("nan"), 0.5), "curve": []}
    few["ppo"] = {"optimizer_steps": 20}  # no checkpoint of the unpenalized run after 20 steps
    thin = json_safe(analyze(few))
    assert thin["penalized_steps"] == 20 and thin["unpenalized_kl_at_penalized_steps"] is None
    assert "error" in thin["runs"]["ppo"]["fit_gold"] and thin["runs"]["ppo"]["points"][1]["gold_ci95"] is None
    # a penalized run past half the unpenalized one's KL; no unpenalized run: no verdicts on it
    few["eval_ppo"]["kl"] = 40.0
    assert analyze(few)["penalty_halves_kl"] is False
    del few["eval_ppo_nokl"]
    alone = analyze(few)
    assert alone["penalty_halves_kl"] is None and alone["gold_falls_while_proxy_rises"] is None


def test_the_report_states_the_tests_with_their_numbers():
    from alignlab.lab.report import _fall_sentence, _kl_sentence

    results = lab_results(proxy_scores=True)
    got = analyze(results)
    fall = _fall_sentence(SimpleNamespace(results=results), got)
    # peak 0.550 ± 0.050 at KL 12, later 0.350 ± 0.050 at KL 30: a drop of 0.2 against sqrt(2) x 0.05 = 0.071
    assert "peaks at 0.550 ± 0.050 at KL 12.0 nats, then falls to 0.350 ± 0.050 at KL 30.0" in fall
    assert "a drop of 0.200, more than the combined 95% interval of the two points, 0.071" in fall
    assert "2.000 -> 3.000" in fall
    kl = _kl_sentence(got)
    assert "ends at KL 12.0 nats, no more than half of PPO at beta = 0's 59.0 at its end" in kl
    assert "longer (48 optimizer steps); after the penalized run's 16 it was at KL 12.0" in kl
