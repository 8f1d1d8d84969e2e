"""The broker behind a real, certified OpenID Provider (panva/oidc-provider, tests/oidcop.py) instead of the dev IdP.

The reference scenario (config/examples/expense.yaml, the demo expense backend) with one change: the issuer is the
OP, found by discovery (``/.well-known/openid-configuration`` → ``jwks_uri``) over TLS trusting the test CA. Tokens
come from the OP's own endpoints: the agent (client_id = its SPIFFE ID, authenticated by its SVID) redeems an
authorization code for the human who signed in (with or without MFA), DPoP-bound to the agent's key.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml

from broker.config.loader import load_config
from broker.dev.demo import expense
from broker.identity.principal import Authenticator
from broker.resources import RUNTIME
from broker.sdk.agent import AgentClient
from broker.server import RunningBroker, start
from tests.certfactory import Pki, client_ssl_context
from tests.oidcop import OpClient, OpError, OpHandle, OpUser, start_op

ROOT = Path(__file__).resolve().parents[2]
AGENT = "spiffe://example.org/agents/expense-assistant"
USERS = [
    OpUser("alice", {"groups": ["finance-managers"], "department": "42", "approval_limit": 20000}),
    OpUser("bob", {"groups": ["engineers"], "department": "42"}),
    OpUser("carol", {"groups": ["managers"]}),
]
INV_8831 = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}
PAGE = OpClient("approvals-page", auth="none", grant_types=("authorization_code",))

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def op(pki: Pki, tmp_path: Path) -> Iterator[OpHandle]:
    handle = start_op(
        tmp_path / "op",
        pki,
        clients=[OpClient.agent(pki, "expense-assistant"), OpClient.agent(pki, "travel-bot"), PAGE],
        users=USERS,
    )
    yield handle
    handle.stop()


@dataclass
class Stack:
    pki: Pki
    op: OpHandle
    running: RunningBroker
    public_url: str
    backend_url: str
    clients: list[AgentClient]

    @property
    def authenticator(self) -> Authenticator:
        return self.running.app[RUNTIME].current.authenticator

    def dpop_jwk(self, agent: str = "expense-assistant") -> dict[str, Any]:
        return dict(json.loads(self.pki.agent(agent).dpop_jwk.read_text()))

    async def client(
        self, token: str, *, cert_of: str = "expense-assistant", scheme: str = "DPoP"
    ) -> AgentClient:
        files = self.pki.agent(cert_of)
        client = AgentClient(
            self.public_url,
            ca=self.pki.ca,
            cert=files.cert,
            key=files.key,
            dpop_jwk=self.dpop_jwk(),
            access_token=token,
            scheme=scheme,
        )
        await client.__aenter__()
        self.clients.append(client)
        return client

    async def agent_for(
        self, user: str, *, mfa: bool = False, agent: str = "expense-assistant"
    ) -> AgentClient:
        """``user`` signs in at the OP and authorizes ``agent``, which redeems the code bound to its DPoP key."""
        tokens = await self.op.authorization_code(
            OpClient.agent(self.pki, agent), user, mfa=mfa, dpop_jwk=self.dpop_jwk(agent)
        )
        assert tokens["token_type"] == "DPoP"
        return await self.client(tokens["access_token"])

    async def human(self, user: str, *, mfa: bool) -> AgentClient:
        """``user`` acting directly (an approver): the approvals page's client, the human's own DPoP key."""
        dpop = dict(json.loads(self.pki.human_dpop(user).read_text()))
        tokens = await self.op.authorization_code(PAGE, user, mfa=mfa, dpop_jwk=dpop)
        client = AgentClient(
            self.public_url,
            ca=self.pki.ca,
            cert=None,
            key=None,
            dpop_jwk=dpop,
            access_token=tokens["access_token"],
        )
        await client.__aenter__()
        self.clients.append(client)
        return client

    async def backend_received(self) -> list[dict[str, Any]]:
        ctx = client_ssl_context(self.pki, self.pki.broker, self.pki.broker_key)
        async with aiohttp.ClientSession() as s, s.get(f"{self.backend_url}/_received", ssl=ctx) as resp:
            return list((await resp.json())["requests"])


@pytest.fixture
async def stack(pki: Pki, op: OpHandle, tmp_path: Path) -> AsyncIterator[Stack]:
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
    # The shipped scenario, its issuer swapped for the OP (discovery: no jwks_file, no jwks_url).
    config = yaml.safe_load((ROOT / "config/examples/expense.yaml").read_text())
    config["identity"]["issuers"] = [op.issuer_config()]
    if "ui" in config.get("approvals", {}):  # the approvals page signs humans in at the same OP
        config["approvals"]["ui"]["issuer"] = op.url
    path = tmp_path / "expense-op.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        running = await start(load_config(path, environ=env))
    except BaseException:
        await backend.cleanup()
        raise
    stack = Stack(pki, op, running, public_url, expense.https_url(backend), [])
    yield stack
    for client in stack.clients:
        await client.__aexit__(None, None, None)
    await running.stop()
    await backend.cleanup()


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


async def test_discovery_finds_the_ops_keys_and_its_client_credentials_token_is_accepted(
    stack: Stack,
) -> None:
    metadata = await stack.op.metadata()
    assert metadata["issuer"] == stack.op.url and metadata["jwks_uri"].startswith(stack.op.url)
    assert "ES256" in metadata["dpop_signing_alg_values_supported"]
    (keys,) = stack.authenticator.issuer_keys
    assert keys.loaded and not keys.static  # fetched at start through discovery, not from a file

    agent = OpClient.agent(stack.pki, "expense-assistant")
    tokens = await stack.op.client_credentials(agent, dpop_jwk=stack.dpop_jwk())
    claims = claims_of(tokens["access_token"])
    assert jwt.get_unverified_header(tokens["access_token"])["typ"] == "at+jwt"
    assert (claims["client_id"], claims["sub"], claims["aud"]) == (AGENT, AGENT, "https://broker.example.org")
    assert claims["cnf"]["jkt"]
    client = await stack.client(tokens["access_token"])
    reply = await client.list_tools()
    # accepted: the agent alone has no department or group, so policy shows it no tool (not a 401)
    assert (reply.status, reply.json()["tools"]) == (200, [])


async def test_the_op_authenticates_agents_by_their_svid(stack: Stack) -> None:
    """tls_client_auth: the expense assistant's client_id with the travel bot's certificate is refused."""
    impostor = OpClient(
        AGENT, auth="tls", cert=stack.pki.agent("travel-bot").cert, key=stack.pki.agent("travel-bot").key
    )
    with pytest.raises(OpError) as refused:
        await stack.op.client_credentials(impostor, dpop_jwk=stack.dpop_jwk())
    assert refused.value.status == 401 and refused.value.body["error"] == "invalid_client"


async def test_scenario_rows_with_op_tokens(stack: Stack) -> None:
    alice = await stack.agent_for("alice")
    token = claims_of(alice.access_token or "")
    assert (token["sub"], token["client_id"], token["acr"]) == ("alice", AGENT, "pwd")
    assert token["groups"] == ["finance-managers"] and token["department"] == "42"

    # row 3: exchange and invoke within limits; the backend gets the subject's department
    exchanged = await alice.exchange("approveExpense", INV_8831)
    assert exchanged.status == 200, exchanged.body
    invoked = await alice.call_tool("approveExpense", INV_8831, txn_token=exchanged.json()["access_token"])
    assert invoked.status == 200, invoked.body
    assert invoked.json()["vendor"]["bank_account"] == "****3000"
    assert [r["json"]["department"] for r in await stack.backend_received() if r["path"] == "/approve"] == [
        "42"
    ]

    # an employee (bob, engineers) lists his department's invoices; approveExpense does not exist for him
    bob = await stack.agent_for("bob")
    listed = await bob.call_tool("listInvoices", {})
    assert listed.status == 200 and {i["department"] for i in listed.json()["invoices"]} == {"42"}
    assert (await bob.call_tool("approveExpense", INV_8831)).status == 404

    # row 9: a refused call (another department), never forwarded
    other = await alice.exchange("approveExpense", {"invoice_id": "INV-7", "amount": 350, "department": "7"})
    assert (other.status, other.error) == (403, "access_denied")

    # rows 6 and 7: over 5000 needs MFA (acr from the OP's login), then a manager who signed in with MFA
    invoice = {"invoice_id": "INV-9001", "amount": 6000, "department": "42"}
    step_up = await alice.exchange("approveExpense", invoice)
    assert (step_up.status, step_up.error) == (401, "insufficient_user_authentication")
    alice_mfa = await stack.agent_for("alice", mfa=True)
    assert claims_of(alice_mfa.access_token or "")["acr"] == "mfa"
    pending = await alice_mfa.exchange("approveExpense", invoice)
    assert (pending.status, pending.error) == (403, "approval_required")
    approval_id = pending.json()["approval_id"]
    carol_no_mfa = await stack.human("carol", mfa=False)
    assert (await carol_no_mfa.decide(approval_id, "approve")).status == 401
    carol = await stack.human("carol", mfa=True)
    decided = await carol.decide(approval_id, "approve")
    assert decided.status == 200 and decided.json()["state"] == "approved", decided.body
    approved = await alice_mfa.exchange("approveExpense", invoice, approval_id=approval_id)
    assert approved.status == 200, approved.body


async def test_a_token_issued_to_another_agent_is_refused_by_the_actor_check(stack: Stack) -> None:
    tokens = await stack.op.authorization_code(
        OpClient.agent(stack.pki, "travel-bot"), "alice", dpop_jwk=stack.dpop_jwk()
    )
    assert claims_of(tokens["access_token"])["client_id"] == "spiffe://example.org/agents/travel-bot"
    client = await stack.client(tokens["access_token"], cert_of="expense-assistant")
    reply = await client.call_tool("listInvoices", {})
    assert (reply.status, reply.error) == (401, "invalid_token")
    assert await stack.backend_received() == []


async def test_bearer_tokens_are_refused_where_dpop_is_required(stack: Stack) -> None:
    agent = OpClient.agent(stack.pki, "expense-assistant")
    bearer = await stack.op.client_credentials(agent)  # no DPoP proof at the token endpoint: a bearer token
    assert bearer["token_type"] == "Bearer" and "cnf" not in claims_of(bearer["access_token"])
    as_bearer = await (await stack.client(bearer["access_token"], scheme="Bearer")).list_tools()
    assert (as_bearer.status, as_bearer.error) == (401, "invalid_token")
    bound = await stack.op.client_credentials(agent, dpop_jwk=stack.dpop_jwk())
    downgraded = await (await stack.client(bound["access_token"], scheme="Bearer")).list_tools()
    assert (downgraded.status, downgraded.error) == (401, "invalid_token")


async def test_a_key_rotation_at_the_op_is_picked_up_by_the_broker(stack: Stack) -> None:
    before = await stack.agent_for("alice")
    assert (await before.list_tools()).status == 200
    (keys,) = stack.authenticator.issuer_keys
    fetches = keys.fetch_count
    old_kid = jwt.get_unverified_header(before.access_token or "")["kid"]

    new_kid = stack.op.rotate_keys()
    after = await stack.agent_for("alice")
    assert jwt.get_unverified_header(after.access_token or "")["kid"] == new_kid != old_kid
    reply = await after.list_tools()
    assert reply.status == 200 and len(reply.json()["tools"]) == 2
    assert keys.fetch_count == fetches + 1  # the unknown kid made one refetch through discovery
    assert (await before.list_tools()).status == 200  # the old key is still published

    stack.op.rotate_keys(retire=old_kid)  # and a retired key leaves the OP's JWKS
    metadata = await stack.op.metadata()
    async with aiohttp.ClientSession() as s, s.get(metadata["jwks_uri"], ssl=stack.op.ssl_context()) as resp:
        published = {k["kid"] for k in (await resp.json())["keys"]}
    assert old_kid not in published and new_kid in published


async def test_authorization_details_from_the_op_reach_the_token(stack: Stack) -> None:
    details = [{"type": "tool_invocation", "tool": "approveExpense", "arguments": INV_8831}]
    tokens = await stack.op.authorization_code(
        OpClient.agent(stack.pki, "expense-assistant"),
        "alice",
        dpop_jwk=stack.dpop_jwk(),
        authorization_details=details,
    )
    assert tokens["authorization_details"] == details
    assert claims_of(tokens["access_token"])["authorization_details"] == details
    with pytest.raises(OpError) as refused:  # a malformed tool_invocation is refused by the OP
        await stack.op.authorization_code(
            OpClient.agent(stack.pki, "expense-assistant"),
            "alice",
            authorization_details=[{"type": "tool_invocation"}],
        )
    assert refused.value.body["error"] == "invalid_authorization_details"


async def test_an_op_token_with_authorization_details_limits_discovery_and_calls(stack: Stack) -> None:
    """CONTRACT §17 with a real OP: alice's policy lets the agent see both tools and approve up to her limit; the
    ``tool_invocation`` entry she consented to narrows that to approveExpense, at most 1000."""
    details = [{"type": "tool_invocation", "tool": "approveExpense", "constraints": {"amount_max": 1000}}]
    tokens = await stack.op.authorization_code(
        OpClient.agent(stack.pki, "expense-assistant"),
        "alice",
        dpop_jwk=stack.dpop_jwk(),
        authorization_details=details,
    )
    assert claims_of(tokens["access_token"])["authorization_details"] == details
    bounded = await stack.client(tokens["access_token"])
    reply = await bounded.list_tools()
    assert [tool["name"] for tool in reply.json()["tools"]] == ["approveExpense"]
    unlisted = await bounded.call_tool("listInvoices", {})
    assert (unlisted.status, unlisted.error) == (403, "access_denied")
    above = await bounded.exchange("approveExpense", INV_8831)
    assert (above.status, above.error) == (403, "access_denied")
    assert "authorization_details[0] (approveExpense)" in above.json()["error_description"]
    within = await bounded.exchange("approveExpense", {**INV_8831, "amount": 900})
    assert within.status == 200

    unbounded = await stack.agent_for("alice")  # the same user and agent without the intent: policy decides
    assert len((await unbounded.list_tools()).json()["tools"]) == 2
    assert (await unbounded.exchange("approveExpense", INV_8831)).status == 200
