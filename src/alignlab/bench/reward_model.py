"""``bench rm``: our ``train_reward`` against ``trl.RewardTrainer`` on the same preference pairs; ``bench
rm-kwise``: ours against ours, the K-wise ranking loss against the same rankings expanded to pairs, and what
the K-wise path saves (:func:`compare_rankings`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
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
from alignlab.errors import AlignlabError


def _ours_rm_config(spec: BenchSpec, *, expand_pairs: bool, batch_size: int = 0) -> Any:
    """Our RewardConfig: invalid records skipped (counted), rankings expanded to pairs when ``expand_pairs``,
    reward statistics after training computed on a handful of responses only (untimed either way)."""
    from alignlab.config import RewardConfig

    return ours_config(RewardConfig, spec, data=spec.data, max_length=spec.max_length, max_steps=spec.total_steps,
                       eval_fraction=0.0, skip_invalid=True, expand_pairs=expand_pairs, stats_samples=spec.batch_size,
                       **({"batch_size": batch_size} if batch_size else {}))


def reward_examples(cfg: Any, tokenizer: Any) -> tuple[list[Any], list[Any], list[list[int]]]:
    """``(records, examples, plan)`` as ``train_reward`` builds them for ``cfg`` (no held-out split)."""
    from alignlab.train.reward_model import encode_preferences

    encode = dict(template=cfg.template, max_length=cfg.max_length, truncation=cfg.truncation, skip_invalid=True,
                  margin=cfg.margin, margin_scale=cfg.margin_scale, source=cfg.data)
    return encode_each(cfg, preference_records(cfg, expand=cfg.expand_pairs),
                       lambda item: encode_preferences([item], tokenizer, **encode)[0])


def _comparisons(k: int) -> int:
    return k * (k - 1) // 2


def _ours_rm(spec: BenchSpec, *, expand_pairs: bool, batch_size: int = 0,
             notes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Our reward trainer (``train_reward``, unmodified) timed by :func:`stamped_run`, with per-step pairs
    (comparisons) and sequences from our step plan, and the dataset's totals (``dataset``)."""
    from alignlab.models import load_tokenizer, resolve_precision
    from alignlab.scoring import prepare_reward_tokenizer
    from alignlab.train.reward_model import train_reward

    cfg = _ours_rm_config(spec, expand_pairs=expand_pairs, batch_size=batch_size)
    _, examples, plan = reward_examples(cfg, prepare_reward_tokenizer(load_tokenizer(spec.model)))
    seconds, cpu_seconds, records = stamped_run(lambda: train_reward(cfg), "tokens", spec.total_steps)
    tokens = [r["tokens"] for r in records]
    if tokens != [sum(len(examples[i]) for i in step) for step in plan]:
        raise AlignlabError("train_reward's batches differ from the bench's reconstruction of its step plan "
                            "(alignlab.bench.reward_model.reward_examples): update the bench")
    sequences = [len(e.sequences) for e in examples]
    return raw_result(
        seconds, cpu_seconds, tokens, [r["loss"] for r in records], params=meta_params(spec.model, "score"),
        precision=resolve_precision(cfg.precision), settings=ours_settings(cfg, expand_pairs=expand_pairs),
        notes=notes if notes and any(notes.values()) else None,
        step_values={"accuracy": [r["accuracy"] for r in records]},
        step_counts={"pairs": [sum(_comparisons(sequences[i]) for i in step) for step in plan],
                     "sequences": [sum(sequences[i] for i in step) for step in plan]},
        dataset={"examples": len(examples), "pairs": sum(map(_comparisons, sequences)), "sequences": sum(sequences),
                 "tokens": sum(len(e) for e in examples), "encoded_tokens": sum(e.encoded for e in examples)},
    )


def ours_rm(spec: BenchSpec) -> dict[str, Any]:
    """``bench rm``, ours: pairs (a ranking becomes its pairs, as RewardTrainer needs)."""
    return _ours_rm(spec, expand_pairs=True)


def kept_rankings(spec: BenchSpec) -> tuple[BenchSpec, int, int]:
    """``rm-kwise``: the rankings of ``spec.data`` that the K-wise path keeps, written as ranking records
    (``{prompt, responses}``, best first) to ``spec.workdir``, so both runs train on exactly the same rankings
    (a ranking whose K answers encode gives pairs that all encode too; the other way round, a truncation that
    makes two answers identical drops the whole ranking but only one of its pairs). Returns ``spec`` pointing at
    that file, and (rankings kept, rankings read)."""
    from alignlab.models import load_tokenizer
    from alignlab.scoring import prepare_reward_tokenizer

    cfg = _ours_rm_config(spec, expand_pairs=False)
    items, _, _ = reward_examples(cfg, prepare_reward_tokenizer(load_tokenizer(spec.model)))
    path = Path(spec.workdir) / "rankings.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps({"prompt": item.prompt, "responses": item.responses}, ensure_ascii=False) + "\n")
    return dataclasses.replace(spec, data=str(path)), len(items), len(preference_records(cfg, expand=False))


def _ranking_notes(kept: int, read: int) -> list[str]:
    if kept == read:
        return []
    return [f"{read - kept} of {read} rankings cannot be encoded K-wise at this max_length (e.g. truncation made "
            "two answers identical) and are left out of both runs"]


def ours_rm_kwise(spec: BenchSpec) -> dict[str, Any]:
    """``bench rm-kwise``, the K-wise path: one example = a prompt with all its answers, each encoded once."""
    spec, kept, read = kept_rankings(spec)
    return _ours_rm(spec, expand_pairs=False, notes={"unmatched": _ranking_notes(kept, read)})


def ours_rm_pairs(spec: BenchSpec) -> dict[str, Any]:
    """``bench rm-kwise``, the expanded path: the same rankings as their K(K-1)/2 pairs. Its batch (option
    ``pairs_batch_size``; 0 = automatic) holds as many sequences per step as the K-wise run's on average
    (``batch_size x mean K / 2`` pairs), so both runs hold about the same activations per step."""
    spec, kept, read = kept_rankings(spec)
    rankings = preference_records(_ours_rm_config(spec, expand_pairs=False), expand=False)
    mean_k = sum(len(r.responses) for r in rankings) / len(rankings)
    batch = spec.option("pairs_batch_size")
    if batch <= 0:
        batch = max(1, round(spec.batch_size * mean_k / 2))
    why = f"{batch} pairs per step ({'set' if spec.option('pairs_batch_size') > 0 else 'automatic'}: batch " \
          f"{spec.batch_size} prompts x mean K {mean_k:.2f} / 2 sequences per pair)"
    return _ours_rm(spec, expand_pairs=True, batch_size=batch, notes={"unmatched": [why, *_ranking_notes(kept, read)]})


def trl_rm(spec: BenchSpec) -> dict[str, Any]:
    """``trl.RewardTrainer`` with ``RewardConfig`` on the same pairs.

    ``matched``: TRL gets our token ids (``chosen_ids``/``rejected_ids``, which RewardTrainer takes as they are)
    of our step plan's pairs in order; the notes say how many of them TRL's own tokenization of the text would
    have given identically. ``defaults``: TRL gets the text records ours kept and tokenizes them itself
    (dropping, not truncating, pairs over ``max_length``). Timing and tokens as :func:`trl_sft`."""
    from datasets import Dataset
    from trl import RewardConfig as TRLConfig
    from trl import RewardTrainer

    from alignlab.models import load_tokenizer, resolve_model
    from alignlab.scoring import prepare_reward_tokenizer

    tokenizer = prepare_reward_tokenizer(load_tokenizer(spec.model))
    items, examples, plan = reward_examples(_ours_rm_config(spec, expand_pairs=True), tokenizer)
    matched = spec.settings == "matched"
    order = plan_order(plan, spec) if matched else list(range(len(items)))
    if matched:
        rows = [{"chosen_ids": examples[i].sequences[0], "rejected_ids": examples[i].sequences[1]} for i in order]
    else:
        rows = [trl_text_pair(items[i]) for i in order]
    args = TRLConfig(**trl_args(spec, max_length=spec.max_length, dataset_num_proc=None))
    clock = step_clock()
    trainer = measured(RewardTrainer, {"accuracy": "accuracy"})(
        model=resolve_model(spec.model), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        callbacks=[clock])
    if matched:
        prepared = trl_tokenization(trainer, RewardTrainer._prepare_dataset, [trl_text_pair(items[i]) for i in order])
        notes = same_tokens(prepared, [examples[i] for i in order], lambda e: (e.sequences[0], e.sequences[-1]),
                            lambda row: (list(row["chosen_ids"]), list(row["rejected_ids"])))
    else:
        notes = {"pairs_given": len(rows), "pairs_kept_by_trl": len(trainer.train_dataset),
                 "unmatched": ["TRL tokenizes the text itself and drops pairs longer than max_length (ours truncates "
                               "them); each library draws its own batches"]}
    trainer.train()
    return trl_result(trainer, clock, spec, notes=notes)


def compare_rankings(report: dict[str, Any]) -> dict[str, Any]:
    """``rm-kwise``: what the K-wise path saves over expanding rankings to pairs, over one epoch of the data.

    ``token_factor`` = tokens of the expanded pairs / of the K-wise examples, each sequence (prompt + answer)
    counted whole, i.e. what a trainer that encodes every sequence separately would run (each answer once in
    K-wise, K - 1 times as pairs); ``run_token_factor``: the same with every prompt encoded once per example (a
    prompt once per K-wise example, once per pair when expanded), the most our shared-prompt layout saves;
    ``epoch_s`` = those tokens / each run's measured tokens/s; ``speed_factor`` = pairs epoch / K-wise epoch
    (``= token_factor x`` the tokens/s ratio). The issue's target: ``speed_factor >= token_factor``, i.e. the
    K-wise batches are processed at least as fast per token as the pairs."""
    kwise, pairs = report["results"]["kwise"], report["results"]["pairs"]
    tokens = {"kwise": kwise["dataset"]["tokens"], "pairs": pairs["dataset"]["tokens"]}
    encoded = {"kwise": kwise["dataset"].get("encoded_tokens"), "pairs": pairs["dataset"].get("encoded_tokens")}
    epoch = {name: tokens[name] / report["results"][name]["tokens_per_s"] for name in tokens}
    token_factor = tokens["pairs"] / tokens["kwise"]
    speed_factor = epoch["pairs"] / epoch["kwise"]
    return {
        "encoded_tokens_per_epoch": tokens,
        "run_tokens_per_epoch": encoded,
        "run_token_factor": encoded["pairs"] / encoded["kwise"] if encoded["kwise"] else None,
        "comparisons_per_epoch": kwise["dataset"]["pairs"],
        "token_factor": token_factor,
        "epoch_s_estimate": epoch,
        "speed_factor": speed_factor,
        "pairs_per_s_ratio": kwise["pairs_per_s"] / pairs["pairs_per_s"],
        "target_met": speed_factor >= token_factor,
    }
