"""broker.mcp.jsonrpc: client message rules and 2026-07-28 header checks (HOSTILE P20–P23; CONTRACT §7)."""

from __future__ import annotations

from typing import Any

import pytest

from broker.mcp import jsonrpc as rpc

# ---------------------------------------------------------------------------------------------------------
# factories

CALL: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {"name": "listInvoices", "arguments": {"department": "42"}},
}
META = {rpc.PROTOCOL_VERSION_META: "2026-07-28", rpc.CLIENT_CAPABILITIES_META: {}}


def make_call(**overrides: Any) -> dict[str, Any]:
    return {**CALL, **overrides}


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in CALL.items() if k != key}


def modern_call(name: str = "listInvoices", **params: Any) -> rpc.Message:
    return rpc.parse_message(make_call(params={"name": name, "arguments": {}, "_meta": META, **params}))


MODERN_HEADERS = [
    ("MCP-Protocol-Version", "2026-07-28"),
    ("Mcp-Method", "tools/call"),
    ("Mcp-Name", "listInvoices"),
]


def headers_with(**changes: str | None) -> list[tuple[str, str]]:
    out = [(k, v) for k, v in MODERN_HEADERS if k.lower().replace("-", "_") not in changes]
    out += [(k.replace("_", "-"), v) for k, v in changes.items() if v is not None]
    return out


# ---------------------------------------------------------------------------------------------------------
# parse_message


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ([CALL, CALL], "jsonrpc_batch"),
        ([], "jsonrpc_batch"),
        ("tools/call", "jsonrpc_not_object"),
        (make_call(id=None), "jsonrpc_id_type"),
        (make_call(id=True), "jsonrpc_id_type"),
        (make_call(id=1.5), "jsonrpc_id_type"),
        (make_call(id={"a": 1}), "jsonrpc_id_type"),
        (make_call(id="x" * 257), "jsonrpc_id_too_long"),
        (make_call(method="Tools/Call"), "jsonrpc_unknown_method"),
        (make_call(method="tools/call "), "jsonrpc_unknown_method"),
        (make_call(method="tools/call\u0000"), "jsonrpc_unknown_method"),
        (make_call(method="tools/ca\u0131l"), "jsonrpc_unknown_method"),
        (make_call(method=["tools/call"]), "jsonrpc_method_type"),
        (without("method"), "jsonrpc_method_type"),
        (without("jsonrpc"), "jsonrpc_version"),
        (make_call(jsonrpc="1.0"), "jsonrpc_version"),
        (make_call(jsonrpc=2.0), "jsonrpc_version"),
        (make_call(params=["listInvoices"]), "jsonrpc_params_type"),
        (make_call(extra=1), "jsonrpc_extra_members"),
        ({"jsonrpc": "2.0", "id": 1, "result": {}}, "jsonrpc_client_response"),
        ({"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "x"}}, "jsonrpc_client_response"),
        (make_call(result={}), "jsonrpc_client_response"),
        ({"jsonrpc": "2.0", "method": "tools/call", "params": {}}, "jsonrpc_unknown_method"),
        ({"jsonrpc": "2.0", "id": 3, "method": "notifications/initialized"}, "jsonrpc_unknown_method"),
    ],
    ids=[
        "batch",
        "empty-batch",
        "not-object",
        "null-id",
        "bool-id",
        "float-id",
        "object-id",
        "long-id",
        "case",
        "trailing-space",
        "nul",
        "homoglyph",
        "method-not-string",
        "no-method",
        "no-jsonrpc",
        "jsonrpc-1.0",
        "jsonrpc-number",
        "params-array",
        "extra-member",
        "result",
        "error",
        "request-with-result",
        "request-without-id",
        "notification-with-id",
    ],
)
def test_p20_p22_p23_refused_messages_are_invalid_requests(value: Any, reason: str) -> None:
    with pytest.raises(rpc.JsonRpcError) as refused:
        rpc.parse_message(value)
    assert (refused.value.jsonrpc_code, refused.value.http_status, refused.value.reason) == (
        -32600,
        400,
        reason,
    )


@pytest.mark.parametrize(
    ("value", "method", "request_id"),
    [
        (CALL, "tools/call", 1),
        (make_call(id="abc"), "tools/call", "abc"),
        (make_call(id=0), "tools/call", 0),
        ({"jsonrpc": "2.0", "method": "notifications/initialized"}, "notifications/initialized", None),
        ({"jsonrpc": "2.0", "id": 9, "method": "ping"}, "ping", 9),
    ],
    ids=["call", "string-id", "zero-id", "notification", "no-params"],
)
def test_accepted_messages(value: Any, method: str, request_id: Any) -> None:
    message = rpc.parse_message(value)
    assert (message.method, message.id, message.is_request) == (method, request_id, request_id is not None)
    assert message.as_json() == value


def test_as_json_replaces_params_and_keeps_the_rest() -> None:
    message = rpc.parse_message(CALL)
    forwarded = message.as_json({"name": "listInvoices", "arguments": {"department": "7"}})
    assert forwarded == make_call(params={"name": "listInvoices", "arguments": {"department": "7"}})


@pytest.mark.parametrize(
    ("method", "era", "status"),
    [
        ("resources/read", "handshake", 200),
        ("prompts/list", "modern", 404),
        ("initialize", "modern", 404),
        ("server/discover", "handshake", 200),
    ],
    ids=["resources-legacy", "prompts-modern", "initialize-modern", "discover-legacy"],
)
def test_methods_outside_the_relayed_set_are_method_not_found(method: str, era: str, status: int) -> None:
    message = rpc.parse_message({"jsonrpc": "2.0", "id": 1, "method": method})
    with pytest.raises(rpc.JsonRpcError) as refused:
        rpc.check_relayed(message, era)
    assert (refused.value.jsonrpc_code, refused.value.http_status) == (-32601, status)


@pytest.mark.parametrize(
    ("method", "era"),
    [
        ("tools/call", "modern"),
        ("tools/list", "handshake"),
        ("initialize", "handshake"),
        ("server/discover", "modern"),
    ],
)
def test_relayed_methods_pass(method: str, era: str) -> None:
    rpc.check_relayed(rpc.parse_message({"jsonrpc": "2.0", "id": 1, "method": method}), era)


# ---------------------------------------------------------------------------------------------------------
# 2026-07-28 headers


def test_matching_modern_headers_give_the_version() -> None:
    assert rpc.check_modern_headers(modern_call(), MODERN_HEADERS) == "2026-07-28"


@pytest.mark.parametrize(
    ("message", "headers", "code", "reason"),
    [
        (modern_call(), headers_with(mcp_name="approveExpense"), -32020, "header_mismatch:mcp-name"),
        (modern_call(), headers_with(mcp_name=None), -32020, "header_mismatch:mcp-name"),
        (modern_call(), headers_with(mcp_name="listinvoices"), -32020, "header_mismatch:mcp-name"),
        (modern_call(), headers_with(mcp_method="tools/list"), -32020, "header_mismatch:mcp-method"),
        (modern_call(), headers_with(mcp_method=None), -32020, "header_mismatch:mcp-method"),
        (
            modern_call(),
            headers_with(mcp_protocol_version=None),
            -32020,
            "header_mismatch:mcp-protocol-version",
        ),
        (
            modern_call(),
            [*MODERN_HEADERS, ("mcp-name", "listInvoices")],
            -32020,
            "header_mismatch:mcp-name (sent more than once)",
        ),
        (
            modern_call(_meta={**META, rpc.PROTOCOL_VERSION_META: "2025-11-25"}),
            MODERN_HEADERS,
            -32020,
            "header_mismatch:mcp-protocol-version",
        ),
        (modern_call(_meta={rpc.CLIENT_CAPABILITIES_META: {}}), MODERN_HEADERS, -32602, "envelope_missing"),
        (rpc.parse_message(CALL), MODERN_HEADERS, -32602, "envelope_missing"),
        (
            modern_call(_meta={**META, rpc.PROTOCOL_VERSION_META: "2099-01-01"}),
            headers_with(mcp_protocol_version="2099-01-01"),
            -32022,
            "unsupported_protocol_version",
        ),
    ],
    ids=[
        "other-name",
        "no-name",
        "name-case",
        "other-method",
        "no-method",
        "no-version",
        "name-twice",
        "body-version",
        "no-envelope-version",
        "no-envelope",
        "unsupported",
    ],
)
def test_modern_header_mismatches(
    message: rpc.Message, headers: list[tuple[str, str]], code: int, reason: str
) -> None:
    with pytest.raises(rpc.JsonRpcError) as refused:
        rpc.check_modern_headers(message, headers)
    assert (refused.value.jsonrpc_code, refused.value.http_status, refused.value.reason) == (
        code,
        400,
        reason,
    )


def test_a_base64_encoded_name_matches() -> None:
    message = modern_call(name="résumé tool")
    encoded = rpc.encode_header_value("résumé tool")
    assert encoded.startswith("=?base64?")
    assert rpc.check_modern_headers(message, headers_with(mcp_name=encoded)) == "2026-07-28"


def test_routing_headers_are_rebuilt_from_the_forwarded_body() -> None:
    message = modern_call(name=" padded")
    assert rpc.routing_headers(message, "2026-07-28") == {
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": rpc.encode_header_value(" padded"),
    }


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("plain", "plain"),
        ("=?base64?aGk=?=", "hi"),
        ("=?base64?aGk?=", None),  # not padded: not canonical
        ("=?base64?aGl=?=", None),  # non-zero trailing bits
        ("=?base64?/w==?=", None),  # not UTF-8
        ("=?base64?!!!?=", None),
        (None, None),
    ],
    ids=["plain", "sentinel", "unpadded", "trailing-bits", "not-utf8", "not-base64", "absent"],
)
def test_decode_header_value(value: str | None, decoded: str | None) -> None:
    assert rpc.decode_header_value(value) == decoded
