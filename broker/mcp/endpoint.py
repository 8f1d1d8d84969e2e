"""``/mcp/{server}``: the MCP Streamable HTTP gateway, both protocol eras (CONTRACT §7). The stage order is here.

 1 identity   SVID + DPoP proof + access token, exactly as ``/v1`` — first: nothing is revealed to an
              unauthenticated peer, and a session id never stands in for a token (token problems stay HTTP 401).
 2 server     a configured MCP server, else 404.
 3 origin     an ``Origin`` header, when present, must be allowed (403): the transport spec's DNS-rebinding rule.
 4 era        ``MCP-Protocol-Version: 2026-07-28`` is the stateless era (POST only: GET/DELETE 405); a known
              handshake version, or none, is the session era; anything else 400 (``-32022``).
 5 message    strict JSON, one JSON-RPC object from an exact allowlist (batches, responses, null ids: 400,
              nothing forwarded). Stateless: headers must agree with the body (400 ``-32020``).
 6 session    a presented ``Mcp-Session-Id`` must be bound to this (subject, actor) on this server, else 404 as
              for an unknown session; ``initialize`` must not carry one.
 7 authorize  tools/call: the one pipeline (:func:`broker.gateway.pipeline.authorize`: visibility, arguments,
              counters, policy, MFA, approvals, injection, guard, mint, audit) on the call
              :func:`broker.mcp.calls.resolve_call` describes; its refusals are rendered as JSON-RPC errors (HTTP
              200: MCP clients handle HTTP errors badly) with the same audit record as on ``/v1``.
              tools/list: the visible set, computed by the ``/v1/tools`` decision.
 8 guard      (every other message, incl. notifications the broker drops) revocations and the DPoP replay claim
              in one store step — last, so a refusal never burns a proof.
 9 audit      the decision (event ``mcp``) is written before anything leaves the broker or a message is dropped.
10 forward    fresh headers only (Txn-Token minted here for tools/call, X-Request-Id, traceparent, the MCP
              headers, the session id) over the broker's mTLS identity; the body re-serialised from what was
              decided on (arguments after injection). The agent's token never goes upstream.
11 relay      JSON or SSE, streamed (:mod:`broker.mcp.relay`): tools/list filtered and pinned,
              tools/call masked, initialize narrowed to the tool surface and its session bound to the principal.

Wiring (``broker.app``): ``app.router.add_route("*", "/mcp/{server}", mcp_endpoint)``,
``app.cleanup_ctx.append(mcp_resources)`` after the upstream session and the state store, and on the admin app
``GET /admin/mcp/pins`` → :func:`pins_endpoint`, ``POST /admin/mcp/pins/{server}/{tool}/accept`` →
:func:`accept_pin_endpoint`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from broker.audit.outcome import Outcome
from broker.context import CTX, RequestContext
from broker.errors import (
    BrokerError,
    InsufficientUserAuthentication,
    MethodNotAllowed,
    NotFound,
    UpstreamError,
)
from broker.gateway.body import authenticate, read_body, runtime_of
from broker.gateway.guard import final_guard
from broker.gateway.http1 import Http1Pool, Stream
from broker.gateway.middleware import record_refusal
from broker.gateway.pipeline import Authorized, authorize
from broker.gateway.services import audit_decision
from broker.identity.principal import Principal
from broker.mcp import jsonrpc as rpc
from broker.mcp.answers import (
    call_transform,
    capabilities_transform,
    initialize_answer,
    listing_transform,
    responses_filtered,
)
from broker.mcp.calls import resolve_call, visible_tools
from broker.mcp.checks import (
    LAST_EVENT_ID,
    SESSION_ID,
    check_origin,
    parse_body,
    protocol_era,
    require_accept,
    require_json,
    session_id_of,
    single_header,
)
from broker.mcp.params import param_headers
from broker.mcp.pins import PinBook, accept_pin_endpoint, drift_counter, pins_endpoint
from broker.mcp.relay import Relay, Transform, dumps, relay
from broker.mcp.sessions import SessionBinding, SessionStore, StreamBudget
from broker.mcp.sse import EVENT_IDS, event_id_context
from broker.mcp.upstream import JSON, SSE, Catalogs, McpUpstream, ServerTable, exchange, read_answer
from broker.resources import MCP_PINS, MCP_STATE, METRICS, RUNTIME, SERVICES, STATE
from broker.runtime import Runtime

__all__ = ["MCP_STATE", "accept_pin_endpoint", "mcp_endpoint", "mcp_resources", "pins_endpoint"]

#: how long a pinned definition is trusted without the upstream listing it again (then the broker re-lists)
MAX_CATALOG_AGE: Final = 60.0
POST_STREAM_SECONDS: Final = 300.0
GET_STREAM_SECONDS: Final = 3600.0
_FORWARD_ACCEPT: Final = f"{JSON}, {SSE}"


@dataclass
class McpState:
    """The gateway's long-lived state, owned by :func:`mcp_resources`."""

    pins: PinBook
    sessions: SessionStore
    #: every exchange with the MCP servers: agents' requests and the broker's catalog sessions
    pool: Http1Pool
    #: GET streams open per principal and server: one principal cannot hold the whole pool
    streams: StreamBudget = field(default_factory=StreamBudget)
    servers: ServerTable = field(default_factory=ServerTable)
    catalogs: Catalogs = field(default_factory=Catalogs)


async def mcp_resources(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: pins, session bindings, the upstream connections, the broker's own upstream sessions."""
    pins = PinBook(drift_counter(app[METRICS].registry), app[STATE])
    app[METRICS].bind_mcp_servers(server.name for server in app[RUNTIME].current.config.mcp_servers)
    app[MCP_PINS] = pins
    state = app[MCP_STATE] = McpState(pins=pins, sessions=SessionStore(app[STATE]), pool=Http1Pool())
    yield
    await state.catalogs.close(state.pool)
    await state.pool.close()


async def mcp_endpoint(request: web.Request) -> web.StreamResponse:
    """``POST|GET|DELETE /mcp/{server}``."""
    ctx = request[CTX]
    ctx.route = "mcp"
    runtime = runtime_of(request)
    principal = await authenticate(request, runtime)  # 1
    state = request.app[MCP_STATE]
    upstream = state.servers.servers(runtime).get(request.match_info["server"])  # 2
    if upstream is None:
        raise NotFound("no such MCP server", reason="unknown_mcp_server")
    ctx.mcp_server = upstream.name
    request_id: str | int | None = None
    try:
        check_origin(request, upstream)  # 3
        era, version = protocol_era(request)  # 4
        if request.method == "POST":
            require_json(request)
            body = await read_body(request, runtime.limits)
            message = parse_body(body, runtime.limits.max_json_depth)  # 5
            request_id = message.id
            ctx.mcp_method = message.method
            return await _post(request, runtime, principal, state, upstream, message, era, version)
        if request.method in ("GET", "DELETE"):
            ctx.mcp_method = request.method
            if era == "modern":
                raise MethodNotAllowed(
                    "2026-07-28 MCP is POST only", reason="mcp_method", headers={"Allow": "POST"}
                )
            return await _session_request(request, principal, state, upstream, version)
        raise MethodNotAllowed(
            "POST, GET or DELETE", reason="mcp_method", headers={"Allow": "POST, GET, DELETE"}
        )
    except rpc.JsonRpcError as error:
        return await render_jsonrpc(request, error, request_id)


async def render_jsonrpc(
    request: web.Request, error: BrokerError, request_id: str | int | None, *, url_elicitation: bool = False
) -> web.Response:
    """The one JSON-RPC rendering of a refusal, recorded first (:func:`broker.gateway.middleware.record_refusal`:
    the same decision, reason and audit record as on ``/v1``). A pipeline refusal of a ``tools/call`` goes out
    with HTTP 200 (MCP clients handle HTTP errors badly) and ``data`` saying what would make the call pass; a
    refusal of the JSON-RPC exchange itself (:class:`~broker.mcp.jsonrpc.JsonRpcError`) with its own status."""
    ctx = request[CTX]
    status = error.status if isinstance(error, rpc.JsonRpcError) else 200
    ctx.status = status
    written = await record_refusal(request.app, ctx, error)
    if written is not error:  # the refusal could not be audited: that, not the refusal, is the answer
        raise written
    ctx.status = status
    code, message = error.jsonrpc_code, error.rpc_message
    data = error.jsonrpc_data()
    if data is not None and not isinstance(error, rpc.JsonRpcError):
        if error.challenge is not None:  # as the HTTP challenge does (RFC 9728 §5.1)
            data["resource_metadata"] = runtime_of(request).challenge.resource_metadata
        if error.code == "approval_required" and url_elicitation:
            # 2025-11-25 URLElicitationRequiredError: the client sends its user to the URL, then retries the call
            code = rpc.URL_ELICITATION_REQUIRED
            elicitation = {"mode": "url", "elicitationId": data["approval_id"], "url": data["approval_url"]}
            data["elicitations"] = [{**elicitation, "message": message}]
    body = rpc.error_body(request_id, code, message, data)
    headers = {"X-Request-Id": ctx.request_id, "Cache-Control": "no-store", **error.headers}
    return web.Response(status=status, text=dumps(body), content_type=JSON, headers=headers)


async def _binding(
    state: McpState, upstream: McpUpstream, principal: Principal, session_id: str
) -> SessionBinding:
    binding = await state.sessions.lookup(upstream.name, session_id)
    if binding is None or not binding.belongs_to(upstream.name, principal):
        # another principal's session answers exactly like one that does not exist (HOSTILE P25)
        reason = "session_unknown" if binding is None else "session_of_another_principal"
        raise rpc.JsonRpcError(rpc.INVALID_REQUEST, "Session not found", reason, http_status=404)
    return binding


def _base_headers(request: web.Request) -> dict[str, str]:
    return {
        "Accept": _FORWARD_ACCEPT,
        "Accept-Encoding": "identity",
        "X-Request-Id": request[CTX].request_id,
        "traceparent": request[CTX].traceparent,
    }


def _relay_plan(
    runtime: Runtime,
    upstream: McpUpstream,
    request_id: str | int | None,
    transform: Transform | None,
    *,
    session_id: str | None,
    outcome: Outcome | None = None,
) -> Relay:
    """How an answer is relayed (:mod:`broker.mcp.relay`); a server with any response-filtered tool is masked on
    every stream of every request, the GET stream included (CONTRACT §12)."""
    limit = runtime.limits.max_response_bytes
    return Relay(
        request_id=request_id,
        transform=transform,
        masked=responses_filtered(runtime, upstream),
        id_context=event_id_context(upstream.name, session_id),
        max_event_bytes=limit,
        max_stream_bytes=4 * limit if request_id is not None else 16 * limit,
        max_seconds=POST_STREAM_SECONDS if request_id is not None else GET_STREAM_SECONDS,
        outcome=outcome,
    )


async def _post(
    request: web.Request,
    runtime: Runtime,
    principal: Principal,
    state: McpState,
    upstream: McpUpstream,
    message: rpc.Message,
    era: str,
    version: str,
) -> web.StreamResponse:
    raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
    headers = {**_base_headers(request), "Content-Type": JSON}
    binding: SessionBinding | None = None
    if era == "modern":
        rpc.check_modern_headers(message, raw)
        if single_header(request, "Mcp-Session-Id") is not None:
            raise rpc.invalid("sessions are not used at 2026-07-28", "session_in_stateless_era")
        if not message.is_request:
            # the 2026-07-28 wire defines no client-to-server notifications: decided, recorded, not forwarded
            return await _dropped(request, principal, message)
        rpc.check_relayed(message, "modern")
    else:
        session_id = session_id_of(request)
        if not message.is_request and message.method not in rpc.RELAYED_NOTIFICATIONS:
            return await _dropped(request, principal, message)  # a notification the broker does not relay
        if message.is_request:
            rpc.check_relayed(message, "handshake")
        if message.method == "initialize" and session_id is not None:
            raise rpc.invalid(
                "initialize opens a session: send it without Mcp-Session-Id", "initialize_in_session"
            )
        if session_id is not None:
            binding = await _binding(state, upstream, principal, session_id)  # 6
            headers["Mcp-Session-Id"] = session_id
        if request.headers.get("MCP-Protocol-Version") is not None:
            headers["MCP-Protocol-Version"] = version
    if message.is_request:
        require_accept(request, JSON, SSE)
    services = request.app[SERVICES]
    ctx = request[CTX]
    transform: Transform | None = None
    authorized: Authorized | None = None
    params: dict[str, Any] | None = None
    if message.method == "tools/call":  # 7
        call, schema = await resolve_call(
            runtime,
            principal,
            upstream,
            message,
            pins=state.pins,
            refresh=lambda: state.catalogs.refresh(
                state.pool, upstream, state.pins, max_bytes=runtime.limits.max_response_bytes
            ),
            max_catalog_age=MAX_CATALOG_AGE,
            param_headers=raw if era == "modern" else None,
            client_ip=request.remote,
        )
        try:
            authorized = await authorize(call, services, ctx, time.time())
        except BrokerError as error:
            if error.status >= 500 or (
                error.status == 401 and not isinstance(error, InsufficientUserAuthentication)
            ):
                raise  # the store, the audit or the caller's credentials: HTTP, as on every route
            url_elicitation = binding is not None and binding.url_elicitation
            return await render_jsonrpc(request, error, message.id, url_elicitation=url_elicitation)
        params = {**message.params, "arguments": authorized.forwarded}
        headers["Txn-Token"] = authorized.txn_token
        transform = call_transform(authorized.tool.filters, principal, _refused_answer(ctx))
    else:
        if message.method == "tools/list":
            visible = await visible_tools(services, principal, upstream)
            transform = listing_transform(
                state.pins,
                upstream,
                visible,
                lambda reason: _record_error(request, reason, code="state_unavailable"),
            )
        elif message.method in ("initialize", "server/discover"):
            transform = capabilities_transform
        # tools/list shows what the policy in force lets this pair see: not under a revoked version (§17)
        listing = message.method == "tools/list"
        await final_guard(  # 8
            services.store,
            services.metrics,
            principal,
            policy_version=runtime.policy_version if listing else None,
        )
        ctx.decision, ctx.reason = "allow", message.method  # 9
        await audit_decision(services, ctx)
    forwarded = message.as_json(params)
    if era == "modern":
        headers.update(rpc.routing_headers(message, version))
        if authorized is not None:
            headers.update(param_headers(schema, authorized.forwarded))
    out_headers = {"X-Request-Id": ctx.request_id}
    started = time.perf_counter()
    if authorized is not None:  # a forwarded call has an outcome (CONTRACT §15), recorded by the middleware
        ctx.outcome = Outcome(started)
    async with exchange(
        state.pool,
        upstream,
        "POST",
        headers=headers,
        body=dumps(forwarded).encode("utf-8"),
        tracer=services.tracer,
    ) as response:  # 10
        if authorized is not None:
            metrics = services.metrics
            elapsed = time.perf_counter() - started
            metrics.child(metrics.upstream_duration, authorized.tool.name).observe(elapsed)
        if ctx.outcome is not None:
            ctx.outcome.answered(response.status)
        if message.method == "initialize" and response.status == 200:
            return await _initialized(
                request, runtime, state, upstream, principal, message, response, out_headers
            )
        plan = _relay_plan(
            runtime,
            upstream,
            message.id,
            transform,
            session_id=headers.get("Mcp-Session-Id"),
            outcome=ctx.outcome,
        )
        return await relay(request, response, plan, out_headers)  # 11


async def _dropped(request: web.Request, principal: Principal, message: rpc.Message) -> web.Response:
    """A notification the broker does not forward is still a request: its proof is claimed (a replay of it is
    refused like any other) and it leaves a record (CONTRACT §12: every request is decided and recorded)."""
    services = request.app[SERVICES]
    await final_guard(services.store, services.metrics, principal)
    ctx = request[CTX]
    ctx.decision, ctx.reason, ctx.status = "allow", f"{message.method}: acknowledged, not forwarded", 202
    await audit_decision(services, ctx)
    return web.Response(status=202, headers={"X-Request-Id": ctx.request_id})


def _refused_answer(ctx: RequestContext) -> Callable[[str], Awaitable[None]]:
    """A call's answer that could not be masked: the agent gets an error instead, and the call's outcome record
    says so (decision ``error``, the reason), written when that error is handed over."""

    async def refused(reason: str) -> None:
        ctx.decision, ctx.reason, ctx.code = "error", reason, "upstream_error"
        if ctx.outcome is not None:
            ctx.outcome.fail(reason)

    return refused


async def _record_error(request: web.Request, reason: str, *, code: str = "upstream_error") -> None:
    """An allowed request whose answer the agent does not get (a call's answer that could not be masked, a
    tools/list whose pins could not be read): a second record says what the agent got instead."""
    ctx = request[CTX]
    ctx.decision, ctx.reason, ctx.code = "error", reason, code
    await audit_decision(request.app[SERVICES], ctx)


async def _initialized(
    request: web.Request,
    runtime: Runtime,
    state: McpState,
    upstream: McpUpstream,
    principal: Principal,
    message: rpc.Message,
    response: Stream,
    headers: dict[str, str],
) -> web.Response:
    """The initialize answer, read whole (it is one message) so the session is bound before the agent can use it,
    and rebuilt (:func:`broker.mcp.answers.initialize_answer`)."""
    assert message.id is not None
    answer = initialize_answer(
        await read_answer(response, message.id, runtime.limits.max_response_bytes, upstream.timeout),
        message.id,
        masked=responses_filtered(runtime, upstream),
    )
    session_id = response.header("Mcp-Session-Id")
    result = answer.get("result")
    if session_id is not None and isinstance(result, dict):
        if not SESSION_ID.fullmatch(session_id):
            raise UpstreamError("the MCP server's session is unusable", reason="mcp_session_id_malformed")
        version = result.get("protocolVersion")
        version = version if version in rpc.HANDSHAKE_VERSIONS else rpc.DEFAULT_HANDSHAKE_VERSION
        capabilities = message.params.get("capabilities")
        elicitation = capabilities.get("elicitation") if isinstance(capabilities, dict) else None
        url_mode = isinstance(elicitation, dict) and isinstance(elicitation.get("url"), dict)
        binding = SessionBinding(
            server=upstream.name,
            subject=principal.subject,
            actor=principal.actor_id,
            version=str(version),
            url_elicitation=url_mode and version in rpc.URL_ELICITATION_VERSIONS,
        )
        if not await state.sessions.bind(session_id, binding, limit=upstream.max_sessions_per_principal):
            raise UpstreamError("the MCP server's session is unusable", reason="mcp_session_id_reused")
        headers["Mcp-Session-Id"] = session_id
    return web.Response(
        text=dumps(answer), content_type=JSON, headers={**headers, "Cache-Control": "no-store"}
    )


async def _session_request(
    request: web.Request, principal: Principal, state: McpState, upstream: McpUpstream, version: str
) -> web.StreamResponse:
    """GET (the session's SSE stream) and DELETE (end the session), session era only."""
    session_id = session_id_of(request)
    if session_id is None:
        raise rpc.invalid("Mcp-Session-Id is required", "session_id_missing")
    await _binding(state, upstream, principal, session_id)  # 6
    if request.method == "GET":
        require_accept(request, SSE)
        # held until the stream ends; refused before the guard, so a refusal burns no proof
        with state.streams.hold(upstream.name, principal, upstream.max_streams_per_principal):
            return await _session_exchange(request, principal, state, upstream, version, session_id)
    return await _session_exchange(request, principal, state, upstream, version, session_id)


async def _session_exchange(
    request: web.Request,
    principal: Principal,
    state: McpState,
    upstream: McpUpstream,
    version: str,
    session_id: str,
) -> web.StreamResponse:
    """Guard, audit, then the exchange: a GET's stream relayed until it ends, a DELETE's answer."""
    services = request.app[SERVICES]
    await final_guard(services.store, services.metrics, principal)  # 8
    ctx = request[CTX]
    ctx.decision, ctx.reason = "allow", f"{request.method} session"
    await audit_decision(services, ctx)  # 9
    headers = {**_base_headers(request), "Mcp-Session-Id": session_id}
    if request.headers.get("MCP-Protocol-Version") is not None:
        headers["MCP-Protocol-Version"] = version
    last_event = single_header(request, "Last-Event-ID")
    if last_event is not None and LAST_EVENT_ID.fullmatch(last_event):
        # the agent only ever saw the broker's ids: open it back into the upstream's (else: start afresh)
        resumed = EVENT_IDS.open(last_event, event_id_context(upstream.name, session_id))
        if resumed is not None and LAST_EVENT_ID.fullmatch(resumed):
            headers["Last-Event-ID"] = resumed
    out_headers = {"X-Request-Id": ctx.request_id}
    async with exchange(
        state.pool, upstream, request.method, headers=headers, tracer=services.tracer
    ) as response:  # 10
        if request.method == "DELETE":
            if 200 <= response.status < 300:
                await state.sessions.close(upstream.name, session_id)
            return web.Response(status=response.status, headers=out_headers)
        # 11: responses on a GET stream answer no request of this connection: dropped, never relayed unmasked
        plan = _relay_plan(runtime_of(request), upstream, None, None, session_id=session_id)
        return await relay(request, response, plan, out_headers)
