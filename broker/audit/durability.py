"""The durable half of the audit log (CONTRACT §15, acknowledged means durable): writing lines, the group-commit
fsync (one in flight at a time, in a worker thread, shared by every record written meanwhile), the head anchor,
and the checkpoint timer. A mixin of :class:`broker.audit.sink.AuditLog`, which owns the state it declares."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import os
import queue
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from broker.errors import AuditUnavailable

log = structlog.get_logger("broker.audit")


class _AnchorError(OSError):
    """The head anchor could not be written (the records themselves are on disk)."""


class _Closed(Exception):
    """The log was closed before a queued fsync ran."""


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def settle(future: asyncio.Future[None], error: BaseException | None = None) -> None:
    if future.done():  # the waiting request was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class SyncThread:
    """The one thread that runs a log's fsync jobs, in order, and answers each on the event loop that asked.

    Not a ``ThreadPoolExecutor``: its per-job layers (a concurrent future, a work item, the idle-thread semaphore,
    the asyncio future chained to it) cost ~50 µs of CPU per fsync on our machines on top of the ~25 µs the
    fsync itself costs (a loop of commits, each waiting for its fsync: 102 against 54 µs per job, and 50 µs less
    latency) — at moderate load, when few records share an fsync, a large part of a request's CPU. A C-level
    queue, a plain thread and one ``call_soon_threadsafe`` per job is all the handoff needs."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._stopped = False
        # the thread holds the queue only, never this object nor a finished job (the log it syncs): a log dropped
        # without close() is collected, its file and lock released, and this thread ends with it
        self._thread = threading.Thread(target=_serve, args=(self._jobs,), name=name, daemon=True)
        self._thread.start()
        weakref.finalize(self, self._jobs.put, None)

    def run(self, job: Callable[[Any], None], argument: Any) -> asyncio.Future[None]:
        """``job(argument)`` on the thread; the future (of the running loop) gets its result or exception."""
        if self._stopped:
            raise RuntimeError("the fsync thread was stopped")  # a bug: nothing would ever answer the job
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._jobs.put((job, argument, loop, future))
        return future

    def stop(self) -> None:
        """The thread ends after the jobs already queued. It is not waited for, and it is a daemon: interpreter
        exit does not wait for an fsync in flight (its committers were not answered, so nothing acknowledged is
        lost; an anchor being replaced stays the older one) — a hung disk cannot hold the process."""
        self._stopped = True
        self._jobs.put(None)


_Job = tuple[Callable[[Any], None], Any, asyncio.AbstractEventLoop, "asyncio.Future[None]"]


def _serve(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while (item := jobs.get()) is not None:
        job, argument, loop, future = item
        error: BaseException | None = None
        try:
            job(argument)
        except BaseException as exc:  # handed to the waiting coroutine, which decides
            error = exc
        # the job (the log it syncs) is forgotten before it is answered: once its committer has its answer, nothing
        # here keeps the log alive — not even for the moment until this thread waits for the next job
        item = job = argument = None  # type: ignore[assignment]
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits for this answer now
            loop.call_soon_threadsafe(settle, future, error)
        loop = future = error = None  # type: ignore[assignment]


class SealTimer:
    """The checkpoint timer both stores share (CONTRACT §15: sealed at least every ``checkpoint_seconds``):
    armed by the first unsealed record, it calls the store's ``_seal_due`` once; None seconds: never."""

    _checkpoint_seconds: float | None
    _timer: asyncio.TimerHandle | None

    def _seal_due(self) -> None:
        raise NotImplementedError  # the store's own

    def _arm_timer(self) -> None:
        if self._checkpoint_seconds is None or self._timer is not None:
            return
        loop = running_loop()
        if loop is not None:
            self._timer = loop.call_later(self._checkpoint_seconds, self._seal_due)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Durability(SealTimer):
    """Writing, group commit and sealing on a timer; the attributes are :class:`~broker.audit.sink.AuditLog`'s."""

    head_path: Path
    fsyncs: int
    _file: io.FileIO | None
    _fsync: bool
    _fsync_fn: Callable[[int], None]
    _size: int
    _seq: int
    _since_checkpoint: int
    _failed: bool
    _broken: bool
    _durable_seq: int
    _waiters: collections.deque[tuple[int, asyncio.Future[None]]]
    _flusher: asyncio.Task[None] | None
    _sync_thread: SyncThread | None
    _anchor_due: dict[str, Any] | None
    _anchored_seq: int
    _io_lock: threading.Lock

    def _append_checkpoint(self, *, sync: bool) -> None:
        raise NotImplementedError  # the log's own

    def _write(self, data: bytes, *, sync: bool) -> None:
        assert self._file is not None
        written = 0
        try:
            view = memoryview(data)
            while written < len(data):
                count = self._file.write(view[written:])
                if not count:  # a zero-length write would loop forever
                    raise OSError("audit log write made no progress")
                written += count
            if sync:
                self._fsync_fn(self._file.fileno())
                self.fsyncs += 1
        except OSError as exc:
            self._failed = True
            if written:
                self._rollback()
            raise AuditUnavailable("audit log unavailable", reason="audit_write_failed") from exc
        self._size += len(data)
        if sync or not self._fsync:
            self._failed = False  # with group commit, only a successful fsync makes the log healthy again

    def _rollback(self) -> None:
        # Cut the half-written (or unsynced) lines so the file still ends with the record our head names.
        assert self._file is not None
        try:
            os.ftruncate(self._file.fileno(), self._size)
        except OSError:
            self._broken = True

    def _sync_now(self) -> None:
        """fsync on this thread and write the anchor due; raises AuditUnavailable."""
        assert self._file is not None
        try:
            self._fsync_fn(self._file.fileno())
            self.fsyncs += 1
        except OSError as exc:
            self._failed = True
            raise AuditUnavailable("audit log unavailable", reason="audit_write_failed") from exc
        self._durable(self._seq)
        if self._anchor_due is not None:
            self._write_anchor(self._anchor_due)
            self._anchor_due = None

    def _write_anchor(self, checkpoint: Mapping[str, Any]) -> None:
        try:
            with self._io_lock:
                self._anchor_io(checkpoint)
        except OSError as exc:
            # The records are on disk and chained; only the anchor is stale. Refuse the decision anyway.
            self._failed = True
            raise AuditUnavailable(
                "audit head anchor unavailable", reason="audit_anchor_write_failed"
            ) from exc

    def _anchor_io(self, checkpoint: Mapping[str, Any]) -> None:
        """Replace ``<log>.head`` with this checkpoint (call with ``_io_lock`` held; raises OSError).

        With ``fsync=True`` only once the checkpoint itself is durable, and the new anchor is synced before the
        rename: after a power loss the anchor is the old one or the new one, never ahead of the log. The rename
        is not synced: an older anchor is only weaker evidence, not a false alarm."""
        if checkpoint["seq"] <= self._anchored_seq:
            return  # a newer anchor is already in place
        anchor = {"seq": checkpoint["seq"], "head": checkpoint["prev"], "sig": checkpoint["sig"]}
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(tmp, flags, 0o644), "w", encoding="ascii") as fh:
            fh.write(json.dumps(anchor, separators=(",", ":")) + "\n")
            if self._fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, self.head_path)  # atomic: a reader sees the old anchor or the new one
        self._anchored_seq = checkpoint["seq"]

    # -- group commit --------------------------------------------------------------------------------------

    def _durable(self, seq: int) -> None:
        self._durable_seq = max(self._durable_seq, seq)
        while self._waiters and self._waiters[0][0] <= self._durable_seq:
            settle(self._waiters.popleft()[1])

    def _refuse_waiters(self, reason: str) -> None:
        """Every committer waiting now gets AuditUnavailable: nothing is acknowledged on a failure."""
        error = AuditUnavailable("audit log unavailable", reason=reason)
        while self._waiters:
            settle(self._waiters.popleft()[1], error)

    def _kick(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        """One fsync at a time, each covering every record written before it started; until all are durable."""
        # the anchor taken from _anchor_due and not yet written: put back if the loop fails
        anchor: dict[str, Any] | None = None
        try:
            while self._file is not None and (self._durable_seq < self._seq or self._anchor_due is not None):
                target, anchor = self._seq, self._anchor_due
                self._anchor_due = None
                if self._sync_thread is None:
                    self._sync_thread = SyncThread("audit-fsync")
                try:
                    await self._sync_thread.run(self._sync_job, anchor)
                except _Closed:
                    return
                except OSError as exc:
                    anchor_failed = isinstance(exc, _AnchorError)
                    if anchor_failed:
                        self._durable_seq = max(self._durable_seq, target)  # the records made it
                    if anchor is not None and self._anchor_due is None:
                        self._anchor_due = anchor  # retried with the next batch
                    self._failed = True
                    reason = "audit_anchor_write_failed" if anchor_failed else "audit_write_failed"
                    log.error(
                        "audit fsync failed", reason=reason, error=str(exc.__cause__ or exc), seq=target
                    )
                    self._refuse_waiters(reason)
                    return  # the next commit starts a new batch
                anchor = None
                self._failed = False
                self._durable(target)
        except BaseException as exc:
            if anchor is not None and self._anchor_due is None:
                self._anchor_due = anchor  # written with the next batch, as after an OSError
            # anything else (a bug in the job, the flusher cancelled at shutdown): nothing waiting may hang, and
            # nothing is acknowledged — the waiters are refused, the log unhealthy unless it was only a cancellation
            if not isinstance(exc, asyncio.CancelledError):
                self._failed = True
                log.error("audit fsync failed", reason="audit_write_failed", error=repr(exc))
            self._refuse_waiters("audit_write_failed")
            if not isinstance(exc, Exception):
                raise  # cancellation, exit: they go on; a bug is logged above, not left to the task's collector
        finally:
            self._flusher = None

    def _sync_job(self, anchor: Mapping[str, Any] | None) -> None:
        """In the fsync thread: fsync the log, then write the anchor of a checkpoint it covers."""
        with self._io_lock:
            file = self._file
            if file is None:
                raise _Closed
            self._fsync_fn(file.fileno())
            self.fsyncs += 1
            if anchor is not None:
                try:
                    self._anchor_io(anchor)
                except OSError as exc:
                    raise _AnchorError(str(exc)) from exc

    # -- the checkpoint timer ------------------------------------------------------------------------------

    def _seal_due(self) -> None:
        self._timer = None
        if not self._since_checkpoint or self._file is None or self._broken:
            return
        try:
            self._append_checkpoint(sync=False)
        except AuditUnavailable as exc:
            log.error("audit checkpoint could not be written", reason=exc.reason)
            self._arm_timer()  # try again later
