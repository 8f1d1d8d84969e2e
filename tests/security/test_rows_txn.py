"""HOSTILE §1.4 rows without a test named after them: T01, T02, T12, T14, T16, T17.

Pure rows (T12, T14, T16) verify real tokens signed with real keys through :func:`verify_txn_token`; the rest
exchange a txn token at ``POST /v1/token`` of a real broker and invoke with it, asserting what the upstream got.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from broker.canonical import args_digest
from broker.errors import InvalidTxnToken
from broker.jose import Signer, b64url_encode, compact_json
from broker.txn.tokens import MAX_LIFETIME, TXN_TYP, mint_txn_token, verification_keys, verify_txn_token
from tests.certfactory import Pki
from tests.conftest import BrokerFactory, BrokerUnderTest, RecordingUpstream, base_config
from tests.redisutil import redis_stores, throwaway_redis
from tests.security.support import INVOICE, TOOL, claims_of, exchange_txn_token
from tests.tokenfactory import NOW, ec_jwk

# -- through the broker ----------------------------------------------------------------------------------------


def txn_config(pki: Pki, tmp_path: Path, upstream_url: str, **state: Any) -> dict[str, Any]:
    config = base_config(pki, tmp_path, upstream_url=upstream_url)
    config["tools"][0]["txn_token"] = "required"
    if state:
        config["state"] = state
    return config


def txn_refusals(*brokers: BrokerUnderTest) -> Counter[str]:
    return Counter(
        r["reason"]
        for b in brokers
        for r in b.audit_records()
        if r["event"] == "invocation" and r["decision"] in ("deny", "error")
    )


async def test_t01_txn_token_used_twice_in_sequence(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    broker = await broker_factory(txn_config(pki, tmp_path, upstream.url))
    caller = broker.caller()
    token = await exchange_txn_token(caller, INVOICE)
    first = await caller.call("POST", TOOL, INVOICE, headers={"Txn-Token": token})
    second = await caller.call("POST", TOOL, INVOICE, headers={"Txn-Token": token})
    assert first.status == 200
    assert (second.status, second.error) == (403, "invalid_txn_token")
    assert [r.headers["Txn-Token"] for r in upstream.received] == [token]
    assert txn_refusals(broker) == {"txn_replayed": 1}


@pytest.mark.redis
async def test_t02_fifty_parallel_consumes_on_two_replicas_one_succeeds(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    async with redis_stores() as redis:
        state = {"backend": "redis", "redis_url": redis.url, "key_prefix": redis.prefix, "timeout_ms": 2000}
        config = txn_config(pki, tmp_path, upstream.url, **state)
        config_b = {**config, "audit": {"file": str(tmp_path / "audit-b.jsonl"), "checkpoint_every": 50}}
        replica_a, replica_b = await broker_factory(config), await broker_factory(config_b)
        caller_a = replica_a.caller()
        caller_b = replace(caller_a, broker=replica_b)
        token = await exchange_txn_token(caller_a, INVOICE)
        # each call has its own fresh DPoP proof: only the txn token is shared
        replies = await asyncio.gather(
            *(c.call("POST", TOOL, INVOICE, headers={"Txn-Token": token}) for c in [caller_a, caller_b] * 25)
        )
        assert sorted(r.status for r in replies) == [200] + [403] * 49
        assert {r.error for r in replies if r.status != 200} == {"invalid_txn_token"}
        assert len(upstream.received) == 1
        assert txn_refusals(replica_a, replica_b) == {"txn_replayed": 49}


@pytest.mark.redis
async def test_t17_state_store_down_at_consume_time_is_503_and_consumes_nothing(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    async with throwaway_redis() as server:
        broker = await broker_factory(
            txn_config(pki, tmp_path, upstream.url, backend="redis", redis_url=server.url, timeout_ms=500)
        )
        caller = broker.caller()
        token = await exchange_txn_token(caller, INVOICE)
        await server.kill()
        down = await caller.call("POST", TOOL, INVOICE, headers={"Txn-Token": token})
        assert (down.status, down.error) == (503, "state_unavailable")
        assert upstream.received == []
        await server.start()
        # the refused call consumed nothing: the same token works once, and only once, after recovery
        assert (await caller.call("POST", TOOL, INVOICE, headers={"Txn-Token": token})).status == 200
        again = await caller.call("POST", TOOL, INVOICE, headers={"Txn-Token": token})
        assert (again.status, again.error) == (403, "invalid_txn_token")
        assert len(upstream.received) == 1
        assert txn_refusals(broker) == {"state_guard_failed": 1, "txn_replayed": 1}


# -- pure verification -----------------------------------------------------------------------------------------

ISS = "https://broker.example.org"
AUD = "example.org"
SIGNER = Signer.from_jwk({**ec_jwk("P-256"), "kid": "current"})
RETIRED = Signer.from_jwk({**ec_jwk("P-256"), "kid": "retired"})
FOREIGN = Signer.from_jwk({**ec_jwk("P-256"), "kid": "current"})  # another deployment, same kid
KEYS = verification_keys(SIGNER.public_jwk())
ARGS = {"invoice_id": "INV-1", "amount": 4800}


def claims(**overrides: Any) -> dict[str, Any]:
    minted = mint_txn_token(
        SIGNER,
        issuer=ISS,
        audience=AUD,
        subject="alice",
        scope="tool:approveExpense",
        actor_id="spiffe://example.org/agents/expense-assistant",
        tool="approveExpense",
        arguments=ARGS,
        policy_version="abc",
        cnf_jkt="jkt",
        req_ip="127.0.0.1",
        authn="dpop",
        now=NOW,
        txn="t-1",
    )
    payload = claims_of(minted.token)
    for name, value in overrides.items():
        if value is None:
            payload.pop(name, None)
        else:
            payload[name] = value
    return payload


def verify(token: str, now: float = NOW) -> str | None:
    """The refusal reason, or None if the token verifies."""
    try:
        verify_txn_token(token, keys=KEYS, issuer=ISS, audience=AUD, now=now)
    except InvalidTxnToken as refusal:
        return refusal.reason
    return None


@pytest.mark.parametrize(
    ("payload", "now", "reason"),
    [
        (claims(), NOW + MAX_LIFETIME + 5 + 1, "txn_expired"),
        (claims(), NOW + MAX_LIFETIME + 5, "txn_expired"),
        (claims(), NOW + MAX_LIFETIME + 4, None),
        (claims(exp=NOW + MAX_LIFETIME + 1), NOW, "txn_lifetime"),
        (claims(exp=NOW + 86400, iat=NOW), NOW, "txn_lifetime"),
        (claims(exp=NOW), NOW, "txn_lifetime"),
        (claims(exp=None), NOW, "txn_claim_missing"),
        (claims(exp=float(NOW + 60)), NOW, "txn_claim_type"),
        (claims(exp=str(NOW + 60)), NOW, "txn_claim_type"),
        (claims(iat=NOW + 60, exp=NOW + 120), NOW, "txn_iat_future"),
    ],
    ids=[
        "T12-expired-after-5-min-plus-skew",
        "T12-expired-at-the-skew-boundary",
        "T12-just-inside-the-skew",
        "T12-lifetime-301s",
        "T12-lifetime-a-day",
        "T12-exp-equals-iat",
        "T12-exp-missing",
        "T12-exp-float",
        "T12-exp-numeric-string",
        "T12-iat-in-the-future",
    ],
)
def test_t12_expiry_and_lifetime(payload: dict[str, Any], now: float, reason: str | None) -> None:
    assert verify(SIGNER.sign(payload, typ=TXN_TYP), now) == reason


def _raw(header: dict[str, Any], payload: dict[str, Any], signature: bytes) -> str:
    return ".".join(
        [b64url_encode(compact_json(header)), b64url_encode(compact_json(payload)), b64url_encode(signature)]
    )


def _hs256_with_public_key() -> str:
    header = {"alg": "HS256", "typ": TXN_TYP, "kid": "current"}
    signing_input = f"{b64url_encode(compact_json(header))}.{b64url_encode(compact_json(claims()))}"
    secret = json.dumps(SIGNER.public_jwk()).encode()  # the public JWK as the HMAC secret (J03 analogue)
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url_encode(mac)}"


def _alg_swapped(alg: str) -> str:
    """A token signed correctly, whose header then names another algorithm (the signature bytes stay)."""
    good = SIGNER.sign(claims(), typ=TXN_TYP)
    header = {"alg": alg, "typ": TXN_TYP, "kid": "current"}
    return b64url_encode(compact_json(header)) + good[good.index(".") :]


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (lambda: _alg_swapped("ES384"), "txn_alg"),
        (lambda: _alg_swapped("none"), "txn_alg"),
        (lambda: _alg_swapped("es256"), "txn_alg"),
        (lambda: _raw({"alg": "none", "typ": TXN_TYP, "kid": "current"}, claims(), b""), "txn_alg"),
        (_hs256_with_public_key, "txn_alg"),
        (lambda: RETIRED.sign(claims(), typ=TXN_TYP), "txn_unknown_kid"),
        (lambda: FOREIGN.sign(claims(), typ=TXN_TYP), "txn_signature"),
        (
            lambda: SIGNER.sign(claims(), typ=TXN_TYP, extra_headers={"jwk": FOREIGN.public_jwk()}),
            "txn_header_jwk",
        ),
        (
            lambda: SIGNER.sign(claims(), typ=TXN_TYP, extra_headers={"jku": "https://evil/jwks"}),
            "txn_header_jku",
        ),
    ],
    ids=[
        "T14-alg-changed-to-es384",
        "T14-alg-none-with-signature",
        "T14-alg-case-variant",
        "T14-alg-none-unsigned",
        "T14-hs256-with-the-public-key",
        "T14-retired-key",
        "T14-foreign-key-same-kid",
        "T14-embedded-jwk",
        "T14-jku",
    ],
)
def test_t14_algorithm_and_key_substitution(token: Any, reason: str) -> None:
    assert verify(token()) == reason


def test_t14_a_retired_key_verifies_only_while_it_is_published() -> None:
    """Rotation overlap: the previous key is accepted while listed in the keys, refused once it is dropped."""
    old = RETIRED.sign(claims(), typ=TXN_TYP)
    overlap = verification_keys(SIGNER.public_jwk(), RETIRED.public_jwk())
    assert verify_txn_token(old, keys=overlap, issuer=ISS, audience=AUD, now=NOW).txn == "t-1"
    assert verify(old) == "txn_unknown_kid"


def _tctx(**changes: Any) -> dict[str, Any]:
    """The valid claims with ``tctx`` members changed (``None``: removed)."""
    tctx = dict(claims()["tctx"])
    tctx.update(changes)
    return claims(tctx={k: v for k, v in tctx.items() if v is not None})


_CANONICAL = json.dumps(ARGS, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_tctx(hash_alg="md5"), "txn_tctx"),
        (_tctx(hash_alg="sha256"), "txn_tctx"),
        (_tctx(args_digest=b64url_encode(hashlib.md5(_CANONICAL).digest())), "txn_args_digest_format"),  # noqa: S324
        (_tctx(args_digest=hashlib.sha256(_CANONICAL).hexdigest()), "txn_args_digest_format"),
        (_tctx(args_digest=args_digest(ARGS)[:22]), "txn_args_digest_format"),
        (_tctx(args_digest=args_digest(ARGS) + "="), "txn_args_digest_format"),
        (_tctx(args_digest=args_digest({**ARGS, "amount": 1})), "txn_args_digest"),
        (_tctx(args_digest=None), "txn_args_digest_format"),
    ],
    ids=[
        "T16-hash-alg-md5",
        "T16-any-hash-alg-member",
        "T16-md5-digest",
        "T16-hex-sha256",
        "T16-truncated-digest",
        "T16-padded-digest",
        "T16-digest-of-other-arguments",
        "T16-digest-missing",
    ],
)
def test_t16_only_a_full_sha256_digest_is_accepted(payload: dict[str, Any], reason: str) -> None:
    assert verify(SIGNER.sign(payload, typ=TXN_TYP)) == reason


def test_t16_the_valid_token_verifies() -> None:
    """Control for the T12/T14/T16 tables: the unmodified token passes."""
    assert verify(SIGNER.sign(claims(), typ=TXN_TYP)) is None
