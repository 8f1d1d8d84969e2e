"""The auditor's questions (CONTRACT §15) over a real audit log: the reference scenario (§11) driven through a
real broker (config/examples/expense.yaml, the demo backend, real SVIDs, DPoP and tokens), then `broker audit
query`, `broker audit report approvals` and `broker access-review` run as subprocesses on what it wrote."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.integration import test_scenario
from tests.integration.test_scenario import (
    AGENT,
    ALICE,
    BOB,
    CAROL,
    INV_8831,
    ROOT,
    Expense,
    exchange_and_invoke,
)

stack = test_scenario.stack  # the reference scenario's fixture: expense.yaml, the demo backend, a real broker

SMALL = {"invoice_id": "INV-9001", "amount": 6000, "department": "42"}  # row 7: MFA + a manager
LARGE = {"invoice_id": "INV-9002", "amount": 12000, "department": "42"}  # row 8: MFA + two managers


def broker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


async def drive_the_scenario(stack: Expense) -> dict[str, Any]:
    """Rows 2, 3, 7 and 8 (one manager only: never approved); returns what the test needs to know."""
    alice = await stack.agent("alice", {**ALICE, "acr": "mfa"})
    bob = await stack.agent("bob", BOB)
    carol = await stack.human("carol", CAROL)
    assert (await bob.exchange("approveExpense", INV_8831)).status == 404  # row 2
    _, small = await exchange_and_invoke(alice, "approveExpense", INV_8831)  # row 3
    assert small.status == 200
    first = await alice.exchange("approveExpense", SMALL)  # row 7
    manager_approval = first.json()["approval_id"]
    assert (await carol.decide(manager_approval, "approve")).json()["state"] == "approved"
    approved = await alice.exchange("approveExpense", SMALL, approval_id=manager_approval)
    assert approved.status == 200
    executed = await alice.call_tool("approveExpense", SMALL, txn_token=approved.json()["access_token"])
    assert executed.status == 200
    dual = (await alice.exchange("approveExpense", LARGE)).json()["approval_id"]  # row 8, one vote of two
    assert (await carol.decide(dual, "approve")).json()["state"] == "pending"
    await stack.running.stop()  # the final checkpoint: the whole log is on disk
    return {"manager_approval": manager_approval, "dual": dual}


async def test_the_auditors_questions_over_the_scenarios_log(stack: Expense) -> None:
    ids = await drive_the_scenario(stack)
    log = str(stack.audit)
    records = stack.audit_records()
    forwarded = [r for r in records if r["event"] == "invocation" and r["decision"] == "allow"]
    outcomes = {r["request_id"]: r for r in records if r["event"] == "outcome"}

    # --- who approved what, when, for whom -----------------------------------------------------------------
    report = broker_cli("audit", "report", "approvals", "--file", log)
    assert report.returncode == 0, report.stderr
    rows = {row["approval_id"]: row for row in json_lines(report.stdout)}
    assert set(rows) == {ids["manager_approval"], ids["dual"]}
    manager = rows[ids["manager_approval"]]
    assert (manager["tool"], manager["requester"], manager["agent"]) == ("approveExpense", "alice", AGENT)
    assert manager["required"] == ["manager_approval"]
    assert manager["args"] == {"invoice_id": "INV-9001", "amount": 6000}  # expense.yaml's audit_fields
    assert [(d["approver"], d["decision"], d["state"]) for d in manager["decisions"]] == [
        ("carol", "approve", "approved")
    ]
    assert manager["state"] == "approved" and manager["executed"] is True
    [execution] = [r for r in forwarded if r.get("approval_id") == ids["manager_approval"]]
    assert manager["executed_at"] == execution["ts"]
    expected_status = str(outcomes[execution["request_id"]]["status"]) if outcomes else None
    assert manager["execution_status"] == expected_status
    dual = rows[ids["dual"]]
    assert dual["required"] == ["mfa", "dual_approval"] or dual["required"] == ["dual_approval"]
    assert [(d["approver"], d["state"]) for d in dual["decisions"]] == [("carol", "pending")]
    assert dual["state"] == "pending" and dual["executed"] is False

    table = broker_cli("audit", "report", "approvals", "--file", log, "--format", "table")
    assert table.returncode == 0 and ids["manager_approval"] in table.stdout
    assert broker_cli("audit", "report", "approvals", "--file", log, "--until=-1h").stdout == ""

    # --- audit query -------------------------------------------------------------------------------------------
    pending = broker_cli("audit", "query", "--file", log, "--subject", "alice", "--decision", "pending")
    assert pending.returncode == 0, pending.stderr
    found = json_lines(pending.stdout)
    assert [(r["event"], r["approval_id"]) for r in found] == [
        ("exchange", ids["manager_approval"]),
        ("exchange", ids["dual"]),
    ]
    stored = Path(log).read_text().splitlines()
    assert all(line in stored for line in pending.stdout.splitlines())  # printed exactly as stored

    denied = json_lines(broker_cli("audit", "query", "--file", log, "--subject", "bob").stdout)
    assert [(r["tool"], r["decision"], r["status"]) for r in denied] == [("approveExpense", "deny", 404)]

    by_request = broker_cli("audit", "query", "--file", log, "--request-id", execution["request_id"])
    assert [r["event"] for r in json_lines(by_request.stdout)] == ["invocation"] + (
        ["outcome"] if outcomes else []
    )

    by_txn = json_lines(broker_cli("audit", "query", "--file", log, "--txn", execution["txn"]).stdout)
    events = [r["event"] for r in by_txn]
    assert events[:2] == ["exchange", "invocation"] and set(events[2:]) <= {"outcome"}
    assert all(r["txn"] == execution["txn"] for r in by_txn)

    as_csv = broker_cli(
        "audit",
        "query",
        "--file",
        log,
        "--tool",
        "approveExpense",
        "--event",
        "invocation",
        "--format",
        "csv",
    )
    parsed = list(csv.DictReader(io.StringIO(as_csv.stdout, newline="")))
    assert [row["request_id"] for row in parsed] == [r["request_id"] for r in forwarded]

    since = broker_cli("audit", "query", "--file", log, "--since=-1h", "--event", "approval")
    assert len(json_lines(since.stdout)) == len([r for r in records if r["event"] == "approval"]) > 0
    assert broker_cli("audit", "query", "--file", log, "--until=-1h").stdout == ""


def test_access_review_of_the_scenarios_principals() -> None:
    result = broker_cli(
        "access-review",
        "-c",
        "config/examples/expense.yaml",
        "--principals",
        "config/examples/expense.principals.yaml",
    )
    assert result.returncode == 0, result.stderr
    rows = {(r["subject"], r["agent"], r["tool"]): r for r in json_lines(result.stdout)}
    # rows 1 and 2 of §11: alice sees both tools, bob listInvoices only; travel-bot neither; carol (an
    # approver, no agent) no tool at all
    assert (
        rows["alice", AGENT, "approveExpense"]["visible"] and rows["alice", AGENT, "listInvoices"]["visible"]
    )
    assert (
        not rows["bob", AGENT, "approveExpense"]["visible"] and rows["bob", AGENT, "listInvoices"]["visible"]
    )
    travel = "spiffe://example.org/agents/travel-bot"
    assert not rows["alice", travel, "approveExpense"]["visible"]
    assert not any(r["visible"] for (sub, _, _), r in rows.items() if sub == "carol")
    approve = rows["alice", AGENT, "approveExpense"]
    required = {c["rule"]: c["requires"] for c in approve["obligations_when"]}
    assert required["large-needs-manager"] == ["mfa", "manager_approval"]  # row 6/7
    assert required["very-large-needs-two"] == ["mfa", "dual_approval"]  # row 8
    assert required["velocity"] == ["security_review"]  # row 12
