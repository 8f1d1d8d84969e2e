"""Streamed answers on the broker's own upstream client (``Http1Pool.stream``, the MCP gateway's upstream calls)
against scripted servers on real mTLS sockets, on asyncio's loop and on uvloop's: pieces reach the reader as
they come, reads pause while the reader lags, every framing the buffered client refuses is refused here too,
and a connection goes back to the pool only after an answer read to its framed end."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import pytest
import uvloop
from yarl import URL

from broker.dev.demo.expense import server_ssl_context
from broker.errors import UpstreamError, UpstreamTimeout
from broker.gateway.http1 import MAX_CHUNKS, STREAM_HIGH_WATER, Http1Pool, Stream, _Connection
from broker.mcp.upstream import read_bounded
from broker.tls import upstream_ssl_context
from tests.certfactory import Pki
from tests.integration.test_http1_upstream import BROKEN_ANSWERS, BROKEN_IDS

LIMIT = 1 << 16
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def one_event_then_silence(head: bytes, writer: asyncio.StreamWriter) -> None:
    """A stream that stays open: one event, then nothing (the connection holds until the client leaves)."""
    writer.write(SSE_HEAD + chunk(b"data: 1\n\n"))
    await writer.drain()


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    return uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()


#: what a scripted server does on one connection, after each request head it reads: (request head, writer)
Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Server:
    url: URL = field(default_factory=lambda: URL("https://127.0.0.1"))
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)


@pytest.fixture
async def serve(pki: Pki) -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[asyncio.Server] = []
    tls = server_ssl_context(pki.backend, pki.backend_key, ca=pki.ca)

    async def start(handler: Handler) -> Server:
        state = Server()

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")  # the tests' requests have no body
                    state.requests.append(head)
                    await handler(head, writer)
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(connection, "127.0.0.1", 0, ssl=tls)
        servers.append(server)
        state.url = URL(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/mcp")
        return state

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
def client_tls(pki: Pki) -> ssl.SSLContext:
    return upstream_ssl_context(ca=str(pki.ca), cert=str(pki.broker), key=str(pki.broker_key))


def stream(
    pool: Http1Pool, server: Server, tls: ssl.SSLContext, *, method: str = "GET", read: float = 5.0
) -> AbstractAsyncContextManager[Stream]:
    return pool.stream(
        "expenses",
        method,
        server.url,
        tls,
        None,
        {"Accept": "text/event-stream"},
        connect_seconds=2.0,
        read_seconds=read,
    )


async def read_all(answer: Stream) -> bytes:
    pieces = []
    while piece := await answer.read():
        pieces.append(piece)
    return b"".join(pieces)


def only_connection(pool: Http1Pool) -> _Connection:
    [conn] = [conn for queue in pool._idle.values() for conn in queue]
    return conn


async def test_pieces_reach_the_reader_before_the_server_finishes(
    serve: Callable[[Handler], Awaitable[Server]], client_tls: ssl.SSLContext
) -> None:
    first_read = asyncio.Event()

    async def sse(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + chunk(b"data: 1\n\n"))
        await writer.drain()
        await first_read.wait()  # the rest only once the reader has had the first event
        writer.write(chunk(b"data: 2\n\n") + b"0\r\n\r\n")
        await writer.drain()

    server = await serve(sse)
    pool = Http1Pool()
    async with stream(pool, server, client_tls) as answer:
        assert (answer.status, answer.content_type, answer.content_length) == (200, "text/event-stream", None)
        assert await answer.read() == b"data: 1\n\n"
        first_read.set()
        assert await read_all(answer) == b"data: 2\n\n"
        assert answer.done
    # read to its end: back in the pool, and the next stream reuses it
    assert pool.idle_count() == 1
    first_read.clear()
    async with stream(pool, server, client_tls) as answer:
        assert await answer.read() == b"data: 1\n\n"
        first_read.set()
        await read_all(answer)
    assert server.connections == 1
    assert server.requests[0].startswith(b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"content-length" not in server.requests[0].lower()  # no body, no length
    await pool.close()


@pytest.mark.parametrize("close", ["early-exit", "error-in-block"])
async def test_a_stream_left_before_its_end_is_closed_not_pooled(
    serve: Callable[[Handler], Awaitable[Server]], client_tls: ssl.SSLContext, close: str
) -> None:
    server = await serve(one_event_then_silence)
    pool = Http1Pool()
    with pytest.raises(RuntimeError) if close == "error-in-block" else contextlib.nullcontext():
        async with stream(pool, server, client_tls) as answer:
            assert await answer.read() == b"data: 1\n\n"
            if close == "error-in-block":
                raise RuntimeError("the relay failed")
    assert pool.idle_count() == 0  # whatever the server sends next is never read as another call's answer
    await pool.close()


async def test_reads_pause_while_the_reader_lags(
    serve: Callable[[Handler], Awaitable[Server]], client_tls: ssl.SSLContext
) -> None:
    # 128x the high-water mark: far more than the loopback socket buffers hold
    payload = bytes(range(256)) * (128 * STREAM_HIGH_WATER // 256)

    async def flood(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + chunk(payload) + b"0\r\n\r\n")
        await writer.drain()

    server = await serve(flood)
    pool = Http1Pool()
    async with stream(pool, server, client_tls) as answer:
        conn = answer._conn
        for _ in range(100_000):  # loop turns, no clock: until the connection has stopped reading
            if conn.paused:
                break
            await asyncio.sleep(0)
        assert conn.paused
        for _ in range(1_000):  # paused: more turns bring (almost) nothing more in
            await asyncio.sleep(0)
        assert STREAM_HIGH_WATER < len(conn.buffer) <= 2 * STREAM_HIGH_WATER  # not the 32 MiB the server sent
        assert await read_all(answer) == payload  # reading resumes it; nothing lost or reordered
    assert pool.idle_count() == 1 and not only_connection(pool).paused
    await pool.close()


async def test_bytes_beyond_a_streamed_answer_are_never_the_next_answer(
    serve: Callable[[Handler], Awaitable[Server]], client_tls: ssl.SSLContext
) -> None:
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    answers = iter([b"data: 1\n\n", b"data: 2\n\n"])

    async def smuggler(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + chunk(next(answers)) + b"0\r\n\r\n" + smuggled)
        await writer.drain()

    server = await serve(smuggler)
    pool = Http1Pool()
    for expected in (b"data: 1\n\n", b"data: 2\n\n"):
        async with stream(pool, server, client_tls) as answer:
            assert await read_all(answer) == expected
    assert server.connections == 2
    await pool.close()


@pytest.mark.parametrize(("raw", "reason"), BROKEN_ANSWERS, ids=BROKEN_IDS)
async def test_broken_answers_fail_closed_streamed_too(
    serve: Callable[[Handler], Awaitable[Server]], client_tls: ssl.SSLContext, raw: bytes, reason: str
) -> None:
    async def broken(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
        writer.close()

    server = await serve(broken)
    pool = Http1Pool()
    with pytest.raises(UpstreamError) as failed:
        async with stream(pool, server, client_tls) as answer:
            await read_bounded(answer, LIMIT, 5.0)
    assert failed.value.reason == reason
    assert pool.idle_count() == 0
    await pool.close()


async def test_an_unframed_answer_serves_a_caller_that_never_reads_it(
    serve: Callable[[Handler], Awaitable[Server]], client_tls: ssl.SSLContext
) -> None:
    async def accepted(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 202 Accepted\r\n\r\n")
        await writer.drain()

    server = await serve(accepted)
    pool = Http1Pool()
    async with stream(pool, server, client_tls, method="POST") as answer:
        assert answer.status == 202
    async with stream(pool, server, client_tls, method="POST") as answer:
        with pytest.raises(UpstreamError, match="without Content-Length or chunked framing"):
            await answer.read()
    assert server.connections == 2 and pool.idle_count() == 0  # never reused: where it ends is unknown
    await pool.close()


async def test_a_stalled_stream_times_out_per_read(
    serve: Callable[[Handler], Awaitable[Server]], client_tls: ssl.SSLContext
) -> None:
    server = await serve(one_event_then_silence)
    pool = Http1Pool()
    async with stream(pool, server, client_tls, read=0.3) as answer:
        assert await answer.read() == b"data: 1\n\n"
        with pytest.raises(TimeoutError):
            await answer.read()
    assert pool.idle_count() == 0
    await pool.close()


async def test_a_long_event_stream_is_not_cut_at_the_buffered_chunk_cap(
    serve: Callable[[Handler], Awaitable[Server]], client_tls: ssl.SSLContext
) -> None:
    events = [f"data: {n}\n\n".encode() for n in range(MAX_CHUNKS + 10)]  # one chunk per event, as SDKs write

    async def chatty(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + b"".join(chunk(event) for event in events) + b"0\r\n\r\n")
        await writer.drain()

    server = await serve(chatty)
    pool = Http1Pool()
    async with stream(pool, server, client_tls) as answer:
        assert await read_all(answer) == b"".join(events)
    await pool.close()


@pytest.mark.parametrize(
    ("head", "readable"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n", True),
        (b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\r\n", True),
        (b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n", False),
        (b"HTTP/1.1 500 Oops\r\nContent-Type: text/plain\r\n\r\n", False),
    ],
    ids=["sse", "sse-http-1.0", "refusal-4xx", "json-200", "5xx"],
)
async def test_answers_that_end_with_the_connection(
    serve: Callable[[Handler], Awaitable[Server]], client_tls: ssl.SSLContext, head: bytes, readable: bool
) -> None:
    """Readable to the connection's end only where a cut body gives nothing a whole one would not (an event
    stream, a 4xx refusal); never pooled."""
    body = b'data: {"n":1}\n\n'

    async def closing(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(head + body)
        await writer.drain()
        writer.close()

    server = await serve(closing)
    pool = Http1Pool()
    async with stream(pool, server, client_tls) as answer:
        if readable:
            assert await read_all(answer) == body
            assert answer.done and not answer.reusable
        else:
            with pytest.raises(UpstreamError, match="without Content-Length or chunked framing"):
                await answer.read()
    assert pool.idle_count() == 0
    await pool.close()


async def test_waiting_for_a_slot_in_a_full_pool_is_bounded(
    serve: Callable[[Handler], Awaitable[Server]], client_tls: ssl.SSLContext
) -> None:
    server = await serve(one_event_then_silence)
    pool = Http1Pool(limit=1)
    async with stream(pool, server, client_tls) as held:  # one stream holds the only slot
        assert await held.read() == b"data: 1\n\n"
        with pytest.raises(TimeoutError):
            async with pool.stream(
                "other", "GET", server.url, client_tls, None, {}, connect_seconds=0.3, read_seconds=5.0
            ):
                raise AssertionError("no slot was free")
    async with stream(pool, server, client_tls) as answer:  # the slot came back with the held stream
        assert await answer.read() == b"data: 1\n\n"
    await pool.close()


async def test_a_trickled_answer_is_bounded_as_a_whole(
    serve: Callable[[Handler], Awaitable[Server]], client_tls: ssl.SSLContext
) -> None:
    """Each byte comes well within the read timeout; the whole body's bound ends it (HOSTILE P16)."""
    stop = asyncio.Event()

    async def trickle(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        while not stop.is_set():
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.05)  # the server's pace is the behaviour under test

    server = await serve(trickle)
    pool = Http1Pool()
    async with stream(pool, server, client_tls, method="POST", read=1.0) as answer:
        with pytest.raises(UpstreamTimeout):
            await read_bounded(answer, LIMIT, 0.4)
    stop.set()
    assert pool.idle_count() == 0
    await pool.close()
