"""Browser sessions of the approvals page (CONTRACT §14): cookies, CSRF and the records behind them.

The cookie ``__Host-broker-session`` carries only a random 256-bit id (``Secure``, ``HttpOnly``,
``SameSite=Strict``, ``Path=/``, no ``Domain``: the ``__Host-`` prefix makes the browser refuse it otherwise).
The session itself — who logged in, their ID-token claims, the CSRF token, the expiry — lives in the state
store under the id's hash (``web_session:<H(id)>``), so every replica serves it and a logout ends it everywhere.

A login in progress is only a sealed cookie (:mod:`broker.web.login_cookie`): nothing is stored before the issuer
answers. Its ``state`` is used once: the callback marks ``web_login:<H(state)>`` spent (one ``SET NX`` with the
login's lifetime) after the issuer's answer verified, so a replayed callback finds it spent, and only real
sign-ins write to the store.

A session is that of one person, (issuer, subject): ``sub`` alone names nobody across issuers. A subject revoked
by an operator (``POST /admin/revocations`` kind ``sub``) loses every session: :meth:`SessionBook.get` checks the
revocation on every request and deletes the record it finds revoked (see :meth:`SessionBook.get` for why not an
index of sessions per subject).

:func:`post_refusal` is the pure CSRF decision for every POST: the browser's own ``Sec-Fetch-Site`` and
``Origin`` say same-origin, and the form's token equals the session's (constant time).
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from broker.jose import b64url_encode
from broker.state.base import StateStore, hash_key_part
from broker.web.login_cookie import LOGIN_SECONDS

__all__ = [
    "SESSION_COOKIE",
    "SessionBook",
    "SessionRevoked",
    "WebSession",
    "cookie_header",
    "expired_cookie_header",
    "origin_refusal",
    "post_refusal",
    "valid_token",
]

SESSION_COOKIE: Final = "__Host-broker-session"
MAX_SESSION_SECONDS: Final = 8 * 3600
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 random bytes, base64url


def new_token() -> str:
    return b64url_encode(secrets.token_bytes(32))


def valid_token(value: str | None) -> bool:
    """A cookie or form value that could be one of our tokens; anything else is never looked up."""
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None


def cookie_header(name: str, value: str, *, max_age: int, same_site: str = "Strict") -> str:
    """A ``Set-Cookie`` value with the ``__Host-`` requirements (RFC 6265bis §4.1.3.2)."""
    return f"{name}={value}; Path=/; Secure; HttpOnly; SameSite={same_site}; Max-Age={max_age}"


def expired_cookie_header(name: str) -> str:
    return f"{name}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"


def origin_refusal(headers: Mapping[str, str], *, origin: str) -> str | None:
    """The fetch-metadata and ``Origin`` half of :func:`post_refusal`, for a POST that may come without a session
    (sign-out): a stable reason, or None."""
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site != "same-origin":
        return "csrf_fetch_site"
    sent = headers.get("Origin")
    if sent != origin and not (sent == "null" and site == "same-origin"):
        return "csrf_origin"
    return None


def post_refusal(
    headers: Mapping[str, str], *, origin: str, form_token: str | None, session_token: str
) -> str | None:
    """Why a POST to the page is refused (a stable reason), or None. ``origin`` is the broker's public origin.

    Fetch metadata first: a browser says where the request came from (``Sec-Fetch-Site``, which page content
    cannot set), and a form another site submits is ``cross-site``/``same-site``. ``Origin`` must be ours; it
    may be ``null`` only beside ``Sec-Fetch-Site: same-origin``, because our own pages send ``null`` (their
    ``Referrer-Policy: no-referrer`` makes the browser hide the origin of a form POST). A browser without fetch
    metadata must send our Origin. The CSRF token covers clients that send neither correctly."""
    refused = origin_refusal(headers, origin=origin)
    if refused is not None:
        return refused
    if not valid_token(form_token) or not hmac.compare_digest(str(form_token), session_token):
        return "csrf_token"
    return None


class SessionRevoked(Exception):
    """The session's subject was revoked by an operator; the session record is already deleted."""

    def __init__(self, session: WebSession) -> None:
        super().__init__("session subject revoked")
        self.session = session


@dataclass(frozen=True, slots=True)
class WebSession:
    """A signed-in person: (``iss``, ``sub``) of their ID token, its claims, the CSRF token, the expiry."""

    iss: str
    sub: str
    claims: Mapping[str, Any]
    csrf: str
    created_at: float
    expires_at: float

    def to_record(self) -> dict[str, Any]:
        return {
            "iss": self.iss,
            "sub": self.sub,
            "claims": dict(self.claims),
            "csrf": self.csrf,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> WebSession | None:
        try:
            # a record from before sessions kept the issuer has no "iss": it is refused (sign in again, at most
            # 8 h after the upgrade) rather than guessed
            session = cls(
                iss=str(record["iss"]),
                sub=str(record["sub"]),
                claims=dict(record["claims"]),
                csrf=str(record["csrf"]),
                created_at=float(record["created_at"]),
                expires_at=float(record["expires_at"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return session if valid_token(session.csrf) else None


def _session_key(session_id: str) -> str:
    return f"web_session:{hash_key_part(session_id)}"


def _login_key(state: str) -> str:
    return f"web_login:{hash_key_part(state)}"


class SessionBook:
    """Sessions and logins in the state store. Store errors propagate (``StateUnavailable``): fail closed."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def create(
        self, iss: str, sub: str, claims: Mapping[str, Any], *, now: float, lifetime: int
    ) -> tuple[str, WebSession]:
        lifetime = min(lifetime, MAX_SESSION_SECONDS)
        session = WebSession(iss, sub, dict(claims), new_token(), now, now + lifetime)
        for _ in range(4):
            session_id = new_token()
            if await self.store.compare_and_set_json(
                _session_key(session_id), 0, session.to_record(), lifetime
            ):
                return session_id, session
        raise RuntimeError("could not draw a fresh session id")  # 256-bit collisions: never in practice

    async def get(self, session_id: str | None, now: float) -> WebSession | None:
        """The live session of ``session_id``, or None; raises :class:`SessionRevoked` (after deleting it) when
        its subject is revoked.

        The revocation is read on every request rather than kept as an index of sessions per subject: the API
        pays the same read per request (the guard), an index would be a second record per login that can drift
        from the sessions it lists (expired, deleted by logout, written by a replica that died mid-login), and a
        session created after the revocation would still need this check. One read; no sweep."""
        if session_id is None or not valid_token(session_id):
            return None
        record = await self.store.get_json(_session_key(session_id))
        session = None if record is None else WebSession.from_record(record)
        if session is None or now >= session.expires_at:
            return None
        if await self.store.is_revoked({"sub": session.sub}) is not None:
            await self.end(session_id)
            raise SessionRevoked(session)
        return session

    async def end(self, session_id: str) -> None:
        if valid_token(session_id):
            await self.store.delete_json(_session_key(session_id))

    async def spend_login(self, state: str) -> bool:
        """Mark the login of ``state`` used: True the first time (one ``SET NX`` for the login's lifetime), False
        for a replayed callback."""
        return valid_token(state) and await self.store.claim(_login_key(state), LOGIN_SECONDS)
