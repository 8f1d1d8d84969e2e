"""MCP session bindings (2025-03-26 … 2025-11-25 era): which (subject, actor) opened which upstream session.

An ``Mcp-Session-Id`` is a routing handle, never a credential: every request still authenticates on its own
(CONTRACT §7), and a session id is accepted only from the (subject, actor) that opened it through the broker,
on the same MCP server (HOSTILE P25). Anyone else presenting it is answered exactly as for an unknown session
(``404``), so session ids of other agents cannot even be confirmed.

Bindings live in the state store (shared by every worker and replica; created with compare-and-set, so an
upstream that hands out an id already bound to someone else is refused) with a small per-process cache in
front, trusted for :data:`CACHE_SECONDS` (a binding closed or evicted on another replica may still be honoured
here that long; on the replica that closed or evicted it, at once).

**Per-principal quota** (CONTRACT §12 "Shared state has per-principal quotas"). Each (server, subject, actor)
holds at most ``limit`` sessions (``mcp_servers[].max_sessions_per_principal``, default
:data:`DEFAULT_SESSIONS_PER_PRINCIPAL`): an index record ``mcp_sessions:<H(server, subject, actor)>`` lists
its session keys in the order they were opened. Opening one more **evicts the oldest**: its binding is deleted,
so its later requests get ``404 Session not found`` exactly as an unknown session. Eviction rather than a
refusal because clients that crash or never send DELETE leak sessions, and a refusal would lock such an agent
out until its sessions expire. A DELETE'd session stays in the index (its closed marker is one of the
principal's entries) until evicted.

Atomicity: the index is updated with compare-and-set on its version (re-read and retried on conflict), so
concurrent ``initialize`` calls of one principal, on any number of replicas, never overshoot the limit: each
admission sees the others'. The binding is written first (compare-and-set: a reused id is refused), then the
index: a concurrent admission can only evict a binding that exists, and an evicted binding is deleted BEFORE
the index that drops it is written, so no session outside the index stays alive. What a principal holds in the
store is therefore its index record and at most ``limit`` binding records (live, or closed markers of DELETE'd
sessions). Exceptions, all on the safe side or bounded: an admission that fails (store error, 429) deletes its
binding again — only if that delete fails too (the store is down) does one binding stay uncounted, for an
``initialize`` answered with an error whose session id the agent never received; concurrent admissions may
each delete the same oldest binding before one of them wins the index (it was to be evicted anyway). A member
whose closed marker expired stays counted until it is the oldest. A principal whose own concurrent admissions keep
conflicting past :data:`MAX_INDEX_ATTEMPTS` attempts (with jittered backoff; 24 concurrent ``initialize`` calls
over three replicas all pass in the tests) gets ``429 rate_limited``; nobody else is affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

import structlog

from broker.errors import RateLimited, StateUnavailable
from broker.identity.principal import Principal
from broker.state.base import StateStore, hash_key_part, json_dumps

log = structlog.get_logger("broker.mcp.sessions")

__all__ = ["DEFAULT_SESSIONS_PER_PRINCIPAL", "MAX_SESSIONS_PER_PRINCIPAL", "SessionBinding", "SessionStore"]

#: how long a binding is kept (an upstream session idle that long is gone anyway: the SDK reaps at 30 min)
BINDING_TTL_SECONDS: Final = 24 * 3600.0
CLOSED_TTL_SECONDS: Final = 3600.0
CACHE_ENTRIES: Final = 10_000
#: how long a binding cached by this process is trusted without re-reading the store
CACHE_SECONDS: Final = 5.0
DEFAULT_SESSIONS_PER_PRINCIPAL: Final = 64
#: the index of one principal is one store record (<= 64 KiB): about 70 bytes per session
MAX_SESSIONS_PER_PRINCIPAL: Final = 500
MAX_INDEX_ATTEMPTS: Final = 10
#: jittered exponential backoff between index attempts (at most about 0.3 s in all)
RETRY_BASE_SECONDS: Final = 0.001
RETRY_CAP_SECONDS: Final = 0.05
_PREFIX: Final = "mcp_session:"


@dataclass(frozen=True, slots=True)
class SessionBinding:
    server: str
    subject: str
    actor: str | None
    #: the protocol version the upstream negotiated at initialize
    version: str
    #: the client declared URL-mode elicitation at initialize (capabilities.elicitation.url)
    url_elicitation: bool

    def belongs_to(self, server: str, principal: Principal) -> bool:
        return (
            self.server == server and self.subject == principal.subject and self.actor == principal.actor_id
        )


def _member(server: str, session_id: str) -> str:
    """The hashed part of a session's key; also its member in the principal's index."""
    return hash_key_part(server + chr(10) + session_id)


def _key(server: str, session_id: str) -> str:
    return _PREFIX + _member(server, session_id)


def _record(binding: SessionBinding) -> dict[str, Any]:
    # ``protocol``, not ``version``: the store owns a record's ``version`` member (and strips ours)
    record = asdict(binding)
    record["protocol"] = record.pop("version")
    return record


def index_key(server: str, subject: str, actor: str | None) -> str:
    """Key of the index of (server, subject, actor)'s sessions (every part hashed, HOSTILE S08)."""
    return f"mcp_sessions:{hash_key_part(json_dumps([server, subject, actor]))}"


def _entries(record: Mapping[str, Any] | None, now: float) -> list[tuple[str, float]]:
    """The index's (member, opened_at) pairs, oldest first, without those whose binding has expired.

    A record this module did not write counts as empty (logged): read back from the store, it is input."""
    if record is None:
        return []
    sessions = record.get("sessions")
    entries: list[tuple[str, float]] = []
    if isinstance(sessions, list):
        for item in sessions:
            if (
                isinstance(item, list)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], int | float)
                and not isinstance(item[1], bool)
            ):
                entries.append((item[0], float(item[1])))
            else:
                entries = []
                break
        else:
            return [(m, t) for m, t in entries if now - t < BINDING_TTL_SECONDS]
    log.error("unreadable mcp session index; started afresh")
    return []


class SessionStore:
    """Bindings in the state store; every store failure propagates (``StateUnavailable``: fail closed)."""

    def __init__(
        self,
        store: StateStore,
        *,
        cache_entries: int = CACHE_ENTRIES,
        cache_seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._cache: OrderedDict[str, tuple[float, SessionBinding]] = OrderedDict()
        self._cache_entries = cache_entries
        self._cache_seconds = cache_seconds
        self._clock = clock

    async def bind(
        self,
        session_id: str,
        binding: SessionBinding,
        *,
        limit: int = DEFAULT_SESSIONS_PER_PRINCIPAL,
        now: float | None = None,
    ) -> bool:
        """Record a new session of ``binding``'s principal, evicting its oldest beyond ``limit``; False if the id
        is already bound (an upstream reusing ids: refuse it). Raises ``RateLimited`` (429) when this
        principal's own concurrent admissions keep conflicting, ``StateUnavailable`` when the store fails."""
        if not 1 <= limit <= MAX_SESSIONS_PER_PRINCIPAL:
            raise ValueError(f"limit must be in [1, {MAX_SESSIONS_PER_PRINCIPAL}]")
        now = time.time() if now is None else now
        key, member = _key(binding.server, session_id), _member(binding.server, session_id)
        index = index_key(binding.server, binding.subject, binding.actor)
        # The binding first, then the index (module docstring): a failed admission takes the binding back.
        if not await self._store.compare_and_set_json(key, 0, _record(binding), BINDING_TTL_SECONDS):
            return False
        try:
            await self._admit(index, member, now, limit)
        except Exception:
            with contextlib.suppress(StateUnavailable):
                await self._store.delete_json(key)
            raise
        self._remember(key, binding)
        return True

    async def _admit(self, index: str, member: str, now: float, limit: int) -> None:
        """Add ``member`` to the principal's index, deleting the oldest sessions beyond ``limit`` first."""
        deleted: set[str] = set()
        for attempt in range(MAX_INDEX_ATTEMPTS):
            if attempt:  # another admission of this principal got in first: back off a little, with jitter
                await asyncio.sleep(
                    random.uniform(0, min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2**attempt))  # noqa: S311
                )
            record = await self._store.get_json(index)
            version = 0 if record is None else int(record["version"])
            entries = _entries(record, now)
            if any(m == member for m, _ in entries):
                return  # counted already (an id reused after its closed marker expired)
            entries.append((member, now))
            excess = max(0, len(entries) - limit)
            for evicted, _ in entries[:excess]:
                if evicted not in deleted:  # gone before the index drops it: no live binding goes uncounted
                    await self._evict(evicted)
                    deleted.add(evicted)
            kept = [[m, t] for m, t in entries[excess:]]
            if await self._store.compare_and_set_json(
                index, version, {"sessions": kept}, BINDING_TTL_SECONDS
            ):
                return
        raise RateLimited(
            "too many MCP sessions are being opened at once; retry", reason="mcp_session_index_conflict"
        )

    async def _evict(self, member: str) -> None:
        key = _PREFIX + member
        self._cache.pop(key, None)
        # deleted, not overwritten by a marker: a marker would be one more entry of this principal's
        await self._store.delete_json(key)
        log.info("mcp session evicted (per-principal quota)", session_key=member)

    async def lookup(self, server: str, session_id: str) -> SessionBinding | None:
        key = _key(server, session_id)
        cached = self._cache.get(key)
        if cached is not None:
            if self._clock() - cached[0] < self._cache_seconds:
                self._cache.move_to_end(key)
                return cached[1]
            del self._cache[key]
        record = await self._store.get_json(key)
        if record is None or record.get("closed"):
            return None
        binding = SessionBinding(
            server=str(record["server"]),
            subject=str(record["subject"]),
            actor=None if record.get("actor") is None else str(record["actor"]),
            version=str(record.get("protocol", "")),
            url_elicitation=bool(record.get("url_elicitation")),
        )
        self._remember(key, binding)
        return binding

    async def close(self, server: str, session_id: str) -> None:
        """Forget a session the agent ended (DELETE): later presentations are unknown sessions. It stays in its
        principal's index (the closed marker is one of its entries) until evicted."""
        key = _key(server, session_id)
        self._cache.pop(key, None)
        await self._store.put_json(key, {"closed": True}, CLOSED_TTL_SECONDS)

    def _remember(self, key: str, binding: SessionBinding) -> None:
        self._cache[key] = (self._clock(), binding)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)


class StreamBudget:
    """GET streams open per (server, subject, actor) in this process.

    A GET stream holds one of the process's upstream connections for up to an hour, and the pool is shared by
    every agent: without a budget one principal could hold all of it (its sessions alone allow 64 streams per
    server) and every other agent's call would wait for a slot and fail. Counted here, per process, because the
    connections it protects are this process's."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str, str | None], int] = {}

    @contextlib.contextmanager
    def hold(self, server: str, principal: Principal, limit: int) -> Iterator[None]:
        """One stream for the ``with`` block; RateLimited (429) when the principal holds ``limit`` already."""
        key = (server, principal.subject, principal.actor_id)
        held = self._open.get(key, 0)
        if held >= limit:
            raise RateLimited(
                "too many open MCP streams for this agent and user on this server; close one first",
                reason="mcp_streams_exhausted",
            )
        self._open[key] = held + 1
        try:
            yield
        finally:
            left = self._open[key] - 1
            if left:
                self._open[key] = left
            else:
                del self._open[key]

    def held(self, server: str, principal: Principal) -> int:
        return self._open.get((server, principal.subject, principal.actor_id), 0)
