"""broker.gateway.filter_rules.RowEquality: ``row.a == subject.b`` decided without CEL must be CEL's verdict.

Two properties over generated values: wherever the Python decision answers, CEL (converted exactly as the
response filter converts a row) gives the same verdict; and whole answers filter byte-identically (or refuse
identically) with the fast decision on and off. Plus the shapes that must stay CEL's.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import cel
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.config.models import Tool
from broker.errors import UpstreamError
from broker.gateway.filter_rules import RowEquality
from broker.gateway.filters import ToolFilters, compile_tool_filters

EXPRESSIONS = [
    "row.department == subject.department",
    "row.department != subject.department",
    "subject.department == row.department",
    " row.owner==row.department\n",
    "\trow.department\r\n!=\fsubject.sub ",
]

# values where CEL and Python might part: strings that are equal, differ in case or only by Unicode form,
# numbers equal to a string's text, lone surrogates, containers, null, booleans
# (a small pool, so that rows and subjects often hold equal, or nearly equal, values)
POOL = ["42", "7", "", "Dept", "dept", "DEPT", "ＤＥＰＴ", "\ud800", "42 ", "é", "e\u0301", "0", "4\x002"]
SCALARS = st.one_of(
    st.sampled_from(POOL),
    st.sampled_from(POOL),
    st.text(max_size=4),
    st.integers(-3, 50),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.none(),
)
VALUES = st.one_of(
    SCALARS, st.lists(SCALARS, max_size=2), st.dictionaries(st.text(max_size=2), SCALARS, max_size=2)
)
FIELDS = ("department", "owner", "sub")
MISSING = object()
#: each member mostly from the pool (so that verdicts on near-equal values are tried often), or absent
MEMBER = st.one_of(
    st.sampled_from(POOL), st.sampled_from(POOL), st.sampled_from(POOL), VALUES, st.just(MISSING)
)
RECORDS = st.builds(
    lambda *values: {name: value for name, value in zip(FIELDS, values, strict=True) if value is not MISSING},
    MEMBER,
    MEMBER,
    MEMBER,
)


def cel_keeps(source: str, row: Any, subject: dict[str, Any]) -> bool:
    """The verdict ``broker.gateway.responses._cel_keeps`` gives: CEL over the row and the subject pruned to what the
    expression reads (``Reads.context``; a subject that cannot be converted drops every row before any verdict,
    and the filter-level property below covers that)."""
    fields = [name for name in FIELDS if f"row.{name}" in source]
    claims = [name for name in FIELDS if f"subject.{name}" in source]
    program = cel.compile(source)
    try:
        context = cel.Context()
        context.add_variable("subject", {name: subject[name] for name in claims if name in subject})
        if type(row) is dict:
            row = {name: row[name] for name in fields if name in row}
        context.add_variable("row", row)
        return program.execute(context) is True
    except Exception:
        return False


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(EXPRESSIONS), st.one_of(RECORDS, RECORDS, VALUES), RECORDS)
@example("row.department == subject.department", {"department": "Dept"}, {"department": "dept"})
def test_where_python_decides_it_is_cels_verdict(source: str, row: Any, subject: dict[str, Any]) -> None:
    equality = RowEquality.of(source)
    assert equality is not None
    verdict = equality.decide(row, subject)
    if verdict is not None:
        assert verdict == cel_keeps(source, row, subject), (source, row, subject)


def test_ascii_strings_are_decided_and_everything_else_is_left_to_cel() -> None:
    equality = RowEquality.of("row.department == subject.department")
    assert equality is not None
    subject = {"department": "42"}
    assert equality.decide({"department": "42"}, subject) is True
    assert equality.decide({"department": "7"}, subject) is False
    for row in ({"department": 42}, {"department": "４２"}, {}, {"department": None}, ["42"], "42"):
        assert equality.decide(row, subject) is None, row
    assert equality.decide({"department": "42"}, {"department": "\ud800"}) is None


@pytest.mark.parametrize(
    "source",
    [
        "row.department == subject.department // same department",
        "row.department == 'x'",
        "row.department == subject.department && true",
        "subject.department == subject.sub",  # no row member: constant over the rows
        "row.department == actor.id",
        "row.department\u00a0== subject.department",  # not CEL whitespace
        "row.a.b == subject.c",
        "(row.department == subject.department)",
        "row.department in [subject.department]",
        'row["department"] == subject.department',
        "row.row == subject.department",  # the row converted whole (RowEquality.of refuses it itself)
    ],
)
def test_other_shapes_stay_cels(source: str) -> None:
    assert RowEquality.of(source) is None


def test_a_rule_that_converts_the_whole_row_stays_cels() -> None:
    # "row.row" names the variable twice: the row is converted whole, so CEL can fail on a member (a value it
    # cannot hold, were the parser ever to let one through) that the comparison never reads: not decided here
    for keep in ("row.row == subject.department", "row.department == row.row"):
        assert compile_tool_filters(filters_tool(keep)).row_filters[0].equality is None, keep
    assert compile_tool_filters(filters_tool("row.department == subject.department")).row_filters[0].equality


# ---------------------------------------------------------------------------------------------------------
# whole answers: the same bytes, or the same refusal, with and without the Python decision


def filters_tool(keep: str) -> Tool:
    return Tool.model_validate(
        {
            "name": "tool",
            "upstream": {"url": "https://127.0.0.1:9443/tool"},
            "response": {
                "filter_rows": [{"path": "rows", "keep": keep}],
                "mask": [{"path": "rows.vendor?.bank_account?", "keep_last": 4}],
            },
        }
    )


def filters_for(keep: str) -> tuple[ToolFilters, ToolFilters]:
    fast = compile_tool_filters(filters_tool(keep))
    assert fast.row_filters[0].equality is not None
    slow = dataclasses.replace(
        fast, row_filters=tuple(dataclasses.replace(rule, equality=None) for rule in fast.row_filters)
    )
    return fast, slow


def outcome(filters: ToolFilters, body: bytes, subject: dict[str, Any]) -> bytes | str:
    try:
        return filters.filter_answer(200, body, subject=subject, actor_id="spiffe://example.org/a")
    except UpstreamError as exc:
        return f"refused {exc.reason}"


ROWS = st.lists(
    st.fixed_dictionaries(
        {"department": SCALARS},
        optional={"owner": SCALARS, "vendor": st.fixed_dictionaries({"bank_account": st.text(max_size=8)})},
    ),
    max_size=5,
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(EXPRESSIONS), ROWS, RECORDS, st.booleans())
def test_answers_filter_alike_with_and_without_the_python_decision(
    source: str, rows: list[dict[str, Any]], subject: dict[str, Any], stray: bool
) -> None:
    fast, slow = filters_for(source)
    answer: dict[str, Any] = {"rows": rows}
    if stray and rows:
        answer["archive"] = [rows[0]]  # a row outside the path: checked by the same predicate
    try:
        body = json.dumps(answer).encode()
    except UnicodeEncodeError:
        return
    assert outcome(fast, body, subject) == outcome(slow, body, subject)
