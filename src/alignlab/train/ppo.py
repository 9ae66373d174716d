"""RLHF with PPO: sample responses, score them, and push the policy towards higher scores while a per-token
KL penalty keeps it near the reference.

The four roles:

- **policy**: the model trained (all weights, or a LoRA adapter);
- **reference**: frozen; the starting policy (or ``reference=``). With LoRA and no ``reference=`` it is the
  policy itself with its adapter disabled (the base weights): no second model in memory;
- **reward**: any :class:`~alignlab.scoring.Scorer`: a reward model folder, or a plain Python function
  ``f(prompts, responses) -> list[float]`` (``--reward module:function``), so a programmatic scorer can drive
  PPO directly (the DPO paper's "PPO-GT");
- **value model** (critic): per-token values ``V(s_t)`` from a scalar head. By default a separate model: an
  ``AutoModelForSequenceClassification`` (``num_labels=1``) loaded from the reward model (so its ``score``
  head starts as the trained reward head, as in InstructGPT) or from the policy (a fresh head, zeroed so the
  first values are 0); its backbone's hidden states at every response position go through ``score``, as TRL
  does. With ``share_backbone`` the critic is a ``Linear(hidden, 1)`` on the policy's own last hidden states:
  one backbone forward gives logits and values (memory and compute of one model).

Policy and critic live in one module (:class:`PolicyAndValue`): one optimizer, one DDP wrapper, and one Run
checkpoint that holds both.

One iteration, top to bottom (:func:`train_ppo`):

1. **rollout**: sample ``responses_per_prompt`` responses per prompt (default one) with the KV cache
   (:mod:`alignlab.generation`); each is cut at its first EOS (kept) or stop string, and marked unfinished when
   it hit ``max_new_tokens`` first;
2. **score**: the reward on the (prompt, response text) pairs, checked (count, finite);
3. **no-grad forward**: old log-probs and entropy (policy), values (critic), reference log-probs, once per
   rollout and batched: the update reuses them;
4. **rewards and advantages**: score normalised and clipped, unfinished responses penalised, the score put on
   each response's last real token, minus ``beta * KL`` on every token; GAE; advantages whitened over real
   tokens; the KL controller updated;
5. **update**: ``ppo_epochs`` passes over shuffled minibatches (``num_mini_batches`` optimizer steps each,
   micro-batches accumulated), clipped surrogate + clipped value loss (- entropy bonus);
6. **log, evaluate, checkpoint**.

Every trick is one named line in the loop with its reason beside it. References: Ziegler et al. 2019;
Ouyang et al. 2022; Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"; CleanRL's ``ppo.py``.

Response layout: a rollout's rows are "aligned" batches (:mod:`alignlab.train.forward`): prompts left-padded
so every response starts at column 0 of the kept columns; per-token tensors are ``(b, t)`` with
``mask[i] = [1] * len(response_i) + [0] * ...``. The LM head only ever runs on response positions. With
``responses_per_prompt > 1`` a prompt's responses follow one copy of it, each attending to the prompt and itself
(:func:`~alignlab.train.forward.collate_shared_prompt`, exactly the same numbers): with SmolLM2 on the lab's
prompts (56 tokens, responses of ~25) four responses per prompt halve the tokens of every forward and backward.

Log-probs are of the sampling distribution at ``temperature`` (logits divided by it), as TRL does; top-p/top-k
truncation is not reflected in them (also as TRL).
"""

from __future__ import annotations

import codecs
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from alignlab.config import PPOConfig
from alignlab.data.tokenize import IGNORE_INDEX, encode_prompt
from alignlab.errors import AlignlabError
from alignlab.generation import Sample, SamplingConfig, check_backend, generate_from_ids, make_sampler
from alignlab.losses.common import masked_mean, masked_whiten, selective_log_softmax
from alignlab.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    ppo_policy_loss,
    ppo_value_loss,
)
from alignlab.models import (
    add_lora,
    count_parameters,
    disable_dropout,
    is_peft,
    load_frozen_reference,
    load_model,
    load_tokenizer,
    resolve_model,
    resolve_precision,
)
from alignlab.scoring import FunctionScorer, Scorer, load_scorer
from alignlab.tasks.loading import load_prompts
from alignlab.train.forward import (
    AlignedBatch,
    SegmentPlan,
    collate_aligned,
    collate_shared_prompt,
    model_inputs,
    shared_prompt_layout,
)
from alignlab.train.loop import Run
from alignlab.train.policy import prepare_policy, split_eval

__all__ = [
    "PPOConfig",
    "PolicyAndValue",
    "RunningMoments",
    "Rollout",
    "collate_rollout",
    "penalize_unfinished",
    "prompt_batches",
    "scores_on_last_token",
    "shaped_rewards",
    "train_ppo",
]



# --------------------------------------------------------------------------------------------- the critic


def _unpeft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers stay injected), or ``model`` itself."""
    return model.get_base_model() if is_peft(model) else model


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer without its head (``model.model`` for Llama; found by ``base_model_prefix``)."""
    base = _unpeft(model)
    return getattr(base, base.base_model_prefix)


class PolicyAndValue(torch.nn.Module):
    """The two trainable roles in one module: ``policy`` (a causal LM) and either ``critic`` (a score-head
    model whose ``score`` Linear reads every response position) or ``value_head`` (a Linear on the policy's
    own hidden states, ``share_backbone``)."""

    def __init__(self, policy: torch.nn.Module, critic: torch.nn.Module | None = None,
                 value_head: torch.nn.Module | None = None) -> None:
        super().__init__()
        if (critic is None) == (value_head is None):
            raise ValueError("give exactly one of critic and value_head")
        self.policy, self.critic, self.value_head = policy, critic, value_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                keep: int, predictors: torch.Tensor | None = None, segments: SegmentPlan | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(b, k, v)`` and values ``(b, k)`` (float32) at the ``k = keep`` response positions of a
        :class:`RolloutBatch`: column ``j`` predicts response token ``j`` and values the state before it."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, segments=segments)
        hidden = response_hidden(self.policy, inputs, keep, predictors)
        logits = _unpeft(self.policy).get_output_embeddings()(hidden)
        if self.value_head is not None:  # one backbone forward for both heads
            values = self.value_head(hidden)
        else:
            values = _unpeft(self.critic).score(response_hidden(self.critic, inputs, keep, predictors))
        return logits, values.squeeze(-1).float()


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


def load_critic(cfg: PPOConfig, tokenizer: Any, scorer: Scorer) -> torch.nn.Module:
    """The value model (see the module docstring): a score-head model from ``value_model``, else the reward model
    (a folder), else the policy with a zeroed head; with LoRA when the policy has LoRA."""
    from alignlab.scoring import ModelScorer

    source = cfg.value_model or (cfg.reward_model if isinstance(scorer, ModelScorer) else cfg.model)
    critic = load_model(source, head="score", allow_pickle=cfg.allow_pickle,
                        trust_remote_code=cfg.trust_remote_code, tokenizer=tokenizer)
    if is_peft(critic):  # a LoRA reward model: fold its adapter in, the critic trains its own
        critic = critic.merge_and_unload()
    if source != cfg.model:  # the critic reads the policy's token ids: the vocabularies must agree
        if load_tokenizer(source, trust_remote_code=cfg.trust_remote_code).get_vocab() != tokenizer.get_vocab():
            raise AlignlabError("the value model's tokenizer differs from the policy's; it must read the policy's "
                                "tokens (use value_model=POLICY or share_backbone=true)", file=source)
    else:  # a fresh head: start every value at 0 rather than at random
        torch.nn.init.zeros_(critic.score.weight)
    critic.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(critic)
    if cfg.gradient_checkpointing:
        critic.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        if cfg.gradient_checkpointing:
            critic.enable_input_require_grads()
        critic = add_lora(critic, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_targets, modules_to_save=["score"])
    return critic


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


def _pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1])) if x.shape[1] < width else x


def token_logps(logits: torch.Tensor, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """Log-probs ``(b, t)`` (float32) of the response tokens under ``logits / temperature``; 0 off the mask.
    bf16 logits are normalised in float32 without an upcast copy (:func:`selective_log_softmax`)."""
    if temperature != 1.0:
        logits = logits.float() / temperature
    return selective_log_softmax(logits, batch.targets).float() * batch.loss_mask


@torch.no_grad()
def rollout_forward(model: torch.nn.Module, reference: torch.nn.Module | None, prompt_ids: list[list[int]],
                    response_ids: list[list[int]], pad: int, cfg: PPOConfig, run: Run,
                    layout: dict[str, Any] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Old log-probs, entropies, values and reference log-probs ``(b, t)`` of a rollout, ``batch_size`` rows
    per forward, no gradient. ``reference=None``: the policy with its LoRA adapter disabled. ``layout``:
    rows that share a prompt are encoded with one copy of it (:func:`collate_rollout`)."""
    unwrapped = run.accelerator.unwrap_model(model)
    width = max(len(r) for r in response_ids)
    pieces: dict[str, list[torch.Tensor]] = {"logps": [], "entropy": [], "values": [], "ref": []}
    for start in range(0, len(prompt_ids), cfg.batch_size):
        sl = slice(start, start + cfg.batch_size)
        batch = collate_rollout(prompt_ids[sl], response_ids[sl], pad, layout).to(run.device)
        with run.accelerator.autocast():
            logits, values = unwrapped(**batch.inputs, keep=batch.keep, predictors=batch.predictors)
            if reference is None:
                with unwrapped.policy.disable_adapter():
                    ref_logits = response_logits(unwrapped.policy, batch)
            else:
                ref_logits = response_logits(reference, batch)
        scaled = logits.float() / cfg.temperature
        pieces["logps"].append(token_logps(logits, batch, cfg.temperature))
        pieces["entropy"].append(entropy_from_logits(scaled, batch.loss_mask))
        pieces["values"].append(values * batch.loss_mask)
        pieces["ref"].append(token_logps(ref_logits, batch, cfg.temperature))
    out = [torch.cat([_pad_columns(x, width) for x in pieces[k]]) for k in ("logps", "entropy", "values", "ref")]
    return out[0], out[1], out[2], out[3]


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


# --------------------------------------------------------------------------------------------- checks


def check_config(cfg: PPOConfig) -> None:
    """Refuse settings that cannot work, before anything is loaded."""
    if cfg.policy:
        if cfg.model not in ("tiny-random", cfg.policy):  # model's default, or the same name twice
            raise AlignlabError(f"--policy {cfg.policy} and --model {cfg.model} disagree; give one", field="policy")
        cfg.model = cfg.policy
    cfg.policy = cfg.model
    if not cfg.prompts:
        raise AlignlabError("no prompts: pass --prompts FILE (.txt, one per line, or a data file)", field="prompts")
    if bool(cfg.reward_model) == bool(cfg.reward):
        raise AlignlabError("give exactly one of --reward-model FOLDER and --reward module:function",
                            field="reward_model")
    for name in ("iterations", "ppo_epochs", "num_mini_batches", "batch_size", "grad_accum", "max_new_tokens",
                 "responses_per_prompt"):
        if getattr(cfg, name) < 1:
            raise AlignlabError(f"must be at least 1, found {getattr(cfg, name)}", field=name)
    if cfg.temperature <= 0:
        raise AlignlabError("PPO samples from the policy: temperature must be > 0", field="temperature")
    if cfg.share_backbone and cfg.value_model:
        raise AlignlabError("share_backbone puts the value head on the policy; drop value_model", field="value_model")
    if cfg.target_kl < 0 or cfg.kl_coef < 0:
        raise AlignlabError("kl_coef and target_kl must be >= 0", field="kl_coef")
    check_backend(cfg.backend)  # vllm without vllm installed: a clear error before anything is loaded


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_policy(model: torch.nn.Module, reference: torch.nn.Module | None, scorer: Scorer, tokenizer: Any,
                    prompts: list[Any], prompt_ids: list[list[int]], cfg: PPOConfig, run: Run
                    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Mean score and KL to the reference (nats per response, ``kl_estimator``) on held-out prompts, one
    response each (greedy, or sampled with a fixed seed so every evaluation draws the same random stream)."""
    mine = list(range(run.rank, len(prompts), run.world_size))
    policy = run.accelerator.unwrap_model(model).policy
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0 if cfg.eval_greedy else
                              cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                              batch_size=cfg.generation_batch_size or len(mine) or 1, seed=cfg.seed + 7919,
                              stop_strings=unescape(cfg.stop_strings), precision=resolve_precision(cfg.precision))
    samples = generate_from_ids(policy, tokenizer, [prompt_ids[i] for i in mine], sampling)
    texts = [s.text for s in samples]
    scores = score_responses(scorer, [prompts[i] for i in mine], texts)
    keep = [j for j, s in enumerate(samples) if s.response_ids]
    kl_sum = 0.0
    if keep:
        logps, _, _, ref = rollout_forward(model, reference, [samples[j].prompt_ids for j in keep],
                                           [samples[j].response_ids for j in keep], tokenizer.pad_token_id, cfg, run)
        mask = response_mask([samples[j].response_ids for j in keep], logps.device)
        kl_sum = float(torch.where(mask.bool(), kl_penalty(logps, ref, cfg.kl_estimator), 0.0).sum())
    n = run.all_reduce_sum(len(mine))
    metrics = {
        "eval/score": run.all_reduce_sum(float(scores.sum())) / n,
        "eval/kl": run.all_reduce_sum(kl_sum) / n,
        "eval/response_length": run.all_reduce_sum(sum(len(s.response_ids) for s in samples)) / n,
        "eval/unfinished": run.all_reduce_sum(sum(not s.finished for s in samples)) / n,
    }
    shown = [{"split": "eval", "prompt": prompts[mine[j]], "response": texts[j], "score": float(scores[j]),
              "finished": samples[j].finished} for j in range(min(cfg.log_samples, len(samples)))]
    return metrics, shown


# --------------------------------------------------------------------------------------------- the trainer


def train_ppo(cfg: PPOConfig, *, reward: Scorer | Callable[..., Any] | None = None) -> Any:
    """Run PPO as configured; returns the run folder. ``reward`` (a Scorer or a Python function
    ``f(prompts, responses)``) replaces ``--reward``/``--reward-model`` when given from code."""
    if reward is not None and not (cfg.reward or cfg.reward_model):
        cfg.reward = getattr(reward, "__qualname__", "python function")
    check_config(cfg)
    run = Run(cfg, "ppo")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    pad = tokenizer.pad_token_id

    # -- the four roles -------------------------------------------------------------------------------
    scorer = as_scorer(reward if reward is not None else (cfg.reward_model or cfg.reward), cfg, run.device)
    if cfg.reward_normalization == "stats" and not (scorer.stats and "mean" in scorer.stats):
        raise AlignlabError(f"reward_normalization=stats needs the reward model's reward_stats.json; {scorer.name} "
                            "has none (use running)", field="reward_normalization")
    policy = prepare_policy(cfg, tokenizer)
    disable_dropout(policy)
    if cfg.reference:
        reference = load_frozen_reference(cfg.reference, cfg, tokenizer, run.device)
        run.print(f"reference: a frozen copy of {cfg.reference}")
    elif cfg.lora:
        reference = None  # the policy with its adapter disabled: the base weights, no second model
        run.print("reference: the base weights (LoRA adapter disabled)")
    else:
        reference = load_frozen_reference(cfg.model, cfg, tokenizer, run.device)
        run.print(f"reference: a frozen copy of {cfg.model}")
    if cfg.share_backbone:
        hidden = _unpeft(policy).config.hidden_size
        value_head = torch.nn.Linear(hidden, 1, bias=False)
        torch.nn.init.zeros_(value_head.weight)  # values start at 0
        model = PolicyAndValue(policy, value_head=value_head)
        run.print("value model: a value head on the policy's backbone (shared)")
    else:
        model = PolicyAndValue(policy, critic=load_critic(cfg, tokenizer, scorer))
        run.print(f"value model: {cfg.value_model or ('the reward model' if cfg.reward_model else cfg.model)}")

    # -- prompts --------------------------------------------------------------------------------------
    context = getattr(_unpeft(policy).config, "max_position_embeddings", None)
    train_prompts, train_ids = encode_prompts(load_prompts(cfg.prompts, limit=cfg.limit or None), tokenizer, cfg,
                                              context, cfg.prompts, run)
    if cfg.eval_prompts:
        eval_prompts, eval_ids = encode_prompts(load_prompts(cfg.eval_prompts), tokenizer, cfg, context,
                                                cfg.eval_prompts, run)
    else:
        train_idx, eval_idx = split_eval(list(range(len(train_prompts))), cfg.eval_fraction, cfg.seed)
        eval_prompts, eval_ids = [train_prompts[i] for i in eval_idx], [train_ids[i] for i in eval_idx]
        train_prompts, train_ids = [train_prompts[i] for i in train_idx], [train_ids[i] for i in train_idx]
    rollout_size = cfg.batch_size * cfg.grad_accum * cfg.num_mini_batches  # per process
    k = cfg.responses_per_prompt
    if rollout_size % k:
        raise AlignlabError(f"the rollout ({rollout_size} responses per process = batch_size x grad_accum x "
                            f"num_mini_batches) is not a multiple of responses_per_prompt={k}",
                            field="responses_per_prompt")
    # prompts per rollout; each is sampled k times, its responses listed together (and encoded after one copy of
    # the prompt: the forward passes cost about (prompt + k responses) instead of k x (prompt + response))
    batches = prompt_batches(len(train_prompts), rollout_size * run.world_size // k, cfg.iterations, cfg.seed)
    layout = shared_prompt_layout(policy) if k > 1 and not run.shards_weights else None
    steps_per_iteration = cfg.ppo_epochs * cfg.num_mini_batches

    # -- optimizer, KL controller, resume ------------------------------------------------------------
    trainable, total = count_parameters(model)
    run.print(f"policy {cfg.model}: {trainable:,} trainable of {total:,} parameters (policy + value); reward "
              f"{scorer.name}; {len(train_prompts)} train / {len(eval_prompts)} eval prompts; rollout "
              f"{rollout_size * run.world_size} responses x {cfg.iterations} iterations; {run.world_size} process(es)")
    model, optimizer, scheduler, start, extra = run.prepare_training(model, cfg.iterations * steps_per_iteration)
    if cfg.target_kl > 0:
        kl_controller: Any = AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    else:
        kl_controller = FixedKLController(cfg.kl_coef)
    running = RunningMoments()
    if extra:
        kl_controller.value = float(extra["kl_coef"])
        running.load(extra["running_scores"])
    model.train()
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, batch_size=cfg.generation_batch_size or rollout_size,
                              stop_strings=unescape(cfg.stop_strings), precision=resolve_precision(cfg.precision))

    # rollouts: hf generate on the live policy, or a vLLM engine whose weights are re-synced every iteration
    sampler = make_sampler(cfg.backend, run.accelerator.unwrap_model(model).policy, tokenizer,
                           checkpoint=resolve_model(cfg.model) if cfg.backend == "vllm" else None)

    def evaluate(step: int) -> dict[str, float]:
        t = time.perf_counter()
        metrics, shown = evaluate_policy(model, reference, scorer, tokenizer, eval_prompts, eval_ids, cfg, run)
        for record in shown:
            run.log(step, record, file="samples.jsonl")
        return {**metrics, "time/eval": time.perf_counter() - t}

    if start == 0 and eval_prompts:  # the starting point, to compare every later evaluation with
        baseline = evaluate(0)
        run.log(0, baseline)
        run.print(f"iteration 0: held-out score {baseline['eval/score']:.4f}")

    # -- the loop ---------------------------------------------------------------------------------------
    bar = run.progress(cfg.iterations, start)
    for iteration in range(start, cfg.iterations):
        t0 = time.perf_counter()

        # -- 1. rollout: one sampled response per prompt ------------------------------------------------
        mine = [i for i in batches[iteration][run.rank :: run.world_size] for _ in range(k)]
        # a seed per (iteration, process): the samples do not depend on how many random numbers anything
        # else drew, so a resumed run samples exactly what the uninterrupted run did
        sampling.seed = int(np.random.SeedSequence([cfg.seed, iteration, run.rank]).generate_state(1)[0])
        sampler.sync(run.accelerator.unwrap_model(model).policy)  # the weights the last update left
        samples: list[Sample] = sampler.generate([train_ids[i] for i in mine], sampling)
        t_generation = time.perf_counter() - t0

        # -- 2. score ---------------------------------------------------------------------------------------
        t = time.perf_counter()
        all_scores = score_responses(scorer, [train_prompts[i] for i in mine], [s.text for s in samples])
        t_scoring = time.perf_counter() - t
        # a response cut to nothing (the model's first token was padding) has no action to learn from
        kept = [j for j, s in enumerate(samples) if s.response_ids]
        empty = len(samples) - len(kept)
        if not kept:
            raise AlignlabError(f"iteration {iteration + 1}: every response was empty")
        prompts = [train_prompts[mine[j]] for j in kept]
        prompt_ids = [samples[j].prompt_ids for j in kept]
        response_ids = [samples[j].response_ids for j in kept]
        texts = [samples[j].text for j in kept]
        finished = torch.tensor([samples[j].finished for j in kept], device=run.device)
        raw_scores = all_scores[kept].to(run.device)

        # -- 3. old log-probs, values, reference log-probs: once per rollout, no gradient ---------------
        t = time.perf_counter()
        logps, entropy, values, ref_logps = rollout_forward(model, reference, prompt_ids, response_ids, pad, cfg, run,
                                                            layout)
        mask = response_mask(response_ids, run.device)
        t_forward = time.perf_counter() - t
        ro = Rollout(prompts, prompt_ids, response_ids, texts, finished, mask, logps, ref_logps, values, entropy,
                     raw_scores)

        # -- 4. rewards and advantages ----------------------------------------------------------------------
        scores = raw_scores
        if cfg.reward_normalization == "running":  # scores on a stable scale whatever the reward's units
            running.update(run.accelerator.gather(all_scores.to(run.device)))  # every process's scores
            scores = running.normalize(scores)
        elif cfg.reward_normalization == "stats":  # the reward model's own training statistics
            scores = (scores - float(scorer.stats["mean"])) / max(float(scorer.stats["std"]), 1e-8)
        if cfg.reward_clip > 0:  # one outlier score must not dominate an update
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        if cfg.unfinished_penalty:  # discourage rambling until the length limit
            scores = penalize_unfinished(scores, finished, cfg.unfinished_penalty)
        kl_coef = kl_controller.value
        rewards, kl = shaped_rewards(scores, logps, ref_logps, mask, kl_coef, cfg.kl_estimator)
        if cfg.whiten_rewards:  # rescale (no shift: the sign of a reward means something)
            rewards = whiten(rewards, mask, run, shift_mean=False)
        advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:  # per-batch scale-free advantages; statistics over the global rollout's tokens
            advantages = whiten(advantages, mask, run)
        ro.scores, ro.kl, ro.rewards, ro.advantages, ro.returns = scores, kl, rewards, advantages, returns
        mean_kl = run.gather_mean(float(kl.sum(-1).mean()))  # nats per response
        kl_controller.update(mean_kl, len(batches[iteration]))  # the next rollout's beta

        # -- 5. update: ppo_epochs passes over shuffled minibatches ------------------------------------------
        t = time.perf_counter()
        sums: Counter = Counter()
        grad_norms = []
        update_rng = np.random.default_rng([cfg.seed, iteration, 1])
        groups = prompt_groups(prompt_ids)  # one row each unless responses_per_prompt > 1: kept together
        for _epoch in range(cfg.ppo_epochs):
            for chosen in np.array_split(update_rng.permutation(len(groups)), cfg.num_mini_batches):
                minibatch = np.array([i for g in chosen for i in groups[g]], dtype=int)
                # the loss is a mean over the minibatch's response tokens (on every process), however it is cut
                minibatch_tokens = run.all_reduce_sum(float(mask[minibatch].sum()))
                micro = [m for m in np.array_split(minibatch, cfg.grad_accum) if len(m)]
                ok = True
                for j, rows in enumerate(micro):
                    rows = rows.tolist()
                    ok = update_micro_batch(model, ro, rows, minibatch_tokens, pad, cfg, run, sums, iteration,
                                            last=j == len(micro) - 1, layout=layout) and ok
                norm = run.optimizer_step(model, optimizer, scheduler, iteration) if ok else None
                if not ok:
                    optimizer.zero_grad(set_to_none=True)
                if norm is not None:
                    grad_norms.append(norm)
        t_update = time.perf_counter() - t

        # -- 6. log, evaluate, checkpoint -----------------------------------------------------------------
        n = run.all_reduce_sum(len(kept))
        tokens = run.all_reduce_sum(float(mask.sum()))
        sums = Counter({k: run.all_reduce_sum(v) for k, v in sorted(sums.items())})  # every process's updates
        updated = max(sums["tokens"], 1.0)
        score_mean = run.all_reduce_sum(float(raw_scores.sum())) / n
        score_var = run.all_reduce_sum(float(((raw_scores.double() - score_mean) ** 2).sum())) / n
        metrics: dict[str, Any] = {
            "score": score_mean,
            "score_std": math.sqrt(score_var) if n > 1 else 0.0,
            "score_shaped": run.all_reduce_sum(float(scores.sum())) / n,
            "kl": mean_kl,
            "kl_coef": kl_coef,
            "reward": run.all_reduce_sum(float(rewards.sum())) / n,  # score - beta * KL, per response
            "non_score_reward": run.all_reduce_sum(float((-kl_coef * kl).sum())) / n,
            "entropy": run.all_reduce_sum(float(entropy.sum())) / tokens,
            "clip_fraction": sums["clip_fraction"] / updated,
            "approx_kl": sums["approx_kl"] / updated,
            "policy_loss": sums["policy_loss"] / updated,
            "value_loss": sums["value_loss"] / updated,
            "value_clip_fraction": sums["value_clip_fraction"] / updated,
            "explained_variance": global_explained_variance(values, returns, mask, run),
            "advantage_mean": global_masked_mean(ro.advantages, mask, run),
            "return_mean": global_masked_mean(returns, mask, run),
            "value_mean": global_masked_mean(values, mask, run),
            "response_length": tokens / n,
            "unfinished": run.all_reduce_sum(float((~finished).sum())) / n,
            "empty_responses": int(run.all_reduce_sum(empty)),
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else None,
            "lr": scheduler.get_last_lr()[0],
            "time/generation": t_generation,
            "time/scoring": t_scoring,
            "time/forward": t_forward,
            "time/update": t_update,
            "time/iteration": time.perf_counter() - t0,
        }
        if run.should_eval(iteration, cfg.iterations) and eval_prompts:
            metrics.update(evaluate(iteration + 1))
        if (iteration + 1) % cfg.log_every == 0 or "eval/score" in metrics:
            run.log(iteration + 1, metrics)
            for j in range(min(cfg.log_samples, len(kept))):
                run.log(iteration + 1, {"split": "train", "prompt": prompts[j], "response": texts[j],
                                        "score": float(raw_scores[j]), "finished": bool(finished[j]),
                                        "kl": float(kl[j].sum())}, file="samples.jsonl")
        bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{mean_kl:.3f}", beta=f"{kl_coef:.3g}", refresh=False)
        bar.update(1)
        run.checkpoint_or_stop(iteration, cfg.iterations, model, optimizer, scheduler,
                               extra={"kl_coef": float(kl_controller.value), "running_scores": running.state()})

    sampler.close()
    return run.finish(run.accelerator.unwrap_model(model).policy, tokenizer)


def update_micro_batch(model: torch.nn.Module, ro: Rollout, rows: list[int], minibatch_tokens: float, pad: int,
                       cfg: PPOConfig, run: Run, sums: Counter, iteration: int, *, last: bool,
                       layout: dict[str, Any] | None = None) -> bool:
    """Forward and backward one micro-batch of rollout ``rows``; adds its statistics (token-weighted) to
    ``sums``. Returns False when its loss was not finite (and ``on_nan=skip``)."""
    batch = collate_rollout([ro.prompt_ids[i] for i in rows], [ro.response_ids[i] for i in rows], pad,
                            layout).to(run.device)
    k = batch.keep
    mask = batch.loss_mask

    def old(x: torch.Tensor) -> torch.Tensor:
        return x[rows, :k]

    with run.accumulate(model, last=last):
        with run.accelerator.autocast():
            logits, values = model(**batch.inputs, keep=k, predictors=batch.predictors)
        logps = token_logps(logits, batch, cfg.temperature)
        policy = ppo_policy_loss(logps, old(ro.logps), old(ro.advantages), mask, cfg.clip_range)
        value = ppo_value_loss(values, old(ro.values), old(ro.returns), mask, cfg.clip_range_value or None)
        loss = policy.loss + cfg.vf_coef * value.loss
        if cfg.entropy_coef:  # a bonus for keeping the policy's distribution broad
            entropy = masked_mean(entropy_from_logits(logits.float() / cfg.temperature, mask), mask)
            loss = loss - cfg.entropy_coef * entropy
        tokens = float(mask.sum())
        # token mean over the minibatch; x world because DDP averages gradients over processes
        loss = loss * tokens / minibatch_tokens * run.world_size
        ok = run.check_finite(loss, iteration)  # on_nan=stop raises here, keeping the last good checkpoint
        run.accelerator.backward(loss)  # even when skipped (the step is dropped): every process runs backward
    sums["tokens"] += tokens
    sums["policy_loss"] += float(policy.loss.detach()) * tokens
    sums["value_loss"] += float(value.loss.detach()) * tokens
    sums["clip_fraction"] += float(policy.clip_fraction) * tokens
    sums["approx_kl"] += float(policy.approx_kl) * tokens
    sums["value_clip_fraction"] += float(value.clip_fraction) * tokens
    return ok
