"""The per-request record: stages fill it in; audit, metrics and logs read it once, at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from broker.audit.outcome import Outcome
from broker.identity.spiffe import SpiffeId

#: closed set of route labels (metrics) and the audit event each route's decisions are recorded as
ROUTE_EVENTS: dict[str, str | None] = {
    "invoke": "invocation",
    "discovery": "discovery",
    "exchange": "exchange",
    "approval": "approval",
    "mcp": "mcp",
    "metadata": None,  # public metadata (RFC 9728, JWKS): nothing decided, nothing audited
    "other": None,
}


@dataclass(slots=True)
class RequestContext:
    #: the broker's own id of this request (unique; X-Request-Id of the response and of forwarded calls)
    request_id: str
    #: the caller's X-Request-Id when it was a sane short token (CONTRACT §12); recorded, never trusted as ours
    client_request_id: str | None = None
    route: str = "other"
    started: float = field(default_factory=time.perf_counter)
    tool: str | None = None
    actor: SpiffeId | None = None
    subject: str | None = None
    args_digest: str | None = None
    txn: str | None = None
    #: the approval this request asked for, used, or decided (joins an approval's request, votes and execution)
    approval_id: str | None = None
    #: fields a tool lists as auditable, copied from its arguments
    audit_args: dict[str, Any] | None = None
    decision: str | None = None
    reason: str = ""
    status: int | None = None
    #: error code of a refusal ("ok" otherwise): the bounded ``code`` label of broker_requests_total
    code: str = "ok"
    #: /mcp only: the configured server and the MCP method (JSON-RPC ``method``, or GET/DELETE), as far as
    #: the request got; the metrics close them to bounded label sets (:meth:`Metrics.observe_mcp`)
    mcp_server: str | None = None
    mcp_method: str | None = None
    #: how a human reached an approval decision when it was not the API: "web" (the approvals page, CONTRACT §14)
    channel: str | None = None
    #: set once this request's decision record is in the audit log
    audited: bool = False
    #: the policy_version of the config this request was decided under
    policy_version: str | None = None
    #: W3C traceparent of this request's span (the caller's trace continued, or a new one): forwarded upstream,
    #: its trace id in the audit record and the access log (CONTRACT §16)
    traceparent: str = ""
    #: a forwarded call's outcome (CONTRACT §15), set when the forward starts; its record is written by the
    #: middleware when the agent's answer is handed over (:func:`broker.gateway.middleware.record_outcome`)
    outcome: Outcome | None = None

    @property
    def trace_id(self) -> str | None:
        return self.traceparent[3:35] if self.traceparent else None

    @property
    def event(self) -> str | None:
        return ROUTE_EVENTS.get(self.route)

    def audit_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "event": self.event,
            "decision": self.decision,
            "reason": self.reason,
            "request_id": self.request_id,
            "subject": self.subject,
            "actor": str(self.actor) if self.actor else None,
            "tool": self.tool,
            "args_digest": self.args_digest,
            "txn": self.txn,
            "policy_version": self.policy_version,
            "status": self.status,
        }
        if self.traceparent:
            fields["trace_id"] = self.trace_id
        if self.client_request_id is not None:
            fields["client_request_id"] = self.client_request_id
        if self.approval_id is not None:
            fields["approval_id"] = self.approval_id
        if self.audit_args:
            fields["args"] = self.audit_args
        if self.channel is not None:
            fields["channel"] = self.channel
        return fields

    def outcome_fields(self, now: float, body: bytes | None) -> dict[str, Any]:
        """The outcome record: the decision record's identifying fields (no arguments) and the outcome's own."""
        assert self.outcome is not None
        fields = self.audit_fields()
        fields.pop("args", None)
        fields.update(self.outcome.fields(now, body))
        return fields


CTX = web.RequestKey("broker_ctx", RequestContext)
#: the server span's traceparent, set by the tracing middleware (broker.otel) when tracing is configured
TRACEPARENT = web.RequestKey("broker_traceparent", str)
