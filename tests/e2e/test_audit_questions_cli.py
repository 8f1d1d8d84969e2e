"""`broker audit query`, `broker audit report approvals` and `broker access-review` as an operator runs them
(subprocesses): --help, exit codes, one-line errors naming the file, spreadsheet-safe csv, and the PostgreSQL
store as a source."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.certfactory import Pki
from tests.e2e.test_cli import ROOT, run_cli

EXPENSE = "config/examples/expense.yaml"
PRINCIPALS = "config/examples/expense.principals.yaml"
AGENT = "spiffe://example.org/agents/expense-assistant"
APPROVAL = "utGZbcECuSUvctE2wvBTwg"


def line(seq: int, **fields: Any) -> str:
    record = {
        "seq": seq,
        "ts": f"2026-05-01T12:00:{seq:02d}.000Z",
        "event": "invocation",
        "decision": "allow",
        "reason": "",
        "request_id": f"r{seq}",
        "subject": "alice",
        "actor": AGENT,
        "tool": "approveExpense",
    }
    return json.dumps({**record, **fields}) + "\n"


@pytest.mark.parametrize(
    ("command", "mentions"),
    [
        (
            ["audit", "query"],
            [
                "--file",
                "--db",
                "--chain",
                "--subject",
                "--actor",
                "--tool",
                "--decision",
                "--event",
                "--txn",
                "--request-id",
                "--since",
                "--until",
                "--format",
            ],
        ),
        (["audit", "report", "approvals"], ["--file", "--db", "--since", "--until", "--format"]),
        (["access-review"], ["--config", "--principals", "--against", "--format"]),
    ],
    ids=["query", "report-approvals", "access-review"],
)
def test_help(command: list[str], mentions: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert all(option in result.stdout for option in mentions)


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    log.write_text(line(1))
    assert run_cli("audit", "query").returncode == 2  # a source is required
    assert run_cli("audit", "query", "--file", str(log), "--db", "postgresql://x/y").returncode == 2
    bad_time = run_cli("audit", "query", "--file", str(log), "--since", "yesterday")
    assert bad_time.returncode == 2
    assert bad_time.stderr.strip().splitlines() == [
        "broker audit query: 'yesterday' is not an RFC 3339 time (2026-05-01T12:00:00Z) or relative (-30m, -1h, -2d)"
    ]
    assert run_cli("audit", "query", "--file", str(log), "--format", "xml").returncode == 2


def test_unreadable_sources_are_one_line_naming_them(tmp_path: Path) -> None:
    missing = run_cli("audit", "query", "--file", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 1
    assert (
        missing.stderr.strip()
        == f"broker audit query: {tmp_path / 'nope.jsonl'}: cannot read: No such file or directory"
    )
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text(line(1) + "{not json\n" + line(3))
    result = run_cli("audit", "report", "approvals", "--file", str(corrupt))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"broker audit report approvals: {corrupt}:2: not a JSON audit record")
    chain = run_cli("audit", "query", "--file", str(corrupt), "--chain", "c1")
    assert chain.returncode == 1 and "--chain applies to --db" in chain.stderr


def test_rotated_files_are_read_in_the_order_given(tmp_path: Path) -> None:
    old, new = tmp_path / "audit.jsonl.1", tmp_path / "audit.jsonl"
    old.write_text(line(1) + line(2, subject="bob"))
    new.write_text(line(3) + "\n" + line(4, decision="deny"))
    result = run_cli("audit", "query", "--file", str(old), "--file", str(new), "--subject", "alice")
    assert result.returncode == 0
    assert [json.loads(x)["seq"] for x in result.stdout.splitlines()] == [1, 3, 4]


def test_csv_and_table_are_safe_for_spreadsheets_and_terminals(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    log.write_text(line(1, subject='=HYPERLINK("http://evil")', reason="-2+3\n\x1b[2Jcleared"))
    as_csv = run_cli("audit", "query", "--file", str(log), "--format", "csv")
    assert as_csv.returncode == 0
    [row] = list(csv.DictReader(io.StringIO(as_csv.stdout, newline="")))
    assert row["subject"] == '\'=HYPERLINK("http://evil")'
    assert row["reason"] == "'-2+3\\n\\x1b[2Jcleared"
    table = run_cli("audit", "query", "--file", str(log), "--format", "table")
    assert "\x1b" not in table.stdout and len(table.stdout.splitlines()) == 3


def test_access_review_against_a_candidate_prints_the_differences(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / EXPENSE).read_text())
    config["policies"] = [p for p in config["policies"] if p["id"] != "invoice-readers"]
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(yaml.safe_dump(config))
    result = run_cli(
        "access-review",
        "-c",
        EXPENSE,
        "--principals",
        PRINCIPALS,
        "--against",
        str(candidate),
        "--format",
        "csv",
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout, newline="")))
    lost = {(r["subject"], r["tool"], r["aspect"], r["effect"]) for r in rows}
    # without invoice-readers, alice and bob (through the expense assistant) lose listInvoices
    assert lost == {
        ("alice", "listInvoices", "visible", "loses"),
        ("alice", "listInvoices", "callable", "loses"),
        ("bob", "listInvoices", "visible", "loses"),
        ("bob", "listInvoices", "callable", "loses"),
    }


def test_access_review_errors_name_the_file_and_line(tmp_path: Path) -> None:
    principals = tmp_path / "p.yaml"
    principals.write_text("- sub: alice\n  agents: [spiffe://example.org/agents/a]\n- sub: bob\n  role: x\n")
    result = run_cli("access-review", "-c", EXPENSE, "--principals", str(principals))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == f"{principals}:3: [1]: unknown key 'role' (keys: sub, claims, agents)"
    missing = run_cli("access-review", "-c", str(tmp_path / "none.yaml"), "--principals", PRINCIPALS)
    assert missing.returncode == 1 and str(tmp_path / "none.yaml") in missing.stderr
    assert "Traceback" not in missing.stderr


async def test_the_postgresql_store_as_a_source(pki: Pki) -> None:
    """Records committed to the PostgreSQL store (broker.audit.pgsink), read back by `--db`."""
    try:
        from broker.audit.pgsink import PgAuditSink
        from broker.jose import Signer
        from tests.pgutil import fresh_database
    except ImportError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the PostgreSQL audit store is missing ({exc}); CI=true requires it")
        pytest.skip(f"the PostgreSQL audit store is not there yet ({exc})")
    with fresh_database() as url:
        sink = PgAuditSink(url, signer=Signer.from_file(pki.signing_jwk), checkpoint_every=50)
        await sink.start()
        common = {"subject": "alice", "actor": AGENT, "tool": "approveExpense", "args_digest": "D1"}
        await sink.commit(
            {
                "event": "exchange",
                "decision": "pending",
                "reason": "approval_required: manager_approval",
                "request_id": "r1",
                "approval_id": APPROVAL,
                **common,
            }
        )
        await sink.commit(
            {
                "event": "approval",
                "decision": "allow",
                "reason": f"approve:{APPROVAL}:approved",
                "request_id": "r2",
                **common,
                "subject": "carol",
                "actor": None,
                "approval_id": APPROVAL,
            }
        )
        await sink.commit(
            {
                "event": "invocation",
                "decision": "allow",
                "request_id": "r3",
                "approval_id": APPROVAL,
                **common,
            }
        )
        await sink.commit(
            {"event": "outcome", "decision": "allow", "request_id": "r3", "status": 200, **common}
        )
        chain = sink.chain_id
        await sink.aclose()

        query = run_cli("audit", "query", "--db", url, "--chain", chain, "--subject", "alice")
        assert query.returncode == 0, query.stderr
        assert [(r["event"], r["chain_id"]) for r in map(json.loads, query.stdout.splitlines())] == [
            ("exchange", chain),
            ("invocation", chain),
            ("outcome", chain),
        ]
        other = run_cli("audit", "query", "--db", url, "--chain", "no-such-chain")
        assert other.returncode == 0 and other.stdout == ""
        report = run_cli("audit", "report", "approvals", "--db", url)
        [row] = [json.loads(x) for x in report.stdout.splitlines()]
        assert (row["approval_id"], row["requester"], row["state"]) == (APPROVAL, "alice", "approved")
        assert row["decisions"][0]["approver"] == "carol"
        assert row["executed"] is True and row["execution_status"] == "200"
