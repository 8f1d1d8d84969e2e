"""Relaying an upstream MCP answer to the agent, as it comes (CONTRACT §7; HOSTILE P16, P24).

A JSON answer is one JSON-RPC message: read (bounded), checked to answer *this* request, transformed, sent.
An SSE answer is streamed: each event is parsed as it completes (:mod:`broker.mcp.sse`) and written at
once (``X-Accel-Buffering: no``, so the first event reaches the agent before the upstream finishes). Per event:

- the response to this request's id → rebuilt from ``jsonrpc``, ``id`` and ``result`` or ``error`` (nothing
  else of the upstream's message), then the request's transform (tools/list filtered, tools/call filtered:
  :mod:`broker.mcp.answers`), then re-encoded; a response carrying another id is dropped (P24);
- a notification → passed only if its method is in :data:`AGENT_NOTIFICATIONS`; a server-to-client *request*
  (``sampling/createMessage``, ``elicitation/create``, …) is dropped: the broker relays no server-initiated
  requests, and has no policy that could authorise one;
- the upstream's ``event:`` field is never relayed (every event the agent gets is a ``message``) and its ``id:``
  reaches the agent only sealed (:class:`broker.mcp.sse.EventIds`); an event that is dropped still passes its
  sealed id, so that a resumption starts after it.

**Masked servers** (CONTRACT §12). When any tool of the MCP server has response filters, a stream may carry that
tool's data in more than its answer (progress and log messages, notifications on the GET stream, error texts),
and the broker cannot filter free text: only what is provably harmless passes besides the answer. A
``notifications/tools/list_changed`` is rebuilt bare; everything else is dropped — progress notifications too:
their numbers arrive before the answer they describe could be masked, and a number can carry a masked value
(an account number as ``progress``) — and so is ``retry``. An upstream JSON-RPC error (the answer to any
request, or an HTTP 4xx body) keeps its code, with the code's standard text instead of the upstream's message,
and no ``data``.

Caps: ``max_event_bytes`` per event, ``max_stream_bytes`` and ``max_seconds`` per stream; an upstream read
timeout is the idle cap. When a stream breaks before this request was answered, the agent gets a JSON-RPC error
for its id instead of a silent end. An agent that goes away cancels the handler (``handler_cancellation``), which
closes the upstream stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog
from aiohttp import web

from broker.audit.outcome import Outcome
from broker.errors import UpstreamError
from broker.gateway.http1 import Stream
from broker.mcp import jsonrpc as rpc
from broker.mcp.sse import EVENT_IDS, SseError, SseEvent, SseParser, encode_event
from broker.mcp.upstream import JSON, SSE, parse_upstream, read_bounded

log = structlog.get_logger("broker.mcp.relay")

__all__ = [
    "AGENT_NOTIFICATIONS",
    "Relay",
    "Transform",
    "dumps",
    "relay",
    "upstream_error",
]

#: a transform gets the upstream's response to this request and returns what the agent receives; it may raise
#: JsonRpcError to answer with an error instead (e.g. a result that cannot be masked)
Transform = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
AGENT_NOTIFICATIONS: Final = frozenset(
    {
        "notifications/progress",
        "notifications/message",
        "notifications/cancelled",
        "notifications/tools/list_changed",
    }
)
STREAM_HEADERS: Final = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
#: the standard text of the JSON-RPC 2.0 error codes (§5.1); any other code is "the MCP server reported an error"
_STANDARD_ERRORS: Final = {
    rpc.PARSE_ERROR: "Parse error",
    rpc.INVALID_REQUEST: "Invalid Request",
    rpc.METHOD_NOT_FOUND: "Method not found",
    rpc.INVALID_PARAMS: "Invalid params",
    rpc.INTERNAL_ERROR: "Internal error",
}
#: after the answer, how long the rest of the stream may take to end (so its connection returns to the pool)
DRAIN_SECONDS: Final = 1.0


#: json.dumps(separators=(",", ":"), ensure_ascii=False), built once: dumps() would build an encoder per call
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(message: Mapping[str, Any]) -> str:
    """Compact JSON; never holds a raw line break (json escapes control characters), so it is SSE-safe."""
    return _COMPACT.encode(message)


def rebuilt(message: Mapping[str, Any], request_id: str | int, *, masked: bool) -> dict[str, Any]:
    """The upstream's answer to ``request_id``, rebuilt from ``result`` or ``error`` alone (no other member of
    the upstream's message); on a masked server an error keeps only its code (:func:`upstream_error`)."""
    if "error" in message:
        if masked:  # whatever the request: free text of a masked server never passes
            return upstream_error(message, request_id)
        return {"jsonrpc": "2.0", "id": request_id, "error": message["error"]}
    if "result" not in message:
        raise UpstreamError("the MCP server did not answer this request", reason="upstream_no_answer")
    return {"jsonrpc": "2.0", "id": request_id, "result": message["result"]}


def upstream_error(message: Mapping[str, Any], request_id: str | int | None) -> dict[str, Any]:
    """An upstream JSON-RPC error as a masked server relays it: its integer code, that code's standard text."""
    error = message.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    if type(code) is not int or not -(2**31) <= code < 2**31:
        code = rpc.INTERNAL_ERROR
    return rpc.error_body(request_id, code, _STANDARD_ERRORS.get(code, "the MCP server reported an error"))


@dataclass(frozen=True)
class Relay:
    #: the request being answered; None for a GET stream (no request of the agent is answered there)
    request_id: str | int | None
    transform: Transform | None
    #: a tool of this MCP server has response filters: besides the answer, only what is provably harmless passes
    masked: bool
    #: what the broker's event ids are bound to (:func:`broker.mcp.sse.event_id_context`)
    id_context: bytes
    max_event_bytes: int
    max_stream_bytes: int
    max_seconds: float
    #: a forwarded call's outcome (CONTRACT §15): when the upstream's answer ended, what was relayed, what failed
    outcome: Outcome | None = None


async def relay(
    request: web.Request, response: Stream, plan: Relay, headers: Mapping[str, str]
) -> web.StreamResponse:
    """Relay ``response`` (the upstream's answer) to the agent; ``headers`` are the only ones it gets."""
    out_headers = {**headers, **STREAM_HEADERS}
    if response.status == 202:
        return web.Response(status=202, headers=out_headers)
    if response.status != 200:
        return await _refusal(response, plan, out_headers)
    if response.content_type == SSE:
        return await _stream(request, response, plan, out_headers)
    if response.content_type == JSON:
        return await _json(response, plan, out_headers)
    raise UpstreamError("the MCP server answered with neither JSON nor SSE", reason="upstream_not_mcp")


async def _refusal(response: Stream, plan: Relay, headers: dict[str, str]) -> web.Response:
    """Upstream 4xx (an unknown session 404, a 405 for GET, its own 400s) pass on with a JSON-RPC body only."""
    if response.status >= 500:
        raise UpstreamError("the MCP server failed", reason="upstream_status_5xx")
    body = await read_bounded(response, plan.max_event_bytes, plan.max_seconds)
    if plan.outcome is not None:
        plan.outcome.finished(time.perf_counter())
    try:
        message = parse_upstream(body) if response.content_type == JSON and body else None
    except UpstreamError:
        message = None
    if not isinstance(message, dict) or not isinstance(message.get("error"), dict):
        message = rpc.error_body(plan.request_id, rpc.INVALID_REQUEST, "the MCP server refused the request")
    elif plan.masked:
        message = upstream_error(message, plan.request_id)
    return web.Response(status=response.status, text=dumps(message), content_type=JSON, headers=headers)


def _is_answer(message: Any, request_id: str | int | None) -> bool:
    return (
        isinstance(message, dict)
        and "method" not in message
        and ("result" in message or "error" in message)
        and request_id is not None
        and type(message.get("id")) is type(request_id)
        and message.get("id") == request_id
    )


async def _answer(message: dict[str, Any], plan: Relay) -> dict[str, Any]:
    """The upstream's answer to this request, rebuilt (nothing but the JSON-RPC members), then transformed."""
    message = rebuilt(message, message["id"], masked=plan.masked)
    if "error" in message or plan.transform is None:
        return message
    try:
        return await plan.transform(message)
    except rpc.JsonRpcError as error:
        return error.jsonrpc_body(plan.request_id)


async def _json(response: Stream, plan: Relay, headers: dict[str, str]) -> web.Response:
    body = await read_bounded(response, plan.max_event_bytes, plan.max_seconds)
    if plan.outcome is not None:
        plan.outcome.finished(time.perf_counter())
    message = parse_upstream(body)
    if not _is_answer(message, plan.request_id):
        raise UpstreamError("the MCP server did not answer this request", reason="upstream_no_answer")
    answer = await _answer(message, plan)
    return web.Response(text=dumps(answer), content_type=JSON, headers=headers)


async def _stream(
    request: web.Request, response: Stream, plan: Relay, headers: dict[str, str]
) -> web.StreamResponse:
    if (response.header("Content-Encoding") or "identity").lower() not in ("identity", ""):
        raise UpstreamError("the MCP server answered compressed", reason="upstream_encoded")
    out = web.StreamResponse(status=200, headers={**headers, "Content-Type": SSE})
    await out.prepare(request)
    parser = SseParser(max_event_bytes=plan.max_event_bytes)
    state = {"answered": False, "total": 0}
    failure: str | None = None
    outcome = plan.outcome
    try:
        async with asyncio.timeout(plan.max_seconds):
            while chunk := await _piece(response):
                state["total"] += len(chunk)
                if state["total"] > plan.max_stream_bytes:
                    raise SseError("sse_stream_too_large")
                for event in parser.feed(chunk):
                    data = await _event(event, plan, state)
                    if data is not None:
                        await out.write(data)
                        if outcome is not None:
                            outcome.sent(data)  # the response digest: every byte relayed, in order
                if state["answered"]:
                    break
    except SseError as exc:
        failure = exc.reason
    except TimeoutError:
        failure = "upstream_timeout"
    except _Broken:
        failure = "upstream_stream_broken"
    except ConnectionResetError:
        if outcome is not None:
            outcome.fail("agent_disconnected")
            outcome.finished(time.perf_counter())
        return out  # the agent went away: nothing left to tell it
    if state["answered"]:
        await _drain(response)
    elif plan.request_id is not None:
        failure = failure or "upstream_no_answer"
        error = rpc.error_body(plan.request_id, rpc.INTERNAL_ERROR, "the MCP server's answer was cut short")
        data = encode_event(SseEvent(data=dumps(error), event="message"))
        try:
            await out.write(data)
        except ConnectionResetError:
            failure = "agent_disconnected"
        else:
            if outcome is not None:
                outcome.sent(data)
    if outcome is not None:
        outcome.finished(time.perf_counter())
        if failure is not None:
            outcome.fail(failure)
    if failure is not None:
        log.warning("mcp stream ended early", reason=failure, answered=state["answered"])
    # the stream's end (write_eof) is aiohttp's, after the handler returned: a call's outcome record is durable
    # before the agent sees its answer end (broker.gateway.middleware.record_outcome)
    return out


async def _event(event: SseEvent, plan: Relay, state: dict[str, Any]) -> bytes | None:
    event_id = EVENT_IDS.seal(event.id, plan.id_context) if event.id is not None else None
    retry = None if plan.masked else event.retry
    # an event the agent does not get still moves its resumption point past it
    skipped = encode_event(SseEvent(id=event_id)) if event_id is not None else None
    if not event.data:
        if event_id is None and retry is None:
            return None
        return encode_event(SseEvent(data=event.data, id=event_id, retry=retry))
    try:
        message = parse_upstream(event.data)
    except UpstreamError:
        log.warning("mcp stream event dropped", reason="event_not_json")
        return skipped
    if not isinstance(message, dict):
        return skipped
    method = message.get("method")
    if isinstance(method, str):
        if "id" in message:
            log.info("server-to-client request dropped", method=method[:64])
            return skipped
        notification = _notification(message, method, plan)
        if notification is None:
            return skipped
        message = notification
    elif _is_answer(message, plan.request_id) and not state["answered"]:
        state["answered"] = True
        message = await _answer(message, plan)
    else:
        log.info("mcp stream event dropped", reason="not_this_request")
        return skipped
    return encode_event(SseEvent(data=dumps(message), event="message", id=event_id, retry=retry))


def _notification(message: dict[str, Any], method: str, plan: Relay) -> dict[str, Any] | None:
    """What the agent gets of a server notification (None: nothing); masked servers: module docstring."""
    if not plan.masked:
        return message if method in AGENT_NOTIFICATIONS else None
    if method == "notifications/tools/list_changed":
        return {"jsonrpc": "2.0", "method": method}
    return None


class _Broken(Exception):
    """The upstream's stream broke off or was malformed (a cut connection, bad chunk framing)."""


async def _piece(response: Stream) -> bytes:
    """The next piece of the stream (``b""`` at its end); a broken stream is :class:`_Broken`, so that it is
    told apart from the relay's own refusals."""
    try:
        return await response.read()
    except UpstreamError as exc:
        raise _Broken(exc.reason) from exc


async def _drain(response: Stream) -> None:
    """Read what little follows the answer, so that the connection can go back to the pool."""
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            total = 0
            while total < 65536 and (chunk := await response.read()):
                total += len(chunk)
    except (TimeoutError, UpstreamError):
        return
