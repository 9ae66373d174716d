"""What a policy achieves on held-out prompts, and what it costs in drift: the lab's measurements.

For a set of prompts and one sampled response per prompt:

* gold score: the task's scorer (the simulated user), mean with a 95% interval (normal approximation);
* proxy score: the trained reward model's score, where there is one;
* KL(policy || reference): the Monte-Carlo estimate sum_t [log pi(y_t|.) - log ref(y_t|.)] over the
  response tokens of samples drawn from the policy, averaged over prompts (nats per response);
* fluency: the reference model's negative log-likelihood per response token of the policy's samples;
* diversity: distinct-1 and distinct-2 (unique n-grams / total n-grams over all responses);
* win rate against a baseline (the SFT model's responses to the same prompts), judged by the gold score,
  ties counting one half.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from alignlab.data.tokenize import IGNORE_INDEX, SHARED_PREFIX_MIN, shared_prefix_length
from alignlab.generation import Sample, forward_after_prefix
from alignlab.losses.common import selective_log_softmax
from alignlab.train.forward import collate_aligned, completion_logps


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% normal interval)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams over all n-grams in ``texts`` (0 when there are none)."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.split()
        grams.extend(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Fraction of prompts where ``scores`` beats ``baseline`` (ties count 1/2)."""
    if len(scores) != len(baseline) or not scores:
        raise ValueError("win rate needs two equally long, non-empty score lists")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline))
    return wins / len(scores)


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
    policy: torch.nn.Module | None = None,
    reference: torch.nn.Module | None = None,
    pad_token_id: int = 0,
    proxy_scorer: Any = None,
    baseline_gold: Sequence[float] | None = None,
) -> dict[str, Any]:
    """All measurements for one set of samples (one per prompt). ``policy``/``reference`` enable KL and
    fluency; ``proxy_scorer`` (with ``.score``) the proxy score; ``baseline_gold`` the win rate."""
    texts = [s.text for s in samples]
    gold = [float(g) for g in gold_score(prompts, texts)]
    gold_mean, gold_ci = mean_ci95(gold)
    result: dict[str, Any] = {
        "n": len(samples),
        "gold": gold_mean,
        "gold_ci95": gold_ci,
        "gold_scores": gold,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "length": sum(len(s.response_ids) for s in samples) / max(1, len(samples)),
        "finished": sum(s.finished for s in samples) / max(1, len(samples)),
    }
    if proxy_scorer is not None:
        proxy = proxy_scorer.score(list(prompts), texts)
        result["proxy"], result["proxy_ci95"] = mean_ci95(proxy)
    if reference is not None:
        ref_logps = response_logps(reference, samples, pad_token_id)
        tokens = sum(len(r) for r in ref_logps)
        result["fluency_nll"] = -sum(float(r.sum()) for r in ref_logps) / max(1, tokens)
        if policy is not None:
            pol_logps = response_logps(policy, samples, pad_token_id)
            kls = [float((p - r).sum()) for p, r in zip(pol_logps, ref_logps)]
            result["kl"], result["kl_ci95"] = mean_ci95(kls)
    if baseline_gold is not None:
        result["win_rate"] = win_rate(gold, baseline_gold)
    return result
