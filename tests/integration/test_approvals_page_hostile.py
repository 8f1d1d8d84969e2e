"""The approvals page against a hostile client (attacker review, issue 13): plain HTTP, no browser needed.

Real parts: the broker on real TLS (per-session test PKI), the development OpenID Provider on real TLS, the
memory state store and the audit file of the running broker. A sign-in is driven by hand: ``GET /approvals/login``,
the IdP's form, the callback, with the cookies a browser would send (:class:`Jar`).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
from aiohttp import web

from broker.dev import idp_server
from broker.resources import APPROVALS, NOISE, STATE
from broker.state.base import hash_key_part
from broker.web.login_cookie import LOGIN_COOKIE_PREFIX
from broker.web.session import SESSION_COOKIE
from tests.certfactory import Pki
from tests.conftest import BrokerFactory, BrokerUnderTest, base_config

INVOICE = {"invoice_id": "INV-9001", "amount": 6000, "department": "42"}
ALICE = {"groups": ["finance-managers"], "department": "42", "approval_limit": 20000, "acr": "mfa"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Jar:
    """The cookies one browser holds (name → value), fed from ``Set-Cookie`` answers."""

    cookies: dict[str, str] = field(default_factory=dict)

    def take(self, response: aiohttp.ClientResponse) -> list[str]:
        """Apply the answer's ``Set-Cookie`` headers; their names, in order."""
        names = []
        for header in response.headers.getall("Set-Cookie", []):
            for name, morsel in SimpleCookie(header).items():
                names.append(name)
                if morsel["max-age"] == "0":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return names

    def header(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.cookies.items())


@dataclass
class Stack:
    broker: BrokerUnderTest
    idp: idp_server.RunningIdp
    public_url: str

    def client(self) -> aiohttp.ClientSession:
        context = ssl.create_default_context(cafile=str(self.broker.pki.ca))
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, force_close=True))

    def headers(self, jar: Jar | None = None, **more: str) -> dict[str, str]:
        headers = {"Host": self.public_url.removeprefix("https://"), **more}
        if jar is not None and jar.cookies:
            headers["Cookie"] = jar.header()
        return headers

    async def get(self, client: aiohttp.ClientSession, path: str, jar: Jar) -> tuple[int, str, list[str]]:
        async with client.get(
            self.broker.url + path, headers=self.headers(jar), allow_redirects=False
        ) as response:
            return response.status, await response.text(), jar.take(response)

    async def start_login(self, client: aiohttp.ClientSession, jar: Jar) -> dict[str, str]:
        """``GET /approvals/login``: the authorization request's parameters (the login cookie lands in ``jar``)."""
        async with client.get(
            self.broker.url + "/approvals/login", headers=self.headers(jar), allow_redirects=False
        ) as response:
            assert response.status == 302, await response.text()
            jar.take(response)
            return dict(parse_qsl(urlsplit(response.headers["Location"]).query))

    async def code_for(self, client: aiohttp.ClientSession, params: dict[str, str], user: str) -> str:
        """The IdP's form submitted for ``user`` with MFA, from the IdP's own page as a browser sends it: the
        callback path (with ``code`` and ``state``)."""
        form = {**params, "user": user, "mfa": "1"}
        own_page = {"Origin": self.idp.url, "Sec-Fetch-Site": "same-origin"}
        async with client.post(
            self.idp.url + "/authorize", data=form, headers=own_page, allow_redirects=False
        ) as response:
            assert response.status == 302, await response.text()
            location = urlsplit(response.headers["Location"])
            return f"{location.path}?{location.query}"

    async def sign_in(self, client: aiohttp.ClientSession, user: str) -> Jar:
        jar = Jar()
        callback = await self.code_for(client, await self.start_login(client, jar), user)
        status, body, _ = await self.get(client, callback, jar)
        assert status == 200 and SESSION_COOKIE in jar.cookies, body
        return jar

    async def post(
        self, client: aiohttp.ClientSession, path: str, jar: Jar, data: dict[str, str], **headers: str
    ) -> tuple[int, list[str]]:
        sent = self.headers(jar, **{"Origin": self.public_url, "Sec-Fetch-Site": "same-origin", **headers})
        async with client.post(
            self.broker.url + path, data=data, headers=sent, allow_redirects=False
        ) as response:
            await response.read()
            return response.status, response.headers.getall("Set-Cookie", [])

    async def pending_approval(self) -> str:
        reply = await self.broker.caller("alice", claims=ALICE).exchange("approveExpense", INVOICE)
        assert reply.status == 403 and reply.error == "approval_required", reply.body
        return str(reply.body["approval_id"])

    def web_records(self) -> list[dict[str, Any]]:
        return [r for r in self.broker.audit_records() if r.get("channel") == "web"]


def _page_config(pki: Pki, tmp_path: Path, port: int, issuer: str) -> dict[str, Any]:
    config = base_config(pki, tmp_path, upstream_url="https://127.0.0.1:9")
    config["server"].update(listen=f"127.0.0.1:{port}", public_url=f"https://localhost:{port}")
    config["identity"]["issuers"].append(
        {"issuer": issuer, "jwks_file": str(pki.idp_jwks), "ca": str(pki.ca)}
    )
    config["policies"] = [
        {"id": "agents", "tools": ["approveExpense"], "effect": "allow", "when": 'actor.id != ""'},
        {
            "id": "big",
            "tools": ["approveExpense"],
            "effect": "obligate",
            "when": "args.amount > 5000",
            "requires": ["mfa", "manager_approval"],
            "reason": "above 5000 a manager approves",
        },
    ]
    config["approvals"] = {"ui": {"issuer": issuer, "client_id": "broker-approvals"}}
    return config


@pytest.fixture
async def stack(pki: Pki, broker_factory: BrokerFactory, tmp_path: Path) -> AsyncIterator[Stack]:
    port = _free_port()
    public_url = f"https://localhost:{port}"
    idp = await idp_server.serve(
        "127.0.0.1:0", certs=pki.root, clients={"broker-approvals": (f"{public_url}/approvals/callback",)}
    )
    try:
        broker = await broker_factory(_page_config(pki, tmp_path, port, idp.url))
        yield Stack(broker, idp, public_url)
    finally:
        await idp.stop()


async def test_w2_anonymous_logins_store_nothing_and_a_replayed_callback_fails(stack: Stack) -> None:
    store = stack.broker.running.app[STATE]
    async with stack.client() as client:
        await stack.start_login(client, Jar())  # the first login creates the deployment's login key
        before = len(store)
        for _ in range(50):
            await stack.start_login(client, Jar())
        assert len(store) == before  # 50 unauthenticated logins: not one record
        # the IdP hands out two codes for one login (a lenient or replayed IdP answer): only one signs in
        jar = Jar()
        params = await stack.start_login(client, jar)
        first, second = (
            await stack.code_for(client, params, "carol"),
            await stack.code_for(client, params, "carol"),
        )
        login_jar = Jar(dict(jar.cookies))
        status, _, _ = await stack.get(client, first, jar)
        assert status == 200 and SESSION_COOKIE in jar.cookies
        status, body, _ = await stack.get(client, second, login_jar)
        assert status == 400 and "already used" in body
        assert SESSION_COOKIE not in login_jar.cookies
        # a forged login cookie for the state is refused without a store write
        forged = Jar({name: "A" * 200 for name in login_jar.cookies})
        before = len(store)
        status, _, _ = await stack.get(client, second, forged)
        assert status == 400 and len(store) == before


async def test_w5_two_logins_in_progress_keep_their_own_cookies(stack: Stack) -> None:
    async with stack.client() as client:
        jar = Jar()
        first = await stack.start_login(client, jar)
        second = await stack.start_login(client, jar)
        assert len([n for n in jar.cookies if n.startswith(LOGIN_COOKIE_PREFIX)]) == 2
        # the first tab finishes after the second began
        callback = await stack.code_for(client, first, "carol")
        status, body, _ = await stack.get(client, callback, jar)
        assert status == 200 and SESSION_COOKIE in jar.cookies, body
        assert second["state"] != first["state"]


async def test_w1_a_revoked_subject_loses_the_session_and_cannot_sign_in(stack: Stack) -> None:
    approval_id = await stack.pending_approval()
    store = stack.broker.running.app[STATE]
    async with stack.client() as client:
        jar = await stack.sign_in(client, "carol")
        status, page, _ = await stack.get(client, f"/approvals/{approval_id}", jar)
        assert status == 200
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        session_key = f"web_session:{hash_key_part(jar.cookies[SESSION_COOKIE])}"
        await store.revoke("sub", "carol", 3600)
        status, _ = await stack.post(
            client, f"/approvals/{approval_id}", jar, {"csrf": csrf, "decision": "approve"}
        )
        assert status == 403
        assert await store.get_json(session_key) is None  # the session is gone on every replica
        approval = await stack.broker.running.app[APPROVALS].book.get(approval_id, time.time())
        assert approval is not None and approval.state == "pending"
        assert [(r["reason"], r["subject"]) for r in stack.web_records()] == [("revoked_sub", "carol")]
        # and a fresh sign-in of the revoked subject gets no session
        jar = Jar()
        callback = await stack.code_for(client, await stack.start_login(client, jar), "carol")
        status, body, _ = await stack.get(client, callback, jar)
        assert status == 403 and SESSION_COOKIE not in jar.cookies, body


async def test_w4_posts_without_a_session_are_counted_not_audited_one_by_one(stack: Stack) -> None:
    approval_id = await stack.pending_approval()
    before = len(stack.broker.audit_records())
    async with stack.client() as client:
        for _ in range(20):
            status, _ = await stack.post(
                client, f"/approvals/{approval_id}", Jar(), {"csrf": "x", "decision": "approve"}
            )
            assert status == 401
    assert len(stack.broker.audit_records()) == before  # no record per refusal
    await stack.broker.flush_noise()
    summaries = [r for r in stack.broker.audit_records() if r.get("reason") == "web_session_missing"]
    assert [r["event"] for r in summaries] == ["summary"] * len(summaries)
    assert sum(r["count"] for r in summaries) == 20
    assert stack.broker.running.app[NOISE].pending == 0


async def test_w5_cross_site_logout_changes_nothing_and_no_session_clears_nothing(stack: Stack) -> None:
    async with stack.client() as client:
        jar = await stack.sign_in(client, "carol")
        status, set_cookie = await stack.post(
            client,
            "/approvals/logout",
            jar,
            {},
            Origin="https://evil.test",
            **{"Sec-Fetch-Site": "cross-site"},
        )
        assert status == 403 and set_cookie == []
        status, _, _ = await stack.get(client, "/approvals/", jar)
        assert status == 200  # still signed in
        status, set_cookie = await stack.post(client, "/approvals/logout", Jar(), {})
        assert status == 200 and set_cookie == []


async def test_w7_the_detail_page_reads_the_approval_by_id(stack: Stack) -> None:
    approval_id = await stack.pending_approval()
    store = stack.broker.running.app[STATE]
    assert await store.delete_json("approval_pending")  # not listed (index full, or lost): still decidable
    async with stack.client() as client:
        jar = await stack.sign_in(client, "carol")
        status, page, _ = await stack.get(client, f"/approvals/{approval_id}", jar)
        assert status == 200 and "INV-9001" in page
        bob = await stack.sign_in(client, "bob")  # not an approver: the same "nothing here" as a missing id
        status, page, _ = await stack.get(client, f"/approvals/{approval_id}", bob)
        assert status == 404 and "INV-9001" not in page


async def test_the_page_demands_https_from_browsers(stack: Stack) -> None:
    async with (
        stack.client() as client,
        client.get(
            stack.broker.url + "/approvals/login", headers=stack.headers(), allow_redirects=False
        ) as reply,
    ):
        assert reply.headers["Strict-Transport-Security"] == "max-age=31536000"


async def test_w2_a_down_identity_provider_is_fetched_once_not_per_request(
    pki: Pki, broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    fetches = 0
    arrived, release = asyncio.Event(), asyncio.Event()

    async def discovery(request: web.Request) -> web.Response:
        nonlocal fetches
        fetches += 1
        arrived.set()
        await release.wait()  # every login below arrives while this fetch is in flight
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.root / "backend.pem", pki.root / "backend-key.pem")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        issuer = f"https://localhost:{runner.addresses[0][1]}"
        port = _free_port()
        broker = await broker_factory(_page_config(pki, tmp_path, port, issuer))
        stack = Stack(broker, None, f"https://localhost:{port}")  # type: ignore[arg-type]
        async with stack.client() as client:

            async def login() -> int:
                status, _, _ = await stack.get(client, "/approvals/login", Jar())
                return status

            waiting = [asyncio.ensure_future(login()) for _ in range(10)]
            await asyncio.wait_for(arrived.wait(), 10)
            release.set()  # logins arriving after this find the failure remembered: no second fetch either way
            assert set(await asyncio.gather(*waiting)) == {502}
            for _ in range(10):  # within the failure's memory: answered without a fetch
                assert await login() == 502
        assert fetches == 1
    finally:
        await runner.cleanup()
