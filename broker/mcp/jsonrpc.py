"""JSON-RPC 2.0 and MCP Streamable HTTP message rules for ``/mcp/{server}``: pure, no I/O (CONTRACT §7).

What a client may send (HOSTILE P20–P23, P25):

- exactly one JSON-RPC object per POST: a batch (array) is refused with HTTP 400 / ``-32600`` and nothing is
  forwarded (P20);
- ``jsonrpc`` exactly ``"2.0"``; ``method`` a string that is *exactly* one of the MCP methods below (no case,
  whitespace or NUL variants: P22); a request ``id`` is a string or an integer, never null, bool or float
  (MCP: "the ID MUST NOT be null"); ``params`` an object; no other members;
- never a response object (``result``/``error``): the broker relays no server-to-client requests, so a client
  response has nothing legitimate to answer (P23).

A well-formed method the broker does not relay (resources, prompts, …) is ``-32601``; anything that is not an MCP
method at all is ``-32600`` (the allowlist is exact-match; deny by default).

Stateless era (2026-07-28): ``MCP-Protocol-Version``, ``Mcp-Method`` and ``Mcp-Name`` must agree with the body
(HTTP 400 + ``-32020``); header values use the spec's ``=?base64?…?=`` sentinel for non-token text. ``Mcp-Param-*``
headers are checked in :mod:`broker.mcp.params`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from broker.errors import BrokerError

__all__ = [
    "HANDSHAKE_VERSIONS",
    "MODERN_VERSIONS",
    "JsonRpcError",
    "Message",
    "check_modern_headers",
    "decode_header_value",
    "encode_header_value",
    "error_body",
    "parse_message",
]

# --- protocol constants ------------------------------------------------------------------------------------

#: the session (initialize handshake) era we relay; 2024-11-05 predates Streamable HTTP
HANDSHAKE_VERSIONS: Final = ("2025-03-26", "2025-06-18", "2025-11-25")
#: the stateless per-request-envelope era
MODERN_VERSIONS: Final = ("2026-07-28",)
#: 2025-06-18 transports: a server without the header and no other way to know "SHOULD assume 2025-03-26"
DEFAULT_HANDSHAKE_VERSION: Final = "2025-03-26"
#: versions whose clients understand URLElicitationRequiredError (-32042); 2026-07-28 retired it
URL_ELICITATION_VERSIONS: Final = ("2025-11-25",)
PROTOCOL_VERSION_META: Final = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_META: Final = "io.modelcontextprotocol/clientCapabilities"

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
HEADER_MISMATCH: Final = -32020
UNSUPPORTED_PROTOCOL_VERSION: Final = -32022
URL_ELICITATION_REQUIRED: Final = -32042
# The broker's refusals, in the implementation-defined band -32000..-32019 (2026-07-28 allocation policy),
# clear of the SDK's own -32000 (connection closed) and -32001 (request timeout).
ACCESS_DENIED: Final = -32010
STEP_UP_REQUIRED: Final = -32011
APPROVAL_REQUIRED: Final = -32012
#: MCP tools spec: an unknown tool is a protocol error with -32602; a hidden tool answers exactly the same
UNKNOWN_TOOL: Final = INVALID_PARAMS

#: every client-to-server request method of 2025-03-26 … 2026-07-28 (anything else is not MCP: -32600)
KNOWN_REQUESTS: Final = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "tasks/get",
        "tasks/list",
        "tasks/result",
        "tasks/cancel",
        "server/discover",
        "subscriptions/listen",
    }
)
KNOWN_NOTIFICATIONS: Final = frozenset(
    {
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/roots/list_changed",
        "notifications/elicitation/complete",
    }
)
#: what the broker forwards: the tool surface and the lifecycle around it (deny by default)
RELAYED_REQUESTS: Final = {
    "handshake": frozenset({"initialize", "ping", "tools/list", "tools/call"}),
    "modern": frozenset({"server/discover", "ping", "tools/list", "tools/call"}),
}
RELAYED_NOTIFICATIONS: Final = frozenset(
    {"notifications/initialized", "notifications/cancelled", "notifications/progress"}
)
#: body member mirrored in ``Mcp-Name`` (2026-07-28 transports, "Standard headers")
NAME_BEARING: Final = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
MAX_ID_CHARS: Final = 256
_MEMBERS: Final = frozenset({"jsonrpc", "id", "method", "params"})


class JsonRpcError(BrokerError):
    """A refusal of the JSON-RPC exchange itself — framing, method, headers, a session, an answer that cannot be
    relayed — as opposed to a decision about a call (those are the pipeline's BrokerErrors). One family: its
    JSON-RPC code and the HTTP status it goes out with are the instance's; ``code`` is the label audit and
    metrics use. ``reason`` is the precise cause for audit and logs; the message and ``data`` are what the
    client sees."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: str,
        *,
        http_status: int = 400,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, headers=dict(headers or {}))
        self.jsonrpc_code = code
        self.status = http_status
        self.code = _LABELS.get(http_status, "invalid_request")
        self.data = data

    @property
    def http_status(self) -> int:
        return self.status

    @property
    def message(self) -> str:
        return self.description

    def jsonrpc_data(self) -> dict[str, Any] | None:
        return self.data  # type: ignore[no-any-return]

    def jsonrpc_body(self, request_id: str | int | None) -> dict[str, Any]:
        return error_body(request_id, self.jsonrpc_code, self.description, self.data)


#: the audit/metrics label of a protocol refusal, by the HTTP status it goes out with
_LABELS: Final = {403: "access_denied", 404: "not_found"}


def error_body(request_id: str | int | None, code: int, message: str, data: Any = None) -> dict[str, Any]:
    """A JSON-RPC error response; ``id`` null when the request's id could not be read (JSON-RPC 2.0 §5)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def invalid(message: str, reason: str) -> JsonRpcError:
    return JsonRpcError(INVALID_REQUEST, message, reason)


# --- messages ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One validated client message: a request (``id`` set) or a notification (``id`` None)."""

    method: str
    id: str | int | None
    params: dict[str, Any]
    has_params: bool

    @property
    def is_request(self) -> bool:
        return self.id is not None

    def as_json(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The message as it is forwarded (``params`` replaced when given)."""
        out: dict[str, Any] = {"jsonrpc": "2.0"}
        if self.id is not None:
            out["id"] = self.id
        out["method"] = self.method
        if params is not None or self.has_params:
            out["params"] = self.params if params is None else params
        return out


def parse_message(value: Any) -> Message:
    """Validate one decoded JSON body as a client message; raises :class:`JsonRpcError` (HTTP 400)."""
    if isinstance(value, list):
        raise invalid("batch requests are not accepted", "jsonrpc_batch")
    if not isinstance(value, dict):
        raise invalid("the body must be one JSON-RPC object", "jsonrpc_not_object")
    if "result" in value or "error" in value:
        raise invalid("responses from clients are not accepted", "jsonrpc_client_response")
    extra = set(value) - _MEMBERS
    if extra:
        raise invalid("unexpected members in the JSON-RPC object", "jsonrpc_extra_members")
    if value.get("jsonrpc") != "2.0" or type(value.get("jsonrpc")) is not str:
        raise invalid('jsonrpc must be "2.0"', "jsonrpc_version")
    method = value.get("method")
    if type(method) is not str:
        raise invalid("method must be a string", "jsonrpc_method_type")
    request_id: str | int | None = None
    if "id" in value:
        raw_id = value["id"]
        # MCP: string or integer, never null; bool is an int subclass in Python and a different JSON type
        if type(raw_id) is str:
            if len(raw_id) > MAX_ID_CHARS:
                raise invalid("id is too long", "jsonrpc_id_too_long")
        elif type(raw_id) is not int:
            raise invalid("id must be a string or an integer", "jsonrpc_id_type")
        request_id = raw_id
    known = KNOWN_NOTIFICATIONS if request_id is None else KNOWN_REQUESTS
    if method not in known:
        raise invalid("not an MCP method", "jsonrpc_unknown_method")
    params = value.get("params", {})
    if type(params) is not dict:
        raise invalid("params must be an object", "jsonrpc_params_type")
    return Message(method=method, id=request_id, params=params, has_params="params" in value)


def check_relayed(message: Message, era: str) -> None:
    """Requests outside the relayed set are ``-32601`` (HTTP 200, or 404 at 2026-07-28 per its status table)."""
    if message.method not in RELAYED_REQUESTS[era]:
        status = 404 if era == "modern" else 200
        raise JsonRpcError(METHOD_NOT_FOUND, "Method not found", "method_not_relayed", http_status=status)


# --- 2026-07-28 routing headers ----------------------------------------------------------------------------

_B64_SENTINEL = re.compile(r"^=\?base64\?(?P<payload>.*)\?=$")
_HEADER_SAFE = re.compile(r"^[\x20-\x7e]*$")


def encode_header_value(value: str) -> str:
    """Plain printable ASCII without edge whitespace as is; anything else as ``=?base64?<b64 UTF-8>?=``."""
    if _HEADER_SAFE.fullmatch(value) and value == value.strip() and not _B64_SENTINEL.fullmatch(value):
        return value
    return f"=?base64?{base64.b64encode(value.encode('utf-8')).decode('ascii')}?="


def decode_header_value(value: str | None) -> str | None:
    """Inverse of :func:`encode_header_value`; a malformed or non-canonical sentinel is None (never matches)."""
    if value is None:
        return None
    match = _B64_SENTINEL.fullmatch(value)
    if match is None:
        return value
    payload = match.group("payload")
    try:
        decoded = base64.b64decode(payload, validate=True)
        if base64.b64encode(decoded).decode("ascii") != payload:
            return None
        return decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def mismatch(what: str) -> JsonRpcError:
    return JsonRpcError(HEADER_MISMATCH, f"{what} does not match the request body", f"header_mismatch:{what}")


_ROUTING: Final = ("mcp-protocol-version", "mcp-method", "mcp-name")


def _routing(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The routing headers, each at most once: first-copy and last-copy readers would disagree."""
    found: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if key in _ROUTING:
            if key in found:
                raise mismatch(f"{key} (sent more than once)")
            found[key] = value
    return found


def check_modern_headers(message: Message, headers: Iterable[tuple[str, str]]) -> str:
    """The 2026-07-28 ladder: envelope present (-32602), headers agree with the body (-32020), version
    supported (-32022). Returns the protocol version. ``headers`` are the raw (name, value) pairs."""
    routing = _routing(headers)
    version, method, name = (routing.get(key) for key in _ROUTING)
    meta = message.params.get("_meta")
    if message.is_request:
        if not isinstance(meta, dict) or PROTOCOL_VERSION_META not in meta:
            raise JsonRpcError(
                INVALID_PARAMS, "params._meta must carry the protocol version", "envelope_missing"
            )
        # presence checked explicitly: an absent header must not equal a null body value
        if version is None or version != meta[PROTOCOL_VERSION_META]:
            raise mismatch("mcp-protocol-version")
    if method != message.method:
        raise mismatch("mcp-method")
    key = NAME_BEARING.get(message.method)
    if key is not None:
        body_value = message.params.get(key)
        if body_value is not None and decode_header_value(name) != body_value:
            raise mismatch("mcp-name")
    if version not in MODERN_VERSIONS:
        raise JsonRpcError(
            UNSUPPORTED_PROTOCOL_VERSION,
            "Unsupported protocol version",
            "unsupported_protocol_version",
            data={"supported": list(MODERN_VERSIONS), "requested": version},
        )
    return version


def routing_headers(message: Message, version: str) -> dict[str, str]:
    """The 2026-07-28 headers for a forwarded message, rebuilt from the body that is forwarded."""
    headers = {"MCP-Protocol-Version": version, "Mcp-Method": message.method}
    key = NAME_BEARING.get(message.method)
    value = message.params.get(key) if key is not None else None
    if isinstance(value, str):
        headers["Mcp-Name"] = encode_header_value(value)
    return headers
