"""What a policy achieves on held-out prompts, and what it costs in drift: the lab's measurements.

For a set of prompts and ``k`` sampled responses per prompt (``prompt_index`` says which prompt each answer
answers; answers to one prompt are correlated, so every interval treats the prompt as the unit):

* gold score: the task's scorer (the simulated user), mean with a clustered 95% interval
  (:func:`clustered_mean_ci95`); the same for each of the task's extra ``reports`` scorers (e.g. VADER alone);
* proxy score: the trained reward model's score, where there is one;
* KL(policy || reference): the Monte-Carlo estimate sum_t [log pi(y_t|.) - log ref(y_t|.)] over the
  response tokens of samples drawn from the policy, per answer (nats per response), clustered like the gold;
* fluency: the reference model's negative log-likelihood per response token of the policy's samples;
* diversity: distinct-1 and distinct-2 (unique n-grams / total n-grams over all responses);
* against a baseline (the SFT model's answers to the same prompts, with the same seed): the win rate judged by
  the gold score (per prompt, the share of (answer, baseline answer) pairs it wins, ties one half; averaged
  over prompts) and the gap closed, (gold - gold_base) / (1 - gold_base), each with a paired bootstrap interval
  over prompts (:func:`paired_bootstrap`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from alignlab.data.tokenize import IGNORE_INDEX, SHARED_PREFIX_MIN, shared_prefix_length
from alignlab.generation import Sample, forward_after_prefix
from alignlab.losses.common import selective_log_softmax
from alignlab.train.forward import collate_aligned, completion_logps

Z_95 = 1.96  # the normal 97.5% quantile; with 64 prompts Student's t (2.00) would widen intervals by 2%


def mean_half_width(values: Sequence[float], quantile: float) -> tuple[float, float]:
    """(mean, half-width) of independent values for a two-sided interval with the given ``quantile``:

        half-width = quantile * sqrt(s^2 / n),    s^2 = sum (v - mean)^2 / (n - 1)

    (the normal 1.96 for :func:`mean_ci95`, Student's t_{0.975, n-1} for few values); nan for both when there are
    no values, nan half-width for one (no spread to measure)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, quantile * math.sqrt(var / n)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% normal interval) of independent values: :func:`mean_half_width` with 1.96."""
    return mean_half_width(values, Z_95)


def group_by_prompt(values: Sequence[float], prompt_index: Sequence[int]) -> dict[int, list[float]]:
    """The values of each prompt: ``{prompt index: [values of its answers]}``, prompts in ascending order."""
    if len(values) != len(prompt_index):
        raise ValueError(f"{len(values)} values but {len(prompt_index)} prompt indexes")
    groups: dict[int, list[float]] = {}
    for v, p in sorted(zip(values, prompt_index), key=lambda x: x[1]):
        groups.setdefault(p, []).append(float(v))
    return groups


def prompt_means(values: Sequence[float], prompt_index: Sequence[int]) -> dict[int, float]:
    """``{prompt index: mean of its answers' values}``."""
    return {p: sum(g) / len(g) for p, g in group_by_prompt(values, prompt_index).items()}


def clustered_mean_ci95(values: Sequence[float], prompt_index: Sequence[int]) -> tuple[float, float]:
    """(mean, 95% half-width) of answers clustered by prompt.

    With P prompts and m_p = the mean of prompt p's answers:

        mean = (1/P) sum_p m_p,    half-width = 1.96 * sd(m_1 .. m_P) / sqrt(P)   (sd with P - 1)

    The prompt is the independent unit: answers to one prompt share it and are correlated, so treating all
    P x k answers as independent (:func:`mean_ci95`) would claim an interval up to sqrt(k) times too narrow. With
    one answer per prompt this is :func:`mean_ci95`.
    """
    return mean_ci95(list(prompt_means(values, prompt_index).values()))


def paired_bootstrap(statistic: Callable[..., float], *per_prompt: Sequence[float], n_resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float]:
    """The 95% percentile interval (lo, hi) of ``statistic(*arrays)`` when prompts are resampled with replacement.

    ``per_prompt`` are arrays of one value per prompt, aligned (entry p of each is prompt p): they are resampled
    *jointly*, the same prompts for all, which keeps the pairing (a method's and the baseline's answers to one
    prompt). ``statistic`` takes numpy arrays, e.g. ``lambda a, b: a.mean() - b.mean()``. Seeded: the same
    inputs give the same interval.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in per_prompt]
    n = len(arrays[0])
    if n == 0 or any(len(a) != n for a in arrays):
        raise ValueError("paired_bootstrap needs equally long, non-empty per-prompt arrays")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_resamples, n))
    stats = np.array([statistic(*(a[idx] for a in arrays)) for idx in draws])
    lo, hi = np.nanpercentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties get their average rank); nan when
    either side is constant."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two equally long sequences of at least 2 values")

    def ranks(x: Sequence[float]) -> np.ndarray:
        values = np.asarray(x, dtype=np.float64)
        order = np.argsort(values, kind="stable")
        r = np.empty(len(values))
        sorted_values = values[order]
        start = 0
        while start < len(values):  # a run of ties shares the mean of its positions
            end = start
            while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
                end += 1
            r[order[start : end + 1]] = (start + end) / 2
            start = end + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom else float("nan")


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams over all n-grams in ``texts`` (0 when there are none)."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.split()
        grams.extend(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Fraction of prompts where ``scores`` beats ``baseline`` (ties count 1/2); one answer per prompt."""
    if len(scores) != len(baseline) or not scores:
        raise ValueError("win rate needs two equally long, non-empty score lists")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline))
    return wins / len(scores)


def prompt_win_shares(scores: dict[int, list[float]], baseline: dict[int, list[float]]) -> dict[int, float]:
    """Per prompt (those both sides answered): the share of (answer, baseline answer) pairs the answer wins, ties
    1/2. ``scores`` and ``baseline`` map prompt index -> its answers' scores (:func:`group_by_prompt`)."""
    shares = {}
    for p in sorted(scores.keys() & baseline.keys()):
        pairs = [(a, b) for a in scores[p] for b in baseline[p]]
        shares[p] = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    return shares


def gap_closed(gold: np.ndarray, baseline: np.ndarray, best: float = 1.0) -> float:
    """(mean(gold) - mean(baseline)) / (best - mean(baseline)): the share of the baseline's distance to the best
    score that a method closes (per-prompt means in, aligned by prompt)."""
    base = float(np.mean(baseline))
    return (float(np.mean(gold)) - base) / (best - base) if base < best else float("nan")


def compare_to_baseline(gold: Sequence[float], prompt_index: Sequence[int], baseline_gold: Sequence[float],
                        baseline_index: Sequence[int], seed: int = 0) -> dict[str, float]:
    """Win rate and gap closed against a baseline on the same prompts, each with its paired bootstrap interval
    over prompts (``win_rate_lo``/``_hi``, ``gap_closed_lo``/``_hi``)."""
    mine, base = group_by_prompt(gold, prompt_index), group_by_prompt(baseline_gold, baseline_index)
    shares = prompt_win_shares(mine, base)
    if not shares:
        raise ValueError("no prompt answered by both the method and the baseline")
    prompts = list(shares)
    wins = np.array([shares[p] for p in prompts])
    means = np.array([sum(mine[p]) / len(mine[p]) for p in prompts])
    base_means = np.array([sum(base[p]) / len(base[p]) for p in prompts])
    win_lo, win_hi = paired_bootstrap(np.mean, wins, seed=seed)
    gap_lo, gap_hi = paired_bootstrap(gap_closed, means, base_means, seed=seed)
    return {"win_rate": float(wins.mean()), "win_rate_lo": win_lo, "win_rate_hi": win_hi,
            "gap_closed": gap_closed(means, base_means), "gap_closed_lo": gap_lo, "gap_closed_hi": gap_hi}


@torch.no_grad()
def response_logps(model: torch.nn.Module, samples: Sequence[Sample], pad_token_id: int,
                   batch_size: int = 16) -> list[torch.Tensor]:
    """Per-token log-probs of each sample's response under ``model`` (a list of 1-d tensors)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[torch.Tensor] = [torch.empty(0)] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].prompt_ids) + len(samples[i].response_ids))
    for start in range(0, len(order), batch_size):
        idx = [i for i in order[start : start + batch_size] if samples[i].response_ids]
        if not idx:
            continue
        seqs = [list(samples[i].prompt_ids) + list(samples[i].response_ids) for i in idx]
        labels = [[IGNORE_INDEX] * len(samples[i].prompt_ids) + list(samples[i].response_ids) for i in idx]
        # the prompts' common prefix (the task's preamble: 44 of ~60 tokens in the lab) encoded once, its cache
        # copied to every row; the last prompt token stays in each row: it predicts the first response token
        shared = shared_prefix_length([samples[i].prompt_ids for i in idx])
        out_rows = None
        if shared >= SHARED_PREFIX_MIN:
            batch = collate_aligned([s[shared:] for s in seqs], [lab[shared:] for lab in labels],
                                    pad_token_id).to(device)
            out_rows = forward_after_prefix(model, seqs[0][:shared], batch.input_ids, batch.attention_mask,
                                            batch.position_ids, logits_to_keep=batch.keep + 1)
        if out_rows is None:
            batch = collate_aligned(seqs, labels, pad_token_id).to(device)
            logps = completion_logps(model, batch).cpu()
        else:
            logits = out_rows.logits[:, :-1, :]
            logps = (selective_log_softmax(logits, batch.targets).float() * batch.loss_mask).cpu()
        mask = batch.loss_mask.cpu()
        for row, i in enumerate(idx):
            out[i] = logps[row][mask[row]]
    return out


def evaluate_samples(
    samples: Sequence[Sample],
    prompts: Sequence[Any],
    *,
    gold_score: Any,
    prompt_index: Sequence[int] | None = None,
    reports: dict[str, Any] | None = None,
    policy: torch.nn.Module | None = None,
    reference: torch.nn.Module | None = None,
    pad_token_id: int = 0,
    proxy_scorer: Any = None,
    baseline_gold: Sequence[float] | None = None,
    baseline_index: Sequence[int] | None = None,
) -> dict[str, Any]:
    """All measurements for one set of samples; ``prompts[i]`` is the prompt ``samples[i]`` answers and
    ``prompt_index[i]`` its number (answers with one number are one cluster; default: every answer its own
    prompt). ``reports`` (name -> scorer) adds ``<name>``, ``<name>_ci95``, ``<name>_scores``; ``policy`` and
    ``reference`` enable KL and fluency; ``proxy_scorer`` (with ``.score``) the proxy score; ``baseline_gold`` (with
    ``baseline_index``, default one answer per prompt) the win rate and gap closed. Log-probs and proxy scores are
    computed in batches over all answers at once."""
    texts = [s.text for s in samples]
    index = list(prompt_index) if prompt_index is not None else list(range(len(samples)))
    gold = [float(g) for g in gold_score(prompts, texts)]
    gold_mean, gold_ci = clustered_mean_ci95(gold, index)
    result: dict[str, Any] = {
        "n": len(samples),
        "prompts": len(set(index)),
        "gold": gold_mean,
        "gold_ci95": gold_ci,
        "gold_scores": gold,
        "prompt_index": index,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "length": sum(len(s.response_ids) for s in samples) / max(1, len(samples)),
        "finished": sum(s.finished for s in samples) / max(1, len(samples)),
    }
    for name, scorer in (reports or {}).items():
        scores = [float(x) for x in scorer(prompts, texts)]
        result[name], result[f"{name}_ci95"] = clustered_mean_ci95(scores, index)
        result[f"{name}_scores"] = scores
    if proxy_scorer is not None:
        proxy = [float(x) for x in proxy_scorer.score(list(prompts), texts)]
        result["proxy"], result["proxy_ci95"] = clustered_mean_ci95(proxy, index)
        result["proxy_scores"] = proxy
    if reference is not None:
        ref_logps = response_logps(reference, samples, pad_token_id)
        tokens = sum(len(r) for r in ref_logps)
        result["fluency_nll"] = -sum(float(r.sum()) for r in ref_logps) / max(1, tokens)
        if policy is not None:
            pol_logps = response_logps(policy, samples, pad_token_id)
            kls = [float((p - r).sum()) for p, r in zip(pol_logps, ref_logps)]
            result["kl"], result["kl_ci95"] = clustered_mean_ci95(kls, index)
    if baseline_gold is not None:
        base_index = list(baseline_index) if baseline_index is not None else list(range(len(baseline_gold)))
        result.update(compare_to_baseline(gold, index, baseline_gold, base_index))
    return result
