"""In-process state store: the embedded default for one process (``broker run`` without ``--workers``).

It holds only within this process: several workers or replicas need :class:`broker.state.redis.RedisStore`
(CONTRACT §1: ``--workers N>1`` requires ``state.backend: redis``), otherwise a txn token or DPoP proof
refused here would be accepted by a sibling.

Every operation runs without an ``await`` in its body, so on one event loop it is atomic by construction (the
check-and-set of S03 cannot interleave). Expiry uses an injectable monotonic ``clock`` (wall-clock steps must
not shorten a replay window) and a min-heap of ``(expires_at, key)``, drained lazily at the start of each
operation: O(log n) per write, O(1) per read when nothing has expired. Cost: about 1 µs per
:meth:`MemoryStore.claim` (see the report of ``tests/unit/test_state_memory.py::test_claim_cost``).

:meth:`MemoryStore.reserve_events` is atomic the same way: every counter of a reservation is read and
written with no ``await`` in between, so concurrent tasks each see a distinct count (CONTRACT §12).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

from broker.state.base import (
    GUARD_OK,
    KEY_PATTERN,
    MAX_TTL_SECONDS,
    NO_RESERVATION,
    ErrorCallback,
    Guarded,
    Op,
    Reservation,
    StateStore,
    check_finite,
    check_items,
    check_key,
    check_prefix,
    check_reservation,
    check_reservation_items,
    check_ttl,
    check_version,
    decode_record,
    encode_record,
    revocation_key,
    unavailable,
)

DEFAULT_MAX_ENTRIES: Final = 1_000_000
_key_ok: Final = KEY_PATTERN.fullmatch
_INF: Final = float("inf")


class _Claimed:
    """Marker value of a claimed key (``claim``, ``claim_all``, ``revoke``)."""


_CLAIMED: Final = _Claimed()


@dataclass(slots=True)
class _Record:
    version: int
    text: str  # stored as JSON text so that callers never share a mutable dict with the store


@dataclass(slots=True)
class _Events:
    # sorted (timestamp, amount, member) triples; bisect keeps insertion O(log n) + shift even if clocks
    # disagree. ``member`` is "" for record_event and a unique id for reserve_events (what release removes).
    items: list[tuple[float, float, str]] = field(default_factory=list)
    #: the sum of the items' amounts, kept as they come and go, so that a window's sum costs O(expired events),
    #: not O(window): a busy counter (thousands of calls in its window) stays cheap. Amounts are summed in
    #: floating point: exact for whole amounts below 2**53, within rounding for fractional ones.
    total: float = 0.0

    def trim(self, cut: float) -> int:
        """Drop the events stamped at or before ``cut``; returns how many."""
        end = bisect.bisect_right(self.items, (cut, _INF))
        if end:
            self.total -= sum(amount for _, amount, _ in self.items[:end])
            del self.items[:end]
            if not self.items:
                self.total = 0.0  # no drift carried over an empty window
        return end

    def add(self, item: tuple[float, float, str]) -> None:
        bisect.insort(self.items, item)
        self.total += item[1]

    def remove(self, index: int) -> None:
        self.total -= self.items[index][1]
        del self.items[index]
        if not self.items:
            self.total = 0.0

    def stats_after(self, cut: float) -> tuple[int, float]:
        """(count, sum) of the events stamped after ``cut`` (without dropping the others)."""
        start = bisect.bisect_right(self.items, (cut, _INF))
        if not start:
            return len(self.items), self.total
        return len(self.items) - start, self.total - sum(amount for _, amount, _ in self.items[:start])


_Value = _Claimed | _Record | _Events


class MemoryStore(StateStore):
    """Bounded in-memory :class:`StateStore`.

    ``max_entries`` bounds keys plus counter events. When it is reached, writes are REFUSED with
    :class:`broker.errors.StateUnavailable` instead of evicting: evicting a live replay entry (a ``jti`` or a
    consumed ``txn``) would let that token be used again, and an attacker who can mint unique proofs (S07)
    could flush a victim's entry on purpose. Refusing degrades availability only, and only until TTLs free
    space. A claim costs about 300 bytes (43-character digest keys), so the default bound is near 300 MB.
    """

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        key_prefix: str = "broker:",
        clock: Callable[[], float] = time.monotonic,
        on_error: ErrorCallback | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._max_entries = max_entries
        self._prefix = check_prefix(key_prefix)
        self._claim_prefix = self._prefix + "claim:"
        self._clock = clock
        self._on_error = on_error
        self._data: dict[str, tuple[float, _Value]] = {}
        self._heap: list[tuple[float, str]] = []
        self._event_count = 0
        self._member_ids = itertools.count(1)  # reserved event ids: unique within this store

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Live entries counted against ``max_entries`` (keys plus counter events)."""
        self._expire(self._clock())
        return len(self._data) + self._event_count

    def _expire(self, now: float) -> None:
        heap, data = self._heap, self._data
        while heap and heap[0][0] <= now:
            expires_at, key = heapq.heappop(heap)
            entry = data.get(key)
            # A rewritten key leaves its old heap item behind; only the item of the live expiry drops the key.
            if entry is not None and entry[0] == expires_at:
                self._drop(key, entry[1])

    def _drop(self, key: str, value: _Value) -> None:
        del self._data[key]
        if isinstance(value, _Events):
            self._event_count -= len(value.items)

    def _set(self, key: str, expires_at: float, value: _Value) -> None:
        self._data[key] = (expires_at, value)
        heapq.heappush(self._heap, (expires_at, key))
        # Rewrites (records, counters) leave stale heap items; rebuild when they outnumber live ones.
        if len(self._heap) > 2 * len(self._data) + 1024:
            self._heap = [(exp, k) for k, (exp, _) in self._data.items()]
            heapq.heapify(self._heap)

    def _reserve(self, op: Op, extra: int) -> None:
        if len(self._data) + self._event_count + extra > self._max_entries:
            self._fail(op, "state store full")

    def _fail(self, op: Op, description: str) -> NoReturn:
        if self._on_error is not None:
            self._on_error(op)
        raise unavailable(op, description)

    def _live(self, key: str) -> _Value | None:
        entry = self._data.get(key)
        return None if entry is None else entry[1]

    # -- single use and replay -------------------------------------------------------------------------------

    async def claim(self, key: str, ttl_seconds: float) -> bool:
        # The hot path of every request (DPoP jti), kept near 1 µs: the common case of check_key/check_ttl,
        # _expire, _reserve and _set is inlined; the helpers still raise for anything unusual.
        if type(key) is not str or _key_ok(key) is None:
            check_key(key)
        ttl = ttl_seconds
        if (type(ttl) is not float and type(ttl) is not int) or not 0 < ttl <= MAX_TTL_SECONDS:
            ttl = check_ttl(ttl)
        full_key = self._claim_prefix + key
        now = self._clock()
        heap, data = self._heap, self._data
        if heap and heap[0][0] <= now:
            self._expire(now)
        if full_key in data:
            return False
        if len(data) + self._event_count >= self._max_entries:
            self._fail("claim", "state store full")
        expires_at = now + ttl
        data[full_key] = (expires_at, _CLAIMED)
        heapq.heappush(heap, (expires_at, full_key))
        return True

    async def claim_all(self, items: Sequence[tuple[str, float]]) -> bool:
        checked = [(self._prefix + "claim:" + key, ttl) for key, ttl in check_items(items)]
        now = self._clock()
        self._expire(now)
        if any(key in self._data for key, _ in checked):
            return False
        self._reserve("claim_all", len(checked))
        for key, ttl in checked:
            self._set(key, now + ttl, _CLAIMED)
        return True

    async def guard(self, revocations: Mapping[str, str], claims: Sequence[tuple[str, float]]) -> Guarded:
        rev_keys = [(kind, self._prefix + revocation_key(kind, value)) for kind, value in revocations.items()]
        checked = [(self._prefix + "claim:" + key, ttl) for key, ttl in check_items(claims)] if claims else []
        now = self._clock()
        self._expire(now)
        for kind, key in rev_keys:
            if key in self._data:
                return Guarded(revoked=kind)
        for index, (key, _) in enumerate(checked):
            if key in self._data:
                return Guarded(replayed=index)
        if checked:
            self._reserve("guard", len(checked))
            for key, ttl in checked:
                self._set(key, now + ttl, _CLAIMED)
        return GUARD_OK

    # -- revocations -----------------------------------------------------------------------------------------

    async def is_revoked(self, kinds: Mapping[str, str]) -> str | None:
        keys = [(kind, self._prefix + revocation_key(kind, value)) for kind, value in kinds.items()]
        self._expire(self._clock())
        for kind, key in keys:
            if key in self._data:
                return kind
        return None

    async def revoke(self, kind: str, value: str, ttl_seconds: float) -> None:
        key = self._prefix + revocation_key(kind, value)
        ttl = check_ttl(ttl_seconds)
        now = self._clock()
        self._expire(now)
        entry = self._data.get(key)
        if entry is None:
            self._reserve("revoke", 1)
        elif entry[0] >= now + ttl:
            return  # never shorten a revocation
        self._set(key, now + ttl, _CLAIMED)

    # -- sliding-window counters -----------------------------------------------------------------------------

    async def record_event(self, scope: str, amount: float, now: float, window_seconds: float) -> None:
        key = self._prefix + "ctr:" + check_key(scope)
        amount = check_finite("amount", amount)
        now = check_finite("now", now)
        window = check_ttl(window_seconds)
        clock_now = self._clock()
        self._expire(clock_now)
        value = self._live(key)
        if value is not None and not isinstance(value, _Events):
            self._fail("record_event", "state key holds another type")
        events = value if isinstance(value, _Events) else _Events()
        self._event_count -= events.trim(now - window)
        self._reserve("record_event", 1 + (value is None))
        events.add((now, amount, ""))
        self._event_count += 1
        self._set(key, clock_now + window, events)

    async def reserve_events(self, items: Sequence[tuple[str, float, float]], now: float) -> Reservation:
        checked = check_reservation_items(items)
        now = check_finite("now", now)
        if not checked:
            return NO_RESERVATION
        clock_now = self._clock()
        self._expire(clock_now)
        keys = [self._prefix + "ctr:" + scope for scope, _, _ in checked]
        # Everything that can refuse (a key of another type, capacity) is checked before anything changes, so a
        # refused reservation adds nothing. No await below: the read and the add of every counter are one step.
        values = [self._live(key) for key in keys]
        if any(value is not None and not isinstance(value, _Events) for value in values):
            self._fail("reserve_events", "state key holds another type")
        series = [value if isinstance(value, _Events) else _Events() for value in values]
        for events, (_, _, window) in zip(series, checked, strict=True):
            self._event_count -= events.trim(now - window)
        self._reserve("reserve_events", len(checked) + sum(value is None for value in values))
        seen: list[tuple[int, float]] = []
        reserved: list[tuple[str, str]] = []
        for key, events, (scope, amount, window) in zip(keys, series, checked, strict=True):
            # after the trim every event left is in (now - window, +inf), as window_stats counts them
            seen.append((len(events.items), float(events.total)))
            member = f"m{next(self._member_ids)}"
            events.add((now, amount, member))
            self._event_count += 1
            self._set(key, clock_now + window, events)
            reserved.append((scope, member))
        return Reservation(seen=tuple(seen), at=now, events=tuple(reserved))

    async def release_events(self, reservation: Reservation) -> None:
        events = check_reservation(reservation)
        self._expire(self._clock())
        at = reservation.at
        for scope, member in events:
            key = self._prefix + "ctr:" + scope
            value = self._live(key)
            if not isinstance(value, _Events):
                continue  # expired, or never there: nothing of this reservation is left to remove
            # the event sits among those stamped ``at``; (at,) sorts before every (at, amount, member)
            index = bisect.bisect_left(value.items, (at,))
            while index < len(value.items) and value.items[index][0] == at:
                if value.items[index][2] == member:
                    value.remove(index)
                    self._event_count -= 1
                    break
                index += 1

    async def window_stats(self, scope: str, now: float, window_seconds: float) -> tuple[int, float]:
        key = self._prefix + "ctr:" + check_key(scope)
        now = check_finite("now", now)
        window = check_ttl(window_seconds)
        self._expire(self._clock())
        value = self._live(key)
        if value is None:
            return 0, 0.0
        if not isinstance(value, _Events):
            self._fail("window_stats", "state key holds another type")
        count, total = value.stats_after(now - window)
        return count, float(total)

    # -- JSON records ----------------------------------------------------------------------------------------

    def _current_record(self, op: Op, key: str) -> _Record | None:
        value = self._live(key)
        if value is None or isinstance(value, _Record):
            return value
        self._fail(op, "state key holds another type")

    async def put_json(self, key: str, value: Mapping[str, Any], ttl_seconds: float) -> None:
        full_key = self._prefix + "json:" + check_key(key)
        text = encode_record(value)
        ttl = check_ttl(ttl_seconds)
        now = self._clock()
        self._expire(now)
        current = self._current_record("put_json", full_key)
        if current is None:
            self._reserve("put_json", 1)
        version = 1 if current is None else current.version + 1
        self._set(full_key, now + ttl, _Record(version, text))

    async def get_json(self, key: str) -> dict[str, Any] | None:
        full_key = self._prefix + "json:" + check_key(key)
        self._expire(self._clock())
        current = self._current_record("get_json", full_key)
        return None if current is None else decode_record(current.text, current.version)

    async def compare_and_set_json(
        self, key: str, expected_version: int, value: Mapping[str, Any], ttl_seconds: float
    ) -> bool:
        full_key = self._prefix + "json:" + check_key(key)
        expected = check_version(expected_version)
        text = encode_record(value)
        ttl = check_ttl(ttl_seconds)
        now = self._clock()
        self._expire(now)
        current = self._current_record("compare_and_set_json", full_key)
        if (0 if current is None else current.version) != expected:
            return False
        if current is None:
            self._reserve("compare_and_set_json", 1)
        self._set(full_key, now + ttl, _Record(expected + 1, text))
        return True

    async def delete_json(self, key: str) -> bool:
        full_key = self._prefix + "json:" + check_key(key)
        self._expire(self._clock())
        current = self._current_record("delete_json", full_key)
        if current is None:
            return False
        self._drop(full_key, current)  # its heap item stays behind and is skipped when it comes due
        return True

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()
        self._heap.clear()
        self._event_count = 0
