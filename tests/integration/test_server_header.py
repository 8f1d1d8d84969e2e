"""Every answer of both listeners says ``Server: broker`` — no Python or aiohttp version — on the application's
answers, its refusals, aiohttp's routing answers and the HTTP parser's own refusals (:mod:`broker.listener`).
Read off the wire with raw sockets (real TLS on the main listener)."""

from __future__ import annotations

import re

import pytest

from broker.listener import SERVER_HEADER
from tests.conftest import BrokerUnderTest
from tests.security.rawhttp import exchange, request
from tests.security.support import agent_tls, main_port

P = pytest.param
OVERLONG = "x" * 70000  # past aiohttp's 8190-byte line limit: refused by the parser (431)
CASES = [
    P(request("GET", "/.well-known/oauth-protected-resource", []), 200, id="metadata"),
    P(request("GET", "/v1/tools", []), 401, id="middleware-refusal"),
    P(request("GET", "/no/such/path", []), 404, id="routing-404"),
    P(request("PATCH", "/v1/token", []), 405, id="routing-405"),
    P(b"G@T / HTTP/1.1\r\nHost: localhost\r\n\r\n", 400, id="parser-bad-method"),
    P(request("GET", "/v1/tools", [("X-Long", OVERLONG)]), 431, id="parser-long-line"),
    P(
        request("POST", "/v1/token", [("Transfer-Encoding", "chunked")], b"0\r\n\r\n"),
        400,
        id="parser-cl-and-te",
    ),
]
ADMIN_CASES = [
    P(request("GET", "/healthz", []), 200, id="healthz"),
    P(request("GET", "/metrics", []), 200, id="metrics"),
    P(request("GET", "/no/such/path", []), 404, id="routing-404"),
    P(request("GET", "/healthz", [], host="evil.example"), 421, id="foreign-host"),
    P(b"G@T / HTTP/1.1\r\nHost: localhost\r\n\r\n", 400, id="parser-bad-method"),
    P(request("GET", "/healthz", [("X-Long", OVERLONG)]), 431, id="parser-long-line"),
]


def assert_constant_server(data: bytes, status: int) -> None:
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
    # the parser answers before it knows the version: aiohttp writes those as HTTP/1.0
    assert re.match(rf"HTTP/1\.[01] {status} ", head), head
    fields = [line.partition(":") for line in head.split("\r\n")[1:]]
    servers = [value.strip() for name, _, value in fields if name.strip().lower() == "server"]
    assert servers == [SERVER_HEADER], head
    assert not re.search(r"(?i)python|aiohttp", head), head


@pytest.mark.parametrize(("raw", "status"), CASES)
async def test_main_listener_sends_a_constant_server_header(
    broker: BrokerUnderTest, raw: bytes, status: int
) -> None:
    reply = await exchange(main_port(broker), agent_tls(broker), raw, responses=1)
    assert_constant_server(reply.data, status)


@pytest.mark.parametrize(("raw", "status"), ADMIN_CASES)
async def test_admin_listener_sends_a_constant_server_header(
    broker: BrokerUnderTest, raw: bytes, status: int
) -> None:
    reply = await exchange(broker.running.admin_address[1], None, raw, responses=1)
    assert_constant_server(reply.data, status)
