"""Reward-model overoptimization drawn as Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization".

Gao et al. plot the gold reward and the proxy (the reward model) against d = sqrt(KL(policy || initial)) and fit

    best-of-n:  R(d) = d (a - b d)          (gold rises, peaks at d = a / 2b, then falls)
    RL:         R(d) = d (a - b ln d)       (gold rises, then bends over more slowly)

where R is the reward's gain over the initial policy (d = 0). The proxy follows the same forms with a smaller
b: it keeps rising where the gold has turned. This module holds those fits and the verdicts the lab's report
draws from them, as pure functions over plain numbers and the stage results (dicts): nothing here loads a model.

    calibrate_proxy          proxy -> gold units by the ratio of spreads on the SFT model's held-out answers, with r
    fit_bon, fit_rl          the two forms, linear least squares in (a, b)
    overoptimization_onset   the first point after the gold's peak where it has fallen by more than the combined
                             interval of the two points while the proxy still rises
    analyze                  all of the above for one lab run: the JSON the report and later checks read
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from alignlab.errors import AlignlabError

RUNS = ("ppo", "ppo_nokl", "bon")  # the runs drawn: PPO with and without the penalty, and best-of-n


# ----------------------------------------------------------------------------------------------- calibration


class ProxyLine(NamedTuple):
    """The proxy's map into gold units, ``gold ~ slope * proxy + intercept``, and the proxy's Pearson correlation
    ``r`` with the gold on the answers it was fitted on (None when only summaries were available)."""

    slope: float
    intercept: float
    r: float | None


def proxy_line(proxy_mean: float, proxy_sd: float, gold_mean: float, gold_sd: float, r: float | None) -> ProxyLine:
    """The line that gives the proxy the gold's mean and spread:

        slope = sign(r) * sd_gold / sd_proxy,    intercept = mean_gold - slope * mean_proxy

    (sign(r) = -1 for r < 0, else +1; r None counts as positive: the reward model was trained to agree with the
    gold's annotators). Not the least-squares slope r * sd_gold / sd_proxy: that one shrinks every proxy gain by
    the correlation |r| < 1, so a proxy that rose as far as the gold, in standard deviations, would be drawn below
    it and its overoptimization understated. ``r`` is reported beside the line to say how far to trust it.
    Only the slope matters for gains (``slope * (proxy - proxy_sft)``); the intercept places absolute values.
    """
    slope = (-1.0 if r is not None and r < 0 else 1.0) * gold_sd / proxy_sd
    return ProxyLine(slope, gold_mean - slope * proxy_mean, r)


def calibrate_proxy(proxy: Sequence[float], gold: Sequence[float]) -> ProxyLine:
    """The proxy in gold units over paired answers: :func:`proxy_line` with their means, standard deviations and
    Pearson correlation r = sum (p - mean_p)(g - mean_g) / sqrt(sum (p - mean_p)^2 sum (g - mean_g)^2).

    Why: a reward model trained on rankings is defined only up to a shift and a scale (the K-wise loss sees
    differences of scores, and its scale is whatever the training reached), so its raw numbers cannot be drawn
    beside the gold's. Fitted on the SFT model's held-out answers (the distribution the reward model was trained
    on, where it is as right as it will ever be), the line puts the proxy in gold units; how far the calibrated
    proxy then parts from the gold as the policy drifts is the overoptimization.

    Args:
        proxy: the reward model's scores, shape (n,).
        gold: the gold scores of the same answers, shape (n,).
    """
    pairs = [(p, g) for p, g in zip(proxy, gold) if math.isfinite(p) and math.isfinite(g)]
    if len(proxy) != len(gold) or len(pairs) < 2:
        raise AlignlabError(f"calibrating the proxy needs at least 2 paired finite scores, got {len(pairs)} "
                            f"({len(proxy)} proxy, {len(gold)} gold)", field="proxy_scores")
    n = len(pairs)
    mean_p = sum(p for p, _ in pairs) / n
    mean_g = sum(g for _, g in pairs) / n
    ss_p = sum((p - mean_p) ** 2 for p, _ in pairs)
    ss_g = sum((g - mean_g) ** 2 for _, g in pairs)
    if ss_p == 0 or ss_g == 0:  # no spread to match, or every gain would read 0
        raise AlignlabError("calibrating the proxy needs proxy and gold scores that differ (all are equal)",
                            field="proxy_scores")
    r = sum((p - mean_p) * (g - mean_g) for p, g in pairs) / math.sqrt(ss_p * ss_g)
    return proxy_line(mean_p, math.sqrt(ss_p / n), mean_g, math.sqrt(ss_g / n), r)


def standardize_proxy(proxy_mean: float, proxy_ci95: float, gold_mean: float, gold_ci95: float) -> ProxyLine:
    """The fallback of :func:`calibrate_proxy` when per-answer proxy scores are not stored: :func:`proxy_line` on
    the means and intervals of the SFT answers. Both intervals are 1.96 sd / sqrt(n) over the same answers, so
    their ratio is the ratio of the spreads; the correlation is unknown (r None, taken as positive).

    Returns:
        the line; slope 1 (the raw proxy, shifted) when either interval is zero or not finite: no spread to
        match, and a slope of 0 would flatten every proxy gain.
    """
    ok = math.isfinite(proxy_ci95) and math.isfinite(gold_ci95) and proxy_ci95 > 0 and gold_ci95 > 0
    return proxy_line(proxy_mean, proxy_ci95 if ok else 1.0, gold_mean, gold_ci95 if ok else 1.0, None)


# ----------------------------------------------------------------------------------------------- fits


@dataclass(frozen=True)
class Fit:
    """One fitted form ``gain = d (a - b f(d))`` (``form``: "bon", f(d) = d; "rl", f(d) = ln d).

    ``r2`` is the coefficient of determination around the mean of the gain, 1 - SS_res / SS_tot with
    SS_tot = sum (gain - mean gain)^2: the centred one, stricter than the uncentred 1 - SS_res / sum gain^2 that
    a fit through the origin would often quote (it credits the form with merely being away from zero); it can be
    negative (the form explains less than a flat line), and is nan when every gain is the same. ``rmse`` is
    sqrt(SS_res / n), in the gain's units; ``n`` the points fitted.
    """

    form: str
    a: float
    b: float
    r2: float
    rmse: float
    n: int

    def __call__(self, d: float) -> float:
        """The fitted gain at d (d > 0; the RL form's d ln d goes to 0 at d = 0)."""
        return d * (self.a - self.b * _SHAPES[self.form](d)) if d > 0 else 0.0


_SHAPES: dict[str, Callable[[float], float]] = {"bon": lambda d: d, "rl": math.log}


def _fit(form: str, d: Sequence[float], gain: Sequence[float]) -> Fit:
    """Least squares for gain = a x1 + b x2 with x1 = d, x2 = -d f(d): no intercept (both forms pass through
    the origin, the initial policy). Points at d <= 0 carry no information (both columns are 0 there; the RL
    form's ln d is undefined) and non-finite ones are dropped; at least 2 distinct d > 0 must remain."""
    if len(d) != len(gain):
        raise AlignlabError(f"fit_{form}: {len(d)} values of d but {len(gain)} gains", field="gain")
    points = [(x, y) for x, y in zip(d, gain) if math.isfinite(x) and math.isfinite(y) and x > 0]
    if len({x for x, _ in points}) < 2:
        raise AlignlabError(f"fit_{form}: needs at least 2 points at distinct d > 0, got {len(points)} "
                            f"usable of {len(d)}", field="d")
    shape = _SHAPES[form]
    rows = [(x, -x * shape(x), y) for x, y in points]
    # the 2x2 normal equations, solved by Cramer's rule
    s11 = sum(x1 * x1 for x1, _, _ in rows)
    s12 = sum(x1 * x2 for x1, x2, _ in rows)
    s22 = sum(x2 * x2 for _, x2, _ in rows)
    t1 = sum(x1 * y for x1, _, y in rows)
    t2 = sum(x2 * y for _, x2, y in rows)
    det = s11 * s22 - s12 * s12
    if abs(det) <= 1e-12 * max(s11 * s22, 1e-300):  # e.g. the RL form at d = 1 only: x2 = 0
        raise AlignlabError(f"fit_{form}: the points do not determine a and b (singular design)", field="d")
    a = (t1 * s22 - t2 * s12) / det
    b = (s11 * t2 - s12 * t1) / det
    residuals = [y - (a * x1 + b * x2) for x1, x2, y in rows]
    ss_res = sum(r * r for r in residuals)
    mean = sum(y for _, _, y in rows) / len(rows)
    ss_tot = sum((y - mean) ** 2 for _, _, y in rows)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return Fit(form=form, a=a, b=b, r2=r2, rmse=math.sqrt(ss_res / len(rows)), n=len(rows))


def fit_bon(d: Sequence[float], gain: Sequence[float]) -> Fit:
    """Gao et al.'s best-of-n form, gain = d (a - b d), d = sqrt(KL), fitted by least squares in (a, b).

    Args:
        d: sqrt of the KL from the initial policy (nats^0.5), shape (n,).
        gain: the score minus the initial policy's (d = 0), shape (n,).
    """
    return _fit("bon", d, gain)


def fit_rl(d: Sequence[float], gain: Sequence[float]) -> Fit:
    """Gao et al.'s RL form, gain = d (a - b ln d), d = sqrt(KL) > 0, fitted by least squares in (a, b).

    Args:
        d: sqrt of the KL from the initial policy (nats^0.5), shape (n,).
        gain: the score minus the initial policy's (d = 0), shape (n,).
    """
    return _fit("rl", d, gain)


# ----------------------------------------------------------------------------------------------- onset


def combined_ci95(*half_widths: float | None) -> float:
    """The 95% half-width of a difference of independent estimates, sqrt(sum h_i^2); nan when any is missing or
    not finite (no interval, so no test)."""
    if any(h is None or not math.isfinite(h) for h in half_widths):
        return math.nan
    return math.sqrt(sum(h * h for h in half_widths))


@dataclass(frozen=True)
class Onset:
    """Where the gold turned while the proxy did not: the peak (index, KL, gold and its interval, proxy) and the
    first later point whose gold is below the peak's by more than :attr:`combined_ci95` while its proxy is above
    the peak's."""

    peak_index: int
    peak_kl: float
    peak_gold: float
    peak_gold_ci95: float
    peak_proxy: float
    index: int
    kl: float
    gold: float
    gold_ci95: float
    proxy: float

    @property
    def drop(self) -> float:
        """How far the gold fell from the peak (> combined_ci95)."""
        return self.peak_gold - self.gold

    @property
    def combined_ci95(self) -> float:
        """The interval the drop had to exceed: sqrt(ci_peak^2 + ci_later^2) (:func:`combined_ci95`)."""
        return combined_ci95(self.peak_gold_ci95, self.gold_ci95)


def overoptimization_onset(points: Sequence[Mapping[str, Any]]) -> Onset | None:
    """The first point after the gold's peak where the gold has fallen below the peak by more than the combined
    95% interval of the two points while the proxy is above its value at the peak, or None:

        gold(peak) - gold(later) > sqrt(ci_peak^2 + ci_later^2)   and   proxy(later) > proxy(peak)

    Args:
        points: one run along its training, in order (held-out checkpoints, then the final model; the SFT model
            may lead at KL 0): each with ``kl``, ``gold``, ``gold_ci95`` and ``proxy``.

    Both points are noisy and the peak is the largest of several, so the later point's interval alone would
    take the peak's luck for a fall. The combined interval treats the two as independent, which is conservative:
    they answer the same held-out prompts, so a paired interval (of the per-prompt differences) would be
    narrower. A non-finite interval at either point never counts as a fall.
    """
    if not points:
        return None
    peak = max(range(len(points)), key=lambda i: (points[i]["gold"], -i))  # the first of equal maxima
    top = points[peak]
    for i in range(peak + 1, len(points)):
        p = points[i]
        ci = combined_ci95(top.get("gold_ci95"), p.get("gold_ci95"))
        fell = math.isfinite(ci) and top["gold"] - p["gold"] > ci
        if fell and p["proxy"] > top["proxy"]:
            return Onset(peak_index=peak, peak_kl=top["kl"], peak_gold=top["gold"], peak_gold_ci95=top["gold_ci95"],
                         peak_proxy=top["proxy"], index=i, kl=p["kl"], gold=p["gold"], gold_ci95=p["gold_ci95"],
                         proxy=p["proxy"])
    return None


# ----------------------------------------------------------------------------------------------- one lab run


def sqrt_kl(kl: float) -> float:
    """d = sqrt(KL); a sampled KL estimate can dip below 0 near the start, which is KL 0."""
    return math.sqrt(max(kl, 0.0))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (an interval of one answer, the r2 of equal gains) as None: JSON has
    no nan."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def calibration(sft_eval: Mapping[str, Any]) -> dict[str, Any]:
    """The proxy's line into gold units from the SFT model's held-out evaluation: :func:`calibrate_proxy` on its
    per-answer ``proxy_scores`` and ``gold_scores`` where stored, else :func:`standardize_proxy` on the means and
    intervals. Returns slope, intercept, r (Pearson, None when not measured) and how."""
    proxy, gold = sft_eval.get("proxy_scores"), sft_eval.get("gold_scores")
    if proxy and gold:
        try:
            line = calibrate_proxy(proxy, gold)
            how = "the gold's spread over the proxy's on the SFT answers, sd_gold / sd_proxy"
            return {**line._asdict(), "how": how}
        except AlignlabError:
            pass  # all proxy scores equal, say: standardize
    proxy_ci, gold_ci = sft_eval.get("proxy_ci95", float("nan")), sft_eval.get("gold_ci95", float("nan"))
    line = standardize_proxy(sft_eval.get("proxy", 0.0), proxy_ci, sft_eval["gold"], gold_ci)
    spread = proxy_ci > 0 and gold_ci > 0  # false for nan too
    return {**line._asdict(),
            "how": "standardized to the gold's mean and spread on the SFT answers (from their intervals)" if spread
            else "not scaled (no spread on the SFT answers to match)"}


def run_points(results: Mapping[str, Mapping[str, Any]], run: str,
               proxy_is_reward_model: bool = True) -> list[dict[str, Any]]:
    """A run's points from the SFT model (KL 0) on: ``{step, kl, gold, gold_ci95, proxy}``.

    PPO runs: the held-out checkpoints and the final model (``eval_<run>``'s curve, or its final evaluation
    alone), after the SFT model's held-out evaluation (step 0); ``step`` = optimizer steps done (the final model's
    from the training stage when its evaluation has no curve). Best-of-n: its curve over n (n = 1 is the SFT model
    on the same draws, a better origin for its gains than another draw; KL the analytic bound; no intervals); its
    proxy is nan when it picked by a task's checked reward (``proxy_is_reward_model`` False), which the reward
    model's calibration does not map.
    """
    if run == "bon":
        return [{"kl": c["kl"], "gold": c["gold"], "gold_ci95": None, "n": c["n"],
                 "proxy": c["proxy"] if proxy_is_reward_model else float("nan")}
                for c in results.get("bon", {}).get("curve") or []]
    ev = results.get(f"eval_{run}")
    if not ev:
        return []
    sft = results["eval_sft"]
    keys = ("kl", "gold", "gold_ci95", "proxy")
    along = ev.get("curve") or [{**ev, "step": results.get(run, {}).get("optimizer_steps")}]
    return [{**{k: sft.get(k) for k in keys}, "kl": 0.0, "step": 0},
            *({**{k: c.get(k) for k in keys}, "step": c.get("step")} for c in along)]


def gains(points: Sequence[Mapping[str, Any]], slope: float) -> dict[str, list[float]]:
    """Per point: d = sqrt(KL) (:func:`sqrt_kl`), the gold's gain over the first point (d = 0) and the calibrated
    proxy's, slope * (proxy - proxy at d = 0), each shape (n,)."""
    first = points[0]
    return {"d": [sqrt_kl(p["kl"]) for p in points],
            "gold": [p["gold"] - first["gold"] for p in points],
            "proxy": [slope * (p["proxy"] - first["proxy"]) for p in points]}


def kl_at_step(points: Sequence[Mapping[str, Any]], step: int | None) -> float | None:
    """The KL of the point evaluated after ``step`` optimizer steps, or None when the run has no such point."""
    return next((p["kl"] for p in points if step is not None and p.get("step") == step), None)


def _fit_or_reason(fit: Callable[[Sequence[float], Sequence[float]], Fit], d: list[float],
                   gain: list[float]) -> dict[str, Any]:
    try:
        return asdict(fit(d, gain))
    except AlignlabError as e:
        return {"error": e.message}


def analyze(results: Mapping[str, Mapping[str, Any]], target_kl: float = 10.0,
            proxy_is_reward_model: bool = True) -> dict[str, Any]:
    """Gao et al.'s view of one lab run, as JSON-able numbers (``overoptimization.json``).

    Args:
        results: the lab's stage results by stage name (``eval_sft``, ``ppo``, ``eval_ppo``, ``eval_ppo_nokl``,
            ``bon``, ``eval_simpo``, ...); absent runs are left out.
        target_kl: the report's KL target (nats).
        proxy_is_reward_model: False on a task with a verifiable reward, where best-of-n and the rollouts are
            scored by the checked reward rather than the reward model.

    Returns:
        ``calibration`` (slope, intercept, r, how); ``runs``: per run its ``points`` (step or n, kl, d, gold,
        gold_ci95, proxy, gold_gain, proxy_gain) and fits ``fit_gold`` / ``fit_proxy`` (a, b, r2, rmse, n, or an
        ``error``; RL form for PPO, best-of-n form for best-of-n); ``onset``: the unpenalized run's
        :func:`overoptimization_onset` with its ``drop`` and ``combined_ci95`` (None if none) and
        ``gold_falls_while_proxy_rises``; ``penalized_kl``, ``unpenalized_kl`` and ``penalty_halves_kl`` (the
        penalized run ends at no more than half the unpenalized one's end KL; None when either is missing);
        ``penalized_steps``, ``unpenalized_steps`` (optimizer steps at each run's end) and
        ``unpenalized_kl_at_penalized_steps`` (the unpenalized run's KL at its point after as many optimizer steps
        as the penalized run's end: the runs differ in length, so this compares like with like; None without such
        a point); ``simpo_kl`` and ``simpo_over_target``.
    """
    cal = calibration(results["eval_sft"])
    runs: dict[str, Any] = {}
    for run in RUNS:
        points = run_points(results, run, proxy_is_reward_model)
        if not points:
            continue
        g = gains(points, cal["slope"])
        fit = fit_bon if run == "bon" else fit_rl
        runs[run] = {
            "points": [{**p, "d": d, "gold_gain": gg, "proxy_gain": pg}
                       for p, d, gg, pg in zip(points, g["d"], g["gold"], g["proxy"])],
            "fit_gold": _fit_or_reason(fit, g["d"], g["gold"]),
            "fit_proxy": _fit_or_reason(fit, g["d"], g["proxy"]),
        }
    onset = overoptimization_onset(runs["ppo_nokl"]["points"]) if "ppo_nokl" in runs else None
    penalized = results.get("eval_ppo", {}).get("kl")
    unpenalized = results.get("eval_ppo_nokl", {}).get("kl")
    steps = runs["ppo"]["points"][-1]["step"] if "ppo" in runs else None
    nokl_points = runs["ppo_nokl"]["points"] if "ppo_nokl" in runs else []
    simpo_kl = results.get("eval_simpo", {}).get("kl")
    return {
        "calibration": cal,
        "proxy_is_reward_model": proxy_is_reward_model,
        "runs": runs,
        "onset": {**asdict(onset), "drop": onset.drop, "combined_ci95": onset.combined_ci95} if onset else None,
        "gold_falls_while_proxy_rises": onset is not None if "ppo_nokl" in runs else None,
        "penalized_kl": penalized,
        "unpenalized_kl": unpenalized,
        "penalty_halves_kl": (penalized <= unpenalized / 2
                              if penalized is not None and unpenalized is not None else None),
        "penalized_steps": steps,
        "unpenalized_steps": nokl_points[-1]["step"] if nokl_points else None,
        "unpenalized_kl_at_penalized_steps": kl_at_step(nokl_points, steps),
        "target_kl": target_kl,
        "simpo_kl": simpo_kl,
        "simpo_over_target": simpo_kl > target_kl if simpo_kl is not None else None,
    }
