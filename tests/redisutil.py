"""Helpers for Redis tests: isolated stores on the shared Redis, and throwaway ``redis-server`` processes.

Usage from a test module::

    @pytest.fixture
    async def redis() -> AsyncIterator[RedisStores]:
        async with redis_stores() as stores:   # Redis at 127.0.0.1:6379, a unique key prefix, cleaned after
            yield stores

    async def test_x(redis: RedisStores) -> None:
        replica_a, replica_b = redis.store(), redis.store()   # two pools sharing one prefix = two replicas
        ...
        assert 0 < await redis.raw.pttl(redis.prefix + "claim:k") <= 1000

    async with throwaway_redis() as server:    # own redis-server on a free port, killed at exit
        store = RedisStore(server.url)
        await server.kill(); await server.start()   # outage and recovery on the same port

    async with throwaway_cluster() as cluster:  # 3 masters on loopback, cluster_state:ok, all killed at exit
        store = RedisStore(cluster.url)         # redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3

    async with throwaway_sentinel() as sentinel:  # a master and one Sentinel (service "brokermaster")
        store = RedisStore(sentinel.url)          # redis+sentinel://127.0.0.1:port/brokermaster/0

Redis missing (no server answering, no ``redis-server`` binary): the test is skipped with a message, or FAILS
when the environment has ``CI=true``, so that a CI run never passes by skipping the fail-closed tests.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from broker.state.redis import RedisStore

REDIS_URL: Final = os.environ.get("BROKER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
#: bound of every readiness poll (start of a throwaway server)
READY_WITHIN_SECONDS: Final = 10.0


def redis_missing(why: str) -> NoReturn:
    """Skip the test, or fail it under ``CI=true``: CI must never go green by skipping the Redis tests."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why} (CI=true: Redis is required, not optional)")
    pytest.skip(
        f"{why}; start Redis on 127.0.0.1:6379 to run this test (CI=true turns this skip into a failure)"
    )


@dataclass
class RedisStores:
    """Stores that share one unique key prefix on the shared Redis, and a raw client for assertions."""

    url: str
    prefix: str
    raw: Redis
    _opened: list[RedisStore] = field(default_factory=list)

    def store(self, **kwargs: Any) -> RedisStore:
        """A new :class:`RedisStore` (its own connection pool, like another replica) on this test's prefix."""
        kwargs.setdefault("key_prefix", self.prefix)
        # Functional tests run on shared 2-core machines: a generous bound keeps them about behaviour, not
        # scheduling. Tests of the time bound itself pass the production default (0.2 s) explicitly.
        kwargs.setdefault("timeout_seconds", 2.0)
        store = RedisStore(self.url, **kwargs)
        self._opened.append(store)
        return store


async def _ping(url: str) -> str | None:
    """None if ``url`` answers PING, else why not."""
    client = Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        return f"no Redis answering at {url} ({type(exc).__name__})"
    finally:
        await client.aclose()
    return None


@asynccontextmanager
async def redis_stores(url: str = REDIS_URL) -> AsyncIterator[RedisStores]:
    """Yield :class:`RedisStores` with prefix ``test:<uuid>:``; close its stores and delete its keys after."""
    problem = await _ping(url)
    if problem is not None:
        redis_missing(problem)
    raw = Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    stores = RedisStores(url=url, prefix=f"test:{uuid.uuid4().hex}:", raw=raw)
    try:
        yield stores
    finally:
        for store in stores._opened:
            await store.close()
        # The prefix is hex: no glob metacharacters, so the pattern matches this test's keys only.
        keys = [key async for key in raw.scan_iter(match=stores.prefix + "*", count=1000)]
        if keys:
            await raw.delete(*keys)
        await raw.aclose()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ThrowawayRedis:
    """A ``redis-server`` child process without persistence on a fixed port; it can die and come back."""

    port: int
    extra_args: Sequence[str] = ()
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, ready_url: str | None = None) -> None:
        """Start the server and return once it answers PING (bounded readiness poll, not a fixed sleep)."""
        binary = shutil.which("redis-server")
        if binary is None:
            redis_missing("redis-server binary not found")
        self.process = await asyncio.create_subprocess_exec(
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            *self.extra_args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_WITHIN_SECONDS
        problem: str | None = "not started"
        while loop.time() < deadline:
            if self.process.returncode is not None:
                break
            problem = await _ping(ready_url or self.url)
            if problem is None:
                return
            await asyncio.sleep(0.02)  # poll interval of the readiness loop
        await self.kill()
        pytest.fail(f"throwaway redis-server on port {self.port} not ready: {problem}")

    async def kill(self) -> None:
        """SIGKILL: the abrupt outage (no FIN handshake with clients beyond what the kernel sends)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a slow or hung Redis, S02)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@asynccontextmanager
async def throwaway_redis(
    extra_args: Sequence[str] = (), *, port: int | None = None, ready_url: str | None = None
) -> AsyncIterator[ThrowawayRedis]:
    """Run an own ``redis-server`` on a free port for the duration of the block; always killed at exit."""
    server = ThrowawayRedis(port=port if port is not None else free_port(), extra_args=extra_args)
    await server.start(ready_url)
    try:
        yield server
    finally:
        if server.process is not None and server.process.returncode is None:
            server.resume()  # SIGKILL works on a stopped process too; resuming keeps the exit path plain
        await server.kill()


# -- throwaway Redis Cluster and Sentinel ------------------------------------------------------------------


async def wait_until(probe: Callable[[], Awaitable[str | None]], what: str) -> None:
    """Poll the async ``probe`` (None: ready, else why not) every 50 ms for at most READY_WITHIN_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_WITHIN_SECONDS
    problem: str | None = "not polled"
    while loop.time() < deadline:
        problem = await probe()
        if problem is None:
            return
        await asyncio.sleep(0.05)  # poll interval of a bounded readiness loop
    pytest.fail(f"{what} not ready: {problem}")


async def _cluster_state(url: str) -> str | None:
    """None if the node at ``url`` reports ``cluster_state:ok`` (all 16384 slots served), else why not."""
    client = Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        info = await client.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
    except (RedisError, OSError) as exc:
        return f"{url}: {type(exc).__name__}"
    finally:
        await client.aclose()
    # redis-py parses CLUSTER INFO into a dict of str -> str
    state = info.get("cluster_state") if isinstance(info, dict) else None
    return None if state == "ok" else f"{url}: cluster_state {state}"


@dataclass
class ThrowawayCluster:
    """A Redis Cluster of throwaway masters on loopback (no replicas, no persistence)."""

    nodes: list[ThrowawayRedis]

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL listing every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def raw(self) -> Any:
        """A plain RedisCluster client for assertions (the caller closes it with ``aclose()``)."""
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        startup = [ClusterNode("127.0.0.1", node.port) for node in self.nodes]
        return RedisCluster(startup_nodes=startup, socket_timeout=2, socket_connect_timeout=2)


@asynccontextmanager
async def throwaway_cluster(masters: int = 3) -> AsyncIterator[ThrowawayCluster]:
    """Start ``masters`` cluster-enabled ``redis-server`` processes on free loopback ports (own data port and
    ``cluster-port`` bus each, ``nodes.conf`` in a temporary directory), join them with
    ``redis-cli --cluster create --cluster-replicas 0``, wait (bounded) for ``cluster_state:ok`` on every node,
    and kill them all and delete the directory at exit."""
    cli = shutil.which("redis-cli")
    if cli is None:
        redis_missing("redis-cli binary not found")
    workdir = tempfile.mkdtemp(prefix="broker-cluster-")
    nodes: list[ThrowawayRedis] = []
    try:
        for _ in range(masters):
            port = free_port()
            nodes.append(
                ThrowawayRedis(
                    port=port,
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        str(free_port()),
                        "--cluster-config-file",
                        os.path.join(workdir, f"nodes-{port}.conf"),
                        "--cluster-node-timeout",
                        "2000",
                        "--dir",
                        workdir,
                    ],
                )
            )
            await nodes[-1].start()
        create = await asyncio.create_subprocess_exec(
            cli,
            "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in nodes),
            "--cluster-replicas", "0", "--cluster-yes",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            output, _ = await asyncio.wait_for(create.communicate(), READY_WITHIN_SECONDS)
        except TimeoutError:
            create.kill()
            await create.wait()
            pytest.fail("redis-cli --cluster create did not finish")
        if create.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {output.decode(errors='replace')[-1000:]}")

        async def all_ok() -> str | None:
            for node in nodes:
                problem = await _cluster_state(node.url)
                if problem is not None:
                    return problem
            return None

        await wait_until(all_ok, "throwaway Redis Cluster")
        yield ThrowawayCluster(nodes)
    finally:
        for node in nodes:
            if node.process is not None and node.process.returncode is None:
                node.resume()
            await node.kill()
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class ThrowawaySentinel:
    """A throwaway master and one Sentinel monitoring it as ``service``."""

    master: ThrowawayRedis
    sentinel_port: int
    service: str

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}/0"


@asynccontextmanager
async def throwaway_sentinel(service: str = "brokermaster") -> AsyncIterator[ThrowawaySentinel]:
    """Start a master and ``redis-server <conf> --sentinel`` (its config file, which Sentinel rewrites, in a
    temporary directory); ready once the Sentinel names the master. Both are killed at exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        redis_missing("redis-server binary not found")
    workdir = tempfile.mkdtemp(prefix="broker-sentinel-")
    sentinel: asyncio.subprocess.Process | None = None
    try:
        async with throwaway_redis() as master:
            port = free_port()
            conf = os.path.join(workdir, "sentinel.conf")
            with open(conf, "w") as out:
                out.write(
                    f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                    f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n"
                    f"sentinel down-after-milliseconds {service} 2000\n"
                )
            sentinel = await asyncio.create_subprocess_exec(
                binary, conf, "--sentinel",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip

            async def names_master() -> str | None:
                client = Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
                try:
                    found = await client.sentinel_get_master_addr_by_name(service)
                except (RedisError, OSError) as exc:
                    return f"sentinel on {port}: {type(exc).__name__}"
                finally:
                    await client.aclose()
                return None if found else f"sentinel on {port} does not know {service} yet"

            await wait_until(names_master, "throwaway Sentinel")
            yield ThrowawaySentinel(master, port, service)
    finally:
        if sentinel is not None and sentinel.returncode is None:
            sentinel.kill()
            await sentinel.wait()
        shutil.rmtree(workdir, ignore_errors=True)
