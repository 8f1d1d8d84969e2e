"""Transaction tokens (broker.txn.tokens): CONTRACT §5, HOSTILE.md §1.4 T03–T16 and J23, one row per check.

Hostile tokens are signed with the broker's real key (tests.tokenfactory.make_token) so that each row breaks
exactly one thing and the refusal comes from the check under test, not from the signature.
"""

from __future__ import annotations

import copy
import hashlib
import json
import unicodedata
from collections.abc import Callable
from typing import Any

import pytest

from broker.canonical import args_digest, strict_loads
from broker.errors import InvalidTxnToken, TxnTokenMismatch
from broker.identity.jws import parse_compact
from broker.jose import Signer, b64url_encode, generate_ec_jwk
from broker.state.base import check_key
from broker.txn.tokens import (
    MAX_LIFETIME,
    TXN_TYP,
    MintedTxn,
    TxnClaims,
    check_invocation,
    mint_txn_token,
    txn_replay_key,
    unverified_kid,
    verification_keys,
    verify_txn_token,
)
from tests.tokenfactory import OMIT, duplicate_member_json, ec_jwk, make_token, public_of

NOW = 1_800_000_000
ISSUER = "https://localhost:8443"
AUDIENCE = "example.org"
SUB = "alice"
ACTOR = "spiffe://example.org/agents/expense-assistant"
JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
TOOL = "approveExpense"
POLICY_VERSION = "0123456789ab"
NFC_NOTE = "café"  # "caf\u00e9"
ARGS: dict[str, Any] = {
    "invoice_id": "INV-8831",
    "amount": 4800,
    "department": "42",
    "note": NFC_NOTE,
    "tags": {"cost_center": "CC-1", "project": "P-9"},
}

BROKER_JWK = generate_ec_jwk()
SIGNER = Signer.from_jwk(BROKER_JWK)
PREVIOUS_JWK = generate_ec_jwk()
PREVIOUS = Signer.from_jwk(PREVIOUS_JWK)
KEYS = verification_keys(SIGNER.public_jwk(), PREVIOUS.public_jwk())
FOREIGN_WITH_OUR_KID = ec_jwk(kid=SIGNER.kid)  # T14: an attacker's key claiming our kid
STRANGER = ec_jwk(kid="stranger")


# --- factories ------------------------------------------------------------------------------------------


def mint(signer: Signer = SIGNER, **overrides: Any) -> MintedTxn:
    """A valid txn token for alice via expense-assistant; keyword arguments replace mint parameters."""
    params: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "subject": SUB,
        "scope": f"tool:{TOOL}",
        "actor_id": ACTOR,
        "tool": TOOL,
        "arguments": ARGS,
        "policy_version": POLICY_VERSION,
        "cnf_jkt": JKT,
        "req_ip": "192.0.2.7",
        "authn": "dpop",
        "now": NOW,
    }
    params.update(overrides)
    return mint_txn_token(signer, **params)


def claims(**overrides: Any) -> dict[str, Any]:
    """The payload :func:`mint` produces; ``OMIT`` removes a member, ``tctx_overrides`` edits tctx."""
    payload = copy.deepcopy(parse_compact(mint(txn="txn-1").token, max_bytes=8192).payload)
    for name, value in overrides.items():
        if value is OMIT:
            payload.pop(name, None)
        else:
            payload[name] = value
    return payload


def with_tctx(**members: Any) -> dict[str, Any]:
    payload = claims()
    for name, value in members.items():
        if value is OMIT:
            payload["tctx"].pop(name, None)
        else:
            payload["tctx"][name] = value
    return payload


def forge(payload: Any = None, *, key: dict[str, Any] = BROKER_JWK, **kwargs: Any) -> str:
    """A token signed with ``key`` (the broker's by default) whose header and payload are the given ones."""
    header = {"kid": SIGNER.kid, "typ": TXN_TYP, **kwargs.pop("header", {})}
    return make_token(key, header=header, claims_value=claims() if payload is None else payload, **kwargs)


def verify(token: str, now: float = NOW, **kwargs: Any) -> TxnClaims:
    return verify_txn_token(token, keys=KEYS, issuer=ISSUER, audience=AUDIENCE, now=now, **kwargs)


def _tampered_payload() -> str:
    # Amount changed and the digest recomputed, so only the signature can notice (the claims are consistent).
    header, _, signature = mint().token.split(".")
    forged = claims()
    forged["tctx"]["arguments"]["amount"] = 480000
    forged["tctx"]["args_digest"] = args_digest(forged["tctx"]["arguments"])
    return f"{header}.{b64url_encode(json.dumps(forged).encode())}.{signature}"


def _timed(iat: int, exp: int) -> str:
    return forge(claims(iat=iat, exp=exp))


# --- mint ------------------------------------------------------------------------------------------------


def test_mint_verify_round_trip() -> None:
    minted = mint()
    got = verify(minted.token)
    assert (got.txn, got.exp, got.args_digest) == (minted.txn, minted.exp, minted.args_digest)
    assert got.sub == SUB and got.actor_id == ACTOR and got.tool == TOOL and got.scope == f"tool:{TOOL}"
    assert got.arguments == ARGS and got.policy_version == POLICY_VERSION
    assert got.cnf_jkt == JKT and got.approval_id is None and got.kid == SIGNER.kid
    assert got.iat == NOW and got.exp == NOW + MAX_LIFETIME
    assert got.claims["rctx"] == {"req_ip": "192.0.2.7", "authn": "dpop"}


def test_claims_shape_is_contract_section_5() -> None:
    minted = mint(approval_id="apr-1")
    jws = parse_compact(minted.token, max_bytes=8192)
    assert jws.header == {"alg": "ES256", "typ": "txntoken+jwt", "kid": SIGNER.kid}
    assert jws.payload == {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": NOW,
        "exp": NOW + 300,
        "txn": minted.txn,
        "sub": SUB,
        "scope": "tool:approveExpense",
        "req_wl": ACTOR,
        "rctx": {"req_ip": "192.0.2.7", "authn": "dpop"},
        "tctx": {
            "tool": TOOL,
            "arguments": ARGS,
            "args_digest": args_digest(ARGS),
            "policy_version": POLICY_VERSION,
            "approval_id": "apr-1",
        },
        "cnf": {"jkt": JKT},
    }
    # CONTRACT §5: base64url(SHA-256(JCS(arguments)))
    jcs = b'{"amount":4800,"department":"42","invoice_id":"INV-8831","note":"caf\xc3\xa9",' + (
        b'"tags":{"cost_center":"CC-1","project":"P-9"}}'
    )
    assert minted.args_digest == b64url_encode(hashlib.sha256(jcs).digest())


def test_optional_members_are_absent_when_not_given() -> None:
    payload = parse_compact(mint(cnf_jkt=None, req_ip=None, authn="mtls").token, max_bytes=8192).payload
    assert "cnf" not in payload and "approval_id" not in payload["tctx"]
    assert payload["rctx"] == {"authn": "mtls"}
    assert verify(mint(cnf_jkt=None).token).cnf_jkt is None


AGENT_ARGS: dict[str, Any] = {"invoice_id": "INV-8831", "amount": 4800}  # no department: the broker sets it
INJECTED: dict[str, Any] = {"department": "42"}


def test_injected_round_trip_keeps_the_parameter_lock_over_the_agents_arguments() -> None:
    minted = mint(arguments=AGENT_ARGS, injected=INJECTED)
    got = verify(minted.token)
    assert got.arguments == AGENT_ARGS and got.injected == INJECTED
    assert got.forwarded_arguments() == {**AGENT_ARGS, "department": "42"}
    assert got.claims["tctx"]["injected"] == INJECTED
    assert minted.args_digest == got.args_digest == args_digest(AGENT_ARGS)  # not over the injected values


def test_injected_values_override_the_agents_in_forwarded_arguments() -> None:
    got = verify(mint(injected={"department": "7", "cost_center": "CC-1"}).token)
    assert got.arguments == ARGS  # the agent's own department "42" stays what was locked
    assert got.forwarded_arguments() == {**ARGS, "department": "7", "cost_center": "CC-1"}
    got.forwarded_arguments()["department"] = "x"  # a fresh dict each time: the claims stay as verified
    assert got.injected == {"department": "7", "cost_center": "CC-1"} and got.arguments == ARGS


@pytest.mark.parametrize("injected", [None, {}], ids=["none", "empty"])
def test_no_injected_member_without_injected_values(injected: dict[str, Any] | None) -> None:
    minted = mint(injected=injected)
    assert "injected" not in parse_compact(minted.token, max_bytes=8192).payload["tctx"]
    got = verify(minted.token)
    assert got.injected == {} and got.forwarded_arguments() == ARGS


def test_txn_is_random_128_bits_unless_given() -> None:
    ids = {mint().txn for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 22 for i in ids)  # 16 bytes, base64url without padding
    assert mint(txn="chosen").txn == "chosen"


def test_lifetime_and_float_now() -> None:
    minted = mint(now=NOW + 0.9, lifetime=60)
    assert minted.exp == NOW + 60
    assert verify(minted.token).iat == NOW


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"lifetime": 301}, ValueError),
        ({"lifetime": 0}, ValueError),
        ({"lifetime": True}, ValueError),
        ({"txn": ""}, ValueError),
        ({"txn": "x" * 65}, ValueError),
        ({"arguments": {"amount": 2**53}}, ValueError),  # no exact RFC 8785 form
        ({"arguments": {"amount": float("nan")}}, ValueError),
        ({"arguments": ["not", "an", "object"]}, TypeError),
        ({"injected": [("department", "42")]}, TypeError),
        ({"injected": {"limit": 2**53}}, ValueError),
    ],
    ids=[
        "lifetime-over-300",
        "lifetime-zero",
        "lifetime-bool",
        "txn-empty",
        "txn-too-long",
        "int-over-2^53",
        "nan",
        "arguments-not-object",
        "injected-not-object",
        "injected-int-over-2^53",
    ],
)
def test_mint_refuses_caller_bugs(overrides: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        mint(**overrides)


# --- verify: accepted --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(lambda: mint(PREVIOUS).token, id="previous-key-still-verifies"),
        pytest.param(lambda: _timed(NOW - 296, NOW - 4), id="exp-passed-but-within-leeway"),
        pytest.param(lambda: _timed(NOW + 5, NOW + 305), id="iat-future-within-leeway"),
        pytest.param(lambda: forge(claims(cnf=OMIT)), id="no-cnf"),
        pytest.param(lambda: forge(claims(rctx={"authn": "mtls"})), id="rctx-without-req-ip"),
    ],
)
def test_verify_accepts(token: Callable[[], str]) -> None:
    assert verify(token()).sub == SUB


# --- verify: one row per refusal -----------------------------------------------------------------------------

_ES256_PUBLIC_JSON = json.dumps(public_of(BROKER_JWK)).encode()

REFUSALS: list[Any] = [
    # structure (J09–J15)
    pytest.param(lambda: b"bytes", "txn_malformed", id="not-a-string"),
    pytest.param(lambda: mint().token + "A" * 8192, "txn_oversize", id="oversize"),
    pytest.param(lambda: ".".join(mint().token.split(".")[:2]), "txn_segments", id="two-segments"),
    pytest.param(lambda: mint().token.replace(".", ".=", 1), "txn_b64", id="padding"),
    pytest.param(
        lambda: forge(raw_payload=duplicate_member_json(claims(), "sub", "alice", "mallory")),
        "txn_duplicate_member",
        id="duplicate-payload-member",
    ),
    pytest.param(
        lambda: forge(
            raw_header=duplicate_member_json({"alg": "ES256", "kid": SIGNER.kid}, "typ", TXN_TYP, "at+jwt")
        ),
        "txn_duplicate_member",
        id="duplicate-header-member",
    ),
    pytest.param(lambda: forge(header={"crit": ["exp"]}), "txn_crit", id="crit"),
    # T15 / J23: other token kinds are not txn tokens
    pytest.param(lambda: forge(header={"typ": "at+jwt"}), "txn_typ", id="typ-access-token"),
    pytest.param(lambda: forge(header={"typ": "dpop+jwt"}), "txn_typ", id="typ-dpop-proof"),
    pytest.param(lambda: forge(header={"typ": "grant+jwt"}), "txn_typ", id="typ-grant"),
    pytest.param(lambda: forge(header={"typ": OMIT}), "txn_typ", id="typ-missing"),
    pytest.param(lambda: forge(header={"typ": "application/txntoken+jwt"}), "txn_typ", id="typ-not-exact"),
    # T14: keys come from the broker's key map only
    pytest.param(
        lambda: forge(header={"jwk": public_of(STRANGER)}, key=STRANGER), "txn_header_jwk", id="jwk"
    ),
    pytest.param(lambda: forge(header={"jku": "https://evil.example/jwks"}), "txn_header_jku", id="jku"),
    pytest.param(lambda: forge(header={"x5c": ["MIIB"]}), "txn_header_x5c", id="x5c"),
    pytest.param(lambda: forge(header={"x5u": "https://evil.example/c"}), "txn_header_x5u", id="x5u"),
    pytest.param(lambda: forge(header={"cty": "JWT"}), "txn_header_cty", id="nested-cty"),
    pytest.param(lambda: forge(header={"kid": OMIT}), "txn_kid", id="kid-missing"),
    pytest.param(lambda: forge(header={"kid": 7}), "txn_kid", id="kid-not-string"),
    pytest.param(
        lambda: forge(header={"kid": "stranger"}, key=STRANGER), "txn_unknown_kid", id="unknown-kid"
    ),
    pytest.param(lambda: forge(header={"alg": "none"}, signature=b""), "txn_alg", id="alg-none"),
    pytest.param(
        lambda: forge(header={"alg": "HS256"}, hmac_secret=_ES256_PUBLIC_JSON),
        "txn_alg",
        id="alg-hs256-jwk-secret",
    ),
    pytest.param(lambda: forge(header={"alg": "ES384"}, sign_alg="ES256"), "txn_alg", id="alg-not-the-keys"),
    pytest.param(lambda: forge(key=FOREIGN_WITH_OUR_KID), "txn_signature", id="foreign-key-our-kid"),
    pytest.param(_tampered_payload, "txn_signature", id="tampered-payload"),
    pytest.param(lambda: forge(signature=b"\x00" * 64), "txn_signature", id="r-s-zero"),
    pytest.param(lambda: forge(der_signature=True), "txn_signature", id="der-signature"),
    # time (T12, J17–J19)
    pytest.param(lambda: _timed(NOW - 305, NOW - 5), "txn_expired", id="expired-at-leeway-boundary"),
    pytest.param(lambda: mint(now=NOW - 400).token, "txn_expired", id="expired"),
    pytest.param(lambda: _timed(NOW - 10, NOW - 10 + 301), "txn_lifetime", id="lifetime-over-300"),
    pytest.param(lambda: _timed(NOW, NOW), "txn_lifetime", id="lifetime-zero"),
    pytest.param(lambda: _timed(NOW + 6, NOW + 306), "txn_iat_future", id="iat-in-the-future"),
    pytest.param(lambda: forge(claims(exp=str(NOW + 60))), "txn_claim_type", id="exp-string"),
    pytest.param(lambda: forge(claims(exp=NOW + 60.0)), "txn_claim_type", id="exp-float"),
    pytest.param(lambda: forge(claims(iat=True)), "txn_claim_type", id="iat-bool"),
    pytest.param(lambda: forge(claims(exp=OMIT)), "txn_claim_missing", id="exp-missing"),
    # iss / aud (J20, J21, J24)
    pytest.param(lambda: forge(claims(aud="trust.example")), "txn_aud", id="wrong-aud"),
    pytest.param(lambda: forge(claims(aud=[AUDIENCE])), "txn_aud", id="aud-array"),
    pytest.param(
        lambda: forge(claims(aud="https://broker.example.org")), "txn_aud", id="aud-access-token-aud"
    ),
    pytest.param(lambda: forge(claims(iss="https://other-broker:8443")), "txn_iss", id="wrong-iss"),
    pytest.param(lambda: forge(claims(iss=ISSUER + "/")), "txn_iss", id="iss-trailing-slash"),
    # the other claims
    pytest.param(lambda: forge(claims(txn=OMIT)), "txn_claim_missing", id="txn-missing"),
    pytest.param(lambda: forge(claims(txn="")), "txn_claim_type", id="txn-empty"),
    pytest.param(lambda: forge(claims(txn="t" * 65)), "txn_claim_type", id="txn-too-long"),
    pytest.param(lambda: forge(claims(sub=OMIT)), "txn_claim_missing", id="sub-missing"),
    pytest.param(lambda: forge(claims(req_wl=["spiffe://x"])), "txn_claim_type", id="req-wl-not-string"),
    pytest.param(lambda: forge(claims(scope=OMIT)), "txn_claim_missing", id="scope-missing"),
    pytest.param(lambda: forge(claims(rctx="dpop")), "txn_claim_type", id="rctx-not-object"),
    pytest.param(lambda: forge(claims(cnf={"jwk": {}})), "txn_claim_missing", id="cnf-without-jkt"),
    pytest.param(lambda: forge(claims(tctx=OMIT)), "txn_claim_missing", id="tctx-missing"),
    pytest.param(lambda: forge(claims(tctx=[ARGS])), "txn_claim_type", id="tctx-not-object"),
    pytest.param(lambda: forge(with_tctx(tool=OMIT)), "txn_claim_missing", id="tctx-tool-missing"),
    pytest.param(lambda: forge(with_tctx(arguments=["a"])), "txn_claim_type", id="tctx-arguments-not-object"),
    pytest.param(
        lambda: forge(with_tctx(policy_version=OMIT)), "txn_claim_missing", id="policy-version-missing"
    ),
    pytest.param(lambda: forge(with_tctx(approval_id=5)), "txn_claim_type", id="approval-id-not-string"),
    # T16: SHA-256 of the JCS bytes, nothing else
    pytest.param(
        lambda: forge(with_tctx(args_digest=args_digest({**ARGS, "amount": 4900}))),
        "txn_args_digest",
        id="digest-inconsistent-with-arguments",
    ),
    pytest.param(
        lambda: forge(with_tctx(args_digest=hashlib.md5(json.dumps(ARGS).encode()).hexdigest())),  # noqa: S324
        "txn_args_digest_format",
        id="md5-hex-digest",
    ),
    pytest.param(
        lambda: forge(with_tctx(args_digest=args_digest(ARGS)[:22])), "txn_args_digest_format", id="truncated"
    ),
    pytest.param(
        lambda: forge(with_tctx(args_digest=hashlib.sha256(b"x").hexdigest())),
        "txn_args_digest_format",
        id="hex-sha256",
    ),
    pytest.param(lambda: forge(with_tctx(args_digest="é" * 43)), "txn_args_digest_format", id="non-ascii"),
    pytest.param(lambda: forge(with_tctx(args_digest=OMIT)), "txn_args_digest_format", id="digest-missing"),
    pytest.param(lambda: forge(with_tctx(hash_alg="md5")), "txn_tctx", id="tctx-hash-alg-member"),
    pytest.param(
        lambda: forge(with_tctx(injected=INJECTED, injected_by="broker")),
        "txn_tctx",
        id="tctx-unknown-member-beside-injected",
    ),
    pytest.param(
        lambda: forge(with_tctx(injected=["department", "42"])), "txn_claim_type", id="injected-array"
    ),
    pytest.param(lambda: forge(with_tctx(injected="department=42")), "txn_claim_type", id="injected-string"),
    pytest.param(lambda: forge(with_tctx(injected=None)), "txn_claim_type", id="injected-null"),
    pytest.param(lambda: forge(with_tctx(injected={})), "txn_injected", id="injected-empty"),
    pytest.param(
        lambda: forge(with_tctx(injected={"limit": 2**60})),
        "txn_injected",
        id="injected-without-canonical-form",
    ),
    pytest.param(
        lambda: forge(with_tctx(arguments={"amount": 2**60}, args_digest="A" * 43)),
        "txn_args_digest",
        id="arguments-without-canonical-form",
    ),
]


@pytest.mark.parametrize(("token", "reason"), REFUSALS)
def test_verify_refuses(token: Callable[[], Any], reason: str) -> None:
    with pytest.raises(InvalidTxnToken) as caught:
        verify(token())
    assert caught.value.reason == reason
    assert caught.value.status == 403 and caught.value.code == "invalid_txn_token"


def test_oversize_is_refused_before_parsing() -> None:
    with pytest.raises(InvalidTxnToken) as caught:
        verify("!" * 20, max_bytes=16)  # not even base64url: the cap answers first
    assert caught.value.reason == "txn_oversize"


# --- check_invocation ----------------------------------------------------------------------------------------

VERIFIED = verify(mint().token)
VERIFIED_NO_CNF = verify(mint(cnf_jkt=None).token)


def invocation(**overrides: Any) -> dict[str, Any]:
    return {"tool": TOOL, "arguments": ARGS, "subject": SUB, "actor_id": ACTOR, "jkt": JKT, **overrides}


NFD_NOTE = unicodedata.normalize("NFD", NFC_NOTE)


@pytest.mark.parametrize(
    ("overrides", "error", "reason"),
    [
        ({"tool": "listInvoices"}, InvalidTxnToken, "txn_tool"),
        ({"subject": "bob"}, InvalidTxnToken, "txn_subject"),
        ({"actor_id": "spiffe://example.org/agents/travel-bot"}, InvalidTxnToken, "txn_actor"),
        ({"actor_id": None}, InvalidTxnToken, "txn_actor"),
        ({"jkt": "another-key-thumbprint-aaaaaaaaaaaaaaaaaaaaa"}, InvalidTxnToken, "txn_key_binding"),
        ({"jkt": None}, InvalidTxnToken, "txn_key_binding"),
        ({"arguments": {**ARGS, "amount": 4900}}, TxnTokenMismatch, "txn_args_mismatch"),
        ({"arguments": {**ARGS, "invoice_id": "INV-8832"}}, TxnTokenMismatch, "txn_args_mismatch"),
        ({"arguments": {**ARGS, "amount": "4800"}}, TxnTokenMismatch, "txn_args_mismatch"),
        ({"arguments": {**ARGS, "_meta": {}}}, TxnTokenMismatch, "txn_args_mismatch"),
        (
            {"arguments": {k: v for k, v in ARGS.items() if k != "department"}},
            TxnTokenMismatch,
            "txn_args_mismatch",
        ),
        (
            {"arguments": {**ARGS, "tags": {"cost_center": "CC-2", "project": "P-9"}}},
            TxnTokenMismatch,
            "txn_args_mismatch",
        ),
        ({"arguments": {**ARGS, "note": NFD_NOTE}}, TxnTokenMismatch, "txn_args_mismatch"),
        ({"subject": "bob", "arguments": {}}, InvalidTxnToken, "txn_subject"),
    ],
    ids=[
        "other-tool",
        "other-sub",
        "other-actor",
        "no-actor",
        "other-jkt-T13",
        "no-jkt-T13",
        "amount-T03",
        "invoice-T03",
        "string-vs-number-T05",
        "added-key-T09",
        "removed-key",
        "nested-value",
        "nfd-vs-nfc-T08",
        "identity-before-parameter-lock",
    ],
)
def test_check_invocation_refuses(overrides: dict[str, Any], error: type[Exception], reason: str) -> None:
    with pytest.raises(error) as caught:
        check_invocation(VERIFIED, **invocation(**overrides))
    assert getattr(caught.value, "reason", None) == reason


def _parsed(text: str) -> Any:
    return strict_loads(text.encode())


@pytest.mark.parametrize(
    ("claims_", "overrides"),
    [
        (VERIFIED, {}),
        (VERIFIED, {"arguments": dict(reversed(list(ARGS.items())))}),
        (VERIFIED, {"arguments": {**ARGS, "tags": {"project": "P-9", "cost_center": "CC-1"}}}),
        (VERIFIED, {"arguments": {**ARGS, "amount": 4800.0}}),
        (VERIFIED, {"arguments": {**ARGS, "amount": _parsed("4.8e3")}}),
        (VERIFIED, {"arguments": {**ARGS, "amount": _parsed("48E2")}}),
        (VERIFIED, {"arguments": {**ARGS, "note": _parsed('"caf\\u00e9"')}}),
        (VERIFIED_NO_CNF, {"jkt": None}),
        (VERIFIED_NO_CNF, {"jkt": "any-key"}),
    ],
    ids=[
        "identical",
        "key-order-T07",
        "nested-key-order-T07",
        "4800.0",
        "4.8e3",
        "48E2",
        "escaped-e-acute-T08",
        "no-cnf-no-jkt",
        "no-cnf-mtls-or-other-key",
    ],
)
def test_check_invocation_accepts(claims_: TxnClaims, overrides: dict[str, Any]) -> None:
    check_invocation(claims_, **invocation(**overrides))


VERIFIED_INJECTED = verify(mint(arguments=AGENT_ARGS, injected=INJECTED).token)


def test_check_invocation_locks_the_agents_arguments_of_an_injected_token() -> None:
    check_invocation(VERIFIED_INJECTED, **invocation(arguments=AGENT_ARGS))


def test_check_invocation_refuses_the_injected_arguments_as_the_agents() -> None:
    # The parameter lock is over what the agent sent; the injected values are not part of it.
    with pytest.raises(TxnTokenMismatch):
        check_invocation(VERIFIED_INJECTED, **invocation(arguments=VERIFIED_INJECTED.forwarded_arguments()))


# --- a digest the caller already computed (the pipeline's, from stage 2) ---------------------------------------

OTHER_ARGS: dict[str, Any] = {**ARGS, "amount": 480000}


def test_mint_with_the_precomputed_digest_signs_the_same_bytes() -> None:
    computed, given = mint(txn="txn-1"), mint(txn="txn-1", args_digest=args_digest(ARGS))
    assert given.token.split(".")[:2] == computed.token.split(".")[:2]
    assert given.args_digest == computed.args_digest == args_digest(ARGS)
    assert verify(given.token).args_digest == args_digest(ARGS)


@pytest.mark.parametrize("wrong", [args_digest(OTHER_ARGS), "A" * 43, "not-a-digest"])
def test_a_wrong_digest_given_to_mint_makes_a_token_that_never_verifies(wrong: str) -> None:
    # The token carries ARGS with another digest: verification recomputes it from the token's own arguments.
    minted = mint(args_digest=wrong)
    with pytest.raises(InvalidTxnToken) as caught:
        verify(minted.token)
    assert caught.value.reason in {"txn_args_digest", "txn_args_digest_format"}


@pytest.mark.parametrize(
    ("overrides", "error", "reason"),
    [
        ({"arguments": OTHER_ARGS}, TxnTokenMismatch, "txn_args_mismatch"),
        ({"arguments": {**ARGS, "amount": "4800"}}, TxnTokenMismatch, "txn_args_mismatch"),
        ({"arguments": {**ARGS, "note": NFD_NOTE}}, TxnTokenMismatch, "txn_args_mismatch"),
        ({"subject": "bob", "arguments": OTHER_ARGS}, InvalidTxnToken, "txn_subject"),
        ({"jkt": None}, InvalidTxnToken, "txn_key_binding"),
    ],
    ids=["other-amount", "string-vs-number", "nfd-vs-nfc", "identity-first", "key-binding-first"],
)
def test_check_invocation_with_the_precomputed_digest_refuses_alike(
    overrides: dict[str, Any], error: type[Exception], reason: str
) -> None:
    # Only the computation is shared: the digest of the actual arguments is still compared with the token's.
    given = invocation(**overrides)
    for kwargs in ({}, {"args_digest": args_digest(given["arguments"])}):
        with pytest.raises(error) as caught:
            check_invocation(VERIFIED, **given, **kwargs)
        assert getattr(caught.value, "reason", None) == reason


@pytest.mark.parametrize("wrong", [args_digest(OTHER_ARGS), "A" * 43, "", "not-a-digest"])
def test_a_wrong_digest_given_to_check_invocation_refuses_even_the_right_arguments(wrong: str) -> None:
    # The comparison is never skipped when a digest is given: a wrong one is a mismatch, not a pass.
    with pytest.raises(TxnTokenMismatch):
        check_invocation(VERIFIED, **invocation(), args_digest=wrong)
    check_invocation(VERIFIED, **invocation(), args_digest=args_digest(ARGS))


def test_a_mismatching_token_cannot_pass_with_a_wrong_digest_from_mint() -> None:
    # A token minted for ARGS with OTHER_ARGS's digest never verifies, so it never reaches check_invocation
    # with OTHER_ARGS; and the genuine token for ARGS refuses OTHER_ARGS whatever digest of them is given.
    with pytest.raises(InvalidTxnToken):
        verify(mint(args_digest=args_digest(OTHER_ARGS)).token)
    with pytest.raises(TxnTokenMismatch):
        check_invocation(VERIFIED, **invocation(arguments=OTHER_ARGS), args_digest=args_digest(OTHER_ARGS))


# --- helpers --------------------------------------------------------------------------------------------------


def test_txn_replay_key_is_hashed_and_store_safe() -> None:
    key = txn_replay_key("a/b c*{x}")
    assert check_key(key) == key and "a/b" not in key
    assert key == txn_replay_key("a/b c*{x}") != txn_replay_key("a/b c*{y}")
    assert key.startswith("{") and key.endswith("}:txn")  # its own Redis Cluster hash tag


def test_unverified_kid() -> None:
    assert unverified_kid(mint().token) == SIGNER.kid
    assert unverified_kid(forge(header={"kid": OMIT})) is None
    assert unverified_kid("garbage") is None
    assert unverified_kid("A" * 5000 + ".x.y") is None


@pytest.mark.parametrize(
    "jwks",
    [
        [SIGNER.public_jwk(), {**PREVIOUS.public_jwk(), "kid": SIGNER.kid}],
        [{k: v for k, v in SIGNER.public_jwk().items() if k != "kid"}],
        [BROKER_JWK],
        [{**SIGNER.public_jwk(), "use": "enc"}],
    ],
    ids=["duplicate-kid", "no-kid", "private-key", "use-enc"],
)
def test_verification_keys_refuses(jwks: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError):
        verification_keys(*jwks)
