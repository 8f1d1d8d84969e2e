"""Rendering rows for auditors: ``json`` (one JSON document per line), ``csv`` (RFC 4180) and ``table``.

Rows are mappings of column name to a JSON value. ``json`` writes each row as it is (JSON escapes every control
character itself). ``csv`` and ``table`` flatten a value to one cell: lists joined with ``"; "``, mappings as
compact JSON, ``None`` as empty; then:

- control characters (C0, DEL, C1, and the Unicode line/paragraph separators) are written as ``\\n``, ``\\t``,
  ``\\x1b``, ``\\u2028``…, and a backslash as ``\\\\``, so a cell is one line and cannot move a terminal's cursor
  (HOSTILE A07: agent-supplied fields end up here);
- (csv) a cell starting with ``=``, ``+``, ``-`` or ``@`` gets a leading apostrophe:
  spreadsheets would run it as a formula (OWASP "CSV Injection"); quoting follows RFC 4180 (``"`` doubled, CRLF
  line ends).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal, TextIO

__all__ = ["FORMATS", "Format", "cell_text", "csv_cell", "write_rows"]

Format = Literal["json", "csv", "table"]
FORMATS: Final = ("json", "csv", "table")

_CONTROL = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_FORMULA = ("=", "+", "-", "@")  # a leading tab or CR is already escaped to a backslash


def _escape(match: re.Match[str]) -> str:
    char = match.group(0)
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def cell_text(value: Any) -> str:
    """One cell: a flat, single-line, control-free rendering of a JSON value."""
    if value is None or (isinstance(value, Mapping) and not value):
        text = ""
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple):
        text = "; ".join(cell_text(item) for item in value)
        return text  # items are already escaped
    elif isinstance(value, Mapping):
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    else:
        text = json.dumps(value)
    return _CONTROL.sub(_escape, text)


def csv_cell(value: Any) -> str:
    """:func:`cell_text`, with a leading apostrophe where a spreadsheet would see a formula."""
    text = cell_text(value)
    return "'" + text if text.startswith(_FORMULA) else text


def write_rows(rows: Iterable[Mapping[str, Any]], columns: Sequence[str], fmt: Format, out: TextIO) -> int:
    """Write ``rows`` (only ``columns``, in that order, for csv and table; json keeps every member) to ``out``;
    return how many were written. json and csv stream; table reads all rows first to align the columns."""
    count = 0
    if fmt == "json":
        for row in rows:
            # ASCII: control, bidi and line-separator characters arrive escaped, never raw on a terminal
            out.write(json.dumps(row, ensure_ascii=True, separators=(",", ":")) + "\n")
            count += 1
        return count
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow([csv_cell(c) for c in columns])
        for row in rows:
            writer.writerow([csv_cell(row.get(c)) for c in columns])
            count += 1
        return count
    table = [[cell_text(c) for c in columns]]
    for row in rows:
        table.append([cell_text(row.get(c)) for c in columns])
        count += 1
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    buffer = io.StringIO()
    for index, line in enumerate(table):
        buffer.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        buffer.write("\n")
        if index == 0:
            buffer.write("  ".join("-" * width for width in widths) + "\n")
    out.write(buffer.getvalue())
    return count
