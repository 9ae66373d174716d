"""Preference data: every pairwise, ranked and unpaired format normalised to one record.

Every method that learns from preferences (reward models, the DPO family, KTO, PPO and best-of-n prompt
lists) reads :class:`PreferenceRecord` (a prompt and its responses, best first) or, for unpaired feedback,
:class:`FeedbackRecord`. The loaders read a file with :func:`alignlab.data.io.read_records`, detect the
format from the first record's fields (or take ``format=``), and return the records together with a
:class:`PreferenceReport` that counts what was read, kept and skipped, and why.

The formats each loader reads, and how each is parsed, are in :mod:`alignlab.data.preference_formats`;
the records and the report in :mod:`alignlab.data.preference_records`.

:func:`inspect_preference_file` is ``alignlab data inspect`` for these files: the first records as the
loaders normalised them, with token counts, and the report.

A prompt is either a string or a list of messages ending with a user turn. Every bad record is an
:class:`~alignlab.errors.AlignlabError` naming the file, the 1-based record and the field; with
``skip_invalid=True`` it is counted in ``report.skipped`` under a short reason instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from alignlab.data.io import detect_kind, read_records
from alignlab.data.preference_formats import CANONICAL_FIELDS, FEEDBACK_PARSERS, PARSERS, ParseContext, RecordError
from alignlab.data.preference_records import (
    FEEDBACK_FORMATS,
    PREFERENCE_FORMATS,
    FeedbackRecord,
    PreferenceRecord,
    PreferenceReport,
    Prompt,
)
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
    return _load(source, format, columns, skip_invalid, limit, PREFERENCE_FORMATS, PARSERS)


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
    return _load(source, format, columns, skip_invalid, limit, FEEDBACK_FORMATS, FEEDBACK_PARSERS)


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
        ctx = ParseContext(file, number, columns, is_csv, report, skip_invalid)
        try:
            parsed = list(parsers[report.format](_rename(raw, columns), ctx))
        except RecordError as error:
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
        if key not in CANONICAL_FIELDS:
            raise AlignlabError(
                f"unknown field {key!r} in the column mapping; known: {', '.join(CANONICAL_FIELDS)}",
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
