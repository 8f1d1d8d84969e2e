"""HOSTILE §1.5 P01–P06 and P13: request framing, written as exact bytes on a real TLS connection.

Each hostile case is one authenticated, otherwise valid ``approveExpense`` call whose framing is broken in exactly
one way, followed on the same connection by a second request (what a smuggler would hide in the body). Expected:
400 with a CONTRACT §8 JSON body (from aiohttp's C parser, llhttp, rendered by broker.listener; or from the
broker's own framing check for what llhttp accepts, e.g. ``gzip, chunked``), the connection closed, and the
upstream receives nothing at all — neither the call nor the smuggled request. These refusals happen before
identity (most below the broker's middleware: no request object exists yet), so they are not audited; the audit
test is that no decision was recorded either.
"""

from __future__ import annotations

import importlib
import json
import os

import aiohttp
import aiohttp.http_parser
import pytest

from tests.conftest import BrokerUnderTest, Caller, RecordingUpstream
from tests.security import rawhttp
from tests.security.support import TOOL, agent_tls, auth_lines, main_port

BODY = b'{"invoice_id":"INV-1","amount":1}'
SIZE, HEX = len(BODY), format(len(BODY), "x")
CHUNKED = f"{HEX}\r\n".encode() + BODY + b"\r\n0\r\n\r\n"
# What would be smuggled: a second call to the tool, unauthenticated, so that even if it were parsed as a request
# of its own it could never be forwarded; the assertion is on the upstream (nothing at all) and on the answers.
SMUGGLED = f"POST {TOOL} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n".encode()

# (id, framing header lines, body bytes)
HOSTILE_FRAMING: list[tuple[str, str, bytes]] = [
    ("P01-content-length-and-chunked", f"Content-Length: {SIZE}\r\nTransfer-Encoding: chunked\r\n", CHUNKED),
    ("P01-chunked-and-content-length", f"Transfer-Encoding: chunked\r\nContent-Length: {SIZE}\r\n", CHUNKED),
    ("P02-xchunked", "Transfer-Encoding: xchunked\r\n", CHUNKED),
    ("P02-chunked-then-identity", "Transfer-Encoding: chunked, identity\r\n", CHUNKED),
    ("P02-gzip-then-chunked", "Transfer-Encoding: gzip, chunked\r\n", CHUNKED),
    ("P02-identity-alone", f"Transfer-Encoding: identity\r\nContent-Length: {SIZE}\r\n", BODY),
    ("P02-te-header-twice", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", CHUNKED),
    (
        "P02-identity-then-chunked-lines",
        "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
        CHUNKED,
    ),
    ("P02-tab-inside-the-value", "Transfer-Encoding: chunked\t,x\r\n", CHUNKED),
    ("P02-vertical-tab", "Transfer-Encoding: \x0bchunked\r\n", CHUNKED),
    ("P03-bare-cr-in-a-header", f"X-Abc: \rxTransfer-Encoding: chunked\r\nContent-Length: {SIZE}\r\n", BODY),
    ("P03-bare-cr-ends-a-line", f"X-Abc: a\rContent-Length: {SIZE}\r\n", BODY),
    (
        "P04-lf-in-chunk-extension",
        "Transfer-Encoding: chunked\r\n",
        f"{HEX};a=\nb\r\n".encode() + BODY + b"\r\n0\r\n\r\n",
    ),
    (
        "P04-bare-lf-in-trailer",
        "Transfer-Encoding: chunked\r\n",
        f"{HEX}\r\n".encode() + BODY + b"\r\n0\r\nX-T: a\nContent-Length: 5\r\n\r\n",
    ),
    (
        "P04-framing-header-in-trailer",
        "Transfer-Encoding: chunked\r\n",
        f"{HEX}\r\n".encode() + BODY + b"\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n",
    ),
    (
        "P04-bare-lf-after-chunk-size",
        "Transfer-Encoding: chunked\r\n",
        f"{HEX}\n".encode() + BODY + b"\r\n0\r\n\r\n",
    ),
    ("P05-space-before-colon", "Transfer-Encoding : chunked\r\n", CHUNKED),
    ("P05-obs-fold", f"X-Fold: a\r\n b\r\nContent-Length: {SIZE}\r\n", BODY),
    ("P05-content-length-plus", f"Content-Length: +{SIZE}\r\n", BODY),
    ("P05-content-length-list", f"Content-Length: {SIZE}, {SIZE}\r\n", BODY),
    ("P05-content-length-twice", f"Content-Length: {SIZE}\r\nContent-Length: {SIZE}\r\n", BODY),
    ("P05-content-length-hex", f"Content-Length: 0x{HEX}\r\n", BODY),
    ("P05-content-length-negative", f"Content-Length: -{SIZE}\r\n", BODY),
    ("P05-content-length-huge", "Content-Length: 99999999999999999999999\r\n", BODY),
]


def call_head(caller: Caller) -> bytes:
    lines = [f"POST {TOOL} HTTP/1.1", "Host: localhost", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in auth_lines(caller, "POST", TOOL)]
    return ("\r\n".join(lines) + "\r\n").encode()


@pytest.mark.parametrize(
    ("framing", "body"), [(f, b) for _, f, b in HOSTILE_FRAMING], ids=[i for i, _, _ in HOSTILE_FRAMING]
)
async def test_ambiguous_framing_is_refused_and_nothing_is_forwarded(
    broker: BrokerUnderTest, upstream: RecordingUpstream, framing: str, body: bytes
) -> None:
    data = call_head(broker.caller()) + framing.encode("latin-1") + b"\r\n" + body + SMUGGLED
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), data)
    assert reply.statuses == [400], reply.data[:300]
    [response] = reply.responses
    assert response.headers["content-type"].startswith("application/json")
    error = json.loads(response.body)
    assert set(error) == {"error", "error_description", "request_id"} and error["error"] == "invalid_request"
    assert error["request_id"] == response.headers["x-request-id"]
    assert reply.closed  # the connection is not reused after a framing error
    assert upstream.received == []
    assert [r for r in broker.audit_records() if r["event"] not in ("config_load", "checkpoint")] == []


@pytest.mark.parametrize(
    "framing",
    ["Transfer-Encoding:  chunked\r\n", "Transfer-Encoding:\tchunked\r\n", "Transfer-Encoding: CHUNKED\r\n"],
    ids=["P02-double-space-is-legal-ows", "P02-tab-is-legal-ows", "P02-chunked-is-case-insensitive"],
)
async def test_p02_legal_spellings_of_chunked_frame_one_request(
    broker: BrokerUnderTest, upstream: RecordingUpstream, framing: str
) -> None:
    """RFC 9110 §5.6.3 OWS around a value is legal: the body is read as chunked, exactly once, and what follows
    on the connection is a request of its own (authenticated on its own, so refused)."""
    data = (
        call_head(broker.caller())
        + framing.encode()
        + b"\r\n"
        + CHUNKED
        + SMUGGLED.replace(b"Content-Length: 0", b"Connection: close\r\nContent-Length: 0")
    )
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), data)
    assert reply.statuses == [200, 401]
    assert [r.body for r in upstream.received] == [b'{"amount":1,"invoice_id":"INV-1"}']


def test_p04_the_patched_c_parser_is_in_use() -> None:
    """The llhttp-based C parser rejects the rows above; the pure-Python fallback had its own smuggling bugs
    (CVE-2023-47627, CVE-2024-52304, CVE-2025-53643). It is used only when the extension is missing or
    AIOHTTP_NO_EXTENSIONS is set."""
    c_parser = importlib.import_module("aiohttp._http_parser")
    assert aiohttp.http_parser.HttpRequestParser is c_parser.HttpRequestParser
    assert not os.environ.get("AIOHTTP_NO_EXTENSIONS")
    version = tuple(int(part) for part in aiohttp.__version__.split(".")[:3])
    assert version >= (3, 14, 3)  # HOSTILE §0 floor


@pytest.mark.parametrize(
    "upgrade",
    [
        [("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")],
        [
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ],
    ],
    ids=["P06-websocket", "P06-h2c"],
)
async def test_p06_upgrade_is_refused_and_nothing_is_forwarded(
    broker: BrokerUnderTest, upstream: RecordingUpstream, upgrade: list[tuple[str, str]]
) -> None:
    """CONTRACT §12: an Upgrade request is refused (400 JSON, never 101) and the connection closed, so neither
    the call nor the bytes after it on the connection are tunnelled or forwarded (the CVE-2026-69243 shape)."""
    caller = broker.caller()
    call = rawhttp.request(
        "POST",
        TOOL,
        [*auth_lines(caller, "POST", TOOL), ("Content-Type", "application/json"), *upgrade],
        BODY,
    )
    closing = SMUGGLED.replace(b"Content-Length: 0", b"Connection: close\r\nContent-Length: 0")
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), [call, closing], deadline=2)
    assert reply.statuses == [400]
    assert json.loads(reply.body)["error"] == "invalid_request"
    assert reply.closed
    assert upstream.received == []


async def test_p06_client_framing_is_replaced_by_the_brokers_own(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    """A chunked, whitespace-padded body with TE and Trailer headers: the upstream gets the canonical bytes
    framed by a Content-Length of their own, and none of the client's framing or hop-by-hop headers."""
    caller = broker.caller()
    padded = b'{ "invoice_id" : "INV-1" ,\n "amount" : 1 }'
    chunked = f"{len(padded):x}\r\n".encode() + padded + b"\r\n0\r\n\r\n"
    head = (
        call_head(caller)
        + b"Transfer-Encoding: chunked\r\nTE: trailers\r\nTrailer: X-T\r\nConnection: close\r\n"
    )
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), head + b"\r\n" + chunked)
    assert reply.statuses == [200]
    [forwarded] = upstream.received
    assert forwarded.body == b'{"amount":1,"invoice_id":"INV-1"}'
    assert forwarded.headers["Content-Length"] == str(len(forwarded.body))
    names = {name.lower() for name in forwarded.headers}
    assert not names & {"transfer-encoding", "te", "trailer", "connection"}


@pytest.mark.parametrize(
    ("extra", "statuses"),
    [
        ([("X-Long", "a" * 17_000)], {431}),
        ([("X-Long", "a" * 9000), ("X-Longer", "b" * 9000)], {431}),
        ([(f"X-H{i}", "v") for i in range(1000)], {400, 431}),
    ],
    ids=["P13-header-line-over-16-KiB", "P13-headers-over-16-KiB-in-total", "P13-a-thousand-headers"],
)
async def test_p13_header_limits(
    broker: BrokerUnderTest, upstream: RecordingUpstream, extra: list[tuple[str, str]], statuses: set[int]
) -> None:
    caller = broker.caller()
    data = rawhttp.request(
        "POST",
        TOOL,
        [
            *auth_lines(caller, "POST", TOOL),
            ("Content-Type", "application/json"),
            *extra,
            ("Connection", "close"),
        ],
        BODY,
    )
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), data)
    assert reply.status in statuses
    assert json.loads(reply.body)["error"] in ("invalid_request", "request_header_fields_too_large")
    assert upstream.received == []


async def test_p13_body_larger_than_declared_limit_is_refused_before_reading(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    """A Content-Length over the 1 MiB cap is refused from the header alone: the body is never sent."""
    caller = broker.caller()
    head = call_head(caller) + f"Content-Length: {2 * 1024 * 1024}\r\nConnection: close\r\n\r\n".encode()
    reply = await rawhttp.exchange(main_port(broker), agent_tls(broker), head + b"{", responses=1)
    assert reply.status == 413
    assert upstream.received == []
    assert broker.audit_records()[-1]["status"] == 413
