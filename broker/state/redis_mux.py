"""One pipelined connection to a single Redis server, shared by every script call of the process.

The store's hot path is one script per request (the guard; a counter reservation where rules count). On a pool
each call takes a connection, writes, waits for its reply and gives the connection back: a write and a read
system call and two task switches per call, plus the pool's lock. Here every call writes onto one connection and
the replies come back in order (Redis answers one connection's commands in the order it received them): the
calls made in one event-loop iteration go out in one write, and one read takes every reply that has arrived —
the multiplexing StackExchange.Redis and Lettuce do. The commands stay separate commands (a script is atomic on
its own; nothing here is a transaction).

Built on redis-py's public connection API (``ConnectionPool.make_connection``, ``Connection.connect``,
``send_packed_command``, ``read_response``), so the connection is opened exactly as the pool would open it: every
``redis://``/``rediss://`` URL option (TLS, AUTH, database, timeouts) holds unchanged.

Failure: an error reply fails only its own call (the connection is still in step). Anything else — a connection
error, no reply within the socket timeout while a call waits, EOF — fails every call waiting on that connection
with that error and retires it (so one reply later than the socket timeout fails every call then in flight, where
a pool failed only the slow one; the store's scripts are short); the next call opens a new one (the store retries a connection error once, as on
the pool). A call cancelled while it waits (its operation's timeout) leaves its reply to be read and dropped, so
no reply is ever taken for another call's.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError


class _Line:
    """One connection and the calls waiting on it, in the order they were written."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.opened: asyncio.Task[None] = asyncio.get_running_loop().create_task(connection.connect())  # type: ignore[no-untyped-call]
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        #: calls not written yet, with their command: one whose caller gave up before its turn is never sent
        self.outgoing: list[tuple[asyncio.Future[Any], bytes]] = []
        self.writer: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.broken: BaseException | None = None


class Multiplexed:
    """Script calls on one connection (module docstring). ``pool``: the store's single-server pool, whose
    connection settings (URL options) the connection takes."""

    def __init__(self, pool: ConnectionPool, *, max_in_flight: int) -> None:
        self._pool = pool
        #: one unit per call queued or sent and not yet answered, given back when its reply is read (not when its
        #: caller gives up: the command still runs), when it is dropped unsent, or when its connection is retired
        self._room = asyncio.BoundedSemaphore(max_in_flight)  # a release too many raises
        self._line: _Line | None = None
        self._closed = False

    async def call(self, *args: Any) -> Any:
        """Send one command and return its reply; an error reply is raised as redis-py raises it.

        At most ``max_in_flight`` calls are queued or sent at once: one more waits for room (within its
        operation's timeout, as a call waited for a pooled connection) rather than piling commands onto a Redis
        that cannot keep up."""
        if self._closed:
            raise RedisConnectionError("the Redis store is closed")
        await self._room.acquire()
        try:
            if self._closed:  # closed while this call waited for room: no connection is opened again
                raise RedisConnectionError("the Redis store is closed")
            line = self._line or self._open()
            if not line.opened.done():
                # shared by every caller that arrives while it connects: waited on, never cancelled by one
                # caller's timeout; its outcome (an error, a cancellation at close) is line.broken, checked below
                await asyncio.wait({line.opened})
            if line.broken is not None:
                raise line.broken
            # before queueing: a command that cannot be packed queues nothing
            packed = b"".join(line.connection.pack_command(*args))
        except BaseException:
            self._room.release()
            raise
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        line.outgoing.append((future, packed))
        if line.writer is None:  # runs next iteration: every call made in this one goes out in one write
            line.writer = loop.create_task(self._write(line))
        return await future

    def _open(self) -> _Line:
        line = self._line = _Line(self._pool.make_connection())  # type: ignore[no-untyped-call]

        def opened(task: asyncio.Task[None]) -> None:
            if task.cancelled():
                self._retire(line, asyncio.CancelledError())
            elif task.exception() is not None:
                self._retire(line, task.exception())  # type: ignore[arg-type]

        line.opened.add_done_callback(opened)
        return line

    async def _write(self, line: _Line) -> None:
        try:
            while line.outgoing and line.broken is None:
                batch = [(future, packed) for future, packed in line.outgoing if not future.done()]
                for _ in range(len(line.outgoing) - len(batch)):
                    self._room.release()  # dropped unsent: its caller gave up before its turn
                line.outgoing.clear()
                if not batch:
                    continue
                # waiting before the write: a reply can only come for a command that is in it, in this order
                line.waiting.extend(future for future, _ in batch)
                if line.reader is None:
                    line.reader = asyncio.get_running_loop().create_task(self._read(line))
                await line.connection.send_packed_command(b"".join(p for _, p in batch), check_health=False)
        except BaseException as exc:  # every waiting call must learn of it, of a cancellation too
            self._retire(line, exc)
        finally:
            line.writer = None

    async def _read(self, line: _Line) -> None:
        try:
            while line.waiting and line.broken is None:
                try:
                    reply: Any = await line.connection.read_response()
                except ResponseError as error:  # an error reply, read whole: only its call fails
                    reply = error
                if line.broken is not None:  # retired meanwhile (the writer failed): the calls are failed
                    return
                future = line.waiting.popleft()
                self._room.release()
                if future.done():  # its caller gave up (timeout, cancellation): the reply is dropped
                    continue
                if isinstance(reply, ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except BaseException as exc:  # as in _write
            self._retire(line, exc)
        finally:
            line.reader = None

    def _retire(self, line: _Line, exc: BaseException) -> None:
        """The connection is out of step or gone: fail everything waiting on it; the next call opens another."""
        if line.broken is not None:
            return
        if isinstance(exc, asyncio.CancelledError):
            exc = RedisConnectionError("the Redis connection was closed")
        line.broken = exc
        waiting, line.waiting = line.waiting, collections.deque()
        waiting.extend(future for future, _ in line.outgoing)
        line.outgoing.clear()
        for future in waiting:
            self._room.release()
            if not future.done():
                future.set_exception(exc)
        if self._line is line:
            self._line = None

    async def aclose(self) -> None:
        # no later call opens a connection again (the store retries a ConnectionError once)
        self._closed = True
        line, self._line = self._line, None
        if line is None:
            return
        for task in (line.opened, line.writer, line.reader):
            if task is not None and not task.done():
                task.cancel()
        self._retire(line, RedisConnectionError("the Redis connection was closed"))
        await line.connection.disconnect()
