"""Call-pattern counters (CONTRACT §6 ``counters``): sliding windows of *allowed* invocations in the state store.

A counter counts allowed invocations of its tools per scope (the subject, the actor, or the pair) over
``window_seconds`` and, with ``sum``, adds up one numeric argument (e.g. ``amount``). Policies read them as
``counters.<name>.count`` and ``counters.<name>.sum``. Only what a tool's rules read is fetched; every fetch and
record goes to the shared store, so limits hold across workers and replicas.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.config.models import Counter
from broker.state.base import StateStore, hash_key_part


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
        """Count one allowed invocation of ``tool`` in every counter that lists it."""
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
