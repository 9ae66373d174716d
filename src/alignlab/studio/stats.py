"""The studio's two measurements: agreement between labellers (Kendall tau-b) and the A/B win rate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from alignlab.data.studio_db import StudioDB


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b between two rankings of the same answers (ties allowed; lower = better in both).

    ``tau_b = (C - D) / sqrt((n0 - t_x) * (n0 - t_y))`` over the ``n0 = n(n-1)/2`` pairs, where C and D count
    concordant and discordant pairs and ``t_x``, ``t_y`` the pairs tied in x and in y. Shapes: two length-n
    sequences. Returns None when either ranking ties every pair (tau is undefined).
    """
    if len(x) != len(y):
        raise ValueError("two rankings of the same answers must have the same length")
    concordant = discordant = tied_x = tied_y = pairs = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            pairs += 1
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0:
                tied_x += 1
            if dy == 0:
                tied_y += 1
            if dx * dy > 0:
                concordant += 1
            elif dx * dy < 0:
                discordant += 1
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return None if denominator == 0 else (concordant - discordant) / denominator


def _tiers(judgement: dict[str, Any]) -> list[int]:
    n = len(judgement["item"].answers)
    return [1] * n if judgement["all_bad"] else list(judgement["tiers"])


def agreement(db: StudioDB) -> dict[str, Any]:
    """Agreement on items two or more people ranked: the mean Kendall tau-b over every pair of labellers of
    every such item (pairs where a tau is undefined, e.g. one said "all tied", are counted apart), and the same
    mean per pair of labellers."""
    by_item: dict[int, list[dict[str, Any]]] = {}
    for judgement in db.judgements():
        by_item.setdefault(judgement["item"].id, []).append(judgement)
    taus: list[float] = []
    per_pair: dict[tuple[str, str], list[float]] = {}
    undefined = shared = 0
    for judgements in by_item.values():
        if len(judgements) < 2:
            continue
        shared += 1
        for i, a in enumerate(judgements):
            for b in judgements[i + 1:]:
                tau = kendall_tau_b(_tiers(a), _tiers(b))
                if tau is None:
                    undefined += 1
                    continue
                taus.append(tau)
                key = tuple(sorted((a["labeller"], b["labeller"])))
                per_pair.setdefault(key, []).append(tau)  # type: ignore[arg-type]
    return {
        "shared_items": shared,
        "comparisons": len(taus),
        "undefined": undefined,
        "mean_tau": None if not taus else sum(taus) / len(taus),
        "pairs": [{"labellers": list(k), "items": len(v), "mean_tau": sum(v) / len(v)}
                  for k, v in sorted(per_pair.items())],
    }


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n`` (95% for z = 1.96); (0, 1) when n = 0.

    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = successes / n``."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    scale = 1 + z * z / n
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


def ab_result(db: StudioDB, round_id: int, *, labellers: Sequence[str] | None = None) -> dict[str, Any]:
    """The blind A/B round's result: votes for the model after training, before it, ties, and the after-model's
    win rate ``(wins + ties / 2) / votes`` with its 95% Wilson interval (a tie counts as half a win)."""
    wins = losses = ties = 0
    for judgement in db.judgements(kind="ab", ab_round=round_id, labellers=labellers):
        item = judgement["item"]
        after = item.sources.index("after")
        before = item.sources.index("before")
        tiers = _tiers(judgement)
        if tiers[after] < tiers[before]:
            wins += 1
        elif tiers[after] > tiers[before]:
            losses += 1
        else:
            ties += 1
    votes = wins + losses + ties
    low, high = wilson_interval(wins + ties / 2, votes)
    info = db.ab_round(round_id) or {}
    return {"round": round_id, "job": info.get("job"), "items": info.get("items", 0), "votes": votes,
            "after_wins": wins, "before_wins": losses, "ties": ties,
            "win_rate": None if votes == 0 else (wins + ties / 2) / votes, "low": low, "high": high}
