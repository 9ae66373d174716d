"""Reading records: every file kind, record numbering, and an error that names file, record and field."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from alignlab.data.io import count_records, detect_kind, looks_like_hub_id, read_records
from alignlab.errors import AlignlabError

SHARED = Path(__file__).parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")

ROWS = [
    {"instruction": "Say hi", "input": "", "output": "Hi!"},
    {"instruction": "Add", "input": "1+1", "output": "2"},
]


def _jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows)


def test_jsonl_record_numbers_are_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(_jsonl(ROWS[:1]) + b"\n   \n" + _jsonl(ROWS[1:]))
    assert list(read_records(path)) == [(1, ROWS[0]), (4, ROWS[1])]


def test_json_array_object_with_one_list_and_json_lines(tmp_path: Path) -> None:
    array = tmp_path / "a.json"
    array.write_text(json.dumps(ROWS))
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"version": 1, "data": ROWS}))
    lines = tmp_path / "l.json"
    lines.write_bytes(_jsonl(ROWS))
    for path in (array, wrapped):
        assert list(read_records(path)) == [(1, ROWS[0]), (2, ROWS[1])]
    assert list(read_records(lines)) == [(1, ROWS[0]), (2, ROWS[1])]


def test_gzip_csv_and_parquet(tmp_path: Path) -> None:
    jsonl_gz = tmp_path / "d.jsonl.gz"
    jsonl_gz.write_bytes(gzip.compress(_jsonl(ROWS)))
    json_gz = tmp_path / "d.json.gz"
    json_gz.write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    assert [r for _, r in read_records(jsonl_gz)] == ROWS
    assert [r for _, r in read_records(json_gz)] == ROWS

    csv_path = tmp_path / "d.csv"
    csv_path.write_text('\ufeffQ,A,label\n"hello, there","multi\nline",0\nb,c,1\n', encoding="utf-8")
    assert list(read_records(csv_path)) == [
        (1, {"Q": "hello, there", "A": "multi\nline", "label": "0"}),
        (2, {"Q": "b", "A": "c", "label": "1"}),
    ]

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    assert list(read_records(parquet)) == [(1, ROWS[0]), (2, ROWS[1])]
    assert count_records(parquet) == 2


def test_detect_kind_and_hub_ids(tmp_path: Path) -> None:
    assert detect_kind("x.JSONL.gz") == "jsonl"
    assert detect_kind("x.json") == "json"
    assert detect_kind("x.txt") is None
    assert looks_like_hub_id("tatsu-lab/alpaca")
    assert not looks_like_hub_id("data/train.jsonl")
    assert not looks_like_hub_id("a/b/c")


def _error(path: Path | str) -> AlignlabError:
    with pytest.raises(AlignlabError) as info:
        list(read_records(path))
    return info.value


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    error = _error(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(error) and "no such file" in str(error)


def test_malformed_json_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(_jsonl(ROWS) + b'{"instruction": "x", "output": \n')
    error = _error(path)
    assert error.record == 3
    assert str(error).startswith(f"{path}: record 3: malformed JSON on line 3")


def test_invalid_utf8_names_line_record_and_field(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(_jsonl(ROWS) + b'{"instruction": "x", "output": "caf\xe9"}\n')
    error = _error(jsonl)
    assert (error.record, error.field) == (3, "output")
    assert str(error).startswith(f"{jsonl}: record 3: field 'output': invalid UTF-8 at line 3")

    array = tmp_path / "d.json"
    array.write_bytes(b'[{"output": "ok"},\n {"output": "ok"},\n {"input": "\xff\xfe"}]')
    error = _error(array)
    assert (error.record, error.field) == (3, "input") and "line 3" in str(error)

    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"Q,A\nfine,fine\nbad,\xc3(\n")
    error = _error(csv_path)
    assert str(error).startswith(f"{csv_path}: record 2: field 'A': invalid UTF-8 at line 3")


def test_record_not_an_object(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(_jsonl(ROWS[:1]) + b'["a", "list"]\n')
    error = _error(jsonl)
    assert error.record == 2 and "not an object" in str(error) and str(jsonl) in str(error)
    array = tmp_path / "d.json"
    array.write_text(json.dumps([ROWS[0], "text"]))
    error = _error(array)
    assert error.record == 2 and "string, not an object" in str(error)


@pytest.mark.parametrize(
    "name, content", [("e.jsonl", b""), ("e.jsonl", b"\n\n"), ("e.json", b"[]"), ("e.csv", b"Q,A\n")]
)
def test_empty_file(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    error = _error(path)
    assert "holds no records" in str(error) and str(path) in str(error)


def test_csv_row_with_wrong_number_of_values(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("Q,A\na,b\nc,d,e\n")
    error = _error(path)
    assert error.record == 2 and "3 values" in str(error)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hi")
    assert "unknown file type" in str(_error(path))


def test_hub_unreachable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'owner/name' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    error = _error("owner/name")
    assert error.file == "owner/name"
    assert "hub could not be reached" in str(error) and "pass a local file" in str(error)


def test_hub_dataset_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = {}

    def fake(name: str, split: str) -> list[dict]:
        calls["args"] = (name, split)
        return ROWS

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert list(read_records("owner/name", split="test")) == [(1, ROWS[0]), (2, ROWS[1])]
    assert calls["args"] == ("owner/name", "test")


@needs_shared
def test_shared_files_count() -> None:
    alpaca = [record for _, record in read_records(SHARED / "alpaca_en_demo.json")]
    assert len(alpaca) == 999
    assert sum(1 for record in alpaca if record["input"]) == 412
    rows = list(read_records(SHARED / "ko_chatbot_data.csv"))
    assert len(rows) == 11823 and rows[-1][0] == 11823
    assert set(rows[0][1]) == {"Q", "A", "label"}
    assert count_records(SHARED / "hh_rlhf_helpful_base_test.jsonl.gz") == 2354
