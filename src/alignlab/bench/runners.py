"""What every runner shares: our trainer's config and TRL's for one spec, set alike (:func:`ours_config`,
:func:`trl_args`), the raw result a runner returns (:func:`raw_result`, :func:`trl_result`), and the preference
data the ``rm`` and ``dpo`` runners read and hand TRL.

Settings
--------
- ``matched``: both libraries in the same dtype (``fp32``, or ``bf16`` autocast with fp32 weights), no
  gradient checkpointing, the same truncation, batch size and no accumulation (ours still cuts a batch into
  forward passes of at most ``max_tokens`` tokens, its default: the same update), the same optimizer
  (``torch.optim.AdamW(fused=True)``, same lr and betas, no weight decay, clip 1.0, constant schedule), no
  logging/evaluation/saving inside the timed loop, and the *same batches in the same order*: TRL gets our step
  plan's records, in order, with a sequential sampler. For ``rm`` and ``dpo`` TRL gets our token ids (so both
  train on exactly the same tokens); the notes say how many examples TRL's own tokenization would have
  given identically. What cannot be matched is listed in the notes (``unmatched``).
- ``defaults``: each library at its own defaults (ours: ``precision=auto``, length-grouped batches, cosine
  schedule; TRL's configs: bf16, gradient checkpointing, fused AdamW, random sampler, logging every 10
  steps), except batch size, max length, steps and the output folder. Evaluation and saving stay off for both.
  TRL tokenizes the text records itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignlab.bench.measure import clock_seconds, trainer_params
from alignlab.bench.registry import BenchSpec
from alignlab.errors import AlignlabError

# ------------------------------------------------------------------------------------------------ configs and results


def ours_config(cls: type, spec: BenchSpec, **values: Any) -> Any:
    """Our config ``cls`` for ``spec``: no final model, a fresh run folder, no accumulation, the stage's
    ``values``; with ``matched`` settings the shared optimizer, schedule, dtype and logging settings. Our
    ``max_tokens`` stays at its default (a batch in forward passes of at most that many tokens: the same update,
    so it is an implementation choice like the shared-prompt layout, not a setting to match)."""
    base: dict[str, Any] = dict(model=spec.model, batch_size=spec.batch_size, grad_accum=1, seed=spec.seed,
                                output_dir=str(Path(spec.workdir) / "run"), resume="never", save_final=False)
    base.update(values)
    if spec.settings == "matched":
        base.update(precision=spec.precision, gradient_checkpointing=False, lr=spec.lr, schedule="constant",
                    warmup_ratio=0.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
                    progress=False, log_every=1)
    return cls(**base)


def ours_settings(cfg: Any, **more: Any) -> dict[str, Any]:
    """What our config ``cfg`` set, for the report (``settings``), plus ``more``."""
    return {"gradient_checkpointing": cfg.gradient_checkpointing, "optimizer": "torch.optim.AdamW(fused=True)",
            "schedule": cfg.schedule, "warmup_ratio": cfg.warmup_ratio, "lr": cfg.lr,
            "group_by_length": cfg.group_by_length, "batch_size": cfg.batch_size,
            "max_tokens_per_forward": cfg.max_tokens, **more}


def raw_result(seconds: list[float], cpu_seconds: list[float], tokens: list[int], losses: list[float], *,
               params: tuple[int, int, int], precision: str, settings: dict[str, Any],
               notes: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    """A runner's raw measurements (listed in ``registry.py``, "Adding a stage")."""
    out = {"step_seconds": seconds, "step_cpu_seconds": cpu_seconds, "step_tokens": tokens,
           "losses": [float(x) for x in losses], "trainable_params": params[0], "total_params": params[1],
           "flops_params": params[2], "precision": precision, "settings": settings, **more}
    if notes:
        out["notes"] = notes
    return out


def _name(value: Any) -> str:
    """An enum's value (``OptimizerNames.ADAMW_TORCH`` -> ``adamw_torch``), else ``str(value)``."""
    return str(getattr(value, "value", value))


def trl_args(spec: BenchSpec, matched: dict[str, Any] | None = None, **stage: Any) -> dict[str, Any]:
    """Keyword arguments of a TRL config for ``spec``: CPU, no reporting, saving or evaluation, no accumulation,
    ``spec``'s batch, steps and seed; with ``matched`` settings our optimizer, schedule, dtype (fp32 weights),
    no gradient checkpointing, no logging and a sequential sampler, plus ``matched``; then ``stage``."""
    import torch

    args: dict[str, Any] = dict(
        output_dir=str(Path(spec.workdir) / "run"), use_cpu=True, report_to=[], save_strategy="no",
        eval_strategy="no", dataloader_num_workers=0, per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=1, max_steps=spec.total_steps, seed=spec.seed,
    )
    if spec.settings == "matched":
        args.update(
            bf16=spec.precision == "bf16", fp16=False, gradient_checkpointing=False, optim="adamw_torch_fused",
            learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, logging_strategy="no", disable_tqdm=True,
            train_sampling_strategy="sequential", model_init_kwargs={"dtype": torch.float32}, **(matched or {}),
        )
    args.update(stage)
    return args


def trl_settings(args: Any, **more: Any) -> dict[str, Any]:
    """What TRL's config ``args`` set, for the report (``settings``), plus ``more``."""
    return {"gradient_checkpointing": args.gradient_checkpointing, "optimizer": _name(args.optim),
            "schedule": _name(args.lr_scheduler_type), "lr": args.learning_rate,
            "sampler": _name(args.train_sampling_strategy), "logging_steps": args.logging_steps,
            "logging": _name(args.logging_strategy), "batch_size": args.per_device_train_batch_size, **more}


def trl_result(trainer: Any, clock: Any, spec: BenchSpec, *, notes: dict[str, Any] | None = None,
               **settings: Any) -> dict[str, Any]:
    """The raw measurements of a :func:`measured` TRL trainer that has trained ``spec.total_steps`` steps."""
    seconds, cpu_seconds = clock_seconds(clock, spec.total_steps)
    return raw_result(seconds, cpu_seconds, trainer.bench_tokens, trainer.bench_losses,
                      params=trainer_params(trainer.model), precision="bf16" if trainer.args.bf16 else "fp32",
                      settings=trl_settings(trainer.args, **settings), notes=notes,
                      step_values=trainer.bench_values)


def plan_order(plan: list[list[int]], spec: BenchSpec) -> list[int]:
    """Example indices of the first ``spec.total_steps`` steps of our plan, in order: with a sequential sampler
    and the same batch size, TRL then trains on our batches."""
    return [i for step in plan[: spec.total_steps] for i in step]


# ------------------------------------------------------------------------------------------------ preference data


def preference_records(cfg: Any, *, expand: bool) -> list[Any]:
    """The preference records our trainers read from ``cfg.data`` (invalid ones skipped and counted by the
    loader, as ``skip_invalid=true`` does), rankings expanded to their pairs when ``expand``."""
    from alignlab.config import parse_columns
    from alignlab.data.preference import expand_to_pairs, load_preferences

    records, _ = load_preferences(cfg.data, format=cfg.format, columns=parse_columns(cfg.columns), skip_invalid=True,
                                  limit=cfg.limit or None)
    return expand_to_pairs(records) if expand else records


def encode_each(cfg: Any, records: list[Any], encode: Callable[[Any], list[Any]]
                ) -> tuple[list[Any], list[Any], list[list[int]]]:
    """Encode every record alone (``encode([record]) -> examples``, so each example keeps its record), and plan
    the steps over the examples as our trainer does: ``(records kept, examples, plan)``."""
    from alignlab.train.loop import plan_steps

    kept = [(item, examples[0]) for item in records if (examples := encode(item))]
    if not kept:
        raise AlignlabError("no examples left after encoding", file=cfg.data)
    items, examples = [k[0] for k in kept], [k[1] for k in kept]
    return items, examples, plan_steps([len(e) for e in examples], cfg)


def trl_text_pair(item: Any) -> dict[str, Any]:
    """A preference pair (``responses == [chosen, rejected]``) in TRL's format, rendered as our ``auto``
    template does: messages (TRL applies the chat template) or plain text (prompt + response + EOS)."""
    chosen, rejected = item.responses[0], item.responses[-1]
    if isinstance(item.prompt, list):
        return {"prompt": item.prompt, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    if isinstance(item.prompt, str):
        return {"prompt": item.prompt, "chosen": chosen, "rejected": rejected}
    raise AlignlabError("cannot give TRL this prompt (use text or message prompts)", record=item.record)


def same_tokens(prepared: Any, examples: list[Any], ours: Callable[[Any], tuple], theirs: Callable[[Any], tuple]
                ) -> dict[str, Any]:
    """How many of ``examples`` not truncated by us TRL's own tokenization (``prepared``) gives identically, and
    how many of the others differ only by tokens TRL keeps after the end of ours (a chat template's text after
    the final EOS, e.g. ``"\\n"`` after ``<|im_end|>``: TRL trains on it and a reward model would score it)."""
    compared = [(ours(e), theirs(row)) for row, e in zip(prepared, examples) if not e.truncated]
    same = sum(a == b for a, b in compared)
    longer = sum(a != b and all(list(y[: len(x)]) == list(x) for x, y in zip(a, b)) for a, b in compared)
    out: dict[str, Any] = {"examples_identical_to_ours": same, "examples_compared": len(compared)}
    if same < len(compared):
        out["unmatched"] = [f"TRL's own tokenization of the text differs from ours on {len(compared) - same} of "
                            f"{len(compared)} untruncated examples ({longer} of them only by tokens after the end of "
                            "our sequences, e.g. the chat template's text after the final EOS); TRL was given our "
                            "token ids, so both trained on the same tokens"]
    return out


def trl_tokenization(trainer: Any, prepare: Callable[..., Any], rows: list[dict[str, Any]]) -> Any:
    """``rows`` (text) through TRL's own preprocessing (``prepare``: the trainer class's ``_prepare_dataset``)
    with no length limit, to compare with our token ids."""
    from datasets import Dataset

    saved = trainer.args.max_length
    trainer.args.max_length = None  # compare whole sequences; nothing filtered, so rows stay aligned
    try:
        return prepare(trainer, Dataset.from_list(rows), trainer.processing_class, trainer.args, "check")
    finally:
        trainer.args.max_length = saved
