"""Reading a request: identity's view of it, and its body, bounded in size and time. The only request-bound
helpers of the pipeline's transports; everything after them takes values (``broker.gateway.pipeline``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from broker.canonical import strict_loads
from broker.config.models import Limits
from broker.context import CTX
from broker.errors import BrokerError, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from broker.identity.peer import RequestView
from broker.identity.principal import Principal
from broker.resources import RUNTIME, TRACER
from broker.runtime import Runtime


def runtime_of(request: web.Request) -> Runtime:
    return request.app[RUNTIME].current


async def authenticate(request: web.Request, runtime: Runtime, *, require_actor: bool = True) -> Principal:
    """Identity (broker.identity.principal has its own order); the identities land in the request record."""
    ctx = request[CTX]
    with request.app[TRACER].span("identity"):
        try:
            principal = await runtime.authenticator.authenticate(
                RequestView.of(request), now=time.time(), require_actor=require_actor
            )
        except BrokerError as exc:
            ctx.subject = exc.verified_subject  # a genuine token's refusal is recorded in full (§15)
            raise
    ctx.actor, ctx.subject = principal.actor, principal.subject
    return principal


async def read_json_body(request: web.Request, limits: Limits) -> Any:
    """The request body as strict JSON (HOSTILE P15, P17–P19), bounded before and while reading."""
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise UnsupportedMediaType("compressed request bodies are not accepted", reason="body_encoded")
    if request.content_type != "application/json" or request.charset not in (None, "utf-8"):
        raise UnsupportedMediaType("send the arguments as application/json (UTF-8)", reason="body_not_json")
    return strict_loads(await read_body(request, limits), max_depth=limits.max_json_depth)


async def read_body(request: web.Request, limits: Limits) -> bytes:
    """The body, bounded in size and in time (a slow-body client cannot hold a handler: HOSTILE P14)."""
    limit = limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes", reason="body_too_large")
    if request.content.is_eof():  # all of it arrived with the headers (a small call): no wait, so no timer
        body = request.content.read_nowait(limit + 1)
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes", reason="body_too_large")
        return body
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(runtime_of(request).config.server.request_timeout_seconds):
            # read() returns what has arrived so far (b"" only at the end): loop until the end or the limit
            while chunk := await request.content.read(limit + 1 - size):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(
                        f"request body is larger than {limit} bytes", reason="body_too_large"
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout("the request body did not arrive in time", reason="body_timeout") from None
    return b"".join(chunks)
