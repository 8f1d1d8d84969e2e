"""The tracing seam (broker.tracing): closed attribute sets, traceparent parsing, the null tracer; the collector
URL and the config section. Pure: no socket, no OpenTelemetry call."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from broker.config.models import Tracing
from broker.tracing import (
    NULL_SPAN_SCOPE,
    NULL_TRACER,
    format_traceparent,
    mcp_method_label,
    method_label,
    parse_traceparent,
    route_label,
    server_attributes,
    server_span_name,
    tool_label,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        (f"00-{TRACE}-00f067aa0ba902b7-01", (int(TRACE, 16), 0x00F067AA0BA902B7, 1)),
        (f"00-{TRACE}-00f067aa0ba902b7-00", (int(TRACE, 16), 0x00F067AA0BA902B7, 0)),
        (None, None),
        ("", None),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),  # all-zero trace id is invalid (W3C §3.2.2.3)
        (f"00-{TRACE}-{'0' * 16}-01", None),  # all-zero parent id is invalid (§3.2.2.4)
        (f"01-{TRACE}-00f067aa0ba902b7-01", None),  # only version 00 is parsed
        (f"00-{TRACE.upper()}-00f067aa0ba902b7-01", None),  # lowercase hex only
        (f"00-{TRACE}-00f067aa0ba902b7-01\r\nX-Admin: 1", None),
        (f"00-{TRACE}-00f067aa0ba902b7-01-extra", None),
    ],
    ids=[
        "sampled",
        "unsampled",
        "absent",
        "empty",
        "zero-trace",
        "zero-parent",
        "version",
        "upper",
        "crlf",
        "tail",
    ],
)
def test_parse_traceparent(header: str | None, parsed: tuple[int, int, int] | None) -> None:
    assert parse_traceparent(header) == parsed


def test_format_traceparent_round_trips() -> None:
    header = f"00-{TRACE}-00f067aa0ba902b7-01"
    parsed = parse_traceparent(header)
    assert parsed is not None and format_traceparent(*parsed) == header


@pytest.mark.parametrize(
    ("value", "label"),
    [
        ("POST", "POST"),
        ("GET", "GET"),
        ("PATCH", "PATCH"),
        ("post", "_OTHER"),
        ("BREW", "_OTHER"),
        ("X" * 200, "_OTHER"),
    ],
)
def test_http_methods_are_a_closed_set(value: str, label: str) -> None:
    assert method_label(value) == label


@pytest.mark.parametrize(
    ("value", "label"),
    [
        ("tools/call", "tools/call"),
        ("notifications/initialized", "notifications/initialized"),
        ("GET", "GET"),
        ("Tools/Call", "other"),
        ("tools/call\u0000", "other"),
        ("alice@example.org", "other"),
        (None, "other"),
    ],
)
def test_mcp_methods_are_a_closed_set(value: str | None, label: str) -> None:
    assert mcp_method_label(value) == label


def test_routes_and_tools_are_closed_sets() -> None:
    assert route_label("invoke") == "invoke" and route_label("INV-8831") == "other"
    configured = frozenset({"approveExpense", "listInvoices"})
    assert tool_label("approveExpense", configured) == "approveExpense"
    assert tool_label("approveExpense-INV-8831", configured) is None  # a caller can send any name
    assert tool_label(None, configured) is None
    assert server_span_name("POST", "invoke") == "POST invoke"
    assert server_span_name("BREW", "secret-route") == "_OTHER other"


def _attributes(**overrides: Any) -> dict[str, str | int]:
    fields: dict[str, Any] = {
        "method": "POST",
        "route": "invoke",
        "tool": "approveExpense",
        "configured_tools": frozenset({"approveExpense"}),
        "decision": "allow",
        "code": "ok",
        "status": 200,
        "mcp_method": None,
    }
    fields.update(overrides)
    return server_attributes(**fields)


def test_server_attributes_of_an_allowed_call() -> None:
    assert _attributes() == {
        "http.request.method": "POST",
        "broker.route": "invoke",
        "broker.tool": "approveExpense",
        "broker.decision": "allow",
        "broker.code": "ok",
        "http.response.status_code": 200,
    }


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"decision": "deny", "code": "access_denied", "status": 403}, {"broker.code": "access_denied"}),
        ({"decision": None, "status": None}, {"broker.decision": "error"}),  # no status attribute at all
        ({"decision": "maybe"}, {"broker.decision": "error"}),
        ({"code": "Bearer eyJhbGciOi.secret"}, {"broker.code": "other"}),
        ({"tool": "not-configured"}, {}),
        ({"status": 1000}, {}),
        ({"route": "mcp", "mcp_method": "tools/call"}, {"mcp.method": "tools/call"}),
        ({"route": "mcp", "mcp_method": "evil/method"}, {"mcp.method": "other"}),
    ],
    ids=[
        "refused",
        "unanswered",
        "unknown-decision",
        "hostile-code",
        "unknown-tool",
        "bad-status",
        "mcp",
        "mcp-other",
    ],
)
def test_server_attributes_stay_in_their_sets(overrides: dict[str, Any], expected: dict[str, Any]) -> None:
    attributes = _attributes(**overrides)
    for key, value in expected.items():
        assert attributes[key] == value
    if "tool" in overrides:
        assert "broker.tool" not in attributes
    if "status" in overrides and overrides["status"] in (None, 1000):
        assert "http.response.status_code" not in attributes
    if "route" not in overrides:
        assert "mcp.method" not in attributes


def test_the_null_tracer_allocates_nothing_per_span() -> None:
    assert NULL_TRACER.span("policy") is NULL_TRACER.span("audit") is NULL_SPAN_SCOPE
    assert NULL_TRACER.server_span(f"00-{TRACE}-00f067aa0ba902b7-01") is NULL_SPAN_SCOPE
    with NULL_TRACER.span("upstream") as span:
        span.set_attribute("broker.tool", "approveExpense")
        assert NULL_TRACER.traceparent() is None


def test_the_server_path_loads_no_opentelemetry_without_tracing() -> None:
    """Zero cost when off: OpenTelemetry is imported by broker.otel only, which build_app imports only when
    observability.tracing is configured."""
    code = "import sys, broker.app, broker.server, broker.workers; print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "opentelemetry" not in loaded and "broker.otel" not in loaded


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
        ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/traces"),
        ("https://tempo.example.org:4318/v1/traces", "https://tempo.example.org:4318/v1/traces"),
        ("https://gw.example.org/otlp/v1/traces", "https://gw.example.org/otlp/v1/traces"),
    ],
)
def test_the_collector_url_gets_the_traces_path(endpoint: str, url: str) -> None:
    from broker.otel import traces_url

    assert traces_url(endpoint) == url


@pytest.mark.parametrize(
    "settings",
    [
        {"otlp_endpoint": "grpc://127.0.0.1:4317", "sample_ratio": 1},
        {"otlp_endpoint": "http://user:pass@collector:4318", "sample_ratio": 1},
        {"otlp_endpoint": "http://collector:4318 ", "sample_ratio": 1},
        {"otlp_endpoint": "http://collector:4318", "sample_ratio": 1.5},
        {"otlp_endpoint": "http://collector:4318", "sample_ratio": -0.1},
        {"otlp_endpoint": "http://collector:4318"},
        {"otlp_endpoint": "http://collector:4318", "sample_ratio": 1, "headers": {"a": "b"}},
    ],
    ids=["grpc", "credentials", "space", "ratio-high", "ratio-negative", "ratio-missing", "unknown-key"],
)
def test_bad_tracing_settings_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Tracing.model_validate(settings)


def test_tracing_settings() -> None:
    settings = Tracing.model_validate({"otlp_endpoint": "http://127.0.0.1:4318", "sample_ratio": 0})
    assert (settings.sample_ratio, settings.service_name) == (0, "broker")
