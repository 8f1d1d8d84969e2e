"""``broker audit report approvals``: who approved what, when, for whom, and whether the approved call ran.

Pure: :func:`approval_rows` reads records in log order (one pass; it keeps only what concerns approvals) and
returns one :class:`ApprovalRow` per approval id. The records it joins, all carrying ``approval_id``:

- the request: the first ``exchange``/``invocation``/``mcp`` record with ``decision: pending`` (reason
  ``approval_required: <obligations>``): requester subject and agent, tool, args digest and audit fields, created;
- the votes: ``approval`` records with ``decision: allow`` and reason ``approve|deny:<id>:<state after>``
  (approver = the record's subject); refused attempts (``decision: deny``: the requester herself, a second vote, no
  MFA…) are listed apart;
- the execution: an ``invocation``/``mcp`` record with ``decision: allow`` naming the approval, or carrying the
  ``txn`` of an exchange that named it; its ``outcome`` record (same ``request_id``) gives the upstream status, a
  later ``error`` record of that request (the upstream failed) its reason.

Without any vote an approval is reported ``pending`` (it may have expired since: the log records no expiry).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from broker.audit.query import record_time

__all__ = ["COLUMNS", "ApprovalRow", "Vote", "approval_rows"]

_VOTE = re.compile(r"(approve|deny):([A-Za-z0-9_-]{22}):([a-z_]+)")
_CALLS: Final = frozenset({"exchange", "invocation", "mcp"})
_EXECUTING: Final = frozenset({"invocation", "mcp"})
_REQUIRED_PREFIX = "approval_required:"

#: the table/csv columns, in order (json rows carry the same members, lists and objects unflattened)
COLUMNS: Final = (
    "approval_id",
    "tool",
    "requester",
    "agent",
    "required",
    "args_digest",
    "args",
    "created",
    "decisions",
    "refused",
    "state",
    "executed",
    "executed_at",
    "execution_status",
)


@dataclass(frozen=True)
class Vote:
    approver: str | None
    verdict: str
    at: str | None
    #: the approval's state after this vote
    state: str
    channel: str | None = None

    def text(self) -> str:
        via = f" via {self.channel}" if self.channel else ""
        return f"{self.approver} {self.verdict} at {self.at}{via} ({self.state})"


@dataclass
class ApprovalRow:
    approval_id: str
    tool: str | None = None
    requester: str | None = None
    agent: str | None = None
    required: tuple[str, ...] = ()
    args_digest: str | None = None
    args: Mapping[str, Any] | None = None
    created: str | None = None
    votes: list[Vote] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    #: request ids of the calls this approval let through, and their outcome ("" until one is known)
    executions: dict[str, str] = field(default_factory=dict)
    executed_at: str | None = None
    txns: set[str] = field(default_factory=set)

    @property
    def state(self) -> str:
        return self.votes[-1].state if self.votes else "pending"

    def to_json(self) -> dict[str, Any]:
        return {
            "approval_id": self.approval_id,
            "tool": self.tool,
            "requester": self.requester,
            "agent": self.agent,
            "required": list(self.required),
            "args_digest": self.args_digest,
            "args": dict(self.args) if self.args is not None else None,
            "created": self.created,
            "decisions": [
                {"approver": v.approver, "decision": v.verdict, "at": v.at, "state": v.state}
                | ({"channel": v.channel} if v.channel else {})
                for v in self.votes
            ],
            "refused": list(self.refused),
            "state": self.state,
            "executed": bool(self.executions),
            "executed_at": self.executed_at,
            "execution_status": "; ".join(s for s in self.executions.values() if s) or None,
        }

    def to_cells(self) -> dict[str, Any]:
        """The row for csv/table: votes as text, one per line-free cell item."""
        return {**self.to_json(), "decisions": [v.text() for v in self.votes]}


def _approval_id(record: Mapping[str, Any]) -> str | None:
    named = record.get("approval_id")
    if isinstance(named, str):
        return named
    if (
        record.get("event") == "approval"
    ):  # records written before approval_id was recorded: the vote's reason
        vote = _VOTE.fullmatch(str(record.get("reason") or ""))
        if vote is not None:
            return vote.group(2)
    return None


def _required(reason: Any) -> tuple[str, ...]:
    text = str(reason or "")
    if not text.startswith(_REQUIRED_PREFIX):
        return ()
    return tuple(part.strip() for part in text[len(_REQUIRED_PREFIX) :].split(",") if part.strip())


def _status(record: Mapping[str, Any]) -> str:
    status = record.get("status")
    reason = record.get("reason") or ""
    return f"{status}" + (f" {reason}" if reason and record.get("decision") == "error" else "")


def approval_rows(
    records: Iterable[Mapping[str, Any]],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[ApprovalRow]:
    """One row per approval id found in ``records`` (log order), those created in [since, until)."""
    rows: dict[str, ApprovalRow] = {}
    by_txn: dict[str, ApprovalRow] = {}
    by_request: dict[str, ApprovalRow] = {}
    for record in records:
        event, decision = record.get("event"), record.get("decision")
        request_id = record.get("request_id")
        if isinstance(request_id, str) and request_id in by_request and event != "approval":
            row = by_request[request_id]
            if event == "outcome" or decision == "error":  # what became of an executed call
                row.executions[request_id] = _status(record)
            continue
        approval_id = _approval_id(record)
        txn = record.get("txn")
        if approval_id is None:
            if event in _EXECUTING and decision == "allow" and isinstance(txn, str) and txn in by_txn:
                approval_id = by_txn[txn].approval_id  # a txn token minted under the approval
            else:
                continue
        row = rows.setdefault(approval_id, ApprovalRow(approval_id))
        if row.created is None:
            row.created = record.get("ts")
        row.tool = row.tool or record.get("tool")
        row.args_digest = row.args_digest or record.get("args_digest")
        if event in _CALLS and decision == "pending" and row.requester is None:
            row.requester, row.agent = record.get("subject"), record.get("actor")
            row.required = _required(record.get("reason"))
            args = record.get("args")
            row.args = args if isinstance(args, dict) else None
        elif event == "exchange" and decision == "allow" and isinstance(txn, str):
            row.txns.add(txn)
            by_txn[txn] = row
        elif event in _EXECUTING and decision == "allow" and isinstance(request_id, str):
            row.executions.setdefault(request_id, "")
            row.executed_at = row.executed_at or record.get("ts")
            by_request[request_id] = row
        elif event == "approval" and decision == "allow":
            vote = _VOTE.fullmatch(str(record.get("reason") or ""))
            if vote is not None:
                channel = record.get("channel")
                row.votes.append(
                    Vote(
                        record.get("subject"),
                        vote.group(1),
                        record.get("ts"),
                        vote.group(3),
                        channel if isinstance(channel, str) else None,
                    )
                )
        elif event == "approval" and decision != "allow":
            row.refused.append(f"{record.get('subject')}: {record.get('reason')} at {record.get('ts')}")
    selected = []
    for row in rows.values():
        created = record_time({"ts": row.created})
        if (since is not None or until is not None) and created is None:
            continue
        if since is not None and created is not None and created < since:
            continue
        if until is not None and created is not None and created >= until:
            continue
        selected.append(row)
    return selected
