"""Read records from data files: one function for every file kind the toolkit accepts.

:func:`read_records` yields ``(record_number, record)`` pairs where ``record`` is a ``dict`` and
``record_number`` is 1-based and means what a user sees when they open the file:

- JSONL (``.jsonl``, ``.jsonl.gz``): the line number (blank lines are skipped but still counted);
- JSON (``.json``, ``.json.gz``): the index in the array + 1 (a top-level array, or an object holding
  exactly one list, e.g. ``{"data": [...]}``); a ``.json`` file that is really JSON lines is read as such;
- CSV (``.csv``, ``.csv.gz``): the data row (the header is not counted); every value is a string;
- Parquet (``.parquet``): the row index + 1;
- a studio database (``.sqlite``, ``.db``): its judgements as ranking records, numbered by judgement id
  (:mod:`alignlab.data.studio_db`);
- a hub dataset id (``owner/name``, when no such local path exists): the row index + 1 of ``split``.

Text is decoded strictly as UTF-8 (a leading byte-order mark is dropped). Every problem (missing file,
invalid UTF-8, malformed JSON, a record that is not an object, an empty file) is an
:class:`~alignlab.errors.AlignlabError` naming the file, the record and, where known, the field.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from alignlab.errors import AlignlabError

__all__ = ["read_records", "count_records", "detect_kind", "looks_like_hub_id"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_KINDS = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json": "json",
    ".json.gz": "json",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".parquet": "parquet",
    ".sqlite": "sqlite",
    ".sqlite3": "sqlite",
    ".db": "sqlite",
}


def detect_kind(path: str | Path) -> str | None:
    """The file kind (``"jsonl"``, ``"json"``, ``"csv"``, ``"parquet"``, ``"sqlite"``) from the name, or ``None``."""
    name = str(path).lower()
    for suffix in sorted(_KINDS, key=len, reverse=True):
        if name.endswith(suffix):
            return _KINDS[suffix]
    return None


def looks_like_hub_id(source: str | Path) -> bool:
    """True when ``source`` does not exist locally, has no data-file suffix and reads as ``owner/name``."""
    text = str(source)
    return not Path(text).exists() and detect_kind(text) is None and bool(_HUB_ID.match(text))


def read_records(source: str | Path, *, split: str = "train") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(record_number, record)`` from a data file or a hub dataset.

    Args:
        source: a path to a ``.json``, ``.jsonl``, ``.json.gz``, ``.jsonl.gz``, ``.csv``, ``.csv.gz`` or
            ``.parquet`` file, or a hub dataset id ``owner/name`` (used only when no such path exists).
        split: the split to read from a hub dataset (ignored for files).

    Yields:
        ``(record_number, record)``: the 1-based record number (JSONL line, JSON index + 1, CSV data row,
        Parquet/hub row + 1) and the record as a ``dict``.

    Raises:
        AlignlabError: the file is missing, not valid UTF-8, not valid JSON, holds a record that is not an
            object, holds no records, or the hub could not be reached.
    """
    path = Path(source)
    if not path.exists():
        if looks_like_hub_id(source):
            yield from _read_hub(str(source), split)
            return
        raise AlignlabError(f"no such file: {str(source)!r}", file=str(source))
    if path.is_dir():
        raise AlignlabError(
            "is a directory; pass a data file (.json, .jsonl, .csv, .parquet)", file=str(path)
        )
    kind = detect_kind(path)
    if kind == "sqlite":  # the studio's database: its judgements as ranking records
        from alignlab.data.studio_db import read_studio_records

        yield from read_studio_records(path)
        return
    if kind is None:
        raise AlignlabError(
            "unknown file type; expected .json, .jsonl, .json.gz, .jsonl.gz, .csv, .csv.gz, .parquet or a "
            "studio database (.sqlite, .db)",
            file=str(path),
        )
    count = 0
    if kind == "parquet":
        records = _read_parquet(path)
    else:
        data = _read_bytes(path)
        if kind == "jsonl":
            records = _read_jsonl(path, data)
        elif kind == "json":
            records = _read_json(path, data)
        else:
            records = _read_csv(path, data)
    for number, record in records:
        count += 1
        yield number, record
    if count == 0:
        raise AlignlabError("the file holds no records", file=str(path))


def count_records(source: str | Path, *, split: str = "train") -> int:
    """The number of records :func:`read_records` yields for ``source`` (reads the whole file)."""
    return sum(1 for _ in read_records(source, split=split))


# ---------------------------------------------------------------------------------------------- helpers


def _read_bytes(path: Path) -> bytes:
    compressed = str(path).lower().endswith(".gz")
    try:
        if compressed:
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError; a bad body is a zlib.error
        if compressed and not isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError):
            raise AlignlabError(f"the gzip file is corrupt or cut short ({type(error).__name__}: {error}); "
                                "download or compress it again", file=str(path)) from error
        raise AlignlabError(f"could not read the file: {error}", file=str(path)) from error


def _strip_bom(data: bytes) -> bytes:
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _find_surrogate_field(value: Any, prefix: str = "") -> str | None:
    """The (dotted) field of the first string holding a surrogate-escaped (undecodable) byte."""
    if isinstance(value, str):
        return (prefix or "(value)") if _has_surrogate(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _has_surrogate(key):
                return f"{prefix}.{key}" if prefix else key
            found = _find_surrogate_field(item, f"{prefix}.{key}" if prefix else str(key))
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _find_surrogate_field(item, f"{prefix}[{index}]")
            if found is not None:
                return found
    return None


def _has_surrogate(text: str) -> bool:
    return any("\udc80" <= char <= "\udcff" for char in text)


def _utf8_error(path: Path, error: UnicodeDecodeError, line: int, record: int | None, field: str | None):
    bad = error.object[error.start : error.start + 4]
    return AlignlabError(
        f"invalid UTF-8 at line {line} (bytes {bad!r}); save the file as UTF-8",
        file=str(path),
        record=record,
        field=field,
    )


def _read_jsonl(path: Path, data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    data = _strip_bom(data)
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            field = None
            try:
                field = _find_surrogate_field(json.loads(raw.decode("utf-8", "surrogateescape")))
            except ValueError:
                pass
            raise _utf8_error(path, error, number, number, field) from None
        yield number, _parse_json_record(path, text, number)


def _parse_json_record(path: Path, text: str, number: int) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise AlignlabError(
            f"malformed JSON on line {number}, column {error.colno}: {error.msg}",
            file=str(path),
            record=number,
        ) from None
    if not isinstance(value, dict):
        raise AlignlabError(
            f"line {number} is a JSON {_json_type(value)}, not an object", file=str(path), record=number
        )
    return value


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _decode_whole(path: Path, data: bytes) -> str:
    """Decode a whole file strictly; on failure report the line (record and field are found by the caller)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _utf8_error(path, error, _line_of(data, error.start), None, None) from None


def _read_json(path: Path, data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    data = _strip_bom(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        # Find the record and field holding the bad bytes by parsing with the bytes escaped.
        record = field = None
        try:
            loose = json.loads(data.decode("utf-8", "surrogateescape"))
            items = _json_items(path, loose)
            for index, item in enumerate(items, start=1):
                found = _find_surrogate_field(item)
                if found is not None:
                    record, field = index, found
                    break
        except (ValueError, AlignlabError):
            pass
        raise _utf8_error(path, error, _line_of(data, error.start), record, field) from None
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            # A ".json" file that is really JSON lines (one object per line): read it as such.
            yield from _read_jsonl(path, data)
            return
        raise AlignlabError(
            f"malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}", file=str(path)
        ) from None
    for index, item in enumerate(_json_items(path, value), start=1):
        if not isinstance(item, dict):
            raise AlignlabError(
                f"item {index} of the array is a JSON {_json_type(item)}, not an object",
                file=str(path),
                record=index,
            )
        yield index, item


def _json_items(path: Path, value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        lists = [key for key, item in value.items() if isinstance(item, list)]
        if len(lists) == 1:
            return value[lists[0]]
        if not lists:
            # A single object: one record.
            return [value]
        raise AlignlabError(
            f"the top-level object holds several lists ({', '.join(lists)}); expected an array of records "
            "or an object holding one list",
            file=str(path),
        )
    raise AlignlabError(
        f"the top-level JSON value is a {_json_type(value)}; expected an array of records", file=str(path)
    )


def _read_csv(path: Path, data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    data = _strip_bom(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        record = field = None
        loose = csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""))
        try:
            header = next(loose)
            for number, row in enumerate(loose, start=1):
                for column, cell in enumerate(row):
                    if _has_surrogate(cell):
                        record = number
                        field = header[column] if column < len(header) else f"column {column + 1}"
                        break
                if record is not None:
                    break
            else:
                if any(_has_surrogate(name) for name in header):
                    field = "header"
        except (csv.Error, StopIteration):
            pass
        raise _utf8_error(path, error, _line_of(data, error.start), record, field) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        if len(set(header)) != len(header) or any(not name.strip() for name in header):
            raise AlignlabError(
                f"the CSV header must name every column once; found {header}", file=str(path), field="header"
            )
        for number, row in enumerate(reader, start=1):
            if not row:  # a blank line
                continue
            if len(row) != len(header):
                raise AlignlabError(
                    f"row has {len(row)} values but the header names {len(header)} columns "
                    f"({', '.join(header)})",
                    file=str(path),
                    record=number,
                )
            yield number, dict(zip(header, row))
    except csv.Error as error:
        raise AlignlabError(
            f"malformed CSV at line {reader.line_num}: {error}", file=str(path), record=None
        ) from None


def _read_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
    except Exception as error:  # any pyarrow failure is a bad file for the user
        raise AlignlabError(f"could not read the Parquet file: {error}", file=str(path)) from error
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _read_hub(source: str, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import datasets

        dataset = datasets.load_dataset(source, split=split)
    except Exception as error:  # connection, not-found and offline errors land here
        raise AlignlabError(
            f"{source!r} is not a local file, and the Hugging Face hub could not be reached or has no such "
            f"dataset/split ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "pass a local file (.json, .jsonl, .csv, .parquet) instead",
            file=source,
        ) from error
    count = 0
    for index, row in enumerate(dataset, start=1):
        count += 1
        yield index, dict(row)
    if count == 0:
        raise AlignlabError(f"split {split!r} holds no records", file=source)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write ``rows`` as JSON lines (UTF-8, non-ASCII kept as is); returns ``path``."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
