"""Call-pattern counters (CONTRACT §6 ``counters``): sliding windows of *allowed* invocations in the state store.

A counter counts allowed invocations of its tools per scope (the subject, the actor, or the pair) over
``window_seconds`` and, with ``sum``, adds up one numeric argument (e.g. ``amount``). Policies read them as
``counters.<name>.count`` and ``counters.<name>.sum``. Only what a tool's rules read is fetched; every fetch and
record goes to the shared store, so limits hold across workers and replicas.

Deciding a limit on :meth:`Counters.fetch` and counting the call afterwards with :meth:`Counters.record` lets
parallel calls (or tokens minted ahead and invoked together) all read the same count and all pass. An
invocation therefore uses :meth:`Counters.reserve` (CONTRACT §12): its own event is added in the same atomic
store step that reads the counters it feeds, so concurrent calls see distinct counts (0, 1, 2, ...) and a rule
``counters.x.count >= 5`` lets exactly 5 through; a call refused after reserving hands its events back with
:meth:`Counters.release`. What the policy sees is unchanged: ``count`` and ``sum`` are the prior calls in the
window, without this one. ``fetch`` stays for discovery (nothing is counted there).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.config.models import Counter
from broker.state.base import Reservation, StateStore, hash_key_part


@dataclass(frozen=True)
class Counters:
    counters: Sequence[Counter]

    def _scope(self, counter: Counter, subject: str, actor_id: str | None) -> str:
        who = {
            "subject": subject,
            "actor": actor_id or "",
            "subject_actor": f"{subject}|{actor_id or ''}",
        }[counter.scope]
        # the window is part of the scope: a scope has one window (broker.state.base)
        return f"ctr:{counter.name}:{counter.window_seconds}:{hash_key_part(who)}"

    async def fetch(
        self, store: StateStore, names: Collection[str], *, subject: str, actor_id: str | None, now: float
    ) -> dict[str, dict[str, Any]]:
        """``{name: {"count", "sum"}}`` for the named counters (concurrently; a store failure refuses)."""
        wanted = [c for c in self.counters if c.name in names]
        if not wanted:
            return {}
        stats = await asyncio.gather(
            *(store.window_stats(self._scope(c, subject, actor_id), now, c.window_seconds) for c in wanted)
        )
        return {
            c.name: {"count": count, "sum": total} for c, (count, total) in zip(wanted, stats, strict=True)
        }

    def feeds(self, tool: str) -> frozenset[str]:
        """The names of the counters an execution of ``tool`` adds to."""
        return frozenset(c.name for c in self.counters if tool in c.tools or "*" in c.tools)

    async def reserve(
        self,
        store: StateStore,
        tool: str,
        arguments: Mapping[str, Any],
        *,
        read: Collection[str],
        subject: str,
        actor_id: str | None,
        now: float,
    ) -> tuple[dict[str, dict[str, Any]], Reservation]:
        """Count this invocation of ``tool`` in every counter it feeds and read the counters named in ``read``.

        The fed counters are reserved in ONE :meth:`StateStore.reserve_events` call (the read and the add are
        one atomic step, so concurrent calls each see a distinct count); counters read but not fed by ``tool``
        come from :meth:`StateStore.window_stats`, concurrently. Returns ``{name: {"count", "sum"}}`` for the
        names in ``read`` — the values BEFORE this call — and the reservation, which the caller must hand to
        :meth:`release` if the call is then refused. A store failure raises
        :class:`~broker.errors.StateUnavailable` (the call is refused) after releasing what was reserved.
        """
        fed = [c for c in self.counters if tool in c.tools or "*" in c.tools]
        fed_names = {c.name for c in fed}
        read_only = [c for c in self.counters if c.name in read and c.name not in fed_names]
        items = [
            (self._scope(c, subject, actor_id), _amount(arguments, c.sum), float(c.window_seconds))
            for c in fed
        ]

        async def read_only_stats() -> list[tuple[int, float]]:
            scopes = [(self._scope(c, subject, actor_id), c.window_seconds) for c in read_only]
            return list(await asyncio.gather(*(store.window_stats(s, now, w) for s, w in scopes)))

        reserved, fetched = await asyncio.gather(
            store.reserve_events(items, now), read_only_stats(), return_exceptions=True
        )
        if isinstance(fetched, BaseException):
            if isinstance(reserved, Reservation):
                # a read failed after the reservation went through: the refused call must not stay counted
                # (if the release fails too, the events stay: over-counting, the safe side)
                with contextlib.suppress(Exception):
                    await store.release_events(reserved)
            raise fetched
        if isinstance(reserved, BaseException):
            raise reserved
        stats: dict[str, dict[str, Any]] = {}
        for c, (count, total) in zip(fed, reserved.seen, strict=True):
            if c.name in read:
                stats[c.name] = {"count": count, "sum": total}
        for c, (count, total) in zip(read_only, fetched, strict=True):
            stats[c.name] = {"count": count, "sum": total}
        return stats, reserved

    async def release(self, store: StateStore, reservation: Reservation) -> None:
        """Hand back the events of a reservation whose call was refused (idempotent)."""
        await store.release_events(reservation)

    async def record(
        self,
        store: StateStore,
        tool: str,
        arguments: Mapping[str, Any],
        *,
        subject: str,
        actor_id: str | None,
        now: float,
    ) -> None:
        """Count one allowed invocation of ``tool`` in every counter that lists it.

        Not for a call whose limits were decided with :meth:`reserve` (it is already counted): counting after
        the decision is what lets parallel calls exceed a limit (module docstring)."""
        applicable = [c for c in self.counters if tool in c.tools or "*" in c.tools]
        await asyncio.gather(
            *(
                store.record_event(
                    self._scope(c, subject, actor_id), _amount(arguments, c.sum), now, c.window_seconds
                )
                for c in applicable
            )
        )


def _amount(arguments: Mapping[str, Any], name: str | None) -> float:
    if name is None:
        return 0.0
    value = arguments.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return float(value)
