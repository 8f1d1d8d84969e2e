"""One pipeline, two transports (CONTRACT §12): the same decision table through ``/v1`` and ``/mcp`` on one
running broker (config/examples/expense.yaml, real TLS, real DPoP, the official MCP SDK client and server).

Each row is decided twice — over HTTP (the token exchange, or an invocation for an edge tool) and as an MCP
``tools/call`` — and must give the same outcome (the error class, whose HTTP status and JSON-RPC code come from
one table in broker.errors), the same audit reason, and the same audit fields; nothing reaches an upstream.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from broker import errors
from broker.canonical import canonicalize
from broker.jose import b64url_encode
from broker.sdk.agent import AgentClient
from tests.certfactory import Pki
from tests.integration.test_mcp import McpStack, mcp_stack

ALICE = {"groups": ["finance-managers"], "department": "42", "approval_limit": 20000}
ALICE_MFA = {**ALICE, "acr": "mfa"}
BOB = {"groups": ["engineers"], "department": "42"}
INV = {"invoice_id": "INV-8831", "amount": 100, "department": "42"}
CODES = {
    cls.code: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.BrokerError)
}
#: audit fields that must agree between the two transports (``event`` names the transport, ``request_id`` differs)
SAME_FIELDS = ("decision", "reason", "subject", "actor", "tool", "args_digest", "policy_version")

# (id, who, claims, tool, arguments, expected error code)
TABLE = [
    ("missing-tool", "alice", ALICE, "noSuchTool", INV, "unknown_tool"),
    ("p21-hidden-for-bob", "bob", BOB, "approveExpense", INV, "unknown_tool"),
    ("hidden-with-bad-arguments", "bob", BOB, "approveExpense", {"amount": "x"}, "unknown_tool"),
    ("schema", "alice", ALICE, "approveExpense", {**INV, "amount": "100"}, "invalid_request"),
    ("row9-department", "alice", ALICE, "approveExpense", {**INV, "department": "7"}, "access_denied"),
    ("row10-limit", "alice", ALICE_MFA, "approveExpense", {**INV, "amount": 999999}, "access_denied"),
    (
        "row6-mfa",
        "alice",
        ALICE,
        "approveExpense",
        {**INV, "amount": 6000},
        "insufficient_user_authentication",
    ),
    ("row7-manager", "alice", ALICE_MFA, "approveExpense", {**INV, "amount": 6000}, "approval_required"),
    ("row8-dual", "alice", ALICE_MFA, "approveExpense", {**INV, "amount": 12000}, "approval_required"),
    ("row11-risk", "alice", {**ALICE, "risk_score": 85}, "approveExpense", INV, "approval_required"),
    ("list-other-department", "alice", ALICE, "listInvoices", {"department": "7"}, "access_denied"),
]


@pytest.fixture
async def stack(pki: Pki, tmp_path: Path) -> AsyncIterator[McpStack]:
    async with mcp_stack(pki, tmp_path) as running:
        yield running


async def _over_http(
    stack: McpStack, who: str, claims: dict[str, Any], tool: str, args: Any
) -> tuple[int, str]:
    client = AgentClient.from_certs(
        stack.public_url,
        stack.pki.root,
        agent="expense-assistant",
        human=None,
        access_token=stack.token(who, claims),
    )
    async with client:
        # approveExpense takes txn tokens: its decision is made at the exchange; listInvoices is an edge tool
        reply = await (
            client.call_tool(tool, args) if tool == "listInvoices" else client.exchange(tool, args)
        )
    return reply.status, str(reply.error)


async def _over_mcp(
    stack: McpStack, who: str, claims: dict[str, Any], tool: str, args: Any
) -> tuple[int, Any]:
    async with stack.client(who, claims) as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool(tool, args)
    return refused.value.code, refused.value.data


def _record(stack: McpStack, event: str) -> dict[str, Any]:
    (record,) = [r for r in stack.audit_records() if r["event"] == event and r.get("tool")]
    return record


@pytest.mark.parametrize(
    ("who", "claims", "tool", "arguments", "code"), [r[1:] for r in TABLE], ids=[r[0] for r in TABLE]
)
async def test_the_same_call_gets_the_same_decision_on_both_transports(
    stack: McpStack, who: str, claims: dict[str, Any], tool: str, arguments: Any, code: str
) -> None:
    expected = CODES[code]
    status, error = await _over_http(stack, who, claims, tool, arguments)
    assert (status, error) == (expected.status, code)
    rpc_code, data = await _over_mcp(stack, who, claims, tool, arguments)
    assert rpc_code == expected.jsonrpc_code
    if data is not None:
        assert data["error"] == code
    assert stack.calls_received() == []  # the MCP server saw no call
    http_event = "invocation" if tool == "listInvoices" else "exchange"
    http_record, mcp_record = _record(stack, http_event), _record(stack, "mcp")
    assert {f: http_record.get(f) for f in SAME_FIELDS} == {f: mcp_record.get(f) for f in SAME_FIELDS}
    if code not in ("unknown_tool", "invalid_request"):  # decided with its arguments: both digested them
        assert mcp_record["args_digest"] == b64url_encode(hashlib.sha256(canonicalize(arguments)).digest())
    first, _, rest = mcp_record["reason"].partition(": ")
    assert not rest.startswith(f"{first}: ")  # a rule id appears once in the reason
