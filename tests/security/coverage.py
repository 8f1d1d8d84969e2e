"""Which rows of HOSTILE.md §1 have a named test: the coverage report of the security regression suite.

    python -m tests.security.coverage              # print the table (row -> tests); exit 1 if a row has none
    python -m tests.security.coverage --write-ids  # refresh tests/security/hostile_ids.txt from HOSTILE.md

**Rows.** Read from ``../shared/HOSTILE.md`` (beside the repository: ``/work/shared`` next to ``/work/main``, and
``shared/`` next to the clone in CI), section 1 only; when that file is absent, from the committed copy
``hostile_ids.txt`` (one ``ID<TAB>title`` per line; a test keeps it in step with HOSTILE.md whenever both exist).

**Tests.** A row is covered by every collected test whose id names it: the row ID, in any letter case, not
glued to other letters or digits (``test_d09b_trailing_slash``, ``test_x[J01-none]``, ``test_y[t11-2**53]``).
Only the part of the node id after the file (``Class::function[params]``) is read. The ids come from pytest's
own collection (``pytest --collect-only``) in a subprocess, with this module loaded as a plugin that writes each
item's id and marks to a JSON file. Why collection rather than scanning the sources: parametrize ids are often
built from data tables (``ids=[row[0] for row in ROWS]``), which only collection resolves, while a source scan
would also count IDs in comments, strings and dead code; and collection sees exactly what a pytest run runs.
The price is a few seconds and the need for every test module to import (a module that does not import shows
up as a collection error in the report, and its rows as missing). ``tests/security/test_hostile_coverage.py``
is excluded: it parametrizes over the row IDs themselves.

A row is **covered** when at least one of its tests is neither ``xfail`` nor ``skip``-marked; **known gap**
when its only tests are ``xfail`` (a strict xfail that reproduces a refusal that does not happen yet, reported
and waiting for a fix); **not applicable** when ``not_applicable.yaml`` gives the reason; else **missing**.
Missing rows fail the suite. Covered rows that also have an xfail test are shown as ``covered+gap``: part of
the row holds, part is a reported gap.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HOSTILE_MD = REPO.parent / "shared" / "HOSTILE.md"
IDS_COPY = HERE / "hostile_ids.txt"
NOT_APPLICABLE = HERE / "not_applicable.yaml"
#: the coverage test itself: its parametrize ids are the row IDs, so it must not count as coverage
SELF = "tests/security/test_hostile_coverage.py"
#: environment variable through which the collecting subprocess learns where to write its JSON
OUT_ENV = "HOSTILE_COVERAGE_OUT"
#: bound on the collecting subprocess (collection of the whole tree takes a few seconds)
COLLECT_TIMEOUT_SECONDS = 180

ROW_ID = re.compile(r"[JDMTPYAS]\d{2}[a-e]?")
# A row of a §1 table: "| J01 | hostile input | expected outcome | anchor |"
_TABLE_ROW = re.compile(r"^\|\s*([JDMTPYAS]\d{2}[a-e]?)\s*\|\s*(.*?)\s*\|", re.MULTILINE)
# A row ID inside a test id, not glued to letters or digits on either side ("_" and "-" separate).
_MENTION = re.compile(r"(?<![A-Za-z0-9])([JDMTPYAS])(\d{2})([A-Ea-e]?)(?![A-Za-z0-9])", re.IGNORECASE)


@dataclass(frozen=True)
class Row:
    id: str
    title: str


@dataclass(frozen=True)
class CollectedTest:
    node_id: str
    marks: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        """``Class::function[params]``: the node id without its file path."""
        return self.node_id.partition("::")[2] or self.node_id

    @property
    def counts(self) -> bool:
        """A test that is expected to fail (or never runs) documents a row; it does not cover it."""
        return not self.marks & {"xfail", "skip"}


@dataclass
class Collection:
    tests: list[CollectedTest]
    #: pytest's report of modules that failed to import (empty when collection was clean)
    errors: str = ""


@dataclass
class Report:
    rows: list[Row]
    tests_by_row: dict[str, list[CollectedTest]]
    not_applicable: dict[str, str]
    source: str
    collection_errors: str = ""
    problems: list[str] = field(default_factory=list)

    def status(self, row_id: str) -> str:
        tests = self.tests_by_row.get(row_id, [])
        if any(t.counts for t in tests):
            return "covered"
        if tests:
            return "known gap"
        if row_id in self.not_applicable:
            return "not applicable"
        return "missing"

    def ids_with(self, status: str) -> list[str]:
        return [row.id for row in self.rows if self.status(row.id) == status]

    @property
    def gaps(self) -> list[str]:
        """Rows with at least one xfail test: a refusal that does not happen yet (reported, awaiting a fix)."""
        return [
            row.id for row in self.rows if any("xfail" in t.marks for t in self.tests_by_row.get(row.id, []))
        ]

    @property
    def missing(self) -> list[str]:
        return self.ids_with("missing")

    def table(self, *, per_row: int = 3) -> str:
        """The row -> tests table, then the counts; at most ``per_row`` test names are shown per row."""
        lines = [f"HOSTILE.md §1 coverage ({self.source})", ""]
        for row in self.rows:
            status = self.status(row.id)
            tests = self.tests_by_row.get(row.id, [])
            if status == "covered" and row.id in self.gaps:
                status = "covered+gap"
            if status == "not applicable":
                detail = "n/a: " + self.not_applicable[row.id]
            elif tests:
                names = [t.node_id + ("  [xfail]" if "xfail" in t.marks else "") for t in tests[:per_row]]
                more = f" (+{len(tests) - per_row} more)" if len(tests) > per_row else ""
                detail = ("\n" + " " * 22).join(names) + more
            else:
                detail = "-- NO TEST --"
            lines.append(f"{row.id:<5} {status:<15} {detail}")
        counts = {s: len(self.ids_with(s)) for s in ("covered", "known gap", "not applicable", "missing")}
        lines += ["", f"{len(self.rows)} rows: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
        if self.gaps:
            lines.append(f"rows with a known gap (a strict xfail test reproduces it): {', '.join(self.gaps)}")
        if counts["missing"]:
            lines.append(f"missing: {', '.join(self.missing)}")
        if self.collection_errors:
            lines += ["", "collection errors (their rows may show as missing):", self.collection_errors]
        return "\n".join(lines)


# -- rows ---------------------------------------------------------------------------------------------------


def parse_hostile(text: str) -> list[Row]:
    """The ID rows of section 1 of HOSTILE.md, in document order, each with its 'hostile input' cell."""
    start = text.find("\n## 1.")
    end = text.find("\n## 2.", start + 1)
    section = text[start : end if end != -1 else len(text)] if start != -1 else text
    rows = [Row(m.group(1), m.group(2)) for m in _TABLE_ROW.finditer(section)]
    seen: set[str] = set()
    for row in rows:
        if row.id in seen:
            raise ValueError(f"HOSTILE.md lists {row.id} twice")
        seen.add(row.id)
    return rows


def read_ids_copy(path: Path = IDS_COPY) -> list[Row]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        row_id, sep, title = line.partition("\t")
        if not sep or not ROW_ID.fullmatch(row_id):
            raise ValueError(f"{path}:{number}: expected 'ID<TAB>title'")
        rows.append(Row(row_id, title))
    return rows


def render_ids_copy(rows: Iterable[Row]) -> str:
    header = (
        "# The row IDs of ../shared/HOSTILE.md §1 with each row's hostile input: the fallback of\n"
        "# tests/security/coverage.py when HOSTILE.md is not beside the repository.\n"
        "# Regenerate with: python -m tests.security.coverage --write-ids\n"
    )
    return header + "".join(f"{row.id}\t{row.title}\n" for row in rows)


def load_rows(hostile_md: Path = HOSTILE_MD, ids_copy: Path = IDS_COPY) -> tuple[list[Row], str]:
    """The rows and where they came from: HOSTILE.md when it is there, else the committed copy."""
    if hostile_md.is_file():
        return parse_hostile(hostile_md.read_text(encoding="utf-8")), str(hostile_md)
    return read_ids_copy(ids_copy), f"{ids_copy.name} (HOSTILE.md not found at {hostile_md})"


def load_not_applicable(path: Path, row_ids: Iterable[str]) -> dict[str, str]:
    """``ID -> reason`` from ``not_applicable.yaml``; ValueError for unknown IDs or empty reasons."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of row ID to reason")
    known = set(row_ids)
    result: dict[str, str] = {}
    for row_id, entry in data.items():
        reason = entry.get("reason") if isinstance(entry, dict) else entry
        if row_id not in known:
            raise ValueError(f"{path}: {row_id!r} is not a row of HOSTILE.md §1")
        if not isinstance(reason, str) or len(reason.strip()) < 20:
            raise ValueError(f"{path}: {row_id} needs a reason (a sentence, not a word)")
        result[str(row_id)] = " ".join(reason.split())
    return result


# -- tests --------------------------------------------------------------------------------------------------


def mentioned_rows(name: str, row_ids: Iterable[str]) -> set[str]:
    """The row IDs ``name`` (a test id without its file) names; only IDs that are rows count."""
    known = set(row_ids)
    found = set()
    for match in _MENTION.finditer(name):
        row_id = match.group(1).upper() + match.group(2) + match.group(3).lower()
        if row_id in known:
            found.add(row_id)
    return found


def collect_tests(
    repo: Path = REPO, *, paths: Sequence[str] = ("tests",), ignore: Sequence[str] = (SELF,)
) -> Collection:
    """Collect the suite in a subprocess (``pytest --collect-only`` with this module as a plugin)."""
    with tempfile.TemporaryDirectory(prefix="hostile-coverage-") as tmp:
        out = Path(tmp) / "collected.json"
        env = {**os.environ, OUT_ENV: str(out), "PYTHONPATH": str(repo)}
        command = [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.security.coverage",
            "--continue-on-collection-errors",
            *(f"--ignore={path}" for path in ignore),
            *paths,
        ]
        result = subprocess.run(
            command,
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=COLLECT_TIMEOUT_SECONDS,
            check=False,
        )
        if not out.is_file():
            raise RuntimeError(
                f"collection produced no test list (exit {result.returncode}):\n{result.stdout}"
            )
        items = json.loads(out.read_text(encoding="utf-8"))
    tests = [CollectedTest(item["nodeid"], frozenset(item["marks"])) for item in items]
    errors = ""
    if result.returncode not in (0, 5):  # 5: nothing collected
        errors = "\n".join(line for line in result.stdout.splitlines() if "ERROR" in line or "Error" in line)
    return Collection(tests=tests, errors=errors)


def pytest_collection_modifyitems(config: Any, items: Sequence[Any]) -> None:
    """Plugin hook (only when loaded with ``-p tests.security.coverage``): write each item's id and marks."""
    out = os.environ.get(OUT_ENV)
    if not out:
        return
    listing = [
        {"nodeid": item.nodeid, "marks": sorted({mark.name for mark in item.iter_markers()})}
        for item in items
    ]
    Path(out).write_text(json.dumps(listing), encoding="utf-8")


# -- report -------------------------------------------------------------------------------------------------


def build_report(
    rows: list[Row], tests: Iterable[CollectedTest], not_applicable: Mapping[str, str], *, source: str
) -> Report:
    row_ids = [row.id for row in rows]
    tests_by_row: dict[str, list[CollectedTest]] = {row_id: [] for row_id in row_ids}
    for test in tests:
        for row_id in mentioned_rows(test.name, row_ids):
            tests_by_row[row_id].append(test)
    report = Report(rows, tests_by_row, dict(not_applicable), source)
    for row_id in not_applicable:
        if tests_by_row.get(row_id):
            report.problems.append(
                f"{row_id} is listed in not_applicable.yaml but has tests: remove it from the file"
            )
    return report


def current_report() -> Report:
    rows, source = load_rows()
    not_applicable = load_not_applicable(NOT_APPLICABLE, [row.id for row in rows])
    collection = collect_tests()
    report = build_report(rows, collection.tests, not_applicable, source=source)
    report.collection_errors = collection.errors
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.security.coverage", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--write-ids", action="store_true", help="rewrite hostile_ids.txt from HOSTILE.md")
    args = parser.parse_args(argv)
    if args.write_ids:
        IDS_COPY.write_text(render_ids_copy(parse_hostile(HOSTILE_MD.read_text(encoding="utf-8"))))
        print(f"wrote {IDS_COPY}")
        return 0
    report = current_report()
    print(report.table(per_row=1000))
    for problem in report.problems:
        print("problem:", problem)
    return 1 if report.missing or report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
