"""The HTTP-level checks of a request to ``/mcp/{server}`` (MCP Streamable HTTP transports; HOSTILE P18, P19, P25).

Each raises :class:`broker.mcp.jsonrpc.JsonRpcError` (a JSON-RPC error body with its HTTP status) or a
:class:`broker.errors.BrokerError`; none reads anything but the request's headers and the body it is given.
A header the broker relies on may appear at most once: first-copy and last-copy readers would disagree.
"""

from __future__ import annotations

import re
from typing import Final

from aiohttp import web

from broker.canonical import strict_loads
from broker.errors import InvalidRequest, UnsupportedMediaType
from broker.mcp import jsonrpc as rpc
from broker.mcp.upstream import JSON, McpUpstream

__all__ = [
    "LAST_EVENT_ID",
    "SESSION_ID",
    "check_origin",
    "parse_body",
    "protocol_era",
    "require_accept",
    "require_json",
    "session_id_of",
    "single_header",
]

#: 2025-06-18 transports: a session id holds only visible ASCII (0x21–0x7E); ours are also bounded
SESSION_ID: Final = re.compile(r"[\x21-\x7e]{1,256}")
LAST_EVENT_ID: Final = re.compile(r"[\x20-\x7e]{1,256}")
#: the agent's arguments nest two levels below the message (message → params → arguments)
ENVELOPE_DEPTH: Final = 2


def require_json(request: web.Request) -> None:
    """HOSTILE P15, P19: one uncompressed ``application/json`` (UTF-8) body, else 415."""
    if request.content_type != JSON or request.charset not in (None, "utf-8"):
        raise UnsupportedMediaType("send one JSON-RPC message as application/json", reason="body_not_json")
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise UnsupportedMediaType("compressed request bodies are not accepted", reason="body_encoded")


def parse_body(body: bytes, max_json_depth: int) -> rpc.Message:
    """Strict JSON (UTF-8 only, no duplicate members, bounded depth: P17, P18, P22), then one client message."""
    try:
        value = strict_loads(body, max_depth=max_json_depth + ENVELOPE_DEPTH)
    except InvalidRequest as exc:
        raise rpc.JsonRpcError(rpc.PARSE_ERROR, "Parse error", exc.reason) from exc
    return rpc.parse_message(value)


def single_header(request: web.Request, name: str) -> str | None:
    values = request.headers.getall(name, [])
    if len(values) > 1:
        raise rpc.invalid(f"send at most one {name} header", f"duplicate_{name.lower()}")
    return values[0] if values else None


def check_origin(request: web.Request, upstream: McpUpstream) -> None:
    """Transports spec: an ``Origin`` that is present and not allowed is 403 (DNS rebinding)."""
    origin = single_header(request, "Origin")
    if origin is not None and origin not in upstream.allowed_origins:
        raise rpc.JsonRpcError(
            rpc.INVALID_REQUEST, "Origin not allowed", "origin_not_allowed", http_status=403
        )


def protocol_era(request: web.Request) -> tuple[str, str]:
    """``("modern", version)`` for 2026-07-28, ``("handshake", version)`` for a session-era version or none
    (then 2025-03-26, as the transports spec says), else 400 ``-32022`` naming what is supported."""
    version = single_header(request, "MCP-Protocol-Version")
    if version in rpc.MODERN_VERSIONS:
        return "modern", str(version)
    if version is None or version in rpc.HANDSHAKE_VERSIONS:
        return "handshake", version or rpc.DEFAULT_HANDSHAKE_VERSION
    supported = [*rpc.HANDSHAKE_VERSIONS, *rpc.MODERN_VERSIONS]
    raise rpc.JsonRpcError(
        rpc.UNSUPPORTED_PROTOCOL_VERSION,
        "Unsupported protocol version",
        "unsupported_protocol_version",
        data={"supported": supported, "requested": version[:64]},
    )


def require_accept(request: web.Request, *wanted: str) -> None:
    """The client must accept what the upstream may answer with (transports spec), else 406."""
    offered = {part.split(";")[0].strip().lower() for part in request.headers.get("Accept", "").split(",")}
    for media in wanted:
        kind = media.split("/")[0]
        if not offered & {media, "*/*", f"{kind}/*"}:
            raise rpc.JsonRpcError(
                rpc.INVALID_REQUEST, f"Accept must include {media}", "not_acceptable", http_status=406
            )


def session_id_of(request: web.Request) -> str | None:
    value = single_header(request, "Mcp-Session-Id")
    if value is not None and not SESSION_ID.fullmatch(value):
        raise rpc.invalid("malformed Mcp-Session-Id", "session_id_malformed")
    return value
