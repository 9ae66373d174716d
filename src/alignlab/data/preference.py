"""Preference data: every pairwise, ranked and unpaired format normalised to one record.

Every method that learns from preferences (reward models, the DPO family, KTO, PPO and best-of-n prompt
lists) reads :class:`PreferenceRecord` (a prompt and its responses, best first) or, for unpaired feedback,
:class:`FeedbackRecord`. The loaders read a file with :func:`alignlab.data.io.read_records`, detect the
format from the first record's fields (or take ``format=``), and return the records together with a
:class:`PreferenceReport` that counts what was read, kept and skipped, and why.

Formats (``format=`` name, then the fields of one record; ``columns`` maps these names to a file's own):

``explicit``
    ``{prompt, chosen, rejected}``. Each is a string or a list of messages (``{role, content}``, or
    ShareGPT's ``{from, value}``). A ``chosen``/``rejected`` list ends with the assistant reply; the
    messages before it, if any, must repeat the prompt (as in UltraFeedback, where ``prompt`` is a string
    and ``chosen`` is ``[user, assistant]``). Optional: ``margin`` (Llama 2 style), ``score_chosen`` and
    ``score_rejected``.
``implicit``
    ``{chosen, rejected}`` with no prompt: two whole conversations sharing every turn but the last.
    Strings are Anthropic HH transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``): each is split at its
    LAST ``"\\n\\nAssistant:"``; the text before it becomes the prompt messages (Human -> user, Assistant
    -> assistant, every turn, contents stripped) and must be the same in both. Lists of messages are split
    before their last (assistant) message.
``sharegpt``
    ``{conversations: [{from: system/human/gpt, value}], chosen: {from: gpt, value}, rejected: ...}``
    (LLaMA-Factory). The conversation must end with a human turn.
``ranking``
    ``{prompt, responses}`` best first, or ``{prompt, responses, scores}`` (higher is better; responses
    are sorted by score, descending; equal scores are an error, since the order would be undefined).
    Optional ``unfinished``: a list of bools aligned with ``responses``, true for a response that was cut
    off at a sampler's token limit (as the lab's sampled answers are); such a response is encoded without
    EOS by the policy-training methods (DPO family), so they do not learn to stop where the sampler stopped.
``oasst``
    Open-Assistant message trees ``{message_tree_id, tree_state, prompt: Message}`` where a Message is
    ``{text, role: prompter/assistant, rank, replies: [Message]}``. Every prompter node with two or more
    ranked assistant replies gives one ranking: the prompt is the conversation from the root down to that
    node, the responses are the replies ordered by ``rank`` (0 = best). Replies whose ``rank`` is null or
    absent are not part of any ranking: where no sibling is ranked they are counted as skipped
    (``"oasst: unranked reply (no ranked sibling)"``); where siblings are ranked the node is ambiguous and
    is an error (with ``skip_invalid`` the unranked replies are counted as skipped and the ranked ones
    still form the ranking). Deleted messages and messages that failed review are skipped with their
    subtree. Conversations below an unranked reply are still walked.
``unpaired`` (for :func:`load_feedback`)
    ``{prompt, completion, label}`` or ``{messages, label}`` whose last message is the assistant
    completion. ``label`` is a bool (``0``/``1`` and the strings ``"true"``/``"false"``/``"0"``/``"1"`` are
    accepted, since CSV cells are strings).

:func:`inspect_preference_file` is ``alignlab data inspect`` for these files: the first records as the
loaders normalised them, with token counts, and the report.

A prompt is either a string or a list of messages ending with a user turn. Every bad record is an
:class:`~alignlab.errors.AlignlabError` naming the file, the 1-based record and the field; with
``skip_invalid=True`` it is counted in ``report.skipped`` under a short reason instead.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from alignlab.data.io import detect_kind, read_records
from alignlab.data.tokenize import encode_prompt_completion
from alignlab.errors import AlignlabError

__all__ = [
    "PreferenceRecord",
    "FeedbackRecord",
    "PreferenceReport",
    "PREFERENCE_FORMATS",
    "FEEDBACK_FORMATS",
    "detect_format",
    "load_preferences",
    "load_feedback",
    "expand_to_pairs",
    "prompts_of",
    "default_template",
    "is_feedback_file",
    "inspect_preference_file",
]

Prompt = str | list[dict[str, str]]

PREFERENCE_FORMATS = ("explicit", "implicit", "sharegpt", "ranking", "oasst")
FEEDBACK_FORMATS = ("unpaired",)
_CANONICAL_FIELDS = (
    "prompt",
    "chosen",
    "rejected",
    "responses",
    "scores",
    "margin",
    "score_chosen",
    "score_rejected",
    "unfinished",
    "conversations",
    "messages",
    "completion",
    "label",
)
_ROLES = {
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class PreferenceRecord:
    """One prompt and two or more responses, best first.

    Attributes:
        prompt: the prompt text, or chat messages (``{role, content}``) ending with a user turn.
        responses: the responses, best first; a pair is ``[chosen, rejected]``, a ranking has K >= 3.
        scores: optional per-response scores (higher is better), aligned with ``responses``.
        margin: optional margin for a pair (Llama 2 style): how much better ``chosen`` is.
        record: the 1-based record number in the source file.
        source: the file the record came from.
        unfinished: optional per-response flags, aligned with ``responses``: True where the response was cut
            off at a length limit (it is then encoded without EOS; see :mod:`alignlab.data.tokenize`).
    """

    prompt: Prompt
    responses: list[str]
    scores: list[float] | None = None
    margin: float | None = None
    record: int = 0
    source: str = ""
    unfinished: list[bool] | None = None

    def finished(self, index: int) -> bool:
        """Whether response ``index`` ended by itself (not cut off at a length limit)."""
        return self.unfinished is None or not self.unfinished[index]

    @property
    def chosen(self) -> str:
        """The best response."""
        return self.responses[0]

    @property
    def rejected(self) -> str:
        """The worst response (for a pair: the rejected one)."""
        return self.responses[-1]


@dataclass
class FeedbackRecord:
    """One prompt, one completion and a thumbs-up/down label (unpaired feedback, as KTO uses).

    Attributes:
        prompt: the prompt text, or chat messages ending with a user turn.
        completion: the assistant completion.
        label: ``True`` for a desirable completion, ``False`` for an undesirable one.
        record: the 1-based record number in the source file.
        source: the file the record came from.
        unfinished: the completion was cut off at a length limit (encoded without EOS).
    """

    prompt: Prompt
    completion: str
    label: bool
    record: int = 0
    source: str = ""
    unfinished: bool = False


@dataclass
class PreferenceReport:
    """What a loader read, kept and skipped.

    Attributes:
        source: the file.
        format: the format used (detected or given).
        records_read: source records read (lines, array items, rows; one OpenAssistant tree is one record).
        kept: normalised records returned.
        skipped: reason -> count of what was dropped (records, or replies of an OpenAssistant tree).
        skipped_records: reason -> the first few record numbers dropped for it.
        by_k: kept records by their number of responses (2 = pair).
        labels: for feedback, kept records by label.
        notes: reason -> count of oddities that were kept (e.g. consecutive turns of one role).
    """

    source: str
    format: str
    records_read: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_records: dict[str, list[int]] = field(default_factory=dict)
    by_k: Counter[int] = field(default_factory=Counter)
    labels: Counter[bool] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)

    @property
    def pairs(self) -> int:
        """Kept records with exactly two responses."""
        return self.by_k.get(2, 0)

    @property
    def rankings(self) -> int:
        """Kept records with three or more responses."""
        return sum(count for k, count in self.by_k.items() if k >= 3)

    def skip(self, reason: str, record: int, count: int = 1) -> None:
        """Count ``count`` things dropped for ``reason`` in ``record``."""
        self.skipped[reason] += count
        numbers = self.skipped_records.setdefault(reason, [])
        if len(numbers) < 5 and record not in numbers:
            numbers.append(record)

    def summary(self) -> str:
        """A few human-readable lines: read, kept, pairs/rankings or labels, skipped by reason, notes."""
        lines = [f"{self.source} ({self.format}): read {self.records_read} records, kept {self.kept}"]
        if self.by_k:
            ks = ", ".join(f"K={k}: {count}" for k, count in sorted(self.by_k.items()))
            lines.append(f"  pairs {self.pairs}, rankings {self.rankings} ({ks})")
        if self.labels:
            lines.append(
                f"  labels: {self.labels.get(True, 0)} desirable, {self.labels.get(False, 0)} undesirable"
            )
        if self.skipped:
            lines.append(f"  skipped {sum(self.skipped.values())}:")
            for reason, count in self.skipped.most_common():
                where = ", ".join(str(n) for n in self.skipped_records.get(reason, []))
                lines.append(f"    {count:6d}  {reason} (records {where}{', ...' if count > 5 else ''})")
        else:
            lines.append("  skipped nothing")
        for note, count in self.notes.most_common():
            lines.append(f"  note: {count} {note} (kept)")
        return "\n".join(lines)


class _RecordError(AlignlabError):
    """A bad record: an :class:`AlignlabError` that also carries a short reason for the skip counter."""

    def __init__(self, reason: str, message: str, *, file: str, record: int, field: str | None) -> None:
        self.reason = reason
        super().__init__(message, file=file, record=record, field=field)


@dataclass
class _Context:
    """Where the record being parsed is, and how canonical field names map to the file's columns."""

    file: str
    record: int
    columns: dict[str, str]
    csv: bool
    report: PreferenceReport
    skip_invalid: bool

    def name(self, canonical: str) -> str:
        """The file's name for a canonical field (also for nested paths such as ``chosen[1].content``)."""
        head, sep, rest = canonical.partition(".")
        bracket = head.find("[")
        if bracket > 0:
            rest = head[bracket:] + sep + rest
            head, sep = head[:bracket], ""
        return self.columns.get(head, head) + sep + rest

    def fail(self, reason: str, message: str, field: str | None) -> _RecordError:
        return _RecordError(
            reason,
            message,
            file=self.file,
            record=self.record,
            field=None if field is None else self.name(field),
        )


# ------------------------------------------------------------------------------------------------ loaders


def load_preferences(
    source: str | Path,
    *,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> tuple[list[PreferenceRecord], PreferenceReport]:
    """Read pairwise or ranked preference data into :class:`PreferenceRecord` s.

    Args:
        source: a data file (``.json``, ``.jsonl``, ``.json(l).gz``, ``.csv``, ``.parquet``) or a hub id.
        format: ``"auto"`` (detect from the first record's fields) or one of :data:`PREFERENCE_FORMATS`.
        columns: canonical field name -> the file's column, e.g. ``{"prompt": "question"}``.
        skip_invalid: count bad records in ``report.skipped`` instead of raising.
        limit: stop once this many records have been kept.

    Returns:
        The records (responses best first) and a :class:`PreferenceReport`.

    Raises:
        AlignlabError: a bad file, an unknown format, or (without ``skip_invalid``) a bad record, naming
            the file, the record and the field.
    """
    return _load(source, format, columns, skip_invalid, limit, PREFERENCE_FORMATS, _PARSERS)


def load_feedback(
    source: str | Path,
    *,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> tuple[list[FeedbackRecord], PreferenceReport]:
    """Read unpaired feedback (``{prompt, completion, label}`` or ``{messages, label}``) into
    :class:`FeedbackRecord` s. Arguments, returns and errors as in :func:`load_preferences`;
    ``format`` is ``"auto"`` or ``"unpaired"``."""
    return _load(source, format, columns, skip_invalid, limit, FEEDBACK_FORMATS, _FEEDBACK_PARSERS)


def detect_format(record: dict[str, Any], columns: dict[str, str] | None = None) -> str | None:
    """The format of one raw record judged by its fields (after ``columns`` mapping), or ``None``.

    Returns one of :data:`PREFERENCE_FORMATS`, ``"unpaired"`` for feedback, or ``None``.
    """
    keys = set(_rename(record, columns or {}))
    root = record.get((columns or {}).get("prompt", "prompt"))
    if "message_tree_id" in keys or (isinstance(root, dict) and "replies" in root):
        return "oasst"
    if {"conversations", "chosen", "rejected"} <= keys:
        return "sharegpt"
    if {"prompt", "responses"} <= keys:
        return "ranking"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "explicit"
    if {"chosen", "rejected"} <= keys:
        return "implicit"
    if "label" in keys and ("completion" in keys or "messages" in keys):
        return "unpaired"
    return None


def _load(
    source: str | Path,
    format: str,
    columns: dict[str, str] | None,
    skip_invalid: bool,
    limit: int | None,
    allowed: tuple[str, ...],
    parsers: dict[str, Any],
) -> tuple[list[Any], PreferenceReport]:
    file = str(source)
    if format != "auto" and format not in allowed:
        raise AlignlabError(
            f"unknown format {format!r}; expected 'auto' or one of {', '.join(allowed)}",
            file=file,
            field="format",
        )
    columns = _check_columns(columns or {}, file, None)
    report = PreferenceReport(source=file, format=format)
    is_csv = detect_kind(file) == "csv"
    records: list[Any] = []
    for number, raw in read_records(source):
        if limit is not None and len(records) >= limit:
            break
        report.records_read += 1
        if report.format == "auto":
            report.format = _detect_or_fail(raw, columns, file, number, allowed)
        ctx = _Context(file, number, columns, is_csv, report, skip_invalid)
        try:
            parsed = list(parsers[report.format](_rename(raw, columns), ctx))
        except _RecordError as error:
            if not skip_invalid:
                raise
            report.skip(error.reason, number)
            continue
        records.extend(parsed)
    if limit is not None:
        records = records[:limit]
    report.kept = len(records)
    for item in records:
        if isinstance(item, PreferenceRecord):
            report.by_k[len(item.responses)] += 1
        else:
            report.labels[item.label] += 1
    return records, report


def _check_columns(columns: dict[str, str], file: str, record: int | None) -> dict[str, str]:
    for key, value in columns.items():
        if key not in _CANONICAL_FIELDS:
            raise AlignlabError(
                f"unknown field {key!r} in the column mapping; known: {', '.join(_CANONICAL_FIELDS)}",
                file=file,
                record=record,
                field=key,
            )
        if not isinstance(value, str) or not value:
            raise AlignlabError("a column mapping must name a column", file=file, record=record, field=key)
    return dict(columns)


def _rename(raw: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """The record with the file's columns renamed to canonical names (unmapped keys kept as they are)."""
    if not columns:
        return raw
    inverse = {column: canonical for canonical, column in columns.items()}
    # A file column that happens to carry a mapped canonical name is shadowed by the mapping.
    out = {key: value for key, value in raw.items() if key not in columns}
    for key, value in raw.items():
        if key in inverse:
            out[inverse[key]] = value
    return out


def _detect_or_fail(
    raw: dict[str, Any], columns: dict[str, str], file: str, number: int, allowed: tuple
) -> str:
    found = detect_format(raw, columns)
    if found in allowed:
        return found
    keys = ", ".join(sorted(map(str, raw))) or "none"
    if found is not None:
        other = "load_feedback" if found == "unpaired" else "load_preferences"
        hint = f"this looks like {found!r} data, which {other} reads"
    else:
        hint = (
            "expected {prompt, chosen, rejected}, {chosen, rejected}, {conversations, chosen, rejected}, "
            "{prompt, responses[, scores]}, an OpenAssistant tree, or {prompt|messages, completion, label}"
        )
    raise AlignlabError(
        f"cannot use the fields ({keys}): {hint}; map your columns with columns=... (--columns) or name "
        "the format with format=... (--format)",
        file=file,
        record=number,
        field="(fields)",
    )


# ----------------------------------------------------------------------------------------------- helpers


def _get(raw: dict[str, Any], key: str, ctx: _Context) -> Any:
    if key not in raw or raw[key] is None:
        raise ctx.fail("missing field", f"the field {ctx.name(key)!r} is missing", key)
    return raw[key]


def _text(value: Any, path: str, ctx: _Context, *, what: str = "response") -> str:
    if not isinstance(value, str):
        raise ctx.fail("wrong type", f"expected a string, got {_type_name(value)}", path)
    if not value.strip():
        raise ctx.fail(f"empty {what}", f"the {what} is empty", path)
    return value


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        list: "a list",
        dict: "an object",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _maybe_json(value: Any, ctx: _Context) -> Any:
    """CSV cells are strings: read a cell holding a JSON list or object as that list or object."""
    if ctx.csv and isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _message(value: Any, path: str, ctx: _Context) -> dict[str, str]:
    """One message as ``{role, content}`` (``{from, value}`` and human/gpt/prompter roles accepted)."""
    if not isinstance(value, dict):
        raise ctx.fail("wrong type", f"a message must be an object, got {_type_name(value)}", path)
    role_key, content_key = (
        ("role", "content") if "role" in value or "content" in value else ("from", "value")
    )
    role = value.get(role_key)
    if not isinstance(role, str) or role.lower() not in _ROLES:
        raise ctx.fail(
            "bad role",
            f"unknown role {role!r}; expected one of {', '.join(sorted(_ROLES))}",
            f"{path}.{role_key}",
        )
    content = _text(value.get(content_key), f"{path}.{content_key}", ctx, what="message")
    return {"role": _ROLES[role.lower()], "content": content}


def _messages(value: Any, path: str, ctx: _Context) -> list[dict[str, str]]:
    value = _maybe_json(value, ctx)
    if not isinstance(value, list):
        raise ctx.fail("wrong type", f"expected a list of messages, got {_type_name(value)}", path)
    if not value:
        raise ctx.fail("empty prompt", "the list of messages is empty", path)
    return [_message(item, f"{path}[{index}]", ctx) for index, item in enumerate(value)]


def _prompt(value: Any, path: str, ctx: _Context) -> Prompt:
    """A prompt: a non-empty string, or messages ending with a user turn."""
    value = _maybe_json(value, ctx)
    if isinstance(value, str):
        return _text(value, path, ctx, what="prompt")
    if isinstance(value, list):
        return _check_prompt_messages(_messages(value, path, ctx), path, ctx, role_key=_role_key(value))
    raise ctx.fail("wrong type", f"expected a string or a list of messages, got {_type_name(value)}", path)


def _check_prompt_messages(
    messages: list[dict[str, str]],
    path: str,
    ctx: _Context,
    *,
    indexed: bool = True,
    role_key: str = "role",
) -> list[dict[str, str]]:
    """Check prompt messages. Errors name ``path[i].role_key`` when ``indexed``, else ``path``."""
    if not messages:
        raise ctx.fail("empty prompt", "the prompt has no messages", path)
    if messages[-1]["role"] != "user":
        raise ctx.fail(
            "prompt does not end with a user turn",
            f"the prompt must end with a user turn, but its last message is from {messages[-1]['role']!r}",
            f"{path}[{len(messages) - 1}].{role_key}" if indexed else path,
        )
    if any(message["role"] == "system" for message in messages[1:]):
        ctx.report.notes["prompts with a system message after the first turn"] += 1
    if any(a["role"] == b["role"] for a, b in zip(messages, messages[1:])):
        ctx.report.notes["prompts with consecutive turns of the same role"] += 1
    return messages


def _role_key(raw: Any) -> str:
    """``"from"`` for ShareGPT-style message lists (``{from, value}``), else ``"role"``: for naming fields."""
    first = raw[0] if isinstance(raw, list) and raw else raw
    return "from" if isinstance(first, dict) and "role" not in first and "from" in first else "role"


def _reply(value: Any, path: str, ctx: _Context) -> tuple[list[dict[str, str]], str]:
    """A response: a string, a ``{from, value}``/``{role, content}`` object, or messages ending with the
    assistant reply. Returns (the messages before the reply, the reply text)."""
    value = _maybe_json(value, ctx)
    if isinstance(value, str):
        return [], _text(value, path, ctx)
    if isinstance(value, dict):
        value = [value]
        single = True
    else:
        single = False
    if not isinstance(value, list):
        raise ctx.fail("wrong type", f"expected a string or messages, got {_type_name(value)}", path)
    if not value:
        raise ctx.fail("empty response", "the response has no messages", path)
    messages = [_message(item, path if single else f"{path}[{i}]", ctx) for i, item in enumerate(value)]
    last = messages[-1]
    last_path = path if single else f"{path}[{len(messages) - 1}]"
    if last["role"] != "assistant":
        raise ctx.fail(
            "response is not an assistant turn",
            f"the response must be an assistant turn, got {last['role']!r}",
            f"{last_path}.{'from' if 'from' in value[-1] else 'role'}",
        )
    return messages[:-1], last["content"]


def _distinct(responses: list[str], paths: list[str], ctx: _Context) -> None:
    seen: dict[str, int] = {}
    for index, text in enumerate(responses):
        key = text.strip()
        if key in seen:
            if len(responses) == 2:
                raise ctx.fail(
                    "chosen equals rejected", "chosen and rejected are the same text", paths[index]
                )
            raise ctx.fail(
                "identical responses",
                f"responses {seen[key] + 1} and {index + 1} (best first) are the same text",
                paths[index],
            )
        seen[key] = index


def _number(value: Any, path: str, ctx: _Context) -> float:
    if ctx.csv and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ctx.fail("wrong type", f"expected a finite number, got {value!r}", path)
    return float(value)


def _optional_number(raw: dict[str, Any], key: str, ctx: _Context) -> float | None:
    value = raw.get(key)
    if value is None or (ctx.csv and value == ""):
        return None
    return _number(value, key, ctx)


# ------------------------------------------------------------------------------------------------ parsers


def _parse_explicit(raw: dict[str, Any], ctx: _Context) -> Iterator[PreferenceRecord]:
    prompt = _prompt(_get(raw, "prompt", ctx), "prompt", ctx)
    chosen_context, chosen = _reply(_get(raw, "chosen", ctx), "chosen", ctx)
    rejected_context, rejected = _reply(_get(raw, "rejected", ctx), "rejected", ctx)
    for context, key in ((chosen_context, "chosen"), (rejected_context, "rejected")):
        if not context:
            continue
        # chosen/rejected repeat the conversation (UltraFeedback style): it must be the prompt.
        # (a text prompt matches a conversation whose last turn is that text from the user)
        user_turn = {"role": "user", "content": prompt}
        same = context == prompt if isinstance(prompt, list) else context[-1] == user_turn
        if not same:
            raise ctx.fail(
                "prompt mismatch",
                f"the messages before the {key} reply are not the prompt",
                f"{key}[0]",
            )
    if chosen_context and rejected_context and chosen_context != rejected_context:
        raise ctx.fail("prompt mismatch", "chosen and rejected repeat different conversations", "rejected[0]")
    if isinstance(prompt, str) and (chosen_context or rejected_context):
        key = "chosen" if chosen_context else "rejected"
        prompt = _check_prompt_messages(
            chosen_context or rejected_context, key, ctx, role_key=_role_key(raw[key])
        )
    _distinct([chosen, rejected], ["chosen", "rejected"], ctx)
    scores = None
    score_chosen = _optional_number(raw, "score_chosen", ctx)
    score_rejected = _optional_number(raw, "score_rejected", ctx)
    if (score_chosen is None) != (score_rejected is None):
        missing = "score_rejected" if score_rejected is None else "score_chosen"
        raise ctx.fail("missing field", "give both score_chosen and score_rejected, or neither", missing)
    if score_chosen is not None and score_rejected is not None:
        if score_chosen < score_rejected:
            raise ctx.fail(
                "scores contradict the labels",
                f"score_chosen ({score_chosen}) is below score_rejected ({score_rejected})",
                "score_chosen",
            )
        scores = [score_chosen, score_rejected]
    margin = _optional_number(raw, "margin", ctx)
    yield PreferenceRecord(prompt, [chosen, rejected], scores, margin, ctx.record, ctx.file)


def _parse_implicit(raw: dict[str, Any], ctx: _Context) -> Iterator[PreferenceRecord]:
    chosen_raw = _maybe_json(_get(raw, "chosen", ctx), ctx)
    rejected_raw = _maybe_json(_get(raw, "rejected", ctx), ctx)
    if isinstance(chosen_raw, str) and isinstance(rejected_raw, str):
        chosen_prompt, chosen = _split_transcript(chosen_raw, "chosen", ctx)
        rejected_prompt, rejected = _split_transcript(rejected_raw, "rejected", ctx)
        if chosen_prompt != rejected_prompt:
            raise ctx.fail(
                "prompt mismatch",
                "chosen and rejected do not share the conversation before their last Assistant turn",
                "rejected",
            )
        messages = _hh_messages(chosen_prompt, "chosen", ctx)
    elif isinstance(chosen_raw, list) and isinstance(rejected_raw, list):
        chosen_context, chosen = _reply(chosen_raw, "chosen", ctx)
        rejected_context, rejected = _reply(rejected_raw, "rejected", ctx)
        if not chosen_context:
            raise ctx.fail("missing field", "no prompt: give a prompt field or whole conversations", "prompt")
        if chosen_context != rejected_context:
            raise ctx.fail(
                "prompt mismatch",
                "chosen and rejected do not share the messages before the reply",
                "rejected",
            )
        messages = chosen_context
    else:
        bad = "chosen" if not isinstance(chosen_raw, (str, list)) else "rejected"
        raise ctx.fail(
            "wrong type",
            "without a prompt field, chosen and rejected must both be transcripts (strings) or both "
            f"lists of messages; got {_type_name(chosen_raw)} and {_type_name(rejected_raw)}",
            bad,
        )
    prompt = _check_prompt_messages(
        messages, "chosen", ctx, indexed=isinstance(chosen_raw, list), role_key=_role_key(chosen_raw)
    )
    _distinct([chosen, rejected], ["chosen", "rejected"], ctx)
    yield PreferenceRecord(prompt, [chosen, rejected], None, None, ctx.record, ctx.file)


def _split_transcript(text: str, path: str, ctx: _Context) -> tuple[str, str]:
    """Split an HH transcript at its last ``"\\n\\nAssistant:"``: (the text before, the reply stripped)."""
    cut = text.rfind(_HH_ASSISTANT)
    if cut < 0:
        raise ctx.fail(
            "no assistant turn",
            'the transcript has no "\\n\\nAssistant:" turn (expected "\\n\\nHuman: ...\\n\\nAssistant: ...")',
            path,
        )
    reply = text[cut + len(_HH_ASSISTANT) :].strip()
    if not reply:
        raise ctx.fail("empty response", "the last Assistant turn is empty", path)
    return text[:cut], reply


def _hh_messages(text: str, path: str, ctx: _Context) -> list[dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b..."`` -> messages (Human -> user, Assistant -> assistant)."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ctx.fail(
            "text before the first turn",
            f'the transcript does not start with "\\n\\nHuman:" (it starts {parts[0][:40]!r})',
            path,
        )
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        if not content.strip():
            raise ctx.fail("empty message", f"a {role} turn in the conversation is empty", path)
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if not messages:
        raise ctx.fail(
            "empty prompt", "the transcript has no Human turn before the last Assistant turn", path
        )
    return messages


def _parse_sharegpt(raw: dict[str, Any], ctx: _Context) -> Iterator[PreferenceRecord]:
    conversations = _get(raw, "conversations", ctx)
    messages = _messages(conversations, "conversations", ctx)
    prompt = _check_prompt_messages(messages, "conversations", ctx, role_key=_role_key(conversations))
    chosen_context, chosen = _reply(_get(raw, "chosen", ctx), "chosen", ctx)
    rejected_context, rejected = _reply(_get(raw, "rejected", ctx), "rejected", ctx)
    if chosen_context or rejected_context:
        raise ctx.fail(
            "wrong type",
            "chosen and rejected must each be one {from: gpt, value} reply",
            "chosen" if chosen_context else "rejected",
        )
    _distinct([chosen, rejected], ["chosen", "rejected"], ctx)
    yield PreferenceRecord(prompt, [chosen, rejected], None, None, ctx.record, ctx.file)


def _parse_ranking(raw: dict[str, Any], ctx: _Context) -> Iterator[PreferenceRecord]:
    prompt = _prompt(_get(raw, "prompt", ctx), "prompt", ctx)
    values = _maybe_json(_get(raw, "responses", ctx), ctx)
    if not isinstance(values, list):
        raise ctx.fail("wrong type", f"expected a list of responses, got {_type_name(values)}", "responses")
    responses = []
    for index, value in enumerate(values):
        context, text = _reply(value, f"responses[{index}]", ctx)
        if context:
            raise ctx.fail(
                "wrong type", "a response must be one reply, not a conversation", f"responses[{index}]"
            )
        responses.append(text)
    if len(responses) < 2:
        raise ctx.fail(
            "single response", f"a ranking needs two or more responses, got {len(responses)}", "responses"
        )
    scores = None
    unfinished = _unfinished_flags(raw, len(responses), ctx)
    raw_scores = _maybe_json(raw.get("scores"), ctx)
    if raw_scores is not None and not (ctx.csv and raw_scores == ""):
        if not isinstance(raw_scores, list):
            raise ctx.fail(
                "wrong type", f"expected a list of numbers, got {_type_name(raw_scores)}", "scores"
            )
        if len(raw_scores) != len(responses):
            raise ctx.fail(
                "scores do not match responses",
                f"{len(raw_scores)} scores for {len(responses)} responses",
                "scores",
            )
        scores = [_number(value, f"scores[{index}]", ctx) for index, value in enumerate(raw_scores)]
        order = sorted(range(len(responses)), key=lambda i: -scores[i])
        for a, b in zip(order, order[1:]):
            if scores[a] == scores[b]:
                raise ctx.fail(
                    "tied scores",
                    f"responses {a + 1} and {b + 1} have the same score ({scores[a]}), "
                    "so their order is undefined",
                    f"scores[{b}]",
                )
        responses = [responses[i] for i in order]
        scores = [scores[i] for i in order]
        unfinished = None if unfinished is None else [unfinished[i] for i in order]
    _distinct(responses, [f"responses[{i}]" for i in range(len(responses))], ctx)
    yield PreferenceRecord(prompt, responses, scores, None, ctx.record, ctx.file, unfinished)


def _unfinished_flags(raw: dict[str, Any], n: int, ctx: _Context) -> list[bool] | None:
    """The optional ``unfinished`` field of a ranking: one bool per response, in the file's order."""
    value = _maybe_json(raw.get("unfinished"), ctx)
    if value is None or (ctx.csv and value == ""):
        return None
    if not isinstance(value, list):
        raise ctx.fail("wrong type", f"expected a list of true/false, got {_type_name(value)}", "unfinished")
    if len(value) != n:
        raise ctx.fail("flags do not match responses", f"{len(value)} unfinished flags for {n} responses",
                       "unfinished")
    for index, flag in enumerate(value):
        if not isinstance(flag, bool):
            raise ctx.fail("wrong type", f"expected true or false, got {flag!r}", f"unfinished[{index}]")
    return list(value)


def _parse_oasst(raw: dict[str, Any], ctx: _Context) -> Iterator[PreferenceRecord]:
    root = _get(raw, "prompt", ctx)
    if not isinstance(root, dict):
        raise ctx.fail("wrong type", f"expected a message tree (an object), got {_type_name(root)}", "prompt")
    found: list[PreferenceRecord] = []
    _walk_tree(root, "prompt", [], ctx, found)
    yield from found


def _walk_tree(
    node: dict[str, Any],
    path: str,
    conversation: list[dict[str, str]],
    ctx: _Context,
    out: list[PreferenceRecord],
) -> None:
    role = node.get("role")
    if role not in ("prompter", "assistant"):
        raise ctx.fail("bad role", f"expected role 'prompter' or 'assistant', got {role!r}", f"{path}.role")
    text = _text(node.get("text"), f"{path}.text", ctx, what="message")
    conversation = [*conversation, {"role": "user" if role == "prompter" else "assistant", "content": text}]
    replies = node.get("replies") or []
    if not isinstance(replies, list):
        raise ctx.fail(
            "wrong type", f"expected a list of replies, got {_type_name(replies)}", f"{path}.replies"
        )
    kept: list[tuple[int, dict[str, Any]]] = []
    for index, reply in enumerate(replies):
        reply_path = f"{path}.replies[{index}]"
        if not isinstance(reply, dict):
            raise ctx.fail("wrong type", f"a reply must be an object, got {_type_name(reply)}", reply_path)
        if reply.get("deleted") is True or reply.get("review_result") is False:
            ctx.report.skip("oasst: deleted or failed review (with its subtree)", ctx.record)
            continue
        expected = "assistant" if role == "prompter" else "prompter"
        if reply.get("role") != expected:
            raise ctx.fail(
                "bad role",
                f"a reply to a {role} message must be {expected!r}, got {reply.get('role')!r}",
                f"{reply_path}.role",
            )
        kept.append((index, reply))
    if role == "prompter" and kept:
        _rank_replies(kept, path, conversation, ctx, out)
    for index, reply in kept:
        _walk_tree(reply, f"{path}.replies[{index}]", conversation, ctx, out)


def _rank_replies(
    replies: list[tuple[int, dict[str, Any]]],
    path: str,
    conversation: list[dict[str, str]],
    ctx: _Context,
    out: list[PreferenceRecord],
) -> None:
    ranked: list[tuple[int, int, str]] = []  # (rank, index, text)
    unranked: list[int] = []
    for index, reply in replies:
        rank = reply.get("rank")
        if rank is None:
            unranked.append(index)
            continue
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ctx.fail(
                "wrong type", f"a rank must be a whole number >= 0, got {rank!r}", _rp(path, index)
            )
        ranked.append((rank, index, _text(reply.get("text"), f"{path}.replies[{index}].text", ctx)))
    if unranked and not ranked:
        ctx.report.skip("oasst: unranked reply (no ranked sibling)", ctx.record, len(unranked))
        return
    if unranked:
        error = ctx.fail(
            "oasst: unranked reply beside ranked siblings",
            f"{len(ranked)} of the {len(replies)} replies to this prompt are ranked but this one has "
            "no rank, so its place in the ranking is unknown",
            _rp(path, unranked[0]),
        )
        if not ctx.skip_invalid:
            raise error
        ctx.report.skip(error.reason, ctx.record, len(unranked))
    if len(ranked) < 2:
        ctx.report.skip("oasst: single ranked reply", ctx.record)
        return
    ranked.sort()
    for (rank_a, _, _), (rank_b, index_b, _) in zip(ranked, ranked[1:]):
        if rank_a == rank_b:
            raise ctx.fail("tied ranks", f"two replies share rank {rank_b}", _rp(path, index_b))
    responses = [text for _, _, text in ranked]
    _distinct(responses, [f"{path}.replies[{index}].text" for _, index, _ in ranked], ctx)
    prompt = _check_prompt_messages(conversation, path, ctx, indexed=False)
    out.append(PreferenceRecord(prompt, responses, None, None, ctx.record, ctx.file))


def _rp(path: str, index: int) -> str:
    return f"{path}.replies[{index}].rank"


def _parse_unpaired(raw: dict[str, Any], ctx: _Context) -> Iterator[FeedbackRecord]:
    label = _label(_get(raw, "label", ctx), ctx)
    if raw.get("completion") is None and raw.get("messages") is not None:
        context, completion = _reply(raw["messages"], "messages", ctx)
        if not context:
            raise ctx.fail("empty prompt", "the messages hold only the completion, no prompt", "messages")
        prompt: Prompt = _check_prompt_messages(context, "messages", ctx, role_key=_role_key(raw["messages"]))
    else:
        source_key = "prompt" if raw.get("prompt") is not None or "messages" not in raw else "messages"
        prompt = _prompt(_get(raw, source_key, ctx), source_key, ctx)
        context, completion = _reply(_get(raw, "completion", ctx), "completion", ctx)
        if context and context != (
            prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        ):
            raise ctx.fail(
                "prompt mismatch", "the messages before the completion are not the prompt", "completion"
            )
    yield FeedbackRecord(prompt, completion, label, ctx.record, ctx.file)


def _label(value: Any, ctx: _Context) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "0", "1"):
        return value.strip().lower() in ("true", "1")
    raise ctx.fail("wrong type", f"a label must be true or false, got {value!r}", "label")


_PARSERS = {
    "explicit": _parse_explicit,
    "implicit": _parse_implicit,
    "sharegpt": _parse_sharegpt,
    "ranking": _parse_ranking,
    "oasst": _parse_oasst,
}
_FEEDBACK_PARSERS = {"unpaired": _parse_unpaired}


# ------------------------------------------------------------------------------------------- transforms


def expand_to_pairs(records: Iterable[PreferenceRecord]) -> list[PreferenceRecord]:
    """Turn every ranking of K responses into its K(K-1)/2 ordered pairs ``[better, worse]``.

    Pairs come in the order (0, 1), (0, 2), ..., (0, K-1), (1, 2), ... of the best-first responses. Where the
    ranking has scores, each pair keeps its two scores and gets ``margin = score_better - score_worse``;
    a record that is already a pair is returned unchanged (its own margin kept, else the score difference).
    """
    pairs: list[PreferenceRecord] = []
    for item in records:
        k = len(item.responses)
        for i in range(k):
            for j in range(i + 1, k):
                scores = None if item.scores is None else [item.scores[i], item.scores[j]]
                flags = None if item.unfinished is None else [item.unfinished[i], item.unfinished[j]]
                margin = (
                    item.margin
                    if k == 2 and item.margin is not None
                    else (None if scores is None else scores[0] - scores[1])
                )
                pairs.append(
                    replace(
                        item, responses=[item.responses[i], item.responses[j]], scores=scores, margin=margin,
                        unfinished=flags,
                    )
                )
    return pairs


def prompts_of(records: Sequence[PreferenceRecord | FeedbackRecord], *, unique: bool = True) -> list[Prompt]:
    """The prompts of ``records`` in order (for PPO and best-of-n prompt lists); with ``unique``, each
    prompt once (the first time it appears)."""
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for item in records:
        key = item.prompt if isinstance(item.prompt, str) else json.dumps(item.prompt, sort_keys=True)
        if unique:
            if key in seen:
                continue
            seen.add(key)
        prompts.append(item.prompt)
    return prompts


# -------------------------------------------------------------------------------------- data inspect


def default_template(prompt: Prompt) -> str:
    """The template ``template="auto"`` picks for a preference prompt: ``"chat"`` for messages, ``"none"``
    for text (as :func:`alignlab.data.formats.default_template` does for prompt/completion data)."""
    return "chat" if isinstance(prompt, list) else "none"


def is_feedback_file(
    source: str | Path, *, format: str = "auto", columns: dict[str, str] | None = None
) -> bool:
    """True when ``source`` holds unpaired feedback (``format="unpaired"`` or detected from record 1)."""
    if format != "auto":
        return format == "unpaired"
    for _, record in read_records(source):
        return detect_format(record, columns) == "unpaired"
    return False


def inspect_preference_file(
    source: str | Path,
    tokenizer: Any,
    *,
    format: str = "auto",
    template: str = "chat",
    n: int = 3,
    columns: dict[str, str] | None = None,
    skip_invalid: bool = True,
    width: int = 160,
) -> str:
    """A readable account of a preference (or unpaired feedback) file.

    Args:
        source: the data file (or hub id).
        tokenizer: the tokenizer whose token counts are shown.
        format: ``"auto"``, one of :data:`~alignlab.data.preference.PREFERENCE_FORMATS`, or ``"unpaired"``.
        template: ``"chat"``, ``"alpaca"`` or ``"none"``, as for training; ``"auto"`` picks per record
            (:func:`default_template`: chat for prompts given as messages, none for text).
        n: how many records to show.
        columns: canonical field -> the file's column.
        skip_invalid: count bad records in the report (``False``: raise on the first).
        width: the longest text shown per message or response (longer text is cut with ``...``).

    Returns:
        The text to print: per shown record the prompt, the responses in order with their token counts, then
        the loader's report.

    Raises:
        AlignlabError: an unreadable file, an unknown format, or a prompt the template cannot render (naming
            the file, record and field).
    """
    feedback = is_feedback_file(source, format=format, columns=columns)
    loader = load_feedback if feedback else load_preferences
    records, report = loader(source, format=format, columns=columns, skip_invalid=skip_invalid)
    lines: list[str] = []
    for item in records[: max(n, 0)]:
        lines.extend(_show(item, tokenizer, template, width))
        lines.append("")
    if len(records) > n:
        lines.append(f"... {len(records) - n} more records")
        lines.append("")
    lines.append(report.summary())
    from alignlab.data.hygiene import check_hygiene

    lines.append(check_hygiene(records)[2].summary())
    return "\n".join(lines)


def _show(item: PreferenceRecord | FeedbackRecord, tokenizer: Any, template: str, width: int) -> list[str]:
    if template == "auto":
        template = default_template(item.prompt)
    if isinstance(item, FeedbackRecord):
        responses, finished = [item.completion], [not item.unfinished]
    else:
        responses, finished = item.responses, [item.finished(i) for i in range(len(item.responses))]
    counts = [_count(tokenizer, item, r, template, f) for r, f in zip(responses, finished)]
    prompt_tokens = sorted({prompt for prompt, _ in counts})
    prompt_note = "/".join(map(str, prompt_tokens))  # differs only when a BPE merge crosses the boundary
    lines = [f"record {item.record}: prompt {prompt_note} tokens (template {template})"]
    if isinstance(item.prompt, str):
        lines.append(f"  prompt: {_clip(item.prompt, width)}")
    else:
        lines.append(f"  prompt ({len(item.prompt)} message{'s' if len(item.prompt) > 1 else ''}):")
        lines.extend(f"    [{m['role']}] {_clip(m['content'], width)}" for m in item.prompt)
    if isinstance(item, FeedbackRecord):
        label = "desirable" if item.label else "undesirable"
        lines.append(f"  completion ({label}, {counts[0][1]} tokens): {_clip(item.completion, width)}")
        return lines
    for index, (response, (_, tokens)) in enumerate(zip(item.responses, counts)):
        rank = "best" if index == 0 else ("worst" if index == len(item.responses) - 1 else f"#{index + 1}")
        score = "" if item.scores is None else f", score {item.scores[index]:g}"
        margin = f", margin {item.margin:g}" if item.margin is not None and index == 0 else ""
        cut = "" if item.finished(index) else ", unfinished: no EOS"
        lines.append(f"  {index + 1}. ({rank}{score}{margin}, {tokens} tokens{cut}) {_clip(response, width)}")
    return lines


def _count(
    tokenizer: Any, item: PreferenceRecord | FeedbackRecord, response: str, template: str, finished: bool
) -> tuple[int, int]:
    try:
        prompt_ids, completion_ids = encode_prompt_completion(
            tokenizer, item.prompt, response, template=template, finished=finished
        )
    except AlignlabError as error:
        raise AlignlabError(
            f"cannot encode with template {template!r}: {error.message}",
            file=item.source,
            record=item.record,
            field=error.field or "prompt",
        ) from error
    return len(prompt_ids), len(completion_ids)


def _clip(text: str, width: int) -> str:
    flat = text.replace("\r", "").replace("\n", "\\n")
    return flat if len(flat) <= width else flat[: width - 3] + "..."
