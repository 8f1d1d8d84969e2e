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

from broker.errors import UpstreamError, UpstreamTimeout
from broker.observability import Metrics
from broker.tracing import HTTP_STATUS, NULL_TRACER, TOOL, Tracer

_JSON_TYPES = ("application/json",)


@dataclass(frozen=True)
class UpstreamTarget:
    """One tool's backend endpoint, compiled at config load (TLS context built once, never per call)."""

    tool: str
    url: URL
    ssl_context: ssl.SSLContext
    timeout: aiohttp.ClientTimeout


@dataclass(frozen=True)
class UpstreamAnswer:
    status: int
    content_type: str
    body: bytes

    def with_body(self, body: bytes) -> UpstreamAnswer:
        return UpstreamAnswer(status=self.status, content_type=self.content_type, body=body)


class Forwarder:
    """Owns nothing: the pooled ClientSession is the app's (``cleanup_ctx``); this only uses it."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        max_response_bytes: int,
        tracer: Tracer = NULL_TRACER,
    ) -> None:
        self._session = session
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
        started = time.perf_counter()
        try:
            async with self._session.post(
                target.url,
                data=body,
                headers=headers,
                ssl=target.ssl_context,
                timeout=target.timeout,
                allow_redirects=False,
            ) as resp:
                content = await self._read_bounded(resp)
                content_type = resp.content_type
                status = resp.status
        except TimeoutError:
            raise UpstreamTimeout(
                "the tool backend did not answer in time", reason="upstream_timeout"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError("the tool backend is unreachable", reason="upstream_connect_failed") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError("the tool backend failed", reason="upstream_protocol_error") from exc
        finally:
            metrics = self._metrics
            metrics.child(metrics.upstream_duration, target.tool).observe(time.perf_counter() - started)
        if content_type not in _JSON_TYPES and not content_type.endswith("+json"):
            raise UpstreamError("the tool backend answered with a non-JSON body", reason="upstream_not_json")
        return UpstreamAnswer(status=status, content_type=content_type, body=content)

    async def _read_bounded(self, resp: aiohttp.ClientResponse) -> bytes:
        # HOSTILE P16: a huge or endless answer must not exhaust memory; compressed answers were not asked for
        # (Accept-Encoding: identity) and are not decoded (auto_decompress=False on the session).
        if resp.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
            raise UpstreamError("the tool backend answered compressed", reason="upstream_encoded")
        limit = self._max_response_bytes
        if resp.content_length is not None and resp.content_length > limit:
            raise UpstreamError("the tool backend's answer is too large", reason="upstream_too_large")
        if resp.content.is_eof():  # all of it arrived with the headers: take it without the read loop
            content = resp.content.read_nowait(limit + 1)
            if len(content) > limit:
                raise UpstreamError("the tool backend's answer is too large", reason="upstream_too_large")
            return content
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(65536):
            size += len(chunk)
            if size > limit:
                raise UpstreamError("the tool backend's answer is too large", reason="upstream_too_large")
            chunks.append(chunk)
        return b"".join(chunks)


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
