"""The pipelined script connection (``broker/state/redis_mux.py``) against a real Redis: every reply reaches the
call it answers — whatever the callers before it did (gave up, got an error reply) — and a lost connection fails
every call waiting on it at once, after which the next call opens a new one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import BlockingConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError

from broker.state.redis_mux import Multiplexed
from tests.redisutil import REDIS_URL, RedisStores, redis_stores, throwaway_redis, wait_until

pytestmark = pytest.mark.redis

UNKNOWN_SHA = "0" * 40


@pytest.fixture
async def redis() -> AsyncIterator[RedisStores]:
    async with redis_stores() as stores:  # fails (CI) or skips when no Redis answers
        yield stores


async def connection_id(mux: Multiplexed) -> int:
    return int(await mux.call("CLIENT", "ID"))


@pytest.mark.slow
async def test_replies_reach_their_own_calls_past_abandoned_calls_and_error_replies() -> None:
    async with throwaway_redis() as server:
        mux = Multiplexed(BlockingConnectionPool.from_url(server.url, socket_timeout=10), max_in_flight=64)
        try:
            before = await connection_id(mux)
            server.pause()  # SIGSTOP: everything below is written and waits for its reply
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(mux.call("ECHO", "abandoned"), 0.1)
            calls = [
                asyncio.ensure_future(mux.call("ECHO", "second")),
                asyncio.ensure_future(mux.call("EVALSHA", UNKNOWN_SHA, 0)),
                asyncio.ensure_future(mux.call("ECHO", "fourth")),
            ]
            abandoned_late = asyncio.ensure_future(mux.call("ECHO", "cancelled"))
            await asyncio.sleep(0)  # a turn of the loop: the writer sends it, then its caller goes away
            abandoned_late.cancel()
            calls.append(asyncio.ensure_future(mux.call("ECHO", "last")))
            server.resume()
            second, unknown, fourth, last = await asyncio.gather(*calls, return_exceptions=True)
            assert (second, fourth, last) == (b"second", b"fourth", b"last")
            assert isinstance(unknown, NoScriptError)
            # neither the abandoned calls nor the error reply put the connection out of step
            assert await connection_id(mux) == before
            assert await mux.call("ECHO", "after") == b"after"
        finally:
            await mux.aclose()


async def blocked_in_blpop(redis: RedisStores, client_id: int) -> None:
    """Return once Redis is blocked in a BLPOP of connection ``client_id``."""

    async def probe() -> str | None:
        clients = await redis.raw.client_list(_type="normal")
        found = any(int(client["id"]) == client_id and client["cmd"] == "blpop" for client in clients)
        return None if found else "not in BLPOP"

    await wait_until(probe, f"connection {client_id} blocked")


async def test_a_lost_connection_fails_every_waiting_call_and_the_next_call_reconnects(
    redis: RedisStores,
) -> None:
    mux = Multiplexed(BlockingConnectionPool.from_url(REDIS_URL), max_in_flight=64)
    try:
        first = await connection_id(mux)
        blocked = asyncio.ensure_future(mux.call("BLPOP", f"{redis.prefix}never", 30))
        behind = [asyncio.ensure_future(mux.call("ECHO", str(i))) for i in range(5)]
        await blocked_in_blpop(redis, first)  # the five wait behind it on the same connection
        assert await redis.raw.client_kill_filter(_id=first) == 1
        async with asyncio.timeout(5):  # at once, not after the BLPOP's 30 s
            failed = await asyncio.gather(blocked, *behind, return_exceptions=True)
        assert all(isinstance(error, RedisConnectionError) for error in failed), failed
        assert await connection_id(mux) != first
        assert await mux.call("ECHO", "again") == b"again"
    finally:
        await mux.aclose()


async def test_close_fails_the_waiting_calls_and_leaves_no_task(redis: RedisStores) -> None:
    mux = Multiplexed(BlockingConnectionPool.from_url(REDIS_URL), max_in_flight=64)
    cid = await connection_id(mux)
    idle = asyncio.all_tasks()
    waiting = [
        asyncio.ensure_future(mux.call("BLPOP", f"{redis.prefix}never", 30)),
        asyncio.ensure_future(mux.call("PING")),
    ]
    async with asyncio.timeout(5):
        await blocked_in_blpop(redis, cid)
        await mux.aclose()
        failed = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(error, RedisConnectionError) for error in failed), failed
    assert asyncio.all_tasks() <= idle  # no writer, reader or connect task left behind


async def test_a_command_that_cannot_be_packed_queues_nothing(redis: RedisStores) -> None:
    mux = Multiplexed(BlockingConnectionPool.from_url(REDIS_URL), max_in_flight=64)
    try:
        with pytest.raises(DataError):
            await mux.call("ECHO", None)
        assert await asyncio.gather(mux.call("ECHO", "a"), mux.call("ECHO", "b")) == [b"a", b"b"]
    finally:
        await mux.aclose()


async def test_calls_past_the_in_flight_bound_wait_unsent_and_closed_stays_closed(
    redis: RedisStores,
) -> None:
    mux = Multiplexed(BlockingConnectionPool.from_url(REDIS_URL), max_in_flight=3)
    cid = await connection_id(mux)
    waiting = [asyncio.ensure_future(mux.call("BLPOP", f"{redis.prefix}never", 30))]
    waiting += [asyncio.ensure_future(mux.call("ECHO", str(i))) for i in range(2)]
    await blocked_in_blpop(redis, cid)
    with pytest.raises(TimeoutError):  # no room: it waits for some, and is never written behind the BLPOP
        await asyncio.wait_for(mux.call("ECHO", "one too many"), 0.2)
    assert mux._line is not None and len(mux._line.waiting) + len(mux._line.outgoing) == 3
    await mux.aclose()
    assert all(
        isinstance(e, RedisConnectionError) for e in await asyncio.gather(*waiting, return_exceptions=True)
    )
    with pytest.raises(RedisConnectionError, match="closed"):
        await mux.call("PING")  # no new connection after close
    assert mux._line is None


async def test_a_call_waiting_for_room_at_close_opens_no_connection(redis: RedisStores) -> None:
    mux = Multiplexed(BlockingConnectionPool.from_url(REDIS_URL), max_in_flight=1)
    cid = await connection_id(mux)
    busy = asyncio.ensure_future(mux.call("BLPOP", f"{redis.prefix}never", 30))
    await blocked_in_blpop(redis, cid)
    queued = asyncio.ensure_future(mux.call("PING"))  # waits for room behind the BLPOP
    await asyncio.sleep(0)  # a turn of the loop: it is waiting on the semaphore
    await mux.aclose()
    failed = await asyncio.gather(busy, queued, return_exceptions=True)
    assert all(isinstance(error, RedisConnectionError) for error in failed), failed
    assert mux._line is None
