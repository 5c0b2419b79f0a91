"""What a bad input row is: `DataError`, naming the source, the row and the field.

`readers` (files and datasets in, records out) and `formats` (records to `Example`s) both raise
it, so it sits below both: "line N" (1-based, as editors count) in line-based files (JSONL),
"row N" (1-based) everywhere else.
"""
from __future__ import annotations

from ..errors import UserError

LINE_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")  # one record per line: errors say "line N"


def location(source: str, row: int) -> str:
    """How a message names 0-based row `row` of `source`: "line N" (1-based) in a line-based file,
    else "row N" (1-based)."""
    unit = "line" if str(source).lower().endswith(LINE_SUFFIXES) else "row"
    return f"{unit} {row + 1}"


class DataError(UserError, ValueError):
    """A bad input row. `kind` groups errors for the skip report (e.g. 'identical', 'prompt_too_long').

    `row` is 0-based (in a JSONL file: the line index); the message says it 1-based (`location`)."""

    def __init__(self, source: str, row: int | None, field: str | None, message: str, kind: str = "invalid"):
        self.source, self.row, self.field, self.kind, self.message = source, row, field, kind, message
        where = source if row is None else f"{source}, {location(source, row)}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
