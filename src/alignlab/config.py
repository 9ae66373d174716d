"""Configuration: one dataclass per stage (every trainer, best-of-n, rejection sampling, the lab), read from
YAML with ``key=value`` overrides.

Every field carries its help text in ``metadata["help"]``; the CLI builds its options from these
dataclasses, so ``--help`` documents every option and a YAML file can set any of them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from alignlab.errors import AlignlabError

__all__ = [
    "ALL_METHODS",
    "BoNConfig",
    "Checked",
    "DPOConfig",
    "DataConfig",
    "GROUP_METHODS",
    "GRPOConfig",
    "LabConfig",
    "ModelConfig",
    "PPOConfig",
    "RSConfig",
    "RewardConfig",
    "RewardScoreConfig",
    "SFTConfig",
    "SampleConfig",
    "StudyConfig",
    "TrainConfig",
    "build_config",
    "config_fields",
    "config_to_dict",
    "opt",
    "parse_columns",
    "quick_config",
    "quick_study_config",
]

T = TypeVar("T")


def opt(default: Any, help: str, *, choices: list | None = None, ge: float | None = None,  # noqa: A002
        gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with its help text, and what values it allows: ``choices``, or a range (``ge``/``gt``:
    at least / above, ``le``/``lt``: at most / below). One declaration feeds the CLI, ``--help`` (the range is
    shown), YAML and the Python API: :class:`Checked` configs reject a value outside it when they are built."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        metadata["range"] = bounds  # a list option: the range of each of its values
    if isinstance(default, list):  # each config gets its own copy
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def describe_range(bounds: dict[str, float] | None) -> str:
    """``{'ge': 0, 'lt': 1}`` -> ``'0 <= x < 1'``; ``{'gt': 0}`` -> ``'> 0'``; empty -> ``''``."""
    if not bounds:
        return ""
    lower = f"{_num(bounds['ge'])} <= " if "ge" in bounds else f"{_num(bounds['gt'])} < " if "gt" in bounds else ""
    upper = f" <= {_num(bounds['le'])}" if "le" in bounds else f" < {_num(bounds['lt'])}" if "lt" in bounds else ""
    if lower and upper:
        return f"{lower}x{upper}"
    if lower:
        return (">= " if "ge" in bounds else "> ") + lower.split(" ")[0]
    return upper.strip()


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def check_value(name: str, value: Any, typ: Any, metadata: Any) -> None:
    """Raise an :class:`AlignlabError` naming option ``name`` when ``value`` is not of type ``typ`` (after
    :func:`_coerce`), is a NaN/inf number, or lies outside the field's declared choices or range."""
    origin = get_origin(typ)
    if origin in (Union, types.UnionType):
        if value is None:
            return
        typ = [a for a in get_args(typ) if a is not type(None)][0]
    if typ is bool and not isinstance(value, bool):
        raise AlignlabError(f"expected true/false, got {value!r}", field=name)
    if typ in (int, float):
        wrong_type = not isinstance(value, int if typ is int else (int, float))
        if isinstance(value, bool) or wrong_type:
            raise AlignlabError(f"expected {'an integer' if typ is int else 'a number'}, got {value!r}", field=name)
        if not math.isfinite(value):
            raise AlignlabError(f"expected a finite number, got {value!r}", field=name)
        bounds = metadata.get("range")
        if bounds and not (value >= bounds.get("ge", -math.inf) and value > bounds.get("gt", -math.inf)
                           and value <= bounds.get("le", math.inf) and value < bounds.get("lt", math.inf)):
            raise AlignlabError(f"{_num(value)} is out of range: the allowed range is {describe_range(bounds)}",
                                field=name)
    if typ is str and not isinstance(value, str):
        raise AlignlabError(f"expected a string, got {value!r}", field=name)
    choices = metadata.get("choices")
    if choices and value not in choices:
        raise AlignlabError(f"'{value}' is not one of {choices}", field=name)


def validate_config(cfg: Any) -> None:
    """Check every field of a config dataclass against its declared type, choices and range (see :func:`opt`)."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        check_value(f.name, getattr(cfg, f.name), hints[f.name], f.metadata)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


class Checked:
    """Base of the config dataclasses: a config is validated when it is built, whichever way (CLI, YAML,
    ``SFTConfig(lr=...)`` in Python), so a bad value fails at once with the same message everywhere."""

    def __post_init__(self) -> None:
        validate_config(self)


@dataclass
class ModelConfig(Checked):
    """Which model to start from and how to adapt it."""

    model: str = opt("tiny-random", "checkpoint folder, hub id, or built-in: smollm2-135m-instruct, tiny-random")
    lora: bool = opt(False, "train a LoRA adapter instead of all weights")
    lora_r: int = opt(16, "LoRA rank", ge=1)
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r)", ge=1)
    lora_dropout: float = opt(0.0, "LoRA dropout", ge=0, lt=1)
    lora_targets: str = opt("all-linear", "modules LoRA adapts: 'all-linear' or a comma list, e.g. q_proj,v_proj")
    merge_lora: bool = opt(True, "merge the adapter into full weights when saving the final model")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    allow_pickle: bool = opt(False, "allow pickle-based .bin/.pt weights (unsafe with untrusted files)")
    trust_remote_code: bool = opt(False, "let transformers run code shipped with a checkpoint")
    offline: bool = opt(False, "never touch the network: hub ids load only from the local cache, else fail at "
                        "once (also on when HF_HUB_OFFLINE=1)")


@dataclass
class TrainConfig(ModelConfig):
    """The shared training loop: optimizer, schedule, accumulation, precision, checkpoints, logging."""

    output_dir: str = opt("runs/sft", "run folder: config.yaml, metrics.jsonl, checkpoints/, final/")
    seed: int = opt(0, "one seed for data order, initialisation and sampling")
    epochs: float = opt(1.0, "passes over the training data (ignored when max_steps > 0)", gt=0)
    max_steps: int = opt(0, "optimizer steps to run; 0 = derived from epochs", ge=0)
    batch_size: int = opt(8, "examples per micro-batch on each process", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step (global batch = batch x accum x processes)", ge=1)
    max_tokens: int = opt(2048, "most tokens one forward pass may hold: a longer micro-batch is cut into pieces "
                          "whose gradients accumulate (the same update, less activation memory; not for KTO, "
                          "DeepSpeed); 0 = no limit", ge=0)
    lr: float = opt(2e-5, "peak learning rate (AdamW); 0 leaves the weights as they are", ge=0)
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norms)", ge=0)
    adam_beta1: float = opt(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = opt(0.999, "AdamW beta2", ge=0, lt=1)
    warmup_ratio: float = opt(0.03, "fraction of steps spent in linear warmup", ge=0, le=1)
    schedule: str = opt("cosine", "learning-rate decay after warmup", choices=["cosine", "linear", "constant"])
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0 = off)", ge=0)
    precision: str = opt("auto", "compute dtype: auto (bf16 where the hardware has it), bf16 or fp32",
                         choices=["auto", "bf16", "fp32"])
    group_by_length: bool = opt(True, "batch examples of similar length together to cut padding")
    log_every: int = opt(1, "log metrics every N optimizer steps", ge=1)
    eval_every: int = opt(0, "evaluate every N steps (0 = only at the end)", ge=0)
    save_every: int = opt(0, "checkpoint every N steps (0 = only at the end)", ge=0)
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep (0 = all)", ge=0)
    resume: str = opt("auto", "auto (continue from the newest valid checkpoint when OUTPUT_DIR holds the same run: "
                      "stage, data files and training options; another run there is an error), latest (the newest "
                      "valid checkpoint even if the run differs), never (start afresh, removing the folder's earlier "
                      "run), or a checkpoint path")
    overwrite: bool = opt(False, "start afresh in an OUTPUT_DIR that holds another run: its checkpoints, logs and "
                          "final model are deleted first")
    on_nan: str = opt("stop", "a NaN/inf loss, gradient or weight after the update: stop (naming the last finite "
                      "checkpoint) or skip the step (the weights and optimizer state before it are restored; keeps a "
                      "copy of them during each step)", choices=["stop", "skip"])
    save_final: bool = opt(True, "save the final model (Hugging Face format) to OUTPUT_DIR/final")
    progress: bool = opt(True, "show a progress bar")


@dataclass
class DataConfig(Checked):
    """Where the examples come from and how they become tokens."""

    data: str = opt("", "training data: .json/.jsonl/.csv/.parquet file (gz ok) or a hub dataset id")
    eval_data: str = opt("", "held-out data file; empty = split eval_fraction off the training data")
    eval_fraction: float = opt(0.05, "fraction of the training data held out when eval_data is empty", ge=0, lt=1)
    format: str = opt("auto", "record format: auto, alpaca, messages, sharegpt, prompt_completion, text")
    template: str = opt("auto", "prompt template: auto, alpaca, chat (the model's chat template), none")
    columns: str = opt("", "rename columns, e.g. 'instruction=Q,output=A'")
    max_length: int = opt(512, "maximum tokens per example", ge=1)
    truncation: str = opt("right", "over-long examples: right (cut the end, counted) or drop (counted)",
                          choices=["right", "drop"])
    skip_invalid: bool = opt(False, "skip invalid records (counted and reported) instead of stopping")
    limit: int = opt(0, "read at most N records (0 = all)", ge=0)
    dedupe: bool = opt(False, "drop exact duplicate examples, held-out examples identical to training ones, and "
                       "contradictory labels (all are counted in the data report either way)")


@dataclass
class SFTConfig(DataConfig, TrainConfig):
    """Supervised fine-tuning on instruction data."""

    output_dir: str = opt("runs/sft", "run folder: config.yaml, metrics.jsonl, checkpoints/, final/")


DPO_LOSSES = ("dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo", "kto")


@dataclass
class DPOConfig(DataConfig, TrainConfig):
    """Preference optimisation from pairs (the DPO family) or unpaired feedback (KTO)."""

    output_dir: str = opt("runs/dpo", "run folder: config.yaml, metrics.jsonl, checkpoints/, final/")
    lr: float = opt(1e-6, "peak learning rate (AdamW); preference losses want a small one", ge=0)
    format: str = opt("auto", "record format: auto, explicit, implicit, sharegpt, ranking, oasst (pairs; rankings "
                      "become all their pairs) or unpaired (kto)")
    template: str = opt("auto", "prompt template: auto (chat for message prompts, none for text), chat, alpaca, none")
    max_length: int = opt(512, "maximum tokens of prompt + response", ge=1)
    truncation: str = opt("right", "over-long pairs: right (prompt cut to max_prompt_length from the left, responses "
                          "cut at the end; counted) or drop (counted)", choices=["right", "drop"])
    loss: str = opt("dpo", "preference loss: dpo, cdpo, robust, ipo, hinge (with a reference), simpo, orpo "
                    "(reference-free), kto (unpaired feedback, or pairs split into both kinds)",
                    choices=list(DPO_LOSSES))
    beta: float = opt(0.0, "the loss's beta; 0 = its usual value: 0.1 (dpo, cdpo, robust, ipo, hinge, kto; orpo's "
                      "lambda), 2.0 (simpo)", ge=0)
    label_smoothing: float = opt(0.0, "label-flip probability: cdpo (needs > 0), robust, simpo", ge=0, le=0.5)
    simpo_gamma: float = opt(1.0, "SimPO's target reward margin", ge=0)
    rpo_alpha: float | None = opt(None, "weight of an NLL term on the chosen responses added to the loss (RPO); "
                                  "none = 1 for orpo (its SFT term), 0 otherwise", ge=0)
    desirable_weight: float = opt(1.0, "KTO: weight of the desirable examples' losses", ge=0)
    undesirable_weight: float = opt(1.0, "KTO: weight of the undesirable examples' losses", ge=0)
    reference: str = opt("", "reference model (folder or built-in name); empty = the starting model, and with LoRA "
                         "the base weights with the adapter disabled (no second model in memory)")
    precompute_ref: bool = opt(False, "score the data with the reference once before training and cache the "
                               "log-probs on disk (the reference model is then not kept in memory)")
    ref_cache_dir: str = opt("", "folder of cached reference log-probs; empty = the user cache (ALIGNLAB_CACHE)/"
                             "ref-logps")
    max_prompt_length: int = opt(0, "maximum prompt tokens (0 = only max_length limits); longer prompts keep their "
                                 "end (truncation=right) or are dropped (truncation=drop)", ge=0)
    group_rankings: bool = opt(True, "keep each ranking's pairs together in one micro-batch, each answer encoded once "
                               "for all its pairs (the K-wise batching of the reward model); batch_size then "
                               "counts records, a ranking of K answers bringing its K(K-1)/2 pairs")


def parse_columns(spec: str) -> dict[str, str] | None:
    """``'instruction=Q,output=A'`` -> ``{'instruction': 'Q', 'output': 'A'}``."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        if "=" not in part:
            raise AlignlabError(f"expected NAME=COLUMN, got '{part}'", field="columns")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _coerce(value: Any, typ: Any, name: str) -> Any:
    origin = get_origin(typ)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = args[0]
    if typ is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise AlignlabError(f"expected true/false, got '{value}'", field=name)
    if typ in (int, float):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise AlignlabError(f"expected {typ.__name__}, got '{value}'", field=name) from None
        if typ is int:
            if not number.is_integer():
                raise AlignlabError(f"expected an integer, got '{value}'", field=name)
            return int(number)
        return number
    if typ is str:
        return "" if value is None else str(value)
    if get_origin(typ) is list:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        inner = (get_args(typ) or (str,))[0]
        return [_coerce(v, inner, name) for v in items] if inner in (int, float) else items
    return value


def build_config(cls: type[T], *, yaml_file: str | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from defaults, then a YAML file, then overrides (later wins). Unknown keys are errors."""
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if yaml_file:
        path = Path(yaml_file)
        if not path.exists():
            raise AlignlabError("config file does not exist", file=yaml_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise AlignlabError(f"invalid YAML: {e}", file=yaml_file) from e
        if not isinstance(loaded, dict):
            raise AlignlabError("a config file must hold a mapping of option: value", file=yaml_file)
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    out = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in names:
            raise AlignlabError(f"unknown option '{key}' for {cls.__name__}", file=yaml_file, field=key)
        out[key] = _coerce(value, hints[key], key)
    return cls(**out)  # validates every value (Checked.__post_init__), with the same message as the Python API


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (for config.yaml and cache keys)."""
    return dataclasses.asdict(cfg)


def config_fields(cls: type) -> list[tuple[str, Any, Any, str, list | None]]:
    """(name, type, default, help, choices) for each field, in declaration order, for the CLI; the help ends with
    the field's allowed range when it declares one."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if f.metadata.get("range"):
            help_text += f"; range: {describe_range(f.metadata['range'])}"
        out.append((f.name, hints[f.name], default, help_text, f.metadata.get("choices")))
    return out




@dataclass
class RewardConfig(DataConfig, TrainConfig):
    """Reward-model training on preference pairs and rankings (``alignlab rm train``)."""

    output_dir: str = opt("runs/rm", "run folder: config.yaml, metrics.jsonl, checkpoints/, final/ (+ "
                          "reward_stats.json), eval_scores.jsonl, eval_stats.json, reward_hist.png")
    format: str = opt("auto", "preference format: auto, explicit, implicit (HH transcripts), sharegpt, ranking, "
                      "oasst")
    truncation: str = opt("right", "over-long responses: right (cut the end, counted), left (cut the start of "
                          "the prompt so the response and its EOS stay whole, counted) or drop (drop the "
                          "record, counted)", choices=["right", "left", "drop"])
    expand_pairs: bool = opt(False, "train on the K(K-1)/2 pairs of every ranking as separate examples "
                             "instead of one K-wise example per prompt (for comparison)")
    margin: str = opt("none", "Llama-2 margin in the loss: none; 'margin' (the record's margin column); "
                      "'scores' (differences of the responses' score columns)",
                      choices=["none", "margin", "scores"])
    margin_scale: float = opt(1.0, "multiply every margin by this", ge=0)
    center_rewards_coef: float = opt(0.0, "reward centring: add coef x mean(r^2) (Eisenstein et al. 2023; "
                                     "TRL suggests 0.01)", ge=0)
    stats_samples: int = opt(2000, "training responses scored after training for reward_stats.json (a seeded "
                             "random sample when there are more; 0 = all)", ge=0)


@dataclass
class RewardScoreConfig(Checked):
    """Score a data file with a reward model or a Python function (``alignlab rm score``)."""

    model: str = opt("", "reward model folder (from alignlab rm train), or module:function / file.py:function")
    data: str = opt("", "preference file (pairs, rankings, OASST trees, HH) or prompt/response records")
    output: str = opt("", "scored copy (JSONL); empty = DATA's name + .scored.jsonl in the current folder")
    format: str = opt("auto", "preference format: auto, explicit, implicit, sharegpt, ranking, oasst")
    columns: str = opt("", "rename columns, e.g. 'prompt=question,chosen=good'")
    template: str = opt("", "prompt template; empty = the one the reward model was trained with",
                        choices=["", "auto", "chat", "alpaca", "none"])
    max_length: int = opt(0, "tokens per prompt+response; 0 = the reward model's training max_length", ge=0)
    batch_size: int = opt(16, "sequences per forward pass", ge=1)
    normalize: bool = opt(False, "report (score - mean) / std with the model's reward_stats.json")
    skip_invalid: bool = opt(False, "skip invalid records (counted and reported) instead of stopping")
    limit: int = opt(0, "read at most N records (0 = all)", ge=0)
    allow_pickle: bool = opt(False, "allow pickle-based .bin/.pt weights (unsafe with untrusted files)")


@dataclass
class PPOConfig(TrainConfig):
    """RLHF with PPO (``alignlab ppo``): sample responses, score them, and push the policy towards high scores
    at a controlled KL from the reference. One *iteration* = one rollout + ``ppo_epochs`` passes over it; the
    rollout holds ``batch_size x grad_accum x num_mini_batches`` responses per process. ``epochs`` and
    ``max_steps`` are not used (``iterations`` counts the run); ``save_every``/``eval_every``/``log_every``
    count iterations."""

    output_dir: str = opt("runs/ppo", "run folder: config.yaml, metrics.jsonl, samples.jsonl, checkpoints/, final/")
    policy: str = opt("", "the policy to train (an alias of --model; the SFT model, a folder or a built-in)")
    lr: float = opt(1e-5, "peak learning rate (AdamW) of the policy and the value model; LoRA wants ~1e-4", ge=0)
    schedule: str = opt("linear", "learning-rate decay over the run's optimizer steps",
                        choices=["cosine", "linear", "constant"])
    warmup_ratio: float = opt(0.0, "fraction of optimizer steps spent in linear warmup", ge=0, le=1)
    batch_size: int = opt(8, "responses per forward/backward micro-batch on each process", ge=1)
    max_tokens: int = opt(0, "not used by PPO: its micro-batches hold batch_size responses", ge=0)
    # -- prompts
    prompts: str = opt("", "training prompts: .txt (one per line), a JSON/JSONL list, or any instruction or "
                       "preference file (its prompts)")
    eval_prompts: str = opt("", "held-out prompts (same formats); empty = eval_fraction of --prompts")
    eval_fraction: float = opt(0.1, "fraction of --prompts held out when --eval-prompts is empty (0 = none)",
                               ge=0, lt=1)
    limit: int = opt(0, "read at most N prompts (0 = all)", ge=0)
    template: str = opt("auto", "how a prompt is rendered: auto (the tokenizer's chat template when it has one, "
                        "else alpaca for instruction records and none for text), chat, alpaca, none",
                        choices=["auto", "chat", "alpaca", "none"])
    max_prompt_length: int = opt(512, "longest prompt in tokens (prompt + max_new_tokens must also fit the model's "
                                 "context)", ge=1)
    long_prompts: str = opt("error", "a prompt that does not fit: error (naming it) or drop (counted)",
                            choices=["error", "drop"])
    # -- roles
    reward_model: str = opt("", "reward: a reward-model folder (alignlab rm train), or module:function")
    reward: str = opt("", "reward: a Python function module:function or file.py:function, "
                      "f(prompts, responses) -> list[float] (e.g. alignlab.reward_functions:sentiment)")
    reward_batch_size: int = opt(16, "sequences per reward-model forward pass", ge=1)
    reference: str = opt("", "reference model; empty = the starting policy (with LoRA: the policy with its adapter "
                         "disabled, no second model)")
    value_model: str = opt("", "value model (critic) initialisation: empty = the reward model when --reward-model "
                           "is a folder, else the policy (with a zeroed head); or a checkpoint folder")
    share_backbone: bool = opt(False, "no separate value model: a value head on the policy's own last hidden "
                               "states (saves a model's memory and compute; the value loss then also shapes the "
                               "policy's features)")
    # -- rollout
    iterations: int = opt(20, "PPO iterations (rollout -> score -> advantages -> update)", ge=1)
    num_mini_batches: int = opt(1, "optimizer steps per PPO epoch over the rollout", ge=1)
    ppo_epochs: int = opt(4, "passes over each rollout", ge=1)
    responses_per_prompt: int = opt(1, "responses sampled per prompt in a rollout (> 1: the rollout holds "
                                    "rollout/k prompts, and each prompt is encoded once for its k responses in the "
                                    "forward passes)", ge=1)
    max_new_tokens: int = opt(64, "longest response in tokens", ge=1)
    temperature: float = opt(1.0, "sampling temperature (> 0); log-probs are taken at the same temperature", gt=0)
    top_p: float = opt(1.0, "nucleus sampling threshold (1 = off)", gt=0, le=1)
    top_k: int = opt(0, "top-k sampling (0 = off)", ge=0)
    stop_strings: list[str] = field(default_factory=list, metadata={
        "help": "comma-separated strings that end a response (like EOS; \\n escapes are decoded)"})
    generation_batch_size: int = opt(0, "prompts sampled together (0 = the whole rollout at once)", ge=0)
    backend: str = opt("hf", "rollout generation: hf (Hugging Face generate) or vllm (GPU, needs vllm; the "
                       "policy's weights are copied into it every iteration)", choices=["hf", "vllm"])
    unfinished_penalty: float = opt(0.0, "subtracted from the score of a response that ends neither with EOS nor "
                                    "a stop string within max_new_tokens")
    # -- rewards
    kl_estimator: str = opt("k1", "per-token KL penalty estimator: k1 (log ratio, unbiased, the classic RLHF "
                            "penalty) or k3 (unbiased and >= 0, lower variance)", choices=["k1", "k3"])
    kl_coef: float = opt(0.05, "KL penalty coefficient beta (the starting value when target_kl > 0)", ge=0)
    target_kl: float = opt(0.0, "adaptive KL controller (Ziegler et al. 2019): steer the KL per response (nats) "
                           "to this target; 0 = a fixed kl_coef", ge=0)
    kl_horizon: float = opt(10000, "adaptive KL controller horizon, in responses", gt=0)
    reward_normalization: str = opt("none", "normalise scores: none; running (running mean/std of the scores "
                                    "seen so far); stats (the reward model's reward_stats.json)",
                                    choices=["none", "running", "stats"])
    reward_clip: float = opt(0.0, "clip (normalised) scores to [-c, c] (0 = off)", ge=0)
    whiten_rewards: bool = opt(False, "rescale the per-token rewards to unit variance before GAE")
    # -- update
    gamma: float = opt(1.0, "discount", ge=0, le=1)
    lam: float = opt(0.95, "GAE lambda", ge=0, le=1)
    whiten_advantages: bool = opt(True, "normalise advantages to zero mean, unit variance over real tokens")
    clip_range: float = opt(0.2, "PPO policy ratio clip epsilon", gt=0)
    clip_range_value: float = opt(0.2, "value clip around the rollout-time values (0 = no clipping)", ge=0)
    vf_coef: float = opt(0.1, "weight of the value loss", ge=0)
    entropy_coef: float = opt(0.0, "weight of the entropy bonus (0 = off; entropy is still logged)", ge=0)
    # -- evaluation and logging
    eval_greedy: bool = opt(False, "held-out generations by greedy decoding (default: sampled at the rollout "
                            "temperature with a fixed seed, so the KL estimate is unbiased)")
    log_samples: int = opt(4, "sample responses written to samples.jsonl each iteration (and at each evaluation)", ge=0)


@dataclass
class GRPOConfig(TrainConfig):
    """Critic-free online RL (``alignlab grpo``): GRPO, Dr. GRPO, RLOO and REINFORCE++ in one trainer. One
    *iteration* samples ``group_size`` responses for each of ``prompts_per_iteration`` prompts, scores them, turns
    the scores into advantages with a baseline from the group (or the batch), then makes ``update_epochs`` passes
    of ``num_mini_batches`` optimizer steps over the rollout. No value model; no reference when ``beta = 0``.
    ``epochs``, ``max_steps`` and ``grad_accum`` are not used (micro-batches hold ``batch_size`` responses)."""

    output_dir: str = opt("runs/grpo", "run folder: config.yaml, metrics.jsonl, samples.jsonl, checkpoints/, final/")
    policy: str = opt("", "the policy to train (an alias of --model)")
    lr: float = opt(1e-6, "peak learning rate (AdamW), > 0; LoRA or the tiny lab runs want ~1e-4 or more")
    schedule: str = opt("constant", "learning-rate decay over the run's optimizer steps",
                        choices=["cosine", "linear", "constant"])
    warmup_ratio: float = opt(0.0, "fraction of optimizer steps spent in linear warmup, in [0, 1)")
    batch_size: int = opt(8, "responses per forward/backward micro-batch (>= 1)")
    max_tokens: int = opt(0, "not used by GRPO: its micro-batches hold batch_size responses")
    # -- prompts
    prompts: str = opt("", "training prompts: .txt (one per line), a JSON/JSONL list, any instruction or preference "
                       "file (its prompts), or task:NAME:train (e.g. task:arithmetic:train)")
    eval_prompts: str = opt("", "held-out prompts (same formats); empty = eval_fraction of --prompts")
    eval_fraction: float = opt(0.1, "fraction of --prompts held out when --eval-prompts is empty, in [0, 1) (0 = "
                               "none)")
    limit: int = opt(0, "read at most N prompts (0 = all)")
    template: str = opt("auto", "how a prompt is rendered: auto (the chat template when the tokenizer has one, else "
                        "alpaca for instruction records and none for text), chat, alpaca, none",
                        choices=["auto", "chat", "alpaca", "none"])
    max_prompt_length: int = opt(512, "longest prompt in tokens, >= 1 (prompt + max_new_tokens must also fit the "
                                 "model's context)")
    long_prompts: str = opt("error", "a prompt that does not fit: error (naming it) or drop (counted)",
                            choices=["error", "drop"])
    # -- reward and reference
    reward: str = opt("", "reward: comma list of Python functions module:function or file.py:function, "
                      "f(prompts, responses) -> list[float], and/or task:NAME (a built-in task's verifiable "
                      "reward, e.g. task:arithmetic); combined with --reward-weights")
    reward_weights: list[float] = field(default_factory=list, metadata={
        "help": "comma list of weights, one per --reward entry (default: all 1.0); the reward is their weighted sum"})
    reward_model: str = opt("", "or a reward model: an alignlab rm folder or any HF sequence-classification "
                            "checkpoint (added to --reward with weight 1 when both are given)")
    reward_batch_size: int = opt(16, "sequences per reward-model forward pass (>= 1)")
    reference: str = opt("", "reference model for the KL term; empty = the starting policy (with LoRA: the policy "
                         "with its adapter disabled); not loaded at all when beta = 0")
    # -- rollout
    iterations: int = opt(20, "iterations (rollout -> score -> advantages -> update), >= 1")
    prompts_per_iteration: int = opt(4, "prompts sampled per iteration on each process (>= 1); the rollout holds "
                                     "prompts_per_iteration x group_size responses")
    group_size: int = opt(8, "responses sampled per prompt (>= 2 for grpo, dr_grpo, rloo; >= 1 for reinforce_pp)")
    num_mini_batches: int = opt(1, "optimizer steps per pass over the rollout (>= 1; a group is never split)")
    update_epochs: int = opt(1, "passes over each rollout (>= 1); after the first the importance ratio to the "
                             "rollout policy is clipped")
    max_new_tokens: int = opt(64, "longest response in tokens (>= 1); also L of loss_aggregation=constant")
    temperature: float = opt(1.0, "sampling temperature (> 0); log-probs are taken at the same temperature")
    top_p: float = opt(1.0, "nucleus sampling threshold in (0, 1] (1 = off)")
    top_k: int = opt(0, "top-k sampling (0 = off)")
    stop_strings: list[str] = field(default_factory=list, metadata={
        "help": "comma-separated strings that end a response (like EOS; \\n escapes are decoded)"})
    generation_batch_size: int = opt(0, "prompts sampled together (0 = the whole rollout at once)")
    backend: str = opt("hf", "rollout generation: hf (Hugging Face generate) or vllm (GPU, needs vllm; the policy's "
                       "weights are copied into it every iteration)", choices=["hf", "vllm"])
    # -- advantages and loss
    advantage: str = opt("grpo", "advantage estimator: grpo (group mean and std), dr_grpo (group mean only), rloo "
                         "(leave-one-out mean), reinforce_pp (batch-normalised returns, KL in the reward)",
                         choices=["grpo", "dr_grpo", "rloo", "reinforce_pp"])
    loss_aggregation: str = opt("auto", "how per-token losses become one number: token_mean (DAPO), sequence_mean "
                                "(GRPO), constant (sum / (responses x max_new_tokens), Dr. GRPO); auto = "
                                "sequence_mean for grpo, constant for dr_grpo, token_mean otherwise",
                                choices=["auto", "token_mean", "sequence_mean", "constant"])
    clip_low: float = opt(0.2, "importance-ratio clip below 1: 1 - clip_low, in [0, 1)")
    clip_high: float = opt(0.2, "importance-ratio clip above 1: 1 + clip_high, >= 0 (DAPO's clip-higher: 0.28)")
    beta: float = opt(0.0, "KL coefficient to the reference, >= 0; 0 = no KL and no reference in memory")
    kl_in: str = opt("auto", "where the KL goes: loss (k3 estimator, GRPO), reward (k1 per token, subtracted from "
                     "the reward; RLOO, REINFORCE++); auto = reward for rloo and reinforce_pp, loss otherwise",
                     choices=["auto", "loss", "reward"])
    dynamic_sampling: bool = opt(True, "drop groups whose rewards are all equal (no signal; DAPO), counted in the "
                                 "log as dropped_groups")
    overlong: str = opt("none", "responses cut at max_new_tokens: none (kept), filter (masked out of the loss, "
                        "counted as filtered_overlong), penalty (overlong_penalty subtracted from their reward)",
                        choices=["none", "filter", "penalty"])
    overlong_penalty: float = opt(1.0, "with overlong=penalty: subtracted from the reward, >= 0")
    importance_correction: str = opt("auto", "truncated importance sampling for a sampler that differs from the "
                                     "trained model (the bf16 sampling copy, vLLM): the mismatch is measured and "
                                     "logged every iteration and each token's loss weighted by min(ratio, "
                                     "importance_cap); auto = on where they differ, off = measure nothing",
                                     choices=["auto", "off"])
    importance_cap: float = opt(2.0, "cap C of the truncated importance weights, > 0")
    # -- evaluation and logging
    eval_greedy: bool = opt(True, "held-out answers by greedy decoding (default, the usual accuracy protocol); "
                            "false = sampled at the rollout temperature with a fixed seed")
    log_samples: int = opt(4, "sample responses written to samples.jsonl each iteration (and at each evaluation)")


# ----------------------------------------------------------------------------------------------- sampling


@dataclass
class SampleConfig(Checked):
    """What to sample from and how to score it (shared by ``bon`` and ``rs``)."""

    prompts: str = opt("", "prompts: .txt (one per line) or any instruction/preference file")
    reward_model: str = opt("", "reward model folder (from alignlab rm train)")
    reward: str = opt("", "or a Python reward function module:function(prompts, responses) -> scores")
    n: int = opt(4, "samples per prompt", ge=1)
    template: str = opt("chat", "how prompts are rendered", choices=["chat", "alpaca", "none"])
    temperature: float = opt(1.0, "sampling temperature", ge=0)
    top_p: float = opt(1.0, "nucleus sampling threshold", gt=0, le=1)
    max_new_tokens: int = opt(64, "tokens generated per sample", ge=1)
    max_prompt_tokens: int = opt(512, "prompts longer than this are skipped (counted)", ge=1)
    gen_batch_size: int = opt(32, "sequences generated together", ge=1)
    backend: str = opt("hf", "generation: hf (Hugging Face generate) or vllm (GPU, needs vllm)",
                       choices=["hf", "vllm"])
    limit_prompts: int = opt(0, "use at most N prompts (0 = all)", ge=0)
    on_bad_score: str = opt("stop", "a sample whose reward fails or is NaN: stop, or skip it (counted)",
                            choices=["stop", "skip"])
    gold: str = opt("", "optional second scorer module:function that judges the results (e.g. a gold score "
                        "next to a learned reward model)")


@dataclass
class BoNConfig(SampleConfig):
    """Best-of-n at inference."""

    model: str = opt("smollm2-135m-instruct", "the policy to sample from")
    output_dir: str = opt("runs/bon", "folder for samples.jsonl and summary.json")
    seed: int = opt(0, "sampling seed")
    allow_pickle: bool = opt(False, "allow pickle-based weights (unsafe)")


@dataclass
class RSConfig(SampleConfig, SFTConfig):
    """Rejection-sampling fine-tuning: the SFT options apply to every round's fine-tuning."""

    output_dir: str = opt("runs/rs", "run folder: round-N/{samples,kept}.jsonl, round-N/sft/, final/")
    rounds: int = opt(2, "rounds of sample -> select -> fine-tune", ge=1)
    select: str = opt("best", "which samples to keep per prompt", choices=["best", "top_k", "threshold"])
    top_k: int = opt(1, "with select=top_k: how many to keep per prompt", ge=1)
    threshold: float = opt(0.0, "with select=threshold: keep samples scoring at least this")
    data: str = opt("", "(unused: rejection sampling makes its own data)")
    eval_prompts: str = opt("", "held-out prompts: the start and every round's policy answer them once, scored "
                                "by the same reward, with KL from the start model (empty = no evaluation)")
    eval_seed: int = opt(1234, "sampling seed of the held-out answers (the same for every round)")


# ----------------------------------------------------------------------------------------------- the lab


ALL_METHODS = ["ppo", "ppo_nokl", "grpo", "rloo", "dpo", "ipo", "simpo", "rs", "bon"]
PAIRWISE_METHODS = ("dpo", "ipo", "simpo")  # learn from the preference pairs directly, no reward model
GROUP_METHODS = ("grpo", "rloo")  # critic-free online RL (alignlab grpo): group baselines, no value model
CHECKPOINTING_METHODS = ("ppo", "ppo_nokl", *GROUP_METHODS, *PAIRWISE_METHODS)  # evaluated along training
VERIFIABLE_METHODS = ["ppo", "grpo", "rloo", "rs", "bon"]  # the default methods on a task with a checked reward
MODELS_IN_MEMORY = {  # what each method holds while training (with LoRA the reference is the adapter-off policy)
    "sft": "1 (policy)",
    "ppo": "4 roles: policy, reference, reward, value (reference = policy without adapter with LoRA; value = a "
           "head on the policy with ppo_share_backbone), and a bf16 copy of the policy for sampling",
    "ppo_nokl": "4 roles, as ppo (the reference is not needed at beta = 0; kept for logging the KL)",
    "grpo": "2 or 3: policy, reward (no value model; the reference only at grpo_beta > 0, the adapter-off policy "
            "with LoRA), and a bf16 copy of the policy for sampling",
    "rloo": "2 or 3: policy, reward (no value model; the reference only at grpo_beta > 0), and a bf16 copy of the "
            "policy for sampling",
    "dpo": "2: policy, reference (adapter-off policy with LoRA)",
    "ipo": "2: policy, reference (adapter-off policy with LoRA)",
    "simpo": "1: policy (reference-free)",
    "rs": "2: policy, reward model (and a bf16 copy of the policy for sampling)",
    "bon": "2 at inference: policy, reward model",
}


@dataclass
class LabConfig(Checked):
    """One lab run: a task, a base model, the methods and their budgets."""

    name: str = opt("demo", "run name: the report goes to OUTPUT_ROOT/NAME/report.md")
    output_root: str = opt("runs", "folder holding lab runs")
    task: str = opt("sentiment", "task: a built-in name or module:function returning a Task")
    prompts: str = opt("", "replace the task's prompts with this file (e.g. IMDb review prefixes)")
    model: str = opt("smollm2-135m-instruct", "base model")
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS),
                               metadata={"help": f"methods to compare (comma list of {', '.join(ALL_METHODS)}); on a "
                                       "task with a verifiable reward (arithmetic) the default is "
                                       f"{', '.join(VERIFIABLE_METHODS)}"})
    seed: int = opt(0, "one seed for everything")
    n_eval: int = opt(64, "held-out prompts for evaluation", ge=1)
    eval_answers: int = opt(4, "answers sampled per held-out prompt (temperature 1): intervals treat the prompt as "
                            "the unit, so more answers narrow them by averaging out sampling noise", ge=1)
    curve_answers: int = opt(2, "answers per held-out prompt for the checkpoints along training (curve_points): "
                             "fewer than the final models' eval_answers, as these points cost an evaluation each",
                             ge=1)
    n_train: int = opt(48, "training prompts used by every method", ge=1)
    lora: bool = opt(True, "train LoRA adapters (r=16) instead of all weights")
    max_new_tokens: int = opt(32, "response length for sampling (annotation, PPO, RS, BoN, evaluation)", ge=1)
    gen_batch_size: int = opt(144, "sequences generated together (PPO: at most its rollout); larger batches decode "
                              "more tokens per pass over the weights (measured in BENCHMARKS.md)",
                              ge=1)
    # SFT
    sft_steps: int = opt(8, "SFT optimizer steps on the task demonstrations", ge=1)
    sft_lr: float = opt(5e-4, "SFT learning rate", gt=0)
    # preference data
    k_annotate: int = opt(6, "answers sampled per training prompt for the annotators to rank", ge=2)
    annotator_temperature: float = opt(0.1, "annotator noise: Plackett-Luce temperature on the gold score", gt=0)
    # reward model
    rm_steps: int = opt(48, "reward-model optimizer steps", ge=1)
    rm_lr: float = opt(3e-3, "reward-model learning rate", gt=0)
    rm_batch_size: int = opt(4, "rankings (prompts with all their answers) per reward-model step", ge=1)
    # DPO family
    dpo_steps: int = opt(24, "optimizer steps for dpo, ipo and simpo", ge=1)
    dpo_lr: float = opt(1e-3, "learning rate for dpo, ipo and simpo", gt=0)
    dpo_beta: float = opt(0.15, "DPO's beta", gt=0)
    ipo_beta: float = opt(0.5, "IPO's beta (tau): it pulls the log-ratio margin to 1/(2 tau), so a small tau lets it "
                          "drift far (docs/lab.md)", gt=0)
    dpo_batch_size: int = opt(3, "rankings per dpo, ipo and simpo step, each with all its pairs (15 for 6 answers, "
                              "each answer encoded once): about the sequences of 8 separate pairs", ge=1)
    # PPO
    ppo_iterations: int = opt(8, "PPO iterations (rollouts)", ge=1)
    ppo_rollout: int = opt(48, "responses per PPO rollout", ge=1)
    ppo_lr: float = opt(1e-3, "PPO learning rate", gt=0)
    ppo_kl_coef: float = opt(0.05, "KL penalty coefficient of the 'ppo' method (ppo_nokl uses 0)", ge=0)
    ppo_nokl_iterations: int = opt(24, "iterations of 'ppo_nokl' (PPO at beta = 0): 3x ppo_iterations, because the "
                                   "penalized run levels off (11-13 nats in the demo) while the unpenalized one "
                                   "needs the length to show the gold's fall while the proxy still rises "
                                   "(reward hacking; at 24 it drifted to 59 nats)", ge=1)
    ppo_epochs: int = opt(2, "PPO passes over each rollout", ge=1)
    ppo_responses_per_prompt: int = opt(4, "PPO responses per prompt in a rollout (each prompt encoded once for "
                                        "them)", ge=1)
    ppo_share_backbone: bool = opt(True, "PPO value head on the policy's backbone instead of a separate value "
                                   "model (about half the update's compute)")
    # GRPO / RLOO (critic-free; the same rollout size and prompts as PPO)
    grpo_iterations: int = opt(8, "GRPO and RLOO iterations (rollouts of ppo_rollout responses), >= 1")
    grpo_group_size: int = opt(4, "GRPO and RLOO responses per prompt (the group that is the baseline), >= 2")
    grpo_lr: float = opt(1e-3, "GRPO and RLOO learning rate, > 0")
    grpo_beta: float = opt(0.05, "GRPO and RLOO KL coefficient (GRPO: k3 in the loss; RLOO: k1 in the reward), >= 0; "
                           "0 = no reference in memory")
    grpo_epochs: int = opt(2, "GRPO and RLOO passes over each rollout (the ratio clipped after the first), >= 1")
    # rejection sampling / best-of-n
    rs_rounds: int = opt(2, "rejection-sampling rounds: sample from the current policy, keep the best, fine-tune "
                            "(the next round samples from the fine-tuned model)", ge=1)
    rs_n: int = opt(6, "samples per prompt in each rejection-sampling round", ge=1)
    rs_steps: int = opt(8, "SFT steps on each round's kept samples", ge=1)
    rs_lr: float = opt(2e-3, "rejection-sampling fine-tuning learning rate", gt=0)
    bon_n: int = opt(8, "largest n of best-of-n (the curve covers 1, 2, 4, ... n)", ge=1)
    batch_size: int = opt(16, "training micro-batch size for every method", ge=1)
    curve_points: int = opt(2, "checkpoints along each method's training (evenly spaced, besides its end) evaluated "
                            "on the held-out prompts like the final models: the frontier plot's lines "
                            "(rejection sampling: the ends of its rounds); 0 = final models only", ge=0)
    nokl_curve_points: int = opt(5, "checkpoints along ppo_nokl's training evaluated on the held-out prompts (in "
                                 "place of curve_points): enough to see the gold's peak and its fall with their "
                                 "intervals (the overoptimization plot); 0 = final model only", ge=0)
    progress: bool = opt(True, "show progress bars")


def quick_config(**overrides: Any) -> LabConfig:
    """The ``--quick`` lab: the tiny model and small budgets (about a minute; used in the test suite)."""
    base = dict(name="quick", model="tiny-random", n_eval=8, eval_answers=2, curve_answers=1, n_train=8,
                max_new_tokens=8, sft_steps=3,
                sft_lr=3e-3, k_annotate=3, rm_steps=3, rm_lr=3e-3, dpo_steps=2, dpo_lr=3e-3, ppo_iterations=2,
                ppo_nokl_iterations=3, ppo_rollout=8, ppo_lr=3e-3, grpo_iterations=2, grpo_lr=3e-3, rs_n=3,
                rs_steps=2, rs_lr=3e-3, bon_n=4, batch_size=8, gen_batch_size=48, lora=False)
    base.update(overrides)
    return LabConfig(**base)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- the study


class Sweep(NamedTuple):
    """A method's KL control in a study: the study's list option, the lab option it sets, and its name in a stage's
    name (``dpo@beta=0.5``)."""

    option: str
    lab_field: str
    label: str


STUDY_SWEEPS = {
    "ppo": Sweep("ppo_kl_coefs", "ppo_kl_coef", "kl_coef"),
    "dpo": Sweep("dpo_betas", "dpo_beta", "beta"),
    "ipo": Sweep("ipo_betas", "ipo_beta", "beta"),
    "grpo": Sweep("grpo_betas", "grpo_beta", "beta"),
    "rloo": Sweep("grpo_betas", "grpo_beta", "beta"),
    "rs": Sweep("rs_ns", "rs_n", "n"),
}  # ppo_nokl and simpo have no KL control (one run each); best-of-n's curve over n is its sweep
STUDY_OWN_FIELDS = ("name", "output_root", "seed", "methods")  # the study sets these in each seed's LabConfig


@dataclass
class _StudyOptions(Checked):
    """The study's own options; :data:`StudyConfig` adds every other :class:`LabConfig` option (each seed's lab)."""

    name: str = opt("study", "study name: the report goes to OUTPUT_ROOT/NAME/study.md, seed S's lab to "
                    "OUTPUT_ROOT/NAME/seed-S")
    output_root: str = opt("runs", "folder holding studies and lab runs")
    seeds: list[int] = opt([0, 1, 2], "seeds, one lab each (comma list of distinct integers; at least 2 for "
                           "intervals across seeds)")
    methods: list[str] = opt(["ppo", "dpo", "ipo", "rs", "bon", "grpo", "rloo"],
                             f"methods to compare (comma list of {', '.join(ALL_METHODS)}; ppo_nokl and simpo have "
                             "no KL control and run once)")
    ppo_kl_coefs: list[float] = opt([0.02, 0.05, 0.2], "ppo's KL penalty coefficients (comma list)", ge=0)
    dpo_betas: list[float] = opt([0.05, 0.15, 0.5], "dpo's betas (comma list)", gt=0)
    ipo_betas: list[float] = opt([0.25, 0.5, 1.0], "ipo's betas (tau; comma list)", gt=0)
    grpo_betas: list[float] = opt([0.02, 0.05, 0.2], "grpo's and rloo's KL coefficients (comma list)", ge=0)
    rs_ns: list[int] = opt([2, 6], "rejection sampling's samples per prompt (comma list)", ge=1)
    kl_budgets: list[float] = opt([2.0, 5.0, 10.0], "KL budgets of the verdict table, nats (comma list)", gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()  # types, and the options that are single values
        check_study_lists(self)

    def lab_config(self, seed: int) -> LabConfig:
        """Seed ``seed``'s lab: OUTPUT_ROOT/NAME/seed-S, the study's methods and every other lab option."""
        shared = {f.name: copy_value(getattr(self, f.name)) for f in dataclasses.fields(LabConfig)
                  if f.name not in STUDY_OWN_FIELDS}
        return LabConfig(name=f"{self.name}/seed-{seed}", output_root=self.output_root, seed=seed,
                         methods=list(self.methods), **shared)


def copy_value(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def check_study_lists(cfg: Any) -> None:
    """The study's list options: every value in its range, no empty or repeated seeds, known methods, a non-empty
    sweep for each chosen method, and at least one KL budget (each finite and > 0)."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        inner = get_args(hints[f.name])
        if get_origin(hints[f.name]) is list and inner and inner[0] in (int, float):
            for value in getattr(cfg, f.name):
                check_value(f.name, value, inner[0], f.metadata)
    if not cfg.seeds:
        raise AlignlabError("a study needs at least 1 seed", field="seeds")
    repeated = sorted(s for s, n in Counter(cfg.seeds).items() if n > 1)
    if repeated:
        raise AlignlabError(f"seeds {repeated} are repeated (each seed is one lab)", field="seeds")
    unknown = [m for m in cfg.methods if m not in ALL_METHODS]
    if unknown or not cfg.methods:
        raise AlignlabError(f"unknown methods {unknown} (choose from {', '.join(ALL_METHODS)})" if unknown
                            else "no methods to compare", field="methods")
    if len(set(cfg.methods)) < len(cfg.methods):
        raise AlignlabError(f"methods {cfg.methods} name one twice", field="methods")
    for method in cfg.methods:
        sweep = STUDY_SWEEPS.get(method)
        if sweep and not getattr(cfg, sweep.option):
            raise AlignlabError(f"method {method} is chosen but its sweep is empty (give at least one "
                                f"{sweep.lab_field})", field=sweep.option)
    if not cfg.kl_budgets:
        raise AlignlabError("give at least one KL budget (nats)", field="kl_budgets")


def _lab_fields_for_study() -> list[tuple[str, Any, Any]]:
    """Every :class:`LabConfig` field but :data:`STUDY_OWN_FIELDS`, with its type, default and help."""
    hints = _hints(LabConfig)
    return [(f.name, hints[f.name], field(default=f.default, default_factory=f.default_factory,  # type: ignore
                                          metadata=f.metadata))
            for f in dataclasses.fields(LabConfig) if f.name not in STUDY_OWN_FIELDS]


# A study's options: its own (seeds, methods, sweeps, budgets), then every lab option with the lab's default, so
# a sweep value equal to the demo's default is the demo's own stage (the same key). Built from LabConfig's fields
# rather than copied, so a new lab option is a study option at once.
StudyConfig = dataclasses.make_dataclass(
    "StudyConfig", _lab_fields_for_study(), bases=(_StudyOptions,),
    namespace={"__module__": __name__, "__doc__": "A study (``alignlab lab study``): every method's reward/KL "
               "frontier traced by sweeping its KL control, one lab per seed, compared at KL budgets."})


def quick_study_config(**overrides: Any) -> Any:
    """The ``--quick`` study: :func:`quick_config`'s tiny model and budgets, two seeds, two values of ppo's and
    dpo's KL control, best-of-n, and budgets the tiny model's methods reach (best-of-n with n = 4 reaches
    log 4 - 3/4 = 0.64 nats). Under a minute; used in the test suite."""
    lab = {k: v for k, v in dataclasses.asdict(quick_config()).items() if k not in STUDY_OWN_FIELDS}
    base = dict(lab, name="study-quick", seeds=[0, 1], methods=["ppo", "dpo", "bon"], ppo_kl_coefs=[0.05, 0.5],
                dpo_betas=[0.15, 0.5], kl_budgets=[0.1, 0.5])
    base.update(overrides)
    return StudyConfig(**base)
