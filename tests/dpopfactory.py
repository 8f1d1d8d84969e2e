"""Test factory for DPoP proofs (RFC 9449 §4.2) that can break exactly one thing.

``make_proof(key, htm="POST", htu=..., iat=...)`` is a valid proof; each keyword breaks one part:

- ``header_overrides`` / ``payload_overrides``: members to set, or to remove with the :data:`DELETE` sentinel;
- ``raw_header`` / ``raw_payload``: the exact JSON text of a segment (duplicate members, arrays, bad UTF-8);
- ``sign_alg`` / ``signing_key``: sign with another algorithm or key than the header claims;
- ``signature``: the exact signature bytes (empty, wrong length, r=s=0);
- ``payload_after_signing``: sign the normal payload, then swap in this one (tampering, D07).

Keys are private JWK dicts as :func:`broker.jose.private_jwk` makes them (``alg`` and ``kid`` included).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.jose import (
    PRIVATE_MEMBERS,
    PrivateKey,
    b64url_encode,
    compact_json,
    private_jwk,
    private_key_from_jwk,
    raw_signature,
)

DELETE: Any = object()  #: sentinel: remove this member instead of setting it

_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
# Key objects of the JWKs made here, by kid: signing skips JWK parsing, and works for keys broker.jose
# refuses to load (RSA < 2048), which tests need to prove the verifier refuses them.
_KEY_OBJECTS: dict[str, PrivateKey] = {}


def _registered(key: PrivateKey) -> dict[str, str]:
    jwk = private_jwk(key)
    _KEY_OBJECTS[jwk["kid"]] = key
    return jwk


def ec_key(crv: str = "P-256") -> dict[str, str]:
    """A fresh private EC JWK on ``crv``."""
    return _registered(ec.generate_private_key(_CURVES[crv]))


def ed25519_key() -> dict[str, str]:
    return _registered(ed25519.Ed25519PrivateKey.generate())


@lru_cache(maxsize=4)
def _rsa_key(bits: int) -> tuple[tuple[str, str], ...]:
    return tuple(_registered(rsa.generate_private_key(public_exponent=65537, key_size=bits)).items())


def rsa_key(bits: int = 2048) -> dict[str, str]:
    """A private RSA JWK (cached per size: RSA generation is slow)."""
    return dict(_rsa_key(bits))


def public_part(jwk: Mapping[str, Any]) -> dict[str, Any]:
    """The public members of a private JWK, without ``kid``/``alg`` (what a client puts in the header)."""
    return {k: v for k, v in jwk.items() if k not in PRIVATE_MEMBERS and k not in ("kid", "alg")}


def _apply(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for name, value in overrides.items():
        if value is DELETE:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


def _segment(value: Mapping[str, Any] | str | bytes) -> str:
    if isinstance(value, bytes):
        return b64url_encode(value)
    if isinstance(value, str):
        return b64url_encode(value.encode("utf-8", "surrogatepass"))
    return b64url_encode(compact_json(value))


def make_proof(
    jwk_private: Mapping[str, Any],
    *,
    htm: str = "POST",
    htu: str = "https://broker.example.org/v1/tools/approveExpense",
    iat: int,
    jti: str | None = None,
    ath: str | None = None,
    nonce: str | None = None,
    header_overrides: Mapping[str, Any] | None = None,
    payload_overrides: Mapping[str, Any] | None = None,
    raw_header: str | bytes | None = None,
    raw_payload: str | bytes | None = None,
    sign_alg: str | None = None,
    signing_key: Mapping[str, Any] | None = None,
    signature: bytes | None = None,
    payload_after_signing: Mapping[str, Any] | None = None,
) -> str:
    """A compact DPoP proof signed with ``jwk_private`` (see the module docstring for the knobs)."""
    alg = str(jwk_private["alg"])
    header = _apply({"typ": "dpop+jwt", "alg": alg, "jwk": public_part(jwk_private)}, header_overrides or {})
    claims: dict[str, Any] = {
        "jti": jti if jti is not None else secrets.token_urlsafe(16),
        "htm": htm,
        "htu": htu,
        "iat": iat,
    }
    if ath is not None:
        claims["ath"] = ath
    if nonce is not None:
        claims["nonce"] = nonce
    claims = _apply(claims, payload_overrides or {})
    header_segment = _segment(raw_header if raw_header is not None else header)
    payload_segment = _segment(raw_payload if raw_payload is not None else claims)
    signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
    if signature is None:
        signer = signing_key if signing_key is not None else jwk_private
        key = _KEY_OBJECTS.get(signer.get("kid", "")) or private_key_from_jwk(signer)
        signature = raw_signature(key, sign_alg or alg, signing_input)
    if payload_after_signing is not None:
        payload_segment = _segment(_apply(claims, payload_after_signing))
    return f"{header_segment}.{payload_segment}.{b64url_encode(signature)}"
