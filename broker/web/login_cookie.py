"""A login in progress lives in the browser, sealed (CONTRACT §14, HOSTILE: no server state before the IdP answers).

``GET /approvals/login`` is unauthenticated: anything it stored would let any client fill the state store. So the
login's ``state``, ``nonce``, PKCE verifier, ``return_to``, step-up flag and expiry travel in a cookie sealed with
AES-256-GCM (RFC 5116): the browser can neither read the verifier nor change any of it. The cookie is named per
login (:func:`cookie_name`, a prefix of the state), so starting a second login in another tab does not clobber the
first. The key is the process's login key (:mod:`broker.web.oidc_login` keeps one in the state store, so every
replica opens every cookie). Replay is stopped at the callback: the state is marked spent there, once.

Pure: :func:`seal` and :func:`unseal` take the key, the random nonce source and ``now``.
"""

from __future__ import annotations

import binascii
import json
import os
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.jose import JoseError, b64url_decode, b64url_encode
from broker.web.oidc import LoginError

__all__ = ["KEY_BYTES", "LOGIN_COOKIE_PREFIX", "LOGIN_SECONDS", "LoginState", "cookie_name", "seal", "unseal"]

LOGIN_COOKIE_PREFIX: Final = "__Host-broker-login-"
#: a login must come back from the issuer within this many seconds
LOGIN_SECONDS: Final = 600
KEY_BYTES: Final = 32
_NONCE_BYTES: Final = 12
_MAX_COOKIE_CHARS: Final = 2048
_AAD: Final = b"broker approvals login v1"


@dataclass(frozen=True, slots=True)
class LoginState:
    """A login in progress: what the callback must find again. ``mfa``: this is the step-up attempt."""

    state: str
    nonce: str
    verifier: str
    return_to: str
    mfa: bool
    expires_at: float


def cookie_name(state: str) -> str:
    """The login cookie of ``state`` (a valid token: 43 base64url characters, all legal in a cookie name)."""
    return LOGIN_COOKIE_PREFIX + state[:16]


def seal(login: LoginState, key: bytes, *, random: bytes | None = None) -> str:
    """The cookie value: base64url(nonce ‖ AES-GCM(key, nonce, JSON(login), AAD))."""
    nonce = random if random is not None else os.urandom(_NONCE_BYTES)
    plain = json.dumps(
        [login.state, login.nonce, login.verifier, login.return_to, login.mfa, login.expires_at],
        separators=(",", ":"),
    ).encode()
    return b64url_encode(nonce + AESGCM(key).encrypt(nonce, plain, _AAD))


def unseal(value: str | None, key: bytes, *, state: str, now: float) -> LoginState:
    """The login sealed in ``value`` for ``state``; :class:`LoginError` when there is none, it was not sealed
    with ``key`` (forged, altered, another deployment's), is for another state, or has expired."""
    if value is None:
        raise LoginError("state_missing")
    if len(value) > _MAX_COOKIE_CHARS:
        raise LoginError("login_cookie_invalid")
    try:
        raw = b64url_decode(value)
        plain = AESGCM(key).decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _AAD)
        sealed_state, nonce, verifier, return_to, mfa, expires_at = json.loads(plain)
    except (InvalidTag, JoseError, ValueError, TypeError, binascii.Error):
        raise LoginError("login_cookie_invalid") from None
    if sealed_state != state:
        raise LoginError("state_mismatch")
    if not isinstance(expires_at, float | int) or now >= expires_at:
        raise LoginError("state_expired")
    return LoginState(
        str(sealed_state), str(nonce), str(verifier), str(return_to), bool(mfa), float(expires_at)
    )
