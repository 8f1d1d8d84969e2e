"""The audit hash chain and its signed checkpoints (CONTRACT §9), as pure functions.

A record is a flat JSON object. Sealing gives it ``seq`` (1, 2, 3, … in file order), ``prev`` (the previous
record's ``hash``; 64 zeros for the first) and ``hash`` = hex SHA-256(ASCII(prev) ‖ JCS(record without
``hash``)). JCS (RFC 8785) makes the hash independent of key order and of how the line was escaped on disk.

A bare chain proves order and integrity but not completeness: whoever can write the file can cut its tail or
rebuild it from genesis (HOSTILE.md §0.5, A04/A05). So every ``checkpoint_every`` records, and at shutdown, a
``checkpoint`` record carries ``sig``: a compact JWS by the broker signing key (``typ: audit-checkpoint+jwt``)
over ``{"seq", "head", "ts"}`` — its own ``seq`` and ``ts``, and ``head`` = its ``prev``. The ``sig`` is part
of the hashed record, so the next record's ``prev`` covers it too. The latest checkpoint is also kept outside
the log (``<log>.head``) by :mod:`broker.audit.sink`, which is what makes tail truncation detectable.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from typing import Any

from broker.canonical import canonicalize
from broker.jose import SigningKey

__all__ = [
    "CHECKPOINT_TYP",
    "DECISIONS",
    "EVENTS",
    "GENESIS",
    "RECORD_FIELDS",
    "RESERVED_FIELDS",
    "checkpoint_claims",
    "checkpoint_record",
    "format_ts",
    "record_hash",
    "seal",
]

GENESIS = "0" * 64
CHECKPOINT_TYP = "audit-checkpoint+jwt"

#: CONTRACT §9 closed sets.
EVENTS = frozenset(
    {"discovery", "exchange", "invocation", "approval", "mcp", "config_load", "revocation", "checkpoint"}
)
DECISIONS = frozenset({"allow", "deny", "step_up", "pending", "error"})
#: The fields every record carries (null when not applicable), in the order they are written to the file.
RECORD_FIELDS = (
    "event",
    "decision",
    "reason",
    "request_id",
    "subject",
    "actor",
    "tool",
    "args_digest",
    "txn",
    "policy_version",
    "status",
)
#: Filled in by the chain, never by the caller.
RESERVED_FIELDS = frozenset({"seq", "ts", "prev", "hash", "sig"})


def format_ts(epoch: float) -> str:
    """RFC 3339 UTC timestamp with milliseconds (truncated), e.g. ``2026-05-01T12:00:00.123Z``."""
    seconds, millis = divmod(math.floor(epoch * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def record_hash(prev: str, record_without_hash: Mapping[str, Any]) -> str:
    """Hex SHA-256 of ``prev`` (ASCII) then the JCS bytes of the record; a ``hash`` member is ignored."""
    body = record_without_hash
    if "hash" in body or type(body) is not dict:
        body = {name: value for name, value in body.items() if name != "hash"}
    return hashlib.sha256(prev.encode("ascii") + canonicalize(body)).hexdigest()


def seal(record: Mapping[str, Any], *, seq: int, prev: str) -> dict[str, Any]:
    """A new dict: ``seq`` first, the record's other members in their order, then ``prev`` and ``hash``.

    The order is only for people reading the file; the hash is over JCS and does not depend on it.
    """
    sealed: dict[str, Any] = {"seq": seq}
    for name, value in record.items():
        if name not in ("seq", "prev", "hash"):
            sealed[name] = value
    sealed["prev"] = prev
    sealed["hash"] = record_hash(prev, sealed)
    return sealed


def checkpoint_claims(*, seq: int, head: str, ts: str) -> dict[str, Any]:
    """The JWS payload of a checkpoint: its own seq and ts, and ``head`` = its ``prev``."""
    return {"seq": seq, "head": head, "ts": ts}


def checkpoint_record(*, seq: int, prev: str, ts: str, signer: SigningKey) -> dict[str, Any]:
    """A sealed checkpoint: event ``checkpoint``, decision ``allow``, other CONTRACT fields null, ``sig``."""
    record: dict[str, Any] = {"ts": ts}
    record.update(dict.fromkeys(RECORD_FIELDS))
    record.update(event="checkpoint", decision="allow", reason="")
    record["sig"] = signer.sign(checkpoint_claims(seq=seq, head=prev, ts=ts), typ=CHECKPOINT_TYP)
    return seal(record, seq=seq, prev=prev)
