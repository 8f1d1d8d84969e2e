"""The approvals page in a real browser (CONTRACT §14, §11 row 7): Debian's chromium driven by Playwright.

Real parts only: the broker on real TLS (per-session test PKI), the development OpenID Provider
(:mod:`broker.dev.idp_server`) on real TLS, chromium (``/usr/bin/chromium``, never downloaded), the agent's
token exchange over mTLS with DPoP. Chromium trusts exactly the two test server certificates: it is started with
``--ignore-certificate-errors-spki-list`` naming their public keys (no blanket ``--ignore-certificate-errors``).

Without a browser the tests skip, and fail under ``CI=true``. The accessibility check is our own (no axe-core):
:data:`A11Y_CHECK` runs in the page and lists form controls without a label, images without ``alt``, a missing
``lang``, ``main`` landmark or ``h1``, and buttons or links without a name.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.dev import idp_server
from broker.resources import APPROVALS, STATE
from broker.state.base import hash_key_part
from broker.web.session import SESSION_COOKIE
from tests.certfactory import Pki
from tests.conftest import BrokerFactory, BrokerUnderTest, base_config

CHROMIUM = Path("/usr/bin/chromium")
INVOICE = {"invoice_id": "INV-9001", "amount": 6000, "department": "42"}
ALICE = {"groups": ["finance-managers"], "department": "42", "approval_limit": 20000, "acr": "mfa"}
TIMEOUT_MS = 15_000
SCREENSHOTS = os.environ.get(
    "BROKER_SCREENSHOTS"
)  # a folder: save the page at desktop and phone widths there

A11Y_CHECK = """() => {
  const problems = [];
  if (!document.documentElement.lang) problems.push('html without lang');
  if (!document.querySelector('main')) problems.push('no main landmark');
  if (!document.querySelector('h1')) problems.push('no h1');
  if (!document.querySelector('meta[name=viewport]')) problems.push('no viewport meta');
  for (const el of document.querySelectorAll('input:not([type=hidden]), select, textarea')) {
    const labelled = (el.id && document.querySelector(`label[for="${el.id}"]`)) || el.closest('label')
      || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby');
    if (!labelled) problems.push('unlabelled ' + el.outerHTML.slice(0, 80));
  }
  for (const img of document.querySelectorAll('img')) if (!img.hasAttribute('alt')) problems.push('img without alt');
  for (const el of document.querySelectorAll('button, a[href]')) {
    const named = el.textContent.trim() || el.getAttribute('aria-label');
    if (!named) problems.push('unnamed ' + el.outerHTML.slice(0, 80));
  }
  return problems;
}"""


def _spki_hash(cert: Path) -> str:
    public = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    der = public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    broker: BrokerUnderTest
    idp: idp_server.RunningIdp
    page_url: str

    async def pending_approval(self) -> str:
        """alice (MFA) through expense-assistant asks for 6000: ``403 approval_required`` → the approval id."""
        reply = await self.broker.caller("alice", claims=ALICE).exchange("approveExpense", INVOICE)
        assert reply.status == 403 and reply.error == "approval_required", reply.body
        assert reply.body["approval_url"] == f"{self.page_url}{reply.body['approval_id']}"
        return str(reply.body["approval_id"])

    async def state_of(self, approval_id: str) -> str:
        approval = await self.broker.running.app[APPROVALS].book.get(approval_id, time.time())
        assert approval is not None
        return approval.state_at(time.time())


@pytest.fixture
async def stack(pki: Pki, broker_factory: BrokerFactory, tmp_path: Path) -> AsyncIterator[Stack]:
    port = _free_port()
    public_url = f"https://localhost:{port}"
    idp = await idp_server.serve(
        "127.0.0.1:0", certs=pki.root, clients={"broker-approvals": (f"{public_url}/approvals/callback",)}
    )
    config = base_config(pki, tmp_path, upstream_url="https://127.0.0.1:9")
    config["server"].update(listen=f"127.0.0.1:{port}", public_url=public_url)
    config["identity"]["issuers"].append(
        {"issuer": idp.url, "jwks_file": str(pki.idp_jwks), "ca": str(pki.ca)}
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
    config["approvals"] = {"ui": {"issuer": idp.url, "client_id": "broker-approvals"}}
    try:
        broker = await broker_factory(config)
        yield Stack(broker, idp, f"{public_url}/approvals/")
    finally:
        await idp.stop()


@asynccontextmanager
async def chromium(*trusted: Path) -> AsyncIterator[Any]:
    """Headless chromium trusting exactly the server certificates ``trusted`` (their public keys)."""
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    playwright_api = pytest.importorskip("playwright.async_api")
    spki = ",".join(_spki_hash(cert) for cert in trusted)
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--ignore-certificate-errors-spki-list={spki}",
            ],
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def browser(pki: Pki) -> AsyncIterator[Any]:
    async with chromium(pki.broker, pki.backend) as launched:  # the broker's and the IdP's certificates
        yield launched


async def _login(browser: Any, stack: Stack, user: str, *, mfa: bool = True, width: int = 1280) -> Any:
    """A fresh browser context; ``user`` signs in at the development IdP (MFA ticked or not); the page."""
    context = await browser.new_context(viewport={"width": width, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(stack.page_url)
    await page.wait_for_url(re.compile(re.escape(stack.idp.url) + "/authorize"))
    await page.check(f"input[name=user][value={user}]")
    if mfa:
        await page.check("input[name=mfa]")
    await page.click("button[type=submit]")
    return page


async def _signed_in(page: Any, stack: Stack) -> None:
    await page.wait_for_url(stack.page_url)
    await page.wait_for_selector("h1:has-text('Approvals waiting for you')")


async def _session_cookie(page: Any) -> str:
    cookies = {c["name"]: c for c in await page.context.cookies()}
    cookie = cookies[SESSION_COOKIE]
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert 0 < cookie["expires"] - time.time() <= 8 * 3600 + 5
    return str(cookie["value"])


async def test_manager_approves_in_the_browser_and_the_exchange_then_succeeds(
    browser: Any, stack: Stack
) -> None:
    approval_id = await stack.pending_approval()
    page = await _login(browser, stack, "carol")
    await _signed_in(page, stack)
    card = page.locator("article.approval")
    assert await card.count() == 1
    text = await card.inner_text()
    for shown in (
        "approveExpense",
        "alice",
        "expense-assistant",
        "INV-9001",
        "6000",
        "above 5000 a manager approves",
    ):
        assert shown in text
    assert await page.evaluate(A11Y_CHECK) == []
    response = await page.reload()
    assert response is not None
    headers = await response.all_headers()
    assert "default-src 'none'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer" and headers["cache-control"] == "no-store"
    await _session_cookie(page)
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=f"{SCREENSHOTS}/approvals-desktop.png", full_page=True)
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.screenshot(path=f"{SCREENSHOTS}/approvals-phone.png", full_page=True)
    # keyboard only: Tab to the Approve button, Enter
    await page.focus("button.approve")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("h1:has-text('Decision recorded')")
    assert await stack.state_of(approval_id) == "approved"
    records = [r for r in stack.broker.audit_records() if r.get("channel") == "web"]
    assert [(r["decision"], r["reason"], r["subject"]) for r in records] == [
        ("allow", f"approve:{approval_id}:approved", "carol")
    ]
    reply = await stack.broker.caller("alice", claims=ALICE).exchange(
        "approveExpense", INVOICE, approval_id=approval_id
    )
    assert reply.status == 200, reply.body


async def test_non_approver_sees_nothing_and_a_crafted_post_changes_nothing(
    browser: Any, stack: Stack
) -> None:
    approval_id = await stack.pending_approval()
    page = await _login(browser, stack, "bob")
    await _signed_in(page, stack)
    assert await page.locator("article.approval").count() == 0
    assert "Nothing is waiting" in await page.inner_text("main")
    csrf = await page.get_attribute("input[name=csrf]", "value")  # the sign-out form's
    await page.goto(stack.page_url + approval_id)
    assert "Nothing to decide here" in await page.inner_text("h1")
    # plain HTTP with bob's session cookie, his CSRF token and the right Origin: the decision path refuses
    cookie = await _session_cookie(page)
    status = await _post_decision(stack, approval_id, cookie, csrf)
    assert status == 403
    assert await stack.state_of(approval_id) == "pending"
    refusals = [r for r in stack.broker.audit_records() if r.get("channel") == "web"]
    assert [(r["decision"], r["reason"], r["subject"]) for r in refusals] == [
        ("deny", "approval_not_eligible", "bob")
    ]


async def _post_decision(stack: Stack, approval_id: str, cookie: str, csrf: str | None) -> int:
    ssl_context = ssl.create_default_context(cafile=str(stack.broker.pki.ca))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_context, force_close=True)) as session,
        session.post(
            stack.broker.url + f"/approvals/{approval_id}",
            data={"csrf": csrf or "", "decision": "approve"},
            headers={
                "Cookie": f"{SESSION_COOKIE}={cookie}",
                "Origin": stack.page_url.removesuffix("/approvals/"),
                "Sec-Fetch-Site": "same-origin",
                "Host": stack.page_url.removeprefix("https://").removesuffix("/approvals/"),
            },
            allow_redirects=False,
        ) as response,
    ):
        await response.read()
        return response.status


async def test_requester_cannot_see_or_approve_their_own(browser: Any, stack: Stack) -> None:
    # alice's access token comes from the page's issuer here; through another issuer she is refused as well
    # (four eyes compare sub across issuers: tests/integration/test_approvals_cross_issuer.py)
    reply = await stack.broker.caller("alice", claims={**ALICE, "iss": stack.idp.url}).exchange(
        "approveExpense", INVOICE
    )
    assert reply.status == 403 and reply.error == "approval_required", reply.body
    approval_id = str(reply.body["approval_id"])
    page = await _login(browser, stack, "alice")
    await _signed_in(page, stack)
    assert await page.locator("article.approval").count() == 0
    csrf = await page.get_attribute("input[name=csrf]", "value")
    assert await _post_decision(stack, approval_id, await _session_cookie(page), csrf) == 403
    assert await stack.state_of(approval_id) == "pending"
    reasons = [r["reason"] for r in stack.broker.audit_records() if r.get("channel") == "web"]
    assert reasons == ["approval_self"]


async def test_login_without_mfa_is_stepped_up(browser: Any, stack: Stack) -> None:
    page = await _login(browser, stack, "carol", mfa=False)
    # back at the IdP, asked for MFA: no session was made from the first login
    await page.wait_for_url(re.compile(r".*/authorize\?.*acr_values=mfa.*"))
    assert "asks for multi-factor authentication" in await page.inner_text("main")
    assert SESSION_COOKIE not in {c["name"] for c in await page.context.cookies()}
    await page.check("input[name=user][value=carol]")
    await page.check("input[name=mfa]")
    await page.click("button[type=submit]")
    await _signed_in(page, stack)


async def test_cross_site_form_post_changes_nothing(browser: Any, stack: Stack) -> None:
    approval_id = await stack.pending_approval()
    page = await _login(browser, stack, "carol")
    await _signed_in(page, stack)
    csrf = await page.get_attribute("input[name=csrf]", "value")  # even a leaked token does not help
    evil = web.Application()
    target = stack.broker.url.replace("127.0.0.1", "localhost") + f"/approvals/{approval_id}"
    form = (
        f'<html><body><form method="post" action="{target}"><input name="csrf" value="{csrf}">'
        '<input name="decision" value="approve"><button id="go">win a prize</button></form></body></html>'
    )

    async def attacker_page(request: web.Request) -> web.Response:
        return web.Response(text=form, content_type="text/html")

    evil.router.add_get("/", attacker_page)
    runner = web.AppRunner(evil)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        other = f"http://127.0.0.1:{runner.addresses[0][1]}/"
        await page.goto(other)
        await page.click("#go")
        await page.wait_for_load_state()
        assert await stack.state_of(approval_id) == "pending"
        # SameSite=Strict: the cross-site POST carries no session, so nobody is named and the refusal is
        # counted in a summary record (CONTRACT §15), not audited one by one
        assert [r for r in stack.broker.audit_records() if r.get("channel") == "web"] == []
        await stack.broker.flush_noise()
        summaries = [r for r in stack.broker.audit_records() if r.get("reason") == "web_session_missing"]
        assert [(r["event"], r["decision"], r["count"]) for r in summaries] == [("summary", "deny", 1)]
    finally:
        await runner.cleanup()


async def test_another_site_cannot_sign_in_at_the_development_idp(browser: Any, stack: Stack) -> None:
    """A login CSRF: another site's form posts a complete, valid sign-in to the IdP. chromium sends its own
    ``Origin`` (and ``Sec-Fetch-Site: cross-site``): 403, no code issued, the broker's callback never reached."""
    verifier = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=")
    fields = {
        "client_id": "broker-approvals",
        "redirect_uri": f"{stack.page_url}callback",
        "state": "attacker-state",
        "nonce": "attacker-nonce",
        "code_challenge": base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode(),
        "code_challenge_method": "S256",
        "user": "carol",
        "mfa": "1",
    }
    hidden = "".join(f'<input type="hidden" name="{k}" value="{v}">' for k, v in fields.items())
    form = (
        f'<html><body><form method="post" action="{stack.idp.url}/authorize">{hidden}'
        '<button id="go">win a prize</button></form></body></html>'
    )

    async def attacker_page(request: web.Request) -> web.Response:
        return web.Response(text=form, content_type="text/html")

    evil = web.Application()
    evil.router.add_get("/", attacker_page)
    runner = web.AppRunner(evil)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        page = await (await browser.new_context()).new_page()
        page.set_default_timeout(TIMEOUT_MS)
        await page.goto(f"http://127.0.0.1:{runner.addresses[0][1]}/")
        async with page.expect_response(f"{stack.idp.url}/authorize") as answer:
            await page.click("#go")
        assert (await answer.value).status == 403
        assert "cross-site sign-in refused" in await page.inner_text("main")
        assert stack.idp.idp.codes == {}
        assert SESSION_COOKIE not in {c["name"] for c in await page.context.cookies()}
    finally:
        await runner.cleanup()


async def test_logout_and_session_expiry(browser: Any, stack: Stack) -> None:
    page = await _login(browser, stack, "carol")
    await _signed_in(page, stack)
    await page.click("text=Sign out")
    await page.wait_for_selector("h1:has-text('Signed out')")
    await page.goto(stack.page_url)
    await page.wait_for_url(re.compile(re.escape(stack.idp.url) + "/authorize"))
    # sign in again, then the session's record expires in the store: the page asks to sign in
    await page.check("input[name=user][value=carol]")
    await page.check("input[name=mfa]")
    await page.click("button[type=submit]")
    await _signed_in(page, stack)
    cookie = await _session_cookie(page)
    store = stack.broker.running.app[STATE]
    key = f"web_session:{hash_key_part(cookie)}"
    record = await store.get_json(key)
    assert record is not None
    await store.put_json(key, {**record, "expires_at": time.time() - 1}, 60)
    await page.goto(stack.page_url)
    await page.wait_for_url(re.compile(re.escape(stack.idp.url) + "/authorize"))
