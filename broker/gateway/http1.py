"""The upstream HTTP/1.1 client of ``/v1`` forwarding: one POST, one bounded answer, on pooled mTLS connections.

Why not aiohttp's client here: its per-request layers (request and response objects, cookie and redirect
handling, tracing signals, timers) cost ~245 µs of CPU per sequential call on our machines against ~75 µs for
writing the request and reading the answer on a bare TLS stream — the largest piece of glue left on the broker's
hot path (``make bench``: the full pipeline went from ~1,790 to ~1,530 CPU µs per request). The broker needs none
of those layers: it sends one request it built itself (an allow-list of headers, the canonical body) and reads
one answer it will re-frame. aiohttp's session stays for everything else (webhooks, MCP servers, key fetches).

The parser is strict and fails closed, because a lenient one is how answers get desynchronised (HOSTILE P02,
response smuggling): a head must end in CRLF CRLF within :data:`MAX_HEAD_BYTES`; header names are tokens with no
space before the colon; obsolete line folding, NUL/CR in values, a ``Transfer-Encoding`` other than exactly
``chunked``, ``Transfer-Encoding`` together with ``Content-Length``, and disagreeing or malformed
``Content-Length`` values are refused. An answer is read to its framed end, never further: bytes the backend sends
beyond it, or while the connection is idle, make the connection unusable (it is closed, never read by the next
call). What no HTTP/1.1 client can tell apart is a stray answer still in flight when a request is sent — on a
pooled connection, or on a new one whose backend writes before it reads: only the backend itself can cause it,
pools are per tool (what it shifts stays within that tool's calls), and idle connections are reused for at most
:data:`IDLE_SECONDS`. Interim 1xx answers are skipped (at most 8), ``101`` is refused. A connection goes back
to the pool only after a complete HTTP/1.1 answer without ``Connection: close``; everything else — an error, a
timeout, a cancelled call — closes it. POSTs are never retried: the backend may have acted, and the call's txn
token is single-use.

The same pool serves MCP servers (:meth:`Http1Pool.stream`, one pool of its own: an SSE stream holds its
connection for as long as it runs): the answer's head is read at once and its body piece by piece as it comes,
each wait bounded, with the same framing rules; reads from the server pause while more than
:data:`STREAM_HIGH_WATER` bytes wait unread (an agent that reads slower than its MCP server writes).

Pure parts (:func:`parse_head`, :class:`Chunked`) are tested without sockets.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, TypeVar, cast

from yarl import URL

from broker.errors import UpstreamError, UpstreamTimeout

_D = TypeVar("_D", str, None)
MAX_HEAD_BYTES: Final = 64 * 1024
MAX_HEADERS: Final = 128
MAX_CHUNK_LINE: Final = 1024
MAX_INTERIM: Final = 8
#: a body in more chunks than this is refused: each costs a few µs of the event loop (~128 B average at 8 MiB)
MAX_CHUNKS: Final = 65536
#: idle pooled connections older than this are closed instead of reused (servers' keep-alive is usually longer)
IDLE_SECONDS: Final = 15.0
#: a streamed answer's connection stops reading past this many unread bytes, and reads again below a quarter of it
STREAM_HIGH_WATER: Final = 256 * 1024
SSE_TYPE: Final = "text/event-stream"

_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
#: a field line: a token name, a colon, the value (controls are refused before; whitespace stripped after — a
#: lazy value with a trailing-whitespace group would backtrack quadratically over a long run of blanks)
_FIELD: Final = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):(.*)")


def _has_control(field: bytes) -> bool:
    # CR, LF, NUL: what could end a line for another parser (HTAB and obs-text are allowed, RFC 9110 §5.5)
    return b"\r" in field or b"\n" in field or b"\x00" in field


def protocol_error(why: str) -> UpstreamError:
    return UpstreamError(f"the tool backend failed ({why})", reason="upstream_protocol_error")


def too_large() -> UpstreamError:
    return UpstreamError("the tool backend's answer is too large", reason="upstream_too_large")


@dataclass(frozen=True, slots=True)
class Head:
    """A parsed response head. ``length``: the Content-Length, or None; ``chunked``: Transfer-Encoding chunked."""

    status: int
    http11: bool
    #: lower-cased names, values stripped of optional whitespace, in order
    headers: tuple[tuple[str, str], ...]
    length: int | None
    chunked: bool
    close: bool  #: ``Connection: close`` (or HTTP/1.0): the connection ends with this answer

    def get(self, name: str, default: _D = "") -> str | _D:  # type: ignore[assignment]
        return next((value for key, value in self.headers if key == name), default)


def parse_head(raw: bytes) -> Head:
    """The head of one answer (without its final CRLF CRLF); UpstreamError(upstream_protocol_error) if malformed."""
    lines = raw.split(b"\r\n")
    breaks = len(lines) - 1
    # CR, LF and NUL anywhere but in the CRLFs between lines (one scan of the whole head, not one per line)
    if raw.count(b"\r") != breaks or raw.count(b"\n") != breaks or b"\x00" in raw:
        raise protocol_error("control character in the answer head")
    status_line = lines[0]
    if status_line[:7] != b"HTTP/1." or status_line[7:8] not in (b"0", b"1"):
        raise protocol_error("not an HTTP/1.x answer")
    code = status_line[9:12]
    if (
        status_line[8:9] != b" "
        or len(code) != 3
        or not code.isdigit()
        or status_line[12:13] not in (b"", b" ")
        or int(code) < 100
    ):
        raise protocol_error("malformed status line")
    http11 = status_line[7:8] == b"1"
    if breaks > MAX_HEADERS:
        raise protocol_error("too many header fields")
    headers: list[tuple[str, str]] = []
    lengths: set[bytes] = set()
    codings: list[bytes] = []
    connection: list[bytes] = []
    for line in lines[1:]:
        field = _FIELD.fullmatch(line)
        if field is None:
            # no colon, an empty name, a space before the colon, or a folded line (starts with SP/HTAB)
            raise protocol_error("malformed header field")
        name, value = field.groups()
        value = value.strip(b" \t")
        lowered = name.lower()
        if lowered == b"content-length":
            lengths.update(part.strip(b" \t") for part in value.split(b","))
        elif lowered == b"transfer-encoding":
            codings.extend(part.strip(b" \t").lower() for part in value.split(b","))
        elif lowered == b"connection":
            connection.extend(part.strip(b" \t").lower() for part in value.split(b","))
        headers.append((lowered.decode("ascii"), value.decode("latin-1")))
    if codings and lengths:
        raise protocol_error("both Transfer-Encoding and Content-Length")
    if codings and codings != [b"chunked"]:
        raise protocol_error("a transfer coding other than chunked")
    length: int | None = None
    if lengths:
        if len(lengths) != 1:
            raise protocol_error("disagreeing Content-Length values")
        (text,) = lengths
        if not text.isdigit() or len(text) > 18:
            raise protocol_error("malformed Content-Length")
        length = int(text)
    return Head(
        status=int(code),
        http11=http11,
        headers=tuple(headers),
        length=length,
        chunked=bool(codings),
        close=not http11 or b"close" in connection,
    )


class Chunked:
    """Decodes a chunked body from a buffer as it fills (RFC 9112 §7.1): :meth:`step` consumes what it can and
    returns True once the last chunk and the trailer section have been read. Extensions and trailers are
    skipped (bounded); ``limit`` bounds the decoded size, ``max_chunks`` the number of chunks (a buffered answer's;
    a stream is bounded by its reader's byte and time caps instead, and an SSE server writes a chunk per event)."""

    __slots__ = ("_chunks", "_remaining", "_state", "_trailer", "body", "limit", "max_chunks", "total")

    def __init__(self, limit: int, max_chunks: int = MAX_CHUNKS) -> None:
        self.limit = limit
        self.max_chunks = max_chunks
        #: decoded bytes not yet taken; a streaming reader empties it as it goes (``limit`` bounds ``total``)
        self.body = bytearray()
        self.total = 0
        self._state = "size"  # size | data | crlf | trailer
        self._remaining = 0
        self._trailer = 0
        self._chunks = 0

    def step(self, buffer: bytearray) -> bool:
        while True:
            if self._state == "size":
                end = buffer.find(b"\r\n", 0, MAX_CHUNK_LINE + 2)
                if end < 0:
                    if len(buffer) > MAX_CHUNK_LINE:
                        raise protocol_error("chunk size line too long")
                    return False
                line = bytes(buffer[:end])
                del buffer[: end + 2]
                if _has_control(line):  # a bare LF or a NUL in a size line or its extensions (HOSTILE P04)
                    raise protocol_error("control character in a chunk size line")
                size = line.split(b";", 1)[0].rstrip(b" \t")
                self._chunks += 1
                if self._chunks > self.max_chunks:
                    raise protocol_error("too many chunks")
                if not size or len(size) > 16 or not _HEX.issuperset(size):
                    raise protocol_error("malformed chunk size")
                self._remaining = int(size, 16)
                if self.total + self._remaining > self.limit:
                    raise too_large()
                self.total += self._remaining
                self._state = "data" if self._remaining else "trailer"
            elif self._state == "data":
                if not buffer:
                    return False
                taken = buffer[: self._remaining]
                self.body += taken
                del buffer[: len(taken)]
                self._remaining -= len(taken)
                if self._remaining:
                    return False
                self._state = "crlf"
            elif self._state == "crlf":
                if len(buffer) < 2:
                    return False
                if buffer[:2] != b"\r\n":
                    raise protocol_error("chunk not followed by CRLF")
                del buffer[:2]
                self._state = "size"
            else:  # trailer: field lines until an empty one
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise protocol_error("trailer section too large")
                    return False
                self._trailer += end + 2
                if self._trailer > MAX_HEAD_BYTES:
                    raise protocol_error("trailer section too large")
                if _has_control(bytes(buffer[:end])):
                    raise protocol_error("control character in a trailer field")
                del buffer[: end + 2]
                if end == 0:
                    return True


class _Connection(asyncio.Protocol):
    """One upstream connection: bytes in a buffer, and a waiter woken by data, EOF or loss."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.busy = False
        #: a streamed answer is being read: reading pauses past STREAM_HIGH_WATER unread bytes (see :meth:`taken`)
        self.streaming = False
        self.paused = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both have write/close/is_closing
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:  # a backend talking out of turn: nothing it sends now may be read as an answer
            self.close()
        elif self.streaming and not self.paused and len(self.buffer) > STREAM_HIGH_WATER:
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def taken(self) -> None:
        """The reader took bytes from the buffer: a paused stream reads again once most of it is gone."""
        if self.paused and len(self.buffer) <= STREAM_HIGH_WATER // 4 and self.usable:
            self.paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def more(self) -> None:
        """Wait for more bytes (or EOF: then ``eof`` is True)."""
        if self.eof:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    @property
    def usable(self) -> bool:
        return not self.eof and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        """Drop the connection at once: no TLS close_notify exchange a backend could hold open (it would linger
        for the loop's 30 s SSL shutdown timeout); nothing of it is ever read again."""
        self.eof = True
        if self.transport is not None:
            self.transport.abort()


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str  #: the media type, lower-cased, without parameters ("" when absent)
    content_encoding: str
    body: bytes


async def _read_head(conn: _Connection) -> Head:
    """Read the head of the final answer (interim 1xx answers skipped) from ``conn``."""
    buffer = conn.buffer
    for _ in range(MAX_INTERIM + 1):
        scanned = 0  # where the next search starts: a trickled head is not searched again from its first byte
        while (end := buffer.find(b"\r\n\r\n", scanned)) < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                raise protocol_error("answer head too large")
            if buffer.find(b"\n\n", max(0, scanned - 1)) >= 0:
                raise protocol_error("bare LF line endings")  # refused now, not after the whole timeout
            if conn.eof:
                raise protocol_error(
                    "the connection closed before an answer" if not buffer else "truncated head"
                )
            scanned = max(0, len(buffer) - 3)
            await conn.more()
        if end > MAX_HEAD_BYTES:
            raise protocol_error("answer head too large")
        head = parse_head(bytes(buffer[:end]))
        del buffer[: end + 4]
        if head.status == 101:
            raise protocol_error("a protocol switch")
        if head.status >= 200:
            return head
    raise protocol_error("too many interim answers")


def _bodiless(head: Head) -> bool:
    """No body, whatever Content-Length says (RFC 9112 §6.3)."""
    return head.status in (204, 304)


def _unframed() -> UpstreamError:
    # Delimited by the end of the connection: refused. A cut (a FIN without close_notify, a reset) cannot be
    # told from the end of such a body through the transport API, and a truncated answer must never pass as
    # a complete one. Backends frame their answers: aiohttp, uvicorn, Go and Java servers send a length or
    # chunks for every JSON answer and every event stream.
    return protocol_error("an answer without Content-Length or chunked framing")


def _media_type(head: Head) -> str:
    return head.get("content-type").split(";", 1)[0].strip().lower()


async def _read_answer(conn: _Connection, limit: int) -> tuple[Answer, bool]:
    """Read one answer from ``conn``; (answer, reusable)."""
    head = await _read_head(conn)
    buffer = conn.buffer
    if _bodiless(head):
        body = b""
    elif head.length is not None and head.length > limit:
        raise too_large()
    elif head.chunked:
        decoder = Chunked(limit)
        while not decoder.step(buffer):
            if conn.eof:
                raise protocol_error("truncated chunked body")
            await conn.more()
        body = bytes(decoder.body)
    elif head.length is not None:
        while len(buffer) < head.length:
            if conn.eof:
                raise protocol_error("truncated body")
            await conn.more()
        body = bytes(buffer[: head.length])
        del buffer[: head.length]
    else:
        raise _unframed()
    # bytes beyond the answer's end: the next call must never read them
    reusable = not head.close and not buffer and conn.usable
    encoding = head.get("content-encoding", "identity").strip().lower()
    return Answer(head.status, _media_type(head), encoding, body), reusable


class Stream:
    """An answer whose body is read as it comes (:meth:`Http1Pool.stream`): :meth:`read` returns the next piece
    of the body, ``b""`` at its end. Each wait for bytes is bounded by ``read_seconds`` (TimeoutError); a
    malformed or cut body raises UpstreamError(upstream_protocol_error)."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_read_seconds",
        "_remaining",
        "_unframed",
        "_until_close",
        "done",
        "head",
        "status",
    )

    def __init__(self, conn: _Connection, head: Head, read_seconds: float) -> None:
        self.head = head
        self.status = head.status
        self._conn = conn
        self._read_seconds = read_seconds
        self._chunked = Chunked(sys.maxsize, sys.maxsize) if head.chunked and not _bodiless(head) else None
        self._remaining = 0 if _bodiless(head) else head.length or 0
        unframed = not _bodiless(head) and not head.chunked and head.length is None
        #: the body was read to its end (framed: the connection may then serve another request)
        self.done = self._chunked is None and not self._remaining and not unframed
        # Without framing the body ends with the connection, so a cut cannot be told from its end. That is
        # harmless where nothing is taken from a cut body that a whole one would not give: an event stream (an
        # event counts only once its blank line came; an answer that never came is "cut short") and a refusal
        # (4xx: only its JSON-RPC error code is read, and a cut body reads as none). Anything else is refused
        # when read (a 202 nobody reads is served). The connection is never reused either way.
        self._until_close = unframed and (_media_type(head) == SSE_TYPE or 400 <= head.status < 500)
        self._unframed = unframed and not self._until_close

    @property
    def reusable(self) -> bool:
        """Read to its framed end on a connection that stays open: it may serve the next request."""
        conn = self._conn
        return (
            self.done
            and not self._until_close
            and not self.head.close
            and not conn.buffer
            and not conn.paused
            and conn.usable
        )

    def header(self, name: str) -> str | None:
        """The first value of the field ``name`` (any case), or None."""
        return self.head.get(name.lower(), None)

    @property
    def content_type(self) -> str:
        """The media type, lower-cased, without parameters ("" when absent)."""
        return _media_type(self.head)

    @property
    def content_length(self) -> int | None:
        return self.head.length

    async def read(self) -> bytes:
        if self._unframed:
            raise _unframed()
        conn = self._conn
        while not self.done:
            buffer = conn.buffer
            if self._chunked is not None:
                self.done = self._chunked.step(buffer)
                piece = bytes(self._chunked.body)
                self._chunked.body.clear()
            elif self._until_close:
                piece = bytes(buffer)
                buffer.clear()
                self.done = not piece and conn.eof
            else:
                piece = bytes(buffer[: self._remaining])
                del buffer[: len(piece)]
                self._remaining -= len(piece)
                self.done = not self._remaining
            conn.taken()
            if piece:
                return piece
            if self.done:
                break
            if conn.eof:
                raise protocol_error("truncated body")
            async with asyncio.timeout(self._read_seconds):
                await conn.more()
        return b""


def request_bytes(url: URL, body: bytes | None, headers: Mapping[str, str], *, method: str = "POST") -> bytes:
    """``method`` of ``body`` to ``url`` with exactly ``headers`` (plus Host, and Content-Length with a body)."""
    lines = [f"{method} {url.raw_path_qs} HTTP/1.1", f"Host: {url.host_port_subcomponent}"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} holds a line break")  # the broker's own headers: a bug
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


#: a pool key: (tool, host, port, id of the TLS context) — one tool's connections are never another's
_Key = tuple[str, str, int, int]


def _key(name: str, url: URL, ssl_context: ssl.SSLContext) -> _Key:
    host = (url.raw_host or "").rstrip(".")  # as in the Host header (IDNA 2008); no trailing dot in SNI
    return (name, host, url.port or 443, id(ssl_context))


def _send(conn: _Connection, data: bytes) -> None:
    if not conn.usable or conn.buffer:  # it spoke before being asked, or closed: nothing here answers us
        raise protocol_error("the backend spoke before the request")
    conn.busy = True
    assert conn.transport is not None
    conn.transport.write(data)


class Http1Pool:
    """Keep-alive connections per tool and backend; at most ``limit`` calls at once (the others wait).

    Per tool, not per backend: should a backend ever answer out of turn on a pooled connection (module docstring),
    the answer it shifts stays within one tool's calls — never an unfiltered tool reading a filtered one's."""

    def __init__(self, *, limit: int = 256, idle_seconds: float = IDLE_SECONDS) -> None:
        self.idle_seconds = idle_seconds
        self._idle: dict[_Key, deque[_Connection]] = {}
        self._slots = asyncio.Semaphore(limit)
        self._closed = False
        self._swept = time.monotonic()

    async def post(
        self,
        tool: str,
        url: URL,
        ssl_context: ssl.SSLContext,
        body: bytes,
        headers: Mapping[str, str],
        *,
        total_seconds: float,
        connect_seconds: float,
        limit: int,
    ) -> Answer:
        """POST ``body`` to ``url`` for ``tool`` and read the answer (at most ``limit`` body bytes).

        UpstreamTimeout past ``total_seconds`` (the whole call) or ``connect_seconds``; UpstreamError for a
        connection that cannot be made or fails, and for a malformed or too large answer."""
        data = request_bytes(url, body, headers)
        key = _key(tool, url, ssl_context)
        try:
            async with asyncio.timeout(total_seconds), self._slots:
                conn = await self._connection(key, ssl_context, connect_seconds)
                return await self._exchange(conn, key, data, limit)
        except TimeoutError:
            raise UpstreamTimeout(
                "the tool backend did not answer in time", reason="upstream_timeout"
            ) from None

    async def _exchange(self, conn: _Connection, key: _Key, data: bytes, limit: int) -> Answer:
        reusable = False
        try:
            _send(conn, data)
            answer, reusable = await _read_answer(conn, limit)
            return answer
        finally:
            self._release(conn, key, reusable)

    @asynccontextmanager
    async def stream(
        self,
        name: str,
        method: str,
        url: URL,
        ssl_context: ssl.SSLContext,
        body: bytes | None,
        headers: Mapping[str, str],
        *,
        connect_seconds: float,
        read_seconds: float,
    ) -> AsyncIterator[Stream]:
        """Send one request for ``name`` (the pool key's first part) and yield its answer once its head is read;
        the body is the caller's to read (:meth:`Stream.read`). Leaving the block puts the connection back when
        the body was read to its end, and closes it otherwise (a caller that stops reading early, an error, a
        cancellation). TimeoutError past ``connect_seconds`` for a free slot (the pool's ``limit`` counts open
        streams) and again to connect, or ``read_seconds`` for the head; UpstreamError as :meth:`post`. No total
        bound: a stream may outlive ``read_seconds`` (the caller caps it)."""
        data = request_bytes(url, body, headers, method=method)
        key = _key(name, url, ssl_context)
        # a full pool (open streams) is waited for, within bounds
        async with asyncio.timeout(connect_seconds):
            await self._slots.acquire()
        try:
            conn = await self._connection(key, ssl_context, connect_seconds)
            stream: Stream | None = None
            try:
                _send(conn, data)
                conn.streaming = True
                async with asyncio.timeout(read_seconds):
                    head = await _read_head(conn)
                stream = Stream(conn, head, read_seconds)
                yield stream
            finally:
                conn.streaming = False
                self._release(conn, key, stream is not None and stream.reusable)
        finally:
            self._slots.release()

    def _release(self, conn: _Connection, key: _Key, reusable: bool) -> None:
        conn.busy = False
        if reusable and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(key, deque()).append(conn)
        else:
            conn.close()

    async def _connection(
        self, key: _Key, ssl_context: ssl.SSLContext, connect_seconds: float
    ) -> _Connection:
        now = time.monotonic()
        if now - self._swept > self.idle_seconds:
            self._sweep(now)
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed by the server
            if conn.usable and not conn.buffer and now - conn.idle_since < self.idle_seconds:
                return conn
            conn.close()
        if self._closed:
            raise UpstreamError("the broker is shutting down", reason="upstream_connect_failed")
        _, host, port, _ = key
        async with asyncio.timeout(connect_seconds):  # TimeoutError: upstream_timeout, as for the whole call
            try:
                _, conn = await asyncio.get_running_loop().create_connection(
                    _Connection, host, port, ssl=ssl_context, server_hostname=host
                )
            except (OSError, ssl.SSLError) as exc:
                raise UpstreamError(
                    "the tool backend is unreachable", reason="upstream_connect_failed"
                ) from exc
        return conn

    def _sweep(self, now: float) -> None:
        """Close idle connections past ``idle_seconds`` (oldest first in each queue) and forget empty keys —
        those of TLS contexts a reload replaced too."""
        self._swept = now
        for key in list(self._idle):
            idle = self._idle[key]
            while idle and (now - idle[0].idle_since >= self.idle_seconds or not idle[0].usable):
                idle.popleft().close()
            if not idle:
                del self._idle[key]

    def idle_count(self) -> int:
        """How many connections are pooled now (idle, reusable)."""
        return sum(len(idle) for idle in self._idle.values())

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports go
