"""What online RL trainers share (PPO now, the critic-free family next): the rollout and its batches, prompts
encoded for sampling, rewards scored and checked, and the statistics of a rollout gathered over processes.

A rollout's rows are "aligned" batches (:mod:`alignlab.train.forward`): prompts left-padded so every response
starts at column 0 of the kept columns; per-token tensors are ``(b, t)`` with
``mask[i] = [1] * len(response_i) + [0] * ...``. With several responses per prompt, a prompt's responses follow
one copy of it, each attending to the prompt and itself (:func:`collate_rollout` with a layout).
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from alignlab.config import PPOConfig
from alignlab.data.tokenize import IGNORE_INDEX, encode_prompt
from alignlab.errors import AlignlabError
from alignlab.losses.common import masked_mean, masked_whiten, selective_log_softmax
from alignlab.losses.ppo import explained_variance, kl_penalty
from alignlab.scoring import FunctionScorer, Scorer, load_scorer
from alignlab.train.forward import AlignedBatch, SegmentPlan, collate_aligned, collate_shared_prompt
from alignlab.train.loop import Run

# --------------------------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """One iteration's experience; per-token tensors are ``(b, t)``, ``t`` the longest response.

    Attributes:
        prompts: the prompts as given (text or messages), for the reward and the logs.
        prompt_ids / response_ids: token ids; a response ends with EOS when finished by EOS.
        texts: the decoded responses (stop strings removed) that the reward scored.
        finished: ``(b,)`` bool, ended by EOS or a stop string.
        mask: ``(b, t)`` 1 on response tokens.
        logps, ref_logps, values, entropy: ``(b, t)`` at rollout time (no gradient).
        raw_scores / scores: ``(b,)`` as the reward gave them / after normalisation, clipping and penalty.
        kl, rewards, advantages, returns: ``(b, t)``.
    """

    prompts: list[Any]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    finished: torch.Tensor
    mask: torch.Tensor
    logps: torch.Tensor
    ref_logps: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


@dataclass
class RolloutBatch(AlignedBatch):
    """Rollout rows for a forward pass. ``targets``, ``loss_mask``: ``(b, k)``, ``k = keep`` the longest
    response, every response from column 0. Two layouts: *aligned* (``predictors`` None; ``(b, t)`` rows of
    left-padded prompt + response, the response columns last), or *shared prompt* (consecutive rows with the
    same prompt follow one copy of it, :func:`~alignlab.train.forward.collate_shared_prompt`;
    ``predictors`` ``(b, k)`` index the flattened hidden states)."""

    predictors: torch.Tensor | None = None
    segments: SegmentPlan | None = None

    @property
    def inputs(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids,
                "segments": self.segments}

    def to(self, device: torch.device | str) -> RolloutBatch:
        moved = super().to(device)
        return replace(moved, segments=None if self.segments is None else self.segments.to(device))


def prompt_groups(prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """Row indices grouped into runs of consecutive rows with the same prompt (a rollout lists a prompt's
    ``responses_per_prompt`` responses together)."""
    groups: list[list[int]] = []
    for i, p in enumerate(prompt_ids):
        if groups and list(prompt_ids[groups[-1][0]]) == list(p):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def collate_rollout(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                    pad_token_id: int, layout: dict[str, Any] | None = None) -> RolloutBatch:
    """Rows ``prompt + response`` as a :class:`RolloutBatch`: aligned, or with ``layout`` (the model's
    :func:`~alignlab.train.forward.shared_prompt_layout`) each run of rows sharing a prompt encoded once."""
    if layout is None:
        rows = [[*p, *r] for p, r in zip(prompt_ids, response_ids)]
        labels = [[IGNORE_INDEX] * len(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        b = collate_aligned(rows, labels, pad_token_id)
        return RolloutBatch(b.input_ids, b.attention_mask, b.position_ids, b.targets, b.loss_mask, b.keep)
    groups = [(prompt_ids[g[0]], [response_ids[i] for i in g]) for g in prompt_groups(prompt_ids)]
    b = collate_shared_prompt(groups, pad_token_id, **layout)
    return RolloutBatch(b.input_ids, b.attention_mask, b.position_ids, b.targets, b.mask.float(), b.mask.shape[1],
                        b.predictors, b.segments)


def pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1])) if x.shape[1] < width else x


def token_logps(logits: torch.Tensor, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """Log-probs ``(b, t)`` (float32) of the response tokens under ``logits / temperature``; 0 off the mask.
    bf16 logits are normalised in float32 without an upcast copy (:func:`selective_log_softmax`)."""
    if temperature != 1.0:
        logits = logits.float() / temperature
    return selective_log_softmax(logits, batch.targets).float() * batch.loss_mask


def response_mask(response_ids: Sequence[Sequence[int]], device: Any = "cpu") -> torch.Tensor:
    """``(b, t)`` float mask, 1 on each response's tokens (left-aligned)."""
    width = max(len(r) for r in response_ids)
    lengths = torch.tensor([len(r) for r in response_ids], device=device)
    return (torch.arange(width, device=device)[None, :] < lengths[:, None]).float()


def whiten(values: torch.Tensor, mask: torch.Tensor, run: Run, shift_mean: bool = True) -> torch.Tensor:
    """:func:`~alignlab.losses.common.masked_whiten` with the mean and (unbiased) variance of the whole global
    rollout: under DDP every process's real tokens, so N processes whiten exactly as one process would."""
    if run.world_size == 1:
        return masked_whiten(values, mask, shift_mean=shift_mean)
    m = mask.to(values.dtype)
    count = run.all_reduce_sum(float(m.sum()))
    mean = run.all_reduce_sum(float((values * m).sum())) / max(count, 1.0)
    variance = run.all_reduce_sum(float(((values - mean) ** 2 * m).sum())) / max(count - 1.0, 1.0)
    whitened = (values - mean) / math.sqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=values.dtype, device=values.device))


def global_masked_mean(values: torch.Tensor, mask: torch.Tensor, run: Run) -> float:
    """The mean over the real tokens of every process's rollout share."""
    if run.world_size == 1:
        return float(masked_mean(values, mask))
    total = run.all_reduce_sum(float((values.double() * mask).sum()))
    return total / max(run.all_reduce_sum(float(mask.sum())), 1.0)


def global_explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, run: Run) -> float:
    """:func:`~alignlab.losses.ppo.explained_variance` over every process's rollout share."""
    if run.world_size == 1:
        return explained_variance(values, returns, mask)

    def variance(x: torch.Tensor) -> float:
        x = x.detach().double()
        return global_masked_mean((x - global_masked_mean(x, mask, run)) ** 2, mask, run)

    target = variance(returns)
    residual = variance(returns - values)
    return 1.0 - residual / target if target > 0 else float("nan")


# --------------------------------------------------------------------------------------------- rewards


def scores_on_last_token(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(b, t)`` zeros with ``scores[i]`` (``(b,)``) on the last real token of row ``i`` of ``mask``.

    The reward model judges the whole response, so its score is the reward of the action that completed it;
    every earlier token gets only the KL penalty. A row with no real token gets nothing.
    """
    lengths = mask.long().sum(-1)
    out = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rows = torch.nonzero(lengths > 0).squeeze(-1)
    out[rows, lengths[rows] - 1] = scores[rows]
    return out


def penalize_unfinished(scores: torch.Tensor, finished: torch.Tensor, penalty: float) -> torch.Tensor:
    """``scores - penalty`` where a response never finished (no EOS or stop string within max_new_tokens)."""
    return scores - penalty * (~finished.bool()).to(scores.dtype)


def shaped_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``r_t = -beta * KL_t + [t is the last real token] * score`` (Ziegler et al. 2019).

    Args:
        scores: ``(b,)`` response scores (already normalised/clipped/penalised).
        logps, ref_logps: ``(b, t)`` log-probs of the sampled tokens under the rollout policy and the reference.
        mask: ``(b, t)`` 1 on response tokens.
        kl_coef: ``beta``.
        estimator: ``k1`` or ``k3`` (:func:`~alignlab.losses.ppo.kl_penalty`).

    Returns:
        ``(rewards (b, t), kl (b, t))``, both 0 off the mask.
    """
    kl = torch.where(mask.bool(), kl_penalty(logps, ref_logps, estimator), 0.0)
    return -kl_coef * kl + scores_on_last_token(scores, mask), kl


@dataclass
class RunningMoments:
    """Running mean and variance of every score seen (Chan et al.'s parallel update), for reward
    normalisation; ``state()``/``load()`` go into checkpoints."""

    count: float = 0.0
    mean: float = 0.0
    var: float = 1.0

    def update(self, values: torch.Tensor) -> None:
        values = values.double()
        n = values.numel()
        if n == 0:
            return
        batch_mean, batch_var = values.mean().item(), values.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / max(math.sqrt(self.var), 1e-8)

    def state(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.var = float(state["count"]), float(state["mean"]), float(state["var"])


def as_scorer(reward: Scorer | Callable[..., Any] | str, cfg: PPOConfig, device: Any = None) -> Scorer:
    """A :class:`Scorer` from a spec (folder or ``module:function``), a Scorer, or a bare Python function."""
    if isinstance(reward, Scorer):
        return reward
    if callable(reward):
        return FunctionScorer(reward, getattr(reward, "__qualname__", repr(reward)))
    return load_scorer(reward, batch_size=cfg.reward_batch_size, allow_pickle=cfg.allow_pickle,
                       trust_remote_code=cfg.trust_remote_code, device=device, precision=cfg.precision)


def score_responses(scorer: Scorer, prompts: list[Any], texts: list[str]) -> torch.Tensor:
    """``(b,)`` float32 scores, checked: one finite number per response, else an error naming the scorer and
    the prompt (function scorers already check this; reward models and custom scorers are checked here)."""
    scores = scorer.score(prompts, texts)
    if len(scores) != len(texts):
        raise AlignlabError(f"reward {scorer.name} returned {len(scores)} scores for {len(texts)} responses")
    for i, s in enumerate(scores):
        if not math.isfinite(float(s)):
            raise AlignlabError(f"reward {scorer.name}: item {i}: the score is {s} (prompt {str(prompts[i])[:60]!r})")
    return torch.tensor([float(s) for s in scores], dtype=torch.float32)


# --------------------------------------------------------------------------------------------- prompts


def prompt_batches(n_prompts: int, batch: int, iterations: int, seed: int) -> list[list[int]]:
    """The prompt indices of every iteration, fixed by ``seed``: epochs of seeded permutations read in order
    (a batch may span two epochs). A pure function, so a resumed run continues at its iteration."""
    stream: list[int] = []
    epoch = 0
    while len(stream) < batch * iterations:
        stream.extend(np.random.default_rng([seed, epoch]).permutation(n_prompts).tolist())
        epoch += 1
    return [stream[i * batch : (i + 1) * batch] for i in range(iterations)]


def resolve_prompt_template(template: str, tokenizer: Any, prompt: Any) -> str:
    """``auto``: the chat template when the tokenizer has one; else alpaca for instruction mappings, none for
    text."""
    if template != "auto":
        return template
    if getattr(tokenizer, "chat_template", None):
        return "chat"
    return "alpaca" if isinstance(prompt, dict) else "none"


def encode_prompts(prompts: list[Any], tokenizer: Any, cfg: PPOConfig, context: int | None, source: str,
                   run: Run) -> tuple[list[Any], list[list[int]]]:
    """Token ids of each prompt; a prompt longer than ``max_prompt_length`` or whose response would not fit
    the model's context is an error naming it (``long_prompts=error``) or dropped and counted (``drop``)."""
    limit = cfg.max_prompt_length if cfg.max_prompt_length > 0 else math.inf
    if context:
        limit = min(limit, context - cfg.max_new_tokens)
    kept, ids, dropped = [], [], 0
    for number, prompt in enumerate(prompts, 1):
        try:
            encoded = encode_prompt(tokenizer, prompt, template=resolve_prompt_template(cfg.template, tokenizer,
                                                                                         prompt))
        except AlignlabError as e:
            raise AlignlabError(e.message, file=source, record=number, field=e.field or "prompt") from e
        if len(encoded) > limit:
            if cfg.long_prompts == "drop":
                dropped += 1
                continue
            why = (f"max_prompt_length is {cfg.max_prompt_length}" if limit == cfg.max_prompt_length else
                   f"with max_new_tokens {cfg.max_new_tokens} it does not fit the model's context of {context}")
            raise AlignlabError(f"prompt {str(prompt)[:60]!r} has {len(encoded)} tokens; {why} (long_prompts=drop "
                                "drops such prompts)", file=source, record=number, field="prompt")
        kept.append(prompt)
        ids.append(encoded)
    if dropped:
        run.print(f"{source}: dropped {dropped} prompt(s) longer than {limit} tokens")
    if not kept:
        raise AlignlabError("no prompt fits (every one was too long)", file=source)
    return kept, ids


def unescape(strings: Sequence[str]) -> list[str]:
    r"""Decode ``\n``-style escapes in stop strings given on the command line."""
    return [codecs.decode(s, "unicode_escape") if "\\" in s else s for s in strings]
