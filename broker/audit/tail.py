"""Where an audit log stands when it is opened (CONTRACT §15, resume without trust): read from its end back to the
last checkpoint whose signature verifies with the broker's keys, checking every record's hash and link on the
way. Records after that checkpoint are what nothing proves a broker wrote; :class:`broker.audit.sink.AuditLog`
names them in an ``audit_resume`` record. Reads only (``os.pread`` on the caller's descriptor)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.audit.chain import GENESIS, Keys, checkpoint_problem, parse_anchor, record_hash
from broker.canonical import strict_loads
from broker.errors import AuditUnavailable, InvalidRequest

__all__ = ["ResumeReport", "Tail", "corrupt", "scan_tail"]

_MAX_LINE = 1 << 20  # a line longer than this is not one of ours
_READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class ResumeReport:
    """What ``open`` found after the last verifiable checkpoint, as written in the ``audit_resume`` record."""

    #: the ``audit_resume`` record's own seq
    resume_seq: int
    #: first and last seq of the records nothing proves a broker wrote
    unverified_from: int
    unverified_to: int
    #: seq of the last checkpoint whose signature verified (0: none)
    anchor_seq: int
    #: byte offset of the first unverified record
    unverified_offset: int
    #: size of the log as found, and the hex SHA-256 of those bytes
    file_bytes: int
    file_sha256: str

    @property
    def unverified_records(self) -> int:
        return self.unverified_to - self.unverified_from + 1


@dataclass(frozen=True)
class Tail:
    """The chain state at the log's end, and what follows the last verifiable checkpoint."""

    seq: int
    head: str
    #: seq of the checkpoint the head anchor (``<log>.head``) names (0: none)
    anchored_seq: int
    #: (first unverified seq, its byte offset, seq of the last verifiable checkpoint), or None
    unverified: tuple[int, int, int] | None


def corrupt(path: Path, why: str) -> AuditUnavailable:
    return AuditUnavailable(
        f"refusing to continue audit log {path}: {why}; run `broker audit verify`",
        reason="audit_log_corrupt",
    )


def scan_tail(fd: int, size: int, *, path: Path, head_path: Path, keys: Callable[[], Keys]) -> Tail:
    """Walk back from the last record to the last checkpoint signed by a trusted key, checking each record's hash
    and its link to the next one. A partial last line, a broken link or hash in that tail, or a head anchor that
    is ahead of the log or does not match its record raise AuditUnavailable (the broker does not start)."""
    if size and os.pread(fd, 1, size - 1) != b"\n":
        raise corrupt(path, "it ends with a partial line (crash during a write?)")
    anchor = read_anchor(head_path, path)
    trusted = keys()
    seq_at_end, head = 0, GENESIS
    later: dict[str, Any] | None = None  # the record after the current one
    tail_offset = 0
    anchor_seq = 0
    for offset, line in lines_backwards(fd, size, path):
        record = parse_record(line)
        if record is None:
            raise corrupt(
                path,
                "its last record does not verify"
                if later is None
                else f"the record before seq {later['seq']} (byte {offset}) does not verify",
            )
        seq = record["seq"]
        if later is None:
            seq_at_end, head = seq, record["hash"]
            if anchor is not None and anchor["seq"] > seq:
                # Starting here would write new records under seq numbers the anchor already vouches for.
                raise AuditUnavailable(
                    f"audit log {path} is truncated: head anchor names seq {anchor['seq']} but the log "
                    f"ends at {seq}; run `broker audit verify` and restore the log",
                    reason="audit_log_truncated",
                )
        elif later["prev"] != record["hash"] or later["seq"] != seq + 1:
            raise corrupt(path, f"its chain is broken before seq {later['seq']}")
        if (
            anchor is not None
            and seq == anchor["seq"]
            and (
                record.get("event") != "checkpoint"
                or record["prev"] != anchor["head"]
                or record.get("sig") != anchor["sig"]
            )
        ):
            raise corrupt(path, f"its head anchor {head_path} does not match its record seq {seq}")
        if record.get("event") == "checkpoint":
            claims = {"seq": seq, "head": record["prev"], "ts": record.get("ts")}
            if checkpoint_problem(record.get("sig"), claims=claims, keys=trusted) is None:
                anchor_seq, tail_offset = seq, offset + len(line) + 1
                break
        later = record
    else:
        # no checkpoint we can verify (an anchor met on the way matched its record but not our keys)
        if later is not None and (later["seq"] != 1 or later["prev"] != GENESIS):
            raise corrupt(path, "its first record is not seq 1 chained to genesis")
        if later is None and anchor is not None:
            raise AuditUnavailable(
                f"audit log {path} is truncated: head anchor names seq {anchor['seq']} but the log is "
                "empty; run `broker audit verify` and restore the log",
                reason="audit_log_truncated",
            )
    anchored = anchor["seq"] if anchor is not None else 0
    unverified = None if anchor_seq == seq_at_end else (anchor_seq + 1, tail_offset, anchor_seq)
    return Tail(seq=seq_at_end, head=head, anchored_seq=anchored, unverified=unverified)


def parse_record(line: bytes) -> dict[str, Any] | None:
    """The record on this line if it is well-formed and its hash matches its content."""
    try:
        record = strict_loads(line)
    except InvalidRequest:
        return None
    if (
        not isinstance(record, dict)
        or type(record.get("seq")) is not int
        or not isinstance(record.get("prev"), str)
        or not isinstance(record.get("hash"), str)
        or not record["prev"].isascii()
        or record_hash(record["prev"], record) != record["hash"]
    ):
        return None
    return record


def lines_backwards(fd: int, size: int, path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, line without its newline) from the last line to the first; the file ends with a newline."""
    if size == 0:
        return
    position = size - 1  # the buffer holds the bytes [position, position + stop)
    buffer = b""
    stop = 0
    while True:
        newline = buffer.rfind(b"\n", 0, stop)
        if newline >= 0:
            yield position + newline + 1, buffer[newline + 1 : stop]
            stop = newline
            continue
        if position == 0:
            yield 0, buffer[:stop]
            return
        if stop > _MAX_LINE:
            raise corrupt(path, "it holds a line that is too long")
        begin = max(0, position - _READ_CHUNK)
        buffer = os.pread(fd, position - begin, begin) + buffer[:stop]
        stop += position - begin
        position = begin


def read_anchor(head_path: Path, path: Path) -> dict[str, Any] | None:
    """The head anchor ``{"seq", "head", "sig"}``, None if there is none; unreadable: AuditUnavailable."""
    try:
        raw = head_path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditUnavailable(
            f"cannot read {head_path}: {exc.strerror}", reason="audit_write_failed"
        ) from exc
    anchor = parse_anchor(raw)
    if anchor is None:
        raise corrupt(path, f"its head anchor {head_path} is unreadable")
    return anchor
