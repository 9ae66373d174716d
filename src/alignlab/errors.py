"""The one error type of the project.

Every error a user can cause (bad files, bad records, bad options) is an :class:`AlignlabError` whose
message names the file, the record and the field, so the CLI can print it without a traceback.
"""

from __future__ import annotations


class AlignlabError(Exception):
    """A user-facing error: ``file: record N: field 'x': what is wrong``.

    Args:
        message: what is wrong, in words a user can act on.
        file: the file (or hub id, or model path) the problem is in.
        record: the 1-based record number (line number for JSONL, data row for CSV, index + 1 for JSON).
        field: the field (column, key) the problem is in.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        record: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.record = record
        self.field = field
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = []
        if self.file is not None:
            where.append(str(self.file))
        if self.record is not None:
            where.append(f"record {self.record}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return (": ".join(where) + ": " + self.message) if where else self.message
