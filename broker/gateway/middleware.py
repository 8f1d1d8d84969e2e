"""The one middleware around every main-listener request: request id, limits, error rendering, audit, metrics.

Why one: every refusal must be rendered the same way (CONTRACT §8 JSON body, RFC 6750/9449 ``WWW-Authenticate``)
*and* written to the audit log before the client sees it (CONTRACT §9: no decision is acknowledged before its
record is written). Stages only raise :class:`~broker.errors.BrokerError`; they never build error responses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from broker.context import CTX, TRACEPARENT, RequestContext
from broker.errors import (
    ApprovalRequired,
    AuditUnavailable,
    BrokerError,
    HeadersTooLarge,
    InsufficientUserAuthentication,
    InvalidClient,
    InvalidDpopProof,
    InvalidRequest,
    InvalidToken,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ShuttingDown,
    UseDpopNonce,
)
from broker.gateway.services import audit_decision as pipeline_audit
from broker.gateway.services import audit_outcome
from broker.identity.peer import peer_actor, peer_certificate
from broker.observability import client_request_id, new_request_id, traceparent_for
from broker.resources import DRAINING, METRICS, NOISE, RUNTIME, SERVICES
from broker.runtime import Challenge

log = structlog.get_logger("broker.request")
access_log = structlog.get_logger("broker.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_AUTH_ERRORS = (InvalidClient, InvalidToken, InvalidDpopProof, UseDpopNonce)


def decision_for(error: BrokerError) -> str:
    """The audit ``decision`` of a refusal (CONTRACT §9)."""
    if isinstance(error, ApprovalRequired):
        return "pending"
    if isinstance(error, InsufficientUserAuthentication | UseDpopNonce):
        return "step_up"
    return "error" if error.status >= 500 else "deny"


def _quote(value: str) -> str:
    # RFC 9110 §5.6.4 quoted-string: escape backslash and double quote; descriptions are ours, ASCII.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenge_header(error: BrokerError, challenge: Challenge) -> str:
    params = {"error": error.code, "error_description": error.description, **error.challenge_params}
    params["algs"] = challenge.algs
    params["resource_metadata"] = challenge.resource_metadata
    return f"{error.challenge} " + ", ".join(f"{k}={_quote(v)}" for k, v in params.items())


def error_response(
    error: BrokerError, request_id: str, *, challenge: Challenge | None = None
) -> web.Response:
    headers = {"X-Request-Id": request_id, "Cache-Control": "no-store", **error.headers}
    if error.challenge and challenge is not None:
        headers["WWW-Authenticate"] = challenge_header(error, challenge)
    return web.json_response(error.body(request_id), status=error.status, headers=headers)


async def audit_decision(app: web.Application, ctx: RequestContext) -> None:
    """Write this request's decision record; raises AuditUnavailable if it cannot be written."""
    await pipeline_audit(app[SERVICES], ctx)


async def record_refusal(
    app: web.Application,
    ctx: RequestContext,
    error: BrokerError,
    *,
    anonymous: bool = False,
    client_address: str | None = None,
) -> BrokerError:
    """Record a refusal (both transports): its decision, reason and code in the request record and, unless the
    request was already audited as refused, in the audit log. Returns the error to answer with: ``error``, or
    AuditUnavailable when its record could not be written (nothing is acknowledged unaudited).

    ``anonymous``: refused before identity (:func:`_before_identity`): counted in a ``summary`` record per
    reason and client network instead (CONTRACT §15). A forwarded call's refusal (the upstream failed, its answer
    was refused) is its ``outcome`` record, written by :func:`record_outcome` with the bytes the agent gets."""
    ctx.code = error.code
    if ctx.outcome is not None and not ctx.outcome.recorded:
        ctx.outcome.fail(error.reason)
        ctx.decision, ctx.reason = decision_for(error), error.reason
    # An outcome after an audited allow (upstream failed) is a new record: the earlier one said "forwarded".
    elif not ctx.audited or ctx.decision == "allow":
        ctx.decision = decision_for(error)
        ctx.reason = error.reason
        if ctx.event is not None and anonymous:
            app[NOISE].count(error.reason, client_address)
        elif ctx.event is not None:
            try:
                await audit_decision(app, ctx)
            except AuditUnavailable as audit_error:
                ctx.status, ctx.code = audit_error.status, audit_error.code
                return audit_error
    if isinstance(error, _AUTH_ERRORS):
        app[METRICS].auth_failures.labels(reason=error.reason).inc()
    log.info("refused", code=error.code, reason=error.reason, status=error.status)
    return error


def _check_header_size(request: web.Request, limit: int) -> None:
    size = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
    if size > limit:
        raise HeadersTooLarge("request headers are too large", reason="headers_too_large")


#: refusals after which the connection is closed: what follows on it cannot be trusted to be a request
_CLOSE_AFTER = frozenset({"transfer_encoding_not_chunked", "upgrade_refused", "http_body_framing"})


def _check_framing(request: web.Request) -> None:
    """CONTRACT §12 HTTP edges, HOSTILE P02/P06: framing the broker re-frames itself, never guesses at.

    ``Transfer-Encoding`` must be absent or exactly one ``chunked`` (transfer-coding names are case-insensitive,
    RFC 9112 §7; the parser already trimmed the surrounding whitespace): ``gzip, chunked`` — which the parser
    accepts as chunked — or ``chunked, identity`` is refused. So is every request asking to switch protocols:
    an ``Upgrade`` header, ``upgrade`` among the ``Connection`` options, or ``CONNECT`` (after which aiohttp
    stops parsing the connection as HTTP)."""
    codings = request.headers.getall("Transfer-Encoding", [])
    if codings and (len(codings) != 1 or codings[0].lower() != "chunked"):
        raise InvalidRequest(
            "Transfer-Encoding must be exactly chunked", reason="transfer_encoding_not_chunked"
        )
    options = {
        token.strip().lower()
        for value in request.headers.getall("Connection", [])
        for token in value.split(",")
    }
    if "Upgrade" in request.headers or "upgrade" in options or request.method == "CONNECT":
        raise InvalidRequest("protocol upgrades are not supported", reason="upgrade_refused")


@web.middleware
async def broker_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    app = request.app
    drain = app[DRAINING]
    if drain.draining:
        # nothing decided, nothing forwarded: the client retries elsewhere (the load balancer drains us)
        error = ShuttingDown("the broker is shutting down; retry", reason="shutting_down")
        response = error_response(error, new_request_id())
        response.headers["Connection"] = "close"
        response.headers["Retry-After"] = "1"
        return response
    drain.enter()
    try:
        return await _handle(request, handler)
    finally:
        drain.leave()


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    app = request.app
    runtime = app[RUNTIME].current
    ctx = RequestContext(
        request_id=new_request_id(), client_request_id=client_request_id(request.headers.get("X-Request-Id"))
    )
    ctx.policy_version = runtime.policy_version
    # the server span's when tracing is on (broker.otel), so audit, logs and spans share one trace id
    ctx.traceparent = request.get(TRACEPARENT) or traceparent_for(request.headers.get("traceparent"))
    request[CTX] = ctx
    structlog.contextvars.bind_contextvars(request_id=ctx.request_id, trace_id=ctx.trace_id)
    if ctx.client_request_id is not None:
        structlog.contextvars.bind_contextvars(client_request_id=ctx.client_request_id)
    response: web.StreamResponse
    try:
        try:
            _check_header_size(request, runtime.limits.max_header_bytes)
            _check_framing(request)
            response = await handler(request)
            if ctx.outcome is not None:
                response = await record_outcome(request, ctx, response)
            ctx.status = response.status
            if ctx.decision is None:
                ctx.decision = "allow"
        except BrokerError as error:
            response = await _refuse(request, ctx, error, runtime.challenge)
            if error.reason in _CLOSE_AFTER:
                response.force_close()
        except HttpProcessingError:
            # the parser refused the body while it was read (a bad chunk, a truncated body): 400, then close
            framing = InvalidRequest("the request body is not validly framed", reason="http_body_framing")
            response = await _refuse(request, ctx, framing, runtime.challenge)
            response.force_close()
        except web.HTTPException as exc:
            # aiohttp's own routing answers (404 for unknown paths, 405): JSON like everything else
            response = await _refuse(request, ctx, _from_http_exception(exc), runtime.challenge)
        except Exception:
            # A bug, not a decision: still audited and rendered as JSON, never a forward (deny by default).
            log.exception("unhandled error")
            response = await _refuse(
                request, ctx, BrokerError("internal error", reason="internal_error"), runtime.challenge
            )
        response.headers.setdefault("X-Request-Id", ctx.request_id)
        return response
    except asyncio.CancelledError:
        # the agent went away (handler cancellation): a forwarded call's outcome is still recorded
        if ctx.outcome is not None and not ctx.outcome.recorded:
            ctx.outcome.fail("agent_disconnected")
            try:
                await audit_outcome(app[SERVICES], ctx, None)
            except AuditUnavailable:
                log.error("outcome record not written", reason="agent_disconnected")
        raise
    finally:
        _observe(app, request, ctx)
        structlog.contextvars.unbind_contextvars("request_id", "trace_id", "client_request_id")


def _from_http_exception(exc: web.HTTPException) -> BrokerError:
    if exc.status == 404:
        return NotFound("no such endpoint", reason="no_route")
    if exc.status == 405:
        return MethodNotAllowed("method not allowed here", reason="method_not_allowed")
    if exc.status == 413:
        return PayloadTooLarge("request body is too large", reason="body_too_large")
    return InvalidRequest(exc.reason, reason=f"http_{exc.status}")


async def _refuse(
    request: web.Request, ctx: RequestContext, error: BrokerError, challenge: Challenge
) -> web.StreamResponse:
    ctx.status = error.status
    anonymous = _before_identity(request, ctx, error)
    error = await record_refusal(
        request.app, ctx, error, anonymous=anonymous, client_address=request.remote if anonymous else None
    )
    response = error_response(error, ctx.request_id, challenge=challenge)
    if ctx.outcome is not None:
        return await record_outcome(request, ctx, response)
    return response


def _before_identity(request: web.Request, ctx: RequestContext, error: BrokerError) -> bool:
    """A refusal before identity is established (CONTRACT §15): no client certificate, one that is not a valid
    SVID, or a malformed request from such a peer. A peer with a verified SVID keeps a full record per refusal;
    so does every 5xx (the broker's failure, not the peer's noise)."""
    if ctx.actor is not None or ctx.subject is not None or ctx.outcome is not None or error.status >= 500:
        return False
    if isinstance(error, InvalidClient):
        return True
    der = peer_certificate(request)
    if der is None:
        return True
    try:
        peer_actor(der, request.app[RUNTIME].current.authenticator.trust_domain)
    except InvalidClient:
        return True
    return False


async def record_outcome(
    request: web.Request, ctx: RequestContext, response: web.StreamResponse
) -> web.StreamResponse:
    """The one place a forwarded call's answer is handed to the agent (both transports): its ``outcome`` record
    (CONTRACT §15) is made durable first. A buffered answer is digested as it will be sent, and is replaced by
    ``503 audit_unavailable`` when its record cannot be written (fail closed). A streamed answer (already
    prepared, its bytes hashed as relayed) is recorded before its end is sent; when that fails the connection is
    closed without the stream's end, so the agent cannot take a cut stream for a whole one."""
    services = request.app[SERVICES]
    prepared = response.prepared
    body: bytes | None = None
    if not prepared:
        raw = response.body if isinstance(response, web.Response) else None
        body = bytes(raw) if isinstance(raw, bytes | bytearray) else b""
    try:
        await audit_outcome(services, ctx, body)
    except AuditUnavailable as error:
        ctx.decision, ctx.status, ctx.code = decision_for(error), error.status, error.code
        if prepared:
            log.error("outcome record not written; stream cut", reason=error.reason)
            if request.transport is not None:
                request.transport.close()
            return response
        return error_response(error, ctx.request_id)
    return response


def _observe(app: web.Application, request: web.Request, ctx: RequestContext) -> None:
    metrics = app[METRICS]
    elapsed = time.perf_counter() - ctx.started
    tool = ctx.tool if ctx.tool is not None and ctx.tool in app[RUNTIME].current.tools else "-"
    metrics.child(metrics.requests, ctx.route, tool, ctx.decision or "error", ctx.code).inc()
    metrics.child(metrics.request_duration, ctx.route).observe(elapsed)
    if ctx.route == "mcp":
        decision = ctx.decision or "error"
        metrics.observe_mcp(ctx.mcp_server, ctx.mcp_method, decision=decision, code=ctx.code, seconds=elapsed)
    # CONTRACT §16: one access-log line per request, allowed or refused (request_id and trace_id come from the
    # bound context); never a token, a proof or an argument value
    access_log.info(
        "access",
        route=ctx.route,
        tool=ctx.tool if tool != "-" else None,
        decision=ctx.decision or "error",
        code=ctx.code,
        status=ctx.status,
        duration_ms=round(elapsed * 1000, 3),
        subject=ctx.subject,
        actor=str(ctx.actor) if ctx.actor else None,
    )
