"""The upstream side of ``/mcp/{server}``: compiled MCP servers, the forwarding exchange, and the broker's own
protocol session with each upstream (its tool catalog, for pinning and argument validation).

Everything goes over the MCP gateway's one connection pool (:class:`broker.gateway.http1.Http1Pool`, the broker's
own HTTP/1.1 client, as for ``/v1``: aiohttp's client layers cost ~3x its CPU per call) with the broker's own
certificate (CONTRACT §8), TLS contexts built once per config version (never per call), and upstream connections
kept alive: PERF.md's MCP peer spent its time on a new upstream session and TLS context per call. The broker's
catalog session is opened once and reused: stateless (2026-07-28) when the upstream speaks it, else one
``initialize``d session kept open.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import structlog
from yarl import URL

from broker.canonical import canonicalize, strict_loads
from broker.config.models import Config
from broker.errors import InvalidRequest, UpstreamError, UpstreamTimeout
from broker.gateway.http1 import Http1Pool, Stream
from broker.mcp import jsonrpc as rpc
from broker.mcp.pins import PinBook
from broker.mcp.sse import SseError, SseParser
from broker.tls import upstream_ssl_context, upstream_tls_files
from broker.tracing import HTTP_STATUS, NULL_TRACER, Tracer

if TYPE_CHECKING:
    from broker.runtime import Runtime

log = structlog.get_logger("broker.mcp.upstream")

__all__ = ["Catalog", "Catalogs", "McpUpstream", "ServerTable", "exchange", "read_answer"]

#: upstream JSON nests deeper than agents' arguments (tool input schemas inside a listing)
UPSTREAM_JSON_DEPTH: Final = 64
MAX_CATALOG_PAGES: Final = 16
CLIENT_INFO: Final = {"name": "broker", "version": "1"}
JSON: Final = "application/json"
SSE: Final = "text/event-stream"


@dataclass(frozen=True)
class McpUpstream:
    """One configured MCP server, compiled for one config version."""

    name: str
    url: URL
    ssl_context: ssl.SSLContext
    timeout: float
    connect_timeout: float
    #: configured tool name -> configured digest (None: pinned at first sight)
    digests: Mapping[str, str | None]
    allowed_origins: frozenset[str]
    #: sessions one (subject, actor) may hold on this server; the oldest beyond it is evicted
    max_sessions_per_principal: int = 64
    #: GET streams one (subject, actor) may hold open on this server through this process
    max_streams_per_principal: int = 8


def compile_servers(config: Config) -> dict[str, McpUpstream]:
    contexts: dict[tuple[str, str, str], ssl.SSLContext] = {}
    servers: dict[str, McpUpstream] = {}
    for server in config.mcp_servers:
        files = upstream_tls_files(server.upstream, config)
        if files not in contexts:
            contexts[files] = upstream_ssl_context(ca=files[0], cert=files[1], key=files[2])
        servers[server.name] = McpUpstream(
            name=server.name,
            url=URL(server.upstream.url),
            ssl_context=contexts[files],
            timeout=server.upstream.timeout_seconds,
            connect_timeout=server.upstream.connect_timeout_seconds,
            digests={t.name: t.digest for t in server.tools},
            allowed_origins=frozenset(server.allowed_origins),
            max_sessions_per_principal=server.max_sessions_per_principal,
            max_streams_per_principal=server.max_streams_per_principal,
        )
    return servers


class ServerTable:
    """Compiled MCP servers per loaded runtime: a reload compiles its servers once, on first use (the /v1
    tools' TLS contexts are likewise built per runtime), and requests in flight keep the runtime they began with."""

    def __init__(self) -> None:
        self._compiled: dict[int, tuple[Runtime, dict[str, McpUpstream]]] = {}

    def servers(self, runtime: Runtime) -> dict[str, McpUpstream]:
        found = self._compiled.get(id(runtime))
        if found is not None and found[0] is runtime:
            return found[1]
        try:
            servers = compile_servers(runtime.config)
        except (OSError, ssl.SSLError) as exc:
            log.error("mcp upstream TLS cannot be set up", error=str(exc))
            raise UpstreamError("the MCP server is misconfigured", reason="mcp_upstream_tls") from exc
        while len(self._compiled) >= 4:  # the current runtime and the ones a rollback may return to
            self._compiled.pop(next(iter(self._compiled)))
        self._compiled[id(runtime)] = (runtime, servers)
        return servers


@asynccontextmanager
async def exchange(
    pool: Http1Pool,
    upstream: McpUpstream,
    method: str,
    *,
    headers: Mapping[str, str],
    body: bytes | None = None,
    tracer: Tracer = NULL_TRACER,
) -> AsyncIterator[Stream]:
    """One HTTP exchange with the upstream; connection failures are ``502``/``504`` before anything is relayed.

    The answer's head is read within the server's ``timeout_seconds``, and so is each piece of its body (no
    total: an SSE answer may outlive one read timeout; the relay caps a stream's duration). Leaving the block
    releases the connection: back to the pool when the answer was read to its end, closed otherwise (an agent
    that disconnects mid-stream closes the upstream stream with it). The exchange, relay included, is the
    ``upstream`` span, whose ``traceparent`` the upstream gets (CONTRACT §16)."""
    with tracer.span("upstream") as span:
        forwarded = dict(headers)
        traceparent = tracer.traceparent()
        if traceparent is not None:
            forwarded["traceparent"] = traceparent
        # once open, errors are the relay's (the body's reads are worded by their readers)
        opened = False
        try:
            async with pool.stream(
                upstream.name,
                method,
                upstream.url,
                upstream.ssl_context,
                body,
                forwarded,
                connect_seconds=upstream.connect_timeout,
                read_seconds=upstream.timeout,
            ) as response:
                opened = True
                span.set_attribute(HTTP_STATUS, response.status)
                yield response
        except TimeoutError:
            if opened:
                raise
            raise UpstreamTimeout(
                "the MCP server did not answer in time", reason="upstream_timeout"
            ) from None
        except UpstreamError as exc:
            if opened:
                raise
            raise mcp_worded(exc) from exc


def mcp_worded(exc: UpstreamError) -> UpstreamError:
    """The pool's error (:mod:`broker.gateway.http1` speaks of a tool backend), worded for an MCP server."""
    return UpstreamError(exc.description.replace("the tool backend", "the MCP server"), reason=exc.reason)


async def read_bounded(response: Stream, limit: int, total_seconds: float) -> bytes:
    """The whole body, refused past ``limit`` bytes or ``total_seconds`` (HOSTILE P16: each read is bounded by the
    server's timeout, the whole body by this — a server trickling bytes cannot hold a call open); compressed bodies
    were not asked for."""
    if (response.header("Content-Encoding") or "identity").lower() not in ("identity", ""):
        raise UpstreamError("the MCP server answered compressed", reason="upstream_encoded")
    if response.content_length is not None and response.content_length > limit:
        raise UpstreamError("the MCP server's answer is too large", reason="upstream_too_large")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(total_seconds):
            while chunk := await response.read():
                size += len(chunk)
                if size > limit:
                    raise UpstreamError("the MCP server's answer is too large", reason="upstream_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise UpstreamTimeout("the MCP server did not answer in time", reason="upstream_timeout") from None
    except UpstreamError as exc:
        raise mcp_worded(exc) from exc
    return b"".join(chunks)


def parse_upstream(data: bytes | str) -> Any:
    try:
        return strict_loads(
            data.encode("utf-8") if isinstance(data, str) else data, max_depth=UPSTREAM_JSON_DEPTH
        )
    except InvalidRequest as exc:
        raise UpstreamError("the MCP server sent malformed JSON", reason="upstream_bad_json") from exc


async def read_answer(
    response: Stream, request_id: str | int, limit: int, total_seconds: float
) -> dict[str, Any]:
    """The JSON-RPC response to ``request_id`` from a JSON or SSE answer, read whole (bounded)."""
    body = await read_bounded(response, limit, total_seconds)
    if response.content_type == JSON:
        message = parse_upstream(body)
        if isinstance(message, dict) and message.get("id") == request_id:
            return message
    elif response.content_type == SSE:
        parser = SseParser(max_event_bytes=limit)
        try:
            events = parser.feed(body) + parser.feed(b"\n\n")
        except SseError as exc:
            raise UpstreamError("the MCP server sent a malformed stream", reason=exc.reason) from exc
        for event in events:
            if event.data:
                message = parse_upstream(event.data)
                if isinstance(message, dict) and message.get("id") == request_id and "method" not in message:
                    return message
    raise UpstreamError("the MCP server gave no answer", reason="upstream_no_answer")


@dataclass
class Catalog:
    """The broker's own protocol session with one upstream: it lists the upstream's tools for pinning.

    Tried stateless (2026-07-28) first; an upstream that refuses is spoken to in a kept-open ``initialize``d
    session instead (its session id renewed when the upstream forgets it)."""

    upstream: McpUpstream
    max_bytes: int
    era: Literal["modern", "handshake"] | None = None
    session_id: str | None = None
    version: str = rpc.HANDSHAKE_VERSIONS[-1]
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def list_tools(self, pool: Http1Pool) -> list[dict[str, Any]]:
        """Every tool entry the upstream lists (all pages); raises UpstreamError/UpstreamTimeout."""
        for attempt in range(2):
            try:
                if self.era is None:
                    self.era = "modern" if await self._probe_modern(pool) else "handshake"
                    if self.era == "handshake":
                        await self._initialize(pool)
                return await self._pages(pool)
            except UpstreamError:
                if attempt:
                    raise
                self.era, self.session_id = None, None  # the upstream changed or forgot us: start over
        raise AssertionError("unreachable")

    def _message(self, method: str, params: dict[str, Any], *, notification: bool = False) -> dict[str, Any]:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params}
        if not notification:
            message["id"] = f"broker-catalog-{next(self._ids)}"
        return message

    def _headers(self, method: str) -> dict[str, str]:
        headers = {"Content-Type": JSON, "Accept": f"{JSON}, {SSE}", "Accept-Encoding": "identity"}
        if self.era == "modern":
            headers.update({"MCP-Protocol-Version": rpc.MODERN_VERSIONS[-1], "Mcp-Method": method})
        elif self.era == "handshake" and method != "initialize":
            headers["MCP-Protocol-Version"] = self.version
            if self.session_id is not None:
                headers["Mcp-Session-Id"] = self.session_id
        return headers

    async def _call(self, pool: Http1Pool, message: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        async with exchange(
            pool,
            self.upstream,
            "POST",
            headers=self._headers(message["method"]),
            body=canonicalize(message),
        ) as response:
            if response.status != 200:
                raise UpstreamError("the MCP server refused the catalog request", reason="catalog_refused")
            answer = await read_answer(response, message["id"], self.max_bytes, self.upstream.timeout)
            return answer, response.header("Mcp-Session-Id")

    async def _probe_modern(self, pool: Http1Pool) -> bool:
        self.era = "modern"
        envelope = {rpc.PROTOCOL_VERSION_META: rpc.MODERN_VERSIONS[-1], rpc.CLIENT_CAPABILITIES_META: {}}
        try:
            answer, _ = await self._call(pool, self._message("tools/list", {"_meta": envelope}))
        except UpstreamError:
            return False
        return isinstance(answer.get("result"), dict)

    async def _initialize(self, pool: Http1Pool) -> None:
        params = {
            "protocolVersion": rpc.HANDSHAKE_VERSIONS[-1],
            "capabilities": {},
            "clientInfo": CLIENT_INFO,
        }
        answer, session_id = await self._call(pool, self._message("initialize", params))
        result = answer.get("result")
        if not isinstance(result, dict) or result.get("protocolVersion") not in rpc.HANDSHAKE_VERSIONS:
            raise UpstreamError("the MCP server refused to initialize", reason="catalog_initialize_failed")
        self.version, self.session_id = str(result["protocolVersion"]), session_id
        notification = self._message("notifications/initialized", {}, notification=True)
        async with exchange(
            pool,
            self.upstream,
            "POST",
            headers=self._headers(notification["method"]),
            body=canonicalize(notification),
        ) as response:
            await read_bounded(response, self.max_bytes, self.upstream.timeout)

    async def _pages(self, pool: Http1Pool) -> list[dict[str, Any]]:
        tools: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(MAX_CATALOG_PAGES):
            params: dict[str, Any] = {} if cursor is None else {"cursor": cursor}
            if self.era == "modern":
                params["_meta"] = {
                    rpc.PROTOCOL_VERSION_META: rpc.MODERN_VERSIONS[-1],
                    rpc.CLIENT_CAPABILITIES_META: {},
                }
            answer, _ = await self._call(pool, self._message("tools/list", params))
            result = answer.get("result")
            if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
                raise UpstreamError("the MCP server's tool list is malformed", reason="catalog_malformed")
            tools.extend(t for t in result["tools"] if isinstance(t, dict))
            next_cursor = result.get("nextCursor")
            if not isinstance(next_cursor, str) or not next_cursor:
                return tools
            cursor = next_cursor
        return tools

    async def close(self, pool: Http1Pool) -> None:
        """End the broker's own upstream session (best effort, at shutdown)."""
        if self.era != "handshake" or self.session_id is None:
            return
        try:
            async with exchange(pool, self.upstream, "DELETE", headers=self._headers("DELETE")):
                pass
        except (UpstreamError, UpstreamTimeout) as exc:
            log.info("could not end the catalog session", server=self.upstream.name, reason=exc.reason)


class Catalogs:
    """The broker's catalog sessions, one per upstream URL; one listing at a time per server."""

    def __init__(self) -> None:
        self._catalogs: dict[tuple[str, str], Catalog] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._listed_at: dict[str, float] = {}

    async def refresh(self, pool: Http1Pool, upstream: McpUpstream, pins: PinBook, *, max_bytes: int) -> None:
        """List ``upstream``'s tools and show every configured one to ``pins`` (first sight, or drift)."""
        asked = time.monotonic()
        async with self._locks.setdefault(upstream.name, asyncio.Lock()):
            if self._listed_at.get(upstream.name, 0.0) >= asked:
                return  # listed by someone else while this caller waited
            key = (upstream.name, str(upstream.url))
            catalog = self._catalogs.get(key)
            if catalog is None:
                catalog = self._catalogs[key] = Catalog(upstream, max_bytes=max_bytes)
            catalog.upstream = upstream  # same URL, possibly a reloaded config (TLS context, timeouts)
            entries = await catalog.list_tools(pool)
            now = time.time()
            for entry in entries:
                name = entry.get("name")
                if isinstance(name, str) and name in upstream.digests:
                    await pins.observe(upstream.name, name, upstream.digests[name], entry, now)
            self._listed_at[upstream.name] = time.monotonic()

    async def close(self, pool: Http1Pool) -> None:
        for catalog in list(self._catalogs.values()):
            await catalog.close(pool)
