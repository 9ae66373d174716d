"""Critic-free online RL: GRPO, Dr. GRPO, RLOO and REINFORCE++ in one trainer, chosen by options.

PPO learns a value model to tell a good token from a lucky one; these methods instead sample a *group* of
``group_size`` responses per prompt and use the others as the baseline (or the whole batch, REINFORCE++), so
only the policy is trained and only the policy (and, when ``beta > 0``, a reference) is in memory. The rollout,
scoring, prompts and reference are PPO's (:mod:`alignlab.train.rollout`); the advantages and the clipped loss
are pure functions in :mod:`alignlab.losses.grpo`.

One iteration, top to bottom (:func:`train_grpo`):

1. **rollout**: ``group_size`` samples for each of ``prompts_per_iteration`` prompts (a prompt's samples listed
   together);
2. **score**: the reward (a reward model, Python functions with weights, or a task's verifiable reward), checked:
   one finite number per response, else the run stops naming the function and the item (the checkpoints written
   so far are kept);
3. **forward** (only what is needed): the rollout policy's log-probs (when the policy moves before the last
   minibatch, or to measure the sampler mismatch), the reference's (``beta > 0``), the sampler's (a bf16 copy
   or vLLM proposed the tokens: its gap to the trained model is logged and corrected by truncated importance
   sampling);
4. **advantages**: over-long responses penalised or filtered, the KL in the reward (``kl_in=reward``), group (or
   batch) baselines; groups whose rewards are all equal dropped (dynamic sampling): all counted in the log;
5. **update**: ``update_epochs`` passes of ``num_mini_batches`` optimizer steps (a group is never split), the
   clipped loss aggregated per token, per sequence or by a constant;
6. **log, evaluate, checkpoint**.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alignlab.config import GRPOConfig
from alignlab.errors import AlignlabError
from alignlab.generation import Sample, SamplingConfig, check_backend, generate_from_ids, make_sampler
from alignlab.losses.grpo import (
    equal_reward_groups,
    group_advantages,
    grpo_policy_loss,
    reinforce_pp_advantages,
    truncated_importance_weights,
)
from alignlab.losses.ppo import kl_penalty
from alignlab.models import count_parameters, disable_dropout, load_tokenizer, resolve_model, resolve_precision
from alignlab.scoring import Scorer
from alignlab.train.checkpoints import latest_checkpoint
from alignlab.train.forward import SegmentPlan, shared_prompt_layout
from alignlab.train.loop import Run
from alignlab.train.policy import prepare_policy
from alignlab.train.rollout import (
    PromptSets,
    _unpeft,
    collate_rollout,
    load_prompt_sets,
    load_reference,
    penalize_unfinished,
    prompt_batches,
    prompt_groups,
    response_hidden,
    response_logps,
    response_mask,
    reward_scorer,
    sample_rollout,
    score_responses,
    score_rollout,
    token_logps,
    unescape,
)

__all__ = ["GRPOConfig", "PolicyOnly", "resolved_aggregation", "resolved_kl_in", "train_grpo"]

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


class PolicyOnly(torch.nn.Module):
    """The one trainable role, wrapped so the optimizer, DDP and the checkpoints see ``policy.*`` as PPO's do;
    ``forward`` gives the logits ``(b, k, v)`` at a :class:`~alignlab.train.rollout.RolloutBatch`'s response
    positions only."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                keep: int, predictors: torch.Tensor | None = None, segments: SegmentPlan | None = None
                ) -> torch.Tensor:
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, segments=segments)
        return _unpeft(self.policy).get_output_embeddings()(response_hidden(self.policy, inputs, keep, predictors))


@dataclass
class GroupRollout:
    """One iteration's experience. Rows are responses, group by group; per-token tensors ``(b, t)``.

    Attributes:
        old_logps: under the policy that sampled (None: the first update's own log-probs, detached, are them).
        ref_logps: under the reference (None at ``beta = 0``).
        sampler_logps: under the model that proposed the tokens, when it is not the trained one.
        scores: ``(b,)`` the reward (after the over-long penalty and a KL in the reward).
        advantages: ``(b,)`` or ``(b, t)``.
        train_rows: the rows the update learns from (not in a dropped group, not empty, not filtered).
    """

    prompts: list[Any]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    finished: torch.Tensor
    mask: torch.Tensor
    raw_scores: torch.Tensor
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    sampler_logps: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    train_rows: list[int] | None = None
    counts: Counter | None = None
    update_logps: torch.Tensor | None = None  # old_logps None: the update's own, detached (trained rows only)


# --------------------------------------------------------------------------------------------- checks


def resolved_aggregation(cfg: GRPOConfig) -> str:
    """``loss_aggregation``, with ``auto`` resolved per estimator (as each method's paper does)."""
    if cfg.loss_aggregation != "auto":
        return cfg.loss_aggregation
    return {"grpo": "sequence_mean", "dr_grpo": "constant"}.get(cfg.advantage, "token_mean")


def resolved_kl_in(cfg: GRPOConfig) -> str:
    """``kl_in`` with ``auto`` resolved: the reward (k1) for rloo and reinforce_pp, the loss (k3) otherwise."""
    if cfg.kl_in != "auto":
        return cfg.kl_in
    return "reward" if cfg.advantage in ("rloo", "reinforce_pp") else "loss"


def check_grpo_config(cfg: GRPOConfig) -> None:
    """Refuse settings that cannot work, before anything is loaded, naming the option."""
    if cfg.policy:
        if cfg.model not in ("tiny-random", cfg.policy):
            raise AlignlabError(f"--policy {cfg.policy} and --model {cfg.model} disagree; give one", field="policy")
        cfg.model = cfg.policy
    cfg.policy = cfg.model
    if not cfg.prompts:
        raise AlignlabError("no prompts: pass --prompts FILE or task:NAME:train", field="prompts")
    if not (cfg.reward or cfg.reward_model):
        raise AlignlabError("no reward: pass --reward module:function (or task:NAME) and/or --reward-model FOLDER",
                            field="reward")
    for name in ("iterations", "prompts_per_iteration", "group_size", "num_mini_batches", "update_epochs",
                 "batch_size", "max_new_tokens", "reward_batch_size"):
        if getattr(cfg, name) < 1:
            raise AlignlabError(f"must be at least 1, found {getattr(cfg, name)}", field=name)
    if cfg.advantage in GROUP_ESTIMATORS and cfg.group_size < 2:
        raise AlignlabError(f"advantage={cfg.advantage} takes its baseline from the other responses to the same "
                            f"prompt: group_size must be at least 2, found {cfg.group_size} (reinforce_pp works "
                            "with 1)", field="group_size")
    if cfg.num_mini_batches > cfg.prompts_per_iteration:
        raise AlignlabError(f"{cfg.num_mini_batches} minibatches cannot split {cfg.prompts_per_iteration} groups "
                            "(a group is never split)", field="num_mini_batches")
    if cfg.temperature <= 0:
        raise AlignlabError("GRPO samples from the policy: temperature must be > 0", field="temperature")
    if not 0 < cfg.top_p <= 1:
        raise AlignlabError(f"must be in (0, 1], found {cfg.top_p}", field="top_p")
    if not 0 <= cfg.clip_low < 1:
        raise AlignlabError(f"must be in [0, 1), found {cfg.clip_low}", field="clip_low")
    for name in ("clip_high", "beta", "overlong_penalty"):
        if getattr(cfg, name) < 0:
            raise AlignlabError(f"must be >= 0, found {getattr(cfg, name)}", field=name)
    if cfg.importance_cap <= 0:
        raise AlignlabError(f"must be > 0, found {cfg.importance_cap}", field="importance_cap")
    if cfg.lr <= 0:
        raise AlignlabError(f"must be > 0, found {cfg.lr}", field="lr")
    check_backend(cfg.backend)


# --------------------------------------------------------------------------------------------- the steps


def rollout_logps(model: torch.nn.Module, reference: torch.nn.Module | None, sampler: Any, ro: GroupRollout,
                  pad: int, cfg: GRPOConfig, run: Run, layout: dict[str, Any] | None, need_old: bool) -> None:
    """Step 3: the log-probs the advantages and the update need, no gradient; stored on ``ro``."""
    policy = run.accelerator.unwrap_model(model).policy
    rows = [i for i, r in enumerate(ro.response_ids) if r]  # an empty response has no token to score
    args = ([ro.prompt_ids[i] for i in rows], [ro.response_ids[i] for i in rows], pad, cfg.batch_size,
            cfg.temperature, run, layout)

    def all_rows(logps: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(ro.mask.shape, dtype=logps.dtype, device=logps.device)
        out[rows, : logps.shape[1]] = logps
        return out

    proposal = sampler.proposal_model() if hasattr(sampler, "proposal_model") else None
    if cfg.importance_correction == "auto" and proposal is not None:  # the bf16 copy sampled: its own log-probs
        ro.sampler_logps = all_rows(response_logps(proposal, *args))
    if need_old:  # else the single update's own log-probs, detached, are the rollout policy's (kept for the log)
        ro.old_logps = all_rows(response_logps(policy, *args))
    if cfg.beta > 0:  # the reference: a frozen model, or the LoRA policy with its adapter off
        ro.ref_logps = all_rows(response_logps(reference if reference is not None else policy, *args,
                                               adapter_off=reference is None))


def grpo_advantages(ro: GroupRollout, cfg: GRPOConfig, run: Run) -> None:
    """Step 4: the reward the baseline sees, the advantages, and the rows the update learns from."""
    counts: Counter = Counter()
    scores = ro.raw_scores.clone()
    if cfg.overlong == "penalty":  # discourage answers the length limit cut
        scores = penalize_unfinished(scores, ro.finished, cfg.overlong_penalty)
    kl_in_reward = cfg.beta > 0 and resolved_kl_in(cfg) == "reward"
    kl = (torch.where(ro.mask.bool(), kl_penalty(ro.old_logps, ro.ref_logps, "k1"), 0.0) if kl_in_reward
          else torch.zeros_like(ro.mask))
    if cfg.advantage == "reinforce_pp":  # per-token returns of the KL-shaped reward, whitened over the batch
        ro.advantages = reinforce_pp_advantages(scores, kl, ro.mask, cfg.beta if kl_in_reward else 0.0)
        dropped = torch.zeros(len(scores) // cfg.group_size, dtype=torch.bool)
    else:
        if kl_in_reward:  # the sequence's KL (k1 summed over its tokens) comes off its reward, as RLOO's paper does
            scores = scores - cfg.beta * kl.sum(-1)
        ro.advantages = group_advantages(scores, cfg.group_size, cfg.advantage)
        # all-equal groups have zero advantage everywhere: no signal, only cost (DAPO's dynamic sampling)
        dropped = (equal_reward_groups(scores, cfg.group_size) if cfg.dynamic_sampling
                   else torch.zeros(len(scores) // cfg.group_size, dtype=torch.bool))
    ro.scores = scores
    rows = []
    for g, group in enumerate(prompt_groups_of(len(scores), cfg.group_size)):
        if bool(dropped[g]):
            continue
        for i in group:
            if not ro.response_ids[i]:
                counts["empty_responses"] += 1
            elif cfg.overlong == "filter" and not bool(ro.finished[i]):
                counts["filtered_overlong"] += 1  # cut by the length limit: its reward judged a fragment
            else:
                rows.append(i)
    counts["dropped_groups"] = int(dropped.sum())
    ro.train_rows, ro.counts = rows, counts


def prompt_groups_of(n: int, k: int) -> list[list[int]]:
    return [list(range(j, j + k)) for j in range(0, n, k)]


def grpo_update(model: torch.nn.Module, optimizer: Any, scheduler: Any, ro: GroupRollout, pad: int,
                cfg: GRPOConfig, run: Run, iteration: int, layout: dict[str, Any] | None
                ) -> tuple[Counter, list[float]]:
    """Step 5: ``update_epochs`` passes over the kept rows in ``num_mini_batches`` optimizer steps (a group's
    rows kept together), micro-batches of ``batch_size`` accumulated. Returns the statistics and gradient norms."""
    sums: Counter = Counter()
    norms: list[float] = []
    rng = np.random.default_rng([cfg.seed, iteration, 1])
    groups = prompt_groups([ro.prompt_ids[i] for i in ro.train_rows])
    groups = [[ro.train_rows[i] for i in g] for g in groups]
    aggregation = resolved_aggregation(cfg)
    for _epoch in range(cfg.update_epochs):
        for chosen in np.array_split(rng.permutation(len(groups)), min(cfg.num_mini_batches, len(groups))):
            rows = [i for g in chosen for i in groups[g]]
            # each micro-batch's share of the minibatch loss: its tokens (token mean) or its responses
            total = run.all_reduce_sum(float(ro.mask[rows].sum()) if aggregation == "token_mean" else len(rows))
            micro = [rows[j : j + cfg.batch_size] for j in range(0, len(rows), cfg.batch_size)]
            ok = True
            for j, part in enumerate(micro):
                ok = grpo_micro_batch(model, ro, part, total, pad, cfg, run, sums, iteration,
                                      last=j == len(micro) - 1, layout=layout) and ok
            norm = run.optimizer_step(model, optimizer, scheduler, iteration, finite_loss=ok)
            if norm is not None:
                norms.append(norm)
    return sums, norms


def grpo_micro_batch(model: torch.nn.Module, ro: GroupRollout, rows: list[int], total: float, pad: int,
                     cfg: GRPOConfig, run: Run, sums: Counter, iteration: int, *, last: bool,
                     layout: dict[str, Any] | None) -> bool:
    """Forward and backward one micro-batch; adds its token-weighted statistics to ``sums``. Returns False when
    its loss was not finite (and ``on_nan=skip``)."""
    batch = collate_rollout([ro.prompt_ids[i] for i in rows], [ro.response_ids[i] for i in rows], pad,
                            layout).to(run.device)
    k, mask = batch.keep, batch.loss_mask
    aggregation = resolved_aggregation(cfg)

    def old(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[rows, :k]

    with run.accumulate(model, last=last):
        with run.accelerator.autocast():
            logits = model(**batch.inputs, keep=k, predictors=batch.predictors)
        logps = token_logps(logits, batch, cfg.temperature)
        if ro.old_logps is None:  # one update per rollout: the policy has not moved since it sampled
            ro.update_logps = ro.update_logps if ro.update_logps is not None else torch.zeros_like(ro.mask)
            ro.update_logps[rows, :k] = logps.detach()
        old_logps = old(ro.old_logps) if ro.old_logps is not None else logps.detach()
        weights = (truncated_importance_weights(old_logps, old(ro.sampler_logps), mask, cfg.importance_cap)
                   if ro.sampler_logps is not None else None)
        advantages = ro.advantages[rows] if ro.advantages.ndim == 1 else ro.advantages[rows, :k]
        kl_in_loss = cfg.beta > 0 and resolved_kl_in(cfg) == "loss"
        out = grpo_policy_loss(logps, old_logps, advantages, mask, cfg.clip_low, cfg.clip_high, aggregation,
                               cfg.max_new_tokens, old(ro.ref_logps), cfg.beta if kl_in_loss else 0.0, weights)
        share = float(mask.sum()) if aggregation == "token_mean" else len(rows)
        # the micro-batch's share of the minibatch's loss; x world because DDP averages gradients over processes
        loss = out.loss * share / total * run.world_size
        ok = run.check_finite(loss, iteration)
        run.accelerator.backward(loss)
    tokens = float(mask.sum())
    sums["tokens"] += tokens
    for name, value in (("loss", out.loss), ("clip_fraction", out.clip_fraction),
                        ("clip_low_fraction", out.clip_low_fraction), ("clip_high_fraction", out.clip_high_fraction),
                        ("kl_loss", out.kl)):
        sums[name] += float(value.detach()) * tokens
    return ok


def grpo_metrics(ro: GroupRollout, sums: Counter, norms: list[float], cfg: GRPOConfig, run: Run) -> dict[str, Any]:
    """Step 6: the iteration's statistics (every process's share), the counts of what was left out included."""
    n = run.all_reduce_sum(len(ro.response_ids))
    updated = max(sums["tokens"], 1.0)
    score_mean = run.all_reduce_sum(float(ro.raw_scores.sum())) / n
    score_var = run.all_reduce_sum(float(((ro.raw_scores.double() - score_mean) ** 2).sum())) / n
    metrics = {
        "score": score_mean,
        "score_std": math.sqrt(score_var),
        "reward": run.all_reduce_sum(float(ro.scores.sum())) / n,
        "loss": sums["loss"] / updated,
        "clip_fraction": sums["clip_fraction"] / updated,
        "clip_low_fraction": sums["clip_low_fraction"] / updated,
        "clip_high_fraction": sums["clip_high_fraction"] / updated,
        "response_length": run.all_reduce_sum(float(ro.mask.sum())) / n,
        "unfinished": run.all_reduce_sum(float((~ro.finished).sum())) / n,
        "trained_responses": int(run.all_reduce_sum(len(ro.train_rows))),
        "dropped_groups": int(run.all_reduce_sum(ro.counts["dropped_groups"])),
        "filtered_overlong": int(run.all_reduce_sum(ro.counts["filtered_overlong"])),
        "empty_responses": int(run.all_reduce_sum(ro.counts["empty_responses"])),
        "grad_norm": sum(norms) / len(norms) if norms else None,
    }
    if ro.ref_logps is not None and ro.old_logps is not None:
        metrics["kl"] = run.all_reduce_sum(float(torch.where(ro.mask.bool(), kl_penalty(
            ro.old_logps, ro.ref_logps, "k1"), 0.0).sum())) / n  # nats per response
    if cfg.beta > 0 and resolved_kl_in(cfg) == "loss":
        metrics["kl_loss"] = sums["kl_loss"] / updated
    trainer_logps = ro.old_logps if ro.old_logps is not None else ro.update_logps
    if ro.sampler_logps is not None and trainer_logps is not None:
        measured = ro.mask.bool()
        if ro.old_logps is None:  # the update's log-probs cover the trained rows only
            trained = torch.zeros(len(ro.response_ids), dtype=torch.bool, device=measured.device)
            trained[ro.train_rows] = True
            measured = measured & trained[:, None]
        gap = (trainer_logps - ro.sampler_logps)[measured]
        ratio = gap.exp()
        metrics.update({"mismatch/logp_gap_mean": float(gap.abs().mean()),
                        "mismatch/logp_gap_max": float(gap.abs().max()),
                        "mismatch/ratio_mean": float(ratio.mean()), "mismatch/ratio_max": float(ratio.max()),
                        "mismatch/truncated_fraction": float((ratio > cfg.importance_cap).float().mean())})
    return metrics


@torch.no_grad()
def evaluate_grpo(model: torch.nn.Module, reference: torch.nn.Module | None, scorer: Scorer, gold: Any,
                  tokenizer: Any, prompts: PromptSets, cfg: GRPOConfig, run: Run
                  ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Mean reward (and the task's gold, e.g. accuracy, when the reward is a task's) on the held-out prompts, one
    answer each, with 95% intervals; the KL to the reference when one is held."""
    mine = list(range(run.rank, len(prompts.eval), run.world_size))
    policy = run.accelerator.unwrap_model(model).policy
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0 if cfg.eval_greedy else
                              cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                              batch_size=cfg.generation_batch_size or len(mine) or 1, seed=cfg.seed + 7919,
                              stop_strings=unescape(cfg.stop_strings), precision=resolve_precision(cfg.precision))
    samples = generate_from_ids(policy, tokenizer, [prompts.eval_ids[i] for i in mine], sampling)
    texts = [s.text for s in samples]
    asked = [prompts.eval[i] for i in mine]
    metrics: dict[str, float] = {}
    for name, values in (("score", score_responses(scorer, asked, texts).tolist()),
                         ("gold", gold(asked, texts) if gold is not None else None)):
        if values is None:
            continue
        n = run.all_reduce_sum(len(values))
        mean = run.all_reduce_sum(sum(values)) / n
        var = run.all_reduce_sum(sum((v - mean) ** 2 for v in values)) / max(n - 1, 1)
        metrics[f"eval/{name}"] = mean
        metrics[f"eval/{name}_ci95"] = 1.96 * math.sqrt(var / n)
    keep = [j for j, s in enumerate(samples) if s.response_ids]
    if cfg.beta > 0 and keep:
        p_ids, r_ids = [samples[j].prompt_ids for j in keep], [samples[j].response_ids for j in keep]
        args = (p_ids, r_ids, tokenizer.pad_token_id, cfg.batch_size, cfg.temperature, run)
        logps = response_logps(policy, *args)
        ref = response_logps(reference if reference is not None else policy, *args, adapter_off=reference is None)
        mask = response_mask(r_ids, logps.device)
        metrics["eval/kl"] = run.all_reduce_sum(float(torch.where(mask.bool(), kl_penalty(logps, ref, "k1"),
                                                                  0.0).sum())) / run.all_reduce_sum(len(mine))
    metrics["eval/response_length"] = run.all_reduce_sum(sum(len(s.response_ids) for s in samples)) / max(
        run.all_reduce_sum(len(mine)), 1)
    shown = [{"split": "eval", "prompt": asked[j], "response": texts[j], "finished": samples[j].finished}
             for j in range(min(cfg.log_samples, len(samples)))]
    return metrics, shown


def build_rollout(prompts: PromptSets, mine: list[int], samples: list[Sample], scores: torch.Tensor,
                  device: Any) -> GroupRollout:
    """The rollout's rows (every sample, empty ones included: the group baselines need every reward)."""
    response_ids = [s.response_ids or [] for s in samples]
    width_ids = [r if r else [0] for r in response_ids]  # a zero-width row has a mask of zeros
    mask = response_mask(width_ids, device) * torch.tensor([bool(r) for r in response_ids], device=device)[:, None]
    return GroupRollout([prompts.train[i] for i in mine], [s.prompt_ids for s in samples], response_ids,
                        [s.text for s in samples], torch.tensor([s.finished for s in samples], device=device), mask,
                        scores.to(device))


def score_or_stop(scorer: Scorer, prompts: PromptSets, mine: list[int], samples: list[Sample], iteration: int,
                  run: Run) -> torch.Tensor:
    """Step 2, checked: a reward that raises, returns the wrong count, NaN or inf stops the run with a message
    naming it and the last good checkpoint (which stays on disk)."""
    try:
        return score_rollout(scorer, prompts, mine, samples, iteration, run)[0]
    except AlignlabError as e:
        last = latest_checkpoint(run.out / "checkpoints")
        raise AlignlabError(f"iteration {iteration + 1}: {e.message}; the run stops, "
                            + (f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"),
                            field="reward") from e


# --------------------------------------------------------------------------------------------- the trainer


def train_grpo(cfg: GRPOConfig, *, reward: Scorer | Callable[..., Any] | Sequence[Any] | None = None) -> Any:
    """Run GRPO (or RLOO, Dr. GRPO, REINFORCE++) as configured; returns the run folder. ``reward`` (a Scorer or
    a Python function ``f(prompts, responses)``) replaces ``--reward``/``--reward-model`` when given from code."""
    if reward is not None and not (cfg.reward or cfg.reward_model):
        cfg.reward = getattr(reward, "__qualname__", "python function")
    check_grpo_config(cfg)
    run = Run(cfg, "grpo")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    pad = tokenizer.pad_token_id
    scorer, gold = reward_scorer(cfg, reward, run.device)
    policy = prepare_policy(cfg, tokenizer)
    disable_dropout(policy)
    reference = load_reference(cfg, tokenizer, run) if cfg.beta > 0 else None  # beta = 0: none in memory
    prompts = load_prompt_sets(cfg, tokenizer, policy, run)
    k = cfg.group_size
    batches = prompt_batches(len(prompts.train), cfg.prompts_per_iteration * run.world_size, cfg.iterations, cfg.seed)
    layout = shared_prompt_layout(policy) if k > 1 and not run.shards_weights else None  # a group: one prompt copy
    model = PolicyOnly(policy)
    trainable, total = count_parameters(model)
    run.print(f"policy {cfg.model}: {trainable:,} trainable of {total:,} parameters; no value model; reward "
              f"{scorer.name}; {len(prompts.train)} train / {len(prompts.eval)} eval prompts; {cfg.advantage} with "
              f"groups of {k}, {cfg.prompts_per_iteration * run.world_size} prompts x {cfg.iterations} iterations")
    steps_per_iteration = cfg.update_epochs * cfg.num_mini_batches
    model, optimizer, scheduler, start, _ = run.prepare_training(model, cfg.iterations * steps_per_iteration)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, batch_size=cfg.generation_batch_size or cfg.prompts_per_iteration * k,
                              stop_strings=unescape(cfg.stop_strings), precision=resolve_precision(cfg.precision))
    sampler = make_sampler(cfg.backend, run.accelerator.unwrap_model(model).policy, tokenizer,
                           checkpoint=resolve_model(cfg.model) if cfg.backend == "vllm" else None)

    def evaluate(step: int) -> dict[str, float]:
        t = time.perf_counter()
        metrics, shown = evaluate_grpo(model, reference, scorer, gold, tokenizer, prompts, cfg, run)
        for record in shown:
            run.log(step, record, file="samples.jsonl")
        return {**metrics, "time/eval": time.perf_counter() - t}

    if start == 0 and prompts.eval:
        baseline = evaluate(0)
        run.log(0, baseline)
        run.print("iteration 0: held-out " + ", ".join(f"{key[5:]} {value:.4f}" for key, value in baseline.items()
                                                          if key in ("eval/score", "eval/gold")))

    # -- the loop: rollout -> score -> forward -> advantages -> update -> log ---------------------------------
    bar = run.progress(cfg.iterations, start)
    for iteration in range(start, cfg.iterations):
        t0 = time.perf_counter()
        mine = [i for i in batches[iteration][run.rank :: run.world_size] for _ in range(k)]
        samples = sample_rollout(sampler, model, prompts, mine, sampling, cfg, iteration, run)          # 1. rollout
        t1 = time.perf_counter()
        ro = build_rollout(prompts, mine, samples, score_or_stop(scorer, prompts, mine, samples, iteration, run),
                           run.device)                                                                   # 2. score
        t2 = time.perf_counter()
        rollout_logps(model, reference, sampler, ro, pad, cfg, run, layout,                           # 3. forward
                      need_old=steps_per_iteration > 1 or (cfg.beta > 0 and resolved_kl_in(cfg) == "reward"))
        grpo_advantages(ro, cfg, run)                                                              # 4. advantages
        t3 = time.perf_counter()
        sums, norms = (grpo_update(model, optimizer, scheduler, ro, pad, cfg, run, iteration, layout)  # 5. update
                       if ro.train_rows else (Counter(), []))
        t4 = time.perf_counter()
        metrics = grpo_metrics(ro, sums, norms, cfg, run)                                                # 6. log
        generated = run.all_reduce_sum(float(ro.mask.sum()))
        metrics.update({"lr": scheduler.get_last_lr()[0], "time/generation": t1 - t0, "time/scoring": t2 - t1,
                        "time/forward": t3 - t2, "time/update": t4 - t3, "time/iteration": t4 - t0,
                        "generated_tokens_per_second": generated / max(t4 - t0, 1e-9)})
        if not ro.train_rows:
            run.print(f"iteration {iteration + 1}: every group was dropped or filtered: no update")
        if run.should_eval(iteration, cfg.iterations) and prompts.eval:
            metrics.update(evaluate(iteration + 1))
        if (iteration + 1) % cfg.log_every == 0 or "eval/score" in metrics:
            run.log(iteration + 1, metrics)
            for j in range(min(cfg.log_samples, len(ro.texts))):
                run.log(iteration + 1, {"split": "train", "prompt": ro.prompts[j], "response": ro.texts[j],
                                        "score": float(ro.raw_scores[j]), "finished": bool(ro.finished[j])},
                        file="samples.jsonl")
        bar.set_postfix(score=f"{metrics['score']:.3f}", dropped=metrics["dropped_groups"], refresh=False)
        bar.update(1)
        run.checkpoint_or_stop(iteration, cfg.iterations, model, optimizer, scheduler)

    sampler.close()
    return run.finish(run.accelerator.unwrap_model(model).policy, tokenizer)
