"""broker.audit.formats: json lines, RFC 4180 csv without formula injection, and aligned tables."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest

from broker.audit.formats import cell_text, csv_cell, write_rows

COLUMNS = ("a", "b")


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    out = io.StringIO()
    assert write_rows(rows, COLUMNS, fmt, out) == len(rows)  # type: ignore[arg-type]
    return out.getvalue()


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+1+1", "'+1+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "\\t=1"),  # escaped first: it starts with a backslash, no formula
        ("a=1", "a=1"),
        (["=1", "b"], "'=1; b"),
        (-5, "'-5"),
    ],
    ids=["equals", "plus", "minus", "at", "tab", "inner-equals-kept", "list", "negative-number"],
)
def test_csv_cells_never_start_a_formula(value: Any, cell: str) -> None:
    assert csv_cell(value) == cell


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ("line1\nline2", "line1\\nline2"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("a\u2028b\u0085c", "a\\u2028b\\x85c"),
        ("back\\slash", "back\\\\slash"),
        ("tab\there\r", "tab\\there\\r"),
        (None, ""),
        (True, "yes"),
        ({"b": 1, "a": "x"}, '{"a":"x","b":1}'),
        ({}, ""),
        (["x\ny", 2], "x\\ny; 2"),
        ("naïve ✓", "naïve ✓"),
    ],
    ids=[
        "newline",
        "ansi",
        "unicode-separators",
        "backslash",
        "tab-cr",
        "none",
        "bool",
        "object",
        "empty-object",
        "list",
        "printable-unicode-kept",
    ],
)
def test_cells_are_one_line_without_control_characters(value: Any, cell: str) -> None:
    assert cell_text(value) == cell


def test_csv_is_rfc4180_with_a_header_and_reads_back() -> None:
    rows = [{"a": 'say "hi", then go', "b": "=cmd|' /C calc'!A0"}, {"a": "x\ny", "b": None}]
    text = render(rows, "csv")
    assert text.startswith("a,b\r\n") and text.endswith("\r\n")
    assert '"say ""hi"", then go"' in text
    parsed = list(csv.reader(io.StringIO(text, newline="")))
    assert parsed == [["a", "b"], ['say "hi", then go', "'=cmd|' /C calc'!A0"], ["x\\ny", ""]]


def test_json_is_one_document_per_line_with_every_member() -> None:
    rows = [{"a": "x\ny", "b": [1, 2], "extra": {"k": None}}, {"a": "\x1b", "b": None}]
    lines = render(rows, "json").splitlines()
    assert [json.loads(line) for line in lines] == rows


def test_table_aligns_columns_and_escapes() -> None:
    text = render([{"a": "long value", "b": "\x1b[2J"}, {"a": "s", "b": 1}], "table")
    header, rule, first, second = text.splitlines()
    assert header.split() == ["a", "b"]
    assert rule == "----------  -------"  # the escaped cell is 7 characters wide
    assert first == "long value  \\x1b[2J"
    assert second.index("1") == first.index("\\")
    assert "\x1b" not in text


def test_json_lines_are_ascii_so_no_control_or_bidi_character_reaches_a_terminal() -> None:
    out = io.StringIO()
    hostile = "x\u009b31m\u202egnp.exe\u2028\x1b[2J"
    write_rows([{"args": hostile}], ["args"], "json", out)
    text = out.getvalue()
    assert text.isascii() and text.count("\n") == 1
    assert json.loads(text) == {"args": hostile}
