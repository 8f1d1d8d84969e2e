"""RedisStore on Redis Cluster and Sentinel: the URL formats, and single use, replay, revocation, counters and CAS
holding across two store instances (two replicas) on a throwaway 3-master cluster.

One cluster serves the whole module (``throwaway_cluster``: loopback ports, killed at the end); each test gets
its own key prefix. Tests that break a server start their own. Figures (µs per guard, bytes per key) are
printed by the cost tests at the end.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.crc import key_slot

from broker.errors import StateUnavailable
from broker.state import StateStore, hash_key_part
from broker.state.base import Guarded, revocation_key
from broker.state.redis import RedisStore
from broker.state.redis_cluster import RedisTarget, parse_redis_url
from broker.txn.tokens import txn_replay_key
from tests.integration.test_state_redis import OPERATIONS, WINDOW_IDS, WINDOW_ROWS, Errors
from tests.redisutil import (
    ThrowawayCluster,
    free_port,
    throwaway_cluster,
    throwaway_redis,
    throwaway_sentinel,
)

pytestmark = pytest.mark.redis
#: async tests share the module's event loop, where the module's cluster clients live
on_cluster = pytest.mark.asyncio(loop_scope="module")
T0 = 1_800_000_000.0


# -- URL formats (pure) --------------------------------------------------------------------------------------

GOOD_URLS: list[tuple[str, dict[str, Any]]] = [
    ("redis://127.0.0.1:6379/0", {"topology": "single", "tls": False}),
    ("rediss://h:6380/1?ssl_ca_certs=/ca.pem", {"topology": "single", "tls": True}),
    (
        "redis+sentinel://s1:26379,s2,[::1]:26380/mymaster",
        {"topology": "sentinel", "nodes": (("s1", 26379), ("s2", 26379), ("::1", 26380)),
         "service_name": "mymaster", "db": 0},
    ),
    (
        "redis+sentinel://:p%40ss@s1:5000/mymaster/3?sentinel_password=sp",
        {"topology": "sentinel", "password": "p@ss", "username": None, "db": 3,
         "options": {"sentinel_password": "sp"}},
    ),
    (
        "rediss+sentinel://alice:pw@s1/m?ssl_ca_certs=/ca.pem",
        {"topology": "sentinel", "tls": True, "username": "alice", "password": "pw",
         "options": {"ssl_ca_certs": "/ca.pem"}},
    ),
    (
        "redis+cluster://10.0.0.1:7000,10.0.0.2",
        {"topology": "cluster", "nodes": (("10.0.0.1", 7000), ("10.0.0.2", 6379)), "service_name": None},
    ),
    ("redis+cluster://n1:7000/0", {"topology": "cluster", "db": 0}),
    ("REDISS+CLUSTER://n1:7000?ssl_certfile=/c.pem&ssl_keyfile=/k.pem", {"topology": "cluster", "tls": True}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("url", "expected"),
    GOOD_URLS,
    ids=["single", "single-tls", "sentinel-hosts", "sentinel-password-db", "sentinel-tls-acl",
         "cluster-default-port", "cluster-db0", "cluster-tls-uppercase"],
)  # fmt: skip
def test_supported_urls(url: str, expected: dict[str, Any]) -> None:
    target = parse_redis_url(url)
    for name, value in expected.items():
        assert getattr(target, name) == value, name


BAD_URLS = [
    ("http://h:6379", "unsupported scheme"),
    ("redis+sentinal://s1/m", "unsupported scheme"),
    ("unix:///tmp/redis.sock", "unsupported scheme"),
    ("127.0.0.1:6379", "unsupported scheme"),
    ("redis+sentinel://s1:26379", "needs /service_name"),
    ("redis+sentinel://s1/m/x", "db must be"),
    ("redis+sentinel://s1/m/0/extra", "needs /service_name"),
    ("redis+sentinel://s1/m*", "needs /service_name"),
    ("redis+cluster://n1/1", "no path"),
    ("redis+cluster://n1:notaport", "invalid port"),
    ("redis+cluster://n1:70000", "invalid port"),
    ("redis+cluster://n1,,n2", "host[:port]"),
    ("redis+cluster://n1?ssl_ca_certs=/ca.pem", "not supported here"),
    ("redis+cluster://n1?sentinel_password=x", "not supported here"),
    ("redis+sentinel://s1/m?socket_timeout=9", "not supported here"),
    ("rediss+cluster://n1?ssl_ca_certs=/a&ssl_ca_certs=/b", "exactly one"),
    ("redis+cluster://n1#frag", "fragment"),
    ("redis+cluster://" + ",".join(f"n{i}" for i in range(65)), "1 to 64"),
]


@pytest.mark.parametrize(
    ("url", "why"),
    BAD_URLS,
    ids=["http", "typo-scheme", "unix-socket", "no-scheme", "sentinel-no-service", "sentinel-bad-db",
         "sentinel-extra-segment", "sentinel-bad-service", "cluster-db1", "bad-port", "port-out-of-range",
         "empty-host", "tls-option-without-rediss", "sentinel-option-on-cluster", "unknown-option",
         "repeated-option", "fragment", "too-many-nodes"],
)  # fmt: skip
def test_unsupported_urls_are_refused_with_the_formats_and_without_the_secret(url: str, why: str) -> None:
    with pytest.raises(ValueError) as caught:
        RedisStore(url.replace("://", "://:s3cret@", 1) if "@" not in url else url)
    message = str(caught.value)
    assert why in message and "redis+sentinel://" in message and "redis+cluster://" in message
    assert "s3cret" not in message


def test_the_password_is_not_in_the_repr() -> None:
    target = parse_redis_url("redis+cluster://:s3cret@n1:7000")
    assert isinstance(target, RedisTarget) and "s3cret" not in repr(target)


# -- the module's cluster ------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster() -> AsyncIterator[ThrowawayCluster]:
    async with throwaway_cluster(masters=3) as running:
        yield running


Stores = Callable[..., RedisStore]


@asynccontextmanager
async def store_factory(url: str) -> AsyncIterator[Stores]:
    """``make()`` returns a new store (its own pool: another replica) on one fresh key prefix; closed after."""
    prefix = f"t:{uuid.uuid4().hex[:12]}:"
    opened: list[RedisStore] = []

    def make(**kwargs: Any) -> RedisStore:
        kwargs.setdefault("key_prefix", prefix)
        kwargs.setdefault("timeout_seconds", 2.0)  # shared 2-core machine: behaviour, not scheduling
        opened.append(RedisStore(url, **kwargs))
        return opened[-1]

    try:
        yield make
    finally:
        for store in opened:
            await store.close()


@pytest_asyncio.fixture(loop_scope="module")
async def stores(cluster: ThrowawayCluster) -> AsyncIterator[Stores]:
    async with store_factory(cluster.url) as make:
        yield make


@pytest_asyncio.fixture(loop_scope="module")
async def raw(cluster: ThrowawayCluster) -> AsyncIterator[Any]:
    client = cluster.raw()
    yield client
    await client.aclose()


def prefix_of(store: RedisStore) -> str:
    return store._prefix


# -- single use and replay -----------------------------------------------------------------------------------


@on_cluster
async def test_claim_once_across_replicas_with_px_ttl(stores: Stores, raw: Any) -> None:
    one, two = stores(), stores()
    assert await one.claim("dpop:abc", 60) is True
    assert await two.claim("dpop:abc", 60) is False
    assert 55_000 < await raw.pttl(prefix_of(one) + "claim:dpop:abc") <= 60_000


@on_cluster
@pytest.mark.parametrize(
    ("existing", "expected"),
    [([], True), (["{t}:txn"], False), (["{t}:dpop"], False)],
    ids=["none-exists", "txn-consumed", "jti-replayed"],
)
async def test_claim_all_is_all_or_nothing_in_one_slot(
    stores: Stores, raw: Any, existing: list[str], expected: bool
) -> None:
    store = stores()
    for key in existing:
        await store.claim(key, 60)
    items = [("{t}:txn", 300.0), ("{t}:dpop", 60.0)]
    assert await store.claim_all(items) is expected
    for key, _ in items:
        if key not in existing:
            assert (await raw.pttl(prefix_of(store) + "claim:" + key) > 0) is expected


@on_cluster
async def test_claim_all_across_slots_is_a_caller_bug_and_claims_nothing(stores: Stores, raw: Any) -> None:
    store = stores()
    keys = ["{a}:txn", "{b}:dpop"]
    assert key_slot(b"{a}") != key_slot(b"{b}")
    with pytest.raises(ValueError, match="share one hash tag"):
        await store.claim_all([(key, 60) for key in keys])
    assert [await raw.exists(prefix_of(store) + "claim:" + key) for key in keys] == [0, 0]


def _consumers() -> dict[str, Callable[[StateStore, int], Awaitable[bool]]]:
    txn = txn_replay_key("txn-once")
    return {
        "claim": lambda s, i: s.claim(txn, 300),
        "claim_all": lambda s, i: s.claim_all([(txn, 300), (txn.replace(":txn", f":dpop:{i}"), 60)]),
        # each request brings its own proof (jti), all present the same txn token
        "guard": lambda s, i: _ok(s.guard({"sub": "alice"}, [(f"dpop:jti{i}", 60), (txn, 300)])),
        "guard-same-proof": lambda s, i: _ok(s.guard({"sub": "alice"}, [("dpop:same", 60), (txn, 300)])),
    }


async def _ok(guarded: Awaitable[Guarded]) -> bool:
    return (await guarded).ok


@on_cluster
@pytest.mark.parametrize("how", list(_consumers()), ids=list(_consumers()))
async def test_fifty_concurrent_consumes_on_two_replicas_exactly_one_wins(stores: Stores, how: str) -> None:
    replica_a, replica_b = stores(), stores()
    consume = _consumers()[how]
    results = await asyncio.gather(*(consume(replica_a if i % 2 else replica_b, i) for i in range(50)))
    assert results.count(True) == 1


# -- guard: the request's last check -------------------------------------------------------------------------

JTI, TXN = "dpop:" + hash_key_part("jti-1"), txn_replay_key("txn-1")
# (revoked before, claimed before, expected, jti set after, txn set after) -- on a Cluster
GUARD_ROWS: list[tuple[list[tuple[str, str]], list[str], Guarded, bool, bool]] = [
    ([], [], Guarded(), True, True),
    ([("sub", "alice")], [], Guarded(revoked="sub"), False, False),
    ([("act", "spiffe://x/a"), ("grant", "g")], [], Guarded(revoked="act"), False, False),
    ([("txn", "txn-1")], [], Guarded(revoked="txn"), False, False),
    ([("sub", "alice")], [JTI], Guarded(revoked="sub"), True, False),
    ([], [JTI], Guarded(replayed=0), True, False),
    # the one difference from the single-server script: a refused txn token has burnt the request's own jti
    ([], [TXN], Guarded(replayed=1), True, True),
]
GUARD_IDS = [
    "fresh", "subject-revoked", "first-revocation-in-order", "txn-revoked",
    "revoked-wins-over-replay", "jti-replayed-txn-untouched", "txn-replayed-burns-own-jti",
]  # fmt: skip


@on_cluster
@pytest.mark.parametrize(("revoked", "claimed", "expected", "jti_set", "txn_set"), GUARD_ROWS, ids=GUARD_IDS)
async def test_guard_on_cluster(
    stores: Stores,
    raw: Any,
    revoked: list[tuple[str, str]],
    claimed: list[str],
    expected: Guarded,
    jti_set: bool,
    txn_set: bool,
) -> None:
    admin, replica = stores(), stores()
    for kind, value in revoked:
        await admin.revoke(kind, value, 600)
    for key in claimed:
        await admin.claim(key, 60)
    revocations = {"sub": "alice", "act": "spiffe://x/a", "grant": "g", "txn": "txn-1"}
    assert await replica.guard(revocations, [(JTI, 60), (TXN, 300)]) == expected
    prefix = prefix_of(replica) + "claim:"
    assert (await raw.exists(prefix + JTI), await raw.exists(prefix + TXN)) == (jti_set, txn_set)


@on_cluster
@pytest.mark.parametrize(
    ("revocations", "claims", "expected"),
    [({"sub": "bob"}, [], Guarded()), ({"sub": "mallory"}, [], Guarded(revoked="sub")),
     ({}, [("dpop:x", 60)], Guarded()), ({}, [], Guarded())],
    ids=["revocations-only-clear", "revocations-only-hit", "claims-only", "nothing"],
)  # fmt: skip
async def test_guard_with_empty_parts(
    stores: Stores, revocations: dict[str, str], claims: list[tuple[str, float]], expected: Guarded
) -> None:
    store = stores()
    await store.revoke("sub", "mallory", 60)
    assert await store.guard(revocations, claims) == expected


# -- revocations ---------------------------------------------------------------------------------------------


@on_cluster
async def test_revocation_holds_across_replicas_and_lives_in_one_slot(stores: Stores, raw: Any) -> None:
    admin, replica = stores(), stores()
    kinds = {"sub": "alice", "act": "spiffe://x/a", "jti": "j", "grant": "g", "txn": "t"}
    assert await replica.is_revoked(kinds) is None
    await admin.revoke("grant", "g", 600)
    await admin.revoke("grant", "g", 10)  # never shortened
    assert await replica.is_revoked(kinds) == "grant"
    keys = [prefix_of(admin) + revocation_key(kind, value) for kind, value in kinds.items()]
    assert len({key_slot(key.encode()) for key in keys}) == 1  # the {rev} tag: one MGET
    assert await raw.pttl(prefix_of(admin) + revocation_key("grant", "g")) > 590_000


@on_cluster
async def test_txn_keys_spread_over_the_masters(stores: Stores, cluster: ThrowawayCluster) -> None:
    store = stores()
    keys = [txn_replay_key(f"txn-{i}") for i in range(60)]
    assert all(await asyncio.gather(*(store.claim(key, 60) for key in keys)))
    counts = []
    for node in cluster.nodes:
        client = Redis.from_url(node.url)
        counts.append(len([k async for k in client.scan_iter(match=prefix_of(store) + "*", count=1000)]))
        await client.aclose()
    assert sum(counts) == 60 and min(counts) > 0  # scale-out: every master holds some of them


# -- counters and JSON records -------------------------------------------------------------------------------


@on_cluster
@pytest.mark.parametrize(("events", "at", "window", "expected"), WINDOW_ROWS, ids=WINDOW_IDS)
async def test_window_stats_across_replicas(
    stores: Stores,
    events: list[tuple[float, float]],
    at: float,
    window: float,
    expected: tuple[int, float],
) -> None:
    replica_a, replica_b = stores(), stores()
    for i, (offset, amount) in enumerate(events):
        await (replica_a if i % 2 else replica_b).record_event("ctr:s", amount, T0 + offset, 600)
    assert await replica_b.window_stats("ctr:s", T0 + at, window) == expected


@on_cluster
async def test_concurrent_counting_on_two_replicas_loses_nothing(stores: Stores, raw: Any) -> None:
    replica_a, replica_b = stores(), stores()
    await asyncio.gather(
        *((replica_a if i % 2 else replica_b).record_event("ctr:c", 2.5, T0, 600) for i in range(40))
    )
    assert await replica_a.window_stats("ctr:c", T0, 600) == (40, 100.0)
    assert 595_000 < await raw.pttl(prefix_of(replica_a) + "ctr:ctr:c") <= 600_000


@on_cluster
async def test_concurrent_cas_on_two_replicas_exactly_one_wins(stores: Stores) -> None:
    replica_a, replica_b = stores(), stores()
    await replica_a.put_json("approval", {"approvals": []}, 600)
    results = await asyncio.gather(
        *(
            (replica_a if i % 2 else replica_b).compare_and_set_json("approval", 1, {"approvals": [i]}, 600)
            for i in range(20)
        )
    )
    assert results.count(True) == 1
    assert await replica_b.get_json("approval") == {"approvals": [results.index(True)], "version": 2}
    assert await replica_b.compare_and_set_json("approval", 1, {"stale": True}, 600) is False


# -- fail closed ---------------------------------------------------------------------------------------------


@on_cluster
@pytest.mark.parametrize("op", list(OPERATIONS), ids=list(OPERATIONS))
async def test_unreachable_cluster_fails_closed_quickly(op: str) -> None:
    errors = Errors()
    store = RedisStore(f"redis+cluster://127.0.0.1:{free_port()}", timeout_seconds=0.2, on_error=errors)
    try:
        started = time.perf_counter()
        with pytest.raises(StateUnavailable) as caught:
            await OPERATIONS[op](store)
        assert caught.value.reason == f"state_{op}_failed" and errors == [op]
        assert time.perf_counter() - started < 1.0
    finally:
        await store.close()


@on_cluster
@pytest.mark.slow
async def test_hung_master_fails_closed_then_the_same_store_recovers(
    stores: Stores, raw: Any, cluster: ThrowawayCluster
) -> None:
    errors = Errors()
    store = stores(timeout_seconds=0.2, on_error=errors)
    assert await store.claim("warm", 60)
    hung = cluster.nodes[0]
    await raw.initialize()
    on_hung = [
        key
        for key in (txn_replay_key(f"h{i}") for i in range(200))
        if raw.get_node_from_key(prefix_of(store) + "claim:" + key).port == hung.port
    ]
    hung.pause()  # SIGSTOP: sockets open, no answer (S02)
    try:
        started = time.perf_counter()
        with pytest.raises(StateUnavailable):
            await store.guard({"sub": "alice"}, [("dpop:h", 60), (on_hung[0], 300)])
        assert time.perf_counter() - started < 1.0 and errors == ["guard"]
    finally:
        hung.resume()
    # the same store works again at once, on every master
    assert await store.claim(on_hung[1], 300) is True
    assert await store.claim(on_hung[1], 300) is False
    # one after another: thirty at once, each within the test's 0.2 s bound, raced the resumed master's backlog on
    # a loaded CI machine (a TimeoutError once) — recovery, not throughput, is what this checks
    assert all([await store.claim(txn_replay_key(f"after{i}"), 60) for i in range(30)])


# -- Sentinel ------------------------------------------------------------------------------------------------


@on_cluster
@pytest.mark.slow
async def test_the_store_works_through_sentinel() -> None:
    async with throwaway_sentinel() as sentinel, store_factory(sentinel.url) as make:
        one, two = make(), make()
        assert await one.claim("dpop:s", 60) is True
        assert await two.claim("dpop:s", 60) is False
        await one.revoke("sub", "mallory", 60)
        assert await two.guard({"sub": "mallory"}, [("dpop:t", 60)]) == Guarded(revoked="sub")
        results = await asyncio.gather(*(s.guard({}, [(TXN, 300)]) for s in (one, two) * 10))
        assert sum(r.ok for r in results) == 1
        await one.record_event("ctr:s", 3, T0, 600)
        assert await two.window_stats("ctr:s", T0, 600) == (1, 3.0)
        assert await two.compare_and_set_json("r", 0, {"a": 1}, 600) is True
        await one.ping()
        errors = Errors()
        unknown = RedisStore(
            sentinel.url.replace(sentinel.service, "nosuchservice"), timeout_seconds=0.5, on_error=errors
        )
        try:
            with pytest.raises(StateUnavailable):
                await unknown.claim("x", 60)
            assert errors == ["claim"]
        finally:
            await unknown.close()


@on_cluster
@pytest.mark.slow
async def test_sentinel_failover_keeps_replicated_claims_and_the_store_follows() -> None:
    """A replica is promoted (``SENTINEL FAILOVER``); the same store follows the new master without a restart,
    and a claim made before the failover (replicated, which ``WAIT`` makes sure of here) is still refused."""
    async with throwaway_sentinel() as sentinel:
        replica_args = ["--replicaof", "127.0.0.1", str(sentinel.master.port)]
        async with throwaway_redis(replica_args) as replica, store_factory(sentinel.url) as make:
            store = make()
            # WAIT blocks up to its timeout: the client's read timeout must outlast it (redis-py's default may not)
            master = Redis.from_url(sentinel.master.url, socket_timeout=30)
            await _until(lambda: _replica_online(master), "the replica is in sync")
            assert await store.claim("dpop:before", 60) is True
            assert await master.wait(1, 10_000) == 1  # S05: only a replicated claim survives a failover
            sentinels = Redis(host="127.0.0.1", port=sentinel.sentinel_port)
            try:
                await _until(lambda: _failover_started(sentinels, sentinel.service), "failover accepted")
                await _until(
                    lambda: _master_port_is(sentinels, sentinel.service, replica.port), "failover done"
                )
                await _until(lambda: _accepts_writes(store), "store writes to the new master")
                assert await store.claim("dpop:before", 60) is False
                assert await store.guard({"sub": "alice"}, [("dpop:after", 60)]) == Guarded()
            finally:
                await master.aclose()
                await sentinels.aclose()


async def _until(probe: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if await probe():
            return
        await asyncio.sleep(0.1)  # bounded poll of a failover in progress
    pytest.fail(f"timed out waiting until {what}")


async def _failover_started(sentinels: Any, service: str) -> bool:
    from redis.exceptions import ResponseError

    try:
        await sentinels.execute_command("SENTINEL", "FAILOVER", service)
    except ResponseError:
        return False  # NOGOODSLAVE until the Sentinel has the replica's INFO: ask again
    return True


async def _replica_online(master: Any) -> bool:
    info = await master.info("replication")
    return any(
        isinstance(value, dict) and value.get("state") == "online"
        for key, value in info.items()
        if str(key).startswith("slave")
    )


async def _master_port_is(sentinels: Any, service: str, port: int) -> bool:
    address = await sentinels.sentinel_get_master_addr_by_name(service)
    return bool(address) and int(address[1]) == port


async def _accepts_writes(store: RedisStore) -> bool:
    try:
        await store.claim(f"probe:{uuid.uuid4().hex}", 60)
    except StateUnavailable:
        return False  # refused while the roles change: fail closed, then recover
    return True


# -- cost and sizing (figures printed for the docs) ----------------------------------------------------------

REVOCATIONS = {"sub": "alice", "act": "spiffe://example.org/agents/a", "jti": "j", "grant": "alice|a|t"}


async def _guard_cost(store: RedisStore, n: int) -> tuple[float, float]:
    """(µs per guard one after another, µs wall per guard with 32 concurrent), each with a jti and a txn."""
    await store.ping()

    async def one(tag: str) -> None:
        found = await store.guard(
            {**REVOCATIONS, "txn": tag}, [(f"dpop:{tag}", 60), (txn_replay_key(tag), 300)]
        )
        assert found.ok

    started = time.perf_counter()
    for i in range(n):
        await one(f"s{i}")
    sequential = (time.perf_counter() - started) / n * 1e6

    async def worker(w: int) -> None:
        for i in range(n // 32):
            await one(f"c{w}:{i}")

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(32)))
    concurrent = (time.perf_counter() - started) / (n // 32 * 32) * 1e6
    return sequential, concurrent


@on_cluster
async def test_guard_cost_cluster_vs_single_redis(stores: Stores, capsys: pytest.CaptureFixture[str]) -> None:
    n = 1000
    async with throwaway_redis() as single, store_factory(single.url) as single_stores:
        single_figures = await _guard_cost(single_stores(), n)
    cluster_figures = await _guard_cost(stores(), n)
    with capsys.disabled():
        for name, (seq, conc) in (("single Redis", single_figures), ("3-master Cluster", cluster_figures)):
            print(
                f"\nRedisStore.guard on {name}: {seq:.0f} µs sequential, {conc:.0f} µs wall with 32 concurrent"
            )
    assert cluster_figures[0] < 50_000  # generous (shared machine): the printed figures are what matter


@on_cluster
async def test_memory_per_key(capsys: pytest.CaptureFixture[str]) -> None:
    """``MEMORY USAGE`` of each kind of key with the default prefix and real key shapes (hashed parts)."""
    async with throwaway_redis() as single, store_factory(single.url) as make:
        store = make(key_prefix="broker:")
        raw = Redis.from_url(single.url)

        async def usage(key: str) -> int:
            found = await raw.memory_usage("broker:" + key)
            assert isinstance(found, int), key
            return found

        try:
            jti_key = "claim:dpop:" + hash_key_part("a-jti")
            txn_key = "claim:" + txn_replay_key("a-22-character-txn-id0")
            await store.claim(jti_key.removeprefix("claim:"), 60)
            await store.claim(txn_key.removeprefix("claim:"), 300)
            await store.revoke("sub", "alice@example.org", 86_400)
            scope = f"ctr:approvals_10m:600:{hash_key_part('alice')}"
            await store.record_event(scope, 4800.0, T0, 600)
            one_event = await usage("ctr:" + scope)
            for i in range(1, 101):
                await store.record_event(scope, 4800.0, T0 + i, 600)
            hundred_more = await usage("ctr:" + scope)
            approval = {"tool": "approveExpense", "subject": "alice", "arguments": {"invoice_id": "INV-1",
                        "amount": 4800}, "requires": ["manager_approval"], "approvals": [], "status": "pending",
                        "args_digest": hash_key_part("x"), "created_at": T0, "expires_at": T0 + 3600}  # fmt: skip
            await store.put_json("approval:" + hash_key_part("id"), approval, 3600)
            sizes = {
                "DPoP jti claim": float(await usage(jti_key)),
                "txn token claim": float(await usage(txn_key)),
                "revocation": float(await usage(revocation_key("sub", "alice@example.org"))),
                "counter, 1 event": float(one_event),
                "counter, per further event": (hundred_more - one_event) / 100,
                "approval record": float(await usage("json:approval:" + hash_key_part("id"))),
            }
        finally:
            await raw.aclose()
    with capsys.disabled():
        print("\nMEMORY USAGE (bytes):", ", ".join(f"{k}: {v:.0f}" for k, v in sizes.items()))
    assert all(0 < size < 4096 for size in sizes.values())
