"""``bench dpo``: our ``train_dpo`` (sigmoid loss, frozen reference copy) against ``trl.DPOTrainer`` on the same
preference pairs, given as our token ids with ``matched`` settings."""

from __future__ import annotations

from typing import Any

from alignlab.bench.measure import measured, meta_params, stamped_run, step_clock
from alignlab.bench.registry import BenchSpec
from alignlab.bench.runners import (
    encode_each,
    ours_config,
    ours_settings,
    plan_order,
    preference_records,
    raw_result,
    same_tokens,
    trl_args,
    trl_result,
    trl_text_pair,
    trl_tokenization,
)


def _ours_dpo_config(spec: BenchSpec) -> Any:
    from alignlab.config import DPOConfig

    return ours_config(DPOConfig, spec, data=spec.data, max_length=spec.max_length, max_steps=spec.total_steps,
                       eval_fraction=0.0, skip_invalid=True, loss="dpo", beta=spec.option("beta"))


def dpo_examples(cfg: Any, tokenizer: Any) -> tuple[list[Any], list[Any], list[list[int]]]:
    """``(pairs, examples, plan)`` as ``train_dpo`` builds them for ``cfg`` (no held-out split)."""
    from alignlab.train.dpo import prepare_pairs

    return encode_each(cfg, preference_records(cfg, expand=True),
                       lambda item: prepare_pairs([item], tokenizer, cfg, cfg.data)[0])


def ours_dpo(spec: BenchSpec) -> dict[str, Any]:
    """Our DPO trainer (``train_dpo``, sigmoid loss, a frozen reference copy), unmodified, timed by
    :func:`stamped_run`. MFU counts 8N FLOPs per token: policy forward and backward (6N) + reference forward."""
    from alignlab.models import resolve_precision
    from alignlab.train.dpo import train_dpo

    cfg = _ours_dpo_config(spec)
    seconds, cpu_seconds, records = stamped_run(lambda: train_dpo(cfg), "tokens", spec.total_steps)
    return raw_result(seconds, cpu_seconds, [r["tokens"] for r in records], [r["loss"] for r in records],
                      params=meta_params(spec.model), precision=resolve_precision(cfg.precision),
                      settings=ours_settings(cfg, beta=cfg.beta, reference="frozen copy"), flops_per_token_factor=8.0,
                      step_values={"reward_margin": [r.get("rewards/margins") for r in records],
                                   "reward_accuracy": [r.get("rewards/accuracies") for r in records]})


def trl_dpo(spec: BenchSpec) -> dict[str, Any]:
    """``trl.DPOTrainer`` (sigmoid loss, its default reference: a frozen copy of the model) on the same pairs.

    ``matched``: TRL trains on our token ids (prompt, chosen and rejected ids of our step plan's pairs, in
    order; its ``_prepare_dataset`` passes pre-tokenized rows through instead of tokenizing) and the notes say
    how many pairs TRL's own tokenization would have given identically. ``defaults``: TRL gets the text pairs
    ours kept and tokenizes and truncates them itself. Timing and tokens as :func:`trl_sft`."""
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from alignlab.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(spec.model)
    items, examples, plan = dpo_examples(_ours_dpo_config(spec), tokenizer)
    matched = spec.settings == "matched"
    order = plan_order(plan, spec) if matched else list(range(len(items)))

    class OurTokensDPOTrainer(measured(DPOTrainer, {"reward_margin": "rewards/margins",  # type: ignore[misc]
                                                    "reward_accuracy": "rewards/accuracies"})):
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            if "prompt_ids" in dataset.column_names:  # our token ids, already within max_length
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    if matched:
        rows = [{"prompt_ids": examples[i].prompt_ids, "chosen_ids": examples[i].chosen_ids,
                 "rejected_ids": examples[i].rejected_ids} for i in order]
    else:
        rows = [trl_text_pair(items[i]) for i in order]
    args = TRLConfig(**trl_args(spec, matched=dict(loss_type=["sigmoid"], precompute_ref_log_probs=False),
                                max_length=spec.max_length, beta=spec.option("beta"), dataset_num_proc=None))
    clock = step_clock()
    trainer = OurTokensDPOTrainer(model=resolve_model(spec.model), args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, callbacks=[clock])
    if matched:
        prepared = trl_tokenization(trainer, DPOTrainer._prepare_dataset, [trl_text_pair(items[i]) for i in order])
        notes = same_tokens(prepared, [examples[i] for i in order],
                            lambda e: (e.prompt_ids, e.chosen_ids, e.rejected_ids),
                            lambda row: (list(row["prompt_ids"]), list(row["chosen_ids"]), list(row["rejected_ids"])))
    else:
        notes = {"pairs_given": len(rows), "pairs_kept_by_trl": len(trainer.train_dataset),
                 "unmatched": ["TRL tokenizes and truncates the text itself; each library draws its own batches"]}
    trainer.train()
    out = trl_result(trainer, clock, spec, notes=notes, beta=args.beta, loss_type=list(args.loss_type),
                     reference="frozen copy" if trainer.ref_model is not None else "none/precomputed")
    out["flops_per_token_factor"] = 8.0
    return out
