"""Issuers' verification keys, the pure part: a JWKS parser (:class:`KeySet`); fetching is
:mod:`broker.identity.issuer_keys`.

Pure part. :meth:`KeySet.from_jwks` keeps only keys that can verify an allowed asymmetric signature and skips
the rest with a reason (J25): ``kty: oct`` (a secret key is never built from a JWK — J03), ``use`` other than
``sig``, ``key_ops`` without ``verify``, RSA < 2048 bits, unknown curves, an ``alg`` we do not allow or that
does not fit the key, and keys that publish private members (a JWKS carrying ``d`` has leaked its private key:
anyone can sign with it). :func:`alg_fits_key` is J04: the token's ``alg`` must fit the key's type and curve
and equal the JWK's own ``alg`` when it has one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.jose import PRIVATE_MEMBERS, JoseError, PublicKey, public_key_from_jwk

__all__ = ["ALG_KEY_TYPES", "KeyEntry", "KeySet", "alg_fits_key"]


#: alg -> (kty, crv or None for RSA): the only algorithms the broker accepts (RFC 7518 §3.1, RFC 8037).
ALG_KEY_TYPES: Mapping[str, tuple[str, str | None]] = {
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "EdDSA": ("OKP", "Ed25519"),
    "RS256": ("RSA", None),
    "PS256": ("RSA", None),
}
_USABLE_CURVES = {("EC", "P-256"), ("EC", "P-384"), ("OKP", "Ed25519")}


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One usable verification key of an issuer."""

    kid: str | None
    key: PublicKey
    #: the JWK's own ``alg`` member, when it has one (then it is the only alg this key verifies)
    alg: str | None
    kty: str
    crv: str | None


def alg_fits_key(alg: str, entry: KeyEntry) -> bool:
    """J04 / RFC 8725 §3.1: ``alg`` fits the key's kty and curve, and equals the JWK's ``alg`` if present."""
    fit = ALG_KEY_TYPES.get(alg)
    if fit is None or fit != (entry.kty, entry.crv):
        return False
    return entry.alg is None or entry.alg == alg


def _unusable_reason(jwk: Any) -> str | None:
    """Why a JWKS member cannot be a verification key, or None if it may be one."""
    if not isinstance(jwk, dict):
        return "not_an_object"
    kty = jwk.get("kty")
    if kty not in ("EC", "OKP", "RSA"):
        return "kty_unsupported"  # includes "oct": never build a secret key from a JWK (J03, J25)
    if PRIVATE_MEMBERS.intersection(jwk):
        return "private_members"
    if "use" in jwk and jwk["use"] != "sig":
        return "use_not_sig"
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return "key_ops_without_verify"
    crv = jwk.get("crv") if kty != "RSA" else None
    if kty != "RSA" and (kty, crv) not in _USABLE_CURVES:
        return "curve_unsupported"
    alg = jwk.get("alg")
    if alg is not None and (not isinstance(alg, str) or ALG_KEY_TYPES.get(alg) != (kty, crv)):
        return "alg_unsupported"  # e.g. HS256 on an RSA key, ES384 on P-256, or an alg we never accept
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return "kid_not_string"
    return None


class KeySet:
    """An immutable set of one issuer's usable keys, looked up by ``kid``. Pure."""

    __slots__ = ("_by_kid", "entries", "skipped")

    def __init__(self, entries: tuple[KeyEntry, ...], skipped: tuple[str, ...] = ()) -> None:
        self.entries = entries
        #: ``"<index>:<kid>:<reason>"`` for each member that was skipped, for logs
        self.skipped = skipped
        by_kid: dict[str | None, tuple[KeyEntry, ...]] = {}
        for entry in entries:
            # RFC 7517 §4.5 lets keys of different types share a kid; keep all, the alg picks (J04).
            by_kid[entry.kid] = (*by_kid.get(entry.kid, ()), entry)
        self._by_kid = by_kid

    @classmethod
    def from_jwks(cls, document: Any) -> KeySet:
        """Parse a JWKS (RFC 7517 §5), skipping unusable keys; ValueError if not ``{"keys": [...]}``."""
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError('a JWKS must be an object with a "keys" array')
        entries: list[KeyEntry] = []
        skipped: list[str] = []
        for index, jwk in enumerate(document["keys"]):
            reason = _unusable_reason(jwk)
            if reason is None:
                try:
                    key = public_key_from_jwk(jwk)
                except JoseError as exc:  # RSA < 2048, bad coordinates, point not on the curve
                    reason = f"invalid_key ({exc})"
                else:
                    crv = jwk.get("crv") if jwk["kty"] != "RSA" else None
                    entries.append(KeyEntry(jwk.get("kid"), key, jwk.get("alg"), jwk["kty"], crv))
                    continue
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            skipped.append(f"{index}:{kid!r}:{reason}")
        return cls(tuple(entries), tuple(skipped))

    def find(self, kid: str | None) -> tuple[KeyEntry, ...]:
        """Keys whose ``kid`` equals ``kid``; for ``kid=None`` the only key of a one-key set, else ()."""
        if kid is None:
            return self.entries if len(self.entries) == 1 else ()
        return self._by_kid.get(kid, ())

    def __len__(self) -> int:
        return len(self.entries)


EMPTY_KEYS = KeySet(())
