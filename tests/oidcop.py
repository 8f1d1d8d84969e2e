"""A real, certified OpenID Provider for tests: panva/oidc-provider (pinned in ``tests/oidc/package.json``).

Usage (any test; the OP serves HTTPS with a certificate from the session's PKI, so the broker trusts it through
``identity.issuers[].ca`` and discovers its keys from ``/.well-known/openid-configuration``)::

    op = start_op(tmp_path, pki, clients=[OpClient.agent(pki, "expense-assistant"),
                                          OpClient("approvals-page", auth="none",
                                                   redirect_uris=("https://localhost:8443/approvals/callback",))],
                  users=[OpUser("alice", {"groups": ["finance-managers"], "department": "42"})])
    try:
        broker_issuer = op.issuer_config()                    # {"issuer": op.url, "ca": ..., "algorithms": [...]}
        tokens = await op.authorization_code(agent, "alice", mfa=True, dpop_jwk=jwk)   # the whole code + PKCE dance
        tokens = await op.client_credentials(agent, dpop_jwk=jwk)                      # the agent alone
        location = await op.browser_login(session, authorize_url, user="carol", mfa=True,
                                          until="https://localhost:8443/approvals/callback")  # drive your own page
        kid = op.rotate_keys()                                # a new signing key; the old one stays published
    finally:
        op.stop()

Interactions (``/interaction/{uid}``): a login form (``user`` select, ``mfa`` checkbox) a browser can use and a
test can POST to (``user=carol&mfa=on`` to ``/interaction/{uid}/login``); consent is granted without asking
(first-party demo clients). A login with MFA gives ``acr: "mfa"`` and ``amr: ["pwd","otp","mfa"]``, without it
``acr: "pwd"``; a request with ``acr_values=mfa`` finds the checkbox ticked. ID tokens carry ``sub``,
``acr``/``amr`` and, with the ``profile`` scope, the user's claims. Access tokens are RFC 9068 JWTs
(``typ: at+jwt``, ES256) for the audience given, carrying ``client_id`` (the agent's SPIFFE ID), the user's claims
as given, ``acr``/``amr``, ``cnf.jkt`` when the token request carried a DPoP proof, and ``authorization_details``
when requested (type ``tool_invocation``).

Node or the package missing: the test is skipped, or FAILS under ``CI=true``. The package is installed into
``tests/oidc/node_modules`` with ``npm ci`` (from the committed lock file) the first time it is needed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import queue
import secrets
import ssl
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Literal, NoReturn
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import aiohttp
import pytest

from broker.dev.pki import SERVER_AUTH, issue_certificate, write_pem_cert, write_pem_key
from broker.jose import jwk_thumbprint
from tests.certfactory import Pki, client_ssl_context
from tests.dpopfactory import ec_key, make_proof
from tests.nodepkg import ensure_npm_ci

OIDC_DIR = Path(__file__).resolve().parent / "oidc"
AUDIENCE = "https://broker.example.org"
#: bound of every wait on the provider (start, a command's answer, exit)
READY_WITHIN_SECONDS = 30.0
DEFAULT_REDIRECT = "https://localhost/callback"


class OpError(Exception):
    """The provider refused a request; ``status`` and ``body`` are its answer."""

    def __init__(self, what: str, status: int, body: Any) -> None:
        super().__init__(f"{what}: HTTP {status}: {body}")
        self.status = status
        self.body = body


def op_missing(why: str) -> NoReturn:
    """Skip, or fail under ``CI=true``: CI never goes green by skipping the real-IdP tests."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why} (CI=true: the OpenID Provider tests are required, not optional)")
    pytest.skip(
        f"{why}; install Node >= 20 and npm to run this test (CI=true turns this skip into a failure)"
    )


def ensure_installed() -> str:
    """The ``node`` binary, after ``npm ci`` in ``tests/oidc`` if the pinned oidc-provider is not installed."""
    return ensure_npm_ci(OIDC_DIR, "oidc-provider", op_missing)


@dataclass(frozen=True)
class OpClient:
    """A client registered at the provider.

    ``auth``: ``tls`` = RFC 8705 tls_client_auth with the certificate ``cert``/``key`` whose one URI SAN must equal
    ``client_id`` (an agent and its X.509-SVID); ``secret`` = client_secret_basic; ``none`` = a public client
    (PKCE only).
    """

    client_id: str
    auth: Literal["tls", "secret", "none"] = "tls"
    redirect_uris: tuple[str, ...] = (DEFAULT_REDIRECT,)
    grant_types: tuple[str, ...] = ("authorization_code", "client_credentials")
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def agent(cls, pki: Pki, name: str, **overrides: Any) -> OpClient:
        """The agent ``name`` of ``pki``: client_id = its SPIFFE ID, authenticated by its SVID."""
        files = pki.agent(name)
        return cls(pki.agent_id(name), auth="tls", cert=files.cert, key=files.key, **overrides)

    def metadata(self) -> dict[str, Any]:
        grant_types = [g for g in self.grant_types if self.auth != "none" or g != "client_credentials"]
        data: dict[str, Any] = {
            "client_id": self.client_id,
            "redirect_uris": list(self.redirect_uris),
            "grant_types": grant_types,
            "response_types": ["code"] if "authorization_code" in grant_types else [],
            "id_token_signed_response_alg": "ES256",
            "authorization_details_types": ["tool_invocation"],
        }
        if self.auth == "tls":
            data.update(token_endpoint_auth_method="tls_client_auth", tls_client_auth_san_uri=self.client_id)
        elif self.auth == "secret":
            data.update(token_endpoint_auth_method="client_secret_basic", client_secret=self.secret)
        else:
            data.update(token_endpoint_auth_method="none")
        return data


@dataclass(frozen=True)
class OpUser:
    """A demo user: ``sub`` and the claims every access token issued for them carries (groups, department…); an
    ID token carries them too when the ``profile`` scope was granted (the approvals page asks for it)."""

    sub: str
    claims: Mapping[str, Any] = field(default_factory=dict)


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


class OpHandle:
    """A running provider (a ``node`` subprocess). :meth:`stop` it; it also exits when this process dies."""

    def __init__(
        self,
        process: subprocess.Popen[str],
        lines: queue.Queue[str | None],
        reader: threading.Thread,
        *,
        pki: Pki,
        audience: str,
    ) -> None:
        self._process = process
        self._lines = lines
        self._reader = reader
        self.pki = pki
        self.audience = audience
        self.url: str = self._expect("url")
        self._metadata: dict[str, Any] | None = None

    # --- process -----------------------------------------------------------------------------------------------

    def _expect(self, key: str) -> str:
        deadline = time.monotonic() + READY_WITHIN_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(
                    f"oidc-provider exited (status {self._process.wait()}); see its stderr log"
                )
            if not line.startswith("{"):  # oidc-provider's own notices go to stdout too
                continue
            message = json.loads(line)
            if key in message:
                return str(message[key])
        raise TimeoutError(f"oidc-provider did not answer {key!r} within {READY_WITHIN_SECONDS} s")

    def _command(self, command: Mapping[str, Any], answer: str) -> str:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(command) + "\n")
        self._process.stdin.flush()
        return self._expect(answer)

    def rotate_keys(self, *, retire: str | None = None) -> str:
        """A fresh ES256 key signs from now on (published first in the JWKS); returns its ``kid``.

        ``retire``: a ``kid`` to unpublish at the same time (tokens it signed then fail at a fresh fetch).
        """
        kid = self._command({"rotate": {**ec_key(), "use": "sig"}}, "rotated")
        if retire is not None:
            self._command({"retire": retire}, "retired")
        return kid

    def stop(self) -> None:
        """Close its stdin (the provider exits on EOF) and wait; kill it if it does not exit in time."""
        assert self._process.stdin is not None and self._process.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.close()
        try:
            self._process.wait(timeout=READY_WITHIN_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout=READY_WITHIN_SECONDS)  # it ends at the pipe's EOF
        self._process.stdout.close()

    # --- what a relying party needs --------------------------------------------------------------------------

    def issuer_config(self, **overrides: Any) -> dict[str, Any]:
        """The broker's ``identity.issuers[]`` entry for this provider: discovery, trusting the test CA."""
        return {"issuer": self.url, "ca": str(self.pki.ca), "algorithms": ["ES256"], **overrides}

    def ssl_context(self, client: OpClient | None = None) -> ssl.SSLContext:
        """Trusts the test CA; presents ``client``'s certificate when it authenticates with TLS."""
        if client is not None and client.auth == "tls":
            return client_ssl_context(self.pki, client.cert, client.key)
        return client_ssl_context(self.pki)

    async def metadata(self) -> dict[str, Any]:
        """``/.well-known/openid-configuration`` (fetched once)."""
        if self._metadata is None:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{self.url}/.well-known/openid-configuration", ssl=self.ssl_context()) as resp,
            ):
                if resp.status != 200:
                    raise OpError("discovery", resp.status, await resp.text())
                self._metadata = dict(await resp.json())
        return self._metadata

    async def token_request(
        self, client: OpClient, form: Mapping[str, str], *, dpop_jwk: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """POST the token endpoint as ``client`` (its authentication method), with a DPoP proof when given."""
        endpoint = str((await self.metadata())["token_endpoint"])
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if dpop_jwk is not None:
            headers["DPoP"] = make_proof(dpop_jwk, htm="POST", htu=endpoint, iat=int(time.time()))
        body = dict(form)
        auth = None
        if client.auth == "secret":
            auth = aiohttp.BasicAuth(client.client_id, client.secret)
        else:
            body["client_id"] = client.client_id
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                endpoint, data=urlencode(body), headers=headers, auth=auth, ssl=self.ssl_context(client)
            ) as resp,
        ):
            answer = await resp.json(content_type=None)
            if resp.status != 200:
                raise OpError("token endpoint", resp.status, answer)
            return dict(answer)

    async def client_credentials(
        self,
        client: OpClient,
        *,
        dpop_jwk: Mapping[str, Any] | None = None,
        authorization_details: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """A token for the client alone (``sub`` = ``client_id``): no human behind it."""
        form = {"grant_type": "client_credentials", "resource": self.audience}
        if authorization_details is not None:
            form["authorization_details"] = json.dumps(list(authorization_details))
        return await self.token_request(client, form, dpop_jwk=dpop_jwk)

    async def authorize_url(
        self,
        client: OpClient,
        *,
        code_challenge: str,
        state: str,
        redirect_uri: str | None = None,
        dpop_jwk: Mapping[str, Any] | None = None,
        authorization_details: Sequence[Mapping[str, Any]] | None = None,
        **params: str,
    ) -> str:
        """The authorization request URL (code + PKCE S256, ``resource`` = the audience; RFC 9449 ``dpop_jkt``)."""
        query = {
            "client_id": client.client_id,
            "response_type": "code",
            "redirect_uri": redirect_uri or client.redirect_uris[0],
            "scope": "openid",
            "resource": self.audience,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
            "state": state,
            **params,
        }
        if dpop_jwk is not None:
            query["dpop_jkt"] = jwk_thumbprint(dpop_jwk)
        if authorization_details is not None:
            query["authorization_details"] = json.dumps(list(authorization_details))
        return f"{(await self.metadata())['authorization_endpoint']}?{urlencode(query)}"

    async def browser_login(
        self, session: aiohttp.ClientSession, url: str, *, user: str, mfa: bool, until: str
    ) -> str:
        """Play the user's browser from ``url``: follow redirects, sign in as ``user`` at the provider's form
        (with or without the second factor), until a redirect to a URL starting with ``until``; return it.

        ``session`` keeps the provider's cookies (use ``aiohttp.CookieJar()``; the provider is on ``localhost``).
        """
        ssl_context = self.ssl_context()
        for _ in range(12):
            if url.startswith(until):
                return url
            path = urlsplit(url).path
            if url.startswith(self.url) and path.startswith("/interaction/"):
                async with session.get(url, ssl=ssl_context, allow_redirects=False) as resp:
                    if resp.status == 200:  # the login form: submit it as the user would
                        form = {"user": user, **({"mfa": "on"} if mfa else {})}
                        async with session.post(
                            f"{url}/login", data=form, ssl=ssl_context, allow_redirects=False
                        ) as login:
                            url = self._redirect(login.status, login.headers, url, await login.text())
                        continue
                    url = self._redirect(resp.status, resp.headers, url, await resp.text())
                    continue
            async with session.get(url, ssl=ssl_context, allow_redirects=False) as resp:
                url = self._redirect(resp.status, resp.headers, url, await resp.text())
        raise OpError("login", 0, f"no redirect to {until} after 12 steps (last {url})")

    @staticmethod
    def _redirect(status: int, headers: Mapping[str, str], base: str, body: str) -> str:
        if status not in (302, 303) or "Location" not in headers:
            raise OpError(f"GET {base}", status, body[:500])
        return urljoin(base, headers["Location"])

    async def authorization_code(
        self,
        client: OpClient,
        user: str,
        *,
        mfa: bool = False,
        dpop_jwk: Mapping[str, Any] | None = None,
        authorization_details: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The whole authorization code flow with PKCE: ``user`` signs in (MFA or not) and authorizes ``client``,
        which redeems the code (DPoP-bound to ``dpop_jwk`` when given). Returns the token response."""
        verifier, challenge = _pkce()
        state = secrets.token_urlsafe(16)
        redirect_uri = client.redirect_uris[0]
        start = await self.authorize_url(
            client,
            code_challenge=challenge,
            state=state,
            dpop_jwk=dpop_jwk,
            authorization_details=authorization_details,
        )
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar()) as browser:
            callback = await self.browser_login(browser, start, user=user, mfa=mfa, until=redirect_uri)
        answer = {k: v[0] for k, v in parse_qs(urlsplit(callback).query).items()}
        if "code" not in answer or answer.get("state") != state:
            raise OpError("authorization", 0, answer)
        form = {
            "grant_type": "authorization_code",
            "code": answer["code"],
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        return await self.token_request(client, form, dpop_jwk=dpop_jwk)


def _reader(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def start_op(
    tmpdir: Path,
    pki: Pki,
    *,
    clients: Iterable[OpClient],
    users: Iterable[OpUser],
    audience: str = AUDIENCE,
    access_token_ttl: int = 600,
) -> OpHandle:
    """Start oidc-provider on a free port of 127.0.0.1 (issuer ``https://localhost:PORT``) and wait until it
    listens. Its files (config, TLS certificate, stderr log ``op.log``) go to ``tmpdir``."""
    node = ensure_installed()
    tmpdir.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = pki.load_ca()
    now = pki.now
    cert, key = issue_certificate(
        ca_cert,
        ca_key,
        common_name="oidc-provider",
        dns=["localhost"],
        ips=["127.0.0.1"],
        eku=(SERVER_AUTH,),
        not_before=now - timedelta(minutes=5),
        not_after=now + timedelta(days=1),
    )
    config = {
        "audience": audience,
        "access_token_ttl": access_token_ttl,
        "cookie_secret": secrets.token_urlsafe(32),
        "keys": [{**ec_key(), "use": "sig"}],
        "tls": {
            "cert": str(write_pem_cert(tmpdir / "op.pem", cert)),
            "key": str(write_pem_key(tmpdir / "op-key.pem", key)),
            "ca": str(pki.ca),
        },
        "clients": [c.metadata() for c in clients],
        "users": {u.sub: dict(u.claims) for u in users},
    }
    config_path = tmpdir / "op-config.json"
    config_path.write_text(json.dumps(config))
    config_path.chmod(0o600)
    with open(tmpdir / "op.log", "a") as log:
        process = subprocess.Popen(
            [node, str(OIDC_DIR / "op.mjs"), str(config_path)],
            cwd=OIDC_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_reader, args=(process.stdout, lines), daemon=True)
    reader.start()
    try:
        return OpHandle(process, lines, reader, pki=pki, audience=audience)
    except BaseException:
        process.kill()
        process.wait()
        reader.join(timeout=READY_WITHIN_SECONDS)
        process.stdout.close()
        assert process.stdin is not None
        process.stdin.close()
        raise
