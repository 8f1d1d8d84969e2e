"""A short, bounded fuzz run of the JWT and DPoP parsers (HOSTILE §3.1 "Reuse": the invariant is no 500, no accept).

Targets: :func:`broker.identity.jws.parse_compact`, :class:`broker.identity.tokens.AccessTokenVerifier` and
:func:`broker.identity.dpop.verify_proof`. Three kinds of input, each run for a bounded number of examples:

1. junk: arbitrary text and base64url-alphabet soup (envoy jwt_test.cc style malformed tokens);
2. one mutation of a valid token (a character replaced, inserted or deleted, segments swapped, cut or added, the
   payload re-encoded without re-signing, a re-signature by another key);
3. structured tokens: a header and a payload drawn from valid and hostile values (HOSTILE J01–J27, D03–D22),
   **signed with the real key**, so the generator reaches every claim check behind the signature.

Invariants: the only exceptions are the broker's own (``JwsError`` from the pure parser, ``BrokerError`` subclasses
from the verifiers); junk and mutations are never accepted (except a mutation that leaves the decoded bytes
identical: a non-canonical base64url spelling of the same signature, noted below); and a structured token is
accepted only if an independent oracle, written from the RFCs and CONTRACT §4, says it is valid.

Note: strict base64url decoding here ignores non-zero padding bits (RFC 4648 §3.5 allows decoders to accept
them), so a token has up to 16 spellings of its last signature character. Replay and single-use checks key on
decoded claims (``jti``, ``txn``), not on token strings, so this is not a replay vector.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import BrokerError, InvalidToken
from broker.identity.dpop import DpopPolicy, VerifiedProof, ath_for, verify_proof
from broker.identity.htu import normalize_url
from broker.identity.issuer_keys import IssuerKeys
from broker.identity.jws import JwsError, ParsedJws, parse_compact
from broker.identity.tokens import AccessToken, AccessTokenVerifier, IssuerPolicy
from broker.jose import b64url_decode, b64url_encode, compact_json, raw_signature
from tests.dpopfactory import _KEY_OBJECTS, ec_key, public_part
from tests.tokenfactory import (
    AUDIENCE,
    ISSUER,
    NOW,
    _private_key,
    default_claims,
    ec_jwk,
    make_token,
    public_of,
)

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

KEY = ec_jwk("P-256", kid="k1")
ATTACKER = ec_jwk("P-256", kid="k1")  # same kid, not in the JWKS
LEEWAY, MAX_LIFETIME = 30, 3600
VALID_TOKEN = make_token(KEY, claims={"exp": NOW + 600})


def verifier() -> AccessTokenVerifier:
    policy = IssuerPolicy(
        issuer=ISSUER, algorithms=("ES256",), audience=AUDIENCE, leeway=LEEWAY, max_lifetime=MAX_LIFETIME
    )
    return AccessTokenVerifier([(policy, IssuerKeys(ISSUER, jwks={"keys": [public_of(KEY)]}))])


def verify_token(token: Any) -> AccessToken | None:
    """The verified token, or None if it was refused with a BrokerError. Anything else propagates (a bug)."""
    try:
        return asyncio.run(verifier().verify(token, now=NOW))
    except BrokerError as refusal:
        assert isinstance(refusal, InvalidToken), type(refusal)
        assert refusal.reason and refusal.status == 401
        return None


def decoded_segments(token: str) -> tuple[bytes, ...] | None:
    try:
        parts = token.split(".")
        return tuple(b64url_decode(p) for p in parts) if len(parts) == 3 else None
    except (ValueError, UnicodeError):
        return None


junk = st.one_of(
    st.text(max_size=300),
    st.text(B64URL + ".=+/ \n", max_size=300),
    st.lists(st.text(B64URL, max_size=60), min_size=1, max_size=6).map(".".join),
    st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
)


# -- parse_compact ---------------------------------------------------------------------------------------------


@FUZZ
@given(st.one_of(junk, st.none(), st.integers(), st.binary(max_size=50)))
def test_j13_parse_compact_only_raises_jws_error(token: Any) -> None:
    try:
        parsed = parse_compact(token, max_bytes=8192)
    except JwsError as refusal:
        assert refusal.reason
        return
    assert isinstance(parsed, ParsedJws)
    assert isinstance(parsed.header, dict) and isinstance(parsed.payload, dict)
    assert parsed.signing_input == ".".join(token.split(".")[:2]).encode("ascii")
    assert isinstance(parsed.header.get("alg"), str)
    assert not {"crit", "enc", "zip"} & parsed.header.keys() and parsed.header.get("b64", True) is True


# -- access tokens -----------------------------------------------------------------------------------------------


@FUZZ
@given(junk)
def test_j13_access_token_junk_is_refused_never_accepted(token: str) -> None:
    assert verify_token(token) is None


def _mutations(token: str) -> st.SearchStrategy[str]:
    head, payload, signature = token.split(".")
    index = st.integers(0, len(token) - 1)
    char = st.sampled_from(B64URL + ".=+/ \x00é")
    forged_payload = b64url_encode(compact_json({**json.loads(b64url_decode(payload)), "sub": "admin"}))
    resigned = make_token(ATTACKER, claims={"exp": NOW + 600})
    return st.one_of(
        st.builds(lambda i, c: token[:i] + c + token[i + 1 :], index, char),
        st.builds(lambda i, c: token[:i] + c + token[i:], index, char),
        st.builds(lambda i: token[:i] + token[i + 1 :], index),
        st.builds(lambda i: token[:i], index),
        st.sampled_from(
            [
                f"{payload}.{head}.{signature}",
                f"{head}.{payload}.{signature}.",
                f"{head}.{payload}.{signature}.{signature}",
                f"{head}.{forged_payload}.{signature}",
                f"{head}.{payload}.",
                f"{head}.{payload}.{signature}=",
                resigned,
                token + "\n",
                " " + token,
            ]
        ),
    )


@FUZZ
@given(_mutations(VALID_TOKEN))
def test_a_mutated_access_token_is_never_accepted(mutated: str) -> None:
    assert verify_token(VALID_TOKEN) is not None  # the unmutated token is valid
    accepted = verify_token(mutated)
    if accepted is not None:
        # the only admissible "mutation": another base64url spelling of exactly the same bytes
        assert decoded_segments(mutated) == decoded_segments(VALID_TOKEN), mutated


ALG = st.sampled_from(
    ["ES256", "ES256", "ES384", "none", "None", "HS256", "es256", "ES256 ", "", 1, None, ["ES256"]]
)
TYP = st.sampled_from(
    ["at+jwt", "JWT", "application/at+jwt", "AT+JWT", "dpop+jwt", "txntoken+jwt", "grant+jwt", "", 1]
)
KID = st.sampled_from(["k1", "k1", "k2", "", 1, "../../etc/passwd", "k" * 300])
HOSTILE_HEADER: st.SearchStrategy[dict[str, Any]] = st.sampled_from(
    [
        {},
        {},
        {},
        {},
        {},
        {},
        {"crit": ["exp"]},
        {"crit": []},
        {"b64": False},
        {"b64": True},
        {"jku": "https://evil.example/jwks"},
        {"x5u": "https://evil.example/cert"},
        {"jwk": public_of(ATTACKER)},
        {"x5c": ["MIIB"]},
        {"cty": "JWT"},
        {"zip": "DEF"},
        {"enc": "A128GCM"},
    ]
)
INT_TIMES = [
    NOW - 10_000,
    NOW - 3_000,
    NOW - LEEWAY - 1,
    NOW - LEEWAY,
    NOW - LEEWAY + 1,
    NOW,
    NOW + 600,
    NOW + 3_000,
]
TIME = st.sampled_from([*INT_TIMES, str(NOW + 600), float(NOW + 600), True, 1e300, -1, 2**70, None])
CLAIM_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "iss": st.sampled_from([ISSUER, ISSUER, ISSUER + "/", "https://idp", ISSUER.upper(), [ISSUER], None]),
    "aud": st.sampled_from(
        [AUDIENCE, AUDIENCE, [AUDIENCE], ["x", AUDIENCE], [AUDIENCE, 1], AUDIENCE + "-evil", {}, 1]
    ),
    "sub": st.sampled_from(["alice", "alice", "", 1, None, ["alice"]]),
    "exp": TIME,
    "iat": TIME,
    "nbf": TIME,
    "jti": st.sampled_from(["t-1", "", "j" * 300, 1]),
    "client_id": st.sampled_from(["agent", 1, None]),
    "cnf": st.sampled_from([{"jkt": "abc"}, {"jkt": 1}, {"x5t#S256": "x"}, "jkt", None, {}]),
    "act": st.sampled_from([{"sub": "spiffe://example.org/agents/a"}, {"sub": ""}, {}, "a", None]),
}
OPTIONAL = frozenset({"nbf", "jti", "client_id", "cnf", "act"})


VALID_HEADER = {"alg": "ES256", "typ": "at+jwt", "kid": "k1"}
VALID_PAYLOAD = {**default_claims(NOW), "exp": NOW + 600}
HEADER_VALUES: dict[str, st.SearchStrategy[Any]] = {"alg": ALG, "typ": TYP, "kid": KID}
DELETE: Any = object()


@st.composite
def near_valid(
    draw: st.DrawFn,
    header: dict[str, Any],
    payload: dict[str, Any],
    header_values: dict[str, st.SearchStrategy[Any]],
    claim_values: dict[str, st.SearchStrategy[Any]],
    extra_headers: st.SearchStrategy[dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A valid (header, payload) with 0-3 members replaced by hostile or valid values, removed, or added:
    about a third of the examples stay valid, so both sides of the oracle are exercised."""
    header, payload = dict(header), dict(payload)
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3]))):
        where, pool = draw(st.sampled_from([(header, header_values), (payload, claim_values)]))
        name = draw(st.sampled_from(sorted(pool)))
        value = draw(pool[name] | st.just(DELETE))
        if value is DELETE:
            where.pop(name, None)
        else:
            where[name] = value
    header.update(draw(extra_headers))
    return header, payload


@st.composite
def structured_tokens(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload = draw(
        near_valid(VALID_HEADER, VALID_PAYLOAD, HEADER_VALUES, CLAIM_VALUES, HOSTILE_HEADER)
    )
    return header, payload, make_token(KEY, header_value=header, claims_value=payload, sign_alg="ES256")


def _int_time(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**53


def token_oracle(header: dict[str, Any], payload: dict[str, Any]) -> bool:
    """Whether a correctly signed token with this header and payload is a valid access token (RFC 9068,
    RFC 8725, CONTRACT §4), written independently of broker.identity.tokens."""
    typ = header.get("typ", "")
    if header.get("alg") != "ES256" or header.get("kid", "k1") != "k1":
        return False
    if not isinstance(typ, str) or typ.lower().removeprefix("application/") not in ("at+jwt", "jwt", ""):
        return False
    if "typ" in header and not typ:
        return False
    if {"crit", "jku", "x5u", "jwk", "x5c", "cty", "zip", "enc"} & header.keys() or header.get(
        "b64", True
    ) is not True:
        return False
    exp, iat, nbf = payload.get("exp"), payload.get("iat"), payload.get("nbf", 0)
    if not (_int_time(exp) and _int_time(iat) and ("nbf" not in payload or _int_time(nbf))):
        return False
    assert isinstance(exp, int) and isinstance(iat, int) and isinstance(nbf, int)
    if not (
        exp > NOW - LEEWAY and iat <= NOW + LEEWAY and nbf <= NOW + LEEWAY and 0 < exp - iat <= MAX_LIFETIME
    ):
        return False
    aud = payload.get("aud")
    aud_ok = aud == AUDIENCE if isinstance(aud, str) else isinstance(aud, list) and AUDIENCE in aud
    if isinstance(aud, list) and not all(isinstance(a, str) for a in aud):
        aud_ok = False
    if payload.get("iss") != ISSUER or not aud_ok:
        return False
    if not isinstance(payload.get("sub"), str) or not payload["sub"]:
        return False
    if "jti" in payload and not (isinstance(payload["jti"], str) and len(payload["jti"]) <= 256):
        return False
    if "client_id" in payload and not isinstance(payload["client_id"], str):
        return False
    cnf = payload.get("cnf", {})
    if not isinstance(cnf, dict) or not all(isinstance(cnf[k], str) for k in ("jkt", "x5t#S256") if k in cnf):
        return False
    act = payload.get("act", {"sub": "x"})
    return isinstance(act, dict) and isinstance(act.get("sub"), str) and bool(act["sub"])


@settings(FUZZ, max_examples=400)
@given(structured_tokens())
def test_a_structured_token_is_accepted_only_when_valid(
    case: tuple[dict[str, Any], dict[str, Any], str],
) -> None:
    header, payload, token = case
    accepted = verify_token(token)
    valid = token_oracle(header, payload)
    assert (accepted is not None) == valid, (header, payload)
    if accepted is not None:
        assert accepted.sub == payload["sub"] and accepted.exp == payload["exp"]


def test_the_token_oracle_and_the_verifier_agree_on_the_valid_baseline() -> None:
    header = {"alg": "ES256", "typ": "at+jwt", "kid": "k1"}
    payload = default_claims(NOW)
    assert token_oracle(header, payload)
    assert verify_token(make_token(KEY, header_value=header, claims_value=payload)) is not None


# -- DPoP proofs -------------------------------------------------------------------------------------------------

HTU = "https://broker.example.org/v1/tools/approveExpense"
ACCESS_TOKEN = VALID_TOKEN
POLICY = DpopPolicy(algorithms=("ES256", "EdDSA"), iat_window=60, iat_skew=5)
PROOF_KEY = ec_key()
OTHER_KEY = ec_key()
P384_KEY = ec_key("P-384")


def check_proof(proof: Any, now: float = NOW) -> VerifiedProof | None:
    try:
        return verify_proof(proof, policy=POLICY, method="POST", htu=HTU, access_token=ACCESS_TOKEN, now=now)
    except BrokerError as refusal:
        assert refusal.status in (400, 401) and refusal.reason
        return None


def _sign(jwk_private: dict[str, Any], header: Any, payload: Any) -> str:
    signing_input = f"{b64url_encode(compact_json(header))}.{b64url_encode(compact_json(payload))}"
    key = _KEY_OBJECTS.get(jwk_private.get("kid", "")) or _private_key(jwk_private)
    return f"{signing_input}.{b64url_encode(raw_signature(key, 'ES256', signing_input.encode()))}"


VALID_PROOF = _sign(
    PROOF_KEY,
    {"typ": "dpop+jwt", "alg": "ES256", "jwk": public_part(PROOF_KEY)},
    {"jti": "j-1", "htm": "POST", "htu": HTU, "iat": NOW, "ath": ath_for(ACCESS_TOKEN)},
)


@FUZZ
@given(junk)
def test_dpop_junk_is_refused_never_accepted(proof: str) -> None:
    assert check_proof(proof) is None


@FUZZ
@given(_mutations(VALID_PROOF))
def test_d07_a_mutated_proof_is_never_accepted(mutated: str) -> None:
    assert check_proof(VALID_PROOF) is not None
    if check_proof(mutated) is not None:
        assert decoded_segments(mutated) == decoded_segments(VALID_PROOF), mutated


JWKS = {
    "own": public_part(PROOF_KEY),
    "own-with-alg": {**public_part(PROOF_KEY), "alg": "ES256"},
    "own-with-wrong-alg": {**public_part(PROOF_KEY), "alg": "ES384"},
    "own-with-private": {**public_part(PROOF_KEY), "d": PROOF_KEY["d"]},
    "other": public_part(OTHER_KEY),
    "p384": public_part(P384_KEY),
    "oct": {"kty": "oct", "k": "c2VjcmV0"},
    "not-an-object": "jwk",
}
PROOF_CLAIMS: dict[str, st.SearchStrategy[Any]] = {
    "jti": st.sampled_from(["j-1", "j-1", "", "j" * 257, "a\nb", 1, None, "a:b*c"]),
    "htm": st.sampled_from(["POST", "POST", "post", "GET", "", None]),
    "htu": st.sampled_from(
        [
            HTU,
            HTU,
            HTU + "?q=1#f",
            HTU.upper(),
            HTU.replace("https://broker.example.org", "HTTPS://BROKER.EXAMPLE.ORG:443"),
            HTU + "/",
            HTU.replace("approveExpense", "approve%45xpense"),
            HTU.replace("/v1/", "/v1/../v1/"),
            "https://evil.example/v1/tools/approveExpense",
            1,
        ]
    ),
    "iat": st.sampled_from([NOW, NOW, NOW - 60, NOW - 61, NOW + 5, NOW + 6, float(NOW), str(NOW), True]),
    "ath": st.sampled_from(
        [ath_for(ACCESS_TOKEN), ath_for(ACCESS_TOKEN), ath_for(ACCESS_TOKEN + "x"), "", 1]
    ),
}


VALID_PROOF_HEADER = {"typ": "dpop+jwt", "alg": "ES256", "jwk": JWKS["own"]}
VALID_PROOF_PAYLOAD = {"jti": "j-1", "htm": "POST", "htu": HTU, "iat": NOW, "ath": ath_for(ACCESS_TOKEN)}
PROOF_HEADER_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "typ": st.sampled_from(["dpop+jwt", "JWT", "DPOP+JWT", "", None]),
    "alg": st.sampled_from(["ES256", "ES384", "none", "HS256", "EdDSA", 1]),
    "jwk": st.sampled_from(sorted(JWKS)).map(JWKS.__getitem__),
    "x5c": st.just(["MIIB"]),
    "jku": st.just("https://evil.example/jwks"),
    "kid": st.just("k"),
}


@st.composite
def structured_proofs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], str]:
    no_jwk = HOSTILE_HEADER.map(lambda h: {k: v for k, v in h.items() if k != "jwk"})
    header, payload = draw(
        near_valid(VALID_PROOF_HEADER, VALID_PROOF_PAYLOAD, PROOF_HEADER_VALUES, PROOF_CLAIMS, no_jwk)
    )
    return header, payload, _sign(PROOF_KEY, header, payload)


def proof_oracle(header: dict[str, Any], payload: dict[str, Any]) -> bool:
    """Whether a proof signed by PROOF_KEY is valid for POST HTU with ACCESS_TOKEN at NOW (RFC 9449 §4.3)."""
    jwk = header.get("jwk")
    if header.get("typ") != "dpop+jwt" or header.get("alg") != "ES256" or not isinstance(jwk, dict):
        return False
    if {"crit", "b64", "enc", "zip", "x5c", "x5u", "jku", "x5t", "x5t#S256"} & header.keys():
        return False
    if jwk not in (JWKS["own"], JWKS["own-with-alg"]):  # own public key; alg, if any, must say ES256
        return False
    jti = payload.get("jti")
    if not isinstance(jti, str) or not 0 < len(jti) <= 256 or not jti.isprintable():
        return False
    if payload.get("htm") != "POST" or not isinstance(payload.get("htu"), str):
        return False
    try:
        if normalize_url(payload["htu"]) != normalize_url(HTU):
            return False
    except ValueError:
        return False
    iat = payload.get("iat")
    return type(iat) is int and NOW - 60 <= iat <= NOW + 5 and payload.get("ath") == ath_for(ACCESS_TOKEN)


@settings(FUZZ, max_examples=400)
@given(structured_proofs())
def test_a_structured_proof_is_accepted_only_when_valid(
    case: tuple[dict[str, Any], dict[str, Any], str],
) -> None:
    header, payload, proof = case
    accepted = check_proof(proof)
    assert (accepted is not None) == proof_oracle(header, payload), (header, payload)
    if accepted is not None:
        assert accepted.jti == payload["jti"] and len(accepted.replay_key) == 64


def test_the_proof_oracle_and_the_verifier_agree_on_the_valid_baseline() -> None:
    assert check_proof(VALID_PROOF) is not None
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": public_part(PROOF_KEY)}
    assert proof_oracle(
        header, {"jti": "j-1", "htm": "POST", "htu": HTU, "iat": NOW, "ath": ath_for(ACCESS_TOKEN)}
    )
    assert time.time() > NOW - 10**9  # NOW is a fixed instant, not the clock: the runs are reproducible
