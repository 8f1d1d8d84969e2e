"""broker.audit.approvals_report: one row per approval, joined from the records that name it (pure)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from broker.audit.approvals_report import approval_rows

AGENT = "spiffe://example.org/agents/expense-assistant"
A1 = "utGZbcECuSUvctE2wvBTwg"
A2 = "AAAAAAAAAAAAAAAAAAAAAA"


def rec(seq: int, event: str, decision: str, **fields: Any) -> dict[str, Any]:
    base = {
        "seq": seq,
        "ts": f"2026-05-01T12:00:{seq:02d}.000Z",
        "event": event,
        "decision": decision,
        "reason": "",
        "request_id": f"r{seq}",
        "subject": "alice",
        "actor": AGENT,
        "tool": "approveExpense",
        "args_digest": "D1",
        "txn": None,
        "status": None,
    }
    return {**base, **fields}


def log_of_row7(*, with_outcome: bool) -> list[dict[str, Any]]:
    """Row 7 as the broker records it: request (pending), a refused self-approval, carol's vote, the exchange
    with the approval, the invocation it authorised (and its outcome), and a second, never decided approval."""
    records = [
        rec(
            1, "config_load", "allow", subject=None, actor=None, tool=None, request_id=None, args_digest=None
        ),
        rec(
            2,
            "exchange",
            "pending",
            reason="approval_required: manager_approval",
            status=403,
            approval_id=A1,
            args={"invoice_id": "INV-9001", "amount": 6000},
        ),
        rec(3, "approval", "deny", reason="approval_self", actor=None, status=403, approval_id=A1),
        rec(
            4,
            "approval",
            "allow",
            reason=f"approve:{A1}:approved",
            subject="carol",
            actor=None,
            status=200,
            approval_id=A1,
        ),
        rec(5, "approval", "allow", reason=f"read:{A1}", status=200, approval_id=A1),
        rec(6, "exchange", "allow", txn="T1", status=200, approval_id=A1),
        rec(7, "invocation", "allow", txn="T1", approval_id=A1),
        rec(
            8,
            "exchange",
            "pending",
            reason="approval_required: mfa, dual_approval",
            args_digest="D2",
            status=403,
            approval_id=A2,
        ),
        rec(9, "invocation", "allow", txn="T9", request_id="r9", tool="listInvoices", args_digest="D9"),
    ]
    if with_outcome:
        records.append(rec(10, "outcome", "allow", request_id="r7", status=200, approval_id=None))
        records.append(rec(11, "outcome", "allow", request_id="r9", status=200, tool="listInvoices"))
    return records


def test_the_manager_approval_row() -> None:
    rows = {row.approval_id: row.to_json() for row in approval_rows(log_of_row7(with_outcome=True))}
    assert list(rows) == [A1, A2]
    row = rows[A1]
    assert row["tool"] == "approveExpense"
    assert (row["requester"], row["agent"]) == ("alice", AGENT)
    assert row["required"] == ["manager_approval"]
    assert row["args_digest"] == "D1" and row["args"] == {"invoice_id": "INV-9001", "amount": 6000}
    assert row["created"] == "2026-05-01T12:00:02.000Z"
    assert row["decisions"] == [
        {"approver": "carol", "decision": "approve", "at": "2026-05-01T12:00:04.000Z", "state": "approved"}
    ]
    assert row["refused"] == ["alice: approval_self at 2026-05-01T12:00:03.000Z"]
    assert row["state"] == "approved"
    assert row["executed"] is True and row["executed_at"] == "2026-05-01T12:00:07.000Z"
    assert row["execution_status"] == "200"


def test_an_undecided_approval_is_pending_and_not_executed() -> None:
    rows = {row.approval_id: row.to_json() for row in approval_rows(log_of_row7(with_outcome=True))}
    row = rows[A2]
    assert row["required"] == ["mfa", "dual_approval"] and row["args_digest"] == "D2"
    assert row["decisions"] == [] and row["state"] == "pending"
    assert row["executed"] is False and row["execution_status"] is None


def test_without_outcome_records_the_allowed_invocation_still_counts_as_executed() -> None:
    [row, _] = approval_rows(log_of_row7(with_outcome=False))
    assert row.to_json()["executed"] is True and row.to_json()["execution_status"] is None


def test_an_invocation_found_by_the_txn_of_the_approved_exchange() -> None:
    records = log_of_row7(with_outcome=True)
    records[6] = {**records[6]}
    del records[6]["approval_id"]  # the invocation no longer needed the approval: only its txn joins it
    [row, _] = approval_rows(records)
    assert row.to_json()["executed"] is True and row.to_json()["execution_status"] == "200"


def test_a_failed_upstream_is_reported_with_its_reason() -> None:
    records = log_of_row7(with_outcome=False)
    records.append(rec(12, "invocation", "error", request_id="r7", reason="upstream_error", status=502))
    [row, _] = approval_rows(records)
    assert row.to_json()["execution_status"] == "502 upstream_error"


def test_denied_approval_and_votes_from_reasons_of_older_records() -> None:
    """Records written before approval_id existed: the vote's reason names the approval."""
    records = [
        rec(1, "approval", "allow", reason=f"approve:{A1}:pending", subject="carol", actor=None),
        rec(2, "approval", "allow", reason=f"deny:{A1}:denied", subject="dave", actor=None, channel="web"),
    ]
    [row] = approval_rows(records)
    assert row.state == "denied"
    assert row.to_cells()["decisions"] == [
        "carol approve at 2026-05-01T12:00:01.000Z (pending)",
        "dave deny at 2026-05-01T12:00:02.000Z via web (denied)",
    ]
    assert row.to_json()["executed"] is False


def test_since_and_until_select_by_creation() -> None:
    records = log_of_row7(with_outcome=True)
    at = datetime(2026, 5, 1, 12, 0, 8, tzinfo=UTC)
    assert [r.approval_id for r in approval_rows(records, since=at)] == [A2]
    assert [r.approval_id for r in approval_rows(records, until=at)] == [A1]


def test_records_without_approvals_give_no_rows() -> None:
    assert approval_rows([rec(1, "invocation", "allow", txn="T"), rec(2, "outcome", "allow")]) == []
