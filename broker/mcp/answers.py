"""What the agent gets back from ``/mcp/{server}``: each answer shaped for this principal (CONTRACT §7, §11).

- ``tools/list``: only configured tools whose definition matches its pin (every configured entry is shown to the
  pins, listed or not, so a swap is seen whoever lists) and that policy lets this (subject, actor) see; the
  result is marked ``cacheScope: "private"`` (2026-07-28 caching: it depends on who asks, so no shared cache may
  serve it to anyone else; older clients ignore the member).
- ``tools/call``: masked with the ``/v1`` tool of the same name's response filters, on ``structuredContent`` and
  on every text content that holds JSON. Anything a filtered tool returns that cannot be filtered — text that is
  not JSON, images, embedded resources, duplicate members — is refused (HOSTILE P26: fail closed), never passed.
- ``initialize`` / ``server/discover``: the capabilities narrowed to what the broker relays (tools).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from broker.errors import UpstreamError
from broker.gateway.filters import ToolFilters
from broker.identity.principal import Principal
from broker.mcp import jsonrpc as rpc
from broker.mcp.pins import PinBook
from broker.mcp.relay import Transform, dumps
from broker.mcp.upstream import McpUpstream

__all__ = ["call_transform", "capabilities_transform", "listing_transform"]


def listing_transform(pins: PinBook, upstream: McpUpstream, visible: frozenset[str]) -> Transform:
    """tools/list: keep configured, pinned, visible tools; the result is this principal's (cacheScope private)."""

    async def transform(message: dict[str, Any]) -> dict[str, Any]:
        result = message.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return message
        now = time.time()
        kept = []
        for entry in result["tools"]:
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str) or name not in upstream.digests:
                continue
            # observe every configured tool, shown or not: a swap is detected whoever lists
            if pins.observe(upstream.name, name, upstream.digests[name], entry, now) and name in visible:
                kept.append(entry)
        # 2026-07-28 caching: the list depends on who asks, so no shared cache may serve it to anyone else
        return {**message, "result": {**result, "tools": kept, "cacheScope": "private"}}

    return transform


async def capabilities_transform(message: dict[str, Any]) -> dict[str, Any]:
    """initialize / server/discover: advertise only what the broker relays (tools), nothing else."""
    result = message.get("result")
    if isinstance(result, dict) and isinstance(result.get("capabilities"), dict):
        capabilities = {k: v for k, v in result["capabilities"].items() if k == "tools"}
        return {**message, "result": {**result, "capabilities": capabilities}}
    return message


def call_transform(
    filters: ToolFilters | None, principal: Principal, on_failure: Callable[[str], None]
) -> Transform:
    """tools/call: mask ``structuredContent`` and JSON text contents; anything else of a filtered tool is refused."""

    async def transform(message: dict[str, Any]) -> dict[str, Any]:
        result = message.get("result")
        if filters is None or not filters.filters_response or not isinstance(result, dict):
            return message
        try:
            return {**message, "result": _masked_result(filters, principal, result)}
        except (UpstreamError, ValueError, TypeError) as exc:  # P26: fail closed
            on_failure("response_unfilterable")
            raise rpc.JsonRpcError(
                rpc.INTERNAL_ERROR,
                "the tool's answer could not be filtered",
                "response_unfilterable",
                http_status=200,
            ) from exc

    return transform


def _masked_result(filters: ToolFilters, principal: Principal, result: dict[str, Any]) -> dict[str, Any]:
    def masked_bytes(body: bytes) -> bytes:
        # filter_response parses strictly itself (UTF-8, duplicate members, depth: P26) and refuses non-JSON
        return filters.filter_response(body, subject=principal.claims, actor_id=principal.actor_id)

    masked = dict(result)
    structured: tuple[Any, str] | None = None  # (upstream value, its masked JSON text)
    if "structuredContent" in result:
        text = masked_bytes(dumps(result["structuredContent"]).encode("utf-8")).decode("utf-8")
        masked["structuredContent"] = json.loads(text)  # the filter's own output: plain JSON
        structured = (result["structuredContent"], text)
    content = result.get("content", [])
    if not isinstance(content, list):
        raise UpstreamError("unfilterable", reason="response_unfilterable")
    items = []
    for item in content:
        # only parsed JSON can be masked: non-JSON text, images, resources … of a filtered tool are refused
        if not isinstance(item, dict) or item.get("type") != "text" or not isinstance(item.get("text"), str):
            raise UpstreamError("unfilterable", reason="response_unfilterable")
        items.append({**item, "text": _masked_text(item["text"], structured, masked_bytes)})
    masked["content"] = items
    return masked


def _masked_text(
    text: str, structured: tuple[Any, str] | None, masked_bytes: Callable[[bytes], bytes]
) -> str:
    """The masked form of one text content. The usual SDK answer repeats ``structuredContent`` as JSON text:
    when the text parses to the very same value it is replaced by the masked structured value (rendered by the
    broker, so nothing of the original text survives) instead of being filtered a second time."""
    if structured is not None:
        try:
            same = json.loads(text) == structured[0]
        except ValueError:
            same = False
        if same:
            return structured[1]
    return masked_bytes(text.encode("utf-8")).decode("utf-8")
