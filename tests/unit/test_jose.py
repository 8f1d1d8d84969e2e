"""broker.jose signing and verification glue: the fast paths (a per-Signer header cache and prepared signature,
shared ECDSA/padding objects, a per-class key dispatch, binascii base64url) give exactly what the straightforward
construction gives: the same bytes, the same accepted and refused inputs, the same exceptions.

The ``_reference_*`` functions are the construction as it was before those fast paths, kept here as the oracle.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from broker.jose import (
    JoseError,
    PrivateKey,
    PublicKey,
    Signer,
    b64url_decode,
    b64url_encode,
    compact_json,
    generate_ec_jwk,
    private_jwk,
    raw_signature,
    verify_signature,
)
from broker.keys import KeyRing
from broker.txn.tokens import TXN_TYP, mint_txn_token, verify_txn_token

# --- the oracle: the construction before the fast paths ----------------------------------------------------

_REF_CURVES = {
    "secp256r1": (32, "ES256", hashes.SHA256()),
    "secp384r1": (48, "ES384", hashes.SHA384()),
    "secp521r1": (66, "ES512", hashes.SHA512()),
}
_REF_CRV = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def _ref_b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _reference_raw_signature(key: Any, alg: str, signing_input: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        crv = _REF_CRV[key.curve.name]
        size, expected_alg, digest = _REF_CURVES[key.curve.name]
        if alg != expected_alg:
            raise JoseError(f"{alg} does not fit {crv}")
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(digest)))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        if alg != "EdDSA":
            raise JoseError(f"{alg} does not fit Ed25519")
        return key.sign(signing_input)
    if alg == "RS256":
        return bytes(key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256()))
    if alg == "PS256":
        return bytes(key.sign(signing_input, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256()))
    raise JoseError(f"{alg} does not fit RSA")


def _reference_verify_signature(key: Any, alg: str, signing_input: bytes, signature: bytes) -> bool:
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            _REF_CRV[key.curve.name]  # KeyError for a curve JOSE has no alg for here, as before
            size, expected_alg, digest = _REF_CURVES[key.curve.name]
            if alg != expected_alg or len(signature) != 2 * size:
                return False
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            if r == 0 or s == 0:
                return False
            key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(digest))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            if alg != "EdDSA":
                return False
            key.verify(signature, signing_input)
        elif alg == "RS256":
            key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
        elif alg == "PS256":
            key.verify(
                signature, signing_input, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256()
            )
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _reference_sign(
    signer: Signer, claims: Mapping[str, Any], *, typ: Any, extra_headers: Mapping[str, Any] | None = None
) -> str:
    header = {"alg": signer.alg, "typ": typ, "kid": signer.kid, **(extra_headers or {})}
    signing_input = _ref_b64(compact_json(header)) + "." + _ref_b64(compact_json(claims))
    signature = _reference_raw_signature(signer.key, signer.alg, signing_input.encode("ascii"))
    return signing_input + "." + _ref_b64(signature)


def _outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """What ``fn(*args, **kwargs)`` did: its value, or its exception's type and message."""
    try:
        return ("value", fn(*args, **kwargs))
    except Exception as exc:  # the exception itself is what is compared
        return ("raised", type(exc), str(exc))


# --- keys ------------------------------------------------------------------------------------------------

_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEYS: dict[str, PrivateKey] = {
    "P-256": ec.generate_private_key(ec.SECP256R1()),
    "P-384": ec.generate_private_key(ec.SECP384R1()),
    "P-521": ec.generate_private_key(ec.SECP521R1()),
    "Ed25519": ed25519.Ed25519PrivateKey.generate(),
    "RSA": _RSA,
}
NATIVE_ALG = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "Ed25519": "EdDSA", "RSA": "RS256"}
ALGS = ("ES256", "ES384", "ES512", "EdDSA", "RS256", "PS256", "HS256", "none")
#: deterministic signatures: the whole token must be byte-identical, not only header and payload
DETERMINISTIC = {("Ed25519", "EdDSA"), ("RSA", "RS256")}

CLAIMS: dict[str, Any] = {
    "iss": "https://localhost:8443",
    "aud": "example.org",
    "iat": 1_800_000_000,
    "exp": 1_800_000_300,
    "txn": "t" * 22,
    "sub": "alice",
    "rctx": {"authn": "dpop", "req_ip": "192.0.2.7"},
    "tctx": {"tool": "approveExpense", "arguments": {"amount": 4800, "note": "café ☕"}, "score": 0.5},
}


def _segments(token: str) -> tuple[str, str, bytes]:
    header_b64, payload_b64, signature_b64 = token.split(".")
    return header_b64, payload_b64, b64url_decode(signature_b64)


# --- base64url -------------------------------------------------------------------------------------------


def test_b64url_encode_is_urlsafe_b64encode_without_padding() -> None:
    rng = random.Random(7515)
    for length in range(301):
        for _ in range(8):
            data = rng.randbytes(length)
            expected = base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
            assert b64url_encode(data) == expected
            assert b64url_encode(bytearray(data)) == expected  # type: ignore[arg-type]
            assert b64url_encode(memoryview(data)) == expected  # type: ignore[arg-type]
    # every byte value, so every character of both alphabets' differing positions ("+/" -> "-_") occurs
    everything = bytes(range(256)) * 3
    assert b64url_encode(everything) == base64.urlsafe_b64encode(everything).rstrip(b"=").decode("ascii")


def test_b64url_encode_refuses_what_base64_refuses() -> None:
    with pytest.raises(TypeError):
        base64.urlsafe_b64encode("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        b64url_encode("text")  # type: ignore[arg-type]


# --- Signer.sign: same bytes as the reference construction -----------------------------------------------


@pytest.mark.parametrize("name", list(KEYS))
@pytest.mark.parametrize("typ", [TXN_TYP, "JWT", "dpop+jwt", "checkpoint+jwt", "é"])
def test_sign_matches_the_reference_construction(name: str, typ: str) -> None:
    key = KEYS[name]
    alg = NATIVE_ALG[name]
    signer = Signer(key=key, kid=f"kid-{name}", alg=alg)
    assert (signer._signature is None) == (name == "RSA")  # the prepared path is the one under test
    for _ in range(2):  # the second one comes from the header cache
        token = signer.sign(CLAIMS, typ=typ)
        reference = _reference_sign(signer, CLAIMS, typ=typ)
        assert token.split(".")[:2] == reference.split(".")[:2]
        if (name, alg) in DETERMINISTIC:
            assert token == reference
        header_b64, payload_b64, signature = _segments(token)
        assert json.loads(b64url_decode(header_b64)) == {"alg": alg, "typ": typ, "kid": f"kid-{name}"}
        signing_input = f"{header_b64}.{payload_b64}".encode()
        public = key.public_key()
        assert verify_signature(public, alg, signing_input, signature)
        assert _reference_verify_signature(public, alg, signing_input, signature)


def test_sign_with_pss_matches_the_reference_segments() -> None:
    signer = Signer(key=_RSA, kid="rsa", alg="PS256")
    token = signer.sign(CLAIMS, typ="JWT")
    assert token.split(".")[:2] == _reference_sign(signer, CLAIMS, typ="JWT").split(".")[:2]
    header_b64, payload_b64, signature = _segments(token)
    assert verify_signature(_RSA.public_key(), "PS256", f"{header_b64}.{payload_b64}".encode(), signature)


def test_sign_from_jwk_matches_the_reference() -> None:
    signer = Signer.from_jwk(generate_ec_jwk())
    token = signer.sign(CLAIMS, typ=TXN_TYP)
    reference = _reference_sign(signer, CLAIMS, typ=TXN_TYP)
    assert token.split(".")[:2] == reference.split(".")[:2]
    assert len(_segments(token)[2]) == 64


@pytest.mark.parametrize(
    "extra",
    [
        {"jwk": {"kty": "EC", "crv": "P-256"}},
        {"cty": "JWT", "x5t": "abc"},
        {"typ": "overridden+jwt"},  # extra headers may override the standard members, as before
        {"kid": "other-kid", "alg": "ES256"},
        {},  # empty: the same header as none at all
    ],
    ids=["jwk", "two-members", "typ-override", "kid-override", "empty"],
)
def test_extra_headers_still_work(extra: dict[str, Any]) -> None:
    signer = Signer.from_jwk(generate_ec_jwk())
    plain_before = signer.sign(CLAIMS, typ=TXN_TYP).split(".")[0]
    token = signer.sign(CLAIMS, typ=TXN_TYP, extra_headers=extra)
    reference = _reference_sign(signer, CLAIMS, typ=TXN_TYP, extra_headers=extra)
    assert token.split(".")[:2] == reference.split(".")[:2]
    header = json.loads(b64url_decode(token.split(".")[0]))
    assert header == {"alg": signer.alg, "typ": TXN_TYP, "kid": signer.kid, **extra}
    assert list(header) == list({"alg": 0, "typ": 0, "kid": 0, **extra})  # member order as before
    # extra headers never leak into the cached header of a plain signature
    assert signer.sign(CLAIMS, typ=TXN_TYP).split(".")[0] == plain_before
    header_b64, payload_b64, signature = _segments(token)
    assert verify_signature(
        signer.key.public_key(), "ES256", f"{header_b64}.{payload_b64}".encode(), signature
    )


def test_header_cache_is_per_typ_and_bounded() -> None:
    signer = Signer.from_jwk(generate_ec_jwk())
    for round_ in range(2):
        for i in range(40):
            typ = f"typ-{i}+jwt"
            token = signer.sign({"n": i, "round": round_}, typ=typ)
            assert (
                token.split(".")[:2]
                == _reference_sign(signer, {"n": i, "round": round_}, typ=typ).split(".")[:2]
            )
    assert len(signer._headers) <= 16


def test_a_typ_that_is_not_a_str_is_signed_as_before() -> None:
    signer = Signer.from_jwk(generate_ec_jwk())
    for typ in (["a", "b"], None, 3):
        token = signer.sign(CLAIMS, typ=typ)  # type: ignore[arg-type]
        assert token.split(".")[:2] == _reference_sign(signer, CLAIMS, typ=typ).split(".")[:2]
    assert signer._headers == {}


def test_sign_refuses_what_it_refused() -> None:
    k256 = KEYS["P-256"]
    cases: list[tuple[PrivateKey, str]] = [
        (k256, "ES384"),
        (k256, "EdDSA"),
        (k256, "none"),
        (KEYS["Ed25519"], "ES256"),
        (_RSA, "ES256"),
        (_RSA, "HS256"),
        (ec.generate_private_key(ec.SECP256K1()), "ES256"),  # a curve JOSE has no alg for here
    ]
    for key, alg in cases:
        signer = Signer(key=key, kid="k", alg=alg)  # constructing never raises, signing does, as before
        got = _outcome(signer.sign, CLAIMS, typ="JWT")
        assert got[0] == "raised"
        assert got == _outcome(_reference_sign, signer, CLAIMS, typ="JWT")
    with pytest.raises(TypeError):  # claims that are not JSON, as before
        Signer.from_jwk(generate_ec_jwk()).sign({"x": object()}, typ="JWT")


def test_signer_equality_hash_and_repr_are_its_three_fields() -> None:
    key = KEYS["P-256"]
    a, b = Signer(key=key, kid="a", alg="ES256"), Signer(key=key, kid="a", alg="ES256")
    a.sign(CLAIMS, typ="JWT")  # a has a cached header, b none: still equal
    assert a == b and hash(a) == hash(b)
    assert a != Signer(key=key, kid="b", alg="ES256")
    assert repr(a) == f"Signer(key={key!r}, kid='a', alg='ES256')"
    with pytest.raises(AttributeError):
        a.kid = "other"  # type: ignore[misc]
    # a copy under another kid starts with its own header cache, never the original's
    renamed = dataclasses.replace(a, kid="other")
    assert json.loads(b64url_decode(renamed.sign(CLAIMS, typ="JWT").split(".")[0]))["kid"] == "other"
    assert json.loads(b64url_decode(a.sign(CLAIMS, typ="JWT").split(".")[0]))["kid"] == "a"


# --- rotation: a cached header is tied to the key that signs --------------------------------------------


def test_keyring_rotation_signs_under_the_new_kid() -> None:
    old = Signer.from_jwk(generate_ec_jwk())
    new = Signer.from_jwk(generate_ec_jwk())
    ring = KeyRing(old)
    now = 1_800_000_000

    def header_kid(token: str) -> str:
        return str(json.loads(b64url_decode(token.split(".")[0]))["kid"])

    before = ring.sign(CLAIMS, typ=TXN_TYP)
    assert header_kid(before) == old.kid and header_kid(ring.sign(CLAIMS, typ=TXN_TYP)) == old.kid
    assert ring.rotate(new, now=now)
    after = ring.sign(CLAIMS, typ=TXN_TYP)
    assert header_kid(after) == new.kid == ring.kid
    assert after.split(".")[:2] == _reference_sign(new, CLAIMS, typ=TXN_TYP).split(".")[:2]
    header_b64, payload_b64, signature = _segments(after)
    signing_input = f"{header_b64}.{payload_b64}".encode()
    assert verify_signature(new.key.public_key(), "ES256", signing_input, signature)
    assert not verify_signature(old.key.public_key(), "ES256", signing_input, signature)

    # a txn token minted through the ring verifies with the ring's keys under the new kid
    minted = mint_txn_token(
        ring,
        issuer="https://localhost:8443",
        audience="example.org",
        subject="alice",
        scope="tool:t",
        actor_id="spiffe://example.org/a",
        tool="t",
        arguments={"a": 1},
        policy_version="v",
        cnf_jkt=None,
        req_ip=None,
        authn="mtls",
        now=now,
    )
    verified = verify_txn_token(
        minted.token,
        keys=ring.verification_keys(now),
        issuer="https://localhost:8443",
        audience="example.org",
        now=now,
    )
    assert verified.kid == new.kid

    # rotating back to the same key material under another kid: the header names that kid
    again = Signer(key=old.key, kid="renamed", alg="ES256")
    assert ring.rotate(again, now=now + 1)
    assert header_kid(ring.sign(CLAIMS, typ=TXN_TYP)) == "renamed"


def test_two_signers_sharing_a_kid_each_sign_with_their_own_key() -> None:
    ours = Signer.from_jwk(generate_ec_jwk())
    foreign = Signer(key=ec.generate_private_key(ec.SECP256R1()), kid=ours.kid, alg="ES256")
    for signer, other in ((ours, foreign), (foreign, ours)):
        header_b64, payload_b64, signature = _segments(signer.sign(CLAIMS, typ=TXN_TYP))
        signing_input = f"{header_b64}.{payload_b64}".encode()
        assert verify_signature(signer.key.public_key(), "ES256", signing_input, signature)
        assert not verify_signature(other.key.public_key(), "ES256", signing_input, signature)


# --- raw_signature / verify_signature: the same answers for every key and alg --------------------------


@pytest.mark.parametrize("name", list(KEYS))
@pytest.mark.parametrize("alg", ALGS)
def test_raw_signature_answers_like_the_reference(name: str, alg: str) -> None:
    key = KEYS[name]
    got = _outcome(raw_signature, key, alg, b"payload")
    expected = _outcome(_reference_raw_signature, key, alg, b"payload")
    assert got[0] == expected[0]
    if got[0] == "raised":
        assert got == expected
    else:
        # randomized signatures differ; each one verifies under the reference
        assert _reference_verify_signature(key.public_key(), alg, b"payload", got[1])
        assert len(got[1]) == len(expected[1])
        if (name, alg) in DETERMINISTIC:
            assert got == expected


def _signature_variants(name: str, signature: bytes) -> dict[str, bytes]:
    half = len(signature) // 2
    variants = {
        "good": signature,
        "empty": b"",
        "short": signature[:-1],
        "long": signature + b"\x00",
        "flipped": signature[:-1] + bytes([signature[-1] ^ 1]),
        "zeros": bytes(len(signature)),
    }
    if name.startswith("P-"):
        # CVE-2022-21449: r == 0 or s == 0 is refused before OpenSSL ever sees it
        variants["r-zero"] = bytes(half) + signature[half:]
        variants["s-zero"] = signature[:half] + bytes(half)
        variants["r-is-s"] = signature[half:] + signature[half:]
    return variants


@pytest.mark.parametrize("name", list(KEYS))
def test_verify_signature_answers_like_the_reference(name: str) -> None:
    key = KEYS[name]
    public: PublicKey = key.public_key()
    data = b"header.payload"
    good = raw_signature(key, NATIVE_ALG[name], data)
    for variant, signature in _signature_variants(name, good).items():
        for alg in ALGS:
            for candidate in (public, key):  # a private key where a public one belongs: same answer too
                got = _outcome(verify_signature, candidate, alg, data, signature)
                expected = _outcome(_reference_verify_signature, candidate, alg, data, signature)
                assert got == expected, (variant, alg, candidate)
        assert verify_signature(public, NATIVE_ALG[name], data, signature) is (variant == "good")
    assert not verify_signature(public, NATIVE_ALG[name], data + b"!", good)


def test_verify_signature_refuses_the_zero_signature_of_every_curve() -> None:
    for name, size in (("P-256", 32), ("P-384", 48), ("P-521", 66)):
        public = KEYS[name].public_key()
        assert not verify_signature(public, NATIVE_ALG[name], b"anything", bytes(2 * size))
        one = (1).to_bytes(size, "big")
        assert not verify_signature(public, NATIVE_ALG[name], b"anything", bytes(size) + one)
        assert not verify_signature(public, NATIVE_ALG[name], b"anything", one + bytes(size))


def test_an_unsupported_curve_fails_as_before() -> None:
    key = ec.generate_private_key(ec.SECP256K1())
    signature = bytes(range(64))
    for alg in ("ES256", "ES256K"):
        got = _outcome(verify_signature, key.public_key(), alg, b"x", signature)
        expected = _outcome(_reference_verify_signature, key.public_key(), alg, b"x", signature)
        assert got[0] == "raised" and got == expected


def test_private_jwk_round_trip_signs_like_the_reference() -> None:
    for name in ("P-256", "P-384", "P-521", "Ed25519"):
        jwk = private_jwk(KEYS[name])
        signer = Signer.from_jwk(jwk)
        token = signer.sign(CLAIMS, typ="JWT")
        assert token.split(".")[:2] == _reference_sign(signer, CLAIMS, typ="JWT").split(".")[:2]
