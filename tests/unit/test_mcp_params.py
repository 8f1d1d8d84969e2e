"""broker.mcp.params: Mcp-Param-* headers mirror x-mcp-header arguments (MCP 2026-07-28; -32020)."""

from __future__ import annotations

from typing import Any

import pytest

from broker.mcp import jsonrpc as rpc
from broker.mcp.params import check_param_headers, param_headers

SCHEMA = {
    "type": "object",
    "properties": {
        "region": {"type": "string", "x-mcp-header": "Region"},
        "count": {"type": "integer", "x-mcp-header": "Count"},
        "nested": {"type": "object", "properties": {"flag": {"type": "boolean", "x-mcp-header": "Flag"}}},
        "amount": {"type": "number", "x-mcp-header": "Amount"},  # numbers may not be mirrored: ignored
    },
}


def test_param_headers_mirror_annotated_arguments() -> None:
    arguments = {"region": "eu west", "count": 3, "nested": {"flag": True}, "amount": 1.5}
    assert param_headers(SCHEMA, arguments) == {
        "Mcp-Param-Region": "eu west",
        "Mcp-Param-Count": "3",
        "Mcp-Param-Flag": "true",
    }


@pytest.mark.parametrize(
    ("arguments", "headers"),
    [
        ({"region": "eu"}, [("mcp-param-region", "eu")]),
        ({"count": 42.0}, [("Mcp-Param-Count", "42")]),
        ({"count": 42}, [("Mcp-Param-Count", "42.0")]),
        ({}, []),
    ],
    ids=["string", "integral-float", "decimal-header", "none"],
)
def test_matching_param_headers_pass(arguments: dict[str, Any], headers: list[tuple[str, str]]) -> None:
    check_param_headers(SCHEMA, arguments, headers)


@pytest.mark.parametrize(
    ("arguments", "headers"),
    [
        ({"region": "eu"}, [("Mcp-Param-Region", "us")]),
        ({"region": "eu"}, []),
        ({}, [("Mcp-Param-Region", "eu")]),
        ({"region": "eu"}, [("Mcp-Param-Region", "eu"), ("mcp-param-region", "eu")]),
        ({"count": 42}, [("Mcp-Param-Count", "42.5")]),
        ({"nested": {"flag": False}}, [("Mcp-Param-Flag", "true")]),
        ({"region": "eu"}, [("Mcp-Param-Region", "=?base64?!!?=")]),
    ],
    ids=[
        "other-value",
        "missing-header",
        "header-without-argument",
        "twice",
        "fraction",
        "nested",
        "bad-base64",
    ],
)
def test_param_header_mismatches_are_refused(
    arguments: dict[str, Any], headers: list[tuple[str, str]]
) -> None:
    with pytest.raises(rpc.JsonRpcError) as refused:
        check_param_headers(SCHEMA, arguments, headers)
    assert refused.value.jsonrpc_code == -32020


def test_a_schema_without_annotations_ignores_param_headers() -> None:
    check_param_headers({"type": "object"}, {"region": "eu"}, [("Mcp-Param-Region", "us")])
    assert param_headers({"type": "object"}, {"region": "eu"}) == {}


@pytest.mark.parametrize(
    "schema",
    [
        {"properties": {"a": {"type": "string", "x-mcp-header": "bad token"}}},
        {"properties": {"a": {"type": "number", "x-mcp-header": "A"}}},
        {"properties": {"a": {"type": "object", "properties": {}, "x-mcp-header": "A"}}},
        {"anyOf": [{"properties": {"a": {"type": "string", "x-mcp-header": "A"}}}]},
        {"type": "string", "x-mcp-header": "Root"},
    ],
    ids=["not-a-token", "number", "object", "under-anyOf", "root"],
)
def test_annotations_that_do_not_count(schema: dict[str, Any]) -> None:
    assert param_headers(schema, {"a": "x"}) == {}
