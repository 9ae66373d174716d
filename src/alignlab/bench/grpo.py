"""``bench grpo``: our ``train_grpo`` against ``trl.GRPOTrainer`` with the same reward function, prompts, group
size, prompts per iteration, generation length and precision, one update per rollout. A timed unit is one
iteration (generate, score, update), its tokens the generated ones."""

from __future__ import annotations

from typing import Any

from alignlab.bench.measure import clock_seconds, meta_params, stamped_run, step_clock, trainer_params
from alignlab.bench.ppo import _Quiet, timed_rollouts, trl_prompt, trl_reward
from alignlab.bench.registry import BenchSpec
from alignlab.bench.runners import ours_config, ours_settings, raw_result, trl_args, trl_settings
from alignlab.errors import AlignlabError


def _group(spec: BenchSpec) -> tuple[int, int]:
    """``(group size, prompts per iteration)``: ``--batch-size`` completions per iteration in groups of
    ``num_generations``."""
    k, size = spec.option("num_generations"), spec.batch_size
    if k < 2 or size % k:
        raise AlignlabError(f"GRPO samples num_generations={k} (>= 2) completions per prompt: --batch-size {size} "
                            "must be a multiple of it", field="num_generations")
    return k, size // k


def _ours_grpo_config(spec: BenchSpec) -> Any:
    """Our GRPOConfig: ``batch_size`` completions per iteration in one micro-batch and one minibatch, one update
    per rollout, no held-out prompts; ``matched``: TRL's loss and advantages (grpo, per-sequence mean, std-scaled
    group advantages, clip 0.2, beta 0), sampling at temperature 1, every group trained (no dynamic sampling,
    which TRL lacks) and no importance correction (TRL applies it only with vLLM)."""
    from alignlab.config import GRPOConfig

    k, prompts_per_iteration = _group(spec)
    values: dict[str, Any] = dict(
        prompts=spec.data, iterations=spec.total_steps, reward=spec.option("reward"), group_size=k,
        prompts_per_iteration=prompts_per_iteration, max_new_tokens=spec.option("max_new_tokens"),
        max_prompt_length=spec.max_length, long_prompts="drop", eval_fraction=0.0, num_mini_batches=1,
        update_epochs=1,
    )
    if spec.settings == "matched":
        values.update(temperature=1.0, top_p=1.0, top_k=0, beta=0.0, advantage="grpo",
                      loss_aggregation="sequence_mean", clip_low=0.2, clip_high=0.2, dynamic_sampling=False,
                      importance_correction="off")
    return ours_config(GRPOConfig, spec, **values)


def grpo_prompts(cfg: Any, tokenizer: Any) -> tuple[list[Any], list[list[int]], list[list[int]]]:
    """``(prompts, their token ids, prompt indices of every iteration)`` as ``train_grpo`` builds them."""
    from transformers import AutoConfig

    from alignlab.models import resolve_model
    from alignlab.tasks.loading import load_prompts
    from alignlab.train.rollout import encode_prompts, prompt_batches

    context = getattr(AutoConfig.from_pretrained(resolve_model(cfg.model)), "max_position_embeddings", None)
    prompts, ids = encode_prompts(load_prompts(cfg.prompts, limit=cfg.limit or None), tokenizer, cfg, context,
                                  cfg.prompts, _Quiet())
    return prompts, ids, prompt_batches(len(prompts), cfg.prompts_per_iteration, cfg.iterations, cfg.seed)


def ours_grpo(spec: BenchSpec) -> dict[str, Any]:
    """Our GRPO trainer (``train_grpo``: the policy and the reward function; no value model, no reference at beta
    0), unmodified, timed per iteration by :func:`stamped_run`; tokens are the generated completion tokens."""
    from alignlab.models import resolve_precision
    from alignlab.train.grpo import resolved_aggregation, train_grpo

    cfg = _ours_grpo_config(spec)
    seconds, cpu_seconds, records = stamped_run(lambda: train_grpo(cfg), "time/iteration", spec.total_steps)
    n = cfg.group_size * cfg.prompts_per_iteration
    return raw_result(
        seconds, cpu_seconds, [round(r["response_length"] * n) for r in records], [r["loss"] for r in records],
        params=meta_params(spec.model), precision=resolve_precision(cfg.precision), flops_per_token_factor=0,
        settings=ours_settings(cfg, update_epochs=cfg.update_epochs, prompts_per_iteration=cfg.prompts_per_iteration,
                               num_generations=cfg.group_size, beta=cfg.beta, max_new_tokens=cfg.max_new_tokens,
                               advantage=cfg.advantage, loss_aggregation=resolved_aggregation(cfg),
                               dynamic_sampling=cfg.dynamic_sampling,
                               importance_correction=cfg.importance_correction),
        notes={"unmatched": [] if spec.settings == "matched" else [
            "ours drops groups whose rewards are all equal (dynamic sampling) and, with a bf16 sampling copy, "
            "measures and corrects the sampler mismatch (an extra no-grad forward of each model); TRL does neither "
            "without vLLM"]},
        step_counts={"responses": [n] * len(records)},
        step_times={name: [r[f"time/{name}"] for r in records] for name in ("generation", "scoring", "forward",
                                                                            "update")},
        step_values={"score": [r["score"] for r in records], "dropped_groups": [r["dropped_groups"] for r in records]},
    )


def trl_grpo(spec: BenchSpec) -> dict[str, Any]:
    """``trl.GRPOTrainer`` with the same reward function, prompts, group size (``num_generations``), completions
    per iteration (``per_device_train_batch_size``), generation length and precision.

    One iteration = one generation batch and its one optimizer step (``num_iterations=1``). ``matched``: the
    prompts of each iteration are ours, in order (no shuffling), ``loss_type="grpo"``, ``beta=0``. Timing:
    :func:`step_clock`; tokens: the generated completion tokens (``completion_mask``); the time split from
    wrappers around ``_generate``, ``_calculate_rewards`` and ``_generate_and_score_completions`` (its rest: the
    no-grad log-prob forwards), the update being the iteration's remaining time."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from alignlab.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(spec.model)
    cfg = _ours_grpo_config(spec)
    k, per_iteration = _group(spec)
    prompts, ids, batches = grpo_prompts(cfg, tokenizer)
    matched = spec.settings == "matched"
    chosen = [i for batch in batches for i in batch] if matched else list(range(len(prompts)))
    rows = [{"prompt": trl_prompt(prompts[i], tokenizer, cfg)} for i in chosen]
    scores: list[float] = []

    MeasuredGRPOTrainer = timed_rollouts(GRPOTrainer)

    args = GRPOConfig(**trl_args(
        spec, matched=dict(num_iterations=1, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="grpo",
                           scale_rewards="group", epsilon=0.2, shuffle_dataset=False, disable_dropout=True),
        num_generations=k, max_completion_length=cfg.max_new_tokens))
    clock = step_clock()
    trainer = MeasuredGRPOTrainer(model=resolve_model(spec.model), reward_funcs=trl_reward(cfg.reward, scores),
                                  args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                  callbacks=[clock])
    their_ids = trainer._tokenize_prompts([row["prompt"] for row in rows[: per_iteration * 2]])[0]
    same = sum(list(a) == list(ids[i]) for a, i in zip(their_ids, chosen))
    trainer.train()
    seconds, cpu_seconds = clock_seconds(clock, spec.total_steps, per=1)
    rollouts = trainer.bench_rollouts
    if len(rollouts) != spec.total_steps:
        raise AlignlabError(f"GRPOTrainer generated {len(rollouts)} times, expected {spec.total_steps}")
    unmatched = [] if matched else [f"each library's defaults: TRL loss_type={args.loss_type}, beta={args.beta}, "
                                    f"num_iterations={args.num_iterations}; ours advantage={cfg.advantage}"]
    return raw_result(
        seconds, cpu_seconds, [round(r["tokens"]) for r in rollouts], [], params=trainer_params(trainer.model),
        precision="bf16" if args.bf16 else "fp32", flops_per_token_factor=0,
        settings=trl_settings(args, shuffle_dataset=args.shuffle_dataset, num_iterations=args.num_iterations,
                              num_generations=k, prompts_per_iteration=per_iteration, beta=args.beta,
                              loss_type=args.loss_type, max_new_tokens=args.max_completion_length),
        notes={"prompt_ids_identical_to_ours": same, "prompts_compared": min(len(rows), per_iteration * 2),
               "unmatched": unmatched},
        step_counts={"responses": [r["completions"] for r in rollouts]},
        step_times={"generation": [r["generation"] for r in rollouts], "scoring": [r["scoring"] for r in rollouts],
                    "forward": [r["seconds"] - r["generation"] - r["scoring"] for r in rollouts],
                    "update": [s - r["seconds"] for s, r in zip(seconds, rollouts)]},
        step_values={"score": scores[: len(rollouts)]},
    )
