"""Counter reservations on a real Redis (CONTRACT §12): limits hold across replicas, releases are exact, outages
fail closed.

Shared Redis at 127.0.0.1:6379 with a unique key prefix per test (``tests/redisutil.py``: fails instead of
skipping under ``CI=true``); two ``RedisStore`` instances are two connection pools, i.e. two replicas. The
Cluster case starts its own throwaway 3-master cluster (``slow``): there a reservation is one script per slot.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.crc import key_slot

from broker.config.models import Counter
from broker.errors import StateUnavailable
from broker.policy.counters import Counters
from broker.state import StateStore
from broker.state.base import NO_RESERVATION
from broker.state.redis import RedisStore
from tests.redisutil import RedisStores, free_port, redis_stores, throwaway_cluster

pytestmark = pytest.mark.redis

T0 = 1_800_000_000.0


@pytest.fixture
async def redis() -> AsyncIterator[RedisStores]:
    async with redis_stores() as stores:
        yield stores


async def admit_under_limit(
    store: StateStore, scope: str, *, limit: int, amount: float = 0.0, budget: float | None = None
) -> bool:
    """One call deciding ``count >= limit`` (or ``sum + amount > budget``) on a reservation, as a policy does."""
    reservation = await store.reserve_events([(scope, amount, 600)], T0)
    count, total = reservation.seen[0]
    refused = count >= limit if budget is None else total + amount > budget
    if refused:
        await store.release_events(reservation)
    return not refused


# -- the operation -------------------------------------------------------------------------------------------


async def test_reserve_reads_before_adding_trims_and_arms_the_expiry(redis: RedisStores) -> None:
    replica_a, replica_b = redis.store(), redis.store()
    await replica_a.record_event("ctr:a", 7.0, T0 - 700, 600)  # out of the window: trimmed
    await replica_a.record_event("ctr:a", 10.0, T0 - 100, 600)
    await replica_a.record_event("ctr:a", 0.1, T0 + 5, 600)  # another replica's clock ahead: counted
    first = await replica_b.reserve_events([("ctr:a", 2.5, 600), ("ctr:b", 0.2, 60)], T0)
    assert first.seen == ((2, 10.0 + 0.1), (0, 0.0))
    second = await replica_a.reserve_events([("ctr:a", 1.0, 600)], T0)
    assert second.seen == ((3, 10.0 + 0.1 + 2.5),)
    assert await replica_a.window_stats("ctr:a", T0, 600) == (4, 10.0 + 0.1 + 2.5 + 1.0)
    assert await redis.raw.zcard(redis.prefix + "ctr:ctr:a") == 4
    assert 595_000 < await redis.raw.pttl(redis.prefix + "ctr:ctr:a") <= 600_000
    assert 55_000 < await redis.raw.pttl(redis.prefix + "ctr:ctr:b") <= 60_000


async def test_release_is_exact_idempotent_and_works_from_another_replica(redis: RedisStores) -> None:
    replica_a, replica_b = redis.store(), redis.store()
    await replica_a.record_event("ctr:a", 1.0, T0, 600)
    kept = await replica_a.reserve_events([("ctr:a", 1.0, 600)], T0)
    refused = await replica_a.reserve_events([("ctr:a", 1.0, 600), ("ctr:b", 5.0, 600)], T0)
    await replica_b.release_events(refused)
    await replica_b.release_events(refused)
    assert await replica_a.window_stats("ctr:a", T0, 600) == (2, 2.0)
    assert await replica_a.window_stats("ctr:b", T0, 600) == (0, 0.0)
    await replica_a.release_events(kept)
    assert await replica_a.window_stats("ctr:a", T0, 600) == (1, 1.0)
    assert await replica_a.reserve_events([], T0) == NO_RESERVATION
    await replica_a.release_events(NO_RESERVATION)


async def test_a_key_of_another_type_refuses_the_whole_reservation(redis: RedisStores) -> None:
    errors: list[str] = []
    store = redis.store(on_error=errors.append)
    await redis.raw.set(redis.prefix + "ctr:ctr:b", b"not a sorted set")
    with pytest.raises(StateUnavailable) as caught:
        await store.reserve_events([("ctr:a", 1.0, 600), ("ctr:b", 1.0, 600)], T0)
    assert caught.value.reason == "state_reserve_events_failed" and errors == ["reserve_events"]
    assert await redis.raw.exists(redis.prefix + "ctr:ctr:a") == 0  # checked before anything was added


# -- limits across replicas (CONTRACT §12) -------------------------------------------------------------------


async def test_twenty_concurrent_calls_on_two_replicas_against_a_limit_of_five_admit_exactly_five(
    redis: RedisStores,
) -> None:
    replica_a, replica_b = redis.store(), redis.store()
    admitted = await asyncio.gather(
        *(admit_under_limit(replica_a if i % 2 else replica_b, "ctr:lim", limit=5) for i in range(20))
    )
    assert admitted.count(True) == 5
    assert await replica_a.window_stats("ctr:lim", T0, 600) == (5, 0.0)


async def test_concurrent_calls_on_two_replicas_against_a_sum_budget_admit_exactly_what_fits(
    redis: RedisStores,
) -> None:
    replica_a, replica_b = redis.store(), redis.store()
    admitted = await asyncio.gather(
        *(
            admit_under_limit(
                replica_a if i % 2 else replica_b, "ctr:spent", limit=0, amount=30.0, budget=100
            )
            for i in range(20)
        )
    )
    assert admitted.count(True) == 3
    assert await replica_b.window_stats("ctr:spent", T0, 600) == (3, 90.0)


async def test_counters_reserve_on_two_replicas_admits_exactly_five(redis: RedisStores) -> None:
    counters = Counters(
        (
            Counter(name="calls", tools=["approveExpense"], window_seconds=600),
            Counter(name="spent", tools=["approveExpense"], window_seconds=600, sum="amount"),
            Counter(name="reads", tools=["getInvoice"], window_seconds=600),
        )
    )
    replica_a, replica_b = redis.store(), redis.store()

    async def call(store: StateStore) -> bool:
        stats, reservation = await counters.reserve(
            store,
            "approveExpense",
            {"amount": 2},
            read={"calls", "reads"},
            subject="alice",
            actor_id="agent",
            now=T0,
        )
        assert set(stats) == {"calls", "reads"}
        if stats["calls"]["count"] >= 5:
            await counters.release(store, reservation)
            return False
        return True

    admitted = await asyncio.gather(*(call(replica_a if i % 2 else replica_b) for i in range(20)))
    assert admitted.count(True) == 5
    fetched = await counters.fetch(
        replica_a, {"calls", "spent", "reads"}, subject="alice", actor_id="agent", now=T0
    )
    assert fetched == {
        "calls": {"count": 5, "sum": 0.0},
        "spent": {"count": 5, "sum": 10.0},
        "reads": {"count": 0, "sum": 0.0},
    }


# -- fail closed ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["reserve_events", "release_events"])
async def test_a_redis_that_is_down_fails_closed(redis: RedisStores, op: str) -> None:
    reservation = await redis.store().reserve_events([("ctr:a", 1.0, 600)], T0)
    errors: list[str] = []
    down = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_seconds=0.2, on_error=errors.append)
    try:
        with pytest.raises(StateUnavailable) as caught:
            if op == "reserve_events":
                await down.reserve_events([("ctr:a", 1.0, 600)], T0)
            else:
                await down.release_events(reservation)
        assert caught.value.reason == f"state_{op}_failed" and caught.value.status == 503
        assert errors == [op]
    finally:
        await down.close()


# -- Redis Cluster -------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_reservations_on_a_cluster_across_slots() -> None:
    async with throwaway_cluster(masters=3) as cluster:
        prefix = f"t:{uuid.uuid4().hex[:12]}:"
        replica_a = RedisStore(cluster.url, key_prefix=prefix, timeout_seconds=2.0)
        replica_b = RedisStore(cluster.url, key_prefix=prefix, timeout_seconds=2.0)
        raw: Any = cluster.raw()
        try:
            scopes = [f"ctr:lim{i}" for i in range(3)]
            slots = {key_slot((prefix + "ctr:" + scope).encode()) for scope in scopes}
            assert len(slots) > 1  # the reservation really spans slots (one script per slot)

            async def call(store: RedisStore) -> bool:
                reservation = await store.reserve_events([(scope, 1.0, 600) for scope in scopes], T0)
                # the rule reads the counter of the LAST script: each counter is exact on its own. (A rule over
                # several counters may refuse more than a single snapshot would: the counts of different slots
                # are taken at different moments, pending refusals included — the safe side.)
                if reservation.seen[-1][0] >= 5:
                    await store.release_events(reservation)
                    return False
                return True

            admitted = await asyncio.gather(*(call(replica_a if i % 2 else replica_b) for i in range(20)))
            assert admitted.count(True) == 5
            for scope in scopes:
                assert await replica_b.window_stats(scope, T0, 600) == (5, 5.0)
                assert 595_000 < await raw.pttl(prefix + "ctr:" + scope) <= 600_000
        finally:
            await replica_a.close()
            await replica_b.close()
            await raw.aclose()
