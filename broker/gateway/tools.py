"""``/v1/tools``: discovery and invocation. The stage order of an invocation is written once, here.

1 identity    the peer's X.509-SVID → actor. First: nothing else is revealed to an unauthenticated peer.
2 tool        unknown (or, later, invisible) tools answer 404 unknown_tool — after identity, so the catalog
              cannot be probed anonymously.
3 arguments   strict JSON, then the tool's input JSON Schema — before policy (CONTRACT §8), so policy only
              ever sees well-typed arguments.
4 audit       the decision is written before anything leaves the broker: never forwarded unaudited.
5 forward     canonical argument bytes (what was decided on is what executes) over mTLS to the backend.
"""

from __future__ import annotations

import time
from typing import Any

import jsonschema
from aiohttp import web

from broker.canonical import args_digest, canonicalize, strict_loads
from broker.config.models import Limits
from broker.context import CTX
from broker.errors import InvalidRequest, PayloadTooLarge, UnknownTool, UnsupportedMediaType
from broker.gateway.forward import json_response, upstream_headers
from broker.gateway.middleware import audit_decision
from broker.identity.principal import Principal
from broker.observability import traceparent_for
from broker.resources import FORWARDER, METRICS, RUNTIME, STATE
from broker.runtime import CompiledTool, Runtime


async def read_json_body(request: web.Request, limits: Limits) -> Any:
    """The request body as strict JSON (HOSTILE P15, P17–P19), bounded before and while reading."""
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise UnsupportedMediaType("compressed request bodies are not accepted", reason="body_encoded")
    if request.content_type != "application/json" or request.charset not in (None, "utf-8"):
        raise UnsupportedMediaType("send the arguments as application/json (UTF-8)", reason="body_not_json")
    limit = limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes", reason="body_too_large")
    body = await request.content.read(limit + 1)
    if len(body) > limit or not request.content.at_eof():
        raise PayloadTooLarge(f"request body is larger than {limit} bytes", reason="body_too_large")
    return strict_loads(body, max_depth=limits.max_json_depth)


def validate_arguments(tool: CompiledTool, arguments: Any) -> None:
    """The tool's input JSON Schema; the error names the failing place (e.g. ``arguments.amount``)."""
    error = jsonschema.exceptions.best_match(tool.validator.iter_errors(arguments))
    if error is not None:
        where = "arguments" + "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path
        )
        raise InvalidRequest(f"{where}: {error.message}"[:300], reason="arguments_schema")


async def authenticate(request: web.Request, runtime: Runtime) -> Principal:
    """Stage 1 for agent routes; the principal's identities land in the request record for audit."""
    app = request.app
    principal = await runtime.authenticator.authenticate(
        request, store=app[STATE], metrics=app[METRICS], now=time.time()
    )
    ctx = request[CTX]
    ctx.actor, ctx.subject = principal.actor, principal.subject
    return principal


async def invoke_tool(request: web.Request) -> web.StreamResponse:
    ctx = request[CTX]
    ctx.route = "invoke"
    runtime = request.app[RUNTIME].current
    name = request.match_info["name"]

    await authenticate(request, runtime)  # 1 identity

    tool = runtime.tools.get(name)  # 2 tool
    if tool is None:
        raise UnknownTool("no such tool", reason="unknown_tool")
    ctx.tool = tool.name

    arguments = await read_json_body(request, runtime.limits)  # 3 arguments
    if not isinstance(arguments, dict):
        raise InvalidRequest("arguments must be a JSON object", reason="arguments_not_object")
    validate_arguments(tool, arguments)
    ctx.args_digest = args_digest(arguments)
    ctx.audit_args = {k: arguments[k] for k in tool.config.audit_fields if k in arguments} or None

    ctx.decision = "allow"  # 4 audit, before anything leaves
    audit_decision(request.app, ctx)

    body = canonicalize(arguments)  # 5 forward
    headers = upstream_headers(
        request_id=ctx.request_id, traceparent=traceparent_for(request.headers.get("traceparent"))
    )
    answer = await request.app[FORWARDER].call(tool.target, body, headers)
    return json_response(answer, ctx.request_id)


async def list_tools(request: web.Request) -> web.StreamResponse:
    ctx = request[CTX]
    ctx.route = "discovery"
    runtime = request.app[RUNTIME].current
    await authenticate(request, runtime)
    tools = [
        {"name": t.name, "description": t.config.description, "input_schema": t.config.input_schema}
        for t in runtime.tools.values()
    ]
    ctx.decision = "allow"
    ctx.status = 200
    audit_decision(request.app, ctx)
    return web.json_response({"tools": tools}, headers={"Cache-Control": "no-store"})
