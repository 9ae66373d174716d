"""What online RL trainers share (PPO, and the critic-free family of :mod:`alignlab.train.grpo`): the rollout and
its batches, prompts encoded for sampling, the reference, the sampling and scoring steps, rewards scored, combined
and checked, log-probs of responses under any model, and the statistics of a rollout gathered over processes.

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
from alignlab.generation import Sample, SamplingConfig
from alignlab.losses.common import masked_mean, masked_whiten, selective_log_softmax
from alignlab.losses.ppo import explained_variance, kl_penalty
from alignlab.models import is_peft, load_frozen_reference
from alignlab.scoring import FunctionScorer, Scorer, load_scorer
from alignlab.tasks.loading import load_prompts, load_task
from alignlab.train.forward import AlignedBatch, SegmentPlan, collate_aligned, collate_shared_prompt, model_inputs
from alignlab.train.loop import Run
from alignlab.train.policy import split_eval

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


# --------------------------------------------------------------------------------------------- models and steps


def _unpeft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers stay injected), or ``model`` itself."""
    return model.get_base_model() if is_peft(model) else model


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer without its head (``model.model`` for Llama; found by ``base_model_prefix``)."""
    base = _unpeft(model)
    return getattr(base, base.base_model_prefix)


def response_hidden(model: torch.nn.Module, inputs: dict[str, Any], keep: int,
                    predictors: torch.Tensor | None) -> torch.Tensor:
    """Last hidden states ``(b, k, d)`` of ``model``'s backbone at the positions that predict the response
    tokens: the last ``keep + 1`` columns but one of an aligned batch, or the ``predictors`` (flat indices) of a
    shared-prompt batch."""
    hidden = _decoder(model)(**model_inputs(model, **inputs), use_cache=False).last_hidden_state
    if predictors is None:
        return hidden[:, -(keep + 1) : -1]
    return hidden.reshape(-1, hidden.shape[-1])[predictors]


def response_logits(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """A causal LM's logits ``(b, k, v)`` at a :class:`RolloutBatch`'s response positions (the reference)."""
    return _unpeft(model).get_output_embeddings()(response_hidden(model, batch.inputs, batch.keep, batch.predictors))


@dataclass
class PromptSets:
    """The prompts a run samples from, as given (for the reward and the logs) and as token ids."""

    train: list[Any]
    train_ids: list[list[int]]
    eval: list[Any]
    eval_ids: list[list[int]]


def load_reference(cfg: PPOConfig, tokenizer: Any, run: Run) -> torch.nn.Module | None:
    """The frozen reference: ``reference=``, else a copy of the starting policy; None with LoRA (the policy with
    its adapter disabled: the base weights, no second model)."""
    if cfg.reference or not cfg.lora:
        name = cfg.reference or cfg.model
        run.print(f"reference: a frozen copy of {name}")
        return load_frozen_reference(name, cfg, tokenizer, run.device)
    run.print("reference: the base weights (LoRA adapter disabled)")
    return None


def load_prompt_sets(cfg: PPOConfig, tokenizer: Any, policy: torch.nn.Module, run: Run) -> PromptSets:
    """Training and held-out prompts, encoded and checked against the length limits (``eval_prompts``, else
    ``eval_fraction`` of ``prompts`` held out)."""
    context = getattr(_unpeft(policy).config, "max_position_embeddings", None)
    train, train_ids = encode_prompts(load_prompts(cfg.prompts, limit=cfg.limit or None), tokenizer, cfg, context,
                                      cfg.prompts, run)
    if cfg.eval_prompts:
        return PromptSets(train, train_ids, *encode_prompts(load_prompts(cfg.eval_prompts), tokenizer, cfg, context,
                                                            cfg.eval_prompts, run))
    train_idx, eval_idx = split_eval(list(range(len(train))), cfg.eval_fraction, cfg.seed)
    return PromptSets([train[i] for i in train_idx], [train_ids[i] for i in train_idx],
                      [train[i] for i in eval_idx], [train_ids[i] for i in eval_idx])


def sample_rollout(sampler: Any, model: torch.nn.Module, prompts: PromptSets, mine: list[int], sampling: SamplingConfig,
                   cfg: PPOConfig, iteration: int, run: Run) -> list[Sample]:
    """Step 1: sample one response per entry of ``mine`` (prompt indices, each repeated k times) from the
    weights the last update left."""
    # a seed per (iteration, process): the samples do not depend on how many random numbers anything else
    # drew, so a resumed run samples exactly what the uninterrupted run did
    sampling.seed = int(np.random.SeedSequence([cfg.seed, iteration, run.rank]).generate_state(1)[0])
    sampler.sync(run.accelerator.unwrap_model(model).policy)
    return sampler.generate([prompts.train_ids[i] for i in mine], sampling)


def score_rollout(scorer: Scorer, prompts: PromptSets, mine: list[int], samples: list[Sample], iteration: int,
                  run: Run) -> tuple[torch.Tensor, list[int]]:
    """Step 2: the reward of every response (checked: one finite number each), and the rows kept: a response
    cut to nothing (the model's first token was padding) has no action to learn from."""
    all_scores = score_responses(scorer, [prompts.train[i] for i in mine], [s.text for s in samples])
    kept = [j for j, s in enumerate(samples) if s.response_ids]
    if not kept:
        raise AlignlabError(f"iteration {iteration + 1}: every response was empty")
    return all_scores, kept


@torch.no_grad()
def response_logps(model: torch.nn.Module, prompt_ids: list[list[int]], response_ids: list[list[int]], pad: int,
                   batch_size: int, temperature: float, run: Run, layout: dict[str, Any] | None = None,
                   adapter_off: bool = False) -> torch.Tensor:
    """Log-probs ``(b, t)`` (float32, 0 off the mask) of the responses under a causal LM, ``batch_size`` rows per
    forward, no gradient, under the run's autocast. ``adapter_off``: the LoRA policy with its adapter disabled
    (the base weights: the reference without a second model)."""
    width = max(len(r) for r in response_ids)
    pieces = []
    for start in range(0, len(prompt_ids), batch_size):
        sl = slice(start, start + batch_size)
        batch = collate_rollout(prompt_ids[sl], response_ids[sl], pad, layout).to(run.device)
        with run.accelerator.autocast():
            if adapter_off:
                with model.disable_adapter():
                    logits = response_logits(model, batch)
            else:
                logits = response_logits(model, batch)
        pieces.append(pad_columns(token_logps(logits, batch, temperature), width))
    return torch.cat(pieces)


class WeightedScorer(Scorer):
    """The weighted sum of several scorers' scores (``--reward a,b --reward-weights 1,0.1``)."""

    def __init__(self, parts: Sequence[tuple[Scorer, float]]) -> None:
        self.parts = list(parts)
        self.name = " + ".join(f"{w:g} x {s.name}" for s, w in self.parts)
        self.stats = None

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        total = [0.0] * len(responses)
        for scorer, weight in self.parts:
            for i, s in enumerate(score_responses(scorer, list(prompts), list(responses)).tolist()):
                total[i] += weight * s
        return total


def reward_scorer(cfg: Any, reward: Any, device: Any) -> tuple[Scorer, Callable[..., Any] | None]:
    """The reward of a critic-free run and, when it includes a built-in task's verifiable reward
    (``task:NAME``), that task's gold (e.g. exact-answer accuracy) for the held-out evaluation.

    ``reward`` (from code: a Scorer, a function, or a list of them) replaces ``cfg.reward``; otherwise
    ``cfg.reward`` is a comma list of ``module:function`` / ``task:NAME`` entries weighted by
    ``cfg.reward_weights``, plus ``cfg.reward_model`` with weight 1."""
    gold = None
    if reward is not None:
        entries: list[Any] = list(reward) if isinstance(reward, (list, tuple)) else [reward]
    else:
        entries = [e.strip() for e in cfg.reward.split(",") if e.strip()] if cfg.reward else []
    weights = list(cfg.reward_weights) or [1.0] * len(entries)
    if len(weights) != len(entries):
        raise AlignlabError(f"{len(weights)} weights for {len(entries)} rewards ({', '.join(map(str, entries))})",
                            field="reward_weights")
    parts: list[tuple[Scorer, float]] = []
    for entry, weight in zip(entries, weights):
        if isinstance(entry, str) and entry.startswith("task:"):
            task = load_task(entry[5:])
            if task.reward is None:
                raise AlignlabError(f"task {task.name} has no verifiable reward (its gold is learned through "
                                    "preferences in the lab)", field="reward")
            parts.append((FunctionScorer(task.reward, entry), float(weight)))
            gold = gold or task.gold_score
        else:
            parts.append((as_scorer(entry, cfg, device), float(weight)))
    if cfg.reward_model and reward is None:
        parts.append((as_scorer(cfg.reward_model, cfg, device), 1.0))
    if not parts:
        raise AlignlabError("no reward given", field="reward")
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0], gold
    return WeightedScorer(parts), gold
