"""CONTRACT §12 "HTTP edges", "The admin listener cannot be driven by a browser" and request ids, on real sockets.

Main listener: a real broker on real TLS in front of a recording upstream, exact bytes written with
:mod:`tests.security.rawhttp`. Every refusal is asserted as a CONTRACT §8 JSON body (``error``,
``error_description``, ``request_id`` equal to the response's ``X-Request-Id``) with nothing forwarded.
Admin listener: plain HTTP, exact ``Host`` / ``Origin`` / ``Content-Type`` lines, and that a refused state change
changed nothing.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from broker.admin import host_of, is_own_host
from tests.certfactory import Pki
from tests.conftest import BrokerFactory, BrokerUnderTest, Caller, RecordingUpstream, base_config
from tests.security import rawhttp
from tests.security.support import TOOL, agent_tls, auth_lines, main_port, metrics

BODY = b'{"invoice_id":"INV-1","amount":1}'
CHUNKED = f"{len(BODY):x}\r\n".encode() + BODY + b"\r\n0\r\n\r\n"
JSON_ERROR_MEMBERS = {"error", "error_description", "request_id"}


def call_lines(caller: Caller, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [*auth_lines(caller, "POST", TOOL), ("Content-Type", "application/json"), *extra]


def json_error(response: rawhttp.RawResponse) -> dict[str, Any]:
    """The response's CONTRACT §8 error body, checked for shape and for the request id it must carry."""
    assert response.headers["content-type"].startswith("application/json"), response
    body: dict[str, Any] = json.loads(response.body)
    assert set(body) == JSON_ERROR_MEMBERS, body
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def decisions(broker: BrokerUnderTest) -> list[dict[str, Any]]:
    # checkpoints seal the log at least every audit.checkpoint_seconds: records of the log, not decisions
    return [r for r in broker.audit_records() if r["event"] not in ("config_load", "checkpoint")]


# -- Every error is JSON, the HTTP parser's own included ---------------------------------------------------------

SECRET = "s3cr3t-t0ken-value"

# (id, raw request bytes): each one refused by aiohttp's HTTP parser before any application code runs
PARSER_REFUSALS: list[tuple[str, bytes]] = [
    ("bad-method", f"G@T /v1/tools HTTP/1.1\r\nHost: localhost\r\nX-S: {SECRET}\r\n\r\n".encode()),
    ("not-http-at-all", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + SECRET.encode() + b"\r\n\r\n"),
    ("bad-version", f"GET /v1/tools HTTP/9.9\r\nHost: localhost\r\nX-S: {SECRET}\r\n\r\n".encode()),
    (
        "P13-request-line-over-16-KiB",
        f"GET /v1/tools?{'a' * 17_000} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode(),
    ),
    (
        "P13-header-line-over-16-KiB",
        f"GET /v1/tools HTTP/1.1\r\nHost: localhost\r\nX-L: {SECRET}{'a' * 17_000}\r\n\r\n".encode(),
    ),
    ("P03-bare-cr", f"GET /v1/tools HTTP/1.1\r\nHost: localhost\r\nX-A: a\r{SECRET}: b\r\n\r\n".encode()),
    ("P05-obs-fold", f"GET /v1/tools HTTP/1.1\r\nHost: localhost\r\nX-A: a\r\n {SECRET}\r\n\r\n".encode()),
    ("invalid-header-name", f"GET /v1/tools HTTP/1.1\r\nHost: localhost\r\nX A{SECRET}: b\r\n\r\n".encode()),
    ("missing-host", f"GET /v1/tools HTTP/1.1\r\nX-S: {SECRET}\r\n\r\n".encode()),
    (
        "P01-content-length-and-chunked",
        f"POST {TOOL} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(BODY)}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
        + CHUNKED,
    ),
    (
        "P04-bad-chunk-size",
        f"POST {TOOL} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: chunked\r\n\r\nzz{SECRET}\r\n".encode()
        + BODY
        + b"\r\n0\r\n\r\n",
    ),
    (
        "P13-too-many-headers",
        b"GET /v1/tools HTTP/1.1\r\nHost: localhost\r\n"
        + b"".join(f"X-H{i}: v\r\n".encode() for i in range(200))
        + b"\r\n",
    ),
]


@pytest.mark.parametrize("data", [r[1] for r in PARSER_REFUSALS], ids=[r[0] for r in PARSER_REFUSALS])
async def test_http_parser_refusals_are_json_errors(
    broker: BrokerUnderTest, upstream: RecordingUpstream, data: bytes
) -> None:
    """CONTRACT §8/§12: aiohttp's own answers (plain text quoting the request before) are JSON bodies that
    quote nothing of the request; the connection is closed and nothing is forwarded or decided."""
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), data + b"GET /v1/tools HTTP/1.1\r\n")
    [response] = reply.responses
    assert response.status in (400, 431)
    error = json_error(response)
    assert error["error"] == (
        "request_header_fields_too_large" if response.status == 431 else "invalid_request"
    )
    assert SECRET.encode() not in reply.data
    assert reply.closed
    assert upstream.received == []
    assert decisions(broker) == []


async def test_parser_refusals_are_counted(broker: BrokerUnderTest) -> None:
    data = b"G@T / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    await rawhttp.exchange(main_port(broker), agent_tls(broker), data)
    expected = 'broker_requests_total{code="invalid_request",decision="deny",route="other",tool="-"}'
    assert any(line.startswith(expected) for line in (await metrics(broker)).splitlines())


async def test_p04_a_bad_chunk_while_the_body_is_read_is_never_forwarded(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    """The call is reading its body when the bad chunk arrives: aiohttp's parser stops there, the body never
    completes, so the read ends at ``server.request_timeout_seconds`` (408 JSON, audited), the connection
    closes, and nothing is forwarded. (In one buffer with the headers it is the parser's 400, row above.)"""
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["server"]["request_timeout_seconds"] = 1
    broker = await broker_factory(config)
    head = rawhttp.request(
        "POST", TOOL, call_lines(broker.caller(), ("Transfer-Encoding", "chunked")), content_length=False
    )
    parts = [head + f"{len(BODY):x}\r\n".encode() + BODY[:5], b"zz\r\n" + BODY[5:] + b"\r\n0\r\n\r\n"]
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), parts, deadline=4, pause=0.3)
    [response] = reply.responses
    assert response.status == 408
    assert json_error(response)["error"] == "request_timeout"
    assert reply.closed
    assert upstream.received == []
    assert decisions(broker)[-1]["reason"] == "body_timeout"


# -- Headers up to 16 KiB are read; a token over 8 KiB is 401 invalid_token --------------------------------------


async def test_p13_a_header_line_of_9000_bytes_is_read(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    """aiohttp's default 8190-byte line limit is raised to the header budget (16 KiB): the call goes through."""
    data = rawhttp.request(
        "POST", TOOL, call_lines(broker.caller(), ("X-Long", "a" * 9000), ("Connection", "close")), BODY
    )
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), data)
    assert reply.statuses == [200]
    [forwarded] = upstream.received
    assert forwarded.body == b'{"amount":1,"invoice_id":"INV-1"}'


@pytest.mark.parametrize("size", [8193, 9000, 12_000], ids=["J12-8-KiB-plus-1", "J12-9000", "J12-12000"])
async def test_j12_a_token_over_8_kib_is_401_invalid_token_in_json(
    broker: BrokerUnderTest, upstream: RecordingUpstream, size: int
) -> None:
    caller = broker.caller()
    lines = [
        ("Authorization", "DPoP " + "A" * size),
        ("DPoP", caller.proof("POST", TOOL)),
        ("Content-Type", "application/json"),
        ("Connection", "close"),
    ]
    reply = await rawhttp.exchange(
        main_port(broker), agent_tls(broker), rawhttp.request("POST", TOOL, lines, BODY)
    )
    [response] = reply.responses
    assert response.status == 401
    assert json_error(response)["error"] == "invalid_token"
    assert response.headers["www-authenticate"].startswith("DPoP ")
    assert upstream.received == []
    assert decisions(broker)[-1]["reason"] == "token_too_large"


# -- Transfer-Encoding other than exactly chunked, and Upgrade, are refused (400), never forwarded ---------------

# (id, extra header lines, body): every one refused with 400 JSON and the connection closed
FRAMING_REFUSALS: list[tuple[str, list[tuple[str, str]], bytes]] = [
    ("P02-gzip-then-chunked", [("Transfer-Encoding", "gzip, chunked")], CHUNKED),
    ("P02-chunked-then-identity", [("Transfer-Encoding", "chunked, identity")], CHUNKED),
    ("P02-chunked-listed-twice", [("Transfer-Encoding", "chunked, chunked")], CHUNKED),
    ("P02-identity", [("Transfer-Encoding", "identity"), ("Content-Length", str(len(BODY)))], BODY),
    ("P02-gzip-alone", [("Transfer-Encoding", "gzip"), ("Content-Length", str(len(BODY)))], BODY),
    ("P06-upgrade-websocket", [("Connection", "Upgrade"), ("Upgrade", "websocket")], BODY),
    ("P06-upgrade-h2c", [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c")], BODY),
    ("P06-upgrade-header-alone", [("Upgrade", "websocket")], BODY),
    ("P06-connection-upgrade-alone", [("Connection", "keep-alive, UPGRADE")], BODY),
]


@pytest.mark.parametrize(
    ("extra", "body"), [r[1:] for r in FRAMING_REFUSALS], ids=[r[0] for r in FRAMING_REFUSALS]
)
async def test_framing_and_upgrades_are_refused_and_never_forwarded(
    broker: BrokerUnderTest, upstream: RecordingUpstream, extra: list[tuple[str, str]], body: bytes
) -> None:
    framed = any(name == "Transfer-Encoding" for name, _ in extra)
    data = rawhttp.request("POST", TOOL, call_lines(broker.caller(), *extra), body, content_length=not framed)
    smuggled = f"POST {TOOL} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n".encode()
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), data + smuggled)
    [response] = reply.responses
    assert response.status == 400
    assert json_error(response)["error"] == "invalid_request"
    assert reply.closed
    assert upstream.received == []


async def test_p06_connect_is_refused(broker: BrokerUnderTest, upstream: RecordingUpstream) -> None:
    data = b"CONNECT /mcp/expenses HTTP/1.1\r\nHost: localhost\r\n\r\nGET /v1/tools HTTP/1.1\r\n\r\n"
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), data)
    [response] = reply.responses
    assert response.status == 400
    json_error(response)
    assert reply.closed and upstream.received == []


@pytest.mark.parametrize(
    "coding", ["chunked", "Chunked", "CHUNKED"], ids=["P02-chunked", "P02-Chunked", "P02-CHUNKED"]
)
async def test_p02_chunked_in_any_case_is_read_once(
    broker: BrokerUnderTest, upstream: RecordingUpstream, coding: str
) -> None:
    """RFC 9112 §7: transfer-coding names are case-insensitive; exactly one ``chunked`` is the one accepted TE."""
    data = rawhttp.request(
        "POST",
        TOOL,
        call_lines(broker.caller(), ("Transfer-Encoding", coding), ("Connection", "close")),
        CHUNKED,
        content_length=False,
    )
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), data)
    assert reply.statuses == [200]
    assert [r.body for r in upstream.received] == [b'{"amount":1,"invoice_id":"INV-1"}']


# -- Request ids: the broker's own, the caller's kept as client_request_id ----------------------------------------


async def test_the_request_id_is_the_brokers_own_and_the_callers_is_recorded(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    """CONTRACT §12: a caller sending the same X-Request-Id twice gets two ids, two records that do not share
    one, and both records keep the caller's as ``client_request_id``; the upstream gets the broker's."""
    caller = broker.caller()
    ids = []
    for _ in range(2):
        reply = await caller.call(
            "POST", TOOL, {"invoice_id": "INV-1", "amount": 1}, headers={"X-Request-Id": "dup-1"}
        )
        assert reply.status == 200
        ids.append(reply.headers["X-Request-Id"])
    assert len(set(ids)) == 2 and "dup-1" not in ids
    assert [r.headers["X-Request-Id"] for r in upstream.received] == ids
    records = [r for r in decisions(broker) if r["request_id"] in ids and r["event"] == "invocation"]
    assert sorted(r["request_id"] for r in records) == sorted(ids)
    assert {r["client_request_id"] for r in records} == {"dup-1"}


@pytest.mark.parametrize(
    "value",
    ["a" * 65, "two words", "x\ty", "é", ""],
    ids=["too-long", "space", "P10-tab", "non-ascii", "empty"],
)
async def test_an_odd_client_request_id_is_not_recorded(broker: BrokerUnderTest, value: str) -> None:
    caller = broker.caller()
    lines = [*auth_lines(caller, "GET", "/v1/tools"), ("X-Request-Id", value), ("Connection", "close")]
    reply = await rawhttp.exchange(
        main_port(broker), agent_tls(broker), rawhttp.request("GET", "/v1/tools", lines, content_length=False)
    )
    [response] = reply.responses
    assert response.status == 200
    [record] = [r for r in decisions(broker) if r["request_id"] == response.headers["x-request-id"]]
    assert "client_request_id" not in record


async def test_refusals_carry_the_brokers_request_id(broker: BrokerUnderTest) -> None:
    reply = await broker.caller().call("POST", "/v1/tools/noSuchTool", {}, headers={"X-Request-Id": "mine"})
    assert reply.status == 404
    assert reply.body["request_id"] == reply.headers["X-Request-Id"] != "mine"
    record = next(r for r in decisions(broker) if r["request_id"] == reply.body["request_id"])
    assert record["client_request_id"] == "mine"


# -- Schema pattern (ECMA-262) and I-JSON numbers, through the listener --------------------------------------------


@pytest.fixture
async def patterned(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> BrokerUnderTest:
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    tool = copy.deepcopy(config["tools"][0])
    tool["input_schema"]["properties"]["invoice_id"]["pattern"] = "^INV-\\d+$"
    config["tools"] = [tool]
    return await broker_factory(config)


@pytest.mark.parametrize(
    ("invoice_id", "status"),
    [("INV-42", 200), ("INV-42\n", 400), ("INV-٤٢", 400), ("xINV-42", 400)],
    ids=["plain", "trailing-newline", "arabic-indic-digits", "prefix"],
)
async def test_schema_pattern_follows_ecma_262(
    patterned: BrokerUnderTest, upstream: RecordingUpstream, invoice_id: str, status: int
) -> None:
    reply = await patterned.caller().call("POST", TOOL, {"invoice_id": invoice_id, "amount": 1})
    assert reply.status == status
    if status == 400:
        assert reply.error == "invalid_request"
        assert reply.body["error_description"].startswith("arguments.invoice_id: ")
        assert upstream.received == []
        assert decisions(patterned)[-1]["reason"] == "arguments_schema"
    else:
        assert len(upstream.received) == 1


@pytest.mark.parametrize(
    "literal",
    ["99999999999.99999e9", "9.007199254740992e15", "9007199254740992", "1E400", "1e0000000000000000016"],
    ids=[
        "T11-fraction-and-exponent",
        "T11-exponent",
        "T11-integer",
        "T10-overflow",
        "T11-zero-padded-exponent",
    ],
)
async def test_i_json_numbers_are_refused_in_every_notation(
    broker: BrokerUnderTest, upstream: RecordingUpstream, literal: str
) -> None:
    raw = f'{{"invoice_id":"INV-1","amount":{literal}}}'.encode()
    reply = await broker.caller().call("POST", TOOL, raw=raw)
    assert (reply.status, reply.error) == (400, "invalid_request")
    assert upstream.received == []
    assert decisions(broker)[-1]["reason"] == "json_number_out_of_range"


# -- The admin listener cannot be driven by a browser ------------------------------------------------------------


def admin_port(broker: BrokerUnderTest) -> int:
    return broker.running.admin_address[1]


async def admin_raw(
    broker: BrokerUnderTest,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
    *,
    host: str | None = None,
) -> rawhttp.RawResponse:
    lines = [*headers, ("Connection", "close")]
    data = rawhttp.request(
        method, path, lines, body, host=f"127.0.0.1:{admin_port(broker)}" if host is None else host
    )
    reply = await rawhttp.exchange(admin_port(broker), None, data)
    [response] = reply.responses
    return response


def revocations(broker: BrokerUnderTest) -> list[dict[str, Any]]:
    return [r for r in broker.audit_records() if r["event"] == "revocation"]


REVOKE = json.dumps({"kind": "sub", "value": "alice"}).encode()
JSON_TYPE = ("Content-Type", "application/json")

# (id, Host header value, accepted): {port} is the admin listener's port
HOSTS: list[tuple[str, str, bool]] = [
    ("loopback-ip-with-port", "127.0.0.1:{port}", True),
    ("loopback-ip", "127.0.0.1", True),
    ("localhost-with-port", "localhost:{port}", True),
    ("localhost-any-case", "LocalHost", True),
    ("localhost-other-port", "localhost:19090", True),
    ("ipv6-loopback", "[::1]:{port}", True),
    ("other-loopback-address", "127.0.0.2", True),
    ("P12-dns-rebinding-name", "evil.example:{port}", False),
    ("P12-rebinding-name-no-port", "attacker.example", False),
    ("P12-localhost-as-a-subdomain", "localhost.evil.example", False),
    ("P12-loopback-ip-as-a-subdomain", "127.0.0.1.nip.io:{port}", False),
    ("P12-localhost-trailing-dot", "localhost.", False),
    ("P12-other-ip", "10.1.2.3:{port}", False),
    ("P12-non-numeric-port", "localhost:admin", False),
    ("P12-userinfo", "user@localhost", False),
    ("P12-empty", "", False),
]


@pytest.mark.parametrize(("host", "accepted"), [r[1:] for r in HOSTS], ids=[r[0] for r in HOSTS])
async def test_admin_endpoints_answer_their_own_host_names_only(
    broker: BrokerUnderTest, host: str, accepted: bool
) -> None:
    host = host.format(port=admin_port(broker))
    for method, path, lines, body in (
        ("GET", "/healthz", [], b""),
        ("GET", "/admin/config", [], b""),
        ("POST", "/admin/revocations", [JSON_TYPE], REVOKE),
    ):
        response = await admin_raw(broker, method, path, lines, body, host=host)
        if accepted:
            assert response.status == 200, (path, response.body)
        else:
            assert response.status == 421, (path, response.body)
            assert json_error(response)["error"] == "misdirected_request"
    assert len(revocations(broker)) == (1 if accepted else 0)


async def test_admin_refuses_a_request_with_two_host_headers(broker: BrokerUnderTest) -> None:
    response = await admin_raw(broker, "GET", "/healthz", [("Host", "evil.example")])
    assert response.status in (400, 421)
    json_error(response)


# (id, header lines of an admin POST): each refused without changing anything
BROWSER_POSTS: list[tuple[str, list[tuple[str, str]], int]] = [
    ("no-content-type", [], 415),
    ("form-urlencoded", [("Content-Type", "application/x-www-form-urlencoded")], 415),
    ("text-plain", [("Content-Type", "text/plain")], 415),
    ("multipart", [("Content-Type", "multipart/form-data; boundary=x")], 415),
    ("json-lookalike", [("Content-Type", "application/jsonx")], 415),
    ("origin-cross-site", [JSON_TYPE, ("Origin", "https://evil.example")], 403),
    ("origin-null", [JSON_TYPE, ("Origin", "null")], 403),
    ("origin-same-origin", [JSON_TYPE, ("Origin", "http://127.0.0.1")], 403),
    ("sec-fetch-site-cross-site", [JSON_TYPE, ("Sec-Fetch-Site", "cross-site")], 403),
    ("sec-fetch-site-same-site", [JSON_TYPE, ("Sec-Fetch-Site", "same-site")], 403),
    ("form-post-from-a-page", [("Content-Type", "text/plain"), ("Origin", "https://evil.example")], 403),
]


@pytest.mark.parametrize(
    ("lines", "status"), [r[1:] for r in BROWSER_POSTS], ids=[r[0] for r in BROWSER_POSTS]
)
async def test_admin_state_changes_refuse_browser_requests(
    broker: BrokerUnderTest, lines: list[tuple[str, str]], status: int
) -> None:
    for path, body in (("/admin/revocations", REVOKE), ("/admin/reload", b"{}"), ("/admin/rollback", b"{}")):
        response = await admin_raw(broker, "POST", path, lines, body)
        assert response.status == status, (path, response.body)
        assert json_error(response)["error"] == (
            "unsupported_media_type" if status == 415 else "access_denied"
        )
    assert revocations(broker) == []
    assert [r for r in broker.audit_records() if r["event"] == "config_load"] == broker.audit_records()[:1]


@pytest.mark.parametrize(
    "lines",
    [
        [JSON_TYPE],
        [("Content-Type", "application/json; charset=utf-8")],
        [JSON_TYPE, ("Sec-Fetch-Site", "none")],
    ],
    ids=["json", "json-utf-8", "sec-fetch-site-none"],
)
async def test_admin_state_changes_from_a_command_line_client_pass(
    broker: BrokerUnderTest, lines: list[tuple[str, str]]
) -> None:
    response = await admin_raw(broker, "POST", "/admin/revocations", lines, REVOKE)
    assert response.status == 200, response.body
    assert len(revocations(broker)) == 1


async def test_admin_parser_refusals_are_json(broker: BrokerUnderTest) -> None:
    reply = await rawhttp.exchange(
        admin_port(broker), None, b"G@T /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    )
    [response] = reply.responses
    assert response.status == 400
    assert json_error(response)["error"] == "invalid_request"
    assert reply.closed


async def test_admin_unknown_paths_are_json(broker: BrokerUnderTest) -> None:
    response = await admin_raw(broker, "GET", "/admin/nothing", [])
    assert response.status == 404
    assert json_error(response)["error"] == "not_found"


@pytest.fixture
async def token_broker(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> BrokerUnderTest:
    token_file = tmp_path / "admin-token"
    token_file.write_text("s3cret-admin-token-123\n")
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["server"]["admin_token_file"] = str(token_file)
    return await broker_factory(config)


# (method, path, body, open without the token)
ADMIN_ENDPOINTS: list[tuple[str, str, bytes, bool]] = [
    ("GET", "/healthz", b"", True),
    ("GET", "/readyz", b"", True),
    ("GET", "/metrics", b"", False),
    ("GET", "/admin/config", b"", False),
    ("GET", "/admin/mcp/pins", b"", False),
    ("POST", "/admin/reload", b"{}", False),
    ("POST", "/admin/revocations", REVOKE, False),
    ("GET", "/admin/unknown", b"", False),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "open_"),
    ADMIN_ENDPOINTS,
    ids=[f"{m}-{p.strip('/').replace('/', '-')}" for m, p, _, _ in ADMIN_ENDPOINTS],
)
async def test_with_an_admin_token_every_endpoint_but_the_probes_needs_it(
    token_broker: BrokerUnderTest, method: str, path: str, body: bytes, open_: bool
) -> None:
    lines = [JSON_TYPE] if method == "POST" else []
    for authorization in ([], [("Authorization", "Bearer wrong")], [("Authorization", "Basic czNjcmV0")]):
        response = await admin_raw(token_broker, method, path, [*lines, *authorization], body)
        if open_:
            assert response.status == 200
        else:
            assert response.status == 401, (path, authorization)
            assert json_error(response)["error"] == "invalid_token"
            assert response.headers["www-authenticate"] == 'Bearer realm="broker-admin"'
    right = [("Authorization", "Bearer s3cret-admin-token-123")]
    response = await admin_raw(token_broker, method, path, [*lines, *right], body)
    assert response.status == (404 if path == "/admin/unknown" else 200), response.body


# -- The Host rule itself (pure): what a wildcard bind must accept ------------------------------------------------

# (id, Host value, configured admin host, connection's local address, accepted)
HOST_RULE: list[tuple[str, str, str, str | None, bool]] = [
    ("configured-name", "broker-admin.internal:9090", "broker-admin.internal", "10.0.0.5", True),
    ("configured-name-any-case", "Broker-Admin.Internal", "broker-admin.internal", None, True),
    ("wildcard-bind-pod-ip", "10.0.0.5:9090", "0.0.0.0", "10.0.0.5", True),
    ("wildcard-bind-dual-stack-pod-ip", "10.0.0.5:9090", "::", "::ffff:10.0.0.5", True),
    ("wildcard-bind-ipv6-pod-ip", "[fd00::5]:9090", "::", "fd00::5", True),
    ("wildcard-bind-other-ip", "10.0.0.6:9090", "0.0.0.0", "10.0.0.5", False),
    ("wildcard-address-is-not-a-name", "0.0.0.0:9090", "0.0.0.0", "10.0.0.5", False),
    ("configured-ipv6", "[::1]:9090", "::1", "::1", True),
    ("rebinding-name-on-wildcard-bind", "evil.example:9090", "0.0.0.0", "10.0.0.5", False),
    ("unclosed-bracket", "[::1", "127.0.0.1", None, False),
]


@pytest.mark.parametrize(
    ("value", "configured", "local", "accepted"), [r[1:] for r in HOST_RULE], ids=[r[0] for r in HOST_RULE]
)
def test_p12_admin_host_rule(value: str, configured: str, local: str | None, accepted: bool) -> None:
    assert is_own_host(value, configured, local) is accepted


def test_host_of_parses_the_host_header_forms() -> None:
    assert host_of("LocalHost:9090") == "localhost"
    assert host_of("[::1]:9090") == "::1"
    assert host_of("[::1]") == "::1"
    assert host_of("a:b:c") is None
    assert host_of(":9090") is None
