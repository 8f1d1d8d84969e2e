"""Development OpenID Provider for the approvals page (CONTRACT §14), served by ``make run`` beside the broker.

Signs with the §10 IdP key (``DIR/idp.jwk``, the key of :mod:`broker.dev.idp`); for development and tests only:
there are no passwords, the login page lets you *pick* a demo user and say whether MFA was done.

    GET  /.well-known/openid-configuration   discovery (issuer = this server's https URL)
    GET  /jwks                               the public key
    GET  /authorize                          the login page (code flow, PKCE S256 required, registered redirect)
    POST /authorize                          the pick → 302 to the redirect URI with a one-time code
    POST /token                              authorization_code + code_verifier → ID token (60 s codes, once)

It signs anyone in as any demo user, so it is kept to the developer's machine and the developer's own tab:
:func:`serve` refuses a listen address that is not loopback (``allow_non_loopback`` overrides, on purpose);
``POST /authorize`` answers 403 unless it comes from the IdP's own login page (``Origin`` = the issuer,
``Sec-Fetch-Site`` absent, ``same-origin`` or ``none``), so another site cannot mint codes in the developer's
browser; the request's ``state``, ``nonce`` and ``code_challenge`` are at most :data:`MAX_PARAM_CHARS` (the
challenge is the 43-character S256 value), and at most :data:`MAX_CODES` codes are outstanding (expired ones are
dropped at each issue, then the oldest). The login page's CSP lets its form post only to itself and the redirect
URI's origin (``form-action`` also governs the redirect that follows the post).

ID tokens (OIDC Core §2): ``iss``, ``sub``, ``aud`` = client id, ``iat``, ``exp`` (+5 min), ``nonce``,
``auth_time``, the user's claims (``groups``, ``department``, ``approval_limit``), and ``acr: mfa`` with
``amr: [pwd, otp]`` only when MFA was ticked (otherwise ``amr: [pwd]``). A request with ``acr_values=mfa``
shows the page again with a notice: the step-up the broker asks for.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import ipaddress
import re
import secrets
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

from aiohttp import web
from yarl import URL

from broker.dev.idp import read_jwk
from broker.jose import Signer, b64url_encode

__all__ = ["DEMO_USERS", "MAX_CODES", "MAX_PARAM_CHARS", "DevIdp", "NotLoopbackError", "RunningIdp", "serve"]

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
#: the longest ``state``, ``nonce`` (or any other authorization parameter) accepted; longer is a 400
MAX_PARAM_CHARS: Final = 512
#: the most codes outstanding at once: issuing one more drops the expired ones, then the oldest
MAX_CODES: Final = 1000
_S256_CHALLENGE: Final = re.compile(r"[A-Za-z0-9_-]{43}")  # BASE64URL(SHA-256(verifier)), RFC 7636 §4.2
_CSP: Final = "default-src 'none'; style-src 'unsafe-inline'; form-action {}; frame-ancestors 'none'"
#: a CSP source expression that is an origin and nothing else (no ``;``, ``,``, spaces, quotes or wildcards)
_CSP_ORIGIN: Final = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]+)?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]+)?")


class NotLoopbackError(ValueError):
    """:func:`serve` was asked to listen on an address that is not loopback (and not allowed to)."""


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

    def issue(self, grant: _Grant, now: float) -> str:
        """A new one-time code for ``grant``. Expired codes are dropped first, then the oldest until fewer than
        :data:`MAX_CODES` remain, so the codes nobody redeems cannot pile up."""
        for code in [code for code, held in self.codes.items() if held.expires <= now]:
            del self.codes[code]
        while len(self.codes) >= MAX_CODES:
            del self.codes[next(iter(self.codes))]  # dicts keep insertion order: the oldest first
        code = b64url_encode(secrets.token_bytes(32))
        self.codes[code] = grant
        return code

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


def _origin(url: str | None) -> str | None:
    """The serialized origin of an http(s) URL (scheme://host[:port], the default port left out, as browsers send
    ``Origin``), or None (``null``, no header, not http(s), unparseable)."""
    try:
        parsed = URL(url or "")
    except ValueError:
        return None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return None
    return str(parsed.origin())


def _page(body: str, status: int = 200, *, form_action: str = "'none'") -> web.Response:
    text = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><title>Development IdP</title>'
        "<style>body{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:2rem auto;padding:0 1rem}"
        "fieldset{margin:0 0 1rem}label{display:block;padding:.25rem 0}button{font:inherit;padding:.5rem 1.5rem}"
        ".notice{background:#fff8c5;padding:.5rem}</style></head><body>"
        f"<main><h1>Development IdP</h1>{body}</main></body></html>"
    )
    response = web.Response(text=text, status=status, content_type="text/html")
    # same-origin, not no-referrer: under no-referrer a browser sends ``Origin: null`` with the form's POST, and
    # the POST is only accepted with the IdP's own origin; cross-origin (the redirect URI) still gets no Referer
    response.headers.update(
        {
            "Content-Security-Policy": _CSP.format(form_action),
            "Cache-Control": "no-store",
            "Referrer-Policy": "same-origin",
        }
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
    if any(len(params.get(name, "")) > MAX_PARAM_CHARS for name in _AUTHORIZE_PARAMS):
        return f"a parameter is longer than {MAX_PARAM_CHARS} characters"
    client = idp.clients.get(params.get("client_id", ""))
    if client is None or params.get("redirect_uri") not in client:
        return "unknown client or unregistered redirect_uri"
    if params.get("response_type", "code") != "code":
        return "response_type must be code"
    if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
        return "PKCE with S256 is required"
    if not _S256_CHALLENGE.fullmatch(params["code_challenge"]):
        return "code_challenge must be the 43-character S256 value"
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
    redirect_origin = _origin(params["redirect_uri"])
    form_action = "'self'"  # the form posts here; the 302 that answers it goes to the redirect URI's origin
    if redirect_origin is not None and _CSP_ORIGIN.fullmatch(redirect_origin):
        form_action += f" {redirect_origin}"
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
    return _page(body, form_action=form_action)


def _cross_site(idp: DevIdp, request: web.Request) -> str | None:
    """Why this POST is not the IdP's own login page submitting (a login CSRF, or another site minting codes in
    the developer's browser), or None. Browsers send ``Origin`` with every POST; a client without it is refused
    too."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"cross-site sign-in refused (Sec-Fetch-Site: {fetch_site})"
    origin = request.headers.get("Origin")
    if _origin(origin) is None or _origin(origin) != _origin(idp.issuer):
        return "cross-site sign-in refused (Origin is not this identity provider)"
    return None


async def authorize_submit(request: web.Request) -> web.StreamResponse:
    idp: DevIdp = request.app[_IDP]
    refused = _cross_site(idp, request)
    if refused is not None:
        return _page(f"<p>{html.escape(refused)}</p>", status=403)
    form = await request.post()
    params = {name: str(form.get(name, "")) for name in _AUTHORIZE_PARAMS}
    problem = _check_request(idp, params)
    user = str(form.get("user", ""))
    if problem is None and user not in DEMO_USERS:
        problem = "pick a user"
    if problem is not None:
        return _page(f"<p>{html.escape(problem)}</p>", status=400)
    now = time.time()
    grant = _Grant(
        client_id=params["client_id"],
        redirect_uri=params["redirect_uri"],
        challenge=params["code_challenge"],
        nonce=params["nonce"],
        user=user,
        mfa=form.get("mfa") == "1",
        expires=now + CODE_SECONDS,
    )
    code = idp.issue(grant, now)
    location = params["redirect_uri"] + "?" + urlencode({"code": code, "state": params["state"]})
    raise web.HTTPFound(location, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


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


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


async def _bound_addresses(host: str, port: int) -> set[str]:
    """The addresses a listener on ``host`` binds: asyncio's ``create_server`` resolves it the same way (an empty
    host is every interface)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    return {str(info[4][0]) for info in infos}


async def serve(
    listen: str,
    *,
    certs: Path,
    clients: Mapping[str, tuple[str, ...]],
    host_name: str = "localhost",
    allow_non_loopback: bool = False,
) -> RunningIdp:
    """Serve on ``listen`` (host:port; port 0 = any) over TLS with ``DIR/backend.pem`` (a localhost
    certificate of the §10 CA); the issuer is ``https://<host_name>:<port>``. Raises OSError when the port is
    taken, :class:`NotLoopbackError` when ``listen`` is not loopback-only (127.0.0.0/8, ::1, a name resolving only
    to those) and ``allow_non_loopback`` is false: this IdP signs anyone who reaches it in as any demo user."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not allow_non_loopback:
        addresses = await _bound_addresses(host, int(port))
        outside = sorted(address for address in addresses if not _is_loopback(address))
        if outside or not addresses:
            raise NotLoopbackError(
                f"development IdP not started: {listen} is not loopback ({', '.join(outside)}) and this IdP signs "
                "anyone who reaches it in as any demo user; listen on 127.0.0.1, [::1] or localhost, or allow it "
                "explicitly (allow_non_loopback=True)"
            )
    idp = DevIdp(Signer.from_jwk(read_jwk(certs / "idp.jwk")), {k: tuple(v) for k, v in clients.items()})
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "backend.pem", certs / "backend-key.pem")
    runner = web.AppRunner(build_app(idp), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, int(port), ssl_context=context)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    idp.issuer = f"https://{host_name}:{bound_port}"
    return RunningIdp(runner, idp.issuer, idp)
