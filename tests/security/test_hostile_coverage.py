"""Every applicable row of HOSTILE.md §1 has a test named after it (see tests/security/coverage.py for how rows
and tests are found and why collection is used). Prints the row -> tests table; fails if a row has no test.

Run it alone to see the table:  pytest -s tests/security/test_hostile_coverage.py
or:                             python -m tests.security.coverage
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.security.coverage import (
    HOSTILE_MD,
    IDS_COPY,
    NOT_APPLICABLE,
    CollectedTest,
    Row,
    build_report,
    current_report,
    load_not_applicable,
    load_rows,
    mentioned_rows,
    parse_hostile,
    read_ids_copy,
    render_ids_copy,
)


def test_every_applicable_hostile_row_has_a_named_test() -> None:
    report = current_report()
    table = report.table()
    print("\n" + table)
    assert not report.problems, "\n".join(report.problems)
    assert not report.missing, (
        f"rows of HOSTILE.md §1 without a test whose id names them: {', '.join(report.missing)}. Add a test "
        "(its name or parametrize id must contain the row ID), or, if the row cannot apply to the broker, "
        f"give the reason in {NOT_APPLICABLE.name}.\n\n{table}"
    )


def test_the_committed_id_list_is_hostile_md_section_1() -> None:
    """The fallback copy stays in step with HOSTILE.md (regenerate: python -m tests.security.coverage --write-ids)."""
    if not HOSTILE_MD.is_file():
        pytest.skip(f"{HOSTILE_MD} is not beside the repository: {IDS_COPY.name} is the list in use")
    rows = parse_hostile(HOSTILE_MD.read_text(encoding="utf-8"))
    assert read_ids_copy() == rows, "run: python -m tests.security.coverage --write-ids"
    assert len(rows) == 141  # HOSTILE.md: "141 items" (27 J + 26 D + 18 M + 17 T + 27 P + 9 Y + 9 A + 8 S)


def test_not_applicable_entries_name_rows_and_give_reasons() -> None:
    rows, _ = load_rows()
    entries = load_not_applicable(NOT_APPLICABLE, [row.id for row in rows])
    assert all(len(reason) >= 20 for reason in entries.values())


def test_the_id_copy_round_trips(tmp_path: Path) -> None:
    rows = [Row("J01", 'Header `{"alg":"none"}`'), Row("D09a", "Request `/mcp?x=1`")]
    path = tmp_path / "ids.txt"
    path.write_text(render_ids_copy(rows))
    assert read_ids_copy(path) == rows


ROW_IDS = ["J01", "J17", "D09a", "D09b", "D12", "T11", "A05", "S06", "P12"]


@pytest.mark.parametrize(
    ("name", "found"),
    [
        ("test_hostile_token_is_refused[J01-none]", {"J01"}),
        ("test_proof_is_refused[d09b-trailing-slash]", {"D09b"}),
        ("test_d09a_query_is_ignored", {"D09a"}),
        ("test_x[t11-2**53]", {"T11"}),
        ("test_a05_rebuilt_chain", {"A05"}),
        ("test_j17_and_d12_together", {"J17", "D12"}),
        ("TestClass::test_s06_clock[wide]", {"S06"}),
        ("test_x[P12-absolute-form]", {"P12"}),
        ("test_x[x5t#S256]", set()),
        ("test_es256_signature", set()),
        ("test_p2c_iterations", set()),
        ("test_d09_without_a_letter", set()),
        ("test_hex[d12e4f]", set()),
        ("test_x[J011]", set()),
        ("test_xj01", set()),
        ("test_z99_not_a_row", set()),
    ],
    ids=[
        "bracketed-param",
        "lowercase-with-sub-letter",
        "function-name",
        "param-with-symbols",
        "function-name-prefix",
        "two-rows",
        "class-method",
        "uppercase-param",
        "header-name-with-S256",
        "algorithm-name",
        "p2c",
        "row-family-without-sub-letter",
        "hex-digest",
        "longer-number",
        "glued-to-a-letter",
        "unknown-id",
    ],
)
def test_row_ids_are_matched_as_whole_tokens(name: str, found: set[str]) -> None:
    assert mentioned_rows(name, ROW_IDS) == found


def test_statuses() -> None:
    rows = [Row(r, r) for r in ("J01", "J02", "J03", "J04", "J05")]
    tests = [
        CollectedTest("tests/a.py::test_j01_a"),
        CollectedTest("tests/a.py::test_j02_b", frozenset({"xfail"})),
        CollectedTest("tests/a.py::test_j03_c", frozenset({"skip"})),
        CollectedTest("tests/a.py::test_j01_d", frozenset({"xfail"})),
    ]
    report = build_report(rows, tests, {"J04": "does not apply, because of this and that"}, source="test")
    assert [report.status(r.id) for r in rows] == [
        "covered",
        "known gap",
        "known gap",
        "not applicable",
        "missing",
    ]
    assert report.missing == ["J05"] and report.gaps == ["J01", "J02"]
    assert "covered+gap" in report.table()
    bad = build_report(rows, tests, {"J01": "listed although it has a test, which is a mistake"}, source="t")
    assert bad.problems
