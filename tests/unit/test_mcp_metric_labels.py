"""``Metrics.observe_mcp`` closes the MCP labels itself (CONTRACT §16), whatever the endpoint hands it."""

from __future__ import annotations

import pytest

from broker.observability import Metrics

ROWS = [
    ("expenses", "tools/call", ("expenses", "tools/call")),
    ("expenses", "notifications/initialized", ("expenses", "notifications/initialized")),
    ("expenses", "resources/read", ("expenses", "resources/read")),  # known, refused with -32601: still known
    ("expenses", "GET", ("expenses", "GET")),
    ("expenses", None, ("expenses", "other")),
    ("expenses", "Tools/Call", ("expenses", "other")),
    ("expenses", "tools/call\u0000", ("expenses", "other")),
    ("expenses", "get", ("expenses", "other")),
    ("nope", "tools/call", ("-", "tools/call")),
    ("Expenses", "tools/list", ("-", "tools/list")),
    (None, None, ("-", "other")),
]


@pytest.mark.parametrize(("server", "method", "labels"), ROWS, ids=[f"{s}-{m!r}" for s, m, _ in ROWS])
def test_labels_are_closed_sets(server: str | None, method: str | None, labels: tuple[str, str]) -> None:
    metrics = Metrics()
    metrics.bind_mcp_servers(["expenses"])
    metrics.observe_mcp(server, method, decision="deny", code="invalid_request", seconds=0.01)
    sample = {"mcp_server": labels[0], "mcp_method": labels[1], "decision": "deny", "code": "invalid_request"}
    assert metrics.registry.get_sample_value("broker_mcp_requests_total", sample) == 1.0
    count = {"mcp_server": labels[0], "mcp_method": labels[1]}
    assert metrics.registry.get_sample_value("broker_mcp_request_duration_seconds_count", count) == 1.0


def test_a_reload_replaces_the_server_set() -> None:
    metrics = Metrics()
    metrics.bind_mcp_servers(["expenses"])
    metrics.bind_mcp_servers(["travel"])
    metrics.observe_mcp("expenses", "ping", decision="allow", code="ok", seconds=0.0)
    metrics.observe_mcp("travel", "ping", decision="allow", code="ok", seconds=0.0)
    assert (
        metrics.registry.get_sample_value(
            "broker_mcp_requests_total",
            {"mcp_server": "-", "mcp_method": "ping", "decision": "allow", "code": "ok"},
        )
        == 1.0
    )
    # prebound at load: the relayed methods of a configured server exist at zero
    labels = {"mcp_server": "travel", "mcp_method": "tools/call", "decision": "allow", "code": "ok"}
    assert metrics.registry.get_sample_value("broker_mcp_requests_total", labels) == 0.0
