"""The foundation path end to end on real TLS: SVID → tool → arguments → audit → forward.

Every refusal also asserts what must not happen: the upstream saw nothing.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import structlog.testing
from aiohttp import web

from broker.audit.verify import verify_log
from broker.jose import Signer
from tests.certfactory import (
    CA_KEY_USAGE,
    SERVER_AUTH,
    Pki,
    der_of,
    mint_client_cert,
    mint_untrusted_cert,
)
from tests.conftest import BrokerFactory, BrokerUnderTest, Recorded, RecordingUpstream, base_config

INVOICE = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}


TOOL = "/v1/tools/approveExpense"


async def test_svid_call_is_forwarded_with_clean_headers(
    broker: BrokerUnderTest, upstream: RecordingUpstream, pki: Pki
) -> None:
    hostile_headers = {
        "Authorization": "DPoP abc",
        "DPoP": "proof",
        "Cookie": "session=1",
        "Connection": "close, X-Custom-Hop",
        "X-Custom-Hop": "1",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic eA==",
        "X-Forwarded-For": "10.0.0.1",
        "X-Forwarded-Client-Cert": "Hash=evil",
        "Forwarded": "for=evil",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "X-Request-Id": "req-123",
    }
    reply = await broker.caller().call(
        "POST",
        TOOL,
        {"department": "42", "amount": 4800, "invoice_id": "INV-8831"},
        headers={k: v for k, v in hostile_headers.items() if k not in ("Authorization", "DPoP")},
    )
    assert (reply.status, reply.body) == (200, {"echo": INVOICE})
    # CONTRACT §12: the request id is the broker's own; the caller's is kept as client_request_id
    request_id = reply.headers["X-Request-Id"]
    assert request_id != "req-123" and len(request_id) == 24
    decision = next(r for r in broker.audit_records() if r.get("request_id") == request_id)
    assert decision["decision"] == "allow" and decision["client_request_id"] == "req-123"
    [got] = upstream.received
    assert got.path == "/approve"
    # the canonical (RFC 8785) bytes are what is forwarded: sorted keys, no whitespace
    assert got.body == b'{"amount":4800,"department":"42","invoice_id":"INV-8831"}'
    lowered = {k.lower() for k in got.headers}
    for name in (
        "authorization",
        "dpop",
        "cookie",
        "x-custom-hop",
        "keep-alive",
        "proxy-authorization",
        "x-forwarded-for",
        "x-forwarded-client-cert",
        "forwarded",
    ):
        assert name not in lowered, name
    assert got.headers["X-Request-Id"] == request_id
    trace = got.headers["traceparent"].split("-")
    assert trace[1] == "0af7651916cd43dd8448eb211c80319c" and trace[2] != "b7ad6b7169203331"
    # the backend sees the broker's own certificate, never the agent's
    assert got.peer_cert == der_of(pki.broker)


async def test_every_request_leaves_one_access_line_and_its_trace_id_everywhere(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    """CONTRACT §16: one access-log line per request, allowed or refused, with the trace id that the audit record
    and the forwarded traceparent carry; never a token, a proof or an argument value."""
    caller = broker.caller()
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with structlog.testing.capture_logs() as logs:
        allowed = await caller.call("POST", TOOL, INVOICE, headers={"traceparent": incoming})
        refused = await caller.call("POST", "/v1/tools/noSuchTool", INVOICE)
    assert (allowed.status, refused.status) == (200, 404)
    lines = [entry for entry in logs if entry["event"] == "access"]
    assert [line["status"] for line in lines] == [200, 404]
    first, second = lines
    assert (first["decision"], first["code"], first["route"], first["tool"]) == (
        "allow",
        "ok",
        "invoke",
        "approveExpense",
    )
    assert (second["decision"], second["code"]) == ("deny", "unknown_tool")
    assert first["subject"] == "alice" and first["actor"].startswith("spiffe://") and first["duration_ms"] > 0
    [got] = upstream.received
    trace_id = incoming.split("-")[1]
    assert got.headers["traceparent"].split("-")[1] == trace_id  # the caller's trace, continued
    records = {r["request_id"]: r for r in broker.audit_records() if r.get("request_id")}
    assert records[allowed.headers["X-Request-Id"]]["trace_id"] == trace_id
    assert len(records[refused.headers["X-Request-Id"]]["trace_id"]) == 32  # a trace started here
    text = json.dumps(lines)
    assert caller.token not in text and "INV-8831" not in text  # no credential, no argument value


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ({"uris": ["spiffe://evil.org/agents/x"]}, "svid_wrong_trust_domain"),
        (
            {"uris": ["spiffe://example.org/agents/a", "spiffe://example.org/agents/b"]},
            "svid_multiple_uri_sans",
        ),
        ({"uris": [], "dns": ["agent.example.org"]}, "svid_no_uri_san"),
        ({"is_ca": True}, "svid_is_ca"),
        ({"uris": ["spiffe://example.org/agents/../admin"]}, "spiffe_id_bad_path"),
    ],
    ids=["M10-other-trust-domain", "M08-two-uri-sans", "M07-no-uri-san", "M03-ca-as-leaf", "M12-dot-segment"],
)
async def test_chaining_certificate_that_is_not_an_svid_is_invalid_client(
    broker: BrokerUnderTest,
    upstream: RecordingUpstream,
    pki: Pki,
    tmp_path: Path,
    variant: dict[str, Any],
    reason: str,
) -> None:
    cert, key = mint_client_cert(pki, tmp_path, "hostile", **variant)
    reply = await broker.caller(cert=cert, key=key).call("POST", TOOL, INVOICE)
    assert (reply.status, reply.error) == (401, "invalid_client")
    assert "request_id" in reply.body
    assert upstream.received == []
    # a certificate that is not an SVID: no identity, so the refusal is counted in a summary (CONTRACT §15)
    assert [r for r in broker.audit_records() if r["event"] == "invocation"] == []
    await broker.flush_noise()
    [summary] = [r for r in broker.audit_records() if r["event"] == "summary"]
    assert (summary["decision"], summary["reason"], summary["count"], summary["client_network"]) == (
        "deny",
        reason,
        1,
        "127.0.0.0/24",
    )


async def test_no_client_certificate_is_invalid_client(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    caller = broker.caller()
    caller.cert = caller.key = None
    reply = await caller.call("POST", TOOL, INVOICE)
    probe = await caller.call("POST", "/v1/tools/nope", {})
    assert (reply.status, reply.error) == (401, "invalid_client")
    # identity first: an anonymous peer cannot even learn which tools exist
    assert (probe.status, probe.error) == (401, "invalid_client")
    assert upstream.received == []


@pytest.mark.parametrize(
    "kind",
    [
        "M02-untrusted-ca",
        "M02-self-signed",
        "M04-expired",
        "M04-not-yet-valid",
        "M05-serverauth-only",
        "M03-ca-key-usage",
    ],
)
async def test_untrusted_or_expired_certificate_fails_the_handshake(
    broker: BrokerUnderTest, upstream: RecordingUpstream, pki: Pki, tmp_path: Path, kind: str
) -> None:
    if kind == "M02-untrusted-ca":
        cert, key = mint_untrusted_cert(tmp_path, "stranger")
    elif kind == "M02-self-signed":
        cert, key = mint_untrusted_cert(tmp_path, "stranger", self_signed=True)
    elif kind == "M05-serverauth-only":
        # OpenSSL already refuses a serverAuth-only EKU on a client certificate ("unsuitable purpose")
        cert, key = mint_client_cert(pki, tmp_path, "server-only", eku=(SERVER_AUTH,))
    elif kind == "M03-ca-key-usage":
        # a CA's key usage (keyCertSign, no digitalSignature) cannot authenticate a TLS client at all
        cert, key = mint_client_cert(pki, tmp_path, "ca-leaf", is_ca=True, key_usage=CA_KEY_USAGE)
    elif kind == "M04-expired":
        cert, key = mint_client_cert(
            pki,
            tmp_path,
            "old",
            not_before=pki.now - timedelta(days=3),
            not_after=pki.now - timedelta(days=1),
        )
    else:
        cert, key = mint_client_cert(
            pki,
            tmp_path,
            "early",
            not_before=pki.now + timedelta(days=1),
            not_after=pki.now + timedelta(days=3),
        )
    with pytest.raises((aiohttp.ClientConnectionError, ssl.SSLError)):
        await broker.caller(cert=cert, key=key).call("POST", TOOL, INVOICE)
    assert upstream.received == []


@pytest.mark.parametrize(
    ("raw", "headers", "status", "code"),
    [
        (b'{"invoice_id": "INV-1", "amount": "5000"}', {}, 400, "invalid_request"),
        (b'{"invoice_id": "INV-1", "amount": 1, "amount": 1000000}', {}, 400, "invalid_request"),
        (b"[" * 40 + b"]" * 40, {}, 400, "invalid_request"),
        (b'{"invoice_id": "INV-1", "amount": NaN}', {}, 400, "invalid_request"),
        (b'{"invoice_id": "INV-1", "amount": 1} {}', {}, 400, "invalid_request"),
        ('{"invoice_id": "INV-1", "amount": 1}'.encode("utf-16"), {}, 400, "invalid_request"),
        (b'{"invoice_id": "INV-1", "amount": 1, "extra": true}', {}, 400, "invalid_request"),
        (b"[]", {}, 400, "invalid_request"),
        (
            b'{"invoice_id": "INV-1", "amount": 1}',
            {"Content-Type": "text/plain"},
            415,
            "unsupported_media_type",
        ),
        (
            b'{"invoice_id": "INV-1", "amount": 1}',
            {"Content-Encoding": "gzip"},
            415,
            "unsupported_media_type",
        ),
        (b'{"x": "' + b"a" * (1024 * 1024) + b'"}', {}, 413, "payload_too_large"),
    ],
    ids=[
        "T05-string-amount",
        "T06-duplicate-key",
        "P17-too-deep",
        "T10-nan",
        "P18-two-values",
        "P18-utf16",
        "schema-extra-key",
        "not-an-object",
        "P19-text-plain",
        "P15-gzip",
        "P13-body-over-1MiB",
    ],
)
async def test_bad_arguments_are_refused_before_forwarding(
    broker: BrokerUnderTest,
    upstream: RecordingUpstream,
    raw: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    reply = await broker.caller().call("POST", TOOL, raw=raw, headers=headers)
    assert (reply.status, reply.error) == (status, code)
    assert upstream.received == []
    last = broker.audit_records()[-1]
    assert last["decision"] == "deny" and last["reason"] and last["status"] == status


async def test_schema_error_names_the_failing_path(broker: BrokerUnderTest) -> None:
    reply = await broker.caller().call("POST", TOOL, {"invoice_id": "INV-1", "amount": "5000"})
    assert reply.status == 400
    assert reply.body["error_description"].startswith("arguments.amount:")


async def test_unknown_tool_is_404(broker: BrokerUnderTest, upstream: RecordingUpstream) -> None:
    caller = broker.caller()
    reply = await caller.call("POST", "/v1/tools/purgeInvoices", {})
    other = await caller.call("POST", "/v2/whatever", {})
    assert (reply.status, reply.error) == (404, "unknown_tool")
    assert (other.status, other.error) == (404, "not_found")
    assert upstream.received == []


async def test_oversized_headers_are_refused(broker: BrokerUnderTest, upstream: RecordingUpstream) -> None:
    big = {f"X-Filler-{i}": "v" * 4000 for i in range(5)}
    reply = await broker.caller().call("POST", TOOL, INVOICE, headers=big)
    assert (reply.status, reply.error) == (431, "request_header_fields_too_large")
    assert upstream.received == []


async def test_upstream_down_is_502(broker_factory: BrokerFactory, pki: Pki, tmp_path: Path) -> None:
    # a port nothing listens on: bind one, note it, close it
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    broker = await broker_factory(base_config(pki, tmp_path, upstream_url=f"https://127.0.0.1:{port}"))
    reply = await broker.caller().call("POST", TOOL, INVOICE)
    assert (reply.status, reply.error) == (502, "upstream_error")
    records = broker.audit_records()
    # the decision (forwarded) and then its outcome (CONTRACT §15): the upstream never answered
    [decision] = [r for r in records if r["event"] == "invocation"]
    [outcome] = [r for r in records if r["event"] == "outcome"]
    assert (decision["decision"], decision["status"]) == ("allow", None)
    assert (outcome["decision"], outcome["reason"], outcome["status"]) == (
        "error",
        "upstream_connect_failed",
        None,
    )
    assert outcome["request_id"] == decision["request_id"] == reply.headers["X-Request-Id"]


async def test_upstream_timeout_is_504(broker: BrokerUnderTest, upstream: RecordingUpstream) -> None:
    release = asyncio.Event()

    async def hang(_: Recorded) -> web.StreamResponse:
        await release.wait()
        return web.json_response({})

    upstream.respond = hang
    try:
        reply = await broker.caller().call("POST", TOOL, INVOICE)
    finally:
        release.set()
    assert (reply.status, reply.error) == (504, "upstream_timeout")


@pytest.mark.parametrize(
    ("content_type", "payload"),
    [("text/html", b"<html>oops</html>"), ("application/json", b"x" * (9 * 1024 * 1024))],
    ids=["non-json", "P16-too-large"],
)
async def test_bad_upstream_answers_are_502(
    broker: BrokerUnderTest, upstream: RecordingUpstream, content_type: str, payload: bytes
) -> None:
    async def answer(_: Recorded) -> web.StreamResponse:
        return web.Response(body=payload, content_type=content_type)

    upstream.respond = answer
    reply = await broker.caller().call("POST", TOOL, INVOICE)
    assert (reply.status, reply.error) == (502, "upstream_error")


async def test_every_decision_is_in_a_verifiable_chain(
    broker: BrokerUnderTest, upstream: RecordingUpstream, pki: Pki
) -> None:
    caller = broker.caller()
    for amount in (1, 2, 3):
        assert (await caller.call("POST", TOOL, {"invoice_id": "INV-1", "amount": amount})).status == 200
    await caller.call("POST", "/v1/tools/nope", {})
    listing = await caller.call("GET", "/v1/tools")
    assert listing.status == 200
    assert [t["name"] for t in listing.body["tools"]] == ["approveExpense"]
    await broker.running.stop()
    records = broker.audit_records()
    events = [(r["event"], r["decision"]) for r in records if r["event"] != "checkpoint"]
    assert events == [
        ("config_load", "allow"),
        ("invocation", "allow"),
        ("outcome", "allow"),
        ("invocation", "allow"),
        ("outcome", "allow"),
        ("invocation", "allow"),
        ("outcome", "allow"),
        ("invocation", "deny"),
        ("discovery", "allow"),
    ]
    assert records[-1]["event"] == "checkpoint"  # written at shutdown
    allowed = [r for r in records if r["event"] == "invocation" and r["decision"] == "allow"]
    assert all(r["args"] == {"invoice_id": "INV-1"} and r["args_digest"] for r in allowed)
    assert all(r["actor"] == pki.agent_id("expense-assistant") and r["subject"] == "alice" for r in allowed)
    jwks = {"keys": [Signer.from_file(pki.signing_jwk).public_jwk()]}
    report = verify_log(broker.audit_path, public_jwks=jwks)
    assert report.ok, report


async def test_graceful_shutdown_lets_in_flight_calls_finish(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(_: Recorded) -> web.StreamResponse:
        arrived.set()
        await release.wait()
        return web.json_response({"done": True})

    upstream.respond = slow
    call = asyncio.create_task(broker.caller().call("POST", TOOL, INVOICE))
    await arrived.wait()
    stopping = asyncio.create_task(broker.running.stop())
    await asyncio.sleep(0)  # let stop() begin draining before the backend answers
    release.set()
    reply = await call
    await stopping
    assert (reply.status, reply.body) == (200, {"done": True})
    assert broker.audit_records()[-1]["event"] == "checkpoint"


async def test_admin_health_readiness_and_metrics(broker: BrokerUnderTest) -> None:
    await broker.caller().call("POST", TOOL, INVOICE)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{broker.admin_url}/healthz") as resp:
            assert resp.status == 200
        async with s.get(f"{broker.admin_url}/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ready"
        async with s.get(f"{broker.admin_url}/metrics") as resp:
            text = await resp.text()
    assert (
        'broker_requests_total{code="ok",decision="allow",route="invoke",tool="approveExpense"} 1.0' in text
    )
    assert "broker_audit_records_total" in text and "broker_config_info{policy_version=" in text
    assert "expense-assistant" not in text  # never an identity in a label


async def test_jwks_publishes_the_signing_key(broker: BrokerUnderTest, pki: Pki) -> None:
    keys = (await broker.caller().call("GET", "/.well-known/jwks.json", auth={})).body["keys"]
    assert keys == [Signer.from_file(pki.signing_jwk).public_jwk()]
    assert all("d" not in k for k in keys)
