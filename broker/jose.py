"""Small, strict JOSE helpers shared by every token the broker mints or checks.

- base64url without padding (RFC 7515 §2),
- RFC 7638 JWK thumbprints (``cnf.jkt``, ``kid`` of broker keys),
- JWK <-> ``cryptography`` key objects for the asymmetric key types we allow (EC P-256/P-384/P-521, Ed25519, RSA),
- :class:`Signer`: compact JWS signing with the broker's private JWK (grants, txn tokens, audit checkpoints).

Signing uses ``cryptography`` directly (PERF.md: 23 µs per ES256 signature against 37 µs through PyJWT).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

_CURVES: dict[str, tuple[ec.EllipticCurve, int, str, hashes.HashAlgorithm]] = {
    # crv: (curve, coordinate size in bytes, JWS alg, hash)
    "P-256": (ec.SECP256R1(), 32, "ES256", hashes.SHA256()),
    "P-384": (ec.SECP384R1(), 48, "ES384", hashes.SHA384()),
    "P-521": (ec.SECP521R1(), 66, "ES512", hashes.SHA512()),
}
_CURVE_BY_NAME = {curve.name: crv for crv, (curve, _, _, _) in _CURVES.items()}
#: crv -> the ECDSA signature algorithm of its JWS alg, built once: ECDSA objects are immutable, and a fresh one
#: per call costs more than the rest of the glue around an ES256 signature (construction, then OpenSSL set-up)
_ECDSA = {crv: ec.ECDSA(digest) for crv, (_, _, _, digest) in _CURVES.items()}
_SHA256 = hashes.SHA256()
_PKCS1V15 = padding.PKCS1v15()
_PSS_SHA256 = padding.PSS(padding.MGF1(hashes.SHA256()), 32)

# RFC 7638 §3.2: the required members of each key type, in lexicographic order.
_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
    "oct": ("k", "kty"),
}
#: members that make a JWK private (RFC 7517 §9.2, RFC 7518 §6); a DPoP ``jwk`` must carry none of them.
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class JoseError(ValueError):
    """A JWK or JWS that cannot be used; the message is safe to log, never shown with secrets."""


_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64url(data: bytes) -> bytes:
    # what base64.urlsafe_b64encode does, without its two Python-level calls
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=")


def b64url_encode(data: bytes) -> str:
    return _b64url(data).decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url (RFC 7515 §2): alphabet ``A-Za-z0-9-_``, no padding, no whitespace."""
    if not isinstance(text, str) or not text.isascii() or "=" in text or len(text) % 4 == 1:
        raise JoseError("not base64url")
    if text.strip("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"):
        raise JoseError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url) over the required members only."""
    kty = jwk.get("kty")
    members = _THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None:
        raise JoseError("unsupported kty")
    selected = {}
    for name in members:
        value = jwk.get(name)
        if not isinstance(value, str):
            raise JoseError(f"jwk member {name!r} missing")
        selected[name] = value
    canonical = json.dumps(selected, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def _int_from_b64(value: Any, name: str) -> int:
    if not isinstance(value, str):
        raise JoseError(f"jwk member {name!r} missing")
    return int.from_bytes(b64url_decode(value), "big")


def _b64_from_int(value: int, size: int | None = None) -> str:
    length = size if size is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url_encode(value.to_bytes(length, "big"))


def public_key_from_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    """The public key of a JWK (EC, OKP/Ed25519 or RSA >= 2048 bits); anything else raises JoseError."""
    kty = jwk.get("kty")
    if kty == "EC":
        spec = _CURVES.get(jwk.get("crv"))  # type: ignore[arg-type]
        if spec is None:
            raise JoseError("unsupported curve")
        curve, size, _, _ = spec
        x, y = jwk.get("x"), jwk.get("y")
        if not isinstance(x, str) or not isinstance(y, str):
            raise JoseError("EC jwk needs x and y")
        xb, yb = b64url_decode(x), b64url_decode(y)
        if len(xb) != size or len(yb) != size:
            raise JoseError("EC coordinate has the wrong length")
        try:
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(xb, "big"), int.from_bytes(yb, "big"), curve
            ).public_key()
        except ValueError as exc:  # point not on the curve
            raise JoseError("invalid EC point") from exc
    if kty == "OKP":
        if jwk.get("crv") != "Ed25519":
            raise JoseError("unsupported OKP curve")
        xb = b64url_decode(jwk.get("x", ""))
        if len(xb) != 32:
            raise JoseError("Ed25519 key has the wrong length")
        return ed25519.Ed25519PublicKey.from_public_bytes(xb)
    if kty == "RSA":
        n = _int_from_b64(jwk.get("n"), "n")
        e = _int_from_b64(jwk.get("e"), "e")
        if n.bit_length() < 2048:
            raise JoseError("RSA key shorter than 2048 bits")
        return rsa.RSAPublicNumbers(e, n).public_key()
    raise JoseError("unsupported kty")


def public_jwk(key: PrivateKey | PublicKey) -> dict[str, str]:
    """The public JWK members of a key (no ``kid``/``alg``)."""
    pub = key.public_key() if isinstance(key, PrivateKey) else key
    if isinstance(pub, ec.EllipticCurvePublicKey):
        crv = _CURVE_BY_NAME[pub.curve.name]
        size = _CURVES[crv][1]
        nums = pub.public_numbers()
        return {"kty": "EC", "crv": crv, "x": _b64_from_int(nums.x, size), "y": _b64_from_int(nums.y, size)}
    if isinstance(pub, ed25519.Ed25519PublicKey):
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": b64url_encode(pub.public_bytes(Encoding.Raw, PublicFormat.Raw)),
        }
    nums_rsa = pub.public_numbers()
    return {"kty": "RSA", "n": _b64_from_int(nums_rsa.n), "e": _b64_from_int(nums_rsa.e)}


def private_key_from_jwk(jwk: Mapping[str, Any]) -> PrivateKey:
    kty = jwk.get("kty")
    if kty == "EC":
        pub = public_key_from_jwk(jwk)
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        d = _int_from_b64(jwk.get("d"), "d")
        return ec.EllipticCurvePrivateNumbers(d, pub.public_numbers()).private_key()
    if kty == "OKP" and jwk.get("crv") == "Ed25519":
        return ed25519.Ed25519PrivateKey.from_private_bytes(b64url_decode(jwk.get("d", "")))
    if kty == "RSA":
        pub_rsa = public_key_from_jwk(jwk)
        assert isinstance(pub_rsa, rsa.RSAPublicKey)
        p, q, d = (_int_from_b64(jwk.get(m), m) for m in ("p", "q", "d"))
        return rsa.RSAPrivateNumbers(
            p,
            q,
            d,
            rsa.rsa_crt_dmp1(d, p),
            rsa.rsa_crt_dmq1(d, q),
            rsa.rsa_crt_iqmp(p, q),
            pub_rsa.public_numbers(),
        ).private_key()
    raise JoseError("unsupported private jwk")


def private_jwk(key: PrivateKey) -> dict[str, str]:
    """Private JWK with ``kid`` = RFC 7638 thumbprint and the matching ``alg``."""
    jwk = public_jwk(key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        jwk["d"] = _b64_from_int(key.private_numbers().private_value, _CURVES[jwk["crv"]][1])
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        jwk["d"] = b64url_encode(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
    else:
        nums = key.private_numbers()
        jwk.update(
            d=_b64_from_int(nums.d),
            p=_b64_from_int(nums.p),
            q=_b64_from_int(nums.q),
            dp=_b64_from_int(nums.dmp1),
            dq=_b64_from_int(nums.dmq1),
            qi=_b64_from_int(nums.iqmp),
        )
    jwk["kid"] = jwk_thumbprint(jwk)
    jwk["alg"] = default_alg(key)
    return jwk


def default_alg(key: PrivateKey | PublicKey) -> str:
    pub = key.public_key() if isinstance(key, PrivateKey) else key
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return _CURVES[_CURVE_BY_NAME[pub.curve.name]][2]
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return "EdDSA"
    return "RS256"


def generate_ec_jwk() -> dict[str, str]:
    """A fresh P-256 private JWK (``kid`` = thumbprint, ``alg`` = ES256)."""
    return private_jwk(ec.generate_private_key(ec.SECP256R1()))


def write_private_jwk(path: Path, jwk: Mapping[str, Any]) -> None:
    """Write a private JWK readable by its owner only, with no window in which it is not.

    A fresh 0600 file in the same folder is renamed over the target: an existing file with looser permissions
    is never written into, and a symlink planted at the target is replaced, not followed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(dict(jwk), fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# What _key_kind answers: which branch of raw_signature / verify_signature a key takes.
_EC_PRIVATE, _ED_PRIVATE, _EC_PUBLIC, _ED_PUBLIC, _OTHER = range(5)
#: exact class -> kind, filled on first sight: isinstance against cryptography's ABCs costs about a
#: microsecond per check, a dict lookup on the class a tenth of that. Bounded (a handful of classes exist).
_KIND_BY_CLASS: dict[type, int] = {}


def _key_kind(key: object) -> int:
    cls = type(key)
    kind = _KIND_BY_CLASS.get(cls)
    if kind is None:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            kind = _EC_PRIVATE
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            kind = _ED_PRIVATE
        elif isinstance(key, ec.EllipticCurvePublicKey):
            kind = _EC_PUBLIC
        elif isinstance(key, ed25519.Ed25519PublicKey):
            kind = _ED_PUBLIC
        else:
            kind = _OTHER
        # only where the class alone decides isinstance (not an object that reports another __class__)
        if key.__class__ is cls and len(_KIND_BY_CLASS) < 64:
            _KIND_BY_CLASS[cls] = kind
    return kind


def raw_signature(key: PrivateKey, alg: str, signing_input: bytes) -> bytes:
    """JWS signature bytes (RFC 7518 §3): ECDSA as fixed-size r||s, not DER."""
    kind = _key_kind(key)  # the casts below are what _key_kind established
    if kind == _EC_PRIVATE:
        ec_key = cast(ec.EllipticCurvePrivateKey, key)
        crv = _CURVE_BY_NAME[ec_key.curve.name]
        size, expected_alg = _CURVES[crv][1:3]
        if alg != expected_alg:
            raise JoseError(f"{alg} does not fit {crv}")
        r, s = decode_dss_signature(ec_key.sign(signing_input, _ECDSA[crv]))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    if kind == _ED_PRIVATE:
        if alg != "EdDSA":
            raise JoseError(f"{alg} does not fit Ed25519")
        return cast(ed25519.Ed25519PrivateKey, key).sign(signing_input)
    if alg == "RS256":
        return cast(rsa.RSAPrivateKey, key).sign(signing_input, _PKCS1V15, _SHA256)
    if alg == "PS256":
        return cast(rsa.RSAPrivateKey, key).sign(signing_input, _PSS_SHA256, _SHA256)
    raise JoseError(f"{alg} does not fit RSA")


def verify_signature(key: PublicKey, alg: str, signing_input: bytes, signature: bytes) -> bool:
    """Check a JWS signature; False on any mismatch (wrong length, wrong alg for the key, bad signature)."""
    try:
        kind = _key_kind(key)  # the casts below are what _key_kind established
        if kind == _EC_PUBLIC:
            ec_key = cast(ec.EllipticCurvePublicKey, key)
            crv = _CURVE_BY_NAME[ec_key.curve.name]
            size, expected_alg = _CURVES[crv][1:3]
            if alg != expected_alg or len(signature) != 2 * size:
                return False
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            if r == 0 or s == 0:  # CVE-2022-21449 class: never even try
                return False
            ec_key.verify(encode_dss_signature(r, s), signing_input, _ECDSA[crv])
        elif kind == _ED_PUBLIC:
            if alg != "EdDSA":
                return False
            cast(ed25519.Ed25519PublicKey, key).verify(signature, signing_input)
        elif alg == "RS256":
            cast(rsa.RSAPublicKey, key).verify(signature, signing_input, _PKCS1V15, _SHA256)
        elif alg == "PS256":
            cast(rsa.RSAPublicKey, key).verify(signature, signing_input, _PSS_SHA256, _SHA256)
        else:
            return False
    except InvalidSignature:
        return False
    return True


#: json.dumps(separators=(",", ":"), ensure_ascii=False), built once: dumps() would build an encoder per call
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def compact_json(value: Any) -> bytes:
    return _COMPACT.encode(value).encode("utf-8")


class SigningKey(Protocol):
    """What signs broker tokens: a :class:`Signer`, or the :class:`broker.keys.KeyRing` that rotates them."""

    @property
    def kid(self) -> str: ...

    @property
    def alg(self) -> str: ...

    def public_jwk(self) -> dict[str, str]: ...

    def sign(
        self, claims: Mapping[str, Any], *, typ: str, extra_headers: Mapping[str, Any] | None = None
    ) -> str: ...


@dataclass(frozen=True)
class Signer:
    """The broker's signing key: mints grants, txn tokens, approval announcements and audit checkpoints."""

    key: PrivateKey
    kid: str
    alg: str
    #: ``typ`` -> base64url protected header ``{"alg", "typ", "kid"}`` and its ".": a header names this signer's
    #: own kid and alg, so a rotation (KeyRing swaps in another Signer) can never sign under a stale one
    _headers: dict[str, bytes] = field(init=False, repr=False, compare=False, default_factory=dict)
    #: ``raw_signature(key, alg, ·)`` with the per-key work done once; None: raw_signature decides (and raises)
    _signature: Callable[[bytes], bytes] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_signature", _prepared_signature(self.key, self.alg))

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> Signer:
        if not isinstance(jwk, Mapping) or "d" not in jwk:
            raise JoseError("signing key must be a private JWK")
        key = private_key_from_jwk(jwk)
        kid = jwk.get("kid") or jwk_thumbprint(jwk)
        alg = jwk.get("alg") or default_alg(key)
        return cls(key=key, kid=str(kid), alg=str(alg))

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        try:
            jwk = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise JoseError(f"cannot read signing key {path}: {exc}") from exc
        return cls.from_jwk(jwk)

    def public_jwk(self) -> dict[str, str]:
        return {**public_jwk(self.key), "kid": self.kid, "alg": self.alg, "use": "sig"}

    def sign(
        self, claims: Mapping[str, Any], *, typ: str, extra_headers: Mapping[str, Any] | None = None
    ) -> str:
        cacheable = not extra_headers and type(typ) is str
        head = self._headers.get(typ) if cacheable else None
        if head is None:
            header = {"alg": self.alg, "typ": typ, "kid": self.kid, **(extra_headers or {})}
            head = _b64url(compact_json(header)) + b"."
            if cacheable and len(self._headers) < _MAX_CACHED_HEADERS:
                self._headers[typ] = head
        signing_input = head + _b64url(compact_json(claims))
        if self._signature is not None:
            signature = self._signature(signing_input)
        else:
            signature = raw_signature(self.key, self.alg, signing_input)
        return (signing_input + b"." + _b64url(signature)).decode("ascii")


#: distinct ``typ`` values one Signer keeps a header for (the broker signs under a handful)
_MAX_CACHED_HEADERS = 16


def _prepared_signature(key: PrivateKey, alg: str) -> Callable[[bytes], bytes] | None:
    """What ``raw_signature(key, alg, data)`` computes, as a function of ``data`` alone with the key's kind,
    curve, size and ECDSA object looked up once; None where raw_signature itself must run (RSA, whose private
    operation dwarfs the dispatch, and a key that does not fit ``alg``, which it refuses on every call)."""
    kind = _key_kind(key)
    if kind == _EC_PRIVATE:
        ec_key = cast(ec.EllipticCurvePrivateKey, key)
        crv = _CURVE_BY_NAME.get(ec_key.curve.name)
        if crv is None or _CURVES[crv][2] != alg:
            return None
        size, ecdsa, ec_sign = _CURVES[crv][1], _ECDSA[crv], ec_key.sign

        def ec_signature(data: bytes) -> bytes:
            r, s = decode_dss_signature(ec_sign(data, ecdsa))
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")

        return ec_signature
    if kind == _ED_PRIVATE and alg == "EdDSA":
        return cast(ed25519.Ed25519PrivateKey, key).sign
    return None
