"""Redis state store (redis-py asyncio): the shared backend for several workers or replicas.

Topologies (URL formats in :mod:`broker.state.redis_cluster`): one server (``redis://``, ``rediss://``), a
Sentinel-managed master (``redis+sentinel://``) and Redis Cluster (``redis+cluster://``). Everything below
holds on all three; what differs on a Cluster is :meth:`RedisStore.guard` and the scope of a counter
reservation's atomicity ("Redis Cluster", "Counter reservations on a Cluster").

Every single-use check is ONE atomic server-side step (S03): ``SET key 1 NX PX ttl`` for
:meth:`RedisStore.claim`, a Lua script for :meth:`RedisStore.claim_all` and the JSON compare-and-set. So is a
counter reservation (CONTRACT §12): one Lua script reads every counter of the call and adds its event
(:meth:`RedisStore.reserve_events`; per hash slot on a Cluster, see below). Every
operation runs under ``asyncio.timeout(timeout_seconds)`` on top of the socket timeouts; any error or timeout
becomes :class:`broker.errors.StateUnavailable` (S01, S02) and is reported to ``on_error(op)``. There is no
local fallback (S04).

Recovery: a connection that fails is dropped by redis-py; the next command opens a new one, so the store works
again as soon as Redis answers, without a restart. Pooled connections left over from before an outage fail on
first use; each command is therefore retried ONCE, immediately, on a connection error (the Cluster client also
retries once after a timeout or CLUSTERDOWN, refreshing its slot map; ``asyncio.timeout`` bounds the whole
operation either way). A retried claim whose first attempt reached Redis answers False: a spurious refusal,
never a second use. Sentinel: a connection error makes redis-py ask the Sentinels for the master again, and a
``READONLY`` answer (a demoted master) counts as one, so a failover is followed without a restart. On one server
the scripts (the per-request guard and counter reservations) share one pipelined connection
(:mod:`broker.state.redis_mux`; the same connection settings, the same retry) and the other commands use the pool.

Redis Cluster. A multi-key command or script must name keys of ONE slot, chosen by the first ``{...}`` hash tag
of each key. Every operation but ``guard`` and the counter reservations is single-slot by design: ``claim``,
``revoke``, counters (``record_event``: one MULTI/EXEC on one key) and JSON records (one script on one key) touch
one key; ``is_revoked`` is one ``MGET`` because every revocation key carries ``{rev}``; ``claim_all`` needs
its callers to share one hash tag (checked on a Cluster: ``ValueError`` otherwise, a caller bug). ``guard``
cannot be one script there: revocations live in ``{rev}``, the DPoP ``jti`` under its own key and the txn token
under its own tag. On a Cluster it runs three steps, in this order, and stops at the first refusal:

1. ``MGET`` of the revocation keys (slot of ``{rev}``) — any hit: refuse, and nothing has been claimed;
2. ``SET NX PX`` of the DPoP ``jti`` — taken: refuse as replayed (index 0);
3. ``SET NX PX`` of the txn token — taken: refuse as replayed (index 1).

Why this keeps the guarantees: single use and replay each rest on one atomic ``SET NX`` whose answer is
checked (S03), exactly as in the script, so two brokers racing for one ``jti`` or one txn token still get one
winner. A revocation is checked before anything is claimed, so a revoked request burns nothing; one landing
between step 1 and step 2 is ordered after this request, as it would be after a script that ran a moment
earlier. A txn token refused at step 3 has burned only this request's own ``jti`` — a proof is single-use
anyway (RFC 9449 §11.1) and the client signs a fresh one per request — so it costs the attacker, not the
victim; the jti is checked first so that a replayed proof can never consume a victim's txn token. A store
error at any step raises :class:`~broker.errors.StateUnavailable` (503), as everywhere. What is weaker than the
single-server script: up to three round trips instead of one, and a crash or timeout between steps leaves a
burnt ``jti`` (the client retries with a new proof) or, after step 3 was sent, a consumed txn token on a
request answered 503 (the agent exchanges again; the script has the same case when its answer is lost) —
never a token usable twice.

Counter reservations on a Cluster. The counters of one call have no common hash tag (a counter's key is its
name, window and hashed subject), so :meth:`RedisStore.reserve_events` runs one script per slot — per key,
unless the ``key_prefix`` carries a tag, which makes it one script as on a single server — one after the other
(one connection per operation, like every other operation). Why each counter stays exact on its own: a limit
compares ONE counter's count with its bound, and each counter's read-and-add is one atomic script on the one
master that owns its key, so concurrent calls on any number of replicas see distinct counts of that counter
(0, 1, 2, ...) and ``count >= N`` admits exactly N — the same guarantee as one script. What is weaker: the
counts of two counters of one call are not one snapshot (a rule adding two counters together may see an
interleaving no single order produces); if a later slot fails, the events already added stay recorded
(over-counting, the safe side) and the call is answered 503. :meth:`RedisStore.release_events` removes each
event with its own ``ZREM`` (idempotent, so a retry is harmless).

Limits, documented on purpose:
- S05: Redis replication is asynchronous, so a failover (Sentinel or Cluster) can lose the last claims and
  reopen their replay window; so does a restart without persistence (AOF). Keep DPoP windows and txn-token
  lifetimes short. Deployments that cannot accept it: ``min-replicas-to-write 1`` with
  ``min-replicas-max-lag`` on the masters (a master cut off from its replicas refuses writes: 503, not a
  lost claim) and ``appendfsync always``; a per-claim ``WAIT 1`` (``state.wait_replicas``) is not implemented.
- Timestamps of counters come from the callers (S06: replicas need NTP); key expiry uses the Redis clock.
- On a Cluster all revocations share one slot (one master serves every ``is_revoked``/``guard`` lookup); at
  one ``MGET`` per request this is rarely the bottleneck, but it does not scale out with more masters.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from broker.state.base import (
    GUARD_OK,
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
    check_version,
    decode_record,
    encode_record,
    revocation_key,
    ttl_ms,
    unavailable,
)
from broker.state.redis_cluster import open_client, parse_redis_url
from broker.state.redis_mux import Multiplexed
from broker.state.redis_scripts import (
    CAS_JSON_SCRIPT,
    CLAIM_ALL_SCRIPT,
    GUARD_SCRIPT,
    PUT_JSON_SCRIPT,
    RESERVE_SCRIPT,
    REVOKE_SCRIPT,
)

T = TypeVar("T")

DEFAULT_MAX_CONNECTIONS: Final = 64

# Errors that mean "the store did not answer correctly": transport and server errors (RedisError covers
# ConnectionError, TimeoutError, ResponseError such as OOM or READONLY after a failover, and the Cluster's
# CLUSTERDOWN/MOVED loops), cluster topology errors (RedisClusterException: no node reachable, slot not
# covered), raw socket/TLS errors, our own asyncio.timeout, and ValueError from stored data that does not decode.
_BACKEND_ERRORS: Final = (RedisError, RedisClusterException, OSError, TimeoutError, ValueError)


def _amount_of(member: object) -> float:
    """The amount encoded in a counter member ``<random hex>:<repr(amount)>``."""
    if not isinstance(member, bytes):
        raise ValueError("counter member is not bytes")
    return float(member.rpartition(b":")[2])


class RedisStore(StateStore):
    """:class:`StateStore` on Redis. Two instances (two pools) behave like two replicas sharing one state.

    ``url``: see :mod:`broker.state.redis_cluster` (``ValueError`` for an unsupported or malformed one).
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "broker:",
        timeout_seconds: float = 0.2,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        on_error: ErrorCallback | None = None,
    ) -> None:
        target = parse_redis_url(url)
        if not 0 < timeout_seconds <= 10:
            raise ValueError("timeout_seconds must be in (0, 10]")
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self._prefix = check_prefix(key_prefix)
        self._timeout = timeout_seconds
        self._on_error = on_error
        self._cluster = target.topology == "cluster"
        opened = open_client(target, timeout_seconds=timeout_seconds, max_connections=max_connections)
        self._redis = opened.client
        self._close = opened.close
        self._prepare = opened.prepare
        # A burst must wait (within the op timeout) for a free connection rather than fail with "Too many
        # connections": the single-server pool blocks by itself; Sentinel and Cluster pools do not, so at most
        # max_connections operations run at once (each uses one connection at a time).
        self._slots = None if target.topology == "single" else asyncio.Semaphore(max_connections)
        #: one server: scripts share one pipelined connection (:meth:`_eval`)
        self._mux = (
            Multiplexed(self._redis.connection_pool, max_in_flight=max_connections)
            if target.topology == "single" and isinstance(self._redis, Redis)
            else None
        )
        # Scripts run by EVALSHA and reload on NOSCRIPT (a restarted Redis has an empty script cache).
        self._claim_all_script = self._redis.register_script(CLAIM_ALL_SCRIPT)
        self._revoke_script = self._redis.register_script(REVOKE_SCRIPT)
        self._guard_script = self._redis.register_script(GUARD_SCRIPT)
        self._put_json_script = self._redis.register_script(PUT_JSON_SCRIPT)
        self._cas_json_script = self._redis.register_script(CAS_JSON_SCRIPT)
        self._reserve_script = self._redis.register_script(RESERVE_SCRIPT)

    async def _run(self, op: Op, call: Callable[[], Awaitable[T]]) -> T:
        """Run one operation under the time bound; backend failures become StateUnavailable (fail closed)."""
        try:
            async with asyncio.timeout(self._timeout):
                if self._slots is None:
                    return await call()
                async with self._slots:
                    if self._prepare is not None:
                        await self._prepare()
                    return await call()
        except _BACKEND_ERRORS as exc:
            if self._on_error is not None:
                self._on_error(op)
            raise unavailable(op) from exc

    async def _eval(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """EVALSHA of ``script`` (inside :meth:`_run`). On one server, on the connection every script call of the
        process shares (:mod:`broker.state.redis_mux`): one write and one read serve the calls of a moment, where
        a pool spends a connection, a write, a read and redis-py's per-command layers on each. NOSCRIPT (a
        restarted Redis): redis-py's own path loads the script and retries. A connection error is retried once on
        a new connection, as redis-py retries (module docstring)."""
        mux = self._mux
        if mux is None:  # Sentinel, Cluster: their clients route and fail over
            return await script(keys=keys, args=args)
        for attempt in (1, 2):
            try:
                return await mux.call("EVALSHA", script.sha, len(keys), *keys, *args)
            except NoScriptError:
                break
            except RedisConnectionError:
                if attempt == 2:
                    raise
        return await script(keys=keys, args=args)

    # -- single use and replay -------------------------------------------------------------------------------

    async def claim(self, key: str, ttl_seconds: float) -> bool:
        full_key = self._prefix + "claim:" + check_key(key)
        px = ttl_ms(ttl_seconds)

        async def call() -> bool:
            # One atomic SET NX PX and its return value (S03): True when set, None when the key existed.
            return bool(await self._redis.set(full_key, b"1", nx=True, px=px))

        return await self._run("claim", call)

    async def claim_all(self, items: Sequence[tuple[str, float]]) -> bool:
        checked = check_items(items)
        keys = [self._prefix + "claim:" + key for key, _ in checked]
        args = [ttl_ms(ttl) for _, ttl in checked]
        if self._cluster and len({key_slot(key.encode()) for key in keys}) > 1:
            raise ValueError("claim_all keys must share one hash tag on Redis Cluster (see hash_tag)")

        async def call() -> bool:
            return int(await self._eval(self._claim_all_script, keys, args)) == 1

        return await self._run("claim_all", call)

    async def guard(self, revocations: Mapping[str, str], claims: Sequence[tuple[str, float]]) -> Guarded:
        kinds = list(revocations)
        rev_keys = [self._prefix + revocation_key(kind, value) for kind, value in revocations.items()]
        checked = check_items(claims) if claims else []
        claim_keys = [self._prefix + "claim:" + key for key, _ in checked]
        pxs = [ttl_ms(ttl) for _, ttl in checked]
        if self._cluster:
            return await self._run("guard", lambda: self._guard_in_steps(kinds, rev_keys, claim_keys, pxs))
        keys = rev_keys + claim_keys
        args = [len(rev_keys), *pxs]

        async def call() -> int:
            # One script, one round trip: revocations, then every claim, all or none (single server, Sentinel).
            return int(await self._eval(self._guard_script, keys, args))

        found = await self._run("guard", call)
        if found < 0:
            return Guarded(revoked=kinds[-found - 1])
        if found > 0:
            return Guarded(replayed=found - 1)
        return GUARD_OK

    async def _guard_in_steps(
        self, kinds: list[str], rev_keys: list[str], claim_keys: list[str], pxs: list[int]
    ) -> Guarded:
        """Redis Cluster: revocations, then each claim in order, first refusal wins (module docstring)."""
        if rev_keys:
            hits = await self._redis.mget(rev_keys)  # one slot: every revocation key carries {rev}
            for kind, hit in zip(kinds, hits, strict=True):
                if hit is not None:
                    return Guarded(revoked=kind)
        for index, (key, px) in enumerate(zip(claim_keys, pxs, strict=True)):
            if not await self._redis.set(key, b"1", nx=True, px=px):
                return Guarded(replayed=index)
        return GUARD_OK

    # -- revocations -----------------------------------------------------------------------------------------

    async def is_revoked(self, kinds: Mapping[str, str]) -> str | None:
        pairs = [(kind, self._prefix + revocation_key(kind, value)) for kind, value in kinds.items()]
        if not pairs:
            return None

        async def call() -> list[Any]:
            # One MGET: every revocation key shares the {rev} hash tag, so this also holds on a Cluster.
            return list(await self._redis.mget([key for _, key in pairs]))

        found = await self._run("is_revoked", call)
        return next((kind for (kind, _), hit in zip(pairs, found, strict=True) if hit is not None), None)

    async def revoke(self, kind: str, value: str, ttl_seconds: float) -> None:
        key = self._prefix + revocation_key(kind, value)
        px = ttl_ms(ttl_seconds)

        async def call() -> None:
            await self._eval(self._revoke_script, [key], [px])

        await self._run("revoke", call)

    # -- sliding-window counters -----------------------------------------------------------------------------

    async def record_event(self, scope: str, amount: float, now: float, window_seconds: float) -> None:
        key = self._prefix + "ctr:" + check_key(scope)
        amount = check_finite("amount", amount)
        now = check_finite("now", now)
        px = ttl_ms(window_seconds)
        window = px / 1000
        # Sorted-set members must be unique: a random id, then the amount (repr round-trips a float exactly).
        member = f"{uuid.uuid4().hex}:{amount!r}"

        async def call() -> None:
            # MULTI/EXEC: add, trim what fell out of the window, and re-arm the expiry in one atomic step.
            # If the connection drops after EXEC ran, the retry records the event twice: over-counting, the
            # safe side for limits.
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zadd(key, {member: now})
                pipe.zremrangebyscore(key, "-inf", now - window)
                pipe.pexpire(key, px)
                await pipe.execute()

        await self._run("record_event", call)

    async def window_stats(self, scope: str, now: float, window_seconds: float) -> tuple[int, float]:
        key = self._prefix + "ctr:" + check_key(scope)
        now = check_finite("now", now)
        window = ttl_ms(window_seconds) / 1000

        async def call() -> tuple[int, float]:
            # "(" makes the lower bound exclusive: the window is (now - window, +inf), as in MemoryStore.
            members = await self._redis.zrangebyscore(key, f"({now - window!r}", "+inf")
            amounts = [_amount_of(member) for member in members]
            return len(amounts), float(sum(amounts))

        return await self._run("window_stats", call)

    async def reserve_events(self, items: Sequence[tuple[str, float, float]], now: float) -> Reservation:
        checked = check_reservation_items(items)
        now = check_finite("now", now)
        if not checked:
            return NO_RESERVATION
        keys: list[str] = []
        args: list[str | int] = []
        members: list[str] = []
        for scope, amount, window_seconds in checked:
            px = ttl_ms(window_seconds)
            # the same member format as record_event: a random id, then the amount (repr round-trips a float)
            member = f"{uuid.uuid4().hex}:{amount!r}"
            keys.append(self._prefix + "ctr:" + scope)
            args += [repr(now - px / 1000), px, member]
            members.append(member)
        # One script over all keys (single server, Sentinel); on a Cluster one per slot, in order (docstring).
        groups = self._slot_groups(keys) if self._cluster else [list(range(len(keys)))]

        async def call() -> list[tuple[int, float]]:
            # A retry after a lost answer re-adds the same members (ZADD updates, no duplicate) and reads its
            # own first attempt's events: at worst a count one too high, the safe side.
            seen: list[tuple[int, float]] = [(0, 0.0)] * len(keys)
            for group in groups:
                group_args = [repr(now)] + [arg for i in group for arg in args[3 * i : 3 * i + 3]]
                found = await self._eval(self._reserve_script, [keys[i] for i in group], group_args)
                if not isinstance(found, list) or len(found) != len(group):
                    raise ValueError("unexpected answer of the reservation script")
                for i, window_members in zip(group, found, strict=True):
                    # a member that does not decode raises ValueError: the counter is not trusted (fail closed)
                    amounts = [_amount_of(member) for member in window_members]
                    seen[i] = (len(amounts), float(sum(amounts)))
            return seen

        seen = await self._run("reserve_events", call)
        scopes = [scope for scope, _, _ in checked]
        return Reservation(seen=tuple(seen), at=now, events=tuple(zip(scopes, members, strict=True)))

    async def release_events(self, reservation: Reservation) -> None:
        events = check_reservation(reservation)
        if not events:
            return
        pairs = [(self._prefix + "ctr:" + scope, member) for scope, member in events]

        async def call() -> None:
            # ZREM is idempotent: a retry, or a second release, removes nothing more.
            if self._cluster:
                for key, member in pairs:  # each key may live on another master
                    await self._redis.zrem(key, member)
                return
            async with self._redis.pipeline(transaction=True) as pipe:
                for key, member in pairs:
                    pipe.zrem(key, member)
                await pipe.execute()

        await self._run("release_events", call)

    @staticmethod
    def _slot_groups(keys: Sequence[str]) -> list[list[int]]:
        """Indexes of ``keys`` grouped by Cluster slot, groups in order of first appearance."""
        groups: dict[int, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(key_slot(key.encode()), []).append(index)
        return list(groups.values())

    # -- JSON records ----------------------------------------------------------------------------------------

    async def put_json(self, key: str, value: Mapping[str, Any], ttl_seconds: float) -> None:
        full_key = self._prefix + "json:" + check_key(key)
        text = encode_record(value)
        px = ttl_ms(ttl_seconds)

        async def call() -> None:
            await self._eval(self._put_json_script, [full_key], [text, px])

        await self._run("put_json", call)

    async def get_json(self, key: str) -> dict[str, Any] | None:
        full_key = self._prefix + "json:" + check_key(key)

        async def call() -> dict[str, Any] | None:
            version, text = await self._redis.hmget(full_key, ["v", "d"])
            if text is None:
                return None
            if version is None:
                raise ValueError("stored record has no version")
            return decode_record(text, int(version))

        return await self._run("get_json", call)

    async def compare_and_set_json(
        self, key: str, expected_version: int, value: Mapping[str, Any], ttl_seconds: float
    ) -> bool:
        full_key = self._prefix + "json:" + check_key(key)
        expected = check_version(expected_version)
        text = encode_record(value)
        px = ttl_ms(ttl_seconds)

        async def call() -> bool:
            return int(await self._eval(self._cas_json_script, [full_key], [expected, text, px])) == 1

        return await self._run("compare_and_set_json", call)

    async def delete_json(self, key: str) -> bool:
        full_key = self._prefix + "json:" + check_key(key)

        async def call() -> bool:
            return int(await self._redis.delete(full_key)) > 0

        return await self._run("delete_json", call)

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def ping(self) -> None:
        async def call() -> None:
            await self._redis.ping()

        await self._run("ping", call)

    async def close(self) -> None:
        try:
            if self._mux is not None:
                await self._mux.aclose()
        finally:
            await self._close()
