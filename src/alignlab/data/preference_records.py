"""The normalised preference records every method reads: :class:`PreferenceRecord` (a prompt and its responses,
best first), :class:`FeedbackRecord` (one labelled completion) and :class:`PreferenceReport` (what a loader
read, kept and skipped, and why)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

Prompt = str | list[dict[str, str]]

PREFERENCE_FORMATS = ("explicit", "implicit", "sharegpt", "ranking", "oasst")
FEEDBACK_FORMATS = ("unpaired",)


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
