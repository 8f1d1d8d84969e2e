"""HOSTILE §1.5 P07–P12, P14, P26, P27: what reaches the tool backend, which path is decided on, slow clients,
masking, and what error bodies reveal. A real broker on real TLS in front of a recording upstream; raw bytes where
the exact request line or header set matters, the test client elsewhere.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from broker.identity.dpop import ath_for
from broker.jose import Signer
from broker.txn.tokens import verification_keys, verify_txn_token
from tests.certfactory import Pki, der_of
from tests.conftest import BrokerFactory, BrokerUnderTest, Caller, Recorded, RecordingUpstream, base_config
from tests.dpopfactory import make_proof
from tests.security import rawhttp
from tests.security.support import INVOICE, TOOL, agent_tls, auth_lines, main_port, retoken

BODY = b'{"invoice_id":"INV-1","amount":1}'


def call_lines(caller: Caller, *extra: tuple[str, str], target: str = TOOL) -> list[tuple[str, str]]:
    return [*auth_lines(caller, "POST", target), ("Content-Type", "application/json"), *extra]


async def raw_call(broker: BrokerUnderTest, *extra: tuple[str, str], body: bytes = BODY) -> rawhttp.RawReply:
    data = rawhttp.request("POST", TOOL, call_lines(broker.caller(), *extra, ("Connection", "close")), body)
    return await rawhttp.exchange(main_port(broker), agent_tls(broker), data)


def header_names(record: Recorded) -> set[str]:
    return {name.lower() for name in record.headers}


# -- P07, P08, P09: what the backend receives ----------------------------------------------------------------

BROKER_ADDED = {"txn-token", "x-request-id", "traceparent"}


async def test_p07_headers_named_in_connection_and_hop_by_hop_headers_are_stripped(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    """The client names the broker's own headers (and its credentials) in ``Connection``: hop-by-hop headers are
    stripped, the call still authenticates, and the broker-added headers are added after stripping."""
    connection = (
        "keep-alive, X-Forwarded-For, Authorization, DPoP, X-Broker-Identity, Txn-Token, X-Request-Id, "
        "traceparent"
    )
    reply = await raw_call(
        broker,
        ("Connection", connection),
        ("X-Forwarded-For", "10.6.6.6"),
        ("X-Broker-Identity", "spiffe://example.org/agents/admin"),
        ("Keep-Alive", "timeout=600"),
        ("TE", "trailers"),
        ("Trailer", "X-Late"),
        ("Proxy-Authorization", "Basic YWRtaW46YWRtaW4="),
        ("Proxy-Connection", "keep-alive"),
        ("X-Request-Id", "req-p07"),
    )
    assert reply.statuses == [200]
    [forwarded] = upstream.received
    names = header_names(forwarded)
    hop_by_hop = {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    }
    assert not names & hop_by_hop
    assert not names & {"x-forwarded-for", "x-broker-identity", "authorization", "dpop"}
    assert names >= BROKER_ADDED
    # the broker's own request id, the one the agent got back (the caller's is only recorded: CONTRACT §12)
    assert forwarded.headers["X-Request-Id"] == reply.responses[0].headers["x-request-id"] != "req-p07"


SPOOFED = [
    ("X-Forwarded-For", "10.6.6.6"),
    ("X-Forwarded-Host", "admin.internal"),
    ("X-Forwarded-Proto", "http"),
    ("X-Forwarded-Prefix", "/admin"),
    ("Forwarded", "for=10.6.6.6;host=admin.internal;proto=http"),
    ("X-Real-IP", "10.6.6.6"),
    ("X-Broker-Subject", "admin"),
    ("X-Broker-Actor", "spiffe://example.org/agents/admin"),
    ("X-Envoy-Original-Path", "/admin"),
    ("X-Envoy-Internal", "true"),
    ("X-Forwarded-Client-Cert", "Hash=abc;URI=spiffe://example.org/agents/admin"),
    ("X-Original-URL", "/admin"),
    ("X-Rewrite-URL", "/admin"),
]


async def test_p08_client_supplied_proxy_and_identity_headers_never_reach_the_backend(
    broker: BrokerUnderTest, upstream: RecordingUpstream, pki: Pki
) -> None:
    reply = await raw_call(broker, *SPOOFED)
    assert reply.statuses == [200]
    [forwarded] = upstream.received
    assert not header_names(forwarded) & {name.lower() for name, _ in SPOOFED}
    # nor do they reach what the broker asserts about the call: the txn token's request context
    keys = verification_keys(Signer.from_file(pki.signing_jwk).public_jwk())
    claims = verify_txn_token(
        forwarded.headers["Txn-Token"],
        keys=keys,
        issuer=broker.public_url,
        audience=pki.trust_domain,
        now=time.time(),
    ).claims
    assert claims["rctx"]["req_ip"] == "127.0.0.1"
    assert claims["req_wl"] == pki.agent_id("expense-assistant")
    assert claims["sub"] == "alice"


async def test_p09_agent_credentials_are_never_passed_through(
    broker: BrokerUnderTest, upstream: RecordingUpstream, pki: Pki
) -> None:
    caller = broker.caller()
    reply = await raw_call(broker, ("Cookie", "session=s3cr3t"), ("X-Api-Key", "k3y"))
    assert reply.statuses == [200]
    [forwarded] = upstream.received
    assert not header_names(forwarded) & {"authorization", "dpop", "cookie", "proxy-authorization"}
    wire = json.dumps(dict(forwarded.headers)) + forwarded.body.decode()
    assert caller.token.split(".")[2] not in wire and "s3cr3t" not in wire
    # what the backend gets instead: the broker's certificate and a txn token signed by the broker
    assert forwarded.peer_cert == der_of(pki.broker)
    keys = verification_keys(Signer.from_file(pki.signing_jwk).public_jwk())
    verify_txn_token(
        forwarded.headers["Txn-Token"],
        keys=keys,
        issuer=broker.public_url,
        audience=pki.trust_domain,
        now=time.time(),
    )


# -- P10: CR/LF in values the broker builds ------------------------------------------------------------------


async def test_p10_crlf_in_arguments_stays_inside_the_json_body(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    hostile = {"invoice_id": "INV-1\r\nX-Admin: 1\r\n\r\nGET /admin HTTP/1.1", "amount": 1}
    reply = await broker.caller().call("POST", TOOL, hostile)
    assert reply.status == 200
    [forwarded] = upstream.received
    assert "x-admin" not in header_names(forwarded)
    assert forwarded.path == "/approve"
    assert b"\r" not in forwarded.body and b"\\r\\nX-Admin: 1" in forwarded.body
    assert json.loads(forwarded.body) == hostile
    assert all("\r" not in v and "\n" not in v for v in forwarded.headers.values())


@pytest.mark.parametrize(
    ("extra", "target"),
    [
        ((), "/v1/tools/approveExpense%0D%0AX-Admin:%201"),
        ((), "/v1/tools/approveExpense%0AX-Admin:%201"),
        ((("X-Request-Id", "a%0D%0AX-Admin:%201"),), TOOL),
        ((("X-Request-Id", "a\tX-Admin: 1"),), TOOL),
        ((("traceparent", "00-%0D%0AX-Admin:1-b7ad6b7169203331-01"),), TOOL),
    ],
    ids=[
        "P10-encoded-crlf-in-the-tool-name",
        "P10-encoded-lf-in-the-tool-name",
        "P10-encoded-crlf-in-request-id",
        "P10-tab-in-request-id",
        "P10-garbage-traceparent",
    ],
)
async def test_p10_client_values_never_become_header_lines(
    broker: BrokerUnderTest, upstream: RecordingUpstream, extra: tuple[tuple[str, str], ...], target: str
) -> None:
    caller = broker.caller()
    data = rawhttp.request(
        "POST", target, [*call_lines(caller, *extra, target=target), ("Connection", "close")], BODY
    )
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), data)
    [response] = reply.responses
    assert "x-admin" not in response.headers
    if target != TOOL:
        assert (response.status, json.loads(response.body)["error"]) == (404, "unknown_tool")
        assert upstream.received == []
        return
    assert response.status == 200
    [forwarded] = upstream.received
    assert "x-admin" not in header_names(forwarded)
    assert re.fullmatch(r"[0-9a-f]{24}", forwarded.headers["X-Request-Id"])  # replaced, not echoed
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", forwarded.headers["traceparent"])


# -- P11, P12: which path is decided on ------------------------------------------------------------------------

CONFUSING_PATHS = [
    ("P11-dot-dot", "/v1/tools/../tools/approveExpense"),
    ("P11-encoded-dot-dot", "/v1/tools/%2e%2e/tools/approveExpense"),
    ("P11-double-encoded-dot-dot", "/v1/tools/%252e%252e/approveExpense"),
    ("P11-dot", "/v1/./tools/approveExpense"),
    ("P11-encoded-slash", "/v1/tools%2FapproveExpense"),
    ("P11-encoded-slash-in-name", "/v1/tools/x%2F..%2FapproveExpense"),
    ("P11-double-slash", "/v1/tools//approveExpense"),
    ("P11-case-variant-prefix", "/V1/tools/approveExpense"),
    ("P11-case-variant-tool", "/v1/tools/APPROVEEXPENSE"),
    ("P11-path-parameter", "/v1/tools/approveExpense;p=1"),
    ("P11-nul", "/v1/tools/approveExpense%00"),
    ("P11-backslash", "/v1/tools\\approveExpense"),
    ("P11-overlong-utf8-dot", "/v1/tools/%c0%ae%c0%ae/approveExpense"),
    ("P11-trailing-slash", "/v1/tools/approveExpense/"),
    ("P11-fullwidth-tool-name", "/v1/tools/%EF%BD%81pproveExpense"),
    ("P12-asterisk-form", "*"),
]


@pytest.mark.parametrize("target", [t for _, t in CONFUSING_PATHS], ids=[i for i, _ in CONFUSING_PATHS])
async def test_p11_non_canonical_paths_are_refused_and_nothing_is_forwarded(
    broker: BrokerUnderTest, upstream: RecordingUpstream, target: str
) -> None:
    """The client signs exactly the path it sends (an honest proof for the hostile path); whatever the router
    and the htu check make of it, nothing is forwarded and nothing is answered but a 4xx."""
    caller = broker.caller()
    htu = broker.public_url + target if target.startswith("/") else broker.public_url + "/"
    proof = make_proof(caller.dpop_jwk, htm="POST", htu=htu, iat=int(time.time()), ath=ath_for(caller.token))
    headers = [
        ("Authorization", f"DPoP {caller.token}"),
        ("DPoP", proof),
        ("Content-Type", "application/json"),
    ]
    data = rawhttp.request("POST", target, [*headers, ("Connection", "close")], BODY)
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), data)
    assert reply.status in (400, 404), reply.data[:300]
    assert upstream.received == []


async def test_p11_an_escaped_unreserved_character_names_the_same_tool_everywhere(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    """``%45`` is ``E`` (unreserved, RFC 3986 §2.3): router, htu check, policy and audit all see approveExpense,
    and the call goes to that tool's configured upstream, never to a client-chosen path."""
    caller = broker.caller()
    target = "/v1/tools/approve%45xpense"
    data = rawhttp.request(
        "POST", target, [*call_lines(caller, target=target), ("Connection", "close")], BODY
    )
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), data)
    assert reply.statuses == [200]
    assert [r.path for r in upstream.received] == ["/approve"]
    assert broker.audit_records()[-1]["tool"] == "approveExpense"


@pytest.mark.parametrize(
    "target",
    ["https://localhost:8443/v1/tools/approveExpense", "https://evil.example/v1/tools/approveExpense"],
    ids=["P12-absolute-form-own-host", "P12-absolute-form-other-host"],
)
async def test_p12_absolute_form_target_is_a_client_error(
    broker: BrokerUnderTest, upstream: RecordingUpstream, target: str
) -> None:
    caller = broker.caller()
    proof = make_proof(
        caller.dpop_jwk, htm="POST", htu=target, iat=int(time.time()), ath=ath_for(caller.token)
    )
    headers = [
        ("Authorization", f"DPoP {caller.token}"),
        ("DPoP", proof),
        ("Content-Type", "application/json"),
    ]
    data = rawhttp.request("POST", target, [*headers, ("Connection", "close")], BODY)
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), data)
    assert upstream.received == []  # holds today: the 500 is fail-closed
    assert reply.status == 400


async def test_p12_unknown_host_is_routed_by_the_listener_configuration(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    """``Host`` never selects anything: a proof for the configured public URL is accepted whatever Host says
    (the broker does not answer 421), and a proof minted for the Host the client sent is refused."""
    caller = broker.caller()
    honest = rawhttp.request(
        "POST", TOOL, [*call_lines(caller), ("Connection", "close")], BODY, host="evil.example"
    )
    assert (await rawhttp.exchange(main_port(broker), agent_tls(broker), honest)).statuses == [200]
    proof = make_proof(
        caller.dpop_jwk,
        htm="POST",
        htu=f"https://evil.example{TOOL}",
        iat=int(time.time()),
        ath=ath_for(caller.token),
    )
    headers = [
        ("Authorization", f"DPoP {caller.token}"),
        ("DPoP", proof),
        ("Content-Type", "application/json"),
    ]
    forged = rawhttp.request("POST", TOOL, [*headers, ("Connection", "close")], BODY, host="evil.example")
    assert (await rawhttp.exchange(main_port(broker), agent_tls(broker), forged)).statuses == [401]
    assert broker.audit_records()[-1]["reason"] == "dpop_htu_mismatch"
    assert len(upstream.received) == 1


# -- P14: slow clients ---------------------------------------------------------------------------------------


def _partial_call(caller: Caller) -> tuple[bytes, bytes]:
    """A call cut in two: (headers without their end, a complete head whose body never comes)."""
    lines = "".join(f"{n}: {v}\r\n" for n, v in call_lines(caller))
    slow_headers = f"POST {TOOL} HTTP/1.1\r\nHost: localhost\r\n{lines}X-Slow: ".encode()
    slow_body = (
        f"POST {TOOL} HTTP/1.1\r\nHost: localhost\r\n{lines}Content-Length: 100\r\n\r\n".encode() + b'{"in'
    )
    return slow_headers, slow_body


async def test_p14_slow_clients_do_not_starve_others(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    caller = broker.caller()
    slow_headers, slow_body = _partial_call(caller)
    port, tls = main_port(broker), agent_tls(broker)
    stalled = [
        await asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname="localhost")
        for _ in range(20)
    ]
    for index, (_, writer) in enumerate(stalled):
        writer.write(slow_headers if index % 2 else slow_body)
        await writer.drain()
    try:
        replies = await asyncio.gather(*(caller.call("POST", TOOL, INVOICE) for _ in range(5)))
        assert [r.status for r in replies] == [200] * 5
    finally:
        for _, writer in stalled:
            writer.close()
    assert len(upstream.received) == 5


async def test_p14_slow_headers_and_slow_bodies_are_cut_off(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    """Today ``server.request_timeout_seconds`` is validated but never applied, and the listener keeps aiohttp's
    keep-alive timeout (3630 s): a client that stops mid-headers, or mid-body after its identity was checked (a
    handler then waits in ``read_body``), holds its connection for about an hour."""
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["server"]["request_timeout_seconds"] = 1
    broker = await broker_factory(config)
    slow_headers, slow_body = _partial_call(broker.caller())
    port, tls = main_port(broker), agent_tls(broker)
    # bounded: the timeout is 1 s; 4 s is the deadline by which the broker must have let go
    headers_reply, body_reply = await asyncio.gather(
        rawhttp.exchange(port, tls, slow_headers, deadline=4),
        rawhttp.exchange(port, tls, slow_body, deadline=4),
    )
    assert upstream.received == []
    assert headers_reply.closed and body_reply.closed
    assert body_reply.status in (None, 408)


# -- P26: masking that cannot be bypassed ------------------------------------------------------------------------

SECRET = "DE89370400440532013000"
Answer = Callable[[Recorded], Awaitable[web.StreamResponse]]


def _json(body: Any, **headers: str) -> Answer:
    async def answer(_: Recorded) -> web.StreamResponse:
        return web.Response(body=json.dumps(body).encode(), content_type="application/json", headers=headers)

    return answer


def _raw(body: bytes, content_type: str = "application/json", **headers: str) -> Answer:
    async def answer(_: Recorded) -> web.StreamResponse:
        return web.Response(body=body, headers={"Content-Type": content_type, **headers})

    return answer


@pytest.fixture
async def masked(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> BrokerUnderTest:
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["tools"][0]["response"] = {"mask": [{"path": "vendor.bank_account", "keep_last": 4}]}
    return await broker_factory(config)


@pytest.mark.parametrize(
    ("answer", "seen"),
    [
        (_json({"vendor": {"bank_account": SECRET}}), {"vendor": {"bank_account": "****3000"}}),
        (_json({"Vendor": {"BANK_ACCOUNT": SECRET}}), {"Vendor": {"BANK_ACCOUNT": "****3000"}}),
        (
            _json({"ｖｅｎｄｏｒ": {"ｂａｎｋ＿ａｃｃｏｕｎｔ": SECRET}}),
            {"ｖｅｎｄｏｒ": {"ｂａｎｋ＿ａｃｃｏｕｎｔ": "****3000"}},
        ),
        (
            _json({"vendor": {"bank_account": SECRET, "Bank_Account": SECRET}}),
            {"vendor": {"bank_account": "****3000", "Bank_Account": "****3000"}},
        ),
        (
            _json({"vendor": [{"bank_account": SECRET}, [{"bank_account": SECRET}]]}),
            {"vendor": [{"bank_account": "****3000"}, [{"bank_account": "****3000"}]]},
        ),
        (_json({"vendor": {"bank_account": {"iban": SECRET}}}), {"vendor": {"bank_account": "****"}}),
    ],
    ids=[
        "P26-plain",
        "P26-case-variant",
        "P26-fullwidth-compatibility-variant",
        "P26-two-case-variants-of-one-key",
        "P26-nested-in-arrays",
        "P26-object-under-the-masked-name",
    ],
)
async def test_p26_masking_holds_for_every_spelling_and_shape(
    masked: BrokerUnderTest, upstream: RecordingUpstream, answer: Answer, seen: Any
) -> None:
    upstream.respond = answer
    reply = await masked.caller().call("POST", TOOL, INVOICE)
    assert (reply.status, reply.body) == (200, seen)
    assert SECRET not in json.dumps(reply.body)


@pytest.mark.parametrize(
    "answer",
    [
        _raw(b'{"vendor": {"bank_account": "x", "bank_account": "' + SECRET.encode() + b'"}}'),
        _raw(json.dumps({"vendor": {"bank_account": SECRET}}).encode(), "text/plain"),
        _raw(
            gzip.compress(json.dumps({"vendor": {"bank_account": SECRET}}).encode()), Content_Encoding="gzip"
        ),
        _raw(b'{"vendor": {"bank_account": "' + SECRET.encode() + b'"}'),
        _raw(json.dumps(json.dumps({"vendor": {"bank_account": SECRET}})).encode()),
        _raw(b'{"vendor": {"bank_account": "' + SECRET.encode() + b'"}} trailing'),
    ],
    ids=[
        "P26-duplicate-keys-in-the-response",
        "P26-text-plain-holding-json",
        "P26-compressed-response",
        "P26-truncated-json",
        "P26-json-document-as-a-top-level-string",
        "P26-trailing-garbage",
    ],
)
async def test_p26_an_unfilterable_answer_is_502_and_never_shown(
    masked: BrokerUnderTest, upstream: RecordingUpstream, answer: Answer
) -> None:
    upstream.respond = answer
    reply = await masked.caller().call("POST", TOOL, INVOICE)
    assert (reply.status, reply.error) == (502, "upstream_error")
    assert SECRET not in json.dumps(reply.body)
    assert masked.audit_records()[-1]["decision"] == "error"


# -- P27: error bodies ------------------------------------------------------------------------------------------

MARKER = "m4rk3r-7f3a"


async def test_p27_refusals_never_echo_tokens_or_claims(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    caller = retoken(broker.caller(), department=MARKER, sub=f"alice-{MARKER}")
    forged = caller.token.rsplit(".", 1)[0] + "." + caller.token.rsplit(".", 1)[1][::-1]
    replies = [
        await replace(caller, token=forged).call("POST", TOOL, INVOICE),
        await caller.call("POST", TOOL, INVOICE, auth={"Authorization": f"Bearer {caller.token}"}),
        await caller.call(
            "POST",
            TOOL,
            INVOICE,
            auth={"Authorization": f"DPoP {caller.token}", "DPoP": caller.proof("GET", TOOL)},
        ),
    ]
    for reply in replies:
        assert reply.status == 401
        exposed = json.dumps(reply.body) + json.dumps(dict(reply.headers))
        assert MARKER not in exposed
        assert caller.token.split(".")[1] not in exposed and forged.split(".")[2] not in exposed
        assert set(reply.body) == {"error", "error_description", "request_id"}
    assert upstream.received == []
    reasons = [r["reason"] for r in broker.audit_records() if r["decision"] == "deny"]
    assert reasons == ["token_signature", "token_dpop_downgrade", "dpop_htm_mismatch"]


@pytest.mark.parametrize(
    "answer",
    [
        _raw(
            b"Traceback (most recent call last):\n  db password=hunter2 at 10.1.2.3:5432",
            "text/html",
        ),
        _raw(b"x" * (9 * 1024 * 1024)),
    ],
    ids=["P27-backend-stack-trace", "P27-backend-oversized-answer"],
)
async def test_p27_backend_internals_are_not_relayed_in_errors(
    broker: BrokerUnderTest, upstream: RecordingUpstream, answer: Answer
) -> None:
    upstream.respond = answer
    reply = await broker.caller().call("POST", TOOL, INVOICE)
    assert (reply.status, reply.error) == (502, "upstream_error")
    exposed = json.dumps(reply.body)
    assert (
        "hunter2" not in exposed and "10.1.2.3" not in exposed and upstream.url.split(":")[-1] not in exposed
    )
    assert set(reply.body) == {"error", "error_description", "request_id"}


async def test_p27_a_policy_denial_shows_its_reason_not_the_policy(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    policies = [
        {"id": "allow", "tools": ["*"], "effect": "allow", "when": 'actor.id != ""'},
        {
            "id": "secret-threshold",
            "tools": ["approveExpense"],
            "effect": "deny",
            "when": 'args.amount > 4321 || subject.department == "s3cr3t-dept"',
            "reason": "amount too large",
        },
    ]
    broker = await broker_factory(base_config(pki, tmp_path, upstream_url=upstream.url, policies=policies))
    reply = await broker.caller().call("POST", TOOL, INVOICE)
    assert (reply.status, reply.error, reply.body["error_description"]) == (
        403,
        "access_denied",
        "amount too large",
    )
    assert "4321" not in json.dumps(reply.body) and "s3cr3t" not in json.dumps(reply.body)
    assert broker.audit_records()[-1]["reason"].startswith("secret-threshold")
    assert upstream.received == []
