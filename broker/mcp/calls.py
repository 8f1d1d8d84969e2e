"""What a ``tools/call`` and a ``tools/list`` are, in the pipeline's terms: MCP adds no decision of its own.

``tools/list`` shows a tool iff it is configured for the server, its definition matches its pin
(:mod:`broker.mcp.pins`) and :func:`broker.gateway.pipeline.discover` lets this (subject, actor) see it — the
visibility decision of ``/v1/tools``.

``tools/call`` becomes a :class:`~broker.gateway.pipeline.ToolCall`: the tool is the configured one whose current
definition matches its pin (else it is missing, exactly like an unknown tool), with the pinned input schema
beside the ``/v1`` tool's of the same name, and that tool's injection and response filters. The stages, their
order and every refusal are the pipeline's; refusals are rendered as JSON-RPC errors by the endpoint.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from broker.gateway.discovery import discover
from broker.gateway.pipeline import ToolCall
from broker.gateway.services import Services
from broker.identity.principal import Principal
from broker.mcp import jsonrpc as rpc
from broker.mcp.params import check_param_headers
from broker.mcp.pins import PinBook
from broker.mcp.upstream import McpUpstream
from broker.runtime import Runtime, ToolSpec

__all__ = ["resolve_call", "visible_tools"]


async def visible_tools(services: Services, principal: Principal, upstream: McpUpstream) -> frozenset[str]:
    """The configured tools of ``upstream`` policy lets this (subject, actor) see, minus revoked grants."""
    names = list(upstream.digests)
    if not names:
        return frozenset()
    _, visible = await discover(services, services.runtime.current, principal, names, time.time())
    return frozenset(visible)


async def resolve_call(
    runtime: Runtime,
    principal: Principal,
    upstream: McpUpstream,
    message: rpc.Message,
    *,
    pins: PinBook,
    refresh: Callable[[], Awaitable[None]],
    max_catalog_age: float,
    param_headers: list[tuple[str, str]] | None,
    client_ip: str | None,
) -> tuple[ToolCall, dict[str, Any]]:
    """The pipeline's call for this ``tools/call`` message, and the pinned input schema (for ``Mcp-Param-*``).

    A name that is not configured, or whose definition is not pinned (drifted, invalid, not listed lately), is
    handed over as a missing tool: the pipeline answers ``unknown_tool`` exactly as for a hidden one."""
    name = message.params.get("name")
    if not isinstance(name, str):
        raise rpc.JsonRpcError(
            rpc.INVALID_PARAMS, "params.name must be a string", "call_name_type", http_status=200
        )
    arguments = message.params.get("arguments", {})
    tool: ToolSpec | None = None
    schema: dict[str, Any] = {}
    missing = "unknown_tool"
    if name in upstream.digests:
        configured = upstream.digests[name]
        usable = pins.usable(upstream.name, name, configured)
        if usable is None or time.time() - usable.seen_at > max_catalog_age:
            await refresh()  # the broker's own listing: first sight, or a pin not re-checked for a while
            usable = pins.usable(upstream.name, name, configured)
        if usable is None or time.time() - usable.seen_at > max_catalog_age:
            missing = "tool_unpinned_or_drifted"
        else:
            schema = usable.definition.get("inputSchema") or {}
            rest = runtime.tools.get(name)
            tool = ToolSpec(
                name=name,
                schemas=(usable.validator,) + ((rest.validator,) if rest is not None else ()),
                filters=rest.filters if rest is not None else None,
                audit_fields=tuple(rest.config.audit_fields) if rest is not None else (),
            )

    async def read_arguments() -> Any:
        # 2026-07-28: Mcp-Param-* mirror the agent's arguments (-32020 otherwise) — checked at the argument
        # stage, after visibility, so a header mismatch cannot tell a hidden tool from a missing one
        if param_headers is not None and isinstance(arguments, dict):
            check_param_headers(schema, arguments, param_headers)
        return arguments

    call = ToolCall(
        step="mcp",
        name=name,
        arguments=read_arguments,
        principal=principal,
        tool=tool,
        client_ip=client_ip,
        missing_reason=missing,
    )
    return call, schema
