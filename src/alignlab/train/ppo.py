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

One iteration, top to bottom (:func:`train_ppo`, each step a named function):

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

Response layout (:mod:`alignlab.train.rollout`): the LM head only ever runs on response positions; with
``responses_per_prompt > 1`` a prompt's responses follow one copy of it, each attending to the prompt and itself
(exactly the same numbers, fewer tokens in every forward and backward).

Log-probs are of the sampling distribution at ``temperature`` (logits divided by it), as TRL does; top-p/top-k
truncation is not reflected in them (also as TRL).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from alignlab.config import PPOConfig
from alignlab.errors import AlignlabError
from alignlab.generation import SamplingConfig, check_backend, generate_from_ids, make_sampler
from alignlab.losses.common import masked_mean
from alignlab.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    kl_penalty,
    ppo_policy_loss,
    ppo_value_loss,
)
from alignlab.models import (
    add_lora,
    count_parameters,
    disable_dropout,
    is_peft,
    load_model,
    load_tokenizer,
    resolve_model,
    resolve_precision,
)
from alignlab.scoring import Scorer
from alignlab.train.forward import SegmentPlan, shared_prompt_layout
from alignlab.train.loop import Run
from alignlab.train.policy import prepare_policy
from alignlab.train.rollout import (
    PromptSets,
    Rollout,
    RunningMoments,
    _unpeft,
    as_scorer,
    collate_rollout,
    encode_prompts,
    global_explained_variance,
    global_masked_mean,
    load_prompt_sets,
    load_reference,
    pad_columns,
    penalize_unfinished,
    prompt_batches,
    prompt_groups,
    response_hidden,
    response_logits,
    response_mask,
    sample_rollout,
    score_responses,
    score_rollout,
    scores_on_last_token,
    shaped_rewards,
    token_logps,
    unescape,
    whiten,
)

__all__ = [
    "PPOConfig",
    "PromptSets",
    "encode_prompts",
    "load_prompt_sets",
    "load_reference",
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
    out = [torch.cat([pad_columns(x, width) for x in pieces[k]]) for k in ("logps", "entropy", "values", "ref")]
    return out[0], out[1], out[2], out[3]


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


# --------------------------------------------------------------------------------------------- setup


def policy_and_value(cfg: PPOConfig, policy: torch.nn.Module, tokenizer: Any, scorer: Scorer,
                     run: Run) -> PolicyAndValue:
    """The two trainable roles in one module: a value head on the policy (``share_backbone``) or a critic."""
    if cfg.share_backbone:
        value_head = torch.nn.Linear(_unpeft(policy).config.hidden_size, 1, bias=False)
        torch.nn.init.zeros_(value_head.weight)  # values start at 0
        run.print("value model: a value head on the policy's backbone (shared)")
        return PolicyAndValue(policy, value_head=value_head)
    run.print(f"value model: {cfg.value_model or ('the reward model' if cfg.reward_model else cfg.model)}")
    return PolicyAndValue(policy, critic=load_critic(cfg, tokenizer, scorer))


def rollout_size(cfg: PPOConfig) -> int:
    """Responses per rollout on each process: ``batch_size x grad_accum x num_mini_batches``, a multiple of
    ``responses_per_prompt``."""
    size = cfg.batch_size * cfg.grad_accum * cfg.num_mini_batches
    if size % cfg.responses_per_prompt:
        raise AlignlabError(f"the rollout ({size} responses per process = batch_size x grad_accum x "
                            f"num_mini_batches) is not a multiple of responses_per_prompt={cfg.responses_per_prompt}",
                            field="responses_per_prompt")
    return size


def kl_controller_for(cfg: PPOConfig) -> Any:
    """Adaptive (``target_kl > 0``, Ziegler et al. 2019) or fixed KL coefficient."""
    if cfg.target_kl > 0:
        return AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


# --------------------------------------------------------------------------------------------- the steps


def shape_scores(raw_scores: torch.Tensor, all_scores: torch.Tensor, finished: torch.Tensor, scorer: Scorer,
                 running: RunningMoments, cfg: PPOConfig, run: Run) -> torch.Tensor:
    """Step 4a: the scores the advantages see: normalised, clipped and penalised as configured."""
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
    return scores


def ppo_advantages(ro: Rollout, kl_coef: float, cfg: PPOConfig, run: Run) -> None:
    """Step 4b: per-token rewards (the score on the last token, ``- beta * KL`` on every token), GAE, whitened
    advantages; stored on ``ro``."""
    rewards, kl = shaped_rewards(ro.scores, ro.logps, ro.ref_logps, ro.mask, kl_coef, cfg.kl_estimator)
    if cfg.whiten_rewards:  # rescale (no shift: the sign of a reward means something)
        rewards = whiten(rewards, ro.mask, run, shift_mean=False)
    advantages, returns = compute_gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:  # per-batch scale-free advantages; statistics over the global rollout's tokens
        advantages = whiten(advantages, ro.mask, run)
    ro.kl, ro.rewards, ro.advantages, ro.returns = kl, rewards, advantages, returns


def ppo_update(model: torch.nn.Module, optimizer: Any, scheduler: Any, ro: Rollout, pad: int, cfg: PPOConfig,
               run: Run, iteration: int, layout: dict[str, Any] | None) -> tuple[Counter, list[float]]:
    """Step 5: ``ppo_epochs`` passes over shuffled minibatches (``num_mini_batches`` optimizer steps each, a
    prompt's responses kept together), micro-batches accumulated. Returns the token-weighted loss statistics
    and the gradient norms."""
    sums: Counter = Counter()
    grad_norms = []
    update_rng = np.random.default_rng([cfg.seed, iteration, 1])
    groups = prompt_groups(ro.prompt_ids)  # one row each unless responses_per_prompt > 1: kept together
    for _epoch in range(cfg.ppo_epochs):
        for chosen in np.array_split(update_rng.permutation(len(groups)), cfg.num_mini_batches):
            minibatch = np.array([i for g in chosen for i in groups[g]], dtype=int)
            # the loss is a mean over the minibatch's response tokens (on every process), however it is cut
            minibatch_tokens = run.all_reduce_sum(float(ro.mask[minibatch].sum()))
            micro = [m for m in np.array_split(minibatch, cfg.grad_accum) if len(m)]
            ok = True
            for j, rows in enumerate(micro):
                ok = update_micro_batch(model, ro, rows.tolist(), minibatch_tokens, pad, cfg, run, sums, iteration,
                                        last=j == len(micro) - 1, layout=layout) and ok
            norm = run.optimizer_step(model, optimizer, scheduler, iteration, finite_loss=ok)
            if norm is not None:
                grad_norms.append(norm)
    return sums, grad_norms


def rollout_metrics(ro: Rollout, sums: Counter, grad_norms: list[float], kl_coef: float, mean_kl: float,
                    empty: int, run: Run) -> dict[str, Any]:
    """Step 6: the iteration's statistics over every process's share of the rollout."""
    n = run.all_reduce_sum(len(ro.response_ids))
    tokens = run.all_reduce_sum(float(ro.mask.sum()))
    sums = Counter({k: run.all_reduce_sum(v) for k, v in sorted(sums.items())})  # every process's updates
    updated = max(sums["tokens"], 1.0)
    score_mean = run.all_reduce_sum(float(ro.raw_scores.sum())) / n
    score_var = run.all_reduce_sum(float(((ro.raw_scores.double() - score_mean) ** 2).sum())) / n
    return {
        "score": score_mean,
        "score_std": math.sqrt(score_var) if n > 1 else 0.0,
        "score_shaped": run.all_reduce_sum(float(ro.scores.sum())) / n,
        "kl": mean_kl,
        "kl_coef": kl_coef,
        "reward": run.all_reduce_sum(float(ro.rewards.sum())) / n,  # score - beta * KL, per response
        "non_score_reward": run.all_reduce_sum(float((-kl_coef * ro.kl).sum())) / n,
        "entropy": run.all_reduce_sum(float(ro.entropy.sum())) / tokens,
        "clip_fraction": sums["clip_fraction"] / updated,
        "approx_kl": sums["approx_kl"] / updated,
        "policy_loss": sums["policy_loss"] / updated,
        "value_loss": sums["value_loss"] / updated,
        "value_clip_fraction": sums["value_clip_fraction"] / updated,
        "explained_variance": global_explained_variance(ro.values, ro.returns, ro.mask, run),
        "advantage_mean": global_masked_mean(ro.advantages, ro.mask, run),
        "return_mean": global_masked_mean(ro.returns, ro.mask, run),
        "value_mean": global_masked_mean(ro.values, ro.mask, run),
        "response_length": tokens / n,
        "unfinished": run.all_reduce_sum(float((~ro.finished).sum())) / n,
        "empty_responses": int(run.all_reduce_sum(empty)),
        "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else None,
    }


def log_rollout_samples(run: Run, step: int, ro: Rollout, n: int) -> None:
    for j in range(min(n, len(ro.texts))):
        run.log(step, {"split": "train", "prompt": ro.prompts[j], "response": ro.texts[j],
                       "score": float(ro.raw_scores[j]), "finished": bool(ro.finished[j]),
                       "kl": float(ro.kl[j].sum())}, file="samples.jsonl")


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

    # -- the four roles, the prompts, the plan ----------------------------------------------------------
    scorer = as_scorer(reward if reward is not None else (cfg.reward_model or cfg.reward), cfg, run.device)
    if cfg.reward_normalization == "stats" and not (scorer.stats and "mean" in scorer.stats):
        raise AlignlabError(f"reward_normalization=stats needs the reward model's reward_stats.json; {scorer.name} "
                            "has none (use running)", field="reward_normalization")
    policy = prepare_policy(cfg, tokenizer)
    disable_dropout(policy)
    reference = load_reference(cfg, tokenizer, run)
    model = policy_and_value(cfg, policy, tokenizer, scorer, run)
    prompts = load_prompt_sets(cfg, tokenizer, policy, run)
    size, k = rollout_size(cfg), cfg.responses_per_prompt
    # prompts per rollout; each is sampled k times, its responses listed together (and encoded after one copy of
    # the prompt: the forward passes cost about (prompt + k responses) instead of k x (prompt + response))
    batches = prompt_batches(len(prompts.train), size * run.world_size // k, cfg.iterations, cfg.seed)
    layout = shared_prompt_layout(policy) if k > 1 and not run.shards_weights else None
    trainable, total = count_parameters(model)
    run.print(f"policy {cfg.model}: {trainable:,} trainable of {total:,} parameters (policy + value); reward "
              f"{scorer.name}; {len(prompts.train)} train / {len(prompts.eval)} eval prompts; rollout "
              f"{size * run.world_size} responses x {cfg.iterations} iterations; {run.world_size} process(es)")
    model, optimizer, scheduler, start, extra = run.prepare_training(
        model, cfg.iterations * cfg.ppo_epochs * cfg.num_mini_batches)
    kl_controller, running = kl_controller_for(cfg), RunningMoments()
    if extra:
        kl_controller.value = float(extra["kl_coef"])
        running.load(extra["running_scores"])
    model.train()
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, batch_size=cfg.generation_batch_size or size,
                              stop_strings=unescape(cfg.stop_strings), precision=resolve_precision(cfg.precision))
    # rollouts: hf generate on the live policy, or a vLLM engine whose weights are re-synced every iteration
    sampler = make_sampler(cfg.backend, run.accelerator.unwrap_model(model).policy, tokenizer,
                           checkpoint=resolve_model(cfg.model) if cfg.backend == "vllm" else None)

    def evaluate(step: int) -> dict[str, float]:
        t = time.perf_counter()
        metrics, shown = evaluate_policy(model, reference, scorer, tokenizer, prompts.eval, prompts.eval_ids, cfg, run)
        for record in shown:
            run.log(step, record, file="samples.jsonl")
        return {**metrics, "time/eval": time.perf_counter() - t}

    if start == 0 and prompts.eval:  # the starting point, to compare every later evaluation with
        baseline = evaluate(0)
        run.log(0, baseline)
        run.print(f"iteration 0: held-out score {baseline['eval/score']:.4f}")

    # -- the loop: rollout -> score -> forward -> advantages -> update -> log ---------------------------------
    bar = run.progress(cfg.iterations, start)
    for iteration in range(start, cfg.iterations):
        clock = Stopwatch()
        mine = [i for i in batches[iteration][run.rank :: run.world_size] for _ in range(k)]
        samples = sample_rollout(sampler, model, prompts, mine, sampling, cfg, iteration, run)          # 1. rollout
        clock.lap("generation")
        all_scores, kept = score_rollout(scorer, prompts, mine, samples, iteration, run)              # 2. score
        clock.lap("scoring")
        prompt_ids = [samples[j].prompt_ids for j in kept]
        response_ids = [samples[j].response_ids for j in kept]
        logps, entropy, values, ref_logps = rollout_forward(model, reference, prompt_ids, response_ids, pad, cfg,
                                                            run, layout)                            # 3. forward
        finished = torch.tensor([samples[j].finished for j in kept], device=run.device)
        ro = Rollout([prompts.train[mine[j]] for j in kept], prompt_ids, response_ids, [samples[j].text for j in kept],
                     finished, response_mask(response_ids, run.device), logps, ref_logps, values, entropy,
                     all_scores[kept].to(run.device))
        clock.lap("forward")
        ro.scores = shape_scores(ro.raw_scores, all_scores, finished, scorer, running, cfg, run)     # 4. advantages
        kl_coef = kl_controller.value
        ppo_advantages(ro, kl_coef, cfg, run)
        mean_kl = run.gather_mean(float(ro.kl.sum(-1).mean()))  # nats per response
        kl_controller.update(mean_kl, len(batches[iteration]))  # the next rollout's beta
        clock.lap("advantages")
        sums, grad_norms = ppo_update(model, optimizer, scheduler, ro, pad, cfg, run, iteration, layout)  # 5. update
        clock.lap("update")
        metrics = rollout_metrics(ro, sums, grad_norms, kl_coef, mean_kl, len(samples) - len(kept), run)   # 6. log
        metrics.update({"lr": scheduler.get_last_lr()[0], **clock.laps(), "time/iteration": clock.total()})
        if run.should_eval(iteration, cfg.iterations) and prompts.eval:
            metrics.update(evaluate(iteration + 1))
        if (iteration + 1) % cfg.log_every == 0 or "eval/score" in metrics:
            run.log(iteration + 1, metrics)
            log_rollout_samples(run, iteration + 1, ro, cfg.log_samples)
        bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{mean_kl:.3f}", beta=f"{kl_coef:.3g}", refresh=False)
        bar.update(1)
        run.checkpoint_or_stop(iteration, cfg.iterations, model, optimizer, scheduler,
                               extra={"kl_coef": float(kl_controller.value), "running_scores": running.state()})

    sampler.close()
    return run.finish(run.accelerator.unwrap_model(model).policy, tokenizer)


class Stopwatch:
    """Seconds per named stage of an iteration (``time/<name>`` in the metrics)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.times: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[f"time/{name}"] = now - self.last
        self.last = now

    def laps(self) -> dict[str, float]:
        return dict(self.times)

    def total(self) -> float:
        return time.perf_counter() - self.start


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
