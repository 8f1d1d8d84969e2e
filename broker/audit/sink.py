"""The audit file writer: one JSON line per record, hash-chained, checkpointed, anchored (CONTRACT §9, §15).

Writing is synchronous and in order: ``append`` builds, hashes and writes one line with one ``write(2)`` on the
event loop (a few tens of µs), so the chain has a total order. Durability is separate:

- ``await commit(fields)`` appends, then returns only once an fsync covering the record has completed
  (**group commit**): one fsync is in flight at a time, in a worker thread so the event loop keeps running;
  every record written meanwhile waits for the next one, so concurrent committers share an fsync. With
  ``fsync=False`` (benchmarks only) ``commit`` returns as soon as the line is written.
- ``append(fields)`` is the blocking form: with ``fsync=True`` it fsyncs before returning (start-up,
  shutdown, tests and callers that have no event loop).

Guarantees:

- **No fork** (HOSTILE A06): one writer per file, enforced with an exclusive ``flock``; each process or
  replica needs its own file. A failed write leaves the in-memory head unchanged, and a half-written line is
  truncated away, so the next record chains onto the last record that is really on disk.
- **No injection** (A07): each line is ``json.dumps(..., ensure_ascii=True)``: newlines, ANSI escapes and
  other control or non-ASCII characters in agent-supplied fields are escaped and cannot start a new line.
- **Fail closed** (A08): every ``OSError`` becomes :class:`~broker.errors.AuditUnavailable`; a failed fsync
  fails every committer waiting on it and marks the log unhealthy until an fsync succeeds again.
- **Truncation evidence** (A04, HOSTILE §0.5): after each checkpoint is on disk the file ``<log>.head`` is
  replaced atomically with ``{"seq", "head", "sig"}`` of that checkpoint (never ahead of what is durable in the
  log). Ship or back up that file separately: a log cut below it no longer verifies.
- **Small unsealed window**: a checkpoint every ``checkpoint_every`` records and, with an event loop running,
  at most ``checkpoint_seconds`` after any record (an idle log is sealed too).
- **Resume without trust** (§15): ``open`` walks back from the end of an existing log to the last checkpoint
  whose signature verifies with the broker's keys, checking every record's hash and link on the way. Records
  after it were not written by this process and nothing proves a broker wrote them (appended while the broker
  was down, or a crash's unsealed tail, perhaps rewritten): before anything else the broker appends an
  ``audit_resume`` record naming the first of them and the SHA-256 of the file as found, logs a warning and
  calls ``on_resume``; ``broker audit verify`` then reports them as unverified. A partial last line (crash
  mid-write), a record in that tail whose hash or link does not check, a head anchor beyond the end of the log
  or not matching its record stops the start-up with a clear error instead. Rotate a log with its ``.head``.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import hashlib
import io
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from broker.audit.chain import GENESIS, Keys, checkpoint_record, format_ts, load_keys, resume_record
from broker.audit.durability import Durability, SyncThread, running_loop, settle
from broker.audit.records import decision_record, encode_line, seal_scrubbed
from broker.audit.tail import ResumeReport, corrupt, scan_tail
from broker.errors import AuditUnavailable
from broker.jose import JoseError, SigningKey

__all__ = ["AuditLog", "ResumeReport", "head_path_for"]

log = structlog.get_logger("broker.audit")

#: the data of an append-only file (and its size) is what matters; its mtime need not reach the disk
_DEFAULT_FSYNC: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def head_path_for(path: Path) -> Path:
    """Where the head anchor of the log at ``path`` lives: ``<path>.head``."""
    return path.with_name(path.name + ".head")


class AuditLog(Durability):
    """Append-only, hash-chained JSON-lines audit log with signed checkpoints and group commit.

    ``signer`` signs checkpoints; ``trusted_jwks`` (default: the signer's published keys — a
    :class:`~broker.keys.KeyRing` includes its previous keys) are the keys whose checkpoints ``open`` accepts
    as anchors. ``checkpoint_seconds`` (None: only by count) bounds how long a record stays unsealed while an
    event loop runs. ``fsync_fn`` (default ``os.fdatasync``) syncs the log file; tests inject it to count or
    fail fsyncs. ``on_resume`` is called once ``open`` has written an ``audit_resume`` record.

    ``records_written`` counts every line this instance wrote (checkpoints included); ``fsyncs`` the fsyncs
    of the log file; ``resumed`` is the last :class:`ResumeReport` (None if the last ``open`` found none).
    """

    def __init__(
        self,
        path: Path,
        *,
        signer: SigningKey,
        checkpoint_every: int = 100,
        checkpoint_seconds: float | None = None,
        fsync: bool = False,
        clock: Callable[[], float] = time.time,
        trusted_jwks: Mapping[str, Any] | None = None,
        on_resume: Callable[[ResumeReport], None] | None = None,
        fsync_fn: Callable[[int], None] | None = None,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        if checkpoint_seconds is not None and checkpoint_seconds <= 0:
            raise ValueError("checkpoint_seconds must be positive")
        self.path = Path(path)
        self.head_path = head_path_for(self.path)
        self.records_written = 0
        self.fsyncs = 0
        self.resumed: ResumeReport | None = None
        self._signer = signer
        self._trusted_jwks = trusted_jwks
        self._on_resume = on_resume
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = checkpoint_seconds
        self._fsync = fsync
        self._fsync_fn = fsync_fn or _DEFAULT_FSYNC
        self._clock = clock
        self._file: io.FileIO | None = None
        self._size = 0  # bytes on disk that belong to complete, chained lines
        self._seq = 0
        self._head = GENESIS
        self._since_checkpoint = 0
        self._failed = False  # the last write, fsync or anchor write failed
        self._broken = False  # a partial line could not be removed: refuse every append until restart
        # group commit (all touched on the event loop's thread only, except where noted)
        self._durable_seq = 0  # every record up to this seq is covered by a completed fsync
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._flusher: asyncio.Task[None] | None = None
        self._sync_thread: SyncThread | None = None
        self._anchor_due: dict[str, Any] | None = None  # a checkpoint written whose anchor is not yet
        self._anchored_seq = 0  # seq of the checkpoint <log>.head names (under _io_lock)
        # held by the fsync thread while it uses the file descriptor, and to write the anchor or close the file
        self._io_lock = threading.Lock()
        self._timer: asyncio.TimerHandle | None = None

    # -- state ---------------------------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        """``seq`` of the last record on disk (0 for an empty log)."""
        return self._seq

    @property
    def head(self) -> str:
        """``hash`` of the last record on disk (GENESIS for an empty log)."""
        return self._head

    @property
    def durable_seq(self) -> int:
        """``seq`` up to which every record is covered by a completed fsync (with ``fsync=True``)."""
        return self._durable_seq

    @property
    def unsealed(self) -> int:
        """Records written after the last checkpoint."""
        return self._since_checkpoint

    @property
    def healthy(self) -> bool:
        """Open, and the last write, fsync or anchor write succeeded (for ``/readyz`` and alerts)."""
        return self._file is not None and not self._failed and not self._broken

    # -- lifecycle -----------------------------------------------------------------------------------------

    def open(self) -> None:
        """Open for append (creating parent folders and the file), take the writer lock, resume the chain.

        Raises AuditUnavailable if the file cannot be opened or locked, or the log cannot be resumed."""
        if self._file is not None:
            raise RuntimeError("audit log already open")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditUnavailable(
                f"cannot open audit log {self.path}: {exc.strerror}", reason="audit_write_failed"
            ) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditUnavailable(
                    f"audit log {self.path} is in use by another writer", reason="audit_log_locked"
                ) from None
            size = os.fstat(fd).st_size
            found = self._resume(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._file = io.FileIO(fd, "a", closefd=True)
        self._size = size
        self._failed = self._broken = False
        self._durable_seq = self._seq
        self.resumed = None
        if found is not None:
            try:
                self._write_resume(*found)
            except AuditUnavailable:
                self._file.close()
                self._file = None
                raise

    def close(self) -> None:
        """Write a final checkpoint if any record follows the last one, fsync, then close (idempotent).

        Safe while an fsync is in flight (it waits for it); prefer :meth:`aclose` on an event loop."""
        if self._file is None:
            return
        self._cancel_timer()
        try:
            if self._since_checkpoint and not self._broken:
                self._append_checkpoint(sync=True)
            elif self._fsync and not self._broken and (self._durable_seq < self._seq or self._anchor_due):
                self._sync_now()
        finally:
            with self._io_lock:
                self._file.close()
                self._file = None
            closed = AuditUnavailable("audit log closed", reason="audit_closed")
            while self._waiters:
                seq, future = self._waiters.popleft()
                settle(future, None if seq <= self._durable_seq else closed)
            if self._sync_thread is not None:
                self._sync_thread.stop()
                self._sync_thread = None

    async def start(self) -> None:
        """:meth:`open`, as :class:`broker.audit.store.AuditSink` names it for the server."""
        self.open()

    async def aclose(self) -> None:
        """:meth:`close` after the fsync in flight (if any) has finished and its committers were answered."""
        self._cancel_timer()
        flusher = self._flusher
        if flusher is not None:
            await asyncio.wait([flusher])
        self.close()

    def __enter__(self) -> AuditLog:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------------------

    def append(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Write one decision record and return it as written (with ``seq``, ``ts``, ``prev``, ``hash``).

        ``fields``: ``event`` and ``decision`` from CONTRACT §9's closed sets (not ``checkpoint`` or
        ``audit_resume``, which only the log writes), the other CONTRACT fields (missing ones are written as
        null) and any extra JSON-valued fields. ``seq``, ``ts``, ``prev``, ``hash`` and ``sig`` are the log's
        (ValueError). With ``fsync=True`` the record is on stable storage when this returns (one fsync, on this
        thread: use :meth:`commit` on the event loop). Raises AuditUnavailable if the record could not be
        written (the chain is then unchanged) or synced.
        """
        return self._append(fields, sync=True)

    async def commit(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Append one decision record (as :meth:`append`) and return it once it is on stable storage.

        Group commit: the record is written at once, in order; with ``fsync=True`` this then waits for an
        fsync that covers it, shared with every record written meanwhile. Raises ValueError as ``append``, and
        AuditUnavailable if the record could not be written or the fsync (or the head anchor write of a
        checkpoint in the same batch) failed — the decision must then be refused.
        """
        record = self._append(fields, sync=False)
        await self.flush(record["seq"])
        return record

    async def persist(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record (as :meth:`append`: written to the file at once, in order) without waiting for
        its fsync: the next group commit, started here, makes it durable (see AuditSink.persist)."""
        record = self._append(fields, sync=False)
        if self._fsync:
            self._kick()
        return record

    async def flush(self, seq: int | None = None) -> None:
        """Return once every record up to ``seq`` (default: all written so far) is on stable storage.

        Immediate with ``fsync=False``. Raises AuditUnavailable if the fsync failed or the log was closed."""
        target = self._seq if seq is None else seq
        if not self._fsync or target <= self._durable_seq:
            return
        if self._file is None:
            raise AuditUnavailable("audit log is not open", reason="audit_closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        self._kick()
        await future

    def _append(self, fields: Mapping[str, Any], *, sync: bool) -> dict[str, Any]:
        unsealed = decision_record(fields, ts="")
        self._check_writable()
        unsealed["ts"] = ts = format_ts(self._clock())
        sealed = seal_scrubbed(unsealed, seq=self._seq + 1, prev=self._head)
        records = [sealed]
        if self._since_checkpoint + 1 >= self._checkpoint_every:
            # Written in the same write(2) as the record: both land, or neither does.
            records.append(
                checkpoint_record(seq=sealed["seq"] + 1, prev=sealed["hash"], ts=ts, signer=self._signer)
            )
        self._commit(records, sync=sync)
        return sealed

    def _append_checkpoint(self, *, sync: bool) -> None:
        self._check_writable()
        ts = format_ts(self._clock())
        self._commit(
            [checkpoint_record(seq=self._seq + 1, prev=self._head, ts=ts, signer=self._signer)], sync=sync
        )

    def _check_writable(self) -> None:
        if self._file is None:
            raise AuditUnavailable("audit log is not open", reason="audit_closed")
        if self._broken:
            raise AuditUnavailable("audit log unavailable", reason="audit_write_failed")

    def _commit(self, records: list[dict[str, Any]], *, sync: bool) -> None:
        """Write the lines, then advance the in-memory chain; on failure nothing advances.

        ``sync``: with ``fsync=True``, fsync (and write the anchor of a checkpoint) before returning; otherwise
        leave both to the group-commit flusher (when an event loop runs)."""
        loop = None if sync or not self._fsync else running_loop()
        inline = self._fsync and loop is None
        data = "".join(encode_line(r) + "\n" for r in records).encode("ascii")
        self._write(data, sync=inline)
        last = records[-1]
        self._seq, self._head = last["seq"], last["hash"]
        self.records_written += len(records)
        if last["event"] == "checkpoint":
            self._since_checkpoint = 0
            self._cancel_timer()
        else:
            self._since_checkpoint += len(records)
            self._arm_timer()
        if not self._fsync:
            if last["event"] == "checkpoint":
                self._write_anchor(last)
            return
        if last["event"] == "checkpoint":
            self._anchor_due = last
        if inline:
            self._durable(self._seq)
            if self._anchor_due is not None:
                self._write_anchor(self._anchor_due)
                self._anchor_due = None
        else:
            self._kick()

    # -- resuming ------------------------------------------------------------------------------------------

    def _keys(self) -> Keys:
        jwks = self._trusted_jwks
        if jwks is None:
            published = getattr(self._signer, "jwks", None)
            jwks = published(self._clock()) if callable(published) else {"keys": [self._signer.public_jwk()]}
        try:
            return load_keys(jwks)
        except JoseError as exc:
            raise AuditUnavailable(f"unusable audit verification keys: {exc}", reason="audit_keys") from exc

    def _resume(self, fd: int, size: int) -> tuple[int, int, int] | None:
        """Set the chain state from the log's end (:func:`broker.audit.tail.scan_tail`); return (first unverified
        seq, its offset, anchor seq) or None."""
        found = scan_tail(fd, size, path=self.path, head_path=self.head_path, keys=self._keys)
        self._seq, self._head, self._since_checkpoint = found.seq, found.head, 0
        self._anchored_seq = found.anchored_seq
        return found.unverified

    def _write_resume(self, unverified_from: int, unverified_offset: int, anchor_seq: int) -> None:
        """Name the records nothing vouches for in an ``audit_resume`` record, then seal it."""
        assert self._file is not None
        digest = hashlib.sha256()
        position = 0
        while position < self._size:
            chunk = os.pread(self._file.fileno(), min(1 << 20, self._size - position), position)
            if not chunk:
                raise self._corrupt("it changed while it was being read")
            digest.update(chunk)
            position += len(chunk)
        ts = format_ts(self._clock())
        resume = resume_record(
            seq=self._seq + 1,
            prev=self._head,
            ts=ts,
            unverified_from=unverified_from,
            anchor_seq=anchor_seq,
            unverified_offset=unverified_offset,
            file_bytes=self._size,
            file_sha256=digest.hexdigest(),
        )
        checkpoint = checkpoint_record(seq=resume["seq"] + 1, prev=resume["hash"], ts=ts, signer=self._signer)
        self._commit([resume, checkpoint], sync=True)
        report = ResumeReport(
            resume_seq=resume["seq"],
            unverified_from=unverified_from,
            unverified_to=resume["seq"] - 1,
            anchor_seq=anchor_seq,
            unverified_offset=unverified_offset,
            file_bytes=resume["file_bytes"],
            file_sha256=resume["file_sha256"],
        )
        self.resumed = report
        log.warning(
            "audit log resumed with unverified records",
            path=str(self.path),
            unverified_from=report.unverified_from,
            unverified_to=report.unverified_to,
            unverified_records=report.unverified_records,
            anchor_seq=anchor_seq,
            file_sha256=report.file_sha256,
            resume_seq=report.resume_seq,
        )
        if self._on_resume is not None:
            self._on_resume(report)

    def _corrupt(self, why: str) -> AuditUnavailable:
        return corrupt(self.path, why)
