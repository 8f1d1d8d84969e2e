"""Execution: send a permitted call to its tool backend and bring back a bounded answer.

The upstream request is built from scratch (an allow-list, not a copy of the agent's headers): nothing the agent
sent — ``Authorization``, ``DPoP``, cookies, hop-by-hop or ``X-Forwarded-*`` headers (HOSTILE P06–P09) — can
reach the backend. The body is the canonical re-serialisation of the validated arguments, i.e. exactly the bytes
whose digest the decision (and later the txn token) was made on (HOSTILE T04).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from yarl import URL

from broker.errors import UpstreamError
from broker.gateway.http1 import Http1Pool
from broker.observability import Metrics
from broker.tracing import HTTP_STATUS, NULL_TRACER, TOOL, Tracer

_JSON_TYPES = ("application/json",)


@dataclass(frozen=True)
class UpstreamTarget:
    """One tool's backend endpoint, compiled at config load (TLS context built once, never per call)."""

    tool: str
    url: URL
    ssl_context: ssl.SSLContext
    timeout_seconds: float  #: the whole call, connecting included
    connect_timeout_seconds: float


@dataclass(frozen=True)
class UpstreamAnswer:
    status: int
    content_type: str
    body: bytes

    def with_body(self, body: bytes) -> UpstreamAnswer:
        return UpstreamAnswer(status=self.status, content_type=self.content_type, body=body)


class Forwarder:
    """Owns nothing: the upstream connection pool is the app's (``cleanup_ctx``); this only uses it."""

    def __init__(
        self,
        pool: Http1Pool,
        metrics: Metrics,
        *,
        max_response_bytes: int,
        tracer: Tracer = NULL_TRACER,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._max_response_bytes = max_response_bytes
        self._tracer = tracer

    async def call(self, target: UpstreamTarget, body: bytes, headers: dict[str, str]) -> UpstreamAnswer:
        """The upstream call in its own span; the backend gets that span's ``traceparent`` (CONTRACT §16)."""
        with self._tracer.span("upstream") as span:
            span.set_attribute(TOOL, target.tool)  # a configured name
            traceparent = self._tracer.traceparent()
            if traceparent is not None:
                headers = {**headers, "traceparent": traceparent}
            answer = await self._post(target, body, headers)
            span.set_attribute(HTTP_STATUS, answer.status)
            return answer

    async def _post(self, target: UpstreamTarget, body: bytes, headers: dict[str, str]) -> UpstreamAnswer:
        # HOSTILE P16: the answer is bounded (max_response_bytes, checked against Content-Length before reading);
        # compression was not asked for (Accept-Encoding: identity) and an encoded answer is refused, not decoded.
        started = time.perf_counter()
        try:
            answer = await self._pool.post(
                target.tool,
                target.url,
                target.ssl_context,
                body,
                headers,
                total_seconds=target.timeout_seconds,
                connect_seconds=target.connect_timeout_seconds,
                limit=self._max_response_bytes,
            )
        finally:
            metrics = self._metrics
            metrics.child(metrics.upstream_duration, target.tool).observe(time.perf_counter() - started)
        if answer.content_encoding not in ("identity", ""):
            raise UpstreamError("the tool backend answered compressed", reason="upstream_encoded")
        content_type = answer.content_type
        if content_type not in _JSON_TYPES and not content_type.endswith("+json"):
            raise UpstreamError("the tool backend answered with a non-JSON body", reason="upstream_not_json")
        return UpstreamAnswer(status=answer.status, content_type=content_type, body=answer.body)


def upstream_headers(
    *, request_id: str, traceparent: str, extra: dict[str, str] | None = None
) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Accept-Encoding": "identity",
        "X-Request-Id": request_id,
        "traceparent": traceparent,
    }
    if extra:
        headers.update(extra)
    return headers


def json_response(answer: UpstreamAnswer, request_id: str) -> web.Response:
    """The backend's JSON (already filtered by the caller) with only the headers we choose."""
    return web.Response(
        status=answer.status,
        body=answer.body,
        content_type="application/json",
        headers={"X-Request-Id": request_id, "Cache-Control": "no-store"},
    )


def client_session(*, limit: int = 256) -> aiohttp.ClientSession:
    """The one pooled upstream session: no cookies, no auto-decompression, no env proxies."""
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
        skip_auto_headers=("User-Agent",),
    )


async def close_session(session: aiohttp.ClientSession) -> None:
    await session.close()
    # let the SSL transports finish closing (aiohttp's documented graceful-close pause)
    await asyncio.sleep(0)
