"""Counter reservations on MemoryStore (CONTRACT §12): a limit of N calls, or a sum, per window is never exceeded.

``reserve_events`` reads each counter and adds the call's event in one step, so concurrent callers see distinct
counts; ``release_events`` hands back exactly a refused call's events. The same limit rows run against Redis,
on two replicas, in ``tests/integration/test_counter_reservations_redis.py``. Time is injected (``now`` for
the counter windows, ``FakeClock`` for key expiry); concurrency is real ``asyncio.gather`` on one loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from broker.config.models import Counter
from broker.errors import StateUnavailable
from broker.policy.counters import Counters
from broker.state import MemoryStore, StateStore
from broker.state.base import NO_RESERVATION, OPS, Reservation, unavailable

T0 = 1_800_000_000.0  # epoch seconds for counter timestamps


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def make(max_entries: int = 1000) -> tuple[MemoryStore, FakeClock, list[str]]:
    clock, errors = FakeClock(), list[str]()
    return MemoryStore(max_entries=max_entries, clock=clock, on_error=errors.append), clock, errors


async def admit_under_limit(
    store: StateStore, scope: str, *, limit: int, amount: float = 0.0, budget: float | None = None
) -> bool:
    """One call deciding ``count >= limit`` (or ``sum + amount > budget``) on a reservation, as a policy does."""
    reservation = await store.reserve_events([(scope, amount, 600)], T0)
    await asyncio.sleep(0)  # let the other calls reserve before this one decides (the worst interleaving)
    count, total = reservation.seen[0]
    refused = count >= limit if budget is None else total + amount > budget
    if refused:
        await store.release_events(reservation)
    return not refused


# -- the store operation -------------------------------------------------------------------------------------


def test_the_new_ops_are_metric_labels() -> None:
    assert {"reserve_events", "release_events"} <= set(OPS)


async def test_reserve_returns_the_counts_before_this_event() -> None:
    store, _, _ = make()
    await store.record_event("ctr:a", 10.0, T0 - 100, 600)
    first = await store.reserve_events([("ctr:a", 2.5, 600), ("ctr:b", 1.0, 60)], T0)
    assert first.seen == ((1, 10.0), (0, 0.0))
    second = await store.reserve_events([("ctr:a", 4.0, 600)], T0)
    assert second.seen == ((2, 12.5),)
    # reserved events are ordinary events for the readers
    assert await store.window_stats("ctr:a", T0, 600) == (3, 16.5)
    assert await store.window_stats("ctr:b", T0, 60) == (1, 1.0)


# (event offsets from T0, reservation offset) -> count seen; window 600 s
WINDOW_ROWS = [
    ([-599.0, -300.0], 0.0, 2),
    ([-600.0, -300.0], 0.0, 1),
    ([-700.0], 0.0, 0),
    ([5.0], 0.0, 1),
    ([0.0, 0.0], 600.0, 0),
]


@pytest.mark.parametrize(
    ("events", "at", "expected"),
    WINDOW_ROWS,
    ids=["inside", "boundary-excluded", "expired", "future-stamp-counted", "window-passed"],
)
async def test_reserve_counts_the_window_at_the_injected_now(
    events: list[float], at: float, expected: int
) -> None:
    store, _, _ = make()
    for offset in events:
        await store.record_event("ctr:s", 1.0, T0 + offset, 600)
    reservation = await store.reserve_events([("ctr:s", 1.0, 600)], T0 + at)
    assert reservation.seen == ((expected, float(expected)),)
    assert len(store) == 1 + expected + 1  # what left the window was trimmed: the key, the rest, this event


async def test_reservation_key_expires_after_its_window_on_the_store_clock() -> None:
    store, clock, _ = make()
    await store.reserve_events([("ctr:s", 1.0, 600)], T0)
    clock.now += 599
    assert len(store) == 2
    clock.now += 1
    assert len(store) == 0


async def test_release_removes_exactly_the_reserved_events_and_is_idempotent() -> None:
    store, _, _ = make()
    await store.record_event("ctr:a", 1.0, T0, 600)  # same instant, same amount as the reservation below
    kept = await store.reserve_events([("ctr:a", 1.0, 600)], T0)
    refused = await store.reserve_events([("ctr:a", 1.0, 600), ("ctr:b", 5.0, 600)], T0)
    assert await store.window_stats("ctr:a", T0, 600) == (3, 3.0)
    await store.release_events(refused)
    assert await store.window_stats("ctr:a", T0, 600) == (2, 2.0)
    assert await store.window_stats("ctr:b", T0, 600) == (0, 0.0)
    await store.release_events(refused)  # idempotent: the others stay
    assert await store.window_stats("ctr:a", T0, 600) == (2, 2.0)
    assert len(store) == 2 + 2  # two keys (b now empty until it expires), two events
    await store.release_events(kept)
    assert await store.window_stats("ctr:a", T0, 600) == (1, 1.0)


async def test_release_after_the_events_left_the_window_does_nothing() -> None:
    store, clock, _ = make()
    reservation = await store.reserve_events([("ctr:s", 1.0, 60)], T0)
    clock.now += 60  # the key expired
    await store.release_events(reservation)
    assert len(store) == 0


async def test_empty_reservation_touches_nothing() -> None:
    store, _, _ = make(max_entries=1)
    assert await store.reserve_events([], T0) == NO_RESERVATION == Reservation()
    await store.release_events(NO_RESERVATION)
    assert len(store) == 0


@pytest.mark.parametrize(
    ("items", "now"),
    [
        ([("ctr:s", 1.0, 600), ("ctr:s", 2.0, 600)], T0),
        ([("ctr:s", float("nan"), 600)], T0),
        ([("ctr:s", 1.0, 0)], T0),
        ([("ctr s", 1.0, 600)], T0),
        ([("ctr:s", 1.0, 600)], float("inf")),
    ],
    ids=["duplicate-scope", "nan-amount", "zero-window", "bad-key", "infinite-now"],
)
async def test_reservation_caller_bugs_are_value_errors(
    items: Sequence[tuple[str, float, float]], now: float
) -> None:
    store, _, errors = make()
    with pytest.raises(ValueError):
        await store.reserve_events(items, now)
    assert len(store) == 0 and errors == []


async def test_release_of_something_else_is_a_value_error() -> None:
    store, _, _ = make()
    with pytest.raises(ValueError):
        await store.release_events(((1, 1.0),))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await store.release_events(Reservation(events=(("ctr:s", ""),)))


async def test_reservations_count_against_capacity_all_or_nothing() -> None:
    store, _, errors = make(max_entries=4)
    await store.reserve_events([("ctr:a", 1.0, 600)], T0)  # 1 key + 1 event
    with pytest.raises(StateUnavailable) as caught:
        await store.reserve_events([("ctr:a", 1.0, 600), ("ctr:b", 1.0, 600)], T0)  # needs 3 more
    assert caught.value.reason == "state_reserve_events_failed" and errors == ["reserve_events"]
    assert await store.window_stats("ctr:a", T0, 600) == (1, 1.0)  # nothing of the refused one was added
    assert len(store) == 2
    fits = await store.reserve_events([("ctr:a", 1.0, 600)], T0)
    assert len(store) == 3
    await store.release_events(fits)
    assert len(store) == 2  # a release frees its capacity


# -- limits under concurrency (CONTRACT §12) -----------------------------------------------------------------


async def test_twenty_concurrent_calls_against_a_limit_of_five_admit_exactly_five() -> None:
    store, _, _ = make()
    admitted = await asyncio.gather(*(admit_under_limit(store, "ctr:lim", limit=5) for _ in range(20)))
    assert admitted.count(True) == 5
    assert await store.window_stats("ctr:lim", T0, 600) == (5, 0.0)  # the 15 refused ones were released


async def test_each_concurrent_reservation_sees_a_distinct_count() -> None:
    store, _, _ = make()
    seen = await asyncio.gather(*(store.reserve_events([("ctr:c", 1.0, 600)], T0) for _ in range(20)))
    assert sorted(r.seen[0][0] for r in seen) == list(range(20))


async def test_concurrent_calls_against_a_sum_budget_admit_exactly_what_fits() -> None:
    store, _, _ = make()
    admitted = await asyncio.gather(
        *(admit_under_limit(store, "ctr:spent", limit=0, amount=30.0, budget=100.0) for _ in range(10))
    )
    assert admitted.count(True) == 3
    assert await store.window_stats("ctr:spent", T0, 600) == (3, 90.0)


# -- Counters.reserve ----------------------------------------------------------------------------------------

COUNTERS = Counters(
    (
        Counter(name="calls", tools=["approveExpense"], window_seconds=600),
        Counter(name="spent", tools=["approveExpense"], window_seconds=86400, sum="amount"),
        Counter(name="reads", tools=["getInvoice"], window_seconds=600),
        Counter(name="everything", tools=["*"], scope="subject_actor", window_seconds=600),
    )
)


async def reserve_approval(
    store: StateStore, amount: object, read: frozenset[str], subject: str = "alice"
) -> tuple[dict[str, dict[str, Any]], Reservation]:
    return await COUNTERS.reserve(
        store, "approveExpense", {"amount": amount}, read=read, subject=subject, actor_id="agent", now=T0
    )


async def test_counters_reserve_fed_read_and_read_only_counters() -> None:
    store, _, _ = make()
    await COUNTERS.record(store, "getInvoice", {}, subject="alice", actor_id="agent", now=T0 - 10)
    read = frozenset({"calls", "spent", "reads"})
    stats, first = await reserve_approval(store, 120, read)
    # fed and read: before this call; read-only (getInvoice feeds it): as is; fed-only: reserved, not returned
    assert stats == {
        "calls": {"count": 0, "sum": 0.0},
        "spent": {"count": 0, "sum": 0.0},
        "reads": {"count": 1, "sum": 0.0},
    }
    assert len(first.events) == 3  # calls, spent, everything
    stats, _ = await reserve_approval(store, 80.5, read)
    assert stats["calls"] == {"count": 1, "sum": 0.0} and stats["spent"] == {"count": 1, "sum": 120.0}
    assert stats["reads"] == {"count": 1, "sum": 0.0}  # reading does not count
    fetched = await COUNTERS.fetch(store, {"everything", "spent"}, subject="alice", actor_id="agent", now=T0)
    assert fetched == {"everything": {"count": 3, "sum": 0.0}, "spent": {"count": 2, "sum": 200.5}}
    await COUNTERS.release(store, first)
    fetched = await COUNTERS.fetch(store, {"calls", "spent"}, subject="alice", actor_id="agent", now=T0)
    assert fetched == {"calls": {"count": 1, "sum": 0.0}, "spent": {"count": 1, "sum": 80.5}}


async def test_counters_reserve_keeps_subjects_apart_and_ignores_non_numeric_amounts() -> None:
    store, _, _ = make()
    await reserve_approval(store, "120", frozenset())
    stats, _ = await reserve_approval(store, True, frozenset({"calls", "spent"}))
    assert stats == {"calls": {"count": 1, "sum": 0.0}, "spent": {"count": 1, "sum": 0.0}}
    stats, _ = await reserve_approval(store, 5, frozenset({"calls"}), subject="bob")
    assert stats == {"calls": {"count": 0, "sum": 0.0}}


async def test_counters_reserve_for_a_tool_that_feeds_nothing_reserves_nothing() -> None:
    store, _, _ = make()
    unfed = Counters((Counter(name="calls", tools=["approveExpense"], window_seconds=600),))
    stats, reservation = await unfed.reserve(
        store, "getInvoice", {}, read={"calls"}, subject="alice", actor_id=None, now=T0
    )
    assert stats == {"calls": {"count": 0, "sum": 0.0}} and reservation == NO_RESERVATION
    assert len(store) == 0


async def test_counters_reserve_twenty_concurrent_calls_admit_exactly_five() -> None:
    store, _, _ = make()

    async def call() -> bool:
        stats, reservation = await reserve_approval(store, 1, frozenset({"calls"}))
        await asyncio.sleep(0)  # every call reserves before any decides
        if stats["calls"]["count"] >= 5:  # the policy rule, e.g. deny when counters.calls.count >= 5
            await COUNTERS.release(store, reservation)
            return False
        return True

    admitted = await asyncio.gather(*(call() for _ in range(20)))
    assert admitted.count(True) == 5
    fetched = await COUNTERS.fetch(store, {"calls"}, subject="alice", actor_id="agent", now=T0)
    assert fetched == {"calls": {"count": 5, "sum": 0.0}}


class ReadsFail(MemoryStore):
    """A store whose plain reads fail (as a Redis timeout would) while reservations work."""

    async def window_stats(self, scope: str, now: float, window_seconds: float) -> tuple[int, float]:
        raise unavailable("window_stats")


async def test_counters_reserve_releases_its_events_when_a_read_fails() -> None:
    store = ReadsFail()
    with pytest.raises(StateUnavailable) as caught:
        await reserve_approval(store, 10, frozenset({"calls", "reads"}))
    assert caught.value.reason == "state_window_stats_failed"
    # nothing stays counted for the refused call: the next reservation sees empty counters
    stats, _ = await reserve_approval(store, 10, frozenset({"calls", "spent"}))
    assert stats == {"calls": {"count": 0, "sum": 0.0}, "spent": {"count": 0, "sum": 0.0}}


async def test_counters_reserve_fails_closed_when_the_store_is_full() -> None:
    store, _, errors = make(max_entries=2)
    with pytest.raises(StateUnavailable) as caught:
        await reserve_approval(store, 10, frozenset({"calls"}))
    assert caught.value.reason == "state_reserve_events_failed" and errors == ["reserve_events"]
    assert len(store) == 0


async def test_window_sums_stay_exact_as_events_come_and_go() -> None:
    """The memory store keeps each counter's sum as events are added, trimmed and released (O(expired), not
    O(window)); whatever the sequence, it equals the sum recomputed from the events in the window."""
    import random

    rng = random.Random(7)
    store = MemoryStore()
    now, window = 1_000.0, 50.0
    kept: list[tuple[float, float, Any]] = []  # (time, amount, reservation)
    for _ in range(2_000):
        now += rng.choice((0.0, 0.5, 3.0))
        amount = float(rng.randrange(0, 10_000))
        reservation = await store.reserve_events([("ctr:exact", amount, window)], now)
        (seen,) = reservation.seen
        live = [(t, a) for t, a, _ in kept if t > now - window]
        assert seen == (len(live), float(sum(a for _, a in live)))
        kept.append((now, amount, reservation))
        if rng.random() < 0.3:  # a refused call hands its place back
            victim = kept.pop(rng.randrange(len(kept)))
            await store.release_events(victim[2])
        assert await store.window_stats("ctr:exact", now + 10, window) == (
            len([1 for t, _, _ in kept if t > now + 10 - window]),
            float(sum(a for t, a, _ in kept if t > now + 10 - window)),
        )
