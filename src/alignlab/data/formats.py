"""Instruction-data formats, normalised to one record, and the SFT data set loader.

Formats (``format=``):

- ``"alpaca"``: ``{instruction, input?, output}``; template ``alpaca`` by default. With ``template="chat"``
  the user turn is the instruction, plus ``"\\n\\n"`` and the input when the input is non-empty.
- ``"messages"``: ``{messages: [{role, content}, ...]}`` (OpenAI style); template ``chat``.
- ``"sharegpt"``: ``{conversations: [{from, value}, ...]}`` with ``from`` in human/gpt/system (also
  user/assistant); template ``chat``.
- ``"prompt_completion"``: ``{prompt, completion}``, the prompt a string or a list of messages; template
  ``none`` by default (``chat`` when the prompt is a list of messages). Optional ``unfinished: true`` marks a
  completion cut off at a sampler's token limit (rejection sampling writes it): it is trained without EOS.
- ``"text"``: ``{text}``: continued pretraining, loss on every token.

``format="auto"`` looks at the keys of the first record. Column names are mapped with ``columns``, a dict
from the canonical name to the file's name, e.g. ``{"instruction": "Q", "output": "A"}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignlab.data.io import read_records
from alignlab.data.templates import alpaca_user_message, require_chat_template
from alignlab.data.tokenize import (
    IGNORE_INDEX,
    TEMPLATES,
    TRUNCATION_POLICIES,
    DataReport,
    TokenizedExample,
    encode_conversation,
    encode_pretraining_text,
    encode_prompt_completion,
    truncate_example,
)
from alignlab.errors import AlignlabError

__all__ = [
    "FORMATS",
    "CANONICAL_COLUMNS",
    "SHAREGPT_ROLES",
    "InvalidRecordError",
    "InstructionRecord",
    "detect_format",
    "normalize_record",
    "parse_turns",
    "default_template",
    "encode_record",
    "iter_instruction_records",
    "load_sft_dataset",
]

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")
CANONICAL_COLUMNS = (
    "instruction",
    "input",
    "output",
    "messages",
    "conversations",
    "prompt",
    "completion",
    "unfinished",
    "text",
)
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_FORMAT_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


# Errors naming these fields come from the options or the tokenizer, not from one record.
_CONFIGURATION_FIELDS = {"template", "eos_token", "format", "columns", "max_length", "truncation"}


class InvalidRecordError(AlignlabError):
    """A record that breaks its format. ``reason`` is a short, countable description (no record number),
    used by ``skip_invalid=True`` to count skipped records."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        file: str | None = None,
        record: int | None = None,
        field: str | None,
    ) -> None:
        self.reason = reason
        super().__init__(message, file=file, record=record, field=field)


@dataclass
class InstructionRecord:
    """One normalised instruction record.

    Exactly the fields of its ``kind`` are set:

    - ``alpaca``: ``instruction``, ``input`` (``""`` when absent), ``output``;
    - ``conversation`` (messages and ShareGPT): ``messages`` as ``[{role, content}]``;
    - ``prompt_completion``: ``prompt`` (a string or messages), ``output`` (the completion) and
      ``unfinished`` (the completion was cut off at a length limit: no EOS);
    - ``text``: ``text``.
    """

    record: int
    kind: str
    instruction: str = ""
    input: str = ""
    output: str = ""
    prompt: str | list[dict[str, str]] | None = None
    messages: list[dict[str, str]] | None = None
    text: str = ""
    unfinished: bool = False


def _columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    mapping = {name: name for name in CANONICAL_COLUMNS}
    for canonical, actual in (columns or {}).items():
        if canonical not in CANONICAL_COLUMNS:
            raise AlignlabError(
                f"unknown column {canonical!r} in the column mapping "
                f"(known: {', '.join(CANONICAL_COLUMNS)}); "
                "map canonical names to your file's names, e.g. {'instruction': 'Q', 'output': 'A'}",
                field="columns",
            )
        if not isinstance(actual, str):
            raise AlignlabError(f"column {canonical!r} must map to a string", field="columns")
        mapping[canonical] = actual
    return mapping


def detect_format(
    record: Mapping[str, Any],
    *,
    columns: Mapping[str, str] | None = None,
    file: str | None = None,
    number: int = 1,
) -> str:
    """The format of a record from its keys (after the column mapping).

    Raises:
        AlignlabError: listing the keys found when no format matches.
    """
    names = _columns(columns)
    for fmt, keys in _FORMAT_KEYS.items():
        if all(names[key] in record for key in keys):
            return fmt
    expected = "; ".join(
        f"{fmt}: {', '.join(names[key] for key in keys)}" for fmt, keys in _FORMAT_KEYS.items()
    )
    raise AlignlabError(
        f"cannot tell the format from the keys {sorted(record)}; expected one of [{expected}]. "
        "Map your column names with columns={'instruction': ..., 'output': ...} or pass format=",
        file=file,
        record=number,
    )


def default_template(kind: str, prompt: Any = None) -> str:
    """The template ``template="auto"`` picks: alpaca for Alpaca, chat for conversations (and for a
    prompt given as messages), none for prompt/completion and text."""
    if kind == "alpaca":
        return "alpaca"
    if kind == "conversation" or (kind == "prompt_completion" and isinstance(prompt, list)):
        return "chat"
    return "none"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {str: "string", bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _string(
    record: Mapping[str, Any],
    column: str,
    role: str,
    *,
    file: str | None,
    number: int,
    required: bool = True,
    nonempty: bool = False,
    empty_reason: str = "",
) -> str:
    label = column if column == role else f"{column} ({role})"
    if column not in record or (record[column] is None and not required):
        if required:
            raise InvalidRecordError(
                f"missing field {label!r} (keys found: {', '.join(map(str, record))})",
                reason=f"missing field '{column}'",
                file=file,
                record=number,
                field=column,
            )
        return ""
    value = record[column]
    if not isinstance(value, str):
        raise InvalidRecordError(
            f"{label} must be a string, found a {_type_name(value)} ({value!r:.40})",
            reason=f"'{column}' is not a string",
            file=file,
            record=number,
            field=column,
        )
    if nonempty and not value.strip():
        reason = empty_reason or f"empty '{column}'"
        raise InvalidRecordError(f"{label} is empty", reason=reason, file=file, record=number, field=column)
    return value


def parse_turns(
    value: Any,
    column: str,
    *,
    sharegpt: bool = False,
    file: str | None = None,
    number: int | None = None,
    require_response: bool = True,
) -> list[dict[str, str]]:
    """Validate a list of turns and return ``[{role, content}]``.

    Args:
        value: the raw list: ``[{role, content}]``, or ``[{from, value}]`` with ``sharegpt=True`` (``from``:
            human/gpt/system, also user/assistant).
        column: the field name, for error messages (``conversations[2].value``).
        file, number: where the record is, for error messages.
        require_response: require an assistant turn and a first turn that is not the assistant's (a
            conversation to learn from); False for a prompt.

    Raises:
        InvalidRecordError: not a list, empty, a malformed turn, an unknown role/speaker, an empty assistant
            turn, or (with ``require_response``) no assistant turn / an assistant turn first.
    """
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")

    def invalid(message: str, reason: str, where: str) -> InvalidRecordError:
        return InvalidRecordError(message, reason=reason, file=file, record=number, field=where)

    if not isinstance(value, list):
        raise invalid(
            f"expected a list of turns, found a {_type_name(value)}", f"'{column}' is not a list", column
        )
    if not value:
        raise invalid("the conversation is empty", "empty conversation", column)
    messages = []
    for index, turn in enumerate(value):
        where = f"{column}[{index}]"
        if not isinstance(turn, Mapping):
            raise invalid(
                f"a turn must be an object, found a {_type_name(turn)}", "turn is not an object", where
            )
        for key in (role_key, content_key):
            if key not in turn:
                raise invalid(f"the turn has no '{key}'", f"turn without '{key}'", f"{where}.{key}")
            if not isinstance(turn[key], str):
                raise invalid(
                    f"must be a string, found a {_type_name(turn[key])}",
                    f"turn '{key}' is not a string",
                    f"{where}.{key}",
                )
        role = turn[role_key]
        if sharegpt:
            if role not in SHAREGPT_ROLES:
                raise invalid(
                    f"unknown speaker {role!r} (expected one of {', '.join(SHAREGPT_ROLES)})",
                    "unknown speaker",
                    f"{where}.{role_key}",
                )
            role = SHAREGPT_ROLES[role]
        elif role not in ("system", "user", "assistant", "tool"):
            raise invalid(
                f"unknown role {role!r} (expected system, user, assistant or tool)",
                "unknown role",
                f"{where}.{role_key}",
            )
        if role == "assistant" and not turn[content_key].strip():
            raise invalid("the assistant turn is empty", "empty response", f"{where}.{content_key}")
        messages.append({"role": role, "content": turn[content_key]})
    roles = [message["role"] for message in messages]
    if not require_response:
        return messages
    if "assistant" not in roles:
        raise invalid("the conversation has no assistant turn", "no assistant turn", column)
    if roles[0] == "assistant":
        raise invalid(
            "the conversation starts with an assistant turn (no prompt)",
            "starts with an assistant turn",
            f"{column}[0].{role_key}",
        )
    return messages


def normalize_record(
    record: Mapping[str, Any],
    fmt: str,
    *,
    number: int,
    columns: Mapping[str, str] | None = None,
    file: str | None = None,
) -> InstructionRecord:
    """Validate one raw record of format ``fmt`` and normalise it.

    Raises:
        InvalidRecordError: missing field, wrong type, empty response, malformed turns; the message names
            the file, the record number and the field.
    """
    if fmt not in FORMATS:
        raise AlignlabError(
            f"unknown format {fmt!r} (expected auto or one of {', '.join(FORMATS)})", field="format"
        )
    names = _columns(columns)
    where = {"file": file, "number": number}
    if fmt == "alpaca":
        instruction = _string(record, names["instruction"], "instruction", nonempty=True, **where)
        extra = _string(record, names["input"], "input", required=False, **where)
        output = _string(
            record, names["output"], "output", nonempty=True, empty_reason="empty response", **where
        )
        return InstructionRecord(number, "alpaca", instruction=instruction, input=extra, output=output)
    if fmt in ("messages", "sharegpt"):
        column = names["messages" if fmt == "messages" else "conversations"]
        if column not in record:
            raise InvalidRecordError(
                f"missing field {column!r} (keys found: {', '.join(map(str, record))})",
                reason=f"missing field '{column}'",
                file=file,
                record=number,
                field=column,
            )
        messages = parse_turns(record[column], column, sharegpt=fmt == "sharegpt", file=file, number=number)
        return InstructionRecord(number, "conversation", messages=messages)
    if fmt == "prompt_completion":
        column = names["prompt"]
        prompt: str | list[dict[str, str]]
        if isinstance(record.get(column), list):
            turns = record[column]
            sharegpt = bool(turns) and isinstance(turns[0], Mapping) and "from" in turns[0]
            prompt = parse_turns(
                turns, column, sharegpt=sharegpt, file=file, number=number, require_response=False
            )
        else:
            prompt = _string(record, column, "prompt", **where)
        completion = _string(
            record, names["completion"], "completion", nonempty=True, empty_reason="empty response", **where
        )
        unfinished = record.get(names["unfinished"])
        if unfinished is None:  # absent or null: as the ranking format reads it
            unfinished = False
        if isinstance(unfinished, str) and unfinished.strip().lower() in ("true", "false", ""):  # CSV cells
            unfinished = unfinished.strip().lower() == "true"
        if not isinstance(unfinished, bool):
            raise InvalidRecordError(
                f"{names['unfinished']} must be true or false, found {unfinished!r:.40}",
                reason=f"'{names['unfinished']}' is not a bool",
                file=file,
                record=number,
                field=names["unfinished"],
            )
        return InstructionRecord(number, "prompt_completion", prompt=prompt, output=completion,
                                 unfinished=unfinished)
    text = _string(record, names["text"], "text", nonempty=True, empty_reason="empty text", **where)
    return InstructionRecord(number, "text", text=text)


def encode_record(tokenizer: Any, record: InstructionRecord, template: str) -> tuple[list[int], list[int]]:
    """Tokenize a normalised record: ``(input_ids, labels)``, labels ``-100`` outside the response(s).

    Args:
        template: ``"alpaca"``, ``"chat"``, ``"none"`` or ``"auto"`` (see :func:`default_template`).
    """
    if template == "auto":
        template = default_template(record.kind, record.prompt)
    if record.kind == "text":
        if template != "none":
            raise AlignlabError("plain text records take template 'none' (or 'auto')", field="template")
        return encode_pretraining_text(tokenizer, record.text)
    if record.kind == "conversation":
        if template != "chat":
            raise AlignlabError(
                f"conversations need template 'chat' (or 'auto'), not {template!r}", field="template"
            )
        return encode_conversation(tokenizer, record.messages or [])
    if record.kind == "alpaca":
        if template == "chat":
            prompt: Any = [{"role": "user", "content": alpaca_user_message(record.instruction, record.input)}]
        elif template == "alpaca":
            prompt = {"instruction": record.instruction, "input": record.input}
        else:
            prompt = alpaca_user_message(record.instruction, record.input)
    else:
        prompt = record.prompt
    prompt_ids, completion_ids = encode_prompt_completion(tokenizer, prompt, record.output, template=template,
                                                          finished=not record.unfinished)
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def iter_instruction_records(
    source: str | Path,
    *,
    format: str = "auto",  # noqa: A002 - the user-facing option name
    columns: Mapping[str, str] | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
    report: DataReport | None = None,
    split: str = "train",
):
    """Yield normalised :class:`InstructionRecord` objects from a file (or hub id).

    Counts ``records_read`` and, with ``skip_invalid``, skipped records in ``report`` when given.
    """
    file = str(source)
    fmt = format
    if fmt != "auto" and fmt not in FORMATS:
        raise AlignlabError(
            f"unknown format {fmt!r} (expected auto or one of {', '.join(FORMATS)})", field="format"
        )
    _columns(columns)
    for count, (number, raw) in enumerate(read_records(source, split=split), start=1):
        if limit is not None and count > limit:
            break
        if fmt == "auto":
            fmt = detect_format(raw, columns=columns, file=file, number=number)
        if report is not None:
            report.records_read += 1
        try:
            yield normalize_record(raw, fmt, number=number, columns=columns, file=file)
        except InvalidRecordError as error:
            if not skip_invalid:
                raise
            if report is not None:
                report.skip(error.reason, str(error))


def load_sft_dataset(
    source: str | Path,
    tokenizer: Any,
    *,
    format: str = "auto",  # noqa: A002
    template: str = "auto",
    columns: Mapping[str, str] | None = None,
    max_length: int = 1024,
    truncation: str = "right",
    skip_invalid: bool = False,
    limit: int | None = None,
    split: str = "train",
) -> tuple[list[TokenizedExample], DataReport]:
    """Read, validate, render, tokenize and truncate an SFT data set.

    Args:
        source: a data file (see :func:`alignlab.data.io.read_records`) or a hub dataset id.
        tokenizer: a Hugging Face tokenizer.
        format: ``"auto"`` (from the first record's keys) or one of :data:`FORMATS`.
        template: ``"auto"``, ``"alpaca"``, ``"chat"`` or ``"none"``.
        columns: canonical name -> the file's column name, e.g. ``{"instruction": "Q", "output": "A"}``.
        max_length: the longest example in tokens.
        truncation: ``"right"`` (cut the end; counted as truncated) or ``"drop"`` (drop; counted).
        skip_invalid: skip invalid records and count them by reason instead of raising.
        limit: read at most this many records.
        split: the split of a hub dataset.

    Returns:
        ``(examples, report)``.

    Raises:
        AlignlabError: a bad file, a bad option, or an invalid record (unless ``skip_invalid``), naming the
            file, the record number and the field.
    """
    if template != "auto" and template not in TEMPLATES:
        raise AlignlabError(
            f"unknown template {template!r} (expected auto or one of {', '.join(TEMPLATES)})",
            field="template",
        )
    if truncation not in TRUNCATION_POLICIES:
        raise AlignlabError(
            f"unknown truncation {truncation!r} (expected one of {', '.join(TRUNCATION_POLICIES)})",
            field="truncation",
        )
    if max_length < 1:
        raise AlignlabError(f"max_length must be positive, found {max_length}", field="max_length")
    file = str(source)
    report = DataReport(source=file, max_length=max_length)
    examples: list[TokenizedExample] = []
    checked_chat = False
    records = iter_instruction_records(
        source,
        format=format,
        columns=columns,
        skip_invalid=skip_invalid,
        limit=limit,
        report=report,
        split=split,
    )
    for record in records:
        resolved = default_template(record.kind, record.prompt) if template == "auto" else template
        if resolved == "chat" and not checked_chat:
            require_chat_template(tokenizer)  # a configuration error: raise, never skip
            checked_chat = True
        try:
            input_ids, labels = encode_record(tokenizer, record, resolved)
        except InvalidRecordError:
            raise
        except AlignlabError as error:
            if error.field in _CONFIGURATION_FIELDS:  # the options or the tokenizer are wrong: never skip
                raise AlignlabError(error.message, file=file, field=error.field) from error
            wrapped = InvalidRecordError(
                error.message,
                reason=error.message.split(":")[0],
                file=file,
                record=record.record,
                field=error.field,
            )
            if not skip_invalid:
                raise wrapped from error
            report.skip(wrapped.reason, str(wrapped))
            continue
        example, reason = truncate_example(
            TokenizedExample(input_ids, labels, record.record), max_length=max_length, truncation=truncation
        )
        if example is None:
            report.drop(reason or "dropped")
            continue
        examples.append(example)
        report.keep(example)
    return examples, report
