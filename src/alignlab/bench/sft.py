"""``bench sft``: our ``train_sft`` against ``trl.SFTTrainer`` on the same instruction records (completion-only
loss)."""

from __future__ import annotations

from typing import Any

from alignlab.bench.measure import measured, meta_params, stamped_run, step_clock
from alignlab.bench.registry import BenchSpec
from alignlab.bench.runners import ours_config, ours_settings, raw_result, trl_args, trl_result
from alignlab.errors import AlignlabError


def _ours_sft_config(spec: BenchSpec) -> Any:
    """Our SFTConfig for ``spec``. Both settings: no evaluation split, no final model, a fresh run folder."""
    from alignlab.config import SFTConfig

    return ours_config(SFTConfig, spec, data=spec.data, max_length=spec.max_length, max_steps=spec.total_steps,
                       eval_fraction=0.0)


def ours_sft(spec: BenchSpec) -> dict[str, Any]:
    """Our SFT trainer, unmodified (``train_sft``), timed by :func:`stamped_run`; per-step tokens and losses read
    back from its ``metrics.jsonl``."""
    from alignlab.models import resolve_precision
    from alignlab.train.sft import train_sft

    cfg = _ours_sft_config(spec)
    seconds, cpu_seconds, records = stamped_run(lambda: train_sft(cfg), "tokens", spec.total_steps)
    return raw_result(seconds, cpu_seconds, [r["tokens"] for r in records], [r["loss"] for r in records],
                      params=meta_params(spec.model), precision=resolve_precision(cfg.precision),
                      settings=ours_settings(cfg))


def trl_records(spec: BenchSpec, tokenizer: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """The records TRL trains on, in TRL's prompt/completion format, and our tokenized examples of them.

    Our loader tokenizes the file (so both libraries get the records ours keeps); each kept record is turned
    into ``{"prompt", "completion"}`` exactly as our template renders it (Alpaca: the Alpaca prompt text and the
    output; conversations: the messages before the last assistant turn, and that turn). With ``matched``
    settings the records come in the order of our step plan, so a sequential sampler gives TRL our batches.
    """
    from alignlab.config import parse_columns
    from alignlab.data.formats import default_template, iter_instruction_records, load_sft_dataset
    from alignlab.data.templates import render_alpaca_prompt
    from alignlab.train.loop import plan_steps

    cfg = _ours_sft_config(spec)
    examples, _ = load_sft_dataset(spec.data, tokenizer, format=cfg.format, template=cfg.template,
                                   columns=parse_columns(cfg.columns), max_length=cfg.max_length,
                                   truncation=cfg.truncation)
    by_number = {r.record: r for r in iter_instruction_records(spec.data, format=cfg.format,
                                                               columns=parse_columns(cfg.columns))}
    if spec.settings == "matched":
        plan = plan_steps([len(e.input_ids) for e in examples], cfg)
        examples = [examples[i] for step in plan for i in step]

    def convert(record: Any) -> dict[str, Any]:
        template = default_template(record.kind, record.prompt) if cfg.template == "auto" else cfg.template
        if record.kind == "alpaca" and template == "alpaca":
            return {"prompt": render_alpaca_prompt(record.instruction, record.input), "completion": record.output}
        if record.kind == "prompt_completion" and isinstance(record.prompt, str) and template == "none":
            return {"prompt": record.prompt, "completion": record.output}
        if record.kind == "conversation" and record.messages and record.messages[-1]["role"] == "assistant" \
                and sum(m["role"] == "assistant" for m in record.messages) == 1:
            return {"prompt": record.messages[:-1], "completion": record.messages[-1:]}
        raise AlignlabError(f"bench sft cannot give TRL this record ({record.kind}, template {template}): use "
                            "Alpaca, string prompt/completion, or single-answer conversations", record=record.record)

    return [convert(by_number[e.record]) for e in examples], examples


def trl_sft(spec: BenchSpec) -> dict[str, Any]:
    """``trl.SFTTrainer`` with ``SFTConfig`` on the same records (prompt/completion, completion-only loss).

    Timing: :func:`step_clock`. Tokens and loss: :func:`measured` (``training_step`` wrapped to count the
    batch's attention-mask ones and keep the returned loss); nothing else of TRL's is changed."""
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    from alignlab.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(spec.model)
    rows, examples = trl_records(spec, tokenizer)
    if spec.settings == "matched":
        rows, examples = rows[: spec.total_steps * spec.batch_size], examples[: spec.total_steps * spec.batch_size]
    args = TRLConfig(**trl_args(spec, matched=dict(packing=False, padding_free=False), max_length=spec.max_length,
                                completion_only_loss=True, dataset_num_proc=None))
    clock = step_clock()
    trainer = measured(SFTTrainer)(model=resolve_model(spec.model), args=args, train_dataset=Dataset.from_list(rows),
                                   processing_class=tokenizer, callbacks=[clock])
    # fairness check: did TRL's own tokenization give exactly our input ids and loss positions?
    prepared = trainer.train_dataset
    same = None
    if len(prepared) == len(examples):
        same = sum(list(ids) == list(ex.input_ids) and list(lab) == list(ex.labels)
                   for ids, lab, ex in zip(prepared["input_ids"], prepared["labels"], examples))
    trainer.train()
    return trl_result(trainer, clock, spec, notes={"examples_identical_to_ours": same,
                                                   "examples_compared": len(prepared) if same is not None else 0})
