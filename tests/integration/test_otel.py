"""OpenTelemetry tracing (CONTRACT §16) against a real OTLP/HTTP receiver (:mod:`tests.otlp`): the broker on real
TLS, a recording backend, the demo MCP server; spans decoded from the protobuf the exporter sent.

Each traced request is one server span continuing the caller's ``traceparent``, with child spans for identity,
policy, the state store, the audit commit and the upstream call; the backend gets the upstream span's
``traceparent`` and the audit record the same trace id. Attributes come from closed sets only.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.otel import EXPORT_TIMEOUT
from tests.certfactory import Pki
from tests.conftest import BrokerFactory, BrokerUnderTest, RecordingUpstream, base_config
from tests.integration.test_mcp import ALICE, MODERN, MODERN_CALL, mcp_stack
from tests.otlp import OtlpReceiver, ReceivedSpan, otlp_receiver

TOOL = "/v1/tools/approveExpense"
INVOICE = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
INCOMING = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
#: every attribute key a broker span may carry (CONTRACT §16)
CLOSED_KEYS = {
    "broker.route",
    "broker.tool",
    "broker.decision",
    "broker.code",
    "http.request.method",
    "http.response.status_code",
    "mcp.method",
}


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    async with otlp_receiver() as running:
        yield running


@pytest.fixture
def quick_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's batch delay (5 s by default) down to 50 ms, read by BatchSpanProcessor when it is built."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")


def traced_config(
    pki: Pki, tmp: Path, upstream: str, endpoint: str, ratio: float = 1.0, **tracing: Any
) -> dict[str, Any]:
    return base_config(
        pki,
        tmp,
        upstream_url=upstream,
        observability={"tracing": {"otlp_endpoint": endpoint, "sample_ratio": ratio, **tracing}},
        counters=[{"name": "calls", "tools": ["approveExpense"], "window_seconds": 3600}],
        policies=[
            {"id": "any-agent", "tools": ["*"], "effect": "allow", "when": 'actor.id != ""'},
            {
                "id": "cap",
                "tools": ["approveExpense"],
                "effect": "deny",
                "when": "args.amount > 10000",
                "reason": "amounts over 10000 are refused",
            },
        ],
    )


def server_span(spans: list[ReceivedSpan], trace_id: str) -> ReceivedSpan | None:
    return next((s for s in spans if s.trace_id == trace_id and s.kind == SERVER_KIND), None)


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> dict[str, ReceivedSpan]:
    found = [s for s in spans if s.parent_span_id == parent.span_id]
    assert len({s.name for s in found}) == len(found), [s.name for s in found]  # one of each
    return {s.name: s for s in found}


def audit_record(broker: BrokerUnderTest, request_id: str) -> dict[str, Any]:
    return next(r for r in broker.audit_records() if r.get("request_id") == request_id)


async def test_a_rest_call_is_one_server_span_continuing_the_callers_trace(
    broker_factory: BrokerFactory,
    upstream: RecordingUpstream,
    receiver: OtlpReceiver,
    pki: Pki,
    tmp_path: Path,
    quick_export: None,
) -> None:
    broker = await broker_factory(traced_config(pki, tmp_path, upstream.url, receiver.url))
    reply = await broker.caller().call("POST", TOOL, INVOICE, headers={"traceparent": INCOMING})
    assert reply.status == 200

    spans = await receiver.wait_for(lambda spans: server_span(spans, CALLER_TRACE) is not None)
    server = server_span(spans, CALLER_TRACE)
    assert server is not None
    assert (server.name, server.parent_span_id) == (
        "POST invoke",
        CALLER_SPAN,
    )  # the caller's span is its parent
    assert server.attributes == {
        "broker.route": "invoke",
        "broker.tool": "approveExpense",
        "broker.decision": "allow",
        "broker.code": "ok",
        "http.request.method": "POST",
        "http.response.status_code": 200,
    }
    assert server.resource["service.name"] == "broker"
    steps = children(spans, server)
    assert set(steps) == {"identity", "state.counters", "policy", "state.guard", "audit", "upstream"}
    assert all(s.trace_id == CALLER_TRACE for s in steps.values())
    assert steps["upstream"].attributes == {"broker.tool": "approveExpense", "http.response.status_code": 200}
    # the backend is called inside the upstream span and told so; the audit record names the same trace
    [got] = upstream.received
    assert got.headers["traceparent"] == f"00-{CALLER_TRACE}-{steps['upstream'].span_id}-01"
    assert audit_record(broker, reply.headers["X-Request-Id"])["trace_id"] == CALLER_TRACE


async def test_a_refused_call_carries_its_decision_and_code(
    broker_factory: BrokerFactory,
    upstream: RecordingUpstream,
    receiver: OtlpReceiver,
    pki: Pki,
    tmp_path: Path,
    quick_export: None,
) -> None:
    broker = await broker_factory(traced_config(pki, tmp_path, upstream.url, receiver.url))
    too_much = {**INVOICE, "amount": 20000}
    reply = await broker.caller().call("POST", TOOL, too_much, headers={"traceparent": INCOMING})
    assert (reply.status, reply.error) == (403, "access_denied")

    spans = await receiver.wait_for(lambda spans: server_span(spans, CALLER_TRACE) is not None)
    server = server_span(spans, CALLER_TRACE)
    assert server is not None
    assert server.attributes == {
        "broker.route": "invoke",
        "broker.tool": "approveExpense",
        "broker.decision": "deny",
        "broker.code": "access_denied",
        "http.request.method": "POST",
        "http.response.status_code": 403,
    }
    # decided (identity, counters, policy) and audited, never forwarded
    assert set(children(spans, server)) == {"identity", "state.counters", "policy", "audit"}
    assert upstream.received == []
    assert audit_record(broker, reply.headers["X-Request-Id"])["trace_id"] == CALLER_TRACE


async def test_no_token_proof_subject_argument_or_header_reaches_an_exported_span(
    broker_factory: BrokerFactory,
    upstream: RecordingUpstream,
    receiver: OtlpReceiver,
    pki: Pki,
    tmp_path: Path,
    quick_export: None,
) -> None:
    broker = await broker_factory(traced_config(pki, tmp_path, upstream.url, receiver.url))
    caller = broker.caller(sub="subject-7f3a91-secret", claims={"department": "dept-c0ffee-secret"})
    auth = caller.auth_headers("POST", TOOL)
    arguments = {"invoice_id": "INV-b16b00b5-secret", "amount": 4800, "department": "dept-c0ffee-secret"}
    headers = {
        "traceparent": INCOMING,
        "X-Leak": "header-5eaf00d-secret",
        "Cookie": "sid=cookie-d00dfeed-secret",
    }
    allowed = await caller.call("POST", TOOL, arguments, auth=auth, headers=headers)
    assert allowed.status == 200
    refused = await caller.call("POST", "/v1/tools/noSuch-a11ce-secret", arguments, headers=headers)
    assert refused.status == 404
    await broker.running.stop()  # flushes every span

    [got] = upstream.received
    secrets = [
        caller.token,
        auth["DPoP"],
        got.headers["Txn-Token"],  # the token the broker minted
        "subject-7f3a91-secret",
        "INV-b16b00b5-secret",
        "dept-c0ffee-secret",
        "header-5eaf00d-secret",
        "cookie-d00dfeed-secret",
        "noSuch-a11ce-secret",  # a tool name the config does not know
        str(pki.agent_id("expense-assistant")),
    ]
    exported = b"".join(receiver.bodies)
    assert b"approveExpense" in exported  # the scan reads the strings the spans carry
    for secret in secrets:
        assert secret.encode() not in exported, secret
    strings = [
        str(value)
        for span in receiver.spans
        for value in [span.name, *span.attributes.values(), *span.resource.values(), *span.other_strings]
    ]
    assert not [s for s in strings if any(secret in s for secret in secrets)]
    assert {key for span in receiver.spans for key in span.attributes} <= CLOSED_KEYS


async def test_sample_ratio_zero_exports_nothing_and_the_trace_id_remains(
    broker_factory: BrokerFactory,
    upstream: RecordingUpstream,
    receiver: OtlpReceiver,
    pki: Pki,
    tmp_path: Path,
    quick_export: None,
) -> None:
    broker = await broker_factory(traced_config(pki, tmp_path, upstream.url, receiver.url, ratio=0))
    caller = broker.caller()
    fresh = await caller.call("POST", TOOL, INVOICE)  # a new trace: the ratio decides
    unsampled = f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"  # the caller's decision is kept
    continued = await caller.call("POST", TOOL, INVOICE, headers={"traceparent": unsampled})
    assert (fresh.status, continued.status) == (200, 200)
    await broker.running.stop()  # flushes: whatever was sampled has been exported now

    assert receiver.spans == [] and receiver.bodies == []
    first, second = upstream.received
    for reply, got in ((fresh, first), (continued, second)):
        _, trace_id, span_id, flags = got.headers["traceparent"].split("-")
        assert int(flags, 16) & 1 == 0 and len(span_id) == 16  # not sampled (bit 1 may say "random id")
        assert audit_record(broker, reply.headers["X-Request-Id"])["trace_id"] == trace_id
    assert second.headers["traceparent"].split("-")[1] == CALLER_TRACE


async def test_without_parent_sampling_a_callers_sampled_flag_exports_nothing(
    broker_factory: BrokerFactory,
    upstream: RecordingUpstream,
    receiver: OtlpReceiver,
    pki: Pki,
    tmp_path: Path,
    quick_export: None,
) -> None:
    """parent_sampling: false — a caller asking for its trace to be sampled (flag 01) gets the ratio's answer."""
    config = traced_config(pki, tmp_path, upstream.url, receiver.url, ratio=0, parent_sampling=False)
    broker = await broker_factory(config)
    sampled = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    reply = await broker.caller().call("POST", TOOL, INVOICE, headers={"traceparent": sampled})
    assert reply.status == 200
    await broker.running.stop()
    assert receiver.spans == []
    (got,) = upstream.received
    _, trace_id, _, flags = got.headers["traceparent"].split("-")
    assert trace_id == CALLER_TRACE and int(flags, 16) & 1 == 0  # the trace continues, unsampled


async def test_stopping_the_broker_flushes_the_queued_spans(
    broker_factory: BrokerFactory,
    upstream: RecordingUpstream,
    receiver: OtlpReceiver,
    pki: Pki,
    tmp_path: Path,
) -> None:
    # the SDK's default batch delay (5 s): within this test only the shutdown flush can deliver the spans
    broker = await broker_factory(traced_config(pki, tmp_path, upstream.url, receiver.url))
    started = time.monotonic()
    reply = await broker.caller().call("POST", TOOL, INVOICE, headers={"traceparent": INCOMING})
    assert reply.status == 200
    assert receiver.spans == []
    await broker.running.stop()
    assert time.monotonic() - started < 5.0, "too slow to tell a flush from the batch delay"
    server = server_span(receiver.spans, CALLER_TRACE)
    assert server is not None and len(children(receiver.spans, server)) == 6


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A collector that accepts connections (the kernel's backlog) and never answers a byte."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_an_unanswering_collector_neither_slows_nor_fails_requests(
    broker_factory: BrokerFactory,
    upstream: RecordingUpstream,
    black_hole: str,
    pki: Pki,
    tmp_path: Path,
    quick_export: None,
) -> None:
    broker = await broker_factory(traced_config(pki, tmp_path, upstream.url, black_hole))
    caller = broker.caller()
    slowest = 0.0
    for _ in range(8):  # exports start after 50 ms and hang for EXPORT_TIMEOUT meanwhile
        started = time.monotonic()
        reply = await caller.call("POST", TOOL, INVOICE)
        slowest = max(slowest, time.monotonic() - started)
        assert reply.status == 200
    assert len(upstream.received) == 8
    assert slowest < EXPORT_TIMEOUT / 2, slowest  # an export on the request path would take EXPORT_TIMEOUT


async def test_an_mcp_tools_call_is_traced_like_a_rest_call(
    pki: Pki, tmp_path: Path, receiver: OtlpReceiver, quick_export: None
) -> None:
    def traced(document: dict[str, Any]) -> None:
        document["observability"] = {"tracing": {"otlp_endpoint": receiver.url, "sample_ratio": 1}}

    async with mcp_stack(pki, tmp_path, edit_config=traced) as stack:
        answer = await stack.post(
            stack.http("alice", ALICE), MODERN_CALL, {**MODERN, "traceparent": INCOMING}
        )
        assert answer.status_code == 200 and "result" in answer.json(), answer.text
        spans = await receiver.wait_for(lambda spans: server_span(spans, CALLER_TRACE) is not None)
        server = server_span(spans, CALLER_TRACE)
        assert server is not None
        assert (server.name, server.parent_span_id) == ("POST mcp", CALLER_SPAN)
        assert server.attributes == {
            "broker.route": "mcp",
            "broker.tool": "listInvoices",
            "broker.decision": "allow",
            "broker.code": "ok",
            "http.request.method": "POST",
            "http.response.status_code": 200,
            "mcp.method": "tools/call",
        }
        steps = children(spans, server)
        assert (
            {"identity", "policy", "state.guard", "audit", "upstream"}
            <= set(steps)
            <= {
                "identity",
                "state.counters",
                "policy",
                "state.guard",
                "audit",
                "upstream",
            }
        )
        forwarded = next(
            r for r in stack.upstream.received if r.body and json.loads(r.body).get("method") == "tools/call"
        )
        assert forwarded.headers["traceparent"] == f"00-{CALLER_TRACE}-{steps['upstream'].span_id}-01"
        record = next(
            r for r in stack.audit_records() if r.get("request_id") == answer.headers["X-Request-Id"]
        )
        assert record["trace_id"] == CALLER_TRACE
