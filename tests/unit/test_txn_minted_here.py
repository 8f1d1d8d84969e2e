"""broker.txn.minted.MintedHere: a txn token this process signed skips only its signature verification, and the
verdict is always the one a full verification gives (tokens changed in any byte, other keys, rotations)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from broker.errors import InvalidTxnToken
from broker.jose import Signer, generate_ec_jwk
from broker.keys import KeyRing
from broker.txn.minted import MintedHere
from broker.txn.tokens import mint_txn_token, verify_txn_token

ISSUER = "https://broker.example"
AUDIENCE = "example.org"
NOW = 1_800_000_000.0


def mint(ring: KeyRing, **changes: Any) -> str:
    claims: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "subject": "alice",
        "scope": "tool:approveExpense",
        "actor_id": "spiffe://example.org/agents/expense-assistant",
        "tool": "approveExpense",
        "arguments": {"invoice_id": "INV-8831", "amount": 4800},
        "policy_version": "v1",
        "cnf_jkt": None,
        "req_ip": "127.0.0.1",
        "authn": "dpop",
        "now": NOW,
    }
    claims.update(changes)
    return mint_txn_token(ring, **claims).token


def verdict(token: str, ring: KeyRing, minted: MintedHere | None, now: float = NOW) -> str:
    try:
        claims = verify_txn_token(
            token,
            keys=ring.verification_keys(now),
            issuer=ISSUER,
            audience=AUDIENCE,
            now=now,
            signed_here=None if minted is None else minted.vouches,
        )
    except InvalidTxnToken as exc:
        return f"refused {exc.reason}"
    return f"ok {claims.txn}"


def remembered(ring: KeyRing, token: str, minted: MintedHere) -> None:
    minted.remember(token, ring.verification_keys(NOW)[ring.kid])


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing(Signer.from_jwk(generate_ec_jwk()))


def test_a_token_signed_here_is_vouched_for_and_verifies_alike(ring: KeyRing) -> None:
    minted = MintedHere()
    token = mint(ring)
    remembered(ring, token, minted)
    entry = ring.verification_keys(NOW)[ring.kid]
    assert minted.vouches(token, entry)
    assert verdict(token, ring, minted) == verdict(token, ring, None) != ""
    assert verdict(token, ring, minted).startswith("ok ")
    # the claims are still checked: expired is expired
    assert verdict(token, ring, minted, now=NOW + 3600) == verdict(token, ring, None, now=NOW + 3600)
    assert verdict(token, ring, minted, now=NOW + 3600) == "refused txn_expired"


def mutations(token: str, rng: random.Random) -> list[str]:
    header, payload, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    out = []
    for _ in range(40):
        part = rng.randrange(3)
        pieces = [header, payload, signature]
        text = pieces[part]
        at = rng.randrange(len(text))
        pieces[part] = text[:at] + rng.choice(alphabet) + text[at + 1 :]
        out.append(".".join(pieces))
    out += [token + "=", token[:-1], header + "." + payload + ".", f"{header}.{payload}.{signature}.x"]
    return [text for text in out if text != token]


@pytest.mark.parametrize("seed", range(25))
def test_any_other_token_is_verified_in_full(ring: KeyRing, seed: int) -> None:
    minted = MintedHere()
    token = mint(ring)
    remembered(ring, token, minted)
    other = mint(ring, subject="mallory")  # signed by this ring too, but not remembered
    for candidate in [*mutations(token, random.Random(seed)), other]:
        assert verdict(candidate, ring, minted) == verdict(candidate, ring, None), candidate


def test_a_token_of_another_process_is_verified_in_full(ring: KeyRing) -> None:
    # another worker signed it (same key): nothing remembered here, the full verification decides
    minted = MintedHere()
    token = mint(ring)
    assert not minted.vouches(token, ring.verification_keys(NOW)[ring.kid])
    assert verdict(token, ring, minted).startswith("ok ")


def test_after_a_rotation_nothing_is_vouched_for_and_retired_keys_still_verify(ring: KeyRing) -> None:
    minted = MintedHere()
    token = mint(ring)
    old_entry = ring.verification_keys(NOW)[ring.kid]
    remembered(ring, token, minted)
    ring.rotate(Signer.from_jwk(generate_ec_jwk()), now=NOW)
    keys = ring.verification_keys(NOW)
    assert keys[old_entry.kid] is not old_entry  # the key map was rebuilt
    assert not minted.vouches(token, keys[old_entry.kid])
    assert verdict(token, ring, minted) == verdict(token, ring, None)
    assert verdict(token, ring, minted).startswith("ok ")  # still within the overlap


def test_a_key_that_is_gone_refuses_even_a_remembered_token(ring: KeyRing) -> None:
    minted = MintedHere()
    token = mint(ring)
    remembered(ring, token, minted)
    ring.rotate(Signer.from_jwk(generate_ec_jwk()), now=NOW)
    later = NOW + 10_000  # past the overlap: the old key is no longer trusted
    assert verdict(token, ring, minted, now=later) == verdict(token, ring, None, now=later)
    assert verdict(token, ring, minted, now=later) == "refused txn_unknown_kid"


def test_the_oldest_go_first_past_capacity(ring: KeyRing) -> None:
    minted = MintedHere(capacity=3)
    tokens = [mint(ring, subject=f"user{index}") for index in range(5)]
    for token in tokens:
        remembered(ring, token, minted)
    entry = ring.verification_keys(NOW)[ring.kid]
    assert len(minted) == 3
    assert [minted.vouches(token, entry) for token in tokens] == [False, False, True, True, True]
    assert all(verdict(token, ring, minted).startswith("ok ") for token in tokens)
    with pytest.raises(ValueError):
        MintedHere(capacity=0)
