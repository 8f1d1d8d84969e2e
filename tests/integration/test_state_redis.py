"""RedisStore against a real Redis: the MemoryStore behaviours, plus replicas, outages and recovery.

Shared Redis at 127.0.0.1:6379 (unique key prefix per test, see ``tests/redisutil.py``) for behaviour and
cross-replica races (T02, D12); an own throwaway ``redis-server`` for outages (S01, S02, T17) and recovery.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from broker.errors import StateUnavailable
from broker.state import StateStore, hash_tag
from broker.state.base import OPS, Reservation
from broker.state.redis import RedisStore
from tests.redisutil import RedisStores, free_port, redis_stores, throwaway_redis

pytestmark = pytest.mark.redis

T0 = 1_800_000_000.0


@pytest.fixture
async def redis() -> AsyncIterator[RedisStores]:
    async with redis_stores() as stores:
        yield stores


class Errors(list[str]):
    def __call__(self, op: str) -> None:
        self.append(op)


# -- claim and claim_all -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl", "max_pttl"), [(60, 60_000), (300.0001, 300_001)], ids=["whole-seconds", "rounded-up-to-ms"]
)
async def test_claim_once_then_refused_with_px_ttl(redis: RedisStores, ttl: float, max_pttl: int) -> None:
    store = redis.store()
    assert await store.claim("txn:a", ttl) is True
    assert await store.claim("txn:a", ttl) is False
    assert max_pttl - 5_000 < await redis.raw.pttl(redis.prefix + "claim:txn:a") <= max_pttl


@pytest.mark.parametrize(
    ("existing", "expected"),
    [([], True), (["{t}:txn"], False), (["{t}:dpop"], False), (["{t}:txn", "{t}:dpop"], False)],
    ids=["none-exists", "txn-consumed", "jti-replayed", "both-exist"],
)
async def test_claim_all_is_all_or_nothing(redis: RedisStores, existing: list[str], expected: bool) -> None:
    store = redis.store()
    for key in existing:
        await store.claim(key, 60)
    items = [("{t}:txn", 300.0), ("{t}:dpop", 60.0), ("{t}:extra", 60.0)]
    assert await store.claim_all(items) is expected
    for key, ttl in items:
        if key in existing:
            continue
        pttl = await redis.raw.pttl(redis.prefix + "claim:" + key)
        if expected:
            assert ttl * 1000 - 5_000 < pttl <= ttl * 1000  # each key got its own PX
        else:
            assert pttl == -2  # a refused claim_all burned nothing


async def test_claim_all_with_a_hash_tagged_prefix(redis: RedisStores) -> None:
    # The Cluster-ready layout: one hash tag per invocation, carried by the keys (the prefix has none).
    tag = hash_tag("txn-digest")
    store = redis.store()
    assert await store.claim_all([(f"{tag}:txn", 300), (f"{tag}:dpop:jti-digest", 60)])
    assert await store.claim(f"{tag}:txn", 300) is False


@pytest.mark.parametrize("replay", ["claim", "claim_all"], ids=["claim", "claim_all"])
async def test_fifty_concurrent_consumes_on_two_replicas_one_wins(redis: RedisStores, replay: str) -> None:
    # Two stores, two connection pools: two broker processes as far as Redis can tell.
    replica_a, replica_b = redis.store(), redis.store()

    def consume(store: StateStore) -> Awaitable[bool]:
        if replay == "claim":
            return store.claim("txn:once", 300)
        return store.claim_all([("{once}:txn", 300), ("{once}:dpop", 60)])

    results = await asyncio.gather(*(consume(replica_a if i % 2 else replica_b) for i in range(50)))
    assert results.count(True) == 1


# -- revocations ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("revoked", "query", "expected"),
    [
        ([], {"txn": "t1", "sub": "alice"}, None),
        ([("sub", "alice")], {"txn": "t1", "sub": "alice"}, "sub"),
        ([("sub", "alice")], {"sub": "bob"}, None),
        ([("txn", "t1"), ("sub", "alice")], {"sub": "alice", "txn": "t1"}, "sub"),
        ([("sub", "t1")], {"txn": "t1"}, None),
        ([("jti", "a:*\nb")], {"jti": "a:*\nb"}, "jti"),
        ([], {}, None),
    ],
    ids=[
        "none",
        "subject",
        "other-subject",
        "first-in-query-order",
        "kind-matters",
        "hostile",
        "empty-query",
    ],
)
async def test_is_revoked_across_replicas(
    redis: RedisStores, revoked: list[tuple[str, str]], query: dict[str, str], expected: str | None
) -> None:
    admin, replica = redis.store(), redis.store()
    for kind, value in revoked:
        await admin.revoke(kind, value, 600)
    assert await replica.is_revoked(query) == expected


async def test_revocation_is_never_shortened(redis: RedisStores) -> None:
    store = redis.store()
    await store.revoke("grant", "g1", 600)
    await store.revoke("grant", "g1", 10)
    keys = [key async for key in redis.raw.scan_iter(match=redis.prefix + "rev:*")]
    assert len(keys) == 1 and b"{rev}" in keys[0]  # hashed value, shared hash tag
    assert await redis.raw.pttl(keys[0]) > 590_000
    await store.revoke("grant", "g1", 1200)  # a longer one does extend it
    assert await redis.raw.pttl(keys[0]) > 1_190_000


# -- sliding-window counters ---------------------------------------------------------------------------------

WINDOW_ROWS = [
    ([], 0, 600, (0, 0.0)),
    ([(-599, 1.0), (-300, 2.0), (0, 4.0)], 0, 600, (3, 7.0)),
    ([(-600, 1.0), (-300, 2.0)], 0, 600, (1, 2.0)),
    ([(-500, 1.0), (-100, 2.0)], 0, 200, (1, 2.0)),
    ([(5, 3.0)], 0, 600, (1, 3.0)),
    ([(0, 4800.0), (0, 4800.0)], 0, 600, (2, 9600.0)),
    ([(0, 0.1), (0, 0.2)], 0, 600, (2, 0.1 + 0.2)),
]
WINDOW_IDS = [
    "empty",
    "all-inside",
    "boundary-excluded",
    "shorter-window-query",
    "future-stamp-counted",
    "same-instant-same-amount",
    "float-amounts-exact",
]


@pytest.mark.parametrize(("events", "at", "window", "expected"), WINDOW_ROWS, ids=WINDOW_IDS)
async def test_window_stats(
    redis: RedisStores,
    events: list[tuple[float, float]],
    at: float,
    window: float,
    expected: tuple[int, float],
) -> None:
    replica_a, replica_b = redis.store(), redis.store()
    for i, (offset, amount) in enumerate(events):
        await (replica_a if i % 2 else replica_b).record_event("ctr:s", amount, T0 + offset, 600)
    assert await replica_a.window_stats("ctr:s", T0 + at, window) == expected


async def test_record_event_trims_and_sets_expiry_to_the_window(redis: RedisStores) -> None:
    store = redis.store()
    for i in range(5):
        await store.record_event("ctr:s", 1, T0 + i * 100, 150)
    key = redis.prefix + "ctr:ctr:s"
    assert await redis.raw.zcard(key) == 2
    assert 145_000 < await redis.raw.pttl(key) <= 150_000


# -- JSON records with compare-and-set -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored_version", "expected_version", "accepted"),
    [(None, 0, True), (None, 1, False), (1, 0, False), (1, 1, True), (1, 2, False), (3, 2, False)],
    ids=["create", "update-absent", "create-existing", "match", "ahead", "behind"],
)
async def test_cas_version_table(
    redis: RedisStores, stored_version: int | None, expected_version: int, accepted: bool
) -> None:
    store = redis.store()
    for _ in range(stored_version or 0):
        await store.put_json("r", {"n": 0}, 600)
    assert await store.compare_and_set_json("r", expected_version, {"n": 1}, 600) is accepted
    record = await store.get_json("r")
    if accepted:
        assert record == {"n": 1, "version": expected_version + 1}
        assert 595_000 < await redis.raw.pttl(redis.prefix + "json:r") <= 600_000
    else:
        assert record is None if stored_version is None else record == {"n": 0, "version": stored_version}


async def test_put_json_bumps_the_version_so_a_stale_cas_fails(redis: RedisStores) -> None:
    store = redis.store()
    await store.put_json("r", {"approvals": [{"sub": "carol"}], "ü": "ñ"}, 600)
    stale = await store.get_json("r")
    assert stale == {"approvals": [{"sub": "carol"}], "ü": "ñ", "version": 1}
    await store.put_json("r", {"n": 2}, 600)
    assert await store.compare_and_set_json("r", 1, {"n": 3}, 600) is False
    assert await store.get_json("r") == {"n": 2, "version": 2}


async def test_concurrent_cas_on_two_replicas_exactly_one_wins(redis: RedisStores) -> None:
    replica_a, replica_b = redis.store(), redis.store()
    await replica_a.put_json("approval", {"approvals": []}, 600)
    results = await asyncio.gather(
        *(
            (replica_a if i % 2 else replica_b).compare_and_set_json("approval", 1, {"approvals": [i]}, 600)
            for i in range(20)
        )
    )
    assert results.count(True) == 1
    record = await replica_b.get_json("approval")
    assert record is not None and record["version"] == 2 and record["approvals"] == [results.index(True)]


@pytest.mark.parametrize(
    "corrupt",
    [
        ("set", b"not a hash"),
        ("hset", {"v": b"1", "d": b"{not json"}),
        ("hset", {"v": b"1", "d": b"[1,2]"}),
        ("hset", {"d": b"{}"}),
    ],
    ids=["wrong-type", "bad-json", "not-an-object", "no-version"],
)
async def test_corrupt_stored_record_fails_closed(redis: RedisStores, corrupt: tuple[str, object]) -> None:
    errors = Errors()
    store = redis.store(on_error=errors)
    command, payload = corrupt
    key = redis.prefix + "json:r"
    if command == "set":
        await redis.raw.set(key, payload)  # type: ignore[arg-type]
    else:
        await redis.raw.hset(key, mapping=payload)  # type: ignore[arg-type]
    with pytest.raises(StateUnavailable) as caught:
        await store.get_json("r")
    assert caught.value.reason == "state_get_json_failed" and errors == ["get_json"]


# -- fail closed: unreachable, hung, restarted (S01, S02, S04, T17) ------------------------------------------

OPERATIONS: dict[str, Callable[[StateStore], Awaitable[object]]] = {
    "claim": lambda s: s.claim("txn:a", 60),
    "claim_all": lambda s: s.claim_all([("{a}:txn", 60), ("{a}:dpop", 60)]),
    "guard": lambda s: s.guard({"sub": "alice"}, [("{a}:dpop", 60)]),
    "is_revoked": lambda s: s.is_revoked({"txn": "a", "sub": "alice"}),
    "revoke": lambda s: s.revoke("sub", "alice", 60),
    "record_event": lambda s: s.record_event("ctr:s", 1, T0, 600),
    "window_stats": lambda s: s.window_stats("ctr:s", T0, 600),
    "reserve_events": lambda s: s.reserve_events([("ctr:s", 1, 600)], T0),
    "release_events": lambda s: s.release_events(Reservation(at=T0, events=(("ctr:s", "m1"),))),
    "put_json": lambda s: s.put_json("r", {"a": 1}, 60),
    "get_json": lambda s: s.get_json("r"),
    "compare_and_set_json": lambda s: s.compare_and_set_json("r", 0, {"a": 1}, 60),
    "delete_json": lambda s: s.delete_json("r"),
    "ping": lambda s: s.ping(),
}


def test_every_op_is_covered() -> None:
    assert set(OPERATIONS) == set(OPS)


async def assert_fails_closed(store: StateStore, op: str, errors: Errors, *, within: float) -> None:
    started = time.perf_counter()
    with pytest.raises(StateUnavailable) as caught:
        await OPERATIONS[op](store)
    elapsed = time.perf_counter() - started
    assert caught.value.reason == f"state_{op}_failed" and caught.value.status == 503
    assert errors[-1] == op
    assert elapsed < within, f"{op} took {elapsed:.3f}s"


@pytest.mark.parametrize("op", list(OPERATIONS), ids=list(OPERATIONS))
async def test_unreachable_redis_fails_closed_quickly(op: str) -> None:
    errors = Errors()
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_seconds=0.2, on_error=errors)
    try:
        await assert_fails_closed(store, op, errors, within=1.0)
        assert errors == [op]
    finally:
        await store.close()


@pytest.mark.slow
async def test_hung_redis_times_out_then_recovers() -> None:
    errors = Errors()
    async with throwaway_redis() as server:
        store = RedisStore(server.url, timeout_seconds=0.2, on_error=errors)
        try:
            assert await store.claim("before", 60)
            server.pause()  # SIGSTOP: connections stay open, nothing answers (S02)
            for op in ("claim", "claim_all", "ping"):
                await assert_fails_closed(store, op, errors, within=1.0)
            server.resume()
            assert await store.claim("after", 60) is True
            assert await store.claim("before", 60) is False
            # the timed-out scripts' late replies were never read by a later command (connections in step):
            # a claim_all that loses must say so, one that wins must say so
            assert await store.claim_all([("{h}:before", 60)]) is True
            assert await store.claim_all([("{h}:before", 60)]) is False
            assert await store.claim_all([("{h}:fresh", 60)]) is True
        finally:
            await store.close()


@pytest.mark.slow
async def test_killed_redis_fails_closed_and_the_same_store_recovers() -> None:
    errors = Errors()
    async with throwaway_redis() as server:
        store = RedisStore(server.url, timeout_seconds=0.2, on_error=errors)
        try:
            # Warm a pool of several connections, so that several stale ones exist after the restart.
            assert all(await asyncio.gather(*(store.claim(f"warm{i}", 60) for i in range(8))))
            await server.kill()
            for op in OPERATIONS:
                await assert_fails_closed(store, op, errors, within=1.0)
            await server.start()  # same port; no persistence, so earlier claims are gone (documented, S05)
            # Every call succeeds at once: stale pooled connections are replaced, the Lua cache is reloaded.
            assert all(await asyncio.gather(*(store.claim(f"after{i}", 60) for i in range(8))))
            assert await store.claim_all([("{r}:txn", 60), ("{r}:dpop", 60)]) is True
            assert await store.claim_all([("{r}:txn", 60), ("{r}:other", 60)]) is False
            assert await store.compare_and_set_json("r", 0, {"a": 1}, 60) is True
            await store.ping()
        finally:
            await store.close()


# -- TLS (rediss://) -----------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_rediss_verifies_the_server_certificate(tmp_path: Path) -> None:
    from tests.certfactory import make_pki

    pki = make_pki(tmp_path / "pki")
    port = free_port()
    tls_args = [
        "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(pki.backend), "--tls-key-file", str(pki.backend_key),
        "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "no",
    ]  # fmt: skip
    trusted_url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={pki.ca}"
    async with throwaway_redis(tls_args, port=port, ready_url=trusted_url):
        trusted = RedisStore(trusted_url, timeout_seconds=2.0)
        errors = Errors()
        untrusted = RedisStore(f"rediss://127.0.0.1:{port}/0", timeout_seconds=2.0, on_error=errors)
        try:
            assert await trusted.claim("tls", 60) is True
            assert await trusted.claim("tls", 60) is False
            with pytest.raises(StateUnavailable):  # system CAs do not know the dev CA: refused, not bypassed
                await untrusted.claim("tls2", 60)
            assert errors == ["claim"]
        finally:
            await trusted.close()
            await untrusted.close()


# -- cost ----------------------------------------------------------------------------------------------------


async def test_claim_cost(redis: RedisStores, capsys: pytest.CaptureFixture[str]) -> None:
    store = redis.store()
    await store.ping()  # connect first: measure claims, not the handshake
    n = 2000
    started = time.perf_counter()
    for i in range(n):
        await store.claim(f"seq{i}", 60)
    sequential_us = (time.perf_counter() - started) / n * 1e6

    async def worker(w: int) -> None:
        for i in range(n // 32):
            await store.claim(f"par{w}:{i}", 60)

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(32)))
    concurrent_us = (time.perf_counter() - started) / (n // 32 * 32) * 1e6
    with capsys.disabled():
        print(
            f"\nRedisStore.claim: {sequential_us:.0f} µs sequential, "
            f"{concurrent_us:.0f} µs wall per claim with 32 concurrent"
        )
    assert sequential_us < 20_000  # generous: shared machine; the figures that matter are printed


async def test_guard_is_atomic_across_replicas() -> None:
    from broker.state.base import Guarded

    async with redis_stores() as stores:
        one, two = stores.store(), stores.store()
        await one.revoke("sub", "mallory", 60)
        assert await two.guard({"sub": "mallory"}, [("x", 10)]) == Guarded(revoked="sub")
        results = await asyncio.gather(
            *(s.guard({"sub": "alice"}, [("d", 10), ("t", 10)]) for s in [one, two] * 10)
        )
        assert sum(r.ok for r in results) == 1
        assert all(r.replayed == 0 for r in results if not r.ok)
        assert await one.guard({}, [("t2", 10), ("t", 10)]) == Guarded(replayed=1)
