"""What the agent gets back from ``/mcp/{server}``: each answer shaped for this principal (CONTRACT §7, §11).

- ``tools/list``: only configured tools whose definition matches its pin (every configured entry is shown to the
  pins, listed or not, so a swap is seen whoever lists) and that policy lets this (subject, actor) see; the
  result is marked ``cacheScope: "private"`` (2026-07-28 caching: it depends on who asks, so no shared cache may
  serve it to anyone else; older clients ignore the member).
- ``tools/call`` of a tool with response filters (the ``/v1`` tool of the same name's), CONTRACT §12 "Responses
  fail closed": the whole message is the unit. Its documents — ``structuredContent`` and every text content, which
  must hold a JSON object or array — are filtered strictly (:meth:`broker.gateway.filters.ResponseFilter.
  document`: a path that does not match is a refusal); a text that is the same value as ``structuredContent`` (the
  SDKs' usual answer) is rendered from the filtered ``structuredContent``, so nothing of the original text
  survives. Then the whole result is sealed: rows outside the row filter's path refused, every member a mask names
  masked wherever it is (``_meta.vendor.bank_account``, content ``annotations``: MCP's own members — ``content``,
  ``structuredContent``, ``isError``, ``_meta`` of the result, ``type``, ``text``, ``annotations``, ``_meta`` of a
  content item — are not the tool's fields, though their values are walked), and every value the masks hid
  scrubbed from every string, key and number of every member — ``_meta``, content ``annotations`` and ``_meta``,
  ``isError``, members nobody documented. Anything that cannot be filtered — text that is not JSON, images, audio,
  resources, resource links, duplicate members, a result with no document at all — is refused (HOSTILE P26). A
  refusal is a JSON-RPC error (``-32603``, "the tool's answer could not be filtered"), and the endpoint writes a
  second audit record with the reason. An upstream JSON-RPC *error* for such a tool keeps its code but not its
  text or ``data`` (:func:`broker.mcp.relay.upstream_error`): there is no answer whose hidden values could be
  scrubbed from it, and free text cannot be filtered. Tools without response filters pass as sent.
- ``initialize``: rebuilt from what a client needs (:func:`initialize_answer`): ``protocolVersion``, the
  capabilities narrowed to what the broker relays (tools), ``serverInfo``'s name, title and version, and — from a
  server that is not masked — ``instructions``; an error as the relay passes it. ``server/discover``: the
  capabilities narrowed.

:func:`responses_filtered` says whether a server is *masked* (what else of its streams may pass:
:mod:`broker.mcp.relay`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from broker.canonical import strict_loads
from broker.errors import InvalidRequest, StateUnavailable, UpstreamError
from broker.gateway.filters import ResponseFilter, ToolFilters
from broker.identity.principal import Principal
from broker.mcp import jsonrpc as rpc
from broker.mcp.pins import PinBook
from broker.mcp.relay import Transform, dumps, rebuilt, upstream_error
from broker.mcp.upstream import UPSTREAM_JSON_DEPTH, McpUpstream
from broker.runtime import Runtime

__all__ = [
    "call_transform",
    "capabilities_transform",
    "initialize_answer",
    "listing_transform",
    "responses_filtered",
]

_NOT_FILTERED: Final = "the tool's answer could not be filtered"
#: the members of a tools/call result and of its content items that are MCP's own, not the tool's fields: a mask
#: naming a field of that name does not apply to them (their values are walked and scrubbed all the same)
_RESULT_MEMBERS: Final = frozenset({"content", "structuredContent", "isError", "_meta"})
_CONTENT_MEMBERS: Final = frozenset({"text", "annotations", "_meta"})


def responses_filtered(runtime: Runtime, upstream: McpUpstream) -> bool:
    """Whether any tool of this MCP server has response filters (its ``/v1`` namesake's): a *masked* server."""
    tools = runtime.tools
    return any(
        (tool := tools.get(name)) is not None and tool.filters.filters_response for name in upstream.digests
    )


def listing_transform(
    pins: PinBook,
    upstream: McpUpstream,
    visible: frozenset[str],
    on_failure: Callable[[str], Awaitable[None]] | None = None,
) -> Transform:
    """tools/list: keep configured, pinned, visible tools; the result is this principal's (cacheScope private).

    When the pins cannot be read (the state store is down) the agent gets a JSON-RPC error instead, and
    ``on_failure`` is told the reason (the endpoint writes a second audit record: the request was allowed, the
    agent got an error)."""

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
            try:
                pinned = await pins.observe(upstream.name, name, upstream.digests[name], entry, now)
            except StateUnavailable as exc:
                # the pins live in the state store; the answer may be streaming already (SSE): refuse in it
                if on_failure is not None:
                    await on_failure(exc.reason)
                raise rpc.JsonRpcError(
                    rpc.INTERNAL_ERROR,
                    "state store unavailable",
                    exc.reason,
                    http_status=503,
                    data={"error": "state_unavailable"},
                ) from exc
            if pinned and name in visible:
                kept.append(entry)
        # 2026-07-28 caching: the list depends on who asks, so no shared cache may serve it to anyone else
        return {**message, "result": {**result, "tools": kept, "cacheScope": "private"}}

    return transform


async def capabilities_transform(message: dict[str, Any]) -> dict[str, Any]:
    """server/discover: advertise only what the broker relays (tools), nothing else."""
    result = message.get("result")
    if isinstance(result, dict) and isinstance(result.get("capabilities"), dict):
        return {**message, "result": {**result, "capabilities": _capabilities(result["capabilities"])}}
    return message


def _capabilities(capabilities: dict[str, Any]) -> dict[str, Any]:
    """Only ``tools``, and of it only ``listChanged`` (a boolean)."""
    tools = capabilities.get("tools")
    if not isinstance(tools, dict):
        return {}
    changed = tools.get("listChanged")
    return {"tools": {"listChanged": changed} if type(changed) is bool else {}}


def initialize_answer(message: dict[str, Any], request_id: str | int, *, masked: bool) -> dict[str, Any]:
    """The ``initialize`` answer the agent gets, rebuilt: ``jsonrpc``, ``id`` and ``result`` or ``error``
    (:func:`broker.mcp.relay.rebuilt`: on a masked server an error keeps only its code). Of the result only
    ``protocolVersion`` (a string), ``capabilities`` (narrowed to tools), ``serverInfo`` (its ``name``, ``version``
    and ``title``, strings) and ``instructions`` (a string; not from a masked server: free text) are kept."""
    answer = rebuilt(message, request_id, masked=masked)
    result = answer.get("result")
    if "error" in answer:
        return answer
    if not isinstance(result, dict):
        raise UpstreamError("the MCP server's initialize answer is malformed", reason="upstream_not_mcp")
    out: dict[str, Any] = {}
    if type(result.get("protocolVersion")) is str:
        out["protocolVersion"] = result["protocolVersion"]
    capabilities = result.get("capabilities")
    out["capabilities"] = _capabilities(capabilities) if isinstance(capabilities, dict) else {}
    info = result.get("serverInfo")
    if isinstance(info, dict):
        out["serverInfo"] = {k: info[k] for k in ("name", "title", "version") if type(info.get(k)) is str}
    if not masked and type(result.get("instructions")) is str:
        out["instructions"] = result["instructions"]
    return {"jsonrpc": "2.0", "id": request_id, "result": out}


def call_transform(
    filters: ToolFilters | None, principal: Principal, on_failure: Callable[[str], Awaitable[None]]
) -> Transform:
    """tools/call: the answer of a tool with response filters, filtered and sealed whole (module docstring)."""

    async def transform(message: dict[str, Any]) -> dict[str, Any]:
        if filters is None or not filters.filters_response:
            return message
        if "error" in message:
            return upstream_error(message, message.get("id"))
        response = filters.response_filter(subject=principal.claims, actor_id=principal.actor_id)
        try:
            result = _filtered_result(response, message.get("result"))
        except UpstreamError as exc:  # P26: fail closed
            await on_failure(exc.reason)
            raise rpc.JsonRpcError(rpc.INTERNAL_ERROR, _NOT_FILTERED, exc.reason, http_status=200) from exc
        except (ValueError, TypeError, RecursionError) as exc:
            await on_failure("response_unfilterable")
            raise rpc.JsonRpcError(
                rpc.INTERNAL_ERROR, _NOT_FILTERED, "response_unfilterable", http_status=200
            ) from exc
        return {"jsonrpc": "2.0", "id": message.get("id"), "result": result}

    return transform


def _filtered_result(response: ResponseFilter, result: Any) -> dict[str, Any]:
    if type(result) is not dict:
        raise _unfilterable()
    content = result.get("content", [])
    if type(content) is not list:
        raise _unfilterable()
    documents = [_text_document(item) for item in content]
    has_structured = "structuredContent" in result
    if not has_structured and not documents:
        raise UpstreamError(_NOT_FILTERED, reason="response_shape")  # nothing the filters could apply to
    original = result.get("structuredContent")
    # compared before filtering (which works in place): the SDKs repeat structuredContent as JSON text
    same = [has_structured and document == original for document in documents]
    filtered = dict(result)  # every member stays, to be filtered and scrubbed by seal()
    structured = response.document(original) if has_structured else None
    if has_structured:
        filtered["structuredContent"] = structured
    # each item without its "type" (always "text", put back below): neither it nor its value is the tool's
    filtered["content"] = [
        {
            **{member: value for member, value in item.items() if member != "type"},
            "text": structured if is_same else response.document(document),
        }
        for item, document, is_same in zip(content, documents, same, strict=True)
    ]
    envelope = {id(filtered): _RESULT_MEMBERS} | {id(item): _CONTENT_MEMBERS for item in filtered["content"]}
    sealed = response.seal(filtered, envelope=envelope)
    if type(sealed) is not dict:
        raise _unfilterable()
    items = sealed.get("content")
    if type(items) is not list or len(items) != len(content):
        raise UpstreamError(_NOT_FILTERED, reason="response_mask_leak")  # a member name was a hidden value
    rendered = []
    for item in items:
        if type(item) is not dict or "text" not in item:
            raise UpstreamError(_NOT_FILTERED, reason="response_mask_leak")
        # the filtered, scrubbed document, rendered by the broker
        rendered.append({"type": "text", **item, "text": dumps(item["text"])})
    sealed["content"] = rendered
    return sealed


def _text_document(item: Any) -> Any:
    """The JSON document a text content holds; anything else of a filtered tool cannot be filtered."""
    if type(item) is not dict or item.get("type") != "text" or type(item.get("text")) is not str:
        raise _unfilterable()  # images, audio, resources, resource links, …
    try:
        document = strict_loads(item["text"].encode("utf-8"), max_depth=UPSTREAM_JSON_DEPTH)
    except (InvalidRequest, UnicodeEncodeError) as exc:
        raise _unfilterable() from exc
    if type(document) is not dict and type(document) is not list:
        raise _unfilterable()  # a bare string may itself hold JSON (P26)
    return document


def _unfilterable() -> UpstreamError:
    return UpstreamError(_NOT_FILTERED, reason="response_unfilterable")
