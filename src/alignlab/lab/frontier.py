"""Reward/KL frontiers and how to compare them across seeds: pure functions over (KL, gold) points.

A method's run (one KL control, one seed) gives points along its training (checkpoints, then the final model);
the frontier of a method on a seed is the upper envelope of all its runs' points and the SFT model at (0, gold of
SFT). Two methods are compared at a KL budget by the best gold their frontiers reach within it, over seeds: a
mean with a t-interval, and, for a pair of methods, the paired difference (the same seed = the same SFT model,
preference data and reward model, so the seed's luck cancels in the difference).

:func:`method_frontiers` applies these to a study's runs (:class:`Run`, one per method, KL control and seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from alignlab.errors import AlignlabError
from alignlab.evaluate import mean_half_width

Point = tuple[float, float]  # (KL nats, gold)


class AtBudget(NamedTuple):
    """The best gold a frontier reaches within a KL budget; ``reached`` is false when the frontier ends before the
    budget (the method never spent that much KL, and ``gold`` is its last point's)."""

    gold: float
    reached: bool


class Interval(NamedTuple):
    """A mean over seeds and the half-width of its 95% t-interval (nan with one seed)."""

    mean: float
    half_width: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        """True when the interval lies wholly above or below 0 (never with one seed: no interval)."""
        return self.low > 0 or self.high < 0


# ----------------------------------------------------------------------------------------------- one frontier


def upper_envelope(points: Sequence[Point], sft_gold: float) -> list[Point]:
    """The Pareto points of ``points`` and the SFT model (0, ``sft_gold``), sorted by KL.

    A point (k, g) is kept when no other point has KL <= k and gold >= g (one of the two strictly): nothing
    reaches at least its gold for at most its KL. A negative KL estimate (sampling noise around 0: the KL itself is
    >= 0) counts as 0. The result starts at KL 0 (SFT, or a point at KL 0 that beats it) and its gold rises
    strictly with KL.

    Args:
        points: (kl, gold) of every evaluated model of a method on one seed.
        sft_gold: the SFT model's gold, the frontier's start.
    """
    candidates = sorted({(max(kl, 0.0), gold) for kl, gold in points} | {(0.0, sft_gold)},
                        key=lambda p: (p[0], -p[1]))
    envelope: list[Point] = []
    for kl, gold in candidates:  # by KL, the best gold first at equal KL: keep what beats everything cheaper
        if not envelope or gold > envelope[-1][1]:
            envelope.append((kl, gold))
    return envelope


def envelope_at(envelope: Sequence[Point], kl: float) -> AtBudget:
    """The best gold the frontier reaches at KL <= ``kl``.

    Between consecutive envelope points (k_i, g_i) and (k_{i+1}, g_{i+1}), for k_i <= kl < k_{i+1}:

        gold(kl) = g_i + (g_{i+1} - g_i) * (kl - k_i) / (k_{i+1} - k_i)

    the linear interpolation, which is reachable: answering with model i+1 with probability
    lambda = (kl - k_i) / (k_{i+1} - k_i) and with model i otherwise has gold g_i + lambda (g_{i+1} - g_i), and a
    KL to the reference of at most (1 - lambda) k_i + lambda k_{i+1} = kl (KL is convex). Beyond the last point the
    gold stays the last point's, with ``reached`` false: the method never spent that much KL.

    Args:
        envelope: from :func:`upper_envelope` (sorted by KL, starting at 0).
        kl: the budget, nats (>= 0).
    """
    last_kl, last_gold = envelope[-1]
    if kl >= last_kl:
        return AtBudget(last_gold, reached=kl == last_kl)
    for (k0, g0), (k1, g1) in zip(envelope, envelope[1:]):
        if k0 <= kl < k1:
            return AtBudget(g0 + (g1 - g0) * (kl - k0) / (k1 - k0), reached=True)
    return AtBudget(envelope[0][1], reached=True)  # kl below the first point (only for a negative kl)


# ----------------------------------------------------------------------------------------------- across seeds


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the 97.5% quantile of Student's t with ``df`` degrees of freedom (12.706 for 1, 4.303 for 2,
    2.776 for 4, 1.96 in the limit), by bisection on the CDF (below)."""
    low, high = 0.0, 50.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < 0.975 else (low, mid)
    return (low + high) / 2


def t_cdf(x: float, df: int, steps: int = 2000) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom, x >= 0: 1/2 + the integral from 0 to x of the
    density Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) (1 + t^2/df)^(-(df+1)/2), by Simpson's rule (``steps``
    even; error below 1e-7 for x <= 50)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    h = x / steps
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return 0.5 + h / 3 * (density(0.0) + inner + density(x))


def mean_interval(values: Sequence[float]) -> Interval:
    """The mean of ``values`` (one per seed) and the half-width of its 95% t-interval, t_{0.975, S-1} sd / sqrt(S)
    with S = len(values) (:func:`alignlab.evaluate.mean_half_width`; nan for S = 1: one seed says nothing about
    the spread across seeds)."""
    s = len(values)
    return Interval(*mean_half_width(values, t_quantile_975(s - 1) if s > 1 else math.nan))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Interval:
    """Method a minus method b at one budget, paired by seed: :func:`mean_interval` of a_s - b_s. The same seed
    shares the SFT model, the preference data and the reward model, so their luck cancels (a narrower interval
    than comparing the two means)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} against {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b)])


# ----------------------------------------------------------------------------------------------- a study's methods


@dataclass
class Run:
    """One method trained at one value of its KL control on one seed, and its evaluated points."""

    seed: int
    method: str
    stage: str
    value: float | None  # the KL control (None: the method has none, e.g. best-of-n)
    points: list[dict[str, Any]]  # {kl, gold, gold_ci95, and step or n}, by training progress
    wall_s: float
    peak_rss_mb: float


@dataclass
class MethodFrontier:
    """A method across the study: its frontier on each seed and the gold each reaches at each budget."""

    method: str
    seeds: list[int]
    envelopes: list[list[Point]]  # one per seed
    max_kl: list[float]  # per seed: the largest KL any of its models reached
    at_budget: dict[float, list[AtBudget]] = field(default_factory=dict)  # budget -> one per seed


def method_frontiers(runs: list[Run], sft_gold: dict[int, float], budgets: list[float]) -> dict[str, MethodFrontier]:
    """Per method: the upper envelope of all its runs' points on each seed (with SFT at KL 0) and the gold it
    reaches at each budget. A budget counts as reached on a seed when one of the method's models spent at least
    that much KL (a model beyond the envelope's end spent it without gaining gold). Raises when a budget is
    beyond every method's largest KL on every seed."""
    frontiers: dict[str, MethodFrontier] = {}
    for method in dict.fromkeys(r.method for r in runs):
        seeds = list(sft_gold)
        points = {s: [(p["kl"], p["gold"]) for r in runs if r.method == method and r.seed == s for p in r.points]
                  for s in seeds}
        envelopes = [upper_envelope(points[s], sft_gold[s]) for s in seeds]
        max_kl = [max([kl for kl, _ in points[s]], default=0.0) for s in seeds]
        frontier = MethodFrontier(method, seeds, envelopes, max_kl)
        for budget in budgets:  # reached: judged by the largest KL (>= the envelope's end), see above
            frontier.at_budget[budget] = [AtBudget(envelope_at(e, budget).gold, reached=budget <= top)
                                          for e, top in zip(envelopes, max_kl)]
        frontiers[method] = frontier
    largest = max(frontiers.values(), key=lambda f: max(f.max_kl))
    seed = largest.seeds[largest.max_kl.index(max(largest.max_kl))]
    check_budgets_reached(budgets, max(largest.max_kl), f"{largest.method}, seed {seed}")
    return frontiers


def check_budgets_reached(budgets: list[float], largest_kl: float, where: str) -> None:
    """Raise an :class:`AlignlabError` naming the first budget above ``largest_kl`` (reached by ``where``)."""
    beyond = [b for b in budgets if b > largest_kl]
    if beyond:
        raise AlignlabError(f"KL budget {beyond[0]:g} nats is beyond every method's frontier: the largest KL reached "
                            f"is {largest_kl:.3g} nats ({where}); choose budgets up to that (the stages are cached, "
                            "so rerunning with other budgets costs nothing)", field="kl_budgets")
