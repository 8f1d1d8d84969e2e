"""The reference expense scenario (CONTRACT §11) as a user runs it: config/examples/expense.yaml, the demo expense
backend, the agent-side client (broker.sdk.agent) with real SVIDs, DPoP proofs and tokens from the dev IdP."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from broker.audit.verify import verify_log
from broker.config.loader import load_config
from broker.dev.demo import expense
from broker.dev.idp import mint_access_token
from broker.jose import Signer, jwk_thumbprint
from broker.sdk.agent import AgentClient, ClientReply
from broker.server import RunningBroker, start
from tests.certfactory import Pki, client_ssl_context

ROOT = Path(__file__).resolve().parents[2]
AGENT = "spiffe://example.org/agents/expense-assistant"
ALICE = {"groups": ["finance-managers"], "department": "42", "approval_limit": 20000}
BOB = {"groups": ["engineers"], "department": "42"}
CAROL = {"groups": ["managers"], "acr": "mfa"}
DAVE = {"groups": ["managers"], "acr": "mfa"}
SAM = {"groups": ["security"], "acr": "mfa"}
INV_8831 = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Expense:
    pki: Pki
    running: RunningBroker
    backend_url: str
    public_url: str
    audit: Path
    clients: list[AgentClient]

    def token(
        self,
        sub: str,
        claims: dict[str, Any],
        *,
        agent: str | None = "expense-assistant",
        human: str | None = None,
    ) -> str:
        key_file = self.pki.agent(agent).dpop_jwk if agent else self.pki.human_dpop(human or sub)
        jkt = jwk_thumbprint(json.loads(key_file.read_text()))
        return mint_access_token(
            json.loads(self.pki.idp_jwk.read_text()),
            sub=sub,
            now=time.time(),
            claims=claims,
            cnf_jkt=jkt,
            act_sub=f"spiffe://example.org/agents/{agent}" if agent else None,
        )

    async def agent(
        self,
        sub: str,
        claims: dict[str, Any],
        *,
        agent: str = "expense-assistant",
        cert_of: str | None = None,
    ) -> AgentClient:
        client = AgentClient.from_certs(
            self.public_url,
            self.pki.root,
            agent=agent,
            human=None,
            access_token=self.token(sub, claims, agent=agent),
        )
        if cert_of is not None:  # present another agent's certificate (row 13)
            files = self.pki.agent(cert_of)
            client = AgentClient(
                self.public_url,
                ca=self.pki.ca,
                cert=files.cert,
                key=files.key,
                dpop_jwk=json.loads(self.pki.agent(agent).dpop_jwk.read_text()),
                access_token=client.access_token,
            )
        await client.__aenter__()
        self.clients.append(client)
        return client

    async def human(self, sub: str, claims: dict[str, Any], *, key_of: str | None = None) -> AgentClient:
        """A human calling directly (no client certificate, no act) with the DPoP key of ``key_of`` (default: own)."""
        holder = key_of or sub
        client = AgentClient.from_certs(
            self.public_url,
            self.pki.root,
            agent=None,
            human=holder,
            access_token=self.token(sub, claims, agent=None, human=holder),
        )
        await client.__aenter__()
        self.clients.append(client)
        return client

    async def backend_received(self) -> list[dict[str, Any]]:
        ctx = client_ssl_context(self.pki, self.pki.broker, self.pki.broker_key)
        async with aiohttp.ClientSession() as s, s.get(f"{self.backend_url}/_received", ssl=ctx) as resp:
            return list((await resp.json())["requests"])

    def audit_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line]


@pytest.fixture
async def stack(pki: Pki, tmp_path: Path) -> AsyncIterator[Expense]:
    port = free_port()
    public_url = f"https://localhost:{port}"
    backend = await expense.serve(
        "127.0.0.1:0", certs=pki.root, db_path=tmp_path / "expense.db", broker_url=public_url
    )
    env = {
        "BROKER_CERTS": str(pki.root),
        "BROKER_LISTEN": f"127.0.0.1:{port}",
        "BROKER_PUBLIC_URL": public_url,
        "BROKER_ADMIN_LISTEN": "127.0.0.1:0",
        "EXPENSE_UPSTREAM": expense.https_url(backend),
        "BROKER_AUDIT_FILE": str(tmp_path / "audit.jsonl"),
    }
    running = await start(load_config(ROOT / "config/examples/expense.yaml", environ=env))
    stack = Expense(pki, running, expense.https_url(backend), public_url, tmp_path / "audit.jsonl", [])
    yield stack
    for client in stack.clients:
        await client.__aexit__(None, None, None)
    await running.stop()
    await backend.cleanup()


async def exchange_and_invoke(
    client: AgentClient, tool: str, arguments: dict[str, Any]
) -> tuple[ClientReply, ...]:
    exchanged = await client.exchange(tool, arguments)
    if exchanged.status != 200:
        return (exchanged,)
    token = exchanged.json()["access_token"]
    return exchanged, await client.call_tool(tool, arguments, txn_token=token)


def grant_claims(grant: str, jwks: dict[str, Any]) -> dict[str, Any]:
    key = jwt.PyJWK(jwks["keys"][0]).key
    header = jwt.get_unverified_header(grant)
    assert header["typ"] == "grant+jwt"
    return jwt.decode(grant, key, algorithms=["ES256"])


async def test_row1_alice_sees_both_tools_with_a_signed_grant(stack: Expense) -> None:
    alice = await stack.agent("alice", ALICE)
    reply = await alice.list_tools()
    assert reply.status == 200
    tools = {t["name"]: t for t in reply.json()["tools"]}
    assert sorted(tools) == ["approveExpense", "listInvoices"]
    jwks = (await alice.request("GET", "/.well-known/jwks.json")).json()
    grant = grant_claims(tools["approveExpense"]["grant"], jwks)
    assert grant["tool"] == "approveExpense" and grant["sub"] == "alice"
    assert grant["act"] == {"sub": AGENT}
    assert grant["constraints"] == {
        "amount_max": 5000,
        "department": "42",
        "step_up": [
            {"above": 5000, "requires": ["mfa", "manager_approval"]},
            {"above": 10000, "requires": ["mfa", "dual_approval"]},
        ],
    }
    assert grant["exp"] > time.time()


async def test_row2_bob_sees_list_invoices_only_and_approve_is_unknown(stack: Expense) -> None:
    bob = await stack.agent("bob", BOB)
    assert [t["name"] for t in (await bob.list_tools()).json()["tools"]] == ["listInvoices"]
    exchanged = await bob.exchange("approveExpense", INV_8831)
    invoked = await bob.call_tool("approveExpense", INV_8831)
    missing = await bob.call_tool("noSuchTool", {})
    assert (exchanged.status, exchanged.error) == (404, "unknown_tool")
    assert (invoked.status, invoked.error) == (404, "unknown_tool")
    # a hidden tool answers exactly like a missing one
    assert {k: v for k, v in invoked.json().items() if k != "request_id"} == {
        k: v for k, v in missing.json().items() if k != "request_id"
    }


async def test_row3_to_5_exchange_invoke_single_use_and_parameter_lock(stack: Expense) -> None:
    alice = await stack.agent("alice", ALICE)
    exchanged, invoked = await exchange_and_invoke(alice, "approveExpense", INV_8831)
    assert exchanged.status == 200
    assert exchanged.json()["issued_token_type"] == "urn:ietf:params:oauth:token-type:txn_token"
    assert exchanged.headers.get("Cache-Control") == "no-store"
    txn_token = exchanged.json()["access_token"]
    assert invoked.status == 200, invoked.body
    answer = invoked.json()
    assert answer["status"] == "approved" and answer["department"] == "42"
    assert answer["vendor"]["bank_account"] == "****3000"
    received = [r for r in await stack.backend_received() if r["path"] == "/approve"]
    assert len(received) == 1
    assert received[0]["json"]["department"] == "42"
    assert received[0]["headers"]["txn-token"] == txn_token
    assert not any(h in received[0]["headers"] for h in ("authorization", "dpop"))
    allowed = [r for r in stack.audit_records() if r["event"] == "invocation" and r["decision"] == "allow"]
    assert allowed and allowed[-1]["txn"] and allowed[-1]["subject"] == "alice"

    replay = await alice.call_tool("approveExpense", INV_8831, txn_token=txn_token)  # row 4
    assert (replay.status, replay.error) == (403, "invalid_txn_token")

    second = (await alice.exchange("approveExpense", INV_8831)).json()["access_token"]  # row 5
    tampered = await alice.call_tool("approveExpense", {**INV_8831, "amount": 4900}, txn_token=second)
    assert (tampered.status, tampered.error) == (403, "txn_token_mismatch")
    assert len([r for r in await stack.backend_received() if r["path"] == "/approve"]) == 1


async def test_row6_over_5000_without_mfa_is_a_step_up_challenge(stack: Expense) -> None:
    alice = await stack.agent("alice", ALICE)
    reply = await alice.exchange(
        "approveExpense", {"invoice_id": "INV-9001", "amount": 6000, "department": "42"}
    )
    assert (reply.status, reply.error) == (401, "insufficient_user_authentication")
    challenge = reply.headers["WWW-Authenticate"]
    assert challenge.startswith("DPoP ") and 'acr_values="mfa"' in challenge


@pytest.mark.parametrize("mfa", [False, True], ids=["no-mfa", "mfa"])
async def test_row9_and_10_deny_beats_step_up(stack: Expense, mfa: bool) -> None:
    alice = await stack.agent("alice", {**ALICE, **({"acr": "mfa"} if mfa else {})})
    other_dept = await alice.exchange(
        "approveExpense", {"invoice_id": "INV-7", "amount": 350, "department": "7"}
    )
    huge = await alice.exchange(
        "approveExpense", {"invoice_id": "INV-9003", "amount": 999999, "department": "42"}
    )
    listing = await alice.call_tool("listInvoices", {"department": "7"})
    assert (other_dept.status, other_dept.error) == (403, "access_denied")
    assert other_dept.json()["error_description"] == "department does not match yours"
    assert (huge.status, huge.error) == (403, "access_denied")
    assert huge.json()["error_description"] == "amount exceeds approval_limit"
    assert (listing.status, listing.error) == (403, "access_denied")
    assert await stack.backend_received() == []


async def test_list_invoices_returns_only_the_subjects_department(stack: Expense) -> None:
    alice = await stack.agent("alice", ALICE)
    reply = await alice.call_tool("listInvoices", {})
    assert reply.status == 200, reply.body
    invoices = reply.json()["invoices"]
    assert invoices and {i["department"] for i in invoices} == {"42"}
    assert all(i["vendor"]["bank_account"].startswith("****") for i in invoices)
    [received] = await stack.backend_received()
    assert received["json"] == {"department": "42"}  # injected, though the agent sent none


async def test_row13_and_14_identity_refusals(stack: Expense) -> None:
    wrong_cert = await stack.agent("alice", ALICE, cert_of="travel-bot")
    reply = await wrong_cert.call_tool("listInvoices", {})
    assert (reply.status, reply.error) == (401, "invalid_token")
    alice = await stack.agent("alice", ALICE)
    no_proof = await alice.request("POST", "/v1/tools/listInvoices", json={}, headers={"DPoP": ""})
    assert (no_proof.status, no_proof.error) == (401, "invalid_dpop_proof")
    proof = alice.proof_for("POST", "/v1/tools/listInvoices")
    first = await alice.request("POST", "/v1/tools/listInvoices", json={}, headers={"DPoP": proof})
    replayed = await alice.request("POST", "/v1/tools/listInvoices", json={}, headers={"DPoP": proof})
    assert first.status == 200
    assert (replayed.status, replayed.error) == (401, "invalid_dpop_proof")


async def test_row15_every_refusal_is_audited_and_the_chain_verifies(stack: Expense) -> None:
    alice = await stack.agent("alice", ALICE)
    await alice.exchange("approveExpense", {"invoice_id": "INV-7", "amount": 350, "department": "7"})
    await alice.exchange("approveExpense", {"invoice_id": "INV-9001", "amount": 6000, "department": "42"})
    await stack.running.stop()
    records = stack.audit_records()
    refusals = [r for r in records if r["decision"] in ("deny", "step_up", "pending", "error")]
    assert [(r["event"], r["decision"], r["status"]) for r in refusals] == [
        ("exchange", "deny", 403),
        ("exchange", "step_up", 401),
    ]
    assert all(r["reason"] for r in refusals)
    assert refusals[0]["reason"].startswith("own-department-only")
    jwks = {"keys": [Signer.from_file(stack.pki.signing_jwk).public_jwk()]}
    assert verify_log(stack.audit, public_jwks=jwks).ok


async def test_row7_manager_approval_then_exchange_succeeds(stack: Expense) -> None:
    alice = await stack.agent("alice", {**ALICE, "acr": "mfa"})
    invoice = {"invoice_id": "INV-9001", "amount": 6000, "department": "42"}
    first = await alice.exchange("approveExpense", invoice)
    assert (first.status, first.error) == (403, "approval_required")
    assert first.json()["required"] == ["manager_approval"]
    approval_id = first.json()["approval_id"]

    # the requester cannot approve her own call, and an agent can never approve
    alice_herself = await stack.human("alice", {**ALICE, "acr": "mfa"}, key_of="sam")
    self_approval = await alice_herself.decide(approval_id, "approve")
    assert (self_approval.status, self_approval.error) == (403, "access_denied")
    by_agent = await alice.decide(approval_id, "approve")
    assert (by_agent.status, by_agent.error) == (403, "access_denied")

    carol = await stack.human("carol", CAROL)
    decided = await carol.decide(approval_id, "approve")
    assert decided.status == 200 and decided.json()["state"] == "approved"
    status = await alice.approval(approval_id)  # the requesting agent can read it
    assert status.json()["state"] == "approved"

    exchanged = await alice.exchange("approveExpense", invoice, approval_id=approval_id)
    assert exchanged.status == 200, exchanged.body
    txn = jwt.decode(exchanged.json()["access_token"], options={"verify_signature": False})
    assert txn["tctx"]["approval_id"] == approval_id
    invoked = await alice.call_tool("approveExpense", invoice, txn_token=exchanged.json()["access_token"])
    assert invoked.status == 200 and invoked.json()["status"] == "approved"
    # the approval is bound to these arguments: another amount needs its own
    other = await alice.exchange("approveExpense", {**invoice, "amount": 6001}, approval_id=approval_id)
    assert (other.status, other.error) == (403, "approval_required")
    assert other.json()["approval_id"] != approval_id


async def test_row8_dual_approval_needs_two_distinct_managers(stack: Expense) -> None:
    alice = await stack.agent("alice", {**ALICE, "acr": "mfa"})
    invoice = {"invoice_id": "INV-9002", "amount": 12000, "department": "42"}
    approval_id = (await alice.exchange("approveExpense", invoice)).json()["approval_id"]
    carol, dave = await stack.human("carol", CAROL), await stack.human("dave", DAVE)
    assert (await carol.decide(approval_id, "approve")).json()["state"] == "pending"
    again = await carol.decide(approval_id, "approve")
    assert (again.status, again.error) == (403, "access_denied")
    one = await alice.exchange("approveExpense", invoice, approval_id=approval_id)
    assert (one.status, one.error) == (403, "approval_required")
    assert (await dave.decide(approval_id, "approve")).json()["state"] == "approved"
    assert (await alice.exchange("approveExpense", invoice, approval_id=approval_id)).status == 200


async def test_row11_a_risky_session_needs_a_manager(stack: Expense) -> None:
    alice = await stack.agent("alice", {**ALICE, "risk_score": 85})
    reply = await alice.exchange(
        "approveExpense", {"invoice_id": "INV-9004", "amount": 100, "department": "42"}
    )
    assert (reply.status, reply.error) == (403, "approval_required")
    assert reply.json()["required"] == ["manager_approval"]


async def test_row12_the_sixth_approval_in_ten_minutes_needs_security_review(stack: Expense) -> None:
    alice = await stack.agent("alice", ALICE)
    for _ in range(5):
        _, invoked = await exchange_and_invoke(alice, "approveExpense", INV_8831)
        assert invoked.status == 200, invoked.body
    sixth = await alice.exchange("approveExpense", INV_8831)
    assert (sixth.status, sixth.error) == (403, "approval_required")
    assert sixth.json()["required"] == ["security_review"]
    carol = await stack.human("carol", CAROL)
    not_security = await carol.decide(sixth.json()["approval_id"], "approve")
    assert (not_security.status, not_security.error) == (403, "access_denied")
    sam = await stack.human("sam", SAM)
    assert (await sam.decide(sixth.json()["approval_id"], "approve")).json()["state"] == "approved"
    assert (
        await alice.exchange("approveExpense", INV_8831, approval_id=sixth.json()["approval_id"])
    ).status == 200
