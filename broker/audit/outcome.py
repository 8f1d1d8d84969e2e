"""The outcome of a forwarded call (CONTRACT §15): what the upstream answered and what the agent received. Pure.

Every forwarded call (``POST /v1/tools/{name}``, MCP ``tools/call``) leaves two records with one ``request_id``:
the decision (written before the forward) and its ``outcome``, written by the one place each transport hands the
agent its answer (:func:`broker.gateway.middleware.record_outcome`):

- ``status``: the upstream's HTTP status (null when it never answered: connect failure, timeout);
- ``duration_ms``: the upstream call, from the request leaving the broker until the upstream's answer was read
  (buffered) or the stream ended; a float with one decimal;
- ``response_digest``: base64url (no padding) SHA-256 of the exact bytes the agent received — the body after
  masking; for a streamed (SSE) answer the concatenated bytes relayed, hashed as they go;
- ``decision``: ``allow`` when the upstream answered and the (filtered) answer was sent, ``error`` with a
  ``reason`` when the upstream failed, its answer was refused (``response_shape``, …), the stream broke or the
  agent went away.

A buffered answer's outcome is kept (``AuditSink.persist``: no crash of the broker process can lose it) before its
bytes are handed to the agent; a stream's before its end.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

__all__ = ["OUTCOME_EVENT", "Outcome", "response_digest"]

OUTCOME_EVENT = "outcome"


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def response_digest(data: bytes) -> str:
    """base64url (no padding) SHA-256 of ``data``: the ``response_digest`` of an answer of these bytes."""
    return _b64(hashlib.sha256(data).digest())


class Outcome:
    """One forwarded call's outcome as it happens. Times are ``time.perf_counter()`` values passed in."""

    __slots__ = ("_digest", "_sent", "ended", "reason", "recorded", "started", "status")

    def __init__(self, started: float) -> None:
        self.started = started
        self.status: int | None = None
        self.ended: float | None = None
        self.reason = ""
        #: set once the outcome record is written: nothing writes it twice
        self.recorded = False
        self._digest = hashlib.sha256()
        self._sent = False

    def answered(self, status: int) -> None:
        """The upstream's HTTP status line arrived."""
        self.status = status

    def finished(self, now: float) -> None:
        """The upstream's answer was read (or the stream ended); the first call counts."""
        if self.ended is None:
            self.ended = now

    def sent(self, data: bytes) -> None:
        """``data`` was relayed to the agent (a streamed answer's bytes, in order)."""
        self._digest.update(data)
        self._sent = True

    @property
    def streamed(self) -> bool:
        """Bytes were relayed as they came: the digest is over them, not over a response body."""
        return self._sent

    def fail(self, reason: str) -> None:
        """The agent does not get the upstream's answer (or not all of it): the first reason counts."""
        if not self.reason:
            self.reason = reason

    def fields(self, now: float, body: bytes | None = None) -> dict[str, Any]:
        """The outcome's own record fields; ``body`` is the buffered answer about to be sent (None: the bytes
        relayed so far, :meth:`sent`)."""
        ended = self.ended if self.ended is not None else now
        digest = response_digest(body) if body is not None else _b64(self._digest.digest())
        return {
            "event": OUTCOME_EVENT,
            "decision": "error" if self.reason else "allow",
            "reason": self.reason,
            "status": self.status,
            "duration_ms": round(max(ended - self.started, 0.0) * 1000, 1),
            "response_digest": digest,
        }
