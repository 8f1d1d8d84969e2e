"""broker.mcp.answers: the tools/list, tools/call and capability transforms (CONTRACT §7, §11; HOSTILE P26).

The authorisation stages themselves run against a real broker in tests/integration/test_mcp.py.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from broker.config.models import Tool
from broker.gateway.filters import compile_tool_filters
from broker.identity.principal import Principal
from broker.identity.spiffe import parse_spiffe_id
from broker.identity.tokens import AccessToken
from broker.mcp import jsonrpc as rpc
from broker.mcp.answers import call_transform, capabilities_transform, listing_transform
from broker.mcp.pins import PinBook, drift_counter
from broker.mcp.upstream import McpUpstream


def recorder(failures: list[str]) -> Callable[[str], Awaitable[None]]:
    """An ``on_failure`` callback (the endpoint writes an audit record) that remembers the reasons."""

    async def record(reason: str) -> None:
        failures.append(reason)

    return record


AGENT = "spiffe://example.org/agents/expense-assistant"
BANK = "DE89370400440532013000"
INVOICE = {"invoice_id": "INV-8831", "department": "42", "vendor": {"name": "Acme", "bank_account": BANK}}
FILTERS = compile_tool_filters(
    Tool.model_validate(
        {
            "name": "approveExpense",
            "upstream": {"url": "https://127.0.0.1:9/approve"},
            "inject": {"department": "subject.department"},
            "response": {"mask": [{"path": "vendor.bank_account", "keep_last": 4}]},
        }
    )
)


def make_principal(claims: dict[str, Any] | None = None) -> Principal:
    claims = {"sub": "alice", "department": "42", **(claims or {})}
    token = AccessToken(
        claims=claims,
        sub="alice",
        iss="https://idp.example.org",
        jti=None,
        exp=2**31,
        iat=0,
        nbf=None,
        cnf_jkt=None,
        cnf_x5t=None,
        act_sub=AGENT,
        client_id=None,
        token_hash="x",
        leeway=0,
    )
    return Principal(subject="alice", claims=claims, actor=parse_spiffe_id(AGENT), token=token, jkt=None)


def answer(result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "result": result}


def text(value: Any) -> dict[str, Any]:
    return {"type": "text", "text": value if isinstance(value, str) else json.dumps(value, indent=2)}


async def masked(result: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    failures: list[str] = []
    transform = call_transform(FILTERS, make_principal(), recorder(failures))
    try:
        return (await transform(answer(result)))["result"], failures
    except rpc.JsonRpcError as error:
        assert (error.jsonrpc_code, error.http_status) == (rpc.INTERNAL_ERROR, 200)
        return None, failures


async def test_structured_and_json_text_content_are_both_masked() -> None:
    result, failures = await masked(
        {"content": [text(INVOICE)], "structuredContent": INVOICE, "isError": False}
    )
    assert result is not None and failures == []
    assert result["structuredContent"]["vendor"]["bank_account"] == "****3000"
    assert json.loads(result["content"][0]["text"])["vendor"]["bank_account"] == "****3000"
    assert result["isError"] is False


@pytest.mark.parametrize(
    "result",
    [
        {"content": [text("the account is " + BANK)]},
        {"content": [text(json.dumps(BANK))]},
        {"content": [{"type": "image", "data": "aGk=", "mimeType": "image/png"}]},
        {"content": [{"type": "resource", "resource": {"uri": "x:", "text": json.dumps(INVOICE)}}]},
        {"content": [text('{"vendor": {"bank_account": "1"}, "vendor": {"bank_account": "' + BANK + '"}}')]},
        {"content": text(INVOICE)},
        {"content": [text(INVOICE)], "structuredContent": "not an object " + BANK},
    ],
    ids=[
        "plain-text",
        "json-string",
        "image",
        "embedded-resource",
        "duplicate-keys",
        "content-not-list",
        "structured-not-object",
    ],
)
async def test_what_cannot_be_masked_is_refused(result: dict[str, Any]) -> None:
    masked_result, failures = await masked(result)
    assert masked_result is None
    assert failures == ["response_unfilterable"]


async def test_unfiltered_tools_pass_unchanged_and_a_filtered_tools_error_keeps_only_its_code() -> None:
    message = answer({"content": [text("free text " + BANK)]})
    assert await call_transform(None, make_principal(), recorder([]))(message) == message
    error = rpc.error_body(1, -32602, "Unknown tool: x " + BANK, {"account": BANK})
    assert await call_transform(FILTERS, make_principal(), recorder([]))(error) == rpc.error_body(
        1, -32602, "Invalid params"
    )


def upstream(*tools: str) -> McpUpstream:
    return McpUpstream(
        name="expenses",
        url=None,
        ssl_context=None,
        timeout=1,
        connect_timeout=1,  # type: ignore[arg-type]
        digests={t: None for t in tools},
        allowed_origins=frozenset(),
    )


def listing(*names: str) -> dict[str, Any]:
    return answer(
        {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in names], "nextCursor": "c2"}
    )


async def test_listing_keeps_configured_pinned_visible_tools_and_is_private() -> None:
    pins = PinBook(drift_counter(CollectorRegistry()))
    transform = listing_transform(
        pins,
        upstream("approveExpense", "listInvoices", "purgeInvoices"),
        frozenset({"approveExpense", "listInvoices"}),
    )
    result = (await transform(listing("approveExpense", "listInvoices", "purgeInvoices", "unconfigured")))[
        "result"
    ]
    assert [t["name"] for t in result["tools"]] == ["approveExpense", "listInvoices"]
    assert result["cacheScope"] == "private" and result["nextCursor"] == "c2"
    # every configured tool was pinned, shown or not
    assert pins.usable("expenses", "purgeInvoices", None) is not None
    assert pins.usable("expenses", "unconfigured", None) is None


async def test_listing_hides_a_drifted_tool() -> None:
    pins = PinBook(drift_counter(CollectorRegistry()))
    transform = listing_transform(pins, upstream("listInvoices"), frozenset({"listInvoices"}))
    await transform(listing("listInvoices"))
    swapped = answer(
        {"tools": [{"name": "listInvoices", "description": "new", "inputSchema": {"type": "object"}}]}
    )
    assert (await transform(swapped))["result"]["tools"] == []


@pytest.mark.parametrize(
    "entry",
    [{"name": 7}, "listInvoices", {"description": "no name"}],
    ids=["name-not-string", "not-object", "no-name"],
)
async def test_malformed_listing_entries_are_dropped(entry: Any) -> None:
    pins = PinBook(drift_counter(CollectorRegistry()))
    transform = listing_transform(pins, upstream("listInvoices"), frozenset({"listInvoices"}))
    assert (await transform(answer({"tools": [entry]})))["result"]["tools"] == []


async def test_capabilities_are_narrowed_to_tools() -> None:
    message = answer(
        {
            "protocolVersion": "2025-11-25",
            "capabilities": {
                "tools": {"listChanged": True},
                "resources": {},
                "prompts": {},
                "completions": {},
                "logging": {},
            },
        }
    )
    narrowed = await capabilities_transform(message)
    assert narrowed["result"]["capabilities"] == {"tools": {"listChanged": True}}
    assert narrowed["result"]["protocolVersion"] == "2025-11-25"
