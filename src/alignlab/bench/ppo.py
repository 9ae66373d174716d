"""``bench ppo``: our ``train_ppo`` (policy, reference, critic, a reward function) against ``trl.RLOOTrainer``
(TRL's online-RL trainer nearest to PPO; TRL ships no PPO trainer any more) with the same reward function,
prompts, responses per iteration and generation length. A timed unit is one iteration, its tokens the generated
ones."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from alignlab.bench.measure import clock_seconds, meta_params, stamped_run, step_clock, trainer_params
from alignlab.bench.registry import BenchSpec
from alignlab.bench.runners import ours_config, ours_settings, raw_result, trl_args, trl_settings
from alignlab.errors import AlignlabError


def _ours_ppo_config(spec: BenchSpec) -> Any:
    """Our PPOConfig: ``batch_size`` responses per iteration in one micro-batch and one minibatch, prompts up to
    ``max_length`` tokens (longer ones dropped), no held-out prompts; ``matched``: also ``ppo_epochs``, sampling
    at temperature 1 with no top-p/top-k, and KL coefficient 0.05 (RLOO's default beta)."""
    from alignlab.config import PPOConfig

    values: dict[str, Any] = dict(
        prompts=spec.data, iterations=spec.total_steps, reward=spec.option("reward"),
        max_new_tokens=spec.option("max_new_tokens"), max_prompt_length=spec.max_length, long_prompts="drop",
        eval_fraction=0.0, num_mini_batches=1, share_backbone=spec.option("share_backbone"),
    )
    if spec.settings == "matched":
        values.update(ppo_epochs=spec.option("ppo_epochs"), temperature=1.0, top_p=1.0, top_k=0, kl_coef=0.05)
    return ours_config(PPOConfig, spec, **values)


def ppo_prompts(cfg: Any, tokenizer: Any) -> tuple[list[Any], list[list[int]], list[list[int]]]:
    """``(prompts, their token ids, prompt indices of every iteration)`` as ``train_ppo`` builds them."""
    from transformers import AutoConfig

    from alignlab.models import resolve_model
    from alignlab.tasks.loading import load_prompts
    from alignlab.train.rollout import encode_prompts, prompt_batches

    context = getattr(AutoConfig.from_pretrained(resolve_model(cfg.model)), "max_position_embeddings", None)
    prompts, ids = encode_prompts(load_prompts(cfg.prompts, limit=cfg.limit or None), tokenizer, cfg, context,
                                  cfg.prompts, _Quiet())
    rollout = cfg.batch_size * cfg.grad_accum * cfg.num_mini_batches
    return prompts, ids, prompt_batches(len(prompts), rollout, cfg.iterations, cfg.seed)


def ours_ppo(spec: BenchSpec) -> dict[str, Any]:
    """Our PPO trainer (``train_ppo``: policy, reference, critic, the reward function), unmodified, timed per
    iteration by :func:`stamped_run`; tokens are the generated response tokens, the time split is the trainer's
    own (generation, scoring, no-grad forwards, update)."""
    from alignlab.models import resolve_precision
    from alignlab.train.ppo import train_ppo

    cfg = _ours_ppo_config(spec)
    seconds, cpu_seconds, records = stamped_run(lambda: train_ppo(cfg), "time/iteration", spec.total_steps)
    responses = [cfg.batch_size - int(r["empty_responses"]) for r in records]
    policy = meta_params(spec.model)
    critic = (0, 0, 0) if cfg.share_backbone else meta_params(spec.model, "score")
    critic_words = ("a value head on the policy's backbone" if cfg.share_backbone else
                    "a separate value model (critic)")
    return raw_result(
        seconds, cpu_seconds, [round(r["response_length"] * n) for r, n in zip(records, responses)], [],
        params=tuple(a + b for a, b in zip(policy, critic)),  # type: ignore[arg-type]
        precision=resolve_precision(cfg.precision), flops_per_token_factor=0,
        settings=ours_settings(cfg, ppo_epochs=cfg.ppo_epochs, prompts_per_iteration=cfg.batch_size,
                               samples_per_prompt=1, kl_coef=cfg.kl_coef, max_new_tokens=cfg.max_new_tokens,
                               critic=critic_words),
        notes={"unmatched": [f"ours also runs and trains {critic_words} for its GAE advantages (RLOO has no "
                             "critic: its baseline is the mean score of the prompt's other completions)"]},
        step_counts={"responses": responses},
        step_times={name: [r[f"time/{name}"] for r in records] for name in ("generation", "scoring", "forward",
                                                                            "update")},
        step_values={"score": [r["score"] for r in records], "kl": [r["kl"] for r in records]},
    )


class _Quiet:
    """Stands in for a ``Run`` where a data helper only prints."""

    def print(self, *args: Any) -> None:
        pass


def trl_reward(spec: str, log: list[float]) -> Callable[..., list[float]]:
    """Our reward function ``spec`` (``module:function(prompts, responses)``) in TRL's reward-function form
    ``f(prompts, completions, **kw)``; the mean score of every call is appended to ``log``."""
    from alignlab.scoring import load_scorer

    scorer = load_scorer(spec)

    def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = [float(s) for s in scorer.score(list(prompts), texts)]
        log.append(sum(scores) / max(1, len(scores)))
        return scores

    reward.__name__ = reward.__qualname__ = spec.rsplit(":", 1)[-1]
    return reward


def trl_prompt(prompt: Any, tokenizer: Any, cfg: Any) -> Any:
    """A prompt as TRL's online trainers take it, rendered as ours renders it: chat messages, or plain text."""
    from alignlab.data.tokenize import _as_messages
    from alignlab.train.rollout import resolve_prompt_template

    template = resolve_prompt_template(cfg.template, tokenizer, prompt)
    if template == "chat":
        return _as_messages(prompt)
    if template == "none" and isinstance(prompt, str):
        return prompt
    raise AlignlabError(f"bench ppo gives TRL chat or plain-text prompts only (this one renders as {template})")


def timed_rollouts(trainer_cls: type, extra: Callable[[Any, float, list[Any]], dict[str, float]] | None = None
                   ) -> type:
    """A subclass of a TRL online trainer (``RLOOTrainer``, ``GRPOTrainer``) that records every rollout in
    ``bench_rollouts``: its seconds, generated tokens, completions, the generation/scoring split, and
    ``extra(trainer, tokens, inputs)``. TRL's own code runs unchanged; only its three rollout methods are timed."""

    class Timed(trainer_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.bench_rollouts: list[dict[str, float]] = []
            self.bench_split = {"generation": 0.0, "scoring": 0.0}

        def _generate(self, prompts: list[Any]) -> Any:
            t = time.perf_counter()
            out = super()._generate(prompts)
            self.bench_split["generation"] += time.perf_counter() - t
            return out

        def _calculate_rewards(self, *args: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            out = super()._calculate_rewards(*args, **kw)
            self.bench_split["scoring"] += time.perf_counter() - t
            return out

        def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
            self.bench_split = {"generation": 0.0, "scoring": 0.0}
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            tokens = float(out["completion_mask"].sum())
            self.bench_rollouts.append({"seconds": time.perf_counter() - t, "tokens": tokens,
                                        "completions": len(inputs), **(extra(self, tokens, inputs) if extra else {}),
                                        **self.bench_split})
            return out

    Timed.__name__ = f"Measured{trainer_cls.__name__}"
    return Timed


def trl_ppo(spec: BenchSpec) -> dict[str, Any]:
    """``trl.RLOOTrainer`` (REINFORCE leave-one-out: TRL's online-RL trainer nearest to PPO) with the same reward
    function, prompts, responses per iteration (``batch_size``) and generation length.

    One iteration = one generation batch of ``batch_size`` completions (``num_generations`` per prompt) and
    its ``num_iterations`` optimizer steps (one per pass, as ours with one minibatch). ``matched``: the
    prompts of each iteration are the first ``batch_size / num_generations`` of ours, in order (no shuffling).
    Timing: :func:`step_clock` summed per iteration; tokens: the generated completion tokens
    (``completion_mask``); the time split from wrappers around ``_generate`` (tokenization and generation),
    ``_calculate_rewards`` (scoring) and ``_generate_and_score_completions`` (the rest of it: old and reference
    log-probs); the update is the iteration's remaining time."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from alignlab.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(spec.model)
    cfg = _ours_ppo_config(spec)
    prompts, ids, batches = ppo_prompts(cfg, tokenizer)
    k, size = spec.option("num_generations"), spec.batch_size
    if k < 2 or size % k:
        raise AlignlabError(f"RLOO samples num_generations={k} (>= 2) completions per prompt: --batch-size {size} "
                            "must be a multiple of it", field="num_generations")
    matched = spec.settings == "matched"
    epochs = spec.option("ppo_epochs") if matched else 1
    chosen = [i for batch in batches for i in batch[: size // k]] if matched else list(range(len(prompts)))
    rows = [{"prompt": trl_prompt(prompts[i], tokenizer, cfg)} for i in chosen]
    scores: list[float] = []

    def kl_per_completion(trainer: Any, tokens: float, inputs: list[Any]) -> dict[str, float]:
        kl = trainer._metrics["train"]["kl"][-1] * tokens / len(inputs) if trainer.beta else 0.0
        return {"kl": kl}

    MeasuredRLOOTrainer = timed_rollouts(RLOOTrainer, kl_per_completion)

    args = RLOOConfig(**trl_args(
        spec, matched=dict(num_iterations=epochs, temperature=1.0, top_p=1.0, top_k=0, beta=0.05,
                           shuffle_dataset=False, disable_dropout=True),
        max_steps=spec.total_steps * epochs, num_generations=k, max_completion_length=cfg.max_new_tokens))
    clock = step_clock()
    trainer = MeasuredRLOOTrainer(model=resolve_model(spec.model), reward_funcs=trl_reward(cfg.reward, scores),
                                  args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                  callbacks=[clock])
    their_ids = trainer._tokenize_prompts([row["prompt"] for row in rows])[0]
    same = sum(list(a) == list(ids[i]) for a, i in zip(their_ids, chosen))
    trainer.train()
    seconds, cpu_seconds = clock_seconds(clock, spec.total_steps, per=args.num_iterations)
    rollouts = trainer.bench_rollouts
    if len(rollouts) != spec.total_steps:
        raise AlignlabError(f"RLOO generated {len(rollouts)} times, expected {spec.total_steps}")
    unmatched = [f"RLOO samples {k} completions for each of {size // k} prompts per iteration; ours one for each of "
                 f"{size} prompts" + (" (RLOO's prompts are the first of ours)" if matched else ""),
                 "RLOO's KL penalty is one number per completion (summed log-ratio, on the reward); ours is per "
                 "token, before GAE"]
    if not matched:
        unmatched.append(f"passes per rollout: ours ppo_epochs={cfg.ppo_epochs}, RLOO num_iterations="
                         f"{args.num_iterations} (each library's default)")
    return raw_result(
        seconds, cpu_seconds, [round(r["tokens"]) for r in rollouts], [], params=trainer_params(trainer.model),
        precision="bf16" if args.bf16 else "fp32", flops_per_token_factor=0,
        settings=trl_settings(args, shuffle_dataset=args.shuffle_dataset, num_iterations=args.num_iterations,
                              num_generations=k, prompts_per_iteration=size // k, beta=args.beta,
                              max_new_tokens=args.max_completion_length),
        notes={"prompt_ids_identical_to_ours": same, "prompts_compared": len(rows), "unmatched": unmatched},
        step_counts={"responses": [r["completions"] for r in rollouts]},
        step_times={"generation": [r["generation"] for r in rollouts], "scoring": [r["scoring"] for r in rollouts],
                    "forward": [r["seconds"] - r["generation"] - r["scoring"] for r in rollouts],
                    "update": [s - r["seconds"] for s, r in zip(seconds, rollouts)]},
        step_values={"score": scores[: len(rollouts)], "kl": [r["kl"] for r in rollouts]},
    )
