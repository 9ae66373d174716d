"""Preference records as token examples for the DPO family: pairs (a ranking becomes all its pairs, kept together
as a unit) and unpaired feedback for KTO, each tokenized with an exact prompt/response boundary and fitted to
the length limits (every cut and drop counted), and the rows (token ids and labels) a forward pass scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alignlab.config import DPOConfig, parse_columns
from alignlab.data.hygiene import check_hygiene
from alignlab.data.preference import (
    FeedbackRecord,
    PreferenceRecord,
    default_template,
    expand_to_pairs,
    is_feedback_file,
    load_feedback,
    load_preferences,
)
from alignlab.data.tokenize import (
    IGNORE_INDEX,
    LONGER_THAN_MAX_LENGTH,
    PROMPT_FILLS_MAX_LENGTH,
    DataReport,
    encode_prompt_completion,
)
from alignlab.errors import AlignlabError
from alignlab.train.loop import Run
from alignlab.train.policy import split_eval
from alignlab.train.reference import (
    Row,
)

PROMPT_TOO_LONG = "prompt longer than max_prompt_length"
SAME_AFTER_TRUNCATION = "chosen equals rejected after truncation"


@dataclass
class PairExample:
    """One tokenized preference pair.

    Attributes:
        prompt_ids: the shared prompt, ``(p,)``.
        chosen_ids: the preferred response, ``(c,)``, ending with EOS unless cut.
        rejected_ids: the other response, ``(r,)``.
        record: the 1-based record number in the source file.
        truncated: whether the length policy cut the prompt or a response.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    record: int
    truncated: bool = False

    def __len__(self) -> int:
        """The width of its rows in a batch: prompt plus the longer response."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class FeedbackExample:
    """One tokenized unpaired example (KTO): a prompt, a completion and whether it is desirable."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    record: int
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def sequence_row(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> Row:
    return [*prompt_ids, *completion_ids], [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids)


def pair_rows(pairs: Sequence[PairExample]) -> list[Row]:
    """The ``2b`` rows of one concatenated forward: every chosen row, then every rejected row."""
    chosen = [sequence_row(p.prompt_ids, p.chosen_ids) for p in pairs]
    return chosen + [sequence_row(p.prompt_ids, p.rejected_ids) for p in pairs]


def distinct_rows(rows: Sequence[Row]) -> tuple[list[Row], list[int]]:
    """The distinct rows in first-seen order, and for every row the index of its twin among them: the pairs
    of one ranking share their answers (K answers, K(K-1)/2 pairs), which are then scored once."""
    index: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    distinct: list[Row] = []
    inverse = []
    for row in rows:
        key = (tuple(row[0]), tuple(row[1]))
        if key not in index:
            index[key] = len(distinct)
            distinct.append(row)
        inverse.append(index[key])
    return distinct, inverse


def ranking_units(examples: Sequence[PairExample], group: bool) -> list[list[int]]:
    """What a batch is made of: with ``group``, the indices of each record's pairs (a ranking's pairs stay
    together, so its answers are encoded once for all of them); otherwise every example on its own."""
    if not group:
        return [[i] for i in range(len(examples))]
    units: dict[int, list[int]] = {}
    for i, example in enumerate(examples):
        units.setdefault(example.record, []).append(i)
    return list(units.values())


def unit_tokens(examples: Sequence[PairExample]) -> int:
    """The tokens the policy's forward runs for ``examples`` batched together (a plan unit, for ``max_tokens``):
    each prompt once and each of its distinct responses once, as the shared-prompt layout encodes a ranking's
    pairs."""
    responses: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
    for e in examples:
        responses.setdefault(tuple(e.prompt_ids), set()).update((tuple(e.chosen_ids), tuple(e.rejected_ids)))
    return sum(len(p) + sum(map(len, rs)) for p, rs in responses.items())


def kl_rows(examples: Sequence[FeedbackExample], max_length: int) -> list[Row]:
    """KTO's mismatched rows: row ``j`` is prompt ``j`` with the completion of example ``j - 1`` (cyclic), as
    TRL builds them, cut to ``max_length``."""
    rows = []
    for j, example in enumerate(examples):
        other = examples[j - 1].completion_ids
        rows.append(sequence_row(example.prompt_ids, other[: max(1, max_length - len(example.prompt_ids))]))
    return rows


# --------------------------------------------------------------------------------------------- tokenization


def encode_pair(tokenizer: Any, prompt: Any, chosen: str, rejected: str, *, template: str,
                finished: tuple[bool, bool] = (True, True)) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, chosen_ids, rejected_ids)`` with the exact boundary of :func:`encode_prompt_completion`.

    A BPE merge across the boundary can move the prompt's last token into one response but not the other; the
    prompt is then the shorter of the two prompts and each response keeps everything after it, so
    ``prompt + chosen`` and ``prompt + rejected`` are still exactly the tokenizations of the whole texts (TRL takes
    the same common prefix). A response that is not ``finished`` (cut off at a sampler's limit) ends without
    EOS, so the policy is not taught to stop where the sampler stopped it.
    """
    prompt_c, chosen_ids = encode_prompt_completion(tokenizer, prompt, chosen, template=template,
                                                    finished=finished[0])
    prompt_r, rejected_ids = encode_prompt_completion(tokenizer, prompt, rejected, template=template,
                                                      finished=finished[1])
    n = min(len(prompt_c), len(prompt_r))
    return prompt_c[:n], prompt_c[n:] + chosen_ids, prompt_r[n:] + rejected_ids


def fit_lengths(prompt_ids: list[int], responses: list[list[int]], *, max_length: int, max_prompt_length: int,
                truncation: str, keep_first: int = 0) -> tuple[list[int], list[list[int]], bool] | str:
    """Apply the length policy to a prompt and its responses.

    ``truncation="right"``: a prompt over ``max_prompt_length`` keeps its last tokens (those nearest the
    response; the first ``keep_first`` tokens, e.g. BOS, are kept too); then responses that do not fit in
    ``max_length`` lose their end. ``"drop"``: anything over a limit drops the example. Either way a prompt that
    leaves no room for a response token drops it (:data:`PROMPT_FILLS_MAX_LENGTH`).

    Returns:
        ``(prompt_ids, responses, truncated)``, or the reason the example is dropped.
    """
    truncated = False
    if max_prompt_length > 0 and len(prompt_ids) > max_prompt_length:
        if truncation == "drop":
            return PROMPT_TOO_LONG
        keep_first = min(keep_first, max_prompt_length - 1)
        prompt_ids = prompt_ids[:keep_first] + prompt_ids[len(prompt_ids) - (max_prompt_length - keep_first):]
        truncated = True
    if len(prompt_ids) >= max_length:
        return PROMPT_FILLS_MAX_LENGTH
    room = max_length - len(prompt_ids)
    if any(len(r) > room for r in responses):
        if truncation == "drop":
            return LONGER_THAN_MAX_LENGTH
        responses = [r[:room] for r in responses]
        truncated = True
    return prompt_ids, responses, truncated


def _template_for(cfg: DPOConfig, prompt: Any) -> str:
    return default_template(prompt) if cfg.template == "auto" else cfg.template


def _encode_or_skip(fn: Any, item: PreferenceRecord | FeedbackRecord, cfg: DPOConfig, report: DataReport) -> Any:
    """Run an encoder on one record; a record it cannot encode is an error naming it, or a counted skip."""
    try:
        return fn()
    except AlignlabError as error:
        located = AlignlabError(error.message, file=item.source, record=item.record, field=error.field or "prompt")
        if not cfg.skip_invalid:
            raise located from error
        report.skip("cannot encode", str(located))
        return None


def _bos_kept(tokenizer: Any, prompt_ids: list[int]) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    return 1 if bos is not None and prompt_ids[:1] == [bos] else 0


def prepare_pairs(pairs: Sequence[PreferenceRecord], tokenizer: Any, cfg: DPOConfig, source: str = ""
                  ) -> tuple[list[PairExample], DataReport]:
    """Tokenize pairs (``responses == [chosen, rejected]``) and apply the length policy; every cut and drop is
    counted in the returned :class:`DataReport` (``records_read`` counts pairs)."""
    report = DataReport(source=f"{source} (pairs)" if source else "pairs", max_length=cfg.max_length)
    examples = []
    for item in pairs:
        report.records_read += 1
        template = _template_for(cfg, item.prompt)
        encoded = _encode_or_skip(
            lambda item=item, template=template: encode_pair(tokenizer, item.prompt, item.responses[0],
                                                             item.responses[1], template=template,
                                                             finished=(item.finished(0), item.finished(1))),
            item, cfg, report)
        if encoded is None:
            continue
        prompt_ids, chosen_ids, rejected_ids = encoded
        fitted = fit_lengths(prompt_ids, [chosen_ids, rejected_ids], max_length=cfg.max_length,
                             max_prompt_length=cfg.max_prompt_length, truncation=cfg.truncation,
                             keep_first=_bos_kept(tokenizer, prompt_ids))
        if isinstance(fitted, str):
            report.drop(fitted)
            continue
        prompt_ids, (chosen_ids, rejected_ids), truncated = fitted
        if chosen_ids == rejected_ids:  # both cut inside a common beginning: the pair says nothing any more
            report.drop(SAME_AFTER_TRUNCATION)
            continue
        example = PairExample(prompt_ids, chosen_ids, rejected_ids, item.record, truncated)
        examples.append(example)
        report.examples_kept += 1
        report.truncated += int(truncated)
        report.tokens += 2 * len(prompt_ids) + len(chosen_ids) + len(rejected_ids)
        report.loss_tokens += len(chosen_ids) + len(rejected_ids)
    return examples, report


def prepare_feedback(records: Sequence[FeedbackRecord], tokenizer: Any, cfg: DPOConfig, source: str = ""
                     ) -> tuple[list[FeedbackExample], DataReport]:
    """Tokenize unpaired feedback and apply the length policy (counted, as :func:`prepare_pairs`)."""
    report = DataReport(source=f"{source} (feedback)" if source else "feedback", max_length=cfg.max_length)
    examples = []
    for item in records:
        report.records_read += 1
        template = _template_for(cfg, item.prompt)
        encoded = _encode_or_skip(
            lambda item=item, template=template: encode_prompt_completion(tokenizer, item.prompt, item.completion,
                                                                          template=template,
                                                                          finished=not item.unfinished),
            item, cfg, report)
        if encoded is None:
            continue
        prompt_ids, completion_ids = encoded
        fitted = fit_lengths(prompt_ids, [completion_ids], max_length=cfg.max_length,
                             max_prompt_length=cfg.max_prompt_length, truncation=cfg.truncation,
                             keep_first=_bos_kept(tokenizer, prompt_ids))
        if isinstance(fitted, str):
            report.drop(fitted)
            continue
        prompt_ids, (completion_ids,), truncated = fitted
        examples.append(FeedbackExample(prompt_ids, completion_ids, item.label, item.record, truncated))
        report.examples_kept += 1
        report.truncated += int(truncated)
        report.tokens += len(prompt_ids) + len(completion_ids)
        report.loss_tokens += len(completion_ids)
    return examples, report


def unpair(records: Sequence[PreferenceRecord]) -> list[FeedbackRecord]:
    """Preference records as unpaired feedback (for KTO on pair files, as TRL's ``unpair_preference_dataset``):
    the best response is desirable, the worst undesirable; the middle of a ranking is left out (it is neither)."""
    out = []
    for item in records:
        out.append(FeedbackRecord(item.prompt, item.responses[0], True, item.record, item.source,
                                  not item.finished(0)))
        out.append(FeedbackRecord(item.prompt, item.responses[-1], False, item.record, item.source,
                                  not item.finished(len(item.responses) - 1)))
    return out


def load_examples(path: str, tokenizer: Any, cfg: DPOConfig, run: Run) -> tuple[list, list]:
    """Read, split (by record, so the pairs of one ranking stay on one side) and tokenize the train and eval
    data: :class:`PairExample` s, or :class:`FeedbackExample` s for KTO."""
    columns = parse_columns(cfg.columns)
    kto = cfg.loss == "kto"
    feedback = is_feedback_file(path, format=cfg.format, columns=columns)
    if feedback and not kto:
        raise AlignlabError(f"this file holds unpaired feedback (prompt, completion, label); loss '{cfg.loss}' "
                            "needs pairs: use --loss kto", file=path, field="loss")
    load = dict(format=cfg.format, columns=columns, skip_invalid=cfg.skip_invalid, limit=cfg.limit or None)

    def read(source: str) -> list:
        if feedback:
            records, report = load_feedback(source, **load)
        else:
            records, report = load_preferences(source, **load)
        run.print(report.summary())
        return records

    records = read(path)
    if cfg.eval_data:
        train_records, eval_records = records, read(cfg.eval_data)
    else:
        train_records, eval_records = split_eval(records, cfg.eval_fraction, cfg.seed)
    train_records, eval_records, hygiene = check_hygiene(train_records, eval_records, dedupe=cfg.dedupe)
    run.print(hygiene.summary())
    sets = []
    for part, name in ((train_records, path), (eval_records, cfg.eval_data or f"{path} (held out)")):
        if kto:
            part = part if feedback else unpair(part)
            examples, report = prepare_feedback(part, tokenizer, cfg, name)
        else:
            examples, report = prepare_pairs(expand_to_pairs(part), tokenizer, cfg, name)
        if part:
            run.print(report.summary())
        sets.append(examples)
    if not sets[0]:
        raise AlignlabError("no training examples left after tokenization and the length policy (see the report "
                            "above)", file=path)
    return sets[0], sets[1]


