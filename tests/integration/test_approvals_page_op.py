"""The approvals page against a real OpenID Provider, and across replicas (CONTRACT §14, §7).

Real parts only: panva/oidc-provider (:mod:`tests.oidcop`) on TLS with a certificate of the test PKI, the
shipped scenario (``config/examples/expense.yaml``) with its issuers swapped for that OP (found by discovery),
Debian's chromium driven by Playwright (it trusts exactly the broker's and the OP's certificates, by public key),
and for the replicas two brokers on one Redis key prefix (:mod:`tests.redisutil`). The person signs in at the OP's
own login form as a person would (pick the user, tick the second factor); the agent's tokens come from the OP too
(authorization code + PKCE, DPoP-bound, authenticated by its SVID).

The approver rule (``"managers" in approver.groups``) reads the ID token's claims: the OP releases the user's
claims under the ``profile`` scope the page asks for, so a decision here proves they reached the session.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from broker.config.loader import load_config
from broker.resources import APPROVALS, STATE
from broker.sdk.agent import AgentClient
from broker.server import RunningBroker, start
from broker.state.base import hash_key_part
from broker.web.session import SESSION_COOKIE
from tests.certfactory import Pki
from tests.integration.test_approvals_page import A11Y_CHECK, TIMEOUT_MS, chromium
from tests.oidcop import OpClient, OpHandle, OpUser, start_op
from tests.redisutil import REDIS_URL, redis_stores

ROOT = Path(__file__).resolve().parents[2]
USERS = [
    OpUser("alice", {"groups": ["finance-managers"], "department": "42", "approval_limit": 20000}),
    OpUser("bob", {"groups": ["engineers"], "department": "42"}),
    OpUser("carol", {"groups": ["managers"]}),
]
INVOICE = {"invoice_id": "INV-9001", "amount": 6000, "department": "42"}
PAGE_CLIENT = "broker-approvals"  # approvals.ui.client_id of expense.yaml

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Replica:
    running: RunningBroker
    public_url: str
    audit_path: Path

    @property
    def page(self) -> str:
        return f"{self.public_url}/approvals/"

    async def state_of(self, approval_id: str) -> str:
        approval = await self.running.app[APPROVALS].book.get(approval_id, time.time())
        assert approval is not None
        return approval.state_at(time.time())

    def web_records(self) -> list[dict[str, Any]]:
        lines = self.audit_path.read_text().splitlines()
        return [r for r in map(json.loads, filter(None, lines)) if r.get("channel") == "web"]


@dataclass
class OpStack:
    pki: Pki
    op: OpHandle
    replicas: list[Replica]
    exits: AsyncExitStack
    #: the OP's server certificate (``start_op`` writes it there): the browser trusts its public key
    op_certificate: Path

    async def agent_for(self, user: str, *, mfa: bool, on: int = 0) -> AgentClient:
        """``user`` signs in at the OP and authorizes the expense assistant (its SVID, its DPoP key)."""
        files = self.pki.agent("expense-assistant")
        dpop = dict(json.loads(files.dpop_jwk.read_text()))
        tokens = await self.op.authorization_code(
            OpClient.agent(self.pki, "expense-assistant"), user, mfa=mfa, dpop_jwk=dpop
        )
        client = AgentClient(
            self.replicas[on].public_url,
            ca=self.pki.ca,
            cert=files.cert,
            key=files.key,
            dpop_jwk=dpop,
            access_token=tokens["access_token"],
        )
        await self.exits.enter_async_context(client)
        return client

    async def pending_approval(self, agent: AgentClient, replica: Replica) -> str:
        """The agent asks for 6000 for alice (MFA): ``403 approval_required`` → the approval's page."""
        reply = await agent.exchange("approveExpense", INVOICE)
        assert (reply.status, reply.error) == (403, "approval_required"), reply.body
        body = reply.json()
        assert body["approval_url"] == f"{replica.page}{body['approval_id']}"
        return str(body["approval_id"])


@asynccontextmanager
async def op_stack(pki: Pki, tmp_path: Path, *, replicas: int = 1) -> AsyncIterator[OpStack]:
    """The OP and ``replicas`` brokers running expense.yaml (more than one: state on one Redis prefix)."""
    ports = [free_port() for _ in range(replicas)]
    urls = [f"https://localhost:{port}" for port in ports]
    page_client = OpClient(
        PAGE_CLIENT,
        auth="none",
        grant_types=("authorization_code",),
        redirect_uris=tuple(f"{url}/approvals/callback" for url in urls),
    )
    op_dir = tmp_path / "op"
    async with AsyncExitStack() as exits:
        op = start_op(
            op_dir, pki, clients=[OpClient.agent(pki, "expense-assistant"), page_client], users=USERS
        )
        exits.callback(op.stop)
        state: dict[str, Any] = {"backend": "memory"}
        if replicas > 1:
            stores = await exits.enter_async_context(redis_stores())
            state = {"backend": "redis", "redis_url": REDIS_URL, "key_prefix": stores.prefix}
        started: list[Replica] = []
        for index, (port, url) in enumerate(zip(ports, urls, strict=True)):
            directory = tmp_path / f"replica-{index}"
            directory.mkdir()
            config = yaml.safe_load((ROOT / "config/examples/expense.yaml").read_text())
            config["identity"]["issuers"] = [op.issuer_config()]
            config["approvals"]["ui"]["issuer"] = op.url
            config["state"] = state
            path = directory / "expense.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            env = {
                "BROKER_CERTS": str(pki.root),
                "BROKER_LISTEN": f"127.0.0.1:{port}",
                "BROKER_PUBLIC_URL": url,
                "BROKER_ADMIN_LISTEN": "127.0.0.1:0",
                "EXPENSE_UPSTREAM": "https://127.0.0.1:9",  # approvals never forward
                "BROKER_AUDIT_FILE": str(directory / "audit.jsonl"),
            }
            running = await start(load_config(path, environ=env))
            exits.push_async_callback(running.stop)
            started.append(Replica(running, url, directory / "audit.jsonl"))
        yield OpStack(pki, op, started, exits, op_dir / "op.pem")


@dataclass(frozen=True)
class OpForm:
    url: str
    #: the form came with the second factor ticked (the request carried ``acr_values=mfa``)
    mfa_asked: bool


async def sign_in_at_op(
    page: Any, op: OpHandle, user: str, *, mfa: bool, after: OpForm | None = None
) -> OpForm:
    """At the OP's own login form: pick ``user``, tick the second factor or not, submit. ``after``: the form
    submitted before (wait for a new one)."""
    form = re.compile(re.escape(op.url) + r"/interaction/[\w-]+$")
    previous = after.url if after is not None else None
    await page.wait_for_url(lambda url: form.match(url) is not None and url != previous)
    shown = OpForm(page.url, bool(await page.get_by_label("second factor").is_checked()))
    await page.get_by_label("User").select_option(user)
    second_factor = page.get_by_label("second factor")
    await (second_factor.check() if mfa else second_factor.uncheck())
    await page.get_by_role("button", name="Sign in").click()
    return shown


async def session_cookie(page: Any) -> str:
    [cookie] = [c for c in await page.context.cookies() if c["name"] == SESSION_COOKIE]
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    return str(cookie["value"])


async def test_a_manager_signs_in_at_the_op_is_stepped_up_and_approves(pki: Pki, tmp_path: Path) -> None:
    async with op_stack(pki, tmp_path) as stack:
        [replica] = stack.replicas
        alice = await stack.agent_for("alice", mfa=True)
        approval_id = await stack.pending_approval(alice, replica)
        async with chromium(pki.broker, stack.op_certificate) as browser:
            context = await browser.new_context()
            page = await context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            await page.goto(replica.page + approval_id)  # the link the agent was given
            # first sign-in without the second factor: the page does not make a session of it
            first = await sign_in_at_op(page, stack.op, "carol", mfa=False)
            assert not first.mfa_asked
            # the page sent the person back with acr_values=mfa (the OP's form ticks the box for it)
            step_up = await sign_in_at_op(page, stack.op, "carol", mfa=True, after=first)
            assert step_up.mfa_asked
            await page.wait_for_url(replica.page + approval_id)
            await page.wait_for_selector("h1:has-text('Approval request')")
            card = await page.locator("article.approval").inner_text()
            assert all(shown in card for shown in ("approveExpense", "alice", "INV-9001", "6000"))
            assert await page.evaluate(A11Y_CHECK) == []
            # the session holds the OP's verified ID token claims: what the approver rule read
            store = replica.running.app[STATE]
            record = await store.get_json(f"web_session:{hash_key_part(await session_cookie(page))}")
            assert record is not None
            claims = record["claims"]
            assert (claims["sub"], claims["iss"], claims["aud"]) == ("carol", stack.op.url, PAGE_CLIENT)
            assert claims["groups"] == ["managers"] and claims["acr"] == "mfa" and "mfa" in claims["amr"]
            await page.get_by_role("button", name="Approve").click()
            await page.wait_for_selector("h1:has-text('Decision recorded')")
        assert await replica.state_of(approval_id) == "approved"
        assert [(r["decision"], r["reason"], r["subject"]) for r in replica.web_records()] == [
            ("allow", f"approve:{approval_id}:approved", "carol")
        ]
        approved = await alice.exchange("approveExpense", INVOICE, approval_id=approval_id)
        assert approved.status == 200, approved.body


async def test_an_op_login_without_the_groups_claim_decides_nothing(pki: Pki, tmp_path: Path) -> None:
    """bob (engineers) signs in with MFA at the same OP: a valid session, nothing to decide, a POST refused."""
    async with op_stack(pki, tmp_path) as stack:
        [replica] = stack.replicas
        approval_id = await stack.pending_approval(await stack.agent_for("alice", mfa=True), replica)
        async with chromium(pki.broker, stack.op_certificate) as browser:
            page = await (await browser.new_context()).new_page()
            page.set_default_timeout(TIMEOUT_MS)
            await page.goto(replica.page)
            await sign_in_at_op(page, stack.op, "bob", mfa=True)
            await page.wait_for_url(replica.page)
            assert "Nothing is waiting" in await page.inner_text("main")
            await page.goto(replica.page + approval_id)
            assert "Nothing to decide here" in await page.inner_text("h1")
        assert await replica.state_of(approval_id) == "pending"


async def get_page(replica: Replica, pki: Pki, cookie: str) -> tuple[int, str]:
    """A plain GET of the list page with ``cookie``: (status, Location)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            replica.page,
            headers={"Cookie": f"{SESSION_COOKIE}={cookie}"},
            ssl=context,
            allow_redirects=False,
        ) as response,
    ):
        return response.status, response.headers.get("Location", "")


@pytest.mark.redis
async def test_a_session_and_a_decision_hold_across_two_replicas(pki: Pki, tmp_path: Path) -> None:
    async with op_stack(pki, tmp_path, replicas=2) as stack:
        a, b = stack.replicas
        alice = await stack.agent_for("alice", mfa=True, on=0)
        approval_id = await stack.pending_approval(alice, a)
        async with chromium(pki.broker, stack.op_certificate) as browser:
            page = await (await browser.new_context()).new_page()
            page.set_default_timeout(TIMEOUT_MS)
            await page.goto(a.page)
            await sign_in_at_op(page, stack.op, "carol", mfa=True)  # signed in on replica A
            await page.wait_for_url(a.page)
            assert await page.locator("article.approval").count() == 1
            cookie = await session_cookie(page)

            # replica B honours the same cookie (the session record is in the shared store): no new login
            await page.goto(b.page + approval_id)
            assert page.url == b.page + approval_id
            await page.wait_for_selector("h1:has-text('Approval request')")
            assert await session_cookie(page) == cookie
            await page.get_by_role("button", name="Approve").click()  # decided through B
            await page.wait_for_selector("h1:has-text('Decision recorded')")

            # A sees B's decision: no longer listed there, approved in its book, and the agent proceeds on A
            await page.goto(a.page)
            assert "Nothing is waiting" in await page.inner_text("main")
            assert await a.state_of(approval_id) == "approved"
            approved = await alice.exchange("approveExpense", INVOICE, approval_id=approval_id)
            assert approved.status == 200, approved.body
            assert [r["subject"] for r in b.web_records()] == ["carol"] and a.web_records() == []

            # signing out on A ends the session on both: the old cookie is sent to sign in again everywhere
            assert await get_page(b, pki, cookie) == (200, "")
            await page.get_by_role("button", name="Sign out").click()
            await page.wait_for_selector("h1:has-text('Signed out')")
        for replica in (a, b):
            assert await get_page(replica, pki, cookie) == (303, "/approvals/login?return_to=/approvals/")
