"""Reward models in use: score (prompt, response) pairs with a trained reward model or a plain Python function.

PPO, rejection sampling and the lab all ask one question, "how good is this response to this prompt?", through
one interface::

    scorer = load_scorer("runs/rm/final")            # a reward-model folder (alignlab rm train)
    scorer = load_scorer("my_rewards.py:length")      # or a function f(prompts, responses) -> list[float]
    scorer.score(prompts, responses)                  # -> list[float], one per pair

How a reward model scores (the conventions :mod:`alignlab.train.reward_model` trains with):

- The sequence is ``prompt_ids + completion_ids`` from :func:`~alignlab.data.tokenize.encode_prompt_completion`
  (with the template the model was trained with), so it ends with the EOS token.
- Batches are right-padded. The score head (``AutoModelForSequenceClassification``, ``num_labels=1``) reads the
  rightmost token that is not ``pad_token_id``; that is the last real token only if no sequence ends with the pad
  token. With ``pad == eos`` it would silently read the token before the final EOS, so
  :func:`prepare_reward_tokenizer` gives the tokenizer a pad token distinct from EOS and :func:`pad_right`
  refuses a sequence that ends with the pad token.
- Sequences are sorted by length before batching, so little compute goes to padding; scores come back in the
  caller's order.
- ``reward_stats.json`` beside the weights holds the mean and std of the training responses' scores (for
  normalising rewards in PPO: ``load_scorer(path, normalize=True)``) and how sequences were encoded (template,
  max_length, truncation).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import numbers
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from alignlab.data.tokenize import (
    LONGER_THAN_MAX_LENGTH,
    PROMPT_FILLS_MAX_LENGTH,
    SHARED_PREFIX_MIN,
    encode_prompt_completion,
    shared_prefix_length,
)
from alignlab.errors import AlignlabError

__all__ = [
    "REWARD_STATS_FILE",
    "FunctionScorer",
    "ModelScorer",
    "Scorer",
    "fit_to_length",
    "load_scorer",
    "pad_right",
    "prepare_reward_tokenizer",
    "ranking_agreement",
    "resolve_template",
    "reward_stats",
    "score_data",
    "score_last_token",
    "score_sequences",
]

REWARD_STATS_FILE = "reward_stats.json"
Prompt = str | list[dict[str, str]]

# ----------------------------------------------------------------------------------------------- sequences


def prepare_reward_tokenizer(tokenizer: Any) -> Any:
    """Make sure ``tokenizer`` has a pad token distinct from EOS (in place; returned for chaining).

    Every scored sequence ends with EOS; if EOS were also the pad token, the score head would read the token
    before it. A tokenizer whose pad is missing or equal to EOS gets its UNK or BOS token as pad (any id
    works at padding positions: right padding is masked out and never attended to).

    Raises:
        AlignlabError: the tokenizer has no token that can serve (add a pad token to the checkpoint).
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return tokenizer
    for candidate in (tokenizer.unk_token, tokenizer.bos_token):
        if candidate is not None and tokenizer.convert_tokens_to_ids(candidate) != eos:
            tokenizer.pad_token = candidate
            return tokenizer
    raise AlignlabError(
        "the tokenizer's pad token is its EOS token and it has no other special token to pad with; a reward "
        "model would score the token before the final EOS. Add a pad token to the checkpoint's tokenizer",
        field="pad_token",
    )


def resolve_template(template: str, prompt: Prompt) -> str:
    """``"auto"`` -> ``"chat"`` for a prompt given as messages, ``"none"`` for text; other names unchanged."""
    if template == "auto":
        return "chat" if isinstance(prompt, list) else "none"
    return template


def fit_to_length(
    prompt_ids: list[int], completion_ids: list[int], *, max_length: int, truncation: str, bos_token_id: int | None
) -> tuple[list[int] | None, str | None]:
    """One scored sequence (``prompt_ids + completion_ids``) cut to ``max_length`` tokens.

    Policies:
        ``"right"``: keep the first ``max_length`` tokens (the response loses its end and its EOS);
            dropped (:data:`PROMPT_FILLS_MAX_LENGTH`) when the prompt alone fills ``max_length``.
        ``"left"``: keep the last ``max_length`` tokens, so the response and its EOS stay whole and the prompt
            loses its start (a leading BOS is kept).
        ``"drop"``: drop the sequence (:data:`LONGER_THAN_MAX_LENGTH`).

    Returns:
        ``(ids, None)`` when it fits as it is, ``(cut ids, "truncated")`` when it was cut, or
        ``(None, reason)`` when it is dropped.
    """
    ids = prompt_ids + completion_ids
    if len(ids) <= max_length:
        return ids, None
    if truncation == "drop":
        return None, LONGER_THAN_MAX_LENGTH
    if truncation == "right":
        if len(prompt_ids) >= max_length:
            return None, PROMPT_FILLS_MAX_LENGTH
        return ids[:max_length], "truncated"
    if truncation == "left":
        if bos_token_id is not None and ids[:1] == [bos_token_id] and max_length > 1:
            return [bos_token_id, *ids[len(ids) - max_length + 1 :]], "truncated"
        return ids[len(ids) - max_length :], "truncated"
    raise AlignlabError(f"unknown truncation {truncation!r} (expected right, left or drop)", field="truncation")


def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``input_ids`` and ``attention_mask``, both ``(n, t)`` long.

    Raises:
        AlignlabError: a sequence is empty or ends with ``pad_token_id`` (the score head would then read an
            earlier token than the last real one).
    """
    if pad_token_id is None:
        raise AlignlabError("the tokenizer has no pad token; a reward model needs one", field="pad_token")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if len(ids) == 0:
            raise AlignlabError(f"sequence {row} is empty; nothing to score")
        if ids[-1] == pad_token_id:
            raise AlignlabError(
                f"sequence {row} ends with the pad token (id {pad_token_id}), so the score head would read an "
                "earlier token; use a pad token distinct from EOS (prepare_reward_tokenizer)",
                field="pad_token",
            )
        input_ids[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def score_last_token(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward of each right-padded sequence: the score head's value at its last real token.

    Args:
        model: an ``AutoModelForSequenceClassification`` with ``num_labels=1`` (possibly LoRA- or
            DDP-wrapped) whose ``config.pad_token_id`` is the padding id of ``input_ids``.
        input_ids: ``(n, t)`` right-padded (:func:`pad_right`).
        attention_mask: ``(n, t)`` 1 on real tokens.

    Returns:
        ``(n,)`` float32 rewards (with gradients when enabled).
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits[:, 0].float()


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    autocast: Any = None,
) -> list[float]:
    """Rewards of many token sequences, in their order: sorted by length and batched (less padding), no grad.

    ``autocast`` is an optional context-manager factory (e.g. ``accelerator.autocast``).
    """
    if batch_size < 1:
        raise AlignlabError(f"batch_size must be positive, found {batch_size}", field="batch_size")
    was_training = model.training
    model.eval()
    device = device if device is not None else next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        with autocast() if autocast is not None else nullcontext():
            rewards = _score_batch(model, [sequences[i] for i in chunk], pad_token_id, device)
        for i, value in zip(chunk, rewards.tolist()):
            out[i] = value
    if was_training:
        model.train()
    return out


def _score_batch(model: torch.nn.Module, sequences: list[Sequence[int]], pad_token_id: int,
                 device: torch.device | str) -> torch.Tensor:
    """:func:`score_last_token` of a batch, with the sequences' common prefix (a template's preamble: the lab's
    Alpaca text is 44 tokens of ~85) encoded once and its KV cache copied to every row where the model allows
    (:func:`~alignlab.generation.forward_after_prefix`); the same scores up to float rounding."""
    from alignlab.generation import forward_after_prefix

    shared = shared_prefix_length(sequences)
    if len(sequences) > 1 and shared >= SHARED_PREFIX_MIN:
        input_ids, attention_mask = (x.to(device) for x in pad_right([s[shared:] for s in sequences], pad_token_id))
        positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)  # right padding
        out = forward_after_prefix(model, sequences[0][:shared], input_ids, attention_mask, positions)
        if out is not None:
            return out.logits[:, 0].float()
    input_ids, attention_mask = pad_right(sequences, pad_token_id)
    return score_last_token(model, input_ids.to(device), attention_mask.to(device))


def reward_stats(scores: Sequence[float]) -> dict[str, Any]:
    """Mean, std (population), count, min, max and the 5/25/50/75/95 % quantiles of ``scores``."""
    values = torch.tensor([float(s) for s in scores], dtype=torch.float64)
    if values.numel() == 0:
        return {"count": 0}
    qs = torch.quantile(values, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)).tolist()
    return {
        "mean": values.mean().item(),
        "std": values.std(unbiased=False).item(),
        "count": int(values.numel()),
        "min": values.min().item(),
        "max": values.max().item(),
        "quantiles": {"p05": qs[0], "p25": qs[1], "p50": qs[2], "p75": qs[3], "p95": qs[4]},
    }


# ----------------------------------------------------------------------------------------------- scorers


class Scorer:
    """Scores (prompt, response) pairs: ``score(prompts, responses) -> list[float]``, one per pair.

    Attributes:
        name: what scores (a model folder or ``module:function``), for messages and reports.
        stats: the training reward statistics of a reward model (``reward_stats.json``), or None.
    """

    name: str = ""
    stats: dict[str, Any] | None = None

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """One float per (prompt, response) pair, in order. A prompt is a string or a list of chat messages
        ``{role, content}`` ending with a user turn; a response is the assistant's text."""
        raise NotImplementedError

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        return self.score(prompts, responses)

    def _check_counts(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> None:
        if isinstance(prompts, str) or isinstance(responses, str):
            raise AlignlabError(f"{self.name}: give lists of prompts and responses, not a single string")
        if len(prompts) != len(responses):
            raise AlignlabError(f"{self.name}: {len(prompts)} prompts but {len(responses)} responses")


class ModelScorer(Scorer):
    """A reward model (score head on the last real token) as a :class:`Scorer`.

    Args:
        model: an ``AutoModelForSequenceClassification`` with ``num_labels=1`` (or a peft model around one).
        tokenizer: its tokenizer (a pad token distinct from EOS is set if needed).
        template: ``"auto"`` (chat for message prompts, none for text), ``"chat"``, ``"alpaca"`` or ``"none"``.
        max_length: the longest sequence scored; longer ones are cut by ``truncation``.
        truncation: ``"right"`` or ``"left"`` (``"drop"`` is scored as ``"left"``: every pair gets a score; so
            is a prompt that fills ``max_length`` under ``"right"``).
        batch_size: sequences per forward pass.
        device: where to run (default: CUDA when available, else CPU); the model is moved there.
        stats: training reward statistics (``mean``, ``std``) for ``normalize``.
        normalize: return ``(r - mean) / std``.
        name: shown in messages.
        precision: ``"fp32"`` or ``"bf16"`` (forward passes under bf16 autocast: faster on CPUs with
            native bf16; scores move by bf16 rounding).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        template: str = "auto",
        max_length: int = 1024,
        truncation: str = "right",
        batch_size: int = 16,
        device: torch.device | str | None = None,
        stats: dict[str, Any] | None = None,
        normalize: bool = False,
        name: str = "reward model",
        precision: str = "fp32",
    ) -> None:
        self.tokenizer = prepare_reward_tokenizer(tokenizer)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        base_config = getattr(model, "config", None)
        if base_config is not None and base_config.pad_token_id != self.tokenizer.pad_token_id:
            base_config.pad_token_id = self.tokenizer.pad_token_id
        self.template = template
        self.max_length = max_length
        self.truncation = "left" if truncation == "drop" else truncation
        self.batch_size = batch_size
        self.stats = stats
        self.name = name
        if normalize and not (stats and "mean" in stats and "std" in stats):
            raise AlignlabError(f"normalize needs the reward statistics ({REWARD_STATS_FILE}) of the model",
                                file=name)
        self.normalize = normalize
        self.precision = precision

    def encode(self, prompt: Prompt, response: str) -> list[int]:
        """The token ids the model scores for one (prompt, response) pair."""
        prompt_ids, completion_ids = encode_prompt_completion(
            self.tokenizer, prompt, response, template=resolve_template(self.template, prompt)
        )
        ids, _ = fit_to_length(prompt_ids, completion_ids, max_length=self.max_length,
                               truncation=self.truncation, bos_token_id=self.tokenizer.bos_token_id)
        if ids is None:  # the prompt fills max_length: keep the end instead (every pair gets a score)
            ids, _ = fit_to_length(prompt_ids, completion_ids, max_length=self.max_length, truncation="left",
                                   bos_token_id=self.tokenizer.bos_token_id)
        assert ids is not None
        return ids

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        self._check_counts(prompts, responses)
        sequences = []
        for index, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                sequences.append(self.encode(prompt, response))
            except AlignlabError as error:
                raise AlignlabError(f"{self.name}: item {index}: {error.message}", field=error.field) from error
        if not sequences:
            return []
        bf16 = self.precision == "bf16"
        autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        groups: dict[str, list[int]] = {}
        for index, prompt in enumerate(prompts):
            groups.setdefault(prompt if isinstance(prompt, str) else json.dumps(prompt), []).append(index)
        if len(groups) < len(sequences):  # several responses per prompt (best-of-n, rejection sampling)
            scores = self._score_shared(sequences, list(groups.values()), autocast)
        else:
            scores = score_sequences(self.model, sequences, self.tokenizer.pad_token_id,
                                     batch_size=self.batch_size, device=self.device, autocast=autocast)
        if self.normalize:
            assert self.stats is not None
            mean, std = float(self.stats["mean"]), max(float(self.stats["std"]), 1e-8)
            scores = [(s - mean) / std for s in scores]
        return scores

    @torch.no_grad()
    def _score_shared(self, sequences: list[list[int]], groups: list[list[int]], autocast: Any) -> list[float]:
        """Score sequences group by group (the indices of one prompt's responses), each group's common prefix
        encoded once (:func:`alignlab.train.forward.collate_shared_prompt`: the same scores as one sequence at a
        time); about ``batch_size`` responses per forward pass, whole groups."""
        from alignlab.train.forward import (
            collate_shared_prompt,
            shared_prompt_layout,
            shared_prompt_scores,
            split_shared_prefix,
        )

        layout = shared_prompt_layout(self.model)
        out = [0.0] * len(sequences)
        chunk: list[list[int]] = []
        for g, members in enumerate(groups):
            chunk.append(members)
            if g + 1 < len(groups) and sum(map(len, chunk)) + len(groups[g + 1]) <= self.batch_size:
                continue
            batch = collate_shared_prompt([split_shared_prefix([sequences[i] for i in m]) for m in chunk],
                                          self.tokenizer.pad_token_id, **layout)
            with autocast():
                scores = shared_prompt_scores(self.model, batch.to(self.device)).tolist()
            for i, value in zip([i for m in chunk for i in m], scores):
                out[i] = value
            chunk = []
        return out


class FunctionScorer(Scorer):
    """A plain Python function ``f(prompts, responses) -> list[float]`` as a :class:`Scorer`.

    The function is called once per :meth:`score` call with the whole lists. Everything it can get wrong
    (raising, returning the wrong number of scores, non-numbers, NaN or inf) is an :class:`AlignlabError`
    naming the function and the offending item.
    """

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn = fn
        self.name = name
        self.stats = None

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        self._check_counts(prompts, responses)
        prompts, responses = list(prompts), list(responses)
        try:
            out = self.fn(prompts, responses)
        except Exception as error:  # a user function may raise anything: name it and the item
            where = self._failing_item(prompts, responses)
            raise AlignlabError(
                f"reward function {self.name} raised {type(error).__name__}: {error}"
                + (f" (on item {where}: prompt {_short(prompts[where])})" if where is not None else "")
            ) from error
        return self._check_output(out, len(prompts), prompts)

    def _failing_item(self, prompts: list[Prompt], responses: list[str]) -> int | None:
        """The first item that raises on its own (only looked for after the batched call raised)."""
        if len(prompts) <= 1:
            return 0 if prompts else None
        for index, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                self.fn([prompt], [response])
            except Exception:
                return index
        return None

    def _check_output(self, out: Any, n: int, prompts: list[Prompt]) -> list[float]:
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().tolist() if out.ndim > 0 else out.item()
        elif hasattr(out, "tolist") and hasattr(out, "ndim"):  # numpy arrays
            out = out.tolist()
        if isinstance(out, (str, bytes, dict)) or not isinstance(out, Sequence):
            raise AlignlabError(
                f"reward function {self.name} returned {type(out).__name__}, expected a list of {n} numbers"
            )
        if len(out) != n:
            index = min(len(out), n)
            raise AlignlabError(
                f"reward function {self.name} returned {len(out)} scores for {n} (prompt, response) pairs "
                f"(item {index} {'has no score' if len(out) < n else 'is one too many'})"
            )
        scores = []
        for index, value in enumerate(out):
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise AlignlabError(
                    f"reward function {self.name}: item {index}: the score {value!r} ({type(value).__name__}) "
                    f"is not a number (prompt {_short(prompts[index])})"
                )
            value = float(value)
            if not math.isfinite(value):
                raise AlignlabError(
                    f"reward function {self.name}: item {index}: the score is {value} "
                    f"(prompt {_short(prompts[index])})"
                )
            scores.append(value)
        return scores


def _short(prompt: Prompt, width: int = 60) -> str:
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def load_scorer(
    spec: str | Path,
    *,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    normalize: bool = False,
    template: str | None = None,
    max_length: int | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    precision: str = "fp32",
) -> Scorer:
    """A :class:`Scorer` from a reward-model folder or a Python function.

    Args:
        spec: a reward-model folder (``final/`` of ``alignlab rm train``, merged or a LoRA adapter), or
            ``module:function`` where ``module`` is an importable module or a path to a ``.py`` file and
            ``function(prompts, responses)`` returns one number per pair.
        batch_size: sequences per forward pass (reward models).
        device: where a reward model runs (default: CUDA when available, else CPU).
        normalize: return ``(r - mean) / std`` with the model's ``reward_stats.json``.
        template: override the template recorded in ``reward_stats.json`` (default: recorded, else ``auto``).
        max_length: override the recorded max_length (default: recorded, else 1024).
        allow_pickle: allow pickle-based weights (unsafe with untrusted files).
        trust_remote_code: let transformers run code shipped with the checkpoint.
        precision: a reward model's forward precision, ``fp32`` or ``bf16`` (autocast); ``auto`` = bf16 where
            the hardware has it.

    Raises:
        AlignlabError: a missing folder or module, a checkpoint that is not a reward model, a function that
            does not exist or is not callable.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if not path.exists() and ":" in spec:
        module_name, _, function_name = spec.rpartition(":")
        return FunctionScorer(_load_function(module_name, function_name, spec), spec)
    return _load_model_scorer(spec, batch_size=batch_size, device=device, normalize=normalize, template=template,
                              max_length=max_length, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                              precision=precision)


def _load_function(module_name: str, function_name: str, spec: str) -> Callable[..., Any]:
    if not module_name or not function_name:
        raise AlignlabError("expected module:function or path/to/file.py:function", file=spec)
    if module_name.endswith(".py") or "/" in module_name:
        file = Path(module_name).expanduser()
        if not file.is_file():
            raise AlignlabError("reward function file does not exist", file=str(file))
        unique = "alignlab_reward_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
        loader_spec = importlib.util.spec_from_file_location(unique, file)
        if loader_spec is None or loader_spec.loader is None:
            raise AlignlabError("cannot import this file as Python", file=str(file))
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as error:
            raise AlignlabError(f"importing it raised {type(error).__name__}: {error}", file=str(file)) from error
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise AlignlabError(
                f"cannot import module {module_name!r} ({type(error).__name__}: {error}); give an importable "
                "module or a path to a .py file",
                file=spec,
            ) from error
    fn = getattr(module, function_name, None)
    if fn is None:
        raise AlignlabError(f"module {module_name!r} has no function {function_name!r}", file=spec)
    if not callable(fn):
        raise AlignlabError(f"{function_name!r} in {module_name!r} is not callable", file=spec)
    return fn


def _load_model_scorer(spec: str, *, batch_size: int, device: Any, normalize: bool, template: str | None,
                       max_length: int | None, allow_pickle: bool, trust_remote_code: bool,
                       precision: str) -> ModelScorer:
    from alignlab.models import bf16_matmul_weights, load_model, load_tokenizer, resolve_model, resolve_precision

    ref = Path(resolve_model(spec))
    _check_is_reward_model(ref, spec)
    stats_file = ref / REWARD_STATS_FILE
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else None
    encoding = (stats or {}).get("encoding", {})
    tokenizer = load_tokenizer(str(ref), trust_remote_code=trust_remote_code)
    prepare_reward_tokenizer(tokenizer)
    model = load_model(str(ref), head="score", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                       tokenizer=tokenizer)
    if resolve_precision(precision) == "bf16":  # the scorer only ever runs under bf16 autocast
        bf16_matmul_weights(model)
    return ModelScorer(
        model,
        tokenizer,
        template=template or encoding.get("template", "auto"),
        max_length=max_length or int(encoding.get("max_length", 1024)),
        truncation=encoding.get("truncation", "right"),
        batch_size=batch_size,
        device=device,
        stats=stats,
        normalize=normalize,
        name=spec,
        precision=resolve_precision(precision),
    )


def _check_is_reward_model(ref: Path, spec: str) -> None:
    """Refuse a checkpoint without a trained score head (a fresh head would score at random, silently)."""
    if not ref.is_dir():
        return  # a hub id: transformers decides
    adapter = ref / "adapter_config.json"
    if adapter.exists():
        task = json.loads(adapter.read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise AlignlabError(f"this LoRA adapter is for {task}, not a reward model (SEQ_CLS)", file=spec)
        return
    config = ref / "config.json"
    architectures = (json.loads(config.read_text()).get("architectures") or []) if config.exists() else []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise AlignlabError(
            f"not a reward model (architectures {architectures}); train one with `alignlab rm train`, or give "
            "module:function for a Python reward",
            file=spec,
        )


# ----------------------------------------------------------------------------------------------- rm score


def score_data(cfg: Any) -> Path:
    """``alignlab rm score``: write a scored copy of a data file (see :class:`~alignlab.config.RewardScoreConfig`).

    Preference files (pairs, rankings, OASST trees, HH transcripts) give one JSONL line per normalised record:
    ``{record, prompt, responses, rewards}`` with ``responses`` best first as the file ranks them and
    ``rewards`` the scorer's, plus the file's own ``scores``/``margin`` when it had them (so the copy is still
    ranking data in the file's order); the agreement of the rewards with that order (pairwise accuracy, and
    top-1 accuracy and Kendall's tau for rankings) is printed. Records with ``prompt`` and ``response`` (or
    ``completion``) are copied with a ``reward`` field added.
    """
    from alignlab.config import parse_columns
    from alignlab.data.io import read_records
    from alignlab.data.preference import detect_format, load_preferences

    if not cfg.model:
        raise AlignlabError("no scorer: pass --model RM_FOLDER or --model module:function", field="model")
    if not cfg.data:
        raise AlignlabError("no data: pass --data FILE", field="data")
    columns = parse_columns(cfg.columns)
    first = next(iter(read_records(cfg.data)), None)
    if first is None:
        raise AlignlabError("the data file holds no records", file=cfg.data)
    kind = detect_format(first[1], columns) if cfg.format == "auto" else cfg.format
    out = Path(cfg.output) if cfg.output else Path(Path(cfg.data).name.split(".")[0] + ".scored.jsonl")
    scorer = load_scorer(cfg.model, batch_size=cfg.batch_size, normalize=cfg.normalize,
                         template=cfg.template or None, max_length=cfg.max_length or None,
                         allow_pickle=cfg.allow_pickle)
    lines: list[dict[str, Any]] = []
    if kind is not None and kind != "unpaired":
        records, report = load_preferences(cfg.data, format=cfg.format, columns=columns,
                                           skip_invalid=cfg.skip_invalid, limit=cfg.limit or None)
        print(report.summary())
        prompts = [r.prompt for r in records for _ in r.responses]
        responses = [text for r in records for text in r.responses]
        flat = scorer.score(prompts, responses)
        position = 0
        per_record = []
        for r in records:
            scores = flat[position : position + len(r.responses)]
            position += len(r.responses)
            per_record.append(scores)
            line: dict[str, Any] = {"record": r.record, "prompt": r.prompt, "responses": r.responses,
                                    "rewards": scores}
            if r.scores is not None:
                line["scores"] = r.scores
            if r.margin is not None:
                line["margin"] = r.margin
            lines.append(line)
        print(ranking_agreement_summary(per_record))
    else:
        lines = _score_prompt_response_records(cfg, scorer, columns)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    print(f"scored {len(lines)} records with {scorer.name}: wrote {out}")
    return out


def ranking_agreement(per_record: Sequence[Sequence[float]]) -> dict[str, float]:
    """How well scores agree with best-first orders: ``pairwise_accuracy`` over every pair ``i < j`` of every
    record (ties count half), and over the records with three or more responses ``top1_accuracy`` and mean
    ``kendall_tau``. Also ``reward_mean``/``reward_std`` of all scores and ``margin`` (mean best - worst)."""
    from alignlab.losses.reward_model import kendall_tau

    wins = pairs = 0.0
    top1, taus, margins, values = [], [], [], []
    for scores in per_record:
        k = len(scores)
        values.extend(scores)
        margins.append(scores[0] - scores[-1])
        for i in range(k):
            for j in range(i + 1, k):
                pairs += 1
                wins += 1.0 if scores[i] > scores[j] else (0.5 if scores[i] == scores[j] else 0.0)
        if k >= 3:
            top1.append(float(all(scores[0] > s for s in scores[1:])))
            taus.append(kendall_tau(scores, list(range(k))))
    stats = reward_stats(values)
    out = {"pairwise_accuracy": wins / pairs if pairs else float("nan"), "pairs": pairs,
           "reward_mean": stats.get("mean", float("nan")), "reward_std": stats.get("std", float("nan")),
           "margin": sum(margins) / len(margins) if margins else float("nan")}
    if top1:
        out["top1_accuracy"] = sum(top1) / len(top1)
        out["kendall_tau"] = sum(taus) / len(taus)
        out["rankings"] = len(top1)
    return out


def ranking_agreement_summary(per_record: Sequence[Sequence[float]]) -> str:
    a = ranking_agreement(per_record)
    text = (f"agreement with the file's order: pairwise accuracy {a['pairwise_accuracy']:.4f} over "
            f"{int(a['pairs'])} pairs")
    if "top1_accuracy" in a:
        text += (f"; {int(a['rankings'])} rankings: top-1 accuracy {a['top1_accuracy']:.4f}, "
                 f"Kendall tau {a['kendall_tau']:.4f}")
    return text + f"\nscores: mean {a['reward_mean']:.4f}, std {a['reward_std']:.4f}"


def _score_prompt_response_records(cfg: Any, scorer: Scorer, columns: dict[str, str] | None) -> list[dict]:
    from alignlab.data.io import read_records

    rename = {v: k for k, v in (columns or {}).items()}
    raws, prompts, responses = [], [], []
    for number, raw in read_records(cfg.data):
        if cfg.limit and len(raws) >= cfg.limit:
            break
        fields = {rename.get(k, k): v for k, v in raw.items()}
        prompt = fields.get("prompt")
        response = fields.get("response", fields.get("completion"))
        if not (isinstance(prompt, (str, list)) and isinstance(response, str)):
            message = ("expected a preference record or {prompt, response} (or completion) with a text or "
                       "messages prompt and a text response")
            if cfg.skip_invalid:
                continue
            raise AlignlabError(message, file=cfg.data, record=number, field="(fields)")
        raws.append(raw)
        prompts.append(prompt)
        responses.append(response)
    scores = scorer.score(prompts, responses)
    return [{**raw, "reward": score} for raw, score in zip(raws, scores)]
