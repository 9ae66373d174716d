"""SFT data sets: format detection, column mapping, validation errors, skip_invalid, truncation, inspect."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from alignlab.data.formats import detect_format, load_sft_dataset, normalize_record
from alignlab.data.inspect import inspect_sft_file
from alignlab.data.templates import render_alpaca_prompt
from alignlab.data.tokenize import IGNORE_INDEX, PROMPT_FILLS_MAX_LENGTH
from alignlab.errors import AlignlabError
from alignlab.models import load_tokenizer

SHARED = Path(__file__).parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("tiny-random")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def loss_text(tokenizer, example) -> list[str]:
    runs = itertools.groupby(zip(example.input_ids, example.labels), key=lambda pair: pair[1] != IGNORE_INDEX)
    return [tokenizer.decode([token for token, _ in run]) for has_loss, run in runs if has_loss]


def test_detect_format() -> None:
    assert detect_format({"instruction": "a", "input": "", "output": "b"}) == "alpaca"
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"text": "a"}) == "text"
    assert detect_format({"Q": "a", "A": "b"}, columns={"instruction": "Q", "output": "A"}) == "alpaca"
    with pytest.raises(AlignlabError) as info:
        detect_format({"question": "a", "answer": "b"}, file="d.jsonl", number=1)
    assert "['answer', 'question']" in str(info.value) and "d.jsonl: record 1" in str(info.value)


def test_alpaca_with_alpaca_and_chat_templates(tmp_path: Path, tiny) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Add.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "output": "Hi!"},  # input may be absent
        ],
    )
    examples, report = load_sft_dataset(path, tiny)
    assert [e.record for e in examples] == [1, 2]
    first = examples[0]
    assert tiny.decode(first.input_ids) == render_alpaca_prompt("Add.", "2 and 3") + "5<|im_end|>"
    assert loss_text(tiny, first) == ["5<|im_end|>"]
    assert report.records_read == 2 and report.examples_kept == 2

    examples, _ = load_sft_dataset(path, tiny, template="chat")
    assert tiny.decode(examples[0].input_ids) == (
        "<|im_start|>user\nAdd.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>"
    )
    assert tiny.decode(examples[1].input_ids).startswith("<|im_start|>user\nSay hi.<|im_end|>")
    assert loss_text(tiny, examples[1]) == ["Hi!<|im_end|>"]


def test_messages_sharegpt_prompt_completion_and_text(tmp_path: Path, tiny) -> None:
    messages = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "See you."},
                ]
            }
        ],
    )
    sharegpt = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "Be nice."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello!"},
                    {"from": "human", "value": "Bye"},
                    {"from": "gpt", "value": "See you."},
                ]
            }
        ],
    )
    (m,), _ = load_sft_dataset(messages, tiny)
    (s,), _ = load_sft_dataset(sharegpt, tiny)
    assert loss_text(tiny, m) == loss_text(tiny, s) == ["Hello!<|im_end|>", "See you.<|im_end|>"]
    assert tiny.decode(s.input_ids).startswith("<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nHi")

    pc = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Q: 2+2?\nA:", "completion": " 4"},
            {"prompt": [{"role": "user", "content": "2+2?"}], "completion": "4"},
        ],
    )
    (raw, chat), _ = load_sft_dataset(pc, tiny)
    assert tiny.decode(raw.input_ids) == "Q: 2+2?\nA: 4<|im_end|>"
    assert "".join(loss_text(tiny, raw)) == " 4<|im_end|>"
    assert loss_text(tiny, chat) == ["4<|im_end|>"]

    cut = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4", "unfinished": True},
                                             {"prompt": "Q:", "completion": " 5", "unfinished": "yes"},
                                             {"prompt": "Q: 2+2?\nA:", "completion": " 4", "unfinished": None}])
    (u, null), report = load_sft_dataset(cut, tiny, skip_invalid=True)
    assert null.input_ids == raw.input_ids  # null reads as finished
    assert u.input_ids == raw.input_ids[:-1] and "".join(loss_text(tiny, u)) == " 4"  # no EOS after a cut answer
    assert report.skipped_invalid == {"'unfinished' is not a bool": 1}

    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "The movie was great."}])
    (t,), _ = load_sft_dataset(text, tiny)
    assert t.labels == t.input_ids and tiny.decode(t.input_ids) == "The movie was great.<|im_end|>"


def test_column_mapping_csv(tmp_path: Path, tiny) -> None:
    path = tmp_path / "ko.csv"
    path.write_text("Q,A,label\n안녕?,안녕하세요.,0\n", encoding="utf-8")
    (example,), report = load_sft_dataset(path, tiny, columns={"instruction": "Q", "output": "A"})
    assert tiny.decode(example.input_ids) == render_alpaca_prompt("안녕?") + "안녕하세요.<|im_end|>"
    with pytest.raises(AlignlabError, match="unknown column 'question'"):
        load_sft_dataset(path, tiny, columns={"question": "Q"})
    with pytest.raises(AlignlabError, match="cannot tell the format"):
        load_sft_dataset(path, tiny)


BAD = [
    # (record, expected field, reason, message fragment)
    ({"instruction": "x"}, "output", "missing field 'output'", "missing field 'output'"),
    ({"instruction": "x", "output": 42}, "output", "'output' is not a string", "found a number"),
    ({"instruction": "x", "output": "  "}, "output", "empty response", "is empty"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "input", "'input' is not a string", "found a list"),
    ({"instruction": "", "output": "y"}, "instruction", "empty 'instruction'", "is empty"),
]


@pytest.mark.parametrize("bad, field, reason, fragment", BAD)
def test_invalid_alpaca_record_names_file_record_and_field(
    tmp_path: Path, tiny, bad, field, reason, fragment
):
    good = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, bad, good])
    with pytest.raises(AlignlabError) as info:
        load_sft_dataset(path, tiny)
    assert str(info.value).startswith(f"{path}: record 3: field '{field}': ")
    assert fragment in str(info.value)
    examples, report = load_sft_dataset(path, tiny, skip_invalid=True)
    assert [e.record for e in examples] == [1, 2, 4]
    assert report.skipped_invalid == {reason: 1} and report.records_read == 4
    assert "record 3" in report.summary()


def test_invalid_mapped_column_names_the_file_column(tmp_path: Path, tiny) -> None:
    path = tmp_path / "d.csv"
    path.write_text("Q,A\nhi,hello\nhow?,\n", encoding="utf-8")
    with pytest.raises(AlignlabError) as info:
        load_sft_dataset(path, tiny, columns={"instruction": "Q", "output": "A"})
    assert str(info.value).startswith(f"{path}: record 2: field 'A': A (output) is empty")


@pytest.mark.parametrize(
    "turns, field",
    [
        ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}], "conversations[1].value"),
        ([{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}], "conversations[1].from"),
        ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": 3}], "conversations[1].value"),
        ([{"from": "human", "value": "Hi"}], "conversations"),
        ("Hi", "conversations"),
    ],
)
def test_invalid_sharegpt_turns(tmp_path: Path, tiny, turns, field) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": turns}])
    with pytest.raises(AlignlabError) as info:
        load_sft_dataset(path, tiny)
    assert str(info.value).startswith(f"{path}: record 1: field '{field}': ")


def test_file_errors_surface_through_the_loader(tmp_path: Path, tiny) -> None:
    with pytest.raises(AlignlabError, match="no such file"):
        load_sft_dataset(tmp_path / "missing.json", tiny)
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(AlignlabError, match="record 2: malformed JSON on line 2"):
        load_sft_dataset(path, tiny)
    path.write_text('{"text": "ok"}\n"just text"\n')
    with pytest.raises(AlignlabError, match="record 2: line 2 is a JSON string, not an object"):
        load_sft_dataset(path, tiny, skip_invalid=True)  # a broken file is never skipped


def test_no_chat_template(tmp_path: Path, tiny) -> None:
    plain = SimpleNamespace(chat_template=None, name_or_path="plain", eos_token_id=0)
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}],
    )
    with pytest.raises(AlignlabError, match="no chat template"):
        load_sft_dataset(path, plain)


def test_truncation_and_drops_are_counted(tmp_path: Path, tiny) -> None:
    rows = [
        {"prompt": "short ", "completion": "answer"},
        {"prompt": "short ", "completion": "a much longer answer " * 20},
        {"prompt": "a very long prompt " * 20, "completion": "x"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, report = load_sft_dataset(path, tiny, max_length=24)
    assert [e.record for e in examples] == [1, 2]
    assert len(examples[1].input_ids) == 24 and examples[1].truncated and not examples[0].truncated
    assert report.truncated == 1 and report.dropped == {PROMPT_FILLS_MAX_LENGTH: 1}
    examples, report = load_sft_dataset(path, tiny, max_length=24, truncation="drop")
    assert [e.record for e in examples] == [1]
    assert report.dropped == {"longer than max_length": 1, PROMPT_FILLS_MAX_LENGTH: 1}
    assert report.records_read == 3 == report.examples_kept + sum(report.dropped.values())
    examples, report = load_sft_dataset(path, tiny, limit=2)
    assert len(examples) == 2 and report.records_read == 2


def test_normalize_record_prompt_as_sharegpt_messages() -> None:
    record = normalize_record(
        {"prompt": [{"from": "human", "value": "Hi"}], "completion": "Hello"}, "prompt_completion", number=1
    )
    assert record.prompt == [{"role": "user", "content": "Hi"}] and record.output == "Hello"


def test_inspect_shows_loss_text_and_report(tmp_path: Path, tiny) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"instruction": "Say hi.", "output": "Hi!"}, {"instruction": "Long.", "output": "word " * 100}],
    )
    text = inspect_sft_file(path, tiny, max_length=64, n=1)
    assert "format: alpaca" in text and "template: auto -> alpaca" in text
    assert "### Response:\n[[Hi!<|im_end|>]]" in text
    assert "2 records read, 2 examples kept" in text and "truncated (max_length 64): 1" in text
    assert "record 2" not in text.split("tokens per example")[0]  # only the first example is shown


@needs_shared
def test_shared_alpaca_demo(tiny) -> None:
    examples, report = load_sft_dataset(SHARED / "alpaca_en_demo.json", tiny, max_length=4096)
    assert report.records_read == 999 and report.examples_kept == 999 and report.truncated == 0
    with_input = [e for e in examples if "### Input:\n" in tiny.decode(e.input_ids)]
    assert len(with_input) == 412
    for example in examples[:50]:
        assert example.input_ids[-1] == tiny.eos_token_id and example.labels[-1] == tiny.eos_token_id
        assert example.labels[0] == IGNORE_INDEX


@needs_shared
def test_shared_korean_chatbot_csv(tiny) -> None:
    examples, report = load_sft_dataset(
        SHARED / "ko_chatbot_data.csv", tiny, columns={"instruction": "Q", "output": "A"}, max_length=256
    )
    assert report.records_read == 11823 and report.examples_kept == 11823
    assert (
        tiny.decode(examples[0].input_ids) == render_alpaca_prompt("12시 땡!") + "하루가 또 가네요.<|im_end|>"
    )
    assert loss_text(tiny, examples[0]) == ["하루가 또 가네요.<|im_end|>"]
