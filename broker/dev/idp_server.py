"""Development OpenID Provider for the approvals page (CONTRACT §14), served by ``make run`` beside the broker.

Signs with the §10 IdP key (``DIR/idp.jwk``, the key of :mod:`broker.dev.idp`); for development and tests only:
there are no passwords, the login page lets you *pick* a demo user and say whether MFA was done.

    GET  /.well-known/openid-configuration   discovery (issuer = this server's https URL)
    GET  /jwks                               the public key
    GET  /authorize                          the login page (code flow, PKCE S256 required, registered redirect)
    POST /authorize                          the pick → 302 to the redirect URI with a one-time code
    POST /token                              authorization_code + code_verifier → ID token (60 s codes, once)

ID tokens (OIDC Core §2): ``iss``, ``sub``, ``aud`` = client id, ``iat``, ``exp`` (+5 min), ``nonce``,
``auth_time``, the user's claims (``groups``, ``department``, ``approval_limit``), and ``acr: mfa`` with
``amr: [pwd, otp]`` only when MFA was ticked (otherwise ``amr: [pwd]``). A request with ``acr_values=mfa``
shows the page again with a notice: the step-up the broker asks for.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import secrets
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

from aiohttp import web

from broker.dev.idp import read_jwk
from broker.jose import Signer, b64url_encode

__all__ = ["DEMO_USERS", "DevIdp", "RunningIdp", "serve"]

#: the §11 people: requesters and approvers (approvers need MFA to decide)
DEMO_USERS: Final[Mapping[str, Mapping[str, Any]]] = {
    "carol": {"name": "Carol (manager)", "groups": ["managers"], "department": "42"},
    "dave": {"name": "Dave (manager)", "groups": ["managers"], "department": "42"},
    "sam": {"name": "Sam (security)", "groups": ["security"], "department": "7"},
    "alice": {
        "name": "Alice (finance, requester)",
        "groups": ["finance-managers"],
        "department": "42",
        "approval_limit": 20000,
    },
    "bob": {"name": "Bob (engineer)", "groups": ["engineers"], "department": "42"},
}
CODE_SECONDS: Final = 60
ID_TOKEN_SECONDS: Final = 300
_CSP: Final = "default-src 'none'; style-src 'unsafe-inline'; form-action *; frame-ancestors 'none'"


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str
    user: str
    mfa: bool
    expires: float


@dataclass
class DevIdp:
    """The provider's state: its signing key, registered clients (client id → redirect URIs), live codes."""

    signer: Signer
    clients: dict[str, tuple[str, ...]]
    issuer: str = ""
    codes: dict[str, _Grant] = field(default_factory=dict)

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [self.signer.alg],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "acr_values_supported": ["mfa"],
            "scopes_supported": ["openid", "profile"],
        }

    def id_token(self, grant: _Grant, now: float) -> str:
        user = DEMO_USERS[grant.user]
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": grant.user,
            "aud": grant.client_id,
            "iat": int(now),
            "exp": int(now) + ID_TOKEN_SECONDS,
            "auth_time": int(now),
            "nonce": grant.nonce,
            "amr": ["pwd", "otp"] if grant.mfa else ["pwd"],
            **{k: v for k, v in user.items()},
        }
        if grant.mfa:
            claims["acr"] = "mfa"
        return self.signer.sign(claims, typ="JWT")


def _page(body: str, status: int = 200) -> web.Response:
    text = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><title>Development IdP</title>'
        "<style>body{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:2rem auto;padding:0 1rem}"
        "fieldset{margin:0 0 1rem}label{display:block;padding:.25rem 0}button{font:inherit;padding:.5rem 1.5rem}"
        ".notice{background:#fff8c5;padding:.5rem}</style></head><body>"
        f"<main><h1>Development IdP</h1>{body}</main></body></html>"
    )
    response = web.Response(text=text, status=status, content_type="text/html")
    response.headers.update(
        {"Content-Security-Policy": _CSP, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
    )
    return response


_AUTHORIZE_PARAMS: Final = (
    "client_id",
    "redirect_uri",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
    "acr_values",
)


def _check_request(idp: DevIdp, params: Mapping[str, str]) -> str | None:
    """Why this authorization request is refused (before anything is redirected), or None."""
    client = idp.clients.get(params.get("client_id", ""))
    if client is None or params.get("redirect_uri") not in client:
        return "unknown client or unregistered redirect_uri"
    if params.get("response_type", "code") != "code":
        return "response_type must be code"
    if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
        return "PKCE with S256 is required"
    if not params.get("nonce") or not params.get("state"):
        return "state and nonce are required"
    return None


async def authorize_page(request: web.Request) -> web.StreamResponse:
    idp: DevIdp = request.app[_IDP]
    params = dict(request.query)
    problem = _check_request(idp, params)
    if problem is not None:
        return _page(f"<p>{html.escape(problem)}</p>", status=400)
    hidden = "".join(
        f'<input type="hidden" name="{name}" value="{html.escape(params.get(name, ""))}">'
        for name in _AUTHORIZE_PARAMS
    )
    users = "".join(
        f'<label><input type="radio" name="user" value="{name}"{" checked" if i == 0 else ""}> '
        f"{html.escape(str(claims['name']))}</label>"
        for i, (name, claims) in enumerate(DEMO_USERS.items())
    )
    notice = (
        '<p class="notice" role="alert">The application asks for multi-factor authentication.</p>'
        if params.get("acr_values") == "mfa"
        else ""
    )
    body = (
        f'{notice}<form method="post" action="/authorize">{hidden}'
        f"<fieldset><legend>Sign in as</legend>{users}</fieldset>"
        '<label><input type="checkbox" name="mfa" value="1"> I completed multi-factor authentication</label>'
        '<p><button type="submit">Sign in</button></p></form>'
    )
    return _page(body)


async def authorize_submit(request: web.Request) -> web.StreamResponse:
    idp: DevIdp = request.app[_IDP]
    form = await request.post()
    params = {name: str(form.get(name, "")) for name in _AUTHORIZE_PARAMS}
    problem = _check_request(idp, params)
    user = str(form.get("user", ""))
    if problem is None and user not in DEMO_USERS:
        problem = "pick a user"
    if problem is not None:
        return _page(f"<p>{html.escape(problem)}</p>", status=400)
    code = b64url_encode(secrets.token_bytes(32))
    idp.codes[code] = _Grant(
        client_id=params["client_id"],
        redirect_uri=params["redirect_uri"],
        challenge=params["code_challenge"],
        nonce=params["nonce"],
        user=user,
        mfa=form.get("mfa") == "1",
        expires=time.time() + CODE_SECONDS,
    )
    location = params["redirect_uri"] + "?" + urlencode({"code": code, "state": params["state"]})
    raise web.HTTPFound(location)


def _token_error(error: str, status: int = 400) -> web.Response:
    return web.json_response({"error": error}, status=status, headers={"Cache-Control": "no-store"})


async def token(request: web.Request) -> web.StreamResponse:
    idp: DevIdp = request.app[_IDP]
    form = await request.post()
    if form.get("grant_type") != "authorization_code":
        return _token_error("unsupported_grant_type")
    grant = idp.codes.pop(str(form.get("code", "")), None)  # one use, whatever happens next
    now = time.time()
    if grant is None or grant.expires <= now:
        return _token_error("invalid_grant")
    if form.get("client_id") != grant.client_id or form.get("redirect_uri") != grant.redirect_uri:
        return _token_error("invalid_grant")
    verifier = str(form.get("code_verifier", ""))
    challenge = b64url_encode(hashlib.sha256(verifier.encode()).digest())
    if not 43 <= len(verifier) <= 128 or not hmac.compare_digest(challenge, grant.challenge):
        return _token_error("invalid_grant")
    body = {
        "access_token": b64url_encode(secrets.token_bytes(32)),
        "token_type": "Bearer",
        "expires_in": ID_TOKEN_SECONDS,
        "id_token": idp.id_token(grant, now),
    }
    return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def discovery(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[_IDP].discovery())


async def jwks(request: web.Request) -> web.StreamResponse:
    return web.json_response({"keys": [request.app[_IDP].signer.public_jwk()]})


_IDP: Final = web.AppKey("dev_idp", DevIdp)


def build_app(idp: DevIdp) -> web.Application:
    app = web.Application()
    app[_IDP] = idp
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/jwks", jwks)
    app.router.add_get("/authorize", authorize_page)
    app.router.add_post("/authorize", authorize_submit)
    app.router.add_post("/token", token)
    return app


@dataclass
class RunningIdp:
    runner: web.AppRunner
    url: str
    idp: DevIdp

    async def stop(self) -> None:
        await self.runner.cleanup()


async def serve(
    listen: str, *, certs: Path, clients: Mapping[str, tuple[str, ...]], host_name: str = "localhost"
) -> RunningIdp:
    """Serve on ``listen`` (host:port; port 0 = any) over TLS with ``DIR/backend.pem`` (a localhost
    certificate of the §10 CA); the issuer is ``https://<host_name>:<port>``. Raises OSError when the port is
    taken."""
    idp = DevIdp(Signer.from_jwk(read_jwk(certs / "idp.jwk")), {k: tuple(v) for k, v in clients.items()})
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "backend.pem", certs / "backend-key.pem")
    runner = web.AppRunner(build_app(idp), access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=context)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    idp.issuer = f"https://{host_name}:{bound_port}"
    return RunningIdp(runner, idp.issuer, idp)
