"""The broker's signing keys: the current one signs; retired ones stay published until what they signed expired.

:class:`KeyRing` quacks like :class:`broker.jose.Signer` (``sign``, ``kid``, ``alg``, ``public_jwk``), so every
signer of the broker — grants, txn tokens, approval announcements, audit checkpoints — follows a rotation without
being told. Rotation overlap (CONTRACT §5, issue 7): a retired key stays in ``/.well-known/jwks.json`` and in the
txn-token verification keys for ``overlap_seconds`` (longer than any token it signed lives: txn tokens and grants
live ≤ 300 s). Audit checkpoints outlive that: verify old logs with a JWKS that still holds the old key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from broker.identity.jwks import KeyEntry
from broker.identity.jws import JwsError, loads_strict
from broker.jose import PRIVATE_MEMBERS, JoseError, Signer, jwk_thumbprint, public_jwk, public_key_from_jwk
from broker.txn.tokens import verification_keys

DEFAULT_OVERLAP_SECONDS = 900


class KeyRing:
    def __init__(
        self,
        current: Signer,
        previous: Sequence[Mapping[str, Any]] = (),
        *,
        overlap_seconds: float = DEFAULT_OVERLAP_SECONDS,
    ) -> None:
        """``previous``: public JWKs of ``signing.previous_key_files``, published until the config drops them."""
        self._current = current
        self._overlap = overlap_seconds
        #: (public jwk, retire-after epoch or None for configured previous keys, which stay until removed)
        self._retired: list[tuple[dict[str, Any], float | None]] = [(dict(p), None) for p in previous]
        self._jwks: dict[str, Any] = {}
        self._keys: Mapping[str, KeyEntry] = {}
        self._refresh(now=0.0)

    # -- the Signer interface -------------------------------------------------------------------------------
    @property
    def kid(self) -> str:
        return self._current.kid

    @property
    def alg(self) -> str:
        return self._current.alg

    def public_jwk(self) -> dict[str, str]:
        return self._current.public_jwk()

    def sign(
        self, claims: Mapping[str, Any], *, typ: str, extra_headers: Mapping[str, Any] | None = None
    ) -> str:
        return self._current.sign(claims, typ=typ, extra_headers=extra_headers)

    # -- publication --------------------------------------------------------------------------------------
    def jwks(self, now: float) -> dict[str, Any]:
        """The current key first, then the retired ones still within their overlap."""
        if any(until is not None and until <= now for _, until in self._retired):
            self._refresh(now)
        return self._jwks

    def verification_keys(self, now: float) -> Mapping[str, KeyEntry]:
        self.jwks(now)
        return self._keys

    def rotate(self, new: Signer, *, now: float) -> bool:
        """Make ``new`` the signing key; the old one stays published for the overlap. False if nothing changed."""
        if new.kid == self._current.kid:
            return False
        self._retired = [(jwk, until) for jwk, until in self._retired if jwk["kid"] != new.kid]
        self._retired.insert(0, (self._current.public_jwk(), now + self._overlap))
        self._current = new
        self._refresh(now)
        return True

    def _refresh(self, now: float) -> None:
        self._retired = [(jwk, until) for jwk, until in self._retired if until is None or until > now]
        keys: list[dict[str, Any]] = [self._current.public_jwk(), *(jwk for jwk, _ in self._retired)]
        self._jwks = {"keys": keys}
        self._keys = verification_keys(*keys)


def public_jwks_from_file(path: Path) -> dict[str, Any]:
    """A static ``jwks`` document for :func:`txn_token_middleware` from a file holding the broker's JWKS
    ``{"keys": [...]}`` or a single JWK.

    A private JWK (e.g. the broker's own ``broker-signing.jwk`` on a development machine) contributes only its
    public part, with its ``kid`` (or, lacking one, its RFC 7638 thumbprint, as the broker's signer uses) and
    ``alg``: private members never reach the key set. Raises ``ValueError`` naming the path for an unreadable
    file, bad JSON or an unusable private key; public keys are judged by the middleware (J25).
    """
    try:
        document = loads_strict(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read broker keys: {exc.strerror}") from exc
    except JwsError as exc:
        raise ValueError(f"{path}: not JSON ({exc.reason})") from exc
    members = document.get("keys") if isinstance(document, dict) and "keys" in document else [document]
    if not isinstance(members, list):
        raise ValueError(f"{path}: 'keys' must be an array")
    keys: list[Any] = []
    for jwk in members:
        if isinstance(jwk, dict) and PRIVATE_MEMBERS.intersection(jwk):
            try:
                public = public_jwk(public_key_from_jwk(jwk))
                public["kid"] = str(jwk.get("kid") or jwk_thumbprint(jwk))
            except JoseError as exc:
                raise ValueError(f"{path}: unusable private key: {exc}") from exc
            if "alg" in jwk:
                public["alg"] = jwk["alg"]
            jwk = public
        keys.append(jwk)
    return {"keys": keys}
