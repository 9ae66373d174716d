"""Tokenization with an exact prompt/response boundary: the primitive every stage shares.

Conventions (every stage relies on them):

- **Boundary.** The prompt text and the prompt+response text are tokenized separately and the longest common
  token prefix is the prompt; everything after it is the response (TRL's approach). When a BPE merge crosses
  the boundary (a prompt ending in a space, or mid-word), the merged token goes to the response, so
  ``prompt_ids + completion_ids`` is always exactly the tokenization of the whole text.
- **Special tokens.** Rendered text is tokenized with ``add_special_tokens=False``. A BOS token is then
  prepended only when the tokenizer adds one by itself (``tokenizer("a")`` starts with BOS) and the text does
  not already start with it (chat templates that write ``{{ bos_token }}`` are not doubled).
- **EOS.** Every response ends with ``tokenizer.eos_token_id``. For ``template="chat"`` the template's
  end-of-turn token is expected to be the EOS token (``<|im_end|>`` for ChatML): the response is cut right
  after its last EOS (template trailers such as the ``"\\n"`` after ``<|im_end|>`` carry no loss), and EOS is
  appended when the template wrote none. For ``"alpaca"`` and ``"none"`` EOS is appended to the text.
  The exception is a response marked *unfinished* (``finished=False``: a sample cut at a sampler's token
  limit): it ends where its text ends, with no EOS, so a model trained on it is not taught to stop there.
- **Labels** are aligned with ``input_ids`` (the model shifts them); ``-100`` (:data:`IGNORE_INDEX`) means
  no loss.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignlab.data.templates import check_messages, render_chat, render_prompt
from alignlab.errors import AlignlabError

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "TRUNCATION_POLICIES",
    "PROMPT_FILLS_MAX_LENGTH",
    "LONGER_THAN_MAX_LENGTH",
    "encode_text",
    "adds_bos",
    "encode_prompt",
    "encode_prompt_completion",
    "encode_conversation",
    "encode_pretraining_text",
    "common_prefix_length",
    "shared_prefix_length",
    "SHARED_PREFIX_MIN",
    "TokenizedExample",
    "DataReport",
    "truncate_example",
]

IGNORE_INDEX = -100
TEMPLATES = ("alpaca", "chat", "none")
TRUNCATION_POLICIES = ("right", "drop")
PROMPT_FILLS_MAX_LENGTH = "prompt fills max_length"
LONGER_THAN_MAX_LENGTH = "longer than max_length"

Prompt = str | Sequence[Mapping[str, str]] | Mapping[str, str]

_ADDS_BOS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without any special tokens added by the tokenizer."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer prepends its BOS token by itself (e.g. Llama 2); cached per tokenizer."""
    try:
        return _ADDS_BOS[tokenizer]
    except (KeyError, TypeError):
        pass
    bos = getattr(tokenizer, "bos_token_id", None)
    result = False
    if bos is not None:
        with_special = tokenizer("a")["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        result = bool(with_special) and with_special[0] == bos and without[:1] != [bos]
    try:
        _ADDS_BOS[tokenizer] = result
    except TypeError:
        pass
    return result


def _with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    if adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        return [tokenizer.bos_token_id, *ids]
    return ids


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise AlignlabError("the tokenizer has no EOS token; set tokenizer.eos_token", field="eos_token")
    return int(eos)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


SHARED_PREFIX_MIN = 8  # tokens: a shorter common prefix is not worth encoding apart (a forward pass, fragments)


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many first tokens all ``sequences`` have in common, kept one token short of the shortest (so every
    sequence keeps a token of its own after the prefix: the one a model reads a score or a next token at).
    0 for no sequences."""
    if not sequences:
        return 0
    n = min(len(s) for s in sequences) - 1
    for s in sequences[1:]:
        n = min(n, common_prefix_length(sequences[0], s))
    return max(0, n)


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise AlignlabError(
            f"unknown template {template!r} (expected one of {', '.join(TEMPLATES)})", field="template"
        )


def _as_messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Mapping):
        from alignlab.data.templates import alpaca_user_message

        return [
            {"role": "user", "content": alpaca_user_message(prompt["instruction"], prompt.get("input", ""))}
        ]
    return check_messages(prompt, field="prompt")


def encode_prompt(tokenizer: Any, prompt: Prompt, *, template: str) -> list[int]:
    """Token ids of the prompt alone, ready for generation (BOS handled, generation prompt added for chat).

    Note: these ids can differ from the ``prompt_ids`` of :func:`encode_prompt_completion` when a BPE merge
    crosses the boundary (there the merged token belongs to the response).
    """
    _check_template(template)
    return _with_bos(tokenizer, encode_text(tokenizer, render_prompt(tokenizer, prompt, template)))


def encode_prompt_completion(
    tokenizer: Any, prompt: Prompt, completion: str, *, template: str, finished: bool = True
) -> tuple[list[int], list[int]]:
    """Tokenize a prompt and its response with an exact boundary.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: a string; a list of chat messages ``{role, content}`` (``template="chat"``); or, for
            ``template="alpaca"``, a mapping with ``instruction`` and optional ``input``. With ``"chat"`` a
            string (or an Alpaca mapping) becomes one user message.
        completion: the response text.
        template: ``"alpaca"`` (Stanford Alpaca prompt), ``"chat"`` (the tokenizer's chat template, the
            response as the assistant turn), or ``"none"`` (prompt and response concatenated as they are).
        finished: False for a response that was cut off (a sample that hit ``max_new_tokens``): its ids end
            with its text, without EOS.

    Returns:
        ``(prompt_ids, completion_ids)``: ``prompt_ids`` starts with BOS when the tokenizer uses one;
        ``completion_ids`` is non-empty and ends with ``tokenizer.eos_token_id`` (unless ``finished`` is
        False: then it is the response's text alone, EOS removed). Their concatenation is the
        tokenization of the whole rendered text (up to the EOS rules in the module docstring).

    Raises:
        AlignlabError: unknown template, bad prompt/messages, or no chat template for ``"chat"``.
    """
    _check_template(template)
    if not isinstance(completion, str):
        raise AlignlabError(f"expected a string, found {type(completion).__name__}", field="completion")
    eos = _eos_id(tokenizer)
    if template == "chat":
        messages = _as_messages(prompt)
        prompt_text = render_chat(tokenizer, messages, add_generation_prompt=True)
        full_text = render_chat(tokenizer, [*messages, {"role": "assistant", "content": completion}])
    else:
        prompt_text = render_prompt(tokenizer, prompt, template)
        full_text = prompt_text + completion
    full_ids = encode_text(tokenizer, full_text)
    boundary = common_prefix_length(encode_text(tokenizer, prompt_text), full_ids)
    prompt_ids, completion_ids = full_ids[:boundary], full_ids[boundary:]
    if template == "chat":
        completion_ids = _end_at_last_eos(completion_ids, eos)
    elif completion_ids[-1:] != [eos]:
        completion_ids.append(eos)
    if not finished:
        completion_ids = completion_ids[:-1]
        if not completion_ids:
            raise AlignlabError("an unfinished response has no tokens", field="completion")
    return _with_bos(tokenizer, prompt_ids), completion_ids


def _end_at_last_eos(ids: list[int], eos: int) -> list[int]:
    """Cut ``ids`` right after their last EOS, or append EOS when there is none."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == eos:
            return ids[: i + 1]
    return [*ids, eos]


def encode_conversation(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
    """Tokenize a (multi-turn) conversation with the chat template; loss on the assistant turns only.

    Each assistant turn's span is found with the common-prefix method: it starts where the rendering of the
    conversation up to that turn plus the generation prompt stops matching the whole, and ends where the
    rendering up to and including the turn stops matching; it is then cut after its last EOS (the
    template's trailer, e.g. ``"\\n"``, stays in the input without loss). An assistant turn whose rendering
    holds no EOS gets one inserted, so every response ends with EOS.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        messages: ``[{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]`` with at least
            one assistant turn, not starting with an assistant turn.

    Returns:
        ``(input_ids, labels)`` of equal length; ``labels`` is ``-100`` outside the assistant responses.

    Raises:
        AlignlabError: no chat template, malformed messages, no assistant turn, or a template whose rendering
            of a conversation prefix is not a prefix of the whole (boundaries would be meaningless).
    """
    messages = check_messages(messages)
    eos = _eos_id(tokenizer)
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        raise AlignlabError("the conversation has no assistant turn to learn from", field="messages")
    if roles[0] == "assistant":
        raise AlignlabError(
            "the conversation starts with an assistant turn (no prompt)", field="messages[0].role"
        )
    full_text = render_chat(tokenizer, messages)
    full_ids = encode_text(tokenizer, full_text)
    spans: list[tuple[int, int]] = []
    for index, role in enumerate(roles):
        if role != "assistant":
            continue
        before = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        after = render_chat(tokenizer, messages[: index + 1])
        if not (full_text.startswith(before) and full_text.startswith(after)):
            raise AlignlabError(
                "the chat template renders a conversation prefix differently from the whole conversation "
                f"(at turn {index}), so the assistant turns cannot be located; use single-turn data",
                field="messages",
            )
        start = common_prefix_length(encode_text(tokenizer, before), full_ids)
        end = common_prefix_length(encode_text(tokenizer, after), full_ids)
        spans.append((start, max(start, end)))
    input_ids: list[int] = []
    labels: list[int] = []
    position = 0
    for start, end in spans:
        input_ids.extend(full_ids[position:start])
        labels.extend([IGNORE_INDEX] * (start - position))
        response = full_ids[start:end]
        loss_part = _end_at_last_eos(response, eos)
        trailer = response[len(loss_part) :] if len(loss_part) <= len(response) else []
        input_ids.extend(loss_part)
        labels.extend(loss_part)
        input_ids.extend(trailer)
        labels.extend([IGNORE_INDEX] * len(trailer))
        position = end
    input_ids.extend(full_ids[position:])
    labels.extend([IGNORE_INDEX] * (len(full_ids) - position))
    with_bos = _with_bos(tokenizer, input_ids)
    if len(with_bos) > len(input_ids):
        labels = [IGNORE_INDEX, *labels]
    return with_bos, labels


def encode_pretraining_text(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Plain text for continued pretraining: ``(input_ids, labels)`` with loss on every token, BOS when the
    tokenizer uses one, and EOS appended."""
    if not isinstance(text, str):
        raise AlignlabError(f"expected a string, found {type(text).__name__}", field="text")
    eos = _eos_id(tokenizer)
    ids = encode_text(tokenizer, text)
    if ids[-1:] != [eos]:
        ids.append(eos)
    ids = _with_bos(tokenizer, ids)
    return ids, list(ids)


# ------------------------------------------------------------------------------------ examples and report


@dataclass
class TokenizedExample:
    """One SFT example.

    Attributes:
        input_ids: token ids, ``(t,)``.
        labels: ``(t,)``, aligned with ``input_ids``; ``-100`` where there is no loss.
        record: the 1-based record number in the source file.
        truncated: whether the example was cut to ``max_length``.
    """

    input_ids: list[int]
    labels: list[int]
    record: int
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        """How many tokens carry loss."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def truncate_example(
    example: TokenizedExample, *, max_length: int, truncation: str = "right"
) -> tuple[TokenizedExample | None, str | None]:
    """Apply the truncation policy to one example.

    Policies:
        ``"right"``: keep the first ``max_length`` tokens (the response loses its end, EOS included).
        ``"drop"``: drop an example longer than ``max_length``.
    In both, an example with no loss token within the first ``max_length`` tokens (its prompt alone fills
    ``max_length``) is dropped with reason :data:`PROMPT_FILLS_MAX_LENGTH`.

    Returns:
        ``(example, None)`` to keep (``example.truncated`` set when it was cut) or ``(None, reason)``.
    """
    if truncation not in TRUNCATION_POLICIES:
        raise AlignlabError(
            f"unknown truncation {truncation!r} (expected one of {', '.join(TRUNCATION_POLICIES)})",
            field="truncation",
        )
    if max_length < 1:
        raise AlignlabError(f"max_length must be positive, found {max_length}", field="max_length")
    if len(example.input_ids) <= max_length:
        return example, None
    if all(label == IGNORE_INDEX for label in example.labels[:max_length]):
        return None, PROMPT_FILLS_MAX_LENGTH
    if truncation == "drop":
        return None, LONGER_THAN_MAX_LENGTH
    return (
        TokenizedExample(
            input_ids=example.input_ids[:max_length],
            labels=example.labels[:max_length],
            record=example.record,
            truncated=True,
        ),
        None,
    )


@dataclass
class DataReport:
    """What happened to every record of a data set: nothing is dropped or skipped without being counted.

    ``records_read == examples_kept + sum(dropped.values()) + sum(skipped_invalid.values())``.

    Attributes:
        source: the file or hub id.
        records_read: records read from the source.
        examples_kept: examples produced.
        truncated: kept examples that were cut to ``max_length`` (truncation ``"right"``).
        dropped: reason -> count for valid records that produced no example (e.g. too long).
        skipped_invalid: reason -> count for invalid records skipped (``skip_invalid=True``).
        skipped_messages: the full error messages of the first few skipped records (to find them).
        tokens: tokens in the kept examples.
        loss_tokens: tokens carrying loss in the kept examples.
        max_length: the length limit used.
    """

    source: str = ""
    records_read: int = 0
    examples_kept: int = 0
    truncated: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    skipped_invalid: Counter[str] = field(default_factory=Counter)
    skipped_messages: list[str] = field(default_factory=list)
    tokens: int = 0
    loss_tokens: int = 0
    max_length: int | None = None

    MAX_MESSAGES = 5

    def keep(self, example: TokenizedExample) -> None:
        """Count a kept example."""
        self.examples_kept += 1
        self.truncated += int(example.truncated)
        self.tokens += len(example.input_ids)
        self.loss_tokens += example.num_loss_tokens

    def drop(self, reason: str) -> None:
        """Count a valid record that produced no example."""
        self.dropped[reason] += 1

    def skip(self, reason: str, message: str) -> None:
        """Count an invalid record that was skipped."""
        self.skipped_invalid[reason] += 1
        if len(self.skipped_messages) < self.MAX_MESSAGES:
            self.skipped_messages.append(message)

    def summary(self) -> str:
        """A few lines for people: records, kept, truncated, dropped and skipped with reasons."""
        source = f"{self.source}: " if self.source else ""
        lines = [
            f"{source}{self.records_read} records read, {self.examples_kept} examples kept "
            f"({self.tokens} tokens, {self.loss_tokens} with loss)"
        ]
        limit = f" (max_length {self.max_length})" if self.max_length is not None else ""
        lines.append(f"  truncated{limit}: {self.truncated}")
        lines.append(f"  dropped: {sum(self.dropped.values())}{_reasons(self.dropped)}")
        lines.append(
            f"  skipped invalid: {sum(self.skipped_invalid.values())}{_reasons(self.skipped_invalid)}"
        )
        lines.extend(f"    e.g. {message}" for message in self.skipped_messages)
        return "\n".join(lines)


def _reasons(counter: Counter[str]) -> str:
    if not counter:
        return ""
    return " (" + ", ".join(f"{reason}: {count}" for reason, count in counter.most_common()) + ")"
