"""Stateless DPoP server nonces (RFC 9449 §8-§9; HOSTILE D20)."""

from __future__ import annotations

from typing import Any

import pytest

from broker.identity.nonce import FUTURE_SKEW, NonceService
from broker.jose import b64url_decode, b64url_encode

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
OTHER_JKT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
T0 = 1_800_000_000.0
LIFETIME = 300


def _flip_last_tag_byte(nonce: str) -> str:
    raw = bytearray(b64url_decode(nonce))
    raw[-1] ^= 0x01
    return b64url_encode(bytes(raw))


def _with_timestamp(nonce: str, issued_at: int) -> str:
    raw = b64url_decode(nonce)
    return b64url_encode(raw[:1] + issued_at.to_bytes(8, "big") + raw[9:])


def _alternative_spelling(nonce: str) -> str:
    # 25 bytes in 34 chars leave 4 unused bits in the last char; setting one decodes to the same bytes.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return nonce[:-1] + alphabet[alphabet.index(nonce[-1]) | 1]


def test_fresh_nonce_is_accepted() -> None:
    service = NonceService(SECRET, LIFETIME)
    assert service.check(service.issue(T0, JKT), JKT, T0)


def test_nonce_from_another_replica_with_the_same_secret_is_accepted() -> None:
    replica_a, replica_b = NonceService(SECRET, LIFETIME), NonceService(SECRET, LIFETIME)
    assert replica_b.check(replica_a.issue(T0, JKT), JKT, T0 + 1)


@pytest.mark.parametrize(
    ("issued_at", "checked_at", "accepted"),
    [
        (T0, T0 + LIFETIME, True),  # last second of the lifetime
        (T0, T0 + LIFETIME + 1, False),  # expired
        (T0, T0 + 3600, False),
        (T0 + FUTURE_SKEW, T0, True),  # a replica whose clock is slightly ahead issued it
        (T0 + FUTURE_SKEW + 1, T0, False),  # from the future
        (T0 + 3600, T0, False),
    ],
    ids=["edge-of-lifetime", "expired", "long-expired", "skew-edge", "future", "far-future"],
)
def test_nonce_time_window(issued_at: float, checked_at: float, accepted: bool) -> None:
    service = NonceService(SECRET, LIFETIME)
    assert service.check(service.issue(issued_at, JKT), JKT, checked_at) is accepted


def _issued() -> str:
    return NonceService(SECRET, LIFETIME).issue(T0, JKT)


# Each row breaks one thing about a nonce that is otherwise fresh and valid for JKT.
@pytest.mark.parametrize(
    ("nonce", "jkt", "service"),
    [
        (_issued(), OTHER_JKT, NonceService(SECRET, LIFETIME)),  # minted for another key (D20)
        (_issued(), JKT, NonceService(OTHER_SECRET, LIFETIME)),  # another deployment's secret
        (_flip_last_tag_byte(_issued()), JKT, NonceService(SECRET, LIFETIME)),  # forged tag
        (_with_timestamp(_issued(), int(T0) + 1), JKT, NonceService(SECRET, LIFETIME)),  # re-dated
        (_alternative_spelling(_issued()), JKT, NonceService(SECRET, LIFETIME)),  # non-canonical base64url
        (_issued()[:-1], JKT, NonceService(SECRET, LIFETIME)),  # truncated
        (_issued() + "A", JKT, NonceService(SECRET, LIFETIME)),  # extended
        ("!" * 34, JKT, NonceService(SECRET, LIFETIME)),  # not base64url
        ("A" * 34, JKT, NonceService(SECRET, LIFETIME)),  # wrong version byte
        ("", JKT, NonceService(SECRET, LIFETIME)),
        ("\u00e9" * 34, JKT, NonceService(SECRET, LIFETIME)),
        (None, JKT, NonceService(SECRET, LIFETIME)),
        (123, JKT, NonceService(SECRET, LIFETIME)),
        (_issued(), None, NonceService(SECRET, LIFETIME)),  # bound service, no key
        (_issued(), "\ud800", NonceService(SECRET, LIFETIME)),  # unencodable jkt
        (_issued(), JKT, NonceService(SECRET, LIFETIME, bind_to_key=False)),  # bound nonce, unbound service
    ],
    ids=[
        "other-key",
        "other-secret",
        "forged-tag",
        "re-dated",
        "alt-spelling",
        "truncated",
        "extended",
        "not-base64url",
        "wrong-version",
        "empty",
        "non-ascii",
        "none",
        "int",
        "no-jkt",
        "surrogate-jkt",
        "bound-to-unbound",
    ],
)
def test_bad_nonce_is_refused(nonce: Any, jkt: Any, service: NonceService) -> None:
    assert service.check(nonce, jkt, T0) is False


def test_unbound_nonces_work_for_any_key_and_are_refused_by_a_bound_service() -> None:
    unbound = NonceService(SECRET, LIFETIME, bind_to_key=False)
    nonce = unbound.issue(T0)
    assert unbound.check(nonce, None, T0) and unbound.check(nonce, OTHER_JKT, T0)
    assert NonceService(SECRET, LIFETIME).check(nonce, JKT, T0) is False  # no downgrade to unbound


def test_nonce_rotates_with_time() -> None:
    service = NonceService(SECRET, LIFETIME)
    assert service.issue(T0, JKT) != service.issue(T0 + 1, JKT)
    assert service.issue(T0, JKT) == service.issue(T0 + 0.5, JKT)  # whole seconds


@pytest.mark.parametrize(
    "kwargs",
    [
        {"secret": b"short"},
        {"secret": "x" * 32},
        {"secret": SECRET, "lifetime": 0},
        {"secret": SECRET, "lifetime": True},
    ],
    ids=["short-secret", "str-secret", "zero-lifetime", "bool-lifetime"],
)
def test_bad_configuration_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        NonceService(**kwargs)


def test_bound_service_needs_a_jkt_to_issue() -> None:
    with pytest.raises(ValueError):
        NonceService(SECRET, LIFETIME).issue(T0)
