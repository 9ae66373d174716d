"""``alignlab data inspect``: see exactly what a model will be trained on.

For the first ``n`` examples it shows the rendered text with the loss-bearing text wrapped in ``[[`` and
``]]``, token counts, and then the :class:`~alignlab.data.tokenize.DataReport` of the whole file.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import groupby
from pathlib import Path
from typing import Any

from alignlab.data.formats import default_template, detect_format, load_sft_dataset
from alignlab.data.hygiene import check_hygiene
from alignlab.data.io import read_records
from alignlab.data.tokenize import IGNORE_INDEX, TokenizedExample

__all__ = ["LOSS_OPEN", "LOSS_CLOSE", "render_loss_markup", "inspect_sft_file"]

LOSS_OPEN = "[["
LOSS_CLOSE = "]]"


def render_loss_markup(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    """Decode ``input_ids`` with every run of loss-bearing tokens wrapped in ``[[...]]``.

    Runs are decoded separately, so a character split across a run boundary may show as ``\\ufffd``.
    """
    parts = []
    for has_loss, run in groupby(zip(input_ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in run], skip_special_tokens=False)
        parts.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if has_loss else text)
    return "".join(parts)


def _describe(example: TokenizedExample, index: int) -> str:
    loss = example.num_loss_tokens
    cut = ", truncated" if example.truncated else ""
    return (
        f"--- example {index} (record {example.record}): {len(example.input_ids)} tokens, "
        f"{len(example.input_ids) - loss} prompt/context, {loss} with loss{cut}"
    )


def inspect_sft_file(
    source: str | Path,
    tokenizer: Any,
    *,
    format: str = "auto",  # noqa: A002 - the user-facing option name
    template: str = "auto",
    columns: Mapping[str, str] | None = None,
    max_length: int = 1024,
    n: int = 3,
    truncation: str = "right",
    skip_invalid: bool = False,
    limit: int | None = None,
) -> str:
    """A plain-text report on how an SFT file renders and tokenizes.

    Shows the detected format and template, the first ``n`` examples with the text that carries loss in
    ``[[...]]`` and their token counts, then the data report (records read, kept, truncated, dropped and
    skipped, with reasons). Loads the whole file (or ``limit`` records) so the report covers all of it.

    Raises:
        AlignlabError: as :func:`~alignlab.data.formats.load_sft_dataset`.
    """
    examples, report = load_sft_dataset(
        source,
        tokenizer,
        format=format,
        template=template,
        columns=columns,
        max_length=max_length,
        truncation=truncation,
        skip_invalid=skip_invalid,
        limit=limit,
    )
    _, first = next(iter(read_records(source)))
    fmt = detect_format(first, columns=columns, file=str(source)) if format == "auto" else format
    if template == "auto":
        kind = {"messages": "conversation", "sharegpt": "conversation"}.get(fmt, fmt)
        prompt = first.get((columns or {}).get("prompt", "prompt"))
        shown_template = f"auto -> {default_template(kind, prompt)}"
    else:
        shown_template = template
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    lines = [
        f"file: {source}",
        f"format: {fmt}   template: {shown_template}   tokenizer: {name}   max_length: {max_length} "
        f"(truncation {truncation})",
        f"loss-bearing text is shown between {LOSS_OPEN} and {LOSS_CLOSE}",
        "",
    ]
    for index, example in enumerate(examples[:n], start=1):
        lines.append(_describe(example, index))
        lines.append(render_loss_markup(tokenizer, example.input_ids, example.labels))
        lines.append("")
    if examples:
        lengths = sorted(len(example.input_ids) for example in examples)
        lines.append(
            f"tokens per example: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}"
        )
    lines.append(report.summary())
    lines.append(check_hygiene(examples)[2].summary())
    return "\n".join(lines)
