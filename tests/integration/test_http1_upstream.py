"""The upstream client (broker.gateway.http1) against scripted backends on real mTLS sockets, on asyncio's loop and
on uvloop's (the server's): keep-alive reuse, every body framing, and backends that try to desynchronise the
connection — bytes beyond an answer or sent while idle are never read as the next call's answer."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import uvloop
from yarl import URL

from broker.dev.demo.expense import server_ssl_context
from broker.errors import UpstreamError, UpstreamTimeout
from broker.gateway.http1 import Http1Pool
from broker.tls import upstream_ssl_context
from tests.certfactory import Pki

LIMIT = 1 << 16


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    return uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()


#: what a scripted backend does for one request: the bytes it answers, and whether it then closes
Script = Callable[[int], tuple[bytes, bool]]


def answer(body: bytes = b'{"ok":true}', *extra: str, close: bool = False) -> tuple[bytes, bool]:
    head = ["HTTP/1.1 200 OK", "Content-Type: application/json", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body, close


@dataclass
class Backend:
    """A TLS server requiring the broker's client certificate that answers each request with ``script(n)``."""

    script: Script
    url: URL = field(default_factory=lambda: URL("https://127.0.0.1"))
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    idle_writes: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                self.requests.append(head + await reader.readexactly(length))
                data, close = self.script(len(self.requests))
                writer.write(data)
                await writer.drain()
                self.idle_writes.append(writer)
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve(pki: Pki) -> AsyncIterator[Callable[[Script], Backend]]:
    servers: list[asyncio.Server] = []
    tls = server_ssl_context(pki.backend, pki.backend_key, ca=pki.ca)

    async def start(script: Script) -> Backend:
        backend = Backend(script)
        server = await asyncio.start_server(backend.handle, "127.0.0.1", 0, ssl=tls)
        servers.append(server)
        backend.url = URL(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/invoices")
        return backend

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
def client_tls(pki: Pki) -> ssl.SSLContext:
    return upstream_ssl_context(ca=str(pki.ca), cert=str(pki.broker), key=str(pki.broker_key))


async def post(pool: Http1Pool, backend: Backend, tls: ssl.SSLContext, *, total: float = 5.0) -> bytes:
    reply = await pool.post(
        "listInvoices",
        backend.url,
        tls,
        b'{"department":"42"}',
        {"Content-Type": "application/json"},
        total_seconds=total,
        connect_seconds=2.0,
        limit=LIMIT,
    )
    assert reply.status == 200 and reply.content_type == "application/json"
    return reply.body


async def until_unusable(pool: Http1Pool) -> None:
    """Turn the loop until the one pooled connection has taken in what its peer did (no timing involved)."""
    [idle] = [conn for queue in pool._idle.values() for conn in queue]
    for _ in range(10_000):
        if not idle.usable:
            return
        await asyncio.sleep(0)  # one loop turn: the loop delivers the peer's bytes, close_notify or FIN
    raise AssertionError("the pooled connection never saw its peer's bytes")


async def test_keep_alive_reuses_one_connection(
    serve: Callable[..., Backend], client_tls: ssl.SSLContext
) -> None:
    backend = await serve(lambda n: answer(f'{{"n":{n}}}'.encode()))  # type: ignore[misc]
    pool = Http1Pool()
    assert [await post(pool, backend, client_tls) for _ in range(3)] == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert backend.connections == 1
    first = backend.requests[0]
    assert first.startswith(b"POST /invoices HTTP/1.1\r\nHost: 127.0.0.1:") and first.endswith(
        b'{"department":"42"}'
    )
    await pool.close()


@pytest.mark.parametrize(
    ("raw", "reused"),
    [
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'4\r\n{"n"\r\n3\r\n:1}\r\n0\r\n\r\n',
            True,
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{"n":1}',
            True,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: 7\r\n\r\n"
            b'{"n":1}',
            False,
        ),
        (b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{"n":1}', False),
    ],
    ids=["chunked", "interim-100", "connection-close", "http-1.0"],
)
async def test_framings(
    serve: Callable[..., Backend], client_tls: ssl.SSLContext, raw: bytes, reused: bool
) -> None:
    backend = await serve(lambda n: (raw, not reused))  # type: ignore[misc]
    pool = Http1Pool()
    assert await post(pool, backend, client_tls) == b'{"n":1}'
    assert await post(pool, backend, client_tls) == b'{"n":1}'
    assert backend.connections == (1 if reused else 2)
    await pool.close()


async def test_two_tools_on_one_backend_never_share_a_connection(
    serve: Callable[..., Backend], client_tls: ssl.SSLContext
) -> None:
    backend = await serve(lambda n: answer(f'{{"n":{n}}}'.encode()))  # type: ignore[misc]
    pool = Http1Pool()
    for tool in ("listInvoices", "approveExpense", "listInvoices", "approveExpense"):
        await pool.post(
            tool, backend.url, client_tls, b"{}", {}, total_seconds=5, connect_seconds=2, limit=LIMIT
        )
    assert backend.connections == 2 and pool.idle_count() == 2
    await pool.close()


async def test_idle_connections_expire(serve: Callable[..., Backend], client_tls: ssl.SSLContext) -> None:
    backend = await serve(lambda n: answer(f'{{"n":{n}}}'.encode()))  # type: ignore[misc]
    pool = Http1Pool(idle_seconds=0.2)
    assert await post(pool, backend, client_tls) == b'{"n":1}'
    assert pool.idle_count() == 1
    await asyncio.sleep(0.3)  # the expiry under test is a duration: let it pass
    assert await post(pool, backend, client_tls) == b'{"n":2}'
    assert backend.connections == 2  # the expired one was closed, not reused
    await pool.close()
    assert pool.idle_count() == 0


async def test_bytes_beyond_an_answer_are_never_the_next_answer(
    serve: Callable[..., Backend], client_tls: ssl.SSLContext
) -> None:
    smuggled = answer(b'{"n":"smuggled"}')[0]
    backend = await serve(lambda n: (answer(f'{{"n":{n}}}'.encode())[0] + smuggled, False))  # type: ignore[misc]
    pool = Http1Pool()
    assert await post(pool, backend, client_tls) == b'{"n":1}'
    assert await post(pool, backend, client_tls) == b'{"n":2}'  # its own answer, on a new connection
    assert backend.connections == 2
    await pool.close()


async def test_bytes_sent_while_idle_drop_the_connection(
    serve: Callable[..., Backend], client_tls: ssl.SSLContext
) -> None:
    backend = await serve(lambda n: answer(f'{{"n":{n}}}'.encode()))  # type: ignore[misc]
    pool = Http1Pool()
    assert await post(pool, backend, client_tls) == b'{"n":1}'
    writer = backend.idle_writes[-1]
    writer.write(answer(b'{"n":"unsolicited"}')[0])  # an answer to nothing, while the connection is pooled
    await writer.drain()
    # once it has arrived, the pooled connection is closed: the next call never reads it as its answer
    await until_unusable(pool)
    assert await post(pool, backend, client_tls) == b'{"n":2}'
    assert backend.connections == 2
    await pool.close()


async def test_a_server_that_closed_an_idle_connection(
    serve: Callable[..., Backend], client_tls: ssl.SSLContext
) -> None:
    backend = await serve(lambda n: answer(f'{{"n":{n}}}'.encode()))  # type: ignore[misc]
    pool = Http1Pool()
    assert await post(pool, backend, client_tls) == b'{"n":1}'
    writer = backend.idle_writes[-1]
    writer.close()
    await writer.wait_closed()
    # once the closure has reached the client (its pooled connection saw EOF), that connection is not reused
    await until_unusable(pool)
    assert await post(pool, backend, client_tls) == b'{"n":2}'
    assert backend.connections == 2
    await pool.close()


#: answers no client may take: (raw bytes, reason), and their ids (the streamed reads take them too)
BROKEN_ANSWERS: list[tuple[bytes, str]] = [
    (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "upstream_protocol_error",
    ),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ntruncated", "upstream_protocol_error"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", "upstream_protocol_error"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 999999\r\n\r\n", "upstream_too_large"),
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"1000\r\n" + b"x" * 4096 + b"\r\n") * 17,
        "upstream_too_large",
    ),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", "upstream_protocol_error"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "upstream_protocol_error"),
    (b"garbage\r\n\r\n", "upstream_protocol_error"),
    (b"", "upstream_protocol_error"),  # closed without an answer
    # delimited by the end of the connection: a cut could not be told from its end
    (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"n":1}', "upstream_protocol_error"),
    (
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\n{}",
        "upstream_protocol_error",
    ),  # bare LF: refused, not a hang
    (
        b"HTTP/1.1 099 Early\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        "upstream_protocol_error",
    ),
]
BROKEN_IDS = [
    "cl-and-te",
    "truncated",
    "truncated-chunk",
    "too-large-length",
    "too-large-stream",
    "switch",
    "huge-head",
    "garbage",
    "no-answer",
    "close-delimited",
    "bare-lf",
    "status-099",
]


@pytest.mark.parametrize(("raw", "reason"), BROKEN_ANSWERS, ids=BROKEN_IDS)
async def test_broken_answers_fail_closed(
    serve: Callable[..., Backend], client_tls: ssl.SSLContext, raw: bytes, reason: str
) -> None:
    backend = await serve(lambda n: (raw, True))  # type: ignore[misc]
    pool = Http1Pool()
    with pytest.raises(UpstreamError) as failed:
        await post(pool, backend, client_tls)
    assert failed.value.reason == reason
    await pool.close()


async def test_a_backend_that_does_not_answer_times_out(pki: Pki, client_tls: ssl.SSLContext) -> None:
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # never answers; returns when the client gives up
        writer.close()

    tls = server_ssl_context(pki.backend, pki.backend_key, ca=pki.ca)
    server = await asyncio.start_server(silent, "127.0.0.1", 0, ssl=tls)
    url = URL(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/invoices")
    pool = Http1Pool()
    with pytest.raises(UpstreamTimeout):
        await pool.post("t", url, client_tls, b"{}", {}, total_seconds=0.5, connect_seconds=2.0, limit=LIMIT)
    assert accepted.is_set()
    await pool.close()
    server.close()
    await server.wait_closed()


async def test_a_backend_that_is_not_there(client_tls: ssl.SSLContext) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    pool = Http1Pool()
    with pytest.raises(UpstreamError) as failed:
        await pool.post(
            "t",
            URL(f"https://127.0.0.1:{port}/"),
            client_tls,
            b"{}",
            {},
            total_seconds=2,
            connect_seconds=1,
            limit=LIMIT,
        )
    assert failed.value.reason == "upstream_connect_failed"
    await pool.close()
