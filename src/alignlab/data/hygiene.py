"""Data hygiene, reported not enforced: exact duplicates, held-out examples identical to training ones, and
contradictory labels.

A duplicated example weighs twice in the loss; a held-out example that is also a training example inflates the
evaluation; the same completion labelled both desirable and undesirable (KTO), or the same two responses preferred
both ways, teaches nothing but noise. Each is counted (with the first record numbers) in the data report and in
``alignlab data inspect``; ``dedupe=true`` drops them: repeated training examples after their first copy, held-out
examples seen in training, and every record of a contradictory group.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HygieneReport", "check_hygiene", "example_key"]

SHOWN = 5  # record numbers shown per finding


@dataclass
class HygieneReport:
    """What :func:`check_hygiene` found (counts of examples, with the first few record numbers).

    Attributes:
        duplicates: training examples identical to an earlier training example.
        overlap: held-out examples identical to a training example.
        contradictory: examples in groups whose labels (or preference order) disagree.
        dropped: examples removed by ``dedupe`` (0 when it is off).
    """

    duplicates: int = 0
    overlap: int = 0
    contradictory: int = 0
    dropped: int = 0
    records: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def _add(self, kind: str, record: int) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.records[kind]) < SHOWN:
            self.records[kind].append(record)

    @property
    def clean(self) -> bool:
        return not (self.duplicates or self.overlap or self.contradictory)

    def summary(self) -> str:
        """One line per finding, or a line saying there is none."""
        if self.clean:
            return "  hygiene: no exact duplicates, no held-out/train overlap, no contradictory labels"
        words = {"duplicates": "exact duplicates of an earlier training example",
                 "overlap": "held-out examples identical to a training example (they inflate the evaluation)",
                 "contradictory": "examples with contradictory labels (the same answer both desirable and "
                                  "undesirable, or the same pair preferred both ways)"}
        lines = []
        for kind, what in words.items():
            count = getattr(self, kind)
            if count:
                where = ", ".join(map(str, self.records[kind])) + (", ..." if count > SHOWN else "")
                lines.append(f"  hygiene: {count} {what} (records {where})")
        lines.append(f"  hygiene: dedupe dropped {self.dropped} of them" if self.dropped else
                     "  hygiene: kept (dedupe=true drops them)")
        return "\n".join(lines)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def example_key(item: Any) -> tuple[str, Any, Any]:
    """(identity, group, label) of one example: identical examples share the identity; examples of one group with
    different labels contradict each other (group and label are None where labels do not apply).

    * tokenized SFT examples: the token ids and loss mask;
    * preference records: the prompt and the responses in order; the group is the prompt and the set of responses,
      the label the order (so a pair given both ways contradicts itself);
    * feedback records: the prompt and completion, the label their desirability.
    """
    if hasattr(item, "input_ids") and hasattr(item, "labels"):
        return _canonical([item.input_ids, item.labels]), None, None
    if hasattr(item, "responses"):
        identity = _canonical([item.prompt, item.responses])
        return identity, _canonical([item.prompt, sorted(map(_canonical, item.responses))]), identity
    if hasattr(item, "completion"):
        group = _canonical([item.prompt, item.completion])
        return _canonical([item.prompt, item.completion, bool(item.label)]), group, bool(item.label)
    return _canonical(item), None, None


def check_hygiene(train: Sequence[Any], held_out: Sequence[Any] = (), *, dedupe: bool = False,
                  key: Callable[[Any], tuple[str, Any, Any]] = example_key) -> tuple[list, list, HygieneReport]:
    """Count duplicates, train/held-out overlap and contradictory labels; with ``dedupe`` drop them.

    Returns (train, held_out, report): the inputs unchanged when ``dedupe`` is off. Record numbers come from each
    item's ``record`` attribute (its position + 1 when it has none)."""
    report = HygieneReport()
    keys = [key(x) for x in train]
    labels: dict[Any, set] = defaultdict(set)
    for _, group, label in keys:
        if group is not None:
            labels[group].add(label)
    conflicting = {g for g, seen in labels.items() if len(seen) > 1}
    seen: set[str] = set()
    kept_train = []
    for i, (item, (identity, group, _)) in enumerate(zip(train, keys)):
        number = getattr(item, "record", i + 1)
        if group in conflicting:
            report._add("contradictory", number)
            if dedupe:
                continue
        elif identity in seen:
            report._add("duplicates", number)
            if dedupe:
                continue
        seen.add(identity)
        kept_train.append(item)
    in_train = {identity for identity, *_ in keys}
    kept_held = []
    for i, item in enumerate(held_out):
        if key(item)[0] in in_train:
            report._add("overlap", getattr(item, "record", i + 1))
            if dedupe:
                continue
        kept_held.append(item)
    if dedupe:
        report.dropped = (len(train) - len(kept_train)) + (len(held_out) - len(kept_held))
        return kept_train, kept_held, report
    return list(train), list(held_out), report
