"""Metrics (defined once, CONTRACT §9 names), structlog set-up and request ids.

Label values come from closed sets (routes, decisions, error codes, reasons) or from config names (tools):
never a subject, a token or anything else a caller controls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import sys
from collections.abc import Iterable
from typing import Any, Final, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.metrics import MetricWrapperBase

from broker.mcp.jsonrpc import KNOWN_NOTIFICATIONS, KNOWN_REQUESTS, RELAYED_NOTIFICATIONS, RELAYED_REQUESTS

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

#: the closed set of ``mcp_method`` label values (CONTRACT §16): every MCP method the JSON-RPC allowlist knows
#: (relayed or refused with -32601), the session era's ``GET`` (SSE stream) and ``DELETE`` (end of session)
#: requests, and ``other`` for everything else (a body that did not parse, a hostile method name)
MCP_METHOD_LABELS: Final = frozenset(KNOWN_REQUESTS | KNOWN_NOTIFICATIONS | {"GET", "DELETE", "other"})
#: the counter children bound for each configured MCP server at load: what the broker relays; the histogram's
#: only for the tool calls and listings (each histogram child is 19 series: a scrape stays small)
_MCP_PREBOUND: Final = sorted(
    set().union(*RELAYED_REQUESTS.values()) | RELAYED_NOTIFICATIONS | {"GET", "DELETE"}
)
_MCP_PREBOUND_DURATION: Final = ("tools/call", "tools/list")

_Family = TypeVar("_Family", bound=MetricWrapperBase)


class Metrics:
    """Every metric family of the broker, on its own registry (one per app, so tests do not share state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "broker_requests_total",
            "Requests by route, tool, decision and response code",
            ["route", "tool", "decision", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "broker_request_duration_seconds",
            "Whole request time in the broker",
            ["route"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.upstream_duration = Histogram(
            "broker_upstream_duration_seconds",
            "Time waiting for the tool backend",
            ["tool"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.auth_failures = Counter(
            "broker_auth_failures_total", "Identity refusals by precise reason", ["reason"], registry=r
        )
        self.dpop_replays = Counter("broker_dpop_replays_total", "DPoP proofs presented twice", registry=r)
        self.txn_tokens = Counter(
            "broker_txn_tokens_total",
            "Transaction tokens minted, consumed, rejected",
            ["tool", "event"],
            registry=r,
        )
        self.approvals = Counter(
            "broker_approvals_total", "Approval requests by state", ["state"], registry=r
        )
        self.approval_announcements = Counter(
            "broker_approval_announcements_total",
            "Approval webhook announcements by result (delivered, failed, dropped: the queue was full)",
            ["result"],
            registry=r,
        )
        self.config_reloads = Counter(
            "broker_config_reloads_total", "Config (re)loads by result", ["result"], registry=r
        )
        self.config_info = Gauge(
            "broker_config_info",
            "The loaded config's policy_version (value 1)",
            ["policy_version"],
            registry=r,
        )
        self.policy_shadow_diffs = Counter(
            "broker_policy_shadow_diffs_total",
            "Decisions where the shadow policy set disagreed with the active one",
            ["tool"],
            registry=r,
        )
        self.rotations = Counter(
            "broker_rotations_total",
            "Certificate, key and signing-key files reloaded without restart",
            ["what", "result"],
            registry=r,
        )
        self.audit_records = Counter("broker_audit_records_total", "Audit records written", registry=r)
        self.audit_errors = Counter(
            "broker_audit_errors_total", "Audit records that could not be written", registry=r
        )
        self.audit_resume_unverified = Counter(
            "broker_audit_resume_unverified_total",
            "Starts that found audit records after the last verifiable checkpoint (an audit_resume record)",
            registry=r,
        )
        self.audit_disk_free = Gauge(
            "broker_audit_disk_free_bytes",
            "Free bytes on the audit file's filesystem (as of the last /readyz or /metrics)",
            registry=r,
            multiprocess_mode="min",
        )
        self.state_errors = Counter(
            "broker_state_errors_total",
            "State store operations that failed (fail closed)",
            ["op"],
            registry=r,
        )
        self.mcp_requests = Counter(
            "broker_mcp_requests_total",
            "MCP requests by configured server, MCP method, decision and response code",
            ["mcp_server", "mcp_method", "decision", "code"],
            registry=r,
        )
        self.mcp_request_duration = Histogram(
            "broker_mcp_request_duration_seconds",
            "Whole MCP request time in the broker (a streamed answer until its last byte)",
            ["mcp_server", "mcp_method"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 300),
        )
        self._mcp_servers: frozenset[str] = frozenset()
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}

    def child(self, family: _Family, *values: str) -> _Family:
        """``family.labels(*values)`` (values in the family's label order), bound once and reused: the hot path's
        metric updates skip labels()'s validation, lock and lookup (~3 µs each). Label values come from closed
        sets (module docstring), so the map stays as small as the family's own; not for a family whose children
        are removed (``config_info``)."""
        key = (family, values)
        bound = self._children.get(key)
        if bound is None:
            bound = self._children[key] = family.labels(*values)
        return bound

    def exposition(self) -> bytes:
        """The Prometheus text format. With ``--workers N`` every worker answers for all of them: the values
        live in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, as under gunicorn)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

    def set_policy_version(self, version: str) -> None:
        self.config_info.clear()
        self.config_info.labels(policy_version=version).set(1)

    def bind_mcp_servers(self, names: Iterable[str]) -> None:
        """At each (re)load: the configured MCP server names become the ``mcp_server`` label set, and some
        children exist from the start (zero, so rates and quantiles have series before the first request):
        every relayed method's count, the tool calls' and listings' durations. Children of a server dropped by
        a reload stay until restart."""
        self._mcp_servers = frozenset(names)
        for server in sorted(self._mcp_servers):
            for method in _MCP_PREBOUND:
                self.mcp_requests.labels(mcp_server=server, mcp_method=method, decision="allow", code="ok")
            for method in _MCP_PREBOUND_DURATION:
                self.mcp_request_duration.labels(mcp_server=server, mcp_method=method)

    def observe_mcp(
        self, server: str | None, method: str | None, *, decision: str, code: str, seconds: float
    ) -> None:
        """One finished ``/mcp/{server}`` request. The labels are closed here, whatever the caller passes: a
        server name that is not configured counts as ``-`` (as ``tool`` does on ``broker_requests_total``; no
        configured name can be ``-``), a method outside :data:`MCP_METHOD_LABELS` as ``other`` (``decision``
        and ``code`` come from closed sets already)."""
        server_label = server if server in self._mcp_servers else "-"
        method_label = method if method in MCP_METHOD_LABELS else "other"
        self.child(self.mcp_requests, server_label, method_label, decision, code).inc()
        self.child(self.mcp_request_duration, server_label, method_label).observe(seconds)


# Request and trace ids must be unique, not secret (W3C Trace Context §3.2.2.3: "randomly generated"); they
# are made per request on the hot path, where a CSPRNG system call costs ~4 µs each and getrandbits ~0.1 µs.
_ids = random.Random()  # noqa: S311 - identifiers, not secrets


def new_request_id() -> str:
    """The broker's own id of one request (CONTRACT §12): 96 random bits, never taken from the caller, so no
    caller can make two requests (two audit records) share an id."""
    return f"{_ids.getrandbits(96):024x}"


def client_request_id(header_value: str | None) -> str | None:
    """The caller's ``X-Request-Id``, kept beside ours as ``client_request_id`` if it is short and plain (it
    lands in logs and audit: 1-64 of ``A-Za-z0-9._:-``); anything else is dropped."""
    if header_value and _REQUEST_ID.fullmatch(header_value):
        return header_value
    return None


def traceparent_for(header_value: str | None) -> str:
    """W3C traceparent: continue the caller's trace with a new span id, or start a trace."""
    match = _TRACEPARENT.match(header_value or "")
    trace_id = match.group(1) if match and match.group(1) != "0" * 32 else f"{_ids.getrandbits(128):032x}"
    flags = match.group(3) if match else "01"
    return f"00-{trace_id}-{_ids.getrandbits(64) or 1:016x}-{flags}"


class BestEffortStream:
    """stderr for log lines, best effort: a log sink that fails (a full disk, EFBIG under a file-size limit, a
    closed pipe) drops the line instead of failing the request that logged it. The audit log is the evidence
    and fails closed on its own; logs are for operators."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except (OSError, ValueError):  # ValueError: write to a closed file
            return 0

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


def _log_fallback(value: Any) -> Any:
    # structlog's own fallback for values JSON has no form for: their __structlog__, else their repr
    structlog_form = getattr(value, "__structlog__", None)
    return structlog_form() if callable(structlog_form) else repr(value)


#: built once: structlog's default renderer calls json.dumps(default=...), which builds an encoder per line
_LOG_ENCODER = json.JSONEncoder(default=_log_fallback)


def _render_json(event_dict: Any, **_: Any) -> str:
    return _LOG_ENCODER.encode(event_dict)


def configure_logging(*, fmt: str = "json", level: str = "info") -> None:
    """structlog JSON lines on stderr (``console`` for humans); stdlib loggers (aiohttp) go the same way."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_render_json)
    )
    structlog.configure(
        processors=[*processors, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=BestEffortStream(sys.stderr)),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(name)s %(message)s")
