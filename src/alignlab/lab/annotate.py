"""Simulated annotators: rank K sampled answers per prompt by the gold score, with human-like noise.

Each annotator draws a ranking from the Plackett-Luce model with utilities ``gold / temperature``: the
best answer is picked with probability proportional to ``exp(gold_i / T)``, removed, and so on. For K = 2
this is Bradley-Terry noise; as T -> 0 it is the exact gold order; large T is a careless annotator. The
resulting rankings (A > B > C ...) are what the reward model reads, and their pairs what DPO reads.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from alignlab.data.preference import PreferenceRecord


def plackett_luce_order(scores: Sequence[float], temperature: float, rng: random.Random) -> list[int]:
    """Indices of ``scores`` best first, drawn from Plackett-Luce with utilities ``score / temperature``
    (``temperature <= 0``: the exact descending order, ties by index)."""
    if temperature <= 0:
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    left = list(range(len(scores)))
    order = []
    while left:
        top = max(scores[i] for i in left) / temperature
        weights = [math.exp(scores[i] / temperature - top) for i in left]
        pick = rng.choices(range(len(left)), weights=weights)[0]
        order.append(left.pop(pick))
    return order


def annotate(prompts: Sequence[Any], responses: Sequence[Sequence[str]], gold: Sequence[Sequence[float]], *,
             temperature: float, seed: int, source: str = "simulated",
             unfinished: Sequence[Sequence[bool]] | None = None) -> tuple[list[PreferenceRecord], dict]:
    """One ranking per prompt from its K responses and their gold scores.

    ``unfinished`` (optional, aligned with ``responses``): which responses were cut off at the sampler's token
    limit; the records carry the flags in ranking order (an identical text keeps its first occurrence's flag).

    Identical responses are merged first (a ranking of equal texts is undefined); prompts left with fewer
    than two distinct responses are skipped and counted. Returns the records and a report: prompts,
    kept, skipped (by reason), and the agreement of the noisy rankings with the exact gold order (pairwise).
    """
    rng = random.Random(seed)
    records: list[PreferenceRecord] = []
    skipped = {"fewer than 2 distinct responses": 0}
    agree = total = 0
    for n, (prompt, texts, scores) in enumerate(zip(prompts, responses, gold), start=1):
        unique: dict[str, float] = {}
        cut: dict[str, bool] = {}
        flags = unfinished[n - 1] if unfinished is not None else [False] * len(texts)
        for text, score, flag in zip(texts, scores, flags):
            if text.strip() and text not in unique:
                unique[text] = float(score)
                cut[text] = bool(flag)
        if len(unique) < 2:
            skipped["fewer than 2 distinct responses"] += 1
            continue
        items = list(unique.items())
        order = plackett_luce_order([s for _, s in items], temperature, rng)
        ranked = [items[i] for i in order]
        for i in range(len(ranked)):
            for j in range(i + 1, len(ranked)):
                if ranked[i][1] != ranked[j][1]:
                    total += 1
                    agree += ranked[i][1] > ranked[j][1]
        records.append(PreferenceRecord(prompt=prompt, responses=[t for t, _ in ranked], record=n, source=source,
                                        unfinished=None if unfinished is None else [cut[t] for t, _ in ranked]))
    report = {"prompts": len(prompts), "kept": len(records), "skipped": skipped,
              "pairwise_agreement_with_gold": agree / total if total else float("nan")}
    return records, report
