"""Structured intent (CONTRACT §17, RFC 9396) on one running broker, through ``/v1`` and ``/mcp`` alike.

config/examples/expense.yaml with its REST tools pointed at a recording upstream and its MCP server the demo one;
real TLS, real DPoP, the official MCP SDK client. Alice's policy lets her see and call both tools: every narrowing
here comes from the ``authorization_details`` in her access token. A tool no entry lists is ``403 access_denied``
(CONTRACT §17: the agent holds its own token, so this reveals nothing); a listed tool called outside its
entry's constraints is ``403 access_denied`` naming the entry — before counters, txn token and guard, so nothing
is forwarded, reserved or consumed.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from broker import errors
from broker.resources import SERVICES
from broker.sdk.agent import AgentClient
from broker.txn.tokens import verify_txn_token
from tests.certfactory import Pki
from tests.conftest import RecordingUpstream
from tests.integration.test_mcp import McpStack, mcp_stack

AGENT = "spiffe://example.org/agents/expense-assistant"
ALICE = {"groups": ["finance-managers"], "department": "42", "approval_limit": 20000}
INV = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}


def intent(*entries: dict[str, Any]) -> dict[str, Any]:
    """Alice's claims with ``authorization_details`` made of ``entries``."""
    return {**ALICE, "authorization_details": list(entries)}


def approve(**members: Any) -> dict[str, Any]:
    return {"type": "tool_invocation", "tool": "approveExpense", **members}


LIST_ONLY = intent({"type": "tool_invocation", "tool": "listInvoices"})
UP_TO_1000 = intent(approve(constraints={"amount_max": 1000}))
UP_TO_5000 = intent(approve(constraints={"amount_max": 5000, "department": "42"}))


@pytest.fixture
async def stack(pki: Pki, tmp_path: Path, upstream: RecordingUpstream) -> AsyncIterator[McpStack]:
    def rest_to_recorder(config: dict[str, Any]) -> None:
        for tool in config["tools"]:  # the recorder echoes: no invoice shape for the response filters
            tool["upstream"]["url"] = f"{upstream.url}/{tool['name']}"
            tool.pop("response", None)

    async with mcp_stack(pki, tmp_path, edit_config=rest_to_recorder) as running:
        yield running


def agent(stack: McpStack, claims: dict[str, Any]) -> AgentClient:
    return AgentClient.from_certs(
        stack.public_url,
        stack.pki.root,
        agent="expense-assistant",
        access_token=stack.token("alice", claims),
    )


def details_form(
    client: AgentClient, tool: str, details: Any, *, keep_request_details: bool = False
) -> dict[str, str]:
    form = client.exchange_form(tool, {})
    if not keep_request_details:
        del form["request_details"]
    form["authorization_details"] = details if isinstance(details, str) else json.dumps(details)
    return form


async def approvals_counted(stack: McpStack) -> int:
    services = stack.running.app[SERVICES]
    counts = await services.runtime.current.counters.fetch(
        services.store, {"approvals_10m"}, subject="alice", actor_id=AGENT, now=time.time()
    )
    return int(counts["approvals_10m"]["count"])


def records(stack: McpStack, event: str) -> list[dict[str, Any]]:
    return [r for r in stack.audit_records() if r["event"] == event and r.get("tool")]


# --- discovery ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "shown"),
    [
        (ALICE, ["approveExpense", "listInvoices"]),
        (LIST_ONLY, ["listInvoices"]),
        (UP_TO_1000, ["approveExpense"]),
        (intent(approve(locations=["https://elsewhere.example.org"])), []),
        (intent({"type": "payment_initiation", "amount": 1}), ["approveExpense", "listInvoices"]),
    ],
    ids=["no-intent", "list-only", "approve-only", "entry-for-another-server", "other-types-ignored"],
)
async def test_discovery_shows_only_listed_tools_on_both_transports(
    stack: McpStack, claims: dict[str, Any], shown: list[str]
) -> None:
    async with agent(stack, claims) as client:
        reply = await client.list_tools()
    assert reply.status == 200
    tools = reply.json()["tools"]
    assert sorted(t["name"] for t in tools) == shown
    assert all(t["grant"] for t in tools)  # a grant for each listed tool, none for the others
    async with stack.client("alice", claims) as alice:
        assert sorted(t.name for t in (await alice.list_tools()).tools) == shown


# --- one decision, both transports ----------------------------------------------------------------------

# (id, claims, tool, arguments, error code, a part of the audit reason)
TABLE = [
    ("unlisted-tool", LIST_ONLY, "approveExpense", INV, "access_denied", "intent: not in the token's"),
    ("unlisted-tool-bad-arguments", LIST_ONLY, "approveExpense", {"amount": "x"}, "access_denied", "intent"),
    (
        "above-amount-max",
        UP_TO_1000,
        "approveExpense",
        INV,
        "access_denied",
        "intent: authorization_details[0] (approveExpense): amount must be a number at most amount_max 1000",
    ),
    (
        "exact-value-differs",
        intent(approve(constraints={"invoice_id": "INV-1"})),
        "approveExpense",
        INV,
        "access_denied",
        "authorization_details[0] (approveExpense): invoice_id must equal",
    ),
    (
        "exact-arguments-differ",
        intent(approve(arguments={**INV, "amount": 10})),
        "approveExpense",
        INV,
        "access_denied",
        "arguments must be exactly the entry's arguments",
    ),
]


@pytest.mark.parametrize(
    ("claims", "tool", "arguments", "code", "reason"), [r[1:] for r in TABLE], ids=[r[0] for r in TABLE]
)
async def test_outside_the_intent_is_refused_alike_on_both_transports(
    stack: McpStack,
    upstream: RecordingUpstream,
    claims: dict[str, Any],
    tool: str,
    arguments: dict[str, Any],
    code: str,
    reason: str,
) -> None:
    expected = {cls.code: cls for cls in (errors.UnknownTool, errors.AccessDenied)}[code]
    async with agent(stack, claims) as client:
        reply = await client.exchange(tool, arguments)
    assert (reply.status, reply.error) == (expected.status, code)
    async with stack.client("alice", claims) as alice:
        with pytest.raises(MCPError) as refused:
            await alice.call_tool(tool, arguments)
    assert refused.value.code == expected.jsonrpc_code
    (http_record,), (mcp_record,) = records(stack, "exchange"), records(stack, "mcp")
    assert reason in http_record["reason"] and http_record["reason"] == mcp_record["reason"]
    assert http_record["decision"] == mcp_record["decision"] == "deny"
    assert stack.calls_received() == [] and upstream.received == []
    if "authorization_details[0]" in reason:  # the client is told which entry
        assert reply.json()["error_description"].startswith(
            "outside the token's intent: authorization_details[0]"
        )
        assert refused.value.data["constraint"].startswith(
            "outside the token's intent: authorization_details[0]"
        )


async def test_within_the_intent_the_call_passes_on_both_transports(stack: McpStack) -> None:
    async with agent(stack, UP_TO_5000) as client:
        reply = await client.exchange("approveExpense", INV)
    assert reply.status == 200 and reply.json()["access_token"]
    async with stack.client("alice", UP_TO_5000) as alice:
        answer = await alice.call_tool("approveExpense", INV)
    assert not answer.is_error and len(stack.calls_received()) == 1


async def test_above_amount_max_forwards_reserves_and_consumes_nothing(
    stack: McpStack, upstream: RecordingUpstream
) -> None:
    async with agent(stack, ALICE) as unbounded:  # a txn token policy allows, minted without intent
        minted = await unbounded.exchange("approveExpense", INV)
    assert minted.status == 200
    txn_token = minted.json()["access_token"]

    async with agent(stack, UP_TO_1000) as bounded:
        refused = await bounded.call_tool("approveExpense", INV, txn_token=txn_token)
    assert (refused.status, refused.error) == (403, "access_denied")
    async with stack.client("alice", UP_TO_1000) as alice:
        with pytest.raises(MCPError) as over_mcp:
            await alice.call_tool("approveExpense", INV)
    assert over_mcp.value.code == errors.AccessDenied.jsonrpc_code
    assert upstream.received == [] and stack.calls_received() == []
    assert await approvals_counted(stack) == 0

    async with agent(stack, ALICE) as unbounded:  # the txn token was not consumed: it still works, once
        passed = await unbounded.call_tool("approveExpense", INV, txn_token=txn_token)
    assert passed.status == 200 and len(upstream.received) == 1
    assert await approvals_counted(stack) == 1  # the counter does move for an executed call


# --- the exchange's authorization_details ---------------------------------------------------------------


async def test_exchange_with_authorization_details_locks_the_arguments(
    stack: McpStack, upstream: RecordingUpstream
) -> None:
    async with agent(stack, ALICE) as client:
        rich = await client.request(
            "POST",
            "/v1/token",
            data=details_form(
                client, "approveExpense", [approve(arguments=INV, locations=[stack.public_url])]
            ),
        )
        plain = await client.exchange("approveExpense", INV)
        assert rich.status == plain.status == 200
        keys = stack.running.app[SERVICES].signer.verification_keys(time.time())
        claims = [
            verify_txn_token(
                reply.json()["access_token"],
                keys=keys,
                issuer=stack.public_url,
                audience="example.org",
                now=time.time(),
                max_bytes=8192,
            )
            for reply in (rich, plain)
        ]
        assert claims[0].arguments == claims[1].arguments == INV
        assert claims[0].args_digest == claims[1].args_digest
        assert claims[0].claims["tctx"].keys() == claims[1].claims["tctx"].keys()

        token = rich.json()["access_token"]
        other = await client.call_tool("approveExpense", {**INV, "amount": 4799}, txn_token=token)
        assert (other.status, other.error) == (403, "txn_token_mismatch")
        assert upstream.received == []
        same = await client.call_tool("approveExpense", INV, txn_token=token)
        assert same.status == 200 and len(upstream.received) == 1


EXCHANGE_REFUSED = [
    ("both-forms", [approve(arguments=INV)], True, "invalid_request", "exchange_details_both"),
    (
        "several-entries",
        [approve(), approve()],
        False,
        "invalid_authorization_details",
        "exchange_details_entries",
    ),
    (
        "wrong-type",
        [{**approve(), "type": "payment"}],
        False,
        "invalid_authorization_details",
        "details_type",
    ),
    (
        "unknown-member",
        [approve(constraints={"amount_max": 1})],
        False,
        "invalid_authorization_details",
        "exchange_details_unknown_member",
    ),
    (
        "arguments-not-object",
        [approve(arguments=[1])],
        False,
        "invalid_authorization_details",
        "details_arguments",
    ),
    (
        "locations-elsewhere",
        [approve(locations=["https://elsewhere.example.org"])],
        False,
        "invalid_authorization_details",
        "exchange_details_locations",
    ),
    (
        "tool-not-the-scope",
        [approve(tool="listInvoices")],
        False,
        "invalid_authorization_details",
        "tool_mismatch",
    ),
    ("not-json", "[{", False, "invalid_request", "json_syntax"),
]


@pytest.mark.parametrize(
    ("details", "both", "code", "reason"),
    [r[1:] for r in EXCHANGE_REFUSED],
    ids=[r[0] for r in EXCHANGE_REFUSED],
)
async def test_unusable_exchange_authorization_details_are_400_and_mint_nothing(
    stack: McpStack, details: Any, both: bool, code: str, reason: str
) -> None:
    async with agent(stack, ALICE) as client:
        reply = await client.request(
            "POST",
            "/v1/token",
            data=details_form(client, "approveExpense", details, keep_request_details=both),
        )
    assert (reply.status, reply.error) == (400, code)
    assert "access_token" not in reply.json() and reply.json()["error_description"]
    (record,) = [r for r in stack.audit_records() if r["event"] == "exchange"]
    assert record["decision"] != "allow" and reason in record["reason"] and not record.get("txn")


# --- a token whose bounds cannot be read ----------------------------------------------------------------


@pytest.mark.parametrize(
    "details",
    [
        {"type": "tool_invocation", "tool": "approveExpense"},
        [approve(constraints={"amount_max": "5000"})],
        [approve(actions=["call"])],
        ["approveExpense"],
    ],
    ids=["not-an-array", "max-not-a-number", "unknown-member", "entry-not-an-object"],
)
async def test_unreadable_token_intent_is_invalid_token_on_both_transports(
    stack: McpStack, details: Any
) -> None:
    claims = {**ALICE, "authorization_details": details}
    async with agent(stack, claims) as client:
        reply = await client.list_tools()
    assert (reply.status, reply.error) == (401, "invalid_token")
    response = await stack.post(
        stack.http("alice", claims), {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    )
    assert response.status_code == 401 and "invalid_token" in response.headers.get("WWW-Authenticate", "")
