"""The audit file writer: one JSON line per record, hash-chained, checkpointed, anchored (CONTRACT §9).

:class:`AuditLog` is deliberately synchronous. ``append`` is called on the event loop before a decision is
acknowledged (no decision reaches the agent before its record is written) and costs a few tens of µs:
build, hash, one ``write(2)`` of one line. A thread hop would cost more than the write.

Guarantees:

- **No fork** (HOSTILE A06): one writer per file, enforced with an exclusive ``flock``; each process or
  replica needs its own file. A failed write leaves the in-memory head unchanged, and a half-written line is
  truncated away, so the next record chains onto the last record that is really on disk.
- **No injection** (A07): each line is ``json.dumps(..., ensure_ascii=True)``: newlines, ANSI escapes and
  other control or non-ASCII characters in agent-supplied fields are escaped and cannot start a new line.
- **Fail closed** (A08): every ``OSError`` becomes :class:`~broker.errors.AuditUnavailable`.
- **Truncation evidence** (A04, HOSTILE §0.5): after each checkpoint the file ``<log>.head`` is replaced
  atomically with ``{"seq", "head", "sig"}`` of that checkpoint. Ship or back up that file separately: a log
  cut below it no longer verifies.
- **Resume**: ``open`` continues an existing log from its last line. A partial last line (crash mid-write),
  a last line whose hash does not check, or a head anchor beyond the end of the log stops the start-up
  with a clear error instead of silently starting a second chain. A log left unsealed by a crash is sealed
  with a checkpoint at once. Rotate a log together with its ``.head`` file.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from broker.audit.chain import (
    DECISIONS,
    EVENTS,
    GENESIS,
    RECORD_FIELDS,
    RESERVED_FIELDS,
    checkpoint_record,
    format_ts,
    record_hash,
    seal,
)
from broker.canonical import strict_loads
from broker.errors import AuditUnavailable, InvalidRequest
from broker.jose import SigningKey

__all__ = ["AuditLog", "head_path_for"]

_MAX_LINE = 1 << 20  # a last line longer than this is not one of ours
# A7: ASCII-only lines; every control character (newline, ESC, ...) and non-ASCII character is escaped.
_LINE_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def head_path_for(path: Path) -> Path:
    """Where the head anchor of the log at ``path`` lives: ``<path>.head``."""
    return path.with_name(path.name + ".head")


def _scrub_surrogates(value: Any) -> Any:
    # A lone surrogate (possible in a JWT claim decoded by a lenient parser) has no UTF-8 form, so JCS
    # cannot hash it; the refusal of that request must still be audited, so record U+FFFD in its place.
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {_scrub_surrogates(k): _scrub_surrogates(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_surrogates(v) for v in value]
    return value


class AuditLog:
    """Append-only, hash-chained JSON-lines audit log with signed checkpoints.

    ``records_written`` counts every line this instance wrote (checkpoints included).
    """

    def __init__(
        self,
        path: Path,
        *,
        signer: SigningKey,
        checkpoint_every: int = 100,
        fsync: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self.path = Path(path)
        self.head_path = head_path_for(self.path)
        self.records_written = 0
        self._signer = signer
        self._checkpoint_every = checkpoint_every
        self._fsync = fsync
        self._clock = clock
        self._file: io.FileIO | None = None
        self._size = 0  # bytes on disk that belong to complete, chained lines
        self._seq = 0
        self._head = GENESIS
        self._since_checkpoint = 0
        self._failed = False  # the last write failed
        self._broken = False  # a partial line could not be removed: refuse every append until restart

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
    def healthy(self) -> bool:
        """Open, and the last write succeeded (for ``/readyz`` and alerts)."""
        return self._file is not None and not self._failed and not self._broken

    # -- lifecycle -----------------------------------------------------------------------------------------

    def open(self) -> None:
        """Open for append (creating parent folders and the file), take the writer lock, resume the chain."""
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
            self._resume(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._file = io.FileIO(fd, "a", closefd=True)
        self._size = size
        self._failed = self._broken = False
        if self._since_checkpoint:
            try:
                self._append_checkpoint(format_ts(self._clock()))  # seal what a crash left unsealed
            except AuditUnavailable:
                self._file.close()
                self._file = None
                raise

    def close(self) -> None:
        """Write a final checkpoint if any record follows the last one, then close (idempotent)."""
        if self._file is None:
            return
        try:
            if self._since_checkpoint and not self._broken:
                self._append_checkpoint(format_ts(self._clock()))
        finally:
            self._file.close()
            self._file = None

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

        ``fields``: ``event`` and ``decision`` from CONTRACT §9's closed sets (not ``checkpoint``, which only
        the log writes), the other CONTRACT fields (missing ones are written as null) and any extra
        JSON-valued fields. ``seq``, ``ts``, ``prev``, ``hash`` and ``sig`` are the log's (ValueError).
        Raises AuditUnavailable if the record could not be written; the chain is then unchanged.
        """
        reserved = RESERVED_FIELDS.intersection(fields)
        if reserved:
            raise ValueError(f"audit fields {sorted(reserved)} are filled in by the log")
        event, decision = fields.get("event"), fields.get("decision")
        if event not in EVENTS or event == "checkpoint":
            raise ValueError(f"audit event {event!r} is not one of CONTRACT §9's")
        if decision not in DECISIONS:
            raise ValueError(f"audit decision {decision!r} is not one of CONTRACT §9's")
        self._check_writable()
        ts = format_ts(self._clock())
        record: dict[str, Any] = {"ts": ts}
        for name in RECORD_FIELDS:
            record[name] = fields.get(name)
        for name, value in fields.items():
            if name not in record:
                record[name] = value
        try:
            sealed = seal(record, seq=self._seq + 1, prev=self._head)
        except UnicodeEncodeError:
            sealed = seal(_scrub_surrogates(record), seq=self._seq + 1, prev=self._head)
        records = [sealed]
        if self._since_checkpoint + 1 >= self._checkpoint_every:
            # Written in the same write(2) as the record: both land, or neither does.
            records.append(
                checkpoint_record(seq=sealed["seq"] + 1, prev=sealed["hash"], ts=ts, signer=self._signer)
            )
        self._commit(records)
        return sealed

    def _append_checkpoint(self, ts: str) -> None:
        self._check_writable()
        self._commit([checkpoint_record(seq=self._seq + 1, prev=self._head, ts=ts, signer=self._signer)])

    def _check_writable(self) -> None:
        if self._file is None:
            raise AuditUnavailable("audit log is not open", reason="audit_closed")
        if self._broken:
            raise AuditUnavailable("audit log unavailable", reason="audit_write_failed")

    def _commit(self, records: list[dict[str, Any]]) -> None:
        """Write the lines, then advance the in-memory chain; on failure nothing advances."""
        data = "".join(_LINE_ENCODER.encode(r) + "\n" for r in records).encode("ascii")
        self._write(data)
        last = records[-1]
        self._seq, self._head = last["seq"], last["hash"]
        self.records_written += len(records)
        if last["event"] == "checkpoint":
            self._since_checkpoint = 0
            self._write_anchor(last)
        else:
            self._since_checkpoint += len(records)

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        written = 0
        try:
            view = memoryview(data)
            while written < len(data):
                count = self._file.write(view[written:])
                if not count:  # a zero-length write would loop forever
                    raise OSError("audit log write made no progress")
                written += count
            if self._fsync:
                os.fsync(self._file.fileno())
        except OSError as exc:
            self._failed = True
            if written:
                self._rollback()
            raise AuditUnavailable("audit log unavailable", reason="audit_write_failed") from exc
        self._size += len(data)
        self._failed = False

    def _rollback(self) -> None:
        # Cut the half-written line so the file still ends with the record our head names.
        assert self._file is not None
        try:
            os.ftruncate(self._file.fileno(), self._size)
        except OSError:
            self._broken = True

    def _write_anchor(self, checkpoint: Mapping[str, Any]) -> None:
        anchor = {"seq": checkpoint["seq"], "head": checkpoint["prev"], "sig": checkpoint["sig"]}
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        try:
            with os.fdopen(os.open(tmp, flags, 0o644), "w", encoding="ascii") as fh:
                fh.write(json.dumps(anchor, separators=(",", ":")) + "\n")
                if self._fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, self.head_path)  # atomic: a reader sees the old anchor or the new one
            if self._fsync:  # make the rename itself durable
                dir_fd = os.open(self.head_path.parent, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            # The records are on disk and chained; only the anchor is stale. Refuse the decision anyway.
            self._failed = True
            raise AuditUnavailable(
                "audit head anchor unavailable", reason="audit_anchor_write_failed"
            ) from exc

    # -- resuming ------------------------------------------------------------------------------------------

    def _resume(self, fd: int, size: int) -> None:
        last = self._last_line(fd, size)
        record: Any = None
        if last is None:
            self._seq, self._head, self._since_checkpoint = 0, GENESIS, 0
        else:
            try:
                record = strict_loads(last)
            except InvalidRequest:
                record = None
            if (
                not isinstance(record, dict)
                or type(record.get("seq")) is not int
                or not isinstance(record.get("prev"), str)
                or not isinstance(record.get("hash"), str)
                or record_hash(record["prev"], record) != record["hash"]
            ):
                raise self._corrupt("its last record does not verify")
            self._seq, self._head = record["seq"], record["hash"]
            self._since_checkpoint = 0 if record.get("event") == "checkpoint" else 1
        self._check_anchor(record)

    def _last_line(self, fd: int, size: int) -> bytes | None:
        if size == 0:
            return None
        if os.pread(fd, 1, size - 1) != b"\n":
            raise self._corrupt("it ends with a partial line (crash during a write?)")
        end = start = size - 1
        chunk = 4096
        buffer = b""
        while True:
            begin = max(0, start - chunk)
            buffer = os.pread(fd, start - begin, begin) + buffer
            start = begin
            newline = buffer.rfind(b"\n")
            if newline >= 0:
                return buffer[newline + 1 :]
            if start == 0:
                return buffer
            if end - start > _MAX_LINE:
                raise self._corrupt("its last line is too long")
            chunk *= 2

    def _check_anchor(self, last: dict[str, Any] | None) -> None:
        try:
            raw = self.head_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise AuditUnavailable(
                f"cannot read {self.head_path}: {exc.strerror}", reason="audit_write_failed"
            ) from exc
        try:
            anchor = strict_loads(raw)
        except InvalidRequest:
            anchor = None
        if not isinstance(anchor, dict) or type(anchor.get("seq")) is not int:
            raise self._corrupt(f"its head anchor {self.head_path} is unreadable")
        if anchor["seq"] > self._seq:
            # Starting here would write new records under seq numbers the anchor already vouches for.
            raise AuditUnavailable(
                f"audit log {self.path} is truncated: head anchor names seq {anchor['seq']} but the log ends "
                f"at {self._seq}; run `broker audit verify` and restore the log",
                reason="audit_log_truncated",
            )
        if last is not None and anchor["seq"] == self._seq and last.get("prev") != anchor.get("head"):
            raise self._corrupt(f"its head anchor {self.head_path} does not match its last record")

    def _corrupt(self, why: str) -> AuditUnavailable:
        return AuditUnavailable(
            f"refusing to continue audit log {self.path}: {why}; run `broker audit verify`",
            reason="audit_log_corrupt",
        )
