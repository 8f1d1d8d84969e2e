"""The tracing seam (CONTRACT §16): what the request path calls, and the closed sets its attributes come from.

Without ``observability.tracing`` the broker runs on :data:`NULL_TRACER`: every span is the one shared
:data:`NULL_SPAN_SCOPE` (enter and exit do nothing), and OpenTelemetry is never imported — the SDK lives in
:mod:`broker.otel`, which only ``build_app`` imports, and only when the config asks for it.

Span attributes come from closed sets only, built here by pure functions: the route label, configured tool
names, the decision, the error code, the HTTP method, the status, the MCP method. Never a token, a proof, a
subject, an argument value or a header — an exported span leaves the broker's trust boundary (a collector,
a vendor) with none of what the audit log protects.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from contextlib import AbstractContextManager
from typing import Final, Protocol

from broker.mcp.jsonrpc import KNOWN_NOTIFICATIONS, KNOWN_REQUESTS

ROUTE: Final = "broker.route"
TOOL: Final = "broker.tool"
DECISION: Final = "broker.decision"
CODE: Final = "broker.code"
HTTP_METHOD: Final = "http.request.method"
HTTP_STATUS: Final = "http.response.status_code"
MCP_METHOD: Final = "mcp.method"

#: the route labels (broker.context.ROUTE_EVENTS' keys); anything else is "other"
ROUTES: Final = frozenset({"invoke", "discovery", "exchange", "approval", "mcp", "metadata", "other"})
DECISIONS: Final = frozenset({"allow", "deny", "pending", "step_up", "error"})
#: RFC 9110 §9 methods and PATCH; OpenTelemetry's HTTP conventions name any other ``_OTHER``
HTTP_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
#: every MCP method the JSON-RPC allowlist knows, and the session era's GET (SSE stream) and DELETE
MCP_METHODS: Final = frozenset(KNOWN_REQUESTS | KNOWN_NOTIFICATIONS | {"GET", "DELETE"})
#: error codes are class attributes of the BrokerError family; this only bounds them defensively
_CODE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
_TRACEPARENT: Final = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")

Attributes = dict[str, str | int]


class Span(Protocol):
    def set_attribute(self, key: str, value: str | int) -> None: ...


class Tracer(Protocol):
    """What the request path calls. Spans nest by context (the request's task): a span opened inside another
    is its child."""

    def server_span(self, traceparent: str | None) -> AbstractContextManager[Span]:
        """The request's span, continuing the caller's ``traceparent`` header (a new trace if it is unusable)."""
        ...

    def span(self, name: str) -> AbstractContextManager[Span]:
        """A child of the current span (identity, policy, state store, audit, upstream)."""
        ...

    def traceparent(self) -> str | None:
        """The W3C ``traceparent`` of the current span, or None when nothing is traced."""
        ...


class _NullSpan:
    __slots__ = ()

    def set_attribute(self, key: str, value: str | int) -> None:
        return None


class _NullScope:
    """One shared, reusable context manager: entering a span costs a method call, nothing is allocated."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return NULL_SPAN

    def __exit__(self, *exc: object) -> None:
        return None


class NullTracer:
    __slots__ = ()

    def server_span(self, traceparent: str | None) -> AbstractContextManager[Span]:
        return NULL_SPAN_SCOPE

    def span(self, name: str) -> AbstractContextManager[Span]:
        return NULL_SPAN_SCOPE

    def traceparent(self) -> str | None:
        return None


NULL_SPAN: Final = _NullSpan()
NULL_SPAN_SCOPE: Final = _NullScope()
NULL_TRACER: Final = NullTracer()


def parse_traceparent(header: str | None) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a W3C ``traceparent`` (Trace Context §3.2, version 00), or None if it
    is absent or unusable — an all-zero trace or span id is invalid (§3.2.2.3, §3.2.2.4): a new trace starts."""
    match = _TRACEPARENT.fullmatch(header or "")
    if match is None:
        return None
    trace_id, span_id = int(match.group(1), 16), int(match.group(2), 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(match.group(3), 16)


def format_traceparent(trace_id: int, span_id: int, flags: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


def route_label(route: str) -> str:
    return route if route in ROUTES else "other"


def method_label(method: str) -> str:
    return method if method in HTTP_METHODS else "_OTHER"


def mcp_method_label(method: str | None) -> str:
    return method if method in MCP_METHODS else "other"


def tool_label(tool: str | None, configured: Collection[str]) -> str | None:
    """A tool name is an attribute only if the config names it (a caller can send any name)."""
    return tool if tool is not None and tool in configured else None


def server_span_name(method: str, route: str) -> str:
    """Low-cardinality span name (OpenTelemetry HTTP conventions: ``{method} {route}``)."""
    return f"{method_label(method)} {route_label(route)}"


def server_attributes(
    *,
    method: str,
    route: str,
    tool: str | None,
    configured_tools: Collection[str],
    decision: str | None,
    code: str,
    status: int | None,
    mcp_method: str | None,
) -> Attributes:
    """The server span's attributes, from the request record's fields, each mapped into its closed set."""
    attributes: Attributes = {
        HTTP_METHOD: method_label(method),
        ROUTE: route_label(route),
        DECISION: decision if decision in DECISIONS else "error",
        CODE: code if _CODE.fullmatch(code) else "other",
    }
    name = tool_label(tool, configured_tools)
    if name is not None:
        attributes[TOOL] = name
    if status is not None and 100 <= status <= 599:
        attributes[HTTP_STATUS] = status
    if route == "mcp":
        attributes[MCP_METHOD] = mcp_method_label(mcp_method)
    return attributes
