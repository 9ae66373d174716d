"""The studio's SQLite store: schema, transactions, claims, the records trainers read, exports, statistics."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from alignlab.data.io import read_records
from alignlab.data.preference import load_preferences
from alignlab.data.studio_db import SCHEMA_VERSION, StudioDB, StudioReport, ranking_records, sft_records, trl_records
from alignlab.errors import AlignlabError
from alignlab.studio.stats import ab_result, agreement, kendall_tau_b, wilson_interval
from alignlab.tasks.loading import load_prompts

CHAT = [{"role": "user", "content": "Name a colour."}]


def _db(tmp_path, n_items=3, k=3):
    db = StudioDB(tmp_path / "s.sqlite")
    for i in range(n_items):
        db.add_item(CHAT, [f"answer {i}-{j}" for j in range(k)], [j == k - 1 for j in range(k)], ["m"] * k,
                    model="m", sampling={"temperature": 0.8})
    return db


def test_schema_version_wal_and_bad_files(tmp_path):
    db = _db(tmp_path, 1)
    conn = sqlite3.connect(db.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(AlignlabError, match="schema version 99"):
        StudioDB(db.path)
    text = tmp_path / "not.sqlite"
    text.write_text("hello, not a database")
    with pytest.raises(AlignlabError, match="not an SQLite database"):
        StudioDB(text)
    with pytest.raises(AlignlabError, match="no such file"):
        list(read_records(tmp_path / "missing.sqlite"))


def test_item_stores_model_and_sampling_and_judgement_replaces(tmp_path):
    db = _db(tmp_path, 1)
    item = db.item(1)
    assert item.prompt == CHAT and item.model == "m" and item.sampling == {"temperature": 0.8}
    assert item.unfinished == [False, False, True]
    assert db.judge(1, "ann", [2, 1, 3]) is True
    assert db.judge(1, "ann", [1, 2, 3], better="mine") is False  # the same person again: replaced, not added
    (judgement,) = db.judgements()
    assert judgement["tiers"] == [1, 2, 3] and judgement["better"] == "mine" and judgement["created"] > 0
    with pytest.raises(AlignlabError, match="one rank"):
        db.judge(1, "ann", [1, 2])
    with pytest.raises(AlignlabError, match="one rank"):
        db.judge(1, "ann", [0, 1, 2])
    with pytest.raises(AlignlabError, match="no item 7"):
        db.judge(7, "ann", [1, 2, 3])
    assert db.counts("ann") == {"items": 1, "judgements": 1, "better_answers": 1, "labelled": 1, "pending": 0}


def test_claims_keep_tabs_apart_and_survive_a_reload(tmp_path):
    db = _db(tmp_path, 3)
    first = db.claim_next("ann", "tab1")
    second = db.claim_next("ann", "tab2")
    assert first.id == 1 and second.id == 2  # two tabs of one person never get the same item
    assert db.claim_next("ann", "tab1").id == 1  # a reload of tab1 gets its half-done item back
    assert db.claim_next("bob", "tab9").id == 1  # another person labels the same items (for agreement)
    db.judge(1, "ann", [1, 2, 3])
    assert db.claim_next("ann", "tab1").id == 3
    assert db.claim_next("ann", "tab1", hold_s=0).id == 2  # lapsed claims are free again


def test_ranking_records_rankings_ties_all_bad_and_written_answers(tmp_path):
    db = _db(tmp_path, 4)
    db.judge(1, "ann", [2, 1, 3])  # B > A > C: one ranking
    db.judge(2, "ann", [1, 1, 2])  # A = B > C: two pairs
    db.judge(3, "ann", [1, 2, 3], all_bad=True)  # all bad, nothing written: orders nothing
    db.judge(4, "bob", [1, 1, 1], all_bad=True, better="a real answer")  # written > every sampled answer
    report = StudioReport()
    records = list(ranking_records(db, report=report))
    assert [r["responses"] for _, r in records] == [
        ["answer 0-1", "answer 0-0", "answer 0-2"],
        ["answer 1-0", "answer 1-2"], ["answer 1-1", "answer 1-2"],
        ["a real answer", "answer 3-0"], ["a real answer", "answer 3-1"], ["a real answer", "answer 3-2"],
    ]
    assert records[0][1]["unfinished"] == [False, False, True]
    assert records[3][1]["unfinished"] == [False, False]
    assert (report.judgements, report.rankings, report.pairs) == (4, 1, 5)
    assert report.skipped == {"all answers tied and no better answer written": 1}
    assert [r for _, r in ranking_records(db, labellers=["bob"])][0]["labeller"] == "bob"
    assert len(list(ranking_records(db, labellers=["bob"]))) == 3


def test_trainers_read_the_database_directly(tmp_path, capsys):
    db = _db(tmp_path, 2)
    db.judge(1, "ann", [3, 2, 1])
    db.judge(2, "ann", [1, 2, 2])
    records, report = load_preferences(db.path)
    assert report.format == "ranking" and report.kept == 3
    assert records[0].responses == ["answer 0-2", "answer 0-1", "answer 0-0"] and records[0].prompt == CHAT
    assert records[0].unfinished == [True, False, False]
    assert "2 judgements -> 1 rankings (K >= 3) and 2 pairs" in capsys.readouterr().err
    assert load_prompts(db.path) == [CHAT]
    (tmp_path / "e").mkdir()
    empty = _db(tmp_path / "e", 1)
    with pytest.raises(AlignlabError, match="no usable judgements"):
        load_preferences(empty.path)


def test_exports_trl_and_sft_filter_by_labeller(tmp_path):
    db = StudioDB(tmp_path / "s.db")
    db.add_item("plain prompt", ["x", "y"], [False, False], ["m", "m"], model="m", sampling={})
    db.add_item(CHAT, ["p", "q"], [False, False], ["m", "m"], model="m", sampling={})
    db.judge(1, "ann", [2, 1], better="z")
    db.judge(2, "bob", [1, 2])
    trl = list(trl_records(db))
    assert trl[:3] == [{"prompt": "plain prompt", "chosen": "z", "rejected": "y"},
                       {"prompt": "plain prompt", "chosen": "z", "rejected": "x"},
                       {"prompt": "plain prompt", "chosen": "y", "rejected": "x"}]
    assert trl[3] == {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "p"}],
                      "rejected": [{"role": "assistant", "content": "q"}]}
    assert list(trl_records(db, labellers=["bob"])) == [trl[3]]
    assert list(sft_records(db)) == [{"prompt": "plain prompt", "completion": "z"}]
    assert list(sft_records(db, labellers=["bob"])) == []


def test_concurrent_judgements_are_all_kept(tmp_path):
    db = _db(tmp_path, 10, k=2)
    errors = []

    def label(name):
        try:
            for item in range(1, 11):
                db.judge(item, name, [1, 2] if item % 2 else [2, 1])
        except Exception as error:  # pragma: no cover - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=label, args=(f"p{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert db.counts()["judgements"] == 60
    assert all(db.counts(f"p{i}")["labelled"] == 10 for i in range(6))


def test_kendall_tau_wilson_agreement_and_ab_result(tmp_path):
    assert kendall_tau_b([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # tau-b with a tie: C=2, D=0, n0=3, tied_x=0, tied_y=1 -> 2 / sqrt(3 * 2)
    assert kendall_tau_b([1, 2, 3], [1, 2, 2]) == pytest.approx(2 / 6 ** 0.5)
    assert kendall_tau_b([1, 1], [1, 2]) is None
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 0) == (0.0, 1.0)

    db = _db(tmp_path, 2)
    db.judge(1, "ann", [1, 2, 3])
    db.judge(1, "bob", [1, 2, 3])
    db.judge(2, "ann", [1, 2, 3])
    db.judge(2, "bob", [3, 2, 1])
    agree = agreement(db)
    assert agree["shared_items"] == 2 and agree["comparisons"] == 2 and agree["mean_tau"] == pytest.approx(0.0)
    assert agree["pairs"] == [{"labellers": ["ann", "bob"], "items": 2, "mean_tau": pytest.approx(0.0)}]

    round_id = db.add_ab_round("base", "runs/job-001/dpo/final", "job-001")
    for i, sources in enumerate([["before", "after"], ["after", "before"], ["before", "after"]]):
        db.add_item(CHAT, [f"u{i}", f"v{i}"], [False, False], sources, model="m", sampling={}, kind="ab",
                    ab_round=round_id)
    db.judge(3, "ann", [2, 1])  # the after answer (position 1) is better
    db.judge(4, "ann", [1, 2])  # after (position 0) is better
    db.judge(5, "ann", [1, 1])  # a tie
    result = ab_result(db, round_id)
    assert (result["after_wins"], result["before_wins"], result["ties"], result["votes"]) == (2, 0, 1, 3)
    assert result["win_rate"] == pytest.approx(2.5 / 3)
    assert (result["low"], result["high"]) == pytest.approx(wilson_interval(2.5, 3))
    assert len(list(ranking_records(db))) == 4  # the four label judgements; A/B votes are not training data


def test_cli_export_writes_each_format_and_filters(tmp_path, capsys):
    from alignlab.cli import main

    db = StudioDB(tmp_path / "s.sqlite")
    db.add_item("q", ["x", "y"], [False, True], ["m", "m"], model="m", sampling={})
    db.judge(1, "ann", [2, 1], better="z")
    db.judge(1, "bob", [1, 1])  # all tied: skipped, and counted
    out = tmp_path / "ranking.jsonl"
    assert main(["studio", "--db", str(db.path), "--export", "ranking", "--output", str(out)]) == 0
    assert [json.loads(line)["responses"] for line in out.read_text().splitlines()] == [["z", "y", "x"]]
    err = capsys.readouterr().err
    assert "1 all answers tied and no better answer written" in err and "wrote 1 ranking records" in err
    assert main(["studio", "--db", str(db.path), "--export", "trl", "--only", "bob"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["studio", "--db", str(db.path), "--export", "sft", "--only", "ann"]) == 0
    assert json.loads(capsys.readouterr().out) == {"prompt": "q", "completion": "z"}
    assert main(["studio", "--db", str(tmp_path / "none.sqlite"), "--export", "trl"]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["rm_ppo", "rm_grpo"])
def test_reward_model_jobs_train_from_the_database(tmp_path, kind):
    """The page's reward-model jobs: each stage's command runs as given on the tiny model, reading the rankings
    straight from the database, and the last stage writes the model the A/B round compares."""
    from alignlab.cli import main
    from alignlab.studio.jobs import JOB_KINDS, JobSettings

    db = _db(tmp_path, n_items=4, k=3)
    for item in range(1, 5):
        db.judge(item, "ann", [1, 2, 3])
    stages = JOB_KINDS[kind][1](JobSettings(model="tiny-random", db=db.path, steps=2, lr=1e-3, batch_size=4,
                                            max_new_tokens=8), tmp_path / "run")
    assert [st.name for st in stages] == ["reward model", kind.split("_")[1]]
    for stage in stages:
        assert main(stage.argv) == 0, stage.argv
        steps = [json.loads(line)["step"] for line in (stage.output_dir / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == stage.total
    assert (stages[-1].output_dir / "final" / "config.json").exists()
