"""HOSTILE §1.8 S01–S08: the state store (Redis) and clocks, through a real broker where the row is about the
request path, and through the store itself where it is about the store.

Outages use an own ``redis-server`` per test (``tests/redisutil.throwaway_redis``): killed for "down" (S01),
stopped with SIGSTOP for "slow" (S02). Shared-Redis tests use a unique key prefix and delete their keys after.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

import broker.state.redis as redis_module
from broker.config.models import Dpop
from broker.identity.dpop import DpopPolicy, verify_proof
from broker.state import MemoryStore, StateStore
from broker.txn.tokens import MAX_LIFETIME
from tests.certfactory import Pki
from tests.conftest import BrokerFactory, BrokerUnderTest, RecordingUpstream, base_config
from tests.dpopfactory import ec_key, make_proof
from tests.redisutil import RedisStores, free_port, redis_stores, throwaway_redis
from tests.security.support import INVOICE, TOOL, admin, metrics

REPO = Path(__file__).resolve().parents[2]


def redis_config(pki: Pki, tmp_path: Path, upstream_url: str, redis_url: str, **state: Any) -> dict[str, Any]:
    config = base_config(pki, tmp_path, upstream_url=upstream_url)
    config["state"] = {"backend": "redis", "redis_url": redis_url, **state}
    return config


def state_refusals(broker: BrokerUnderTest) -> list[str]:
    return [r["reason"] for r in broker.audit_records() if r["decision"] == "error" and r["status"] == 503]


@pytest.fixture
async def redis() -> AsyncIterator[RedisStores]:
    async with redis_stores() as stores:
        yield stores


# -- S01, S02, S04: fail closed, with no local fallback --------------------------------------------------------


@pytest.mark.redis
async def test_s01_redis_down_refuses_every_call_with_503(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    """Nothing listens on the configured Redis port: discovery, invocation and the exchange are all 503, the
    broker is not ready, and nothing is forwarded."""
    broker = await broker_factory(
        redis_config(pki, tmp_path, upstream.url, f"redis://127.0.0.1:{free_port()}/0", timeout_ms=500)
    )
    caller = broker.caller()
    form = urlencode(
        {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "requested_token_type": "urn:ietf:params:oauth:token-type:txn_token",
            "audience": pki.trust_domain,
            "subject_token": caller.token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "scope": "tool:approveExpense",
            "request_details": json.dumps({"tool": "approveExpense", "arguments": INVOICE}),
        }
    ).encode()
    replies = [
        await caller.call("POST", TOOL, INVOICE),
        await caller.call("GET", "/v1/tools"),
        await caller.call(
            "POST", "/v1/token", raw=form, headers={"Content-Type": "application/x-www-form-urlencoded"}
        ),
    ]
    assert [(r.status, r.error) for r in replies] == [(503, "state_unavailable")] * 3
    assert (await admin(broker, "GET", "/readyz"))[0] == 503
    assert upstream.received == []
    assert state_refusals(broker) and set(state_refusals(broker)) <= {
        "state_guard_failed",
        "state_window_stats_failed",
    }
    assert 'broker_state_errors_total{op="guard"}' in await metrics(broker)


@pytest.mark.redis
async def test_s02_hung_redis_is_treated_as_down_within_the_timeout(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    async with throwaway_redis() as server:
        broker = await broker_factory(redis_config(pki, tmp_path, upstream.url, server.url, timeout_ms=300))
        caller = broker.caller()
        assert (await caller.call("POST", TOOL, INVOICE)).status == 200
        server.pause()  # SIGSTOP: the socket stays open, nothing answers
        try:
            started = time.monotonic()
            reply = await caller.call("POST", TOOL, INVOICE)
            elapsed = time.monotonic() - started
        finally:
            server.resume()
        assert (reply.status, reply.error) == (503, "state_unavailable")
        assert elapsed < 3  # bounded by timeout_ms (0.3 s per store operation), not by the client
        assert len(upstream.received) == 1
        assert (await caller.call("POST", TOOL, INVOICE)).status == 200  # recovers by itself
        assert len(upstream.received) == 2


@pytest.mark.redis
async def test_s04_no_local_fallback_while_redis_is_down(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    """During an outage a proof that was already used and a fresh one get the same answer, 503: the broker has
    no local replay cache to consult (one that said "seen" or "unseen" would be a fallback)."""
    async with throwaway_redis() as server:
        broker = await broker_factory(redis_config(pki, tmp_path, upstream.url, server.url, timeout_ms=300))
        caller = broker.caller()
        used = caller.auth_headers("POST", TOOL)
        assert (await caller.call("POST", TOOL, INVOICE, auth=used)).status == 200
        await server.kill()
        replies = [
            await caller.call("POST", TOOL, INVOICE, auth=used),
            await caller.call("POST", TOOL, INVOICE),
            await caller.call("POST", TOOL, INVOICE),
        ]
        assert {(r.status, r.error) for r in replies} == {(503, "state_unavailable")}
        assert len(upstream.received) == 1
        await server.start()
        assert (await caller.call("POST", TOOL, INVOICE)).status == 200
        assert len(upstream.received) == 2


# -- S03: one atomic check-and-set ---------------------------------------------------------------------------


async def _race(stores: list[StateStore], key: str, attempts: int) -> list[bool]:
    async def attempt(store: StateStore) -> bool:
        return (await store.guard({}, [(key, 60.0)])).ok

    return await asyncio.gather(*(attempt(stores[i % len(stores)]) for i in range(attempts)))


async def test_s03_memory_store_check_and_set_is_atomic() -> None:
    store = MemoryStore(max_entries=10_000)
    assert sorted(await _race([store], "dpop:" + "a" * 64, 100)) == [False] * 99 + [True]


@pytest.mark.redis
async def test_s03_redis_check_and_set_is_atomic_across_replicas(redis: RedisStores) -> None:
    replicas: list[StateStore] = [redis.store(), redis.store(), redis.store()]
    assert sorted(await _race(replicas, "dpop:" + "b" * 64, 60)) == [False] * 59 + [True]
    assert await redis.raw.pttl(redis.prefix + "claim:dpop:" + "b" * 64) > 0  # set with an expiry


# -- S05: failover, documented -------------------------------------------------------------------------------


def test_s05_failover_window_is_documented_and_short() -> None:
    """Asynchronous replication can lose the last claims on failover: the README and the Redis store document it,
    and what a lost claim reopens is bounded by short defaults (a DPoP proof: 65 s; a txn token: 300 s)."""
    readme = (REPO / "README.md").read_text()
    assert "S05" in readme and "failover" in readme
    assert "S05" in (redis_module.__doc__ or "")
    defaults = Dpop()
    assert defaults.iat_window_seconds + defaults.iat_skew_seconds <= 65
    assert MAX_LIFETIME == 300


# -- S06: replica clocks -------------------------------------------------------------------------------------

IAT = 1_800_000_000
HTU = "https://broker.example.org/v1/tools/approveExpense"


@pytest.mark.parametrize(
    ("window", "skew"),
    [(60, 5), (300, 60), (600, 120), (5, 0)],
    ids=["S06-default", "S06-wide", "S06-max", "S06-tight"],
)
async def test_s06_replay_entry_outlives_every_moment_a_replica_accepts_the_proof(
    window: int, skew: int
) -> None:
    """A proof is acceptable from iat - skew to iat + window (on clocks within the NTP bound). Claimed at the first
    of those moments, its replay entry must still exist at the last one: TTL >= window + skew."""
    policy = DpopPolicy(iat_window=window, iat_skew=skew)
    key = ec_key()
    proof = make_proof(key, htu=HTU, iat=IAT)
    earliest, latest = IAT - skew, IAT + window
    verified = verify_proof(proof, policy=policy, method="POST", htu=HTU, access_token=None, now=earliest)
    assert (
        verify_proof(proof, policy=policy, method="POST", htu=HTU, access_token=None, now=latest).jti
        == verified.jti
    )
    assert verified.replay_ttl >= window + skew
    clock = [float(earliest)]
    store = MemoryStore(max_entries=1000, clock=lambda: clock[0])
    assert await store.claim("dpop:" + verified.replay_key, verified.replay_ttl)
    clock[0] = float(latest)  # the last moment any replica would still accept it
    assert not await store.claim("dpop:" + verified.replay_key, verified.replay_ttl)


def test_s06_the_future_skew_and_window_are_bounded_in_config() -> None:
    """The clock tolerance is configuration, identical on every replica, and bounded (120 s forward)."""
    bounds = Dpop.model_json_schema()["properties"]
    assert bounds["iat_skew_seconds"]["maximum"] <= 120
    assert bounds["iat_window_seconds"]["maximum"] <= 600


# -- S07, S08: what the store records ---------------------------------------------------------------------------


@pytest.mark.redis
async def test_s07_a_flood_of_invalid_proofs_records_nothing(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path, redis: RedisStores
) -> None:
    """Each proof carries a new jti but fails a check (signature, htm, htu, iat, ath): none of them reaches the
    store. Only a call that passes every check records its jti."""
    broker = await broker_factory(
        redis_config(pki, tmp_path, upstream.url, redis.url, key_prefix=redis.prefix, timeout_ms=2000)
    )
    caller = broker.caller()
    attacker = ec_key()
    now = int(time.time())
    broken = [
        lambda: caller.proof("POST", TOOL, signature=b"\x00" * 64),
        lambda: caller.proof("GET", TOOL),
        lambda: caller.proof("POST", "/v1/tools/other"),
        lambda: caller.proof("POST", TOOL, payload_overrides={"iat": now - 3600}),
        lambda: caller.proof("POST", TOOL, payload_overrides={"ath": "A" * 43}),
        lambda: replace(caller, dpop_jwk=attacker).proof(
            "POST", TOOL
        ),  # valid proof, wrong key for the token
    ]
    for i in range(30):
        auth = {"Authorization": f"DPoP {caller.token}", "DPoP": broken[i % len(broken)]()}
        assert (await caller.call("POST", TOOL, INVOICE, auth=auth)).status == 401
    assert [k async for k in redis.raw.scan_iter(match=redis.prefix + "claim:*")] == []
    assert (await caller.call("POST", TOOL, INVOICE)).status == 200
    assert len([k async for k in redis.raw.scan_iter(match=redis.prefix + "claim:*")]) == 1
    assert len(upstream.received) == 1


HOSTILE_JTIS = ["a:b", "*", "k{tag}x", "a b", "ключ", "x" * 256, "dpop:" + "0" * 64, "..\\..", "%0d%0a"]


@pytest.mark.redis
async def test_s08_hostile_jtis_are_hashed_into_the_key(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path, redis: RedisStores
) -> None:
    broker = await broker_factory(
        redis_config(pki, tmp_path, upstream.url, redis.url, key_prefix=redis.prefix, timeout_ms=2000)
    )
    caller = broker.caller()
    for jti in HOSTILE_JTIS:
        auth = {"Authorization": f"DPoP {caller.token}", "DPoP": caller.proof("POST", TOOL, jti=jti)}
        assert (await caller.call("POST", TOOL, INVOICE, auth=auth)).status == 200, jti
        assert (await caller.call("POST", TOOL, INVOICE, auth=auth)).status == 401, (
            jti
        )  # and replay still holds
    for jti in ("a\nb", "x" * 257, "x" * 1_000_000):  # control characters and oversize never get that far
        auth = {"Authorization": f"DPoP {caller.token}", "DPoP": caller.proof("POST", TOOL, jti=jti)}
        # 401 from the proof checks; the 1 MB one already trips the 16 KiB header line limit (431, JSON)
        assert (await caller.call("POST", TOOL, INVOICE, auth=auth)).status in (401, 431)
    keys = [k.decode() async for k in redis.raw.scan_iter(match=redis.prefix + "*")]
    claims = [k.removeprefix(redis.prefix) for k in keys if k.startswith(redis.prefix + "claim:")]
    assert len(claims) == len(HOSTILE_JTIS)
    assert all(re.fullmatch(r"claim:dpop:[0-9a-f]{64}", k) for k in claims), claims
    assert not any(jti in k for k in keys for jti in ("a:b", "k{tag}x", "ключ"))
    assert len(upstream.received) == len(HOSTILE_JTIS)
