"""The development OpenID Provider (:mod:`broker.dev.idp_server`) kept to the developer's machine and own tab
(review finding 6): ``POST /authorize`` only from the IdP's own page, bounded parameters, a bounded set of
outstanding codes, a login page whose form may post only where the flow goes, and no listener off loopback.

Real parts: the IdP on real TLS (the per-session test PKI, as the approvals page tests start it), aiohttp clients
over real sockets. The browser's side (chromium sends ``Origin`` with the form's POST and follows the 302 under the
page's ``form-action``) is in ``test_approvals_page.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest

from broker.dev import idp_server
from broker.jose import b64url_encode
from tests.certfactory import Pki

CLIENT = "broker-approvals"
REDIRECT = "https://localhost:8443/approvals/callback"


@pytest.fixture
async def idp(pki: Pki) -> AsyncIterator[idp_server.RunningIdp]:
    running = await idp_server.serve("127.0.0.1:0", certs=pki.root, clients={CLIENT: (REDIRECT,)})
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def client(pki: Pki) -> AsyncIterator[aiohttp.ClientSession]:
    context = ssl.create_default_context(cafile=str(pki.ca))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield session


def _own_page(idp: idp_server.RunningIdp) -> dict[str, str]:
    """What a browser sends with the IdP's own login form."""
    return {"Origin": idp.url, "Sec-Fetch-Site": "same-origin"}


def _pkce() -> tuple[str, str]:
    verifier = b64url_encode(secrets.token_bytes(32))
    return verifier, b64url_encode(hashlib.sha256(verifier.encode()).digest())


def _request(challenge: str, **more: str) -> dict[str, str]:
    return {
        "client_id": CLIENT,
        "redirect_uri": REDIRECT,
        "state": "s-" + secrets.token_hex(8),
        "nonce": "n-" + secrets.token_hex(8),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "user": "carol",
        "mfa": "1",
        **more,
    }


async def _submit(
    client: aiohttp.ClientSession, idp: idp_server.RunningIdp, form: dict[str, str], headers: dict[str, str]
) -> tuple[int, str, str]:
    """``POST /authorize``: the status, the ``code`` of the redirect ("" when none) and the page's text."""
    async with client.post(
        idp.url + "/authorize", data=form, headers=headers, allow_redirects=False
    ) as response:
        text = await response.text()
        if response.status != 302:
            return response.status, "", text
        location = response.headers["Location"]
        assert location.startswith(REDIRECT + "?"), location
        assert response.headers["Cache-Control"] == "no-store"
        return 302, dict(parse_qsl(urlsplit(location).query))["code"], text


async def _redeem(
    client: aiohttp.ClientSession, idp: idp_server.RunningIdp, code: str, verifier: str
) -> tuple[int, dict[str, Any]]:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "client_id": CLIENT,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
    }
    async with client.post(idp.url + "/token", data=form) as response:
        return response.status, await response.json()


async def test_the_login_page_may_post_only_to_itself_and_the_redirect_uri(
    client: aiohttp.ClientSession, idp: idp_server.RunningIdp
) -> None:
    _, challenge = _pkce()
    query = {k: v for k, v in _request(challenge).items() if k not in ("user", "mfa")}
    async with client.get(idp.url + "/authorize", params=query) as response:
        assert response.status == 200
        csp = response.headers["Content-Security-Policy"]
        # the form posts to the IdP itself; form-action also governs the 302 to the broker's callback
        assert "form-action 'self' https://localhost:8443;" in csp and "*" not in csp
        # same-origin, not no-referrer: under no-referrer chromium sends the form's POST with ``Origin: null``
        assert response.headers["Referrer-Policy"] == "same-origin"
    async with client.get(idp.url + "/authorize", params={**query, "client_id": "other"}) as response:
        assert response.status == 400
        assert "form-action 'none';" in response.headers["Content-Security-Policy"]


async def test_only_the_idp_s_own_page_may_post_a_sign_in(
    client: aiohttp.ClientSession, idp: idp_server.RunningIdp
) -> None:
    port = urlsplit(idp.url).port
    cross_site = [
        {"Origin": "https://evil.example"},
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "null"},
        {},  # no Origin: every browser sends one with a POST
        {
            "Origin": "https://localhost:8443",
            "Sec-Fetch-Site": "same-site",
        },  # the broker: same site, not origin
        {"Origin": f"http://localhost:{port}"},  # not the issuer's scheme
        {"Origin": f"https://127.0.0.1:{port}"},  # not the issuer's host
        {"Origin": idp.url, "Sec-Fetch-Site": "cross-site"},
        {"Origin": idp.url, "Sec-Fetch-Site": "same-site"},
    ]
    _, challenge = _pkce()
    for headers in cross_site:
        status, code, text = await _submit(client, idp, _request(challenge), headers)
        assert (status, code) == (403, ""), headers
        assert "cross-site sign-in refused" in text
    assert idp.idp.codes == {}
    status, code, _ = await _submit(client, idp, _request(challenge), _own_page(idp))
    assert status == 302 and list(idp.idp.codes) == [code]


async def test_overlong_or_malformed_parameters_are_refused(
    client: aiohttp.ClientSession, idp: idp_server.RunningIdp
) -> None:
    limit = idp_server.MAX_PARAM_CHARS
    _, challenge = _pkce()
    refused = [
        {"state": "s" * (limit + 1)},
        {"nonce": "n" * (limit + 1)},
        {"acr_values": "m" * (limit + 1)},
        {"code_challenge": "c" * (limit + 1)},
        {"code_challenge": "c" * 44},
        {"code_challenge": "c" * 42},
        {"code_challenge": "+" * 43},
    ]
    for more in refused:
        form = _request(challenge, **more)
        status, _, _ = await _submit(client, idp, form, _own_page(idp))
        assert status == 400, more
        query = {k: v for k, v in form.items() if k not in ("user", "mfa")}
        async with client.get(idp.url + "/authorize", params=query) as response:
            assert response.status == 400, more
    assert idp.idp.codes == {}
    status, code, _ = await _submit(
        client, idp, _request(challenge, state="s" * limit, nonce="n" * limit), _own_page(idp)
    )
    assert status == 302 and idp.idp.codes[code].nonce == "n" * limit


async def test_the_review_reproduction_holds_nothing(
    client: aiohttp.ClientSession, idp: idp_server.RunningIdp
) -> None:
    """The review's reproduction: 900 kB nonces posted cross-origin (then from the IdP's origin): no code kept."""
    _, challenge = _pkce()
    form = _request(challenge, nonce="n" * 900_000)
    for headers in ({"Origin": "https://evil.example"}, _own_page(idp)):
        for _ in range(5):
            status, _, _ = await _submit(client, idp, form, headers)
            assert status in (403, 400), headers
    assert idp.idp.codes == {}


async def test_expired_codes_are_dropped_when_the_next_is_issued(
    client: aiohttp.ClientSession, idp: idp_server.RunningIdp
) -> None:
    verifier, challenge = _pkce()
    _, stale, _ = await _submit(client, idp, _request(challenge), _own_page(idp))
    idp.idp.codes[stale].expires = time.time() - 1  # its 60 s are over, nobody redeemed it
    _, fresh, _ = await _submit(client, idp, _request(challenge), _own_page(idp))
    assert list(idp.idp.codes) == [fresh]
    assert await _redeem(client, idp, stale, verifier) == (400, {"error": "invalid_grant"})
    status, body = await _redeem(client, idp, fresh, verifier)
    assert status == 200 and body["id_token"]
    assert idp.idp.codes == {}


async def test_outstanding_codes_are_capped_the_oldest_dropped(
    client: aiohttp.ClientSession, idp: idp_server.RunningIdp
) -> None:
    verifier, challenge = _pkce()
    _, oldest, _ = await _submit(client, idp, _request(challenge), _own_page(idp))
    grant = idp.idp.codes[oldest]
    for i in range(idp_server.MAX_CODES - 1):  # live codes nobody redeems, up to the cap
        idp.idp.codes[f"unredeemed-{i}"] = dataclasses.replace(grant)
    assert len(idp.idp.codes) == idp_server.MAX_CODES
    _, newest, _ = await _submit(client, idp, _request(challenge), _own_page(idp))
    assert len(idp.idp.codes) == idp_server.MAX_CODES
    assert oldest not in idp.idp.codes and "unredeemed-0" in idp.idp.codes
    assert list(idp.idp.codes)[-1] == newest
    assert await _redeem(client, idp, oldest, verifier) == (400, {"error": "invalid_grant"})
    status, body = await _redeem(client, idp, newest, verifier)
    assert status == 200 and body["id_token"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("host", ["0.0.0.0", "", "[::]"])
async def test_serve_refuses_a_listen_address_off_loopback(pki: Pki, host: str) -> None:
    port = _free_port()
    with pytest.raises(idp_server.NotLoopbackError, match="signs anyone who reaches it in as any demo user"):
        await idp_server.serve(f"{host}:{port}", certs=pki.root, clients={CLIENT: (REDIRECT,)})
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))  # nothing was left listening


async def test_serve_listens_off_loopback_only_when_allowed(pki: Pki, client: aiohttp.ClientSession) -> None:
    running = await idp_server.serve(
        "0.0.0.0:0", certs=pki.root, clients={CLIENT: (REDIRECT,)}, allow_non_loopback=True
    )
    try:
        async with client.get(running.url + "/.well-known/openid-configuration") as response:
            assert response.status == 200 and (await response.json())["issuer"] == running.url
    finally:
        await running.stop()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "[::1]"])
async def test_serve_listens_on_loopback(pki: Pki, host: str) -> None:
    if host == "[::1]":
        try:
            with socket.socket(socket.AF_INET6) as sock:
                sock.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")
    running = await idp_server.serve(f"{host}:0", certs=pki.root, clients={CLIENT: (REDIRECT,)})
    await running.stop()
