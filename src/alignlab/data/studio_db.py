"""The studio's SQLite store: prompts, sampled answers and people's judgements, read by the trainers directly.

``alignlab studio`` writes here; ``alignlab dpo --data studio.sqlite`` (and ``rm train``, ``ppo --prompts``) reads
here through :func:`alignlab.data.io.read_records`, which yields :func:`ranking_records`.

Schema (version :data:`SCHEMA_VERSION`, kept in ``meta``):

``items``
    one prompt and the answers shown for it: ``kind`` is ``label`` (answers sampled from one model, for
    labelling) or ``ab`` (one answer from the model before and one after a training run, for a blind A/B round
    ``ab_round``); ``model`` and ``sampling`` (JSON) say what produced the answers.
``answers``
    ``position`` (the order shown), ``text``, ``unfinished`` (cut at the token limit) and ``source`` (the model,
    or ``before``/``after`` in an A/B round).
``judgements``
    one per (item, labeller), written in one transaction: ``tiers`` (JSON, one number per answer position,
    1 = best, equal numbers = a tie), ``all_bad``, the optional ``better`` answer the person wrote, and when.
``claims``
    which browser tab of a labeller holds an item, so two tabs do not label the same item at once.
``ab_rounds``
    the two models of each blind A/B round.

The database runs in WAL mode (readers, such as a training run, never block the writer) and every judgement is
one transaction, so a crash of the server loses nothing that was acknowledged.

From judgements to training records (:func:`ranking_records`): the written better answer, when there is one, is
ranked above every sampled answer; answers in distinct tiers give one ranking, best first; tiers with ties give
one pair per two answers in different tiers (a tie says nothing about their order); "all bad" with no better
answer, or every answer in one tier, says nothing about any order and is counted as skipped.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignlab.errors import AlignlabError

__all__ = [
    "SCHEMA_VERSION",
    "StudioDB",
    "StudioReport",
    "Item",
    "ranking_records",
    "trl_records",
    "sft_records",
    "is_studio_db",
    "read_studio_records",
]

SCHEMA_VERSION = 1
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
_MAGIC = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ab_rounds (
    id INTEGER PRIMARY KEY, before_model TEXT NOT NULL, after_model TEXT NOT NULL, job TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('label', 'ab')), prompt TEXT NOT NULL,
    model TEXT NOT NULL, sampling TEXT NOT NULL, ab_round INTEGER REFERENCES ab_rounds(id), created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    item INTEGER NOT NULL REFERENCES items(id), position INTEGER NOT NULL, text TEXT NOT NULL,
    unfinished INTEGER NOT NULL, source TEXT NOT NULL, PRIMARY KEY (item, position));
CREATE TABLE IF NOT EXISTS judgements (
    id INTEGER PRIMARY KEY, item INTEGER NOT NULL REFERENCES items(id), labeller TEXT NOT NULL,
    tiers TEXT NOT NULL, all_bad INTEGER NOT NULL, better TEXT NOT NULL, created REAL NOT NULL,
    updated REAL NOT NULL, UNIQUE (item, labeller));
CREATE TABLE IF NOT EXISTS claims (
    item INTEGER NOT NULL REFERENCES items(id), labeller TEXT NOT NULL, tab TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (item, labeller));
CREATE INDEX IF NOT EXISTS items_kind ON items(kind, ab_round);
"""


@dataclass
class Item:
    """One item to judge: a prompt and its answers in the order shown (``sources`` are hidden from the page)."""

    id: int
    kind: str
    prompt: Any
    answers: list[str]
    unfinished: list[bool]
    sources: list[str]
    model: str
    sampling: dict[str, Any]
    ab_round: int | None = None


@dataclass
class StudioReport:
    """What :func:`ranking_records` made of the judgements: records kept and judgements skipped, by reason."""

    judgements: int = 0
    rankings: int = 0
    pairs: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def summary(self, source: str) -> str:
        """One line: judgements read, records made, skipped by reason."""
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()) or "none"
        return (f"{source}: {self.judgements} judgements -> {self.rankings} rankings (K >= 3) and {self.pairs} "
                f"pairs; skipped: {skipped}")


def is_studio_db(path: str | Path) -> bool:
    """True for a path ending in .sqlite/.sqlite3/.db (whether or not the file exists yet)."""
    return str(path).lower().endswith(SQLITE_SUFFIXES)


class StudioDB:
    """The studio's database. Each method opens its own connection, so any thread (or process) may call it.

    Args:
        path: the database file; created with the current schema when missing.
        create: create the file when missing (``False``: a missing file is an error, as for a trainer's --data).

    Raises:
        AlignlabError: the file is not an SQLite database, or holds another schema version.
    """

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise AlignlabError("no such file", file=str(path))
        elif self.path.is_dir():
            raise AlignlabError("is a directory; pass a studio database file", file=str(path))
        else:
            with open(self.path, "rb") as handle:
                head = handle.read(16)
            if head and head != _MAGIC:
                raise AlignlabError("not an SQLite database", file=str(path))
        try:
            with self._connect() as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if row is None:
                    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif row[0] != str(SCHEMA_VERSION):
                    raise AlignlabError(f"studio database schema version {row[0]}; this alignlab reads version "
                                        f"{SCHEMA_VERSION}", file=str(path))
        except sqlite3.DatabaseError as error:
            raise AlignlabError(f"cannot open the studio database: {error}", file=str(path)) from error

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # explicit BEGIN below
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _tx(self, fn: Any) -> Any:
        """Run ``fn(conn)`` in one IMMEDIATE transaction (committed, or rolled back on an exception)."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return out
        finally:
            conn.close()

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        conn = self._connect()
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    # -- writing ---------------------------------------------------------------------------------------

    def add_item(self, prompt: Any, answers: Sequence[str], unfinished: Sequence[bool], sources: Sequence[str], *,
                 model: str, sampling: dict[str, Any], kind: str = "label", ab_round: int | None = None) -> int:
        """Store a prompt and the answers to show (in this order); returns the item id."""
        if len(answers) != len(unfinished) or len(answers) != len(sources) or len(answers) < 2:
            raise ValueError("an item needs two or more answers, each with an unfinished flag and a source")

        def write(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO items (kind, prompt, model, sampling, ab_round, created) VALUES (?, ?, ?, ?, ?, ?)",
                (kind, json.dumps(prompt), model, json.dumps(sampling, sort_keys=True), ab_round, time.time()))
            item = int(cur.lastrowid)
            conn.executemany("INSERT INTO answers VALUES (?, ?, ?, ?, ?)",
                             [(item, i, a, int(u), s) for i, (a, u, s) in enumerate(zip(answers, unfinished, sources))])
            return item

        return self._tx(write)

    def add_ab_round(self, before_model: str, after_model: str, job: str) -> int:
        """Register a blind A/B round between two models; returns its id."""
        return self._tx(lambda conn: int(conn.execute(
            "INSERT INTO ab_rounds (before_model, after_model, job, created) VALUES (?, ?, ?, ?)",
            (before_model, after_model, job, time.time())).lastrowid))

    def judge(self, item: int, labeller: str, tiers: Sequence[int], *, all_bad: bool = False,
              better: str = "") -> bool:
        """Store (or replace) ``labeller``'s judgement of ``item`` in one transaction; True when it is new.

        ``tiers`` holds one number per answer position (1 = best; equal numbers are a tie).

        Raises:
            AlignlabError: no such item, or ``tiers`` does not have one positive whole number per answer.
        """
        def write(conn: sqlite3.Connection) -> bool:
            n = conn.execute("SELECT COUNT(*) FROM answers WHERE item=?", (item,)).fetchone()[0]
            if n == 0:
                raise AlignlabError(f"no item {item}", field="item")
            if len(tiers) != n or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tiers):
                raise AlignlabError(f"expected one rank (a whole number >= 1) for each of the {n} answers",
                                    field="tiers")
            now = time.time()
            old = conn.execute("SELECT 1 FROM judgements WHERE item=? AND labeller=?", (item, labeller)).fetchone()
            conn.execute(
                "INSERT INTO judgements (item, labeller, tiers, all_bad, better, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (item, labeller) DO UPDATE SET tiers=excluded.tiers, "
                "all_bad=excluded.all_bad, better=excluded.better, updated=excluded.updated",
                (item, labeller, json.dumps(list(tiers)), int(all_bad), better, now, now))
            conn.execute("DELETE FROM claims WHERE item=? AND labeller=?", (item, labeller))
            return old is None

        return self._tx(write)

    def claim_next(self, labeller: str, tab: str, *, kind: str = "label", ab_round: int | None = None,
                   hold_s: float = 600.0) -> Item | None:
        """The next item ``labeller`` has not judged and no other tab of theirs holds (claimed for ``tab``).

        A tab keeps its claimed item across reloads (the same ``tab`` gets it back), so a half-done judgement is
        never moved; claims older than ``hold_s`` lapse (a closed tab)."""
        def pick(conn: sqlite3.Connection) -> int | None:
            now = time.time()
            round_sql = "" if ab_round is None else " AND i.ab_round = ?"
            args: list[Any] = [kind] + ([] if ab_round is None else [ab_round])
            mine = conn.execute(
                "SELECT i.id FROM items i JOIN claims c ON c.item = i.id AND c.labeller = ? AND c.tab = ? "
                "WHERE i.kind = ?" + round_sql + " AND c.at > ? AND NOT EXISTS (SELECT 1 FROM judgements j "
                "WHERE j.item = i.id AND j.labeller = ?) ORDER BY i.id LIMIT 1",
                [labeller, tab, *args, now - hold_s, labeller]).fetchone()
            if mine is None:
                mine = conn.execute(
                    "SELECT i.id FROM items i WHERE i.kind = ?" + round_sql + " AND NOT EXISTS (SELECT 1 FROM "
                    "judgements j WHERE j.item = i.id AND j.labeller = ?) AND NOT EXISTS (SELECT 1 FROM claims c "
                    "WHERE c.item = i.id AND c.labeller = ? AND c.tab != ? AND c.at > ?) ORDER BY i.id LIMIT 1",
                    [*args, labeller, labeller, tab, now - hold_s]).fetchone()
            if mine is None:
                return None
            conn.execute("INSERT INTO claims VALUES (?, ?, ?, ?) ON CONFLICT (item, labeller) DO UPDATE SET "
                         "tab=excluded.tab, at=excluded.at", (mine[0], labeller, tab, now))
            return int(mine[0])

        item = self._tx(pick)
        return None if item is None else self.item(item)

    # -- reading ---------------------------------------------------------------------------------------

    def item(self, item: int) -> Item | None:
        """One item with its answers, or None."""
        rows = self._read("SELECT id, kind, prompt, model, sampling, ab_round FROM items WHERE id=?", (item,))
        if not rows:
            return None
        id_, kind, prompt, model, sampling, ab_round = rows[0]
        answers = self._read("SELECT text, unfinished, source FROM answers WHERE item=? ORDER BY position", (item,))
        return Item(id_, kind, json.loads(prompt), [a[0] for a in answers], [bool(a[1]) for a in answers],
                    [a[2] for a in answers], model, json.loads(sampling), ab_round)

    def counts(self, labeller: str | None = None) -> dict[str, int]:
        """Label items, judgements (of label items, all labellers), and for ``labeller`` their judged and
        pending label items; also the number of written better answers."""
        items = self._read("SELECT COUNT(*) FROM items WHERE kind='label'")[0][0]
        judged = self._read("SELECT COUNT(*) FROM judgements j JOIN items i ON i.id=j.item WHERE i.kind='label'")[0][0]
        better = self._read("SELECT COUNT(*) FROM judgements j JOIN items i ON i.id=j.item "
                            "WHERE i.kind='label' AND j.better != ''")[0][0]
        out = {"items": items, "judgements": judged, "better_answers": better}
        if labeller is not None:
            mine = self._read("SELECT COUNT(*) FROM judgements j JOIN items i ON i.id=j.item "
                              "WHERE i.kind='label' AND j.labeller=?", (labeller,))[0][0]
            out["labelled"] = mine
            out["pending"] = items - mine
        return out

    def pending(self, labeller: str) -> int:
        """Label items ``labeller`` has not judged yet."""
        return self.counts(labeller)["pending"]

    def prompts_used(self) -> int:
        """How many label items have been made (the sampler's position in the prompt list)."""
        return self._read("SELECT COUNT(*) FROM items WHERE kind='label'")[0][0]

    def judgements(self, *, kind: str = "label", labellers: Sequence[str] | None = None,
                   ab_round: int | None = None) -> list[dict[str, Any]]:
        """Every judgement of ``kind`` items (of ``labellers`` when given), oldest first, with its item."""
        sql = ("SELECT j.id, j.item, j.labeller, j.tiers, j.all_bad, j.better, j.created FROM judgements j "
               "JOIN items i ON i.id = j.item WHERE i.kind = ?")
        args: list[Any] = [kind]
        if labellers:
            sql += f" AND j.labeller IN ({','.join('?' * len(labellers))})"
            args += list(labellers)
        if ab_round is not None:
            sql += " AND i.ab_round = ?"
            args.append(ab_round)
        items: dict[int, Item | None] = {}
        out = []
        for id_, item, labeller, tiers, all_bad, better, created in self._read(sql + " ORDER BY j.id", args):
            if item not in items:
                items[item] = self.item(item)
            out.append({"id": id_, "item": items[item], "labeller": labeller, "tiers": json.loads(tiers),
                        "all_bad": bool(all_bad), "better": better, "created": created})
        return out

    def labellers(self) -> list[str]:
        """Everyone who has judged something, by name."""
        return [r[0] for r in self._read("SELECT DISTINCT labeller FROM judgements ORDER BY labeller")]

    def ab_round(self, round_id: int) -> dict[str, Any] | None:
        """An A/B round's models and size, or None."""
        rows = self._read("SELECT id, before_model, after_model, job, created FROM ab_rounds WHERE id=?", (round_id,))
        if not rows:
            return None
        size = self._read("SELECT COUNT(*) FROM items WHERE ab_round=?", (round_id,))[0][0]
        return dict(zip(("id", "before", "after", "job", "created"), rows[0]), items=size)

    def ab_rounds(self) -> list[int]:
        """Every A/B round id, oldest first."""
        return [r[0] for r in self._read("SELECT id FROM ab_rounds ORDER BY id")]


# ------------------------------------------------------------------------------------- training records


def _ordered_tiers(judgement: dict[str, Any]) -> list[list[int]] | None:
    """The answer positions grouped by tier, best first (a written better answer is position -1 in the first
    tier of its own); None when the judgement orders nothing."""
    item: Item = judgement["item"]
    n = len(item.answers)
    tiers = [1] * n if judgement["all_bad"] else judgement["tiers"]
    groups: dict[int, list[int]] = {}
    for position, tier in enumerate(tiers):
        groups.setdefault(tier, []).append(position)
    ordered = [groups[t] for t in sorted(groups)]
    better = judgement["better"].strip()
    if better and better not in item.answers:
        ordered = [[-1], *ordered]
    return ordered if len(ordered) >= 2 else None


def ranking_records(db: StudioDB, *, labellers: Sequence[str] | None = None,
                    report: StudioReport | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(judgement id, record)`` in the project's ranking format (``{prompt, responses, unfinished}``, best
    first) from every labelling judgement (of ``labellers`` when given); see the module docstring for how ties,
    "all bad" and written answers become rankings and pairs. Skipped judgements are counted in ``report``."""
    report = report if report is not None else StudioReport()
    for judgement in db.judgements(labellers=labellers):
        report.judgements += 1
        item: Item = judgement["item"]
        ordered = _ordered_tiers(judgement)
        if ordered is None:
            report.skipped["all answers tied and no better answer written"] += 1
            continue

        better = judgement["better"].strip()
        texts = {i: (a, u) for i, (a, u) in enumerate(zip(item.answers, item.unfinished))} | {-1: (better, False)}

        extra = {"labeller": judgement["labeller"], "item": item.id}
        if all(len(group) == 1 for group in ordered):
            chosen = [texts[group[0]] for group in ordered]
            report.rankings += len(chosen) >= 3
            report.pairs += len(chosen) == 2
            yield judgement["id"], {"prompt": item.prompt, "responses": [t for t, _ in chosen],
                                    "unfinished": [u for _, u in chosen], **extra}
            continue
        for i, upper in enumerate(ordered):
            for lower in ordered[i + 1:]:
                for a in upper:
                    for b in lower:
                        pair = [texts[a], texts[b]]
                        if pair[0][0] == pair[1][0]:
                            report.skipped["identical answers in a pair"] += 1
                            continue
                        report.pairs += 1
                        yield judgement["id"], {"prompt": item.prompt, "responses": [t for t, _ in pair],
                                                "unfinished": [u for _, u in pair], **extra}


def trl_records(db: StudioDB, *, labellers: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """TRL's preference format, one ``{prompt, chosen, rejected}`` per ordered pair of every ranking.

    A prompt given as chat messages gives TRL's conversational form (``chosen``/``rejected`` are one assistant
    message each); a text prompt gives the standard form (strings)."""
    for _, record in ranking_records(db, labellers=labellers):
        responses = record["responses"]
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                chosen, rejected = responses[i], responses[j]
                if isinstance(record["prompt"], list):
                    chosen = [{"role": "assistant", "content": chosen}]
                    rejected = [{"role": "assistant", "content": rejected}]
                yield {"prompt": record["prompt"], "chosen": chosen, "rejected": rejected}


def sft_records(db: StudioDB, *, labellers: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """``{prompt, completion}`` SFT examples from every written better answer (chat prompts give the
    ``messages`` form instead: the prompt messages and the answer as the assistant turn)."""
    for judgement in db.judgements(labellers=labellers):
        better = judgement["better"].strip()
        if not better:
            continue
        prompt = judgement["item"].prompt
        if isinstance(prompt, list):
            yield {"messages": [*prompt, {"role": "assistant", "content": better}]}
        else:
            yield {"prompt": prompt, "completion": better}


def read_studio_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """What :func:`alignlab.data.io.read_records` yields for a studio database: its ranking records (record
    number = judgement id). The conversion's summary (kept and skipped judgements) goes to stderr."""
    db = StudioDB(path, create=False)
    report = StudioReport()
    yield from ranking_records(db, report=report)
    print(report.summary(str(path)), file=sys.stderr)
    if report.rankings + report.pairs == 0:
        raise AlignlabError(f"no usable judgements yet ({report.judgements} read); label some answers in the "
                            "studio first", file=str(path))
