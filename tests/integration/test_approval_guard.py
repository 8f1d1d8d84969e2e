"""The approval path is guarded like the allow path (review finding: revoked principals and replayed DPoP proofs
still filed approval requests). A call refused with ``approval_required`` has acted — an approval record, a
slot of the principal's pending quota, webhooks, the approvers' list — so revocations and the proof's single use
are checked before it (``broker.gateway.guard.CallGuard``), on every transport of the one pipeline.

Real broker (config/examples/expense.yaml) on real TLS with real DPoP and SVIDs, state in the real Redis under a
unique key prefix; ``approveExpense`` takes edge tokens here, so that a plain REST invocation also reaches the
approval stage. Each transport runs the same steps: ``/v1/token``, ``/v1/tools/{name}``, MCP ``tools/call``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest

from broker.dev.idp import mint_access_token
from broker.jose import jwk_thumbprint
from broker.sdk.agent import AgentClient, ClientReply
from tests.certfactory import Pki
from tests.integration.test_mcp import McpStack, mcp_stack
from tests.redisutil import REDIS_URL, redis_stores

pytestmark = pytest.mark.redis

TRANSPORTS = ["exchange", "invoke", "mcp"]
ALICE_MFA = {"groups": ["finance-managers"], "department": "42", "approval_limit": 20000, "acr": "mfa"}
CAROL = {"groups": ["managers"], "acr": "mfa"}
AGENT = "spiffe://example.org/agents/expense-assistant"


def path_of(transport: str) -> str:
    return {"exchange": "/v1/token", "invoke": "/v1/tools/approveExpense", "mcp": "/mcp/expenses"}[transport]


def big(invoice: int) -> dict[str, Any]:
    """An amount that needs MFA and a manager's approval (row 7)."""
    return {"invoice_id": f"INV-{invoice}", "amount": 6000, "department": "42"}


@asynccontextmanager
async def on_redis(pki: Pki, tmp_path: Path) -> AsyncIterator[McpStack]:
    def edit(document: dict[str, Any]) -> None:
        document["state"] = {"backend": "redis", "redis_url": REDIS_URL, "key_prefix": prefix}
        (approve,) = [tool for tool in document["tools"] if tool["name"] == "approveExpense"]
        approve["txn_token"] = "edge"  # a REST invocation without a token reaches the approval stage

    async with redis_stores() as stores:  # a unique key prefix, deleted afterwards
        prefix = stores.prefix
        async with mcp_stack(pki, tmp_path, edit_config=edit) as stack:
            yield stack


@pytest.fixture
async def stack(pki: Pki, tmp_path: Path) -> AsyncIterator[McpStack]:
    async with on_redis(pki, tmp_path) as running:
        yield running


@asynccontextmanager
async def agent(stack: McpStack, sub: str) -> AsyncIterator[AgentClient]:
    client = AgentClient.from_certs(
        stack.public_url,
        stack.pki.root,
        agent="expense-assistant",
        access_token=stack.token(sub, ALICE_MFA),
    )
    async with client:
        yield client


async def call(
    client: AgentClient, transport: str, arguments: dict[str, Any], proof: str | None = None
) -> ClientReply:
    """One call of approveExpense over ``transport``; ``proof``: send this DPoP proof instead of a fresh one."""
    path = path_of(transport)
    headers = {"DPoP": proof} if proof is not None else {}
    if transport == "exchange":
        return await client.request(
            "POST", path, data=client.exchange_form("approveExpense", arguments), headers=headers
        )
    if transport == "invoke":
        return await client.request("POST", path, json=arguments, headers=headers)
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    message = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "approveExpense", "arguments": arguments, "_meta": meta},
    }
    stateless = {
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "approveExpense",
        "Accept": "application/json, text/event-stream",
    }
    return await client.request("POST", path, json=message, headers={**stateless, **headers})


def outcome(reply: ClientReply) -> tuple[str | None, str | None]:
    """(error code, approval id) of a refusal, from an HTTP error body or a JSON-RPC error's ``data``."""
    body = reply.json()
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):  # a JSON-RPC error (MCP tools/call, HTTP 200)
        data = error.get("data") or {}
        return data.get("error"), data.get("approval_id")
    return error, body.get("approval_id") if isinstance(body, dict) else None


async def listed(stack: McpStack) -> list[dict[str, Any]]:
    """The pending approvals an approver (carol, her own DPoP key, no certificate) sees."""
    key = json.loads(stack.pki.human_dpop("carol").read_text())
    token = mint_access_token(
        json.loads(stack.pki.idp_jwk.read_text()),
        sub="carol",
        now=time.time(),
        claims=CAROL,
        cnf_jkt=jwk_thumbprint(key),
        act_sub=None,
    )
    carol = AgentClient.from_certs(stack.public_url, stack.pki.root, human="carol", access_token=token)
    async with carol:
        reply = await carol.request("GET", "/v1/approvals")
    assert reply.status == 200, reply.json()
    return list(reply.json()["approvals"])


async def revoke(stack: McpStack, kind: str, value: str) -> None:
    async with httpx2.AsyncClient() as admin:
        answer = await admin.post(f"{stack.admin_url}/admin/revocations", json={"kind": kind, "value": value})
    assert answer.status_code == 200, answer.text


def last_refusal(stack: McpStack) -> dict[str, Any]:
    return [r for r in stack.audit_records() if r.get("tool") == "approveExpense"][-1]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_revoked_subject_or_agent_files_no_approval(stack: McpStack, transport: str) -> None:
    async with agent(stack, "erin") as erin:  # control: the call reaches the approval stage and files one
        filed = await call(erin, transport, big(1))
        assert outcome(filed)[0] == "approval_required", filed.json()
        erin_approval = outcome(filed)[1]
    assert [a["id"] for a in await listed(stack)] == [erin_approval]

    await revoke(stack, "sub", "alice")
    async with agent(stack, "alice") as alice:
        refused = await call(alice, transport, big(2))
    assert (refused.status, outcome(refused)) == (401, ("invalid_token", None))
    assert last_refusal(stack)["reason"] == "revoked_sub"

    await revoke(stack, "act", AGENT)  # now erin's agent too: a new call files nothing either
    async with agent(stack, "erin") as erin:
        refused = await call(erin, transport, big(3))
    assert (refused.status, outcome(refused)) == (401, ("invalid_token", None))
    assert last_refusal(stack)["reason"] == "revoked_act"

    assert [a["id"] for a in await listed(stack)] == [erin_approval]  # nothing filed after the revocations
    assert stack.calls_received() == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_dpop_proof_files_at_most_one_approval(stack: McpStack, transport: str) -> None:
    async with agent(stack, "alice") as alice:
        proof = alice.proof_for("POST", path_of(transport))
        first = await call(alice, transport, big(1), proof)
        assert outcome(first)[0] == "approval_required", first.json()
        again = await call(
            alice, transport, big(2), proof
        )  # the same proof, other arguments (DPoP covers none)
        assert (again.status, outcome(again)[0]) == (401, "invalid_dpop_proof")
        assert last_refusal(stack)["reason"] == "dpop_replay"
        fresh = await call(alice, transport, big(2))  # a fresh proof is still welcome
        assert outcome(fresh)[0] == "approval_required"
    ids = {a["id"] for a in await listed(stack)}
    assert ids == {outcome(first)[1], outcome(fresh)[1]}
    assert stack.calls_received() == []
