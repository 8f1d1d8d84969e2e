"""Server-Sent Events, parsed incrementally and re-encoded (WHATWG HTML §9.2 "Server-sent events"): pure.

The broker reads an upstream ``text/event-stream`` chunk by chunk, never the whole stream: each complete event
is handed on as soon as its terminating blank line arrives, so the agent sees the first event before the
upstream finishes (CONTRACT §7). HOSTILE P24: an event may not grow past ``max_event_bytes`` (a 100 MB event
without a newline is refused after ``max_event_bytes``, not buffered), undecodable UTF-8 is refused, and every
event the agent receives is **re-encoded** from the parsed fields — a payload carrying a line break becomes
several ``data:`` lines and can never smuggle a second event or field.

Parsing follows the spec's line rules (CRLF, LF or a lone CR end a line; a leading BOM is dropped; ``:`` starts a
comment; one space after the colon is removed; ``id`` containing NUL is ignored; ``retry`` must be ASCII digits).
One deliberate difference: an event that set only ``id`` (no ``data``) is still reported, so that the resumption
ids MCP servers send in "priming" events reach the agent.

Event ids (CONTRACT §12: an upstream's ``id:`` and ``event:`` fields never reach the agent verbatim): the broker
gives the agent its own ids, :class:`EventIds`: the upstream's id sealed with AES-256-GCM under a key of this
process, bound to the MCP server and session (:func:`event_id_context`), padded to a multiple of 32 bytes. An
agent's ``Last-Event-ID`` is opened back into the upstream's id, so resumption works as before; an id this
process did not seal (another replica, a restart, a forgery, another session) opens to nothing, and the stream
then starts afresh. Upstream ids longer than :data:`MAX_UPSTREAM_ID` bytes are not relayed (no resumption).
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "EVENT_IDS",
    "MAX_UPSTREAM_ID",
    "EventIds",
    "SseError",
    "SseEvent",
    "SseParser",
    "encode_event",
    "event_id_context",
]

_BOM: Final = "\ufeff"


class SseError(Exception):
    """The stream cannot be relayed safely; ``reason`` names why (``sse_event_too_large``, ``sse_not_utf8``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event. ``data`` is None when the event had no ``data`` field."""

    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None


@dataclass(slots=True)
class _Pending:
    data: list[str] = field(default_factory=list)
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    touched: bool = False
    size: int = 0


class SseParser:
    """Feed bytes as they arrive; get complete events back. One parser per stream."""

    __slots__ = ("_buffer", "_cr_pending", "_max", "_pending", "_started")

    def __init__(self, *, max_event_bytes: int) -> None:
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be positive")
        self._max = max_event_bytes
        self._buffer = bytearray()
        self._pending = _Pending()
        self._cr_pending = False  # the previous chunk ended in CR: a LF starting this one belongs to it
        self._started = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events completed by ``chunk``; raises :class:`SseError` (the stream must then be abandoned)."""
        if self._cr_pending and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._cr_pending = False
        self._buffer += chunk
        events: list[SseEvent] = []
        buffer = self._buffer
        start = 0
        while True:
            lf = buffer.find(b"\n", start)
            cr = buffer.find(b"\r", start, lf if lf >= 0 else len(buffer))
            if cr >= 0:
                end, after = cr, cr + 1
                if after < len(buffer) and buffer[after] == 0x0A:
                    after += 1
                elif after == len(buffer):
                    self._cr_pending = True
            elif lf >= 0:
                end, after = lf, lf + 1
            else:
                break
            event = self._line(bytes(buffer[start:end]))
            if event is not None:
                events.append(event)
            start = after
        del buffer[:start]
        if self._pending.size + len(buffer) > self._max:
            raise SseError("sse_event_too_large")
        return events

    def _line(self, raw: bytes) -> SseEvent | None:
        pending = self._pending
        pending.size += len(raw) + 1
        if pending.size > self._max:
            raise SseError("sse_event_too_large")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SseError("sse_not_utf8") from None
        if not self._started:
            self._started = True
            line = line.removeprefix(_BOM)
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            pending.data.append(value)
        elif name == "event":
            pending.event = value
        elif name == "id":
            if "\x00" in value:
                return None
            pending.id = value
        elif name == "retry":
            if not value.isascii() or not value.isdigit():
                return None
            pending.retry = int(value)
        else:
            return None  # unknown fields are ignored (spec), and never relayed
        pending.touched = True
        return None

    def _dispatch(self) -> SseEvent | None:
        pending, self._pending = self._pending, _Pending()
        if not pending.touched:
            return None
        data = "\n".join(pending.data) if pending.data else None
        return SseEvent(data=data, event=pending.event, id=pending.id, retry=pending.retry)


def _field_value(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError("SSE field values cannot hold line breaks")
    return value


def encode_event(event: SseEvent) -> bytes:
    """The wire form of ``event``: ``event``/``id``/``retry`` fields as given, ``data`` one line per line."""
    lines: list[str] = []
    if event.event is not None:
        lines.append(f"event: {_field_value(event.event)}")
    if event.id is not None:
        lines.append(f"id: {_field_value(event.id)}")
    if event.retry is not None:
        lines.append(f"retry: {int(event.retry)}")
    if event.data is not None:
        lines.extend(
            f"data: {line}" for line in event.data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        )
    return ("\n".join(lines) + "\n\n").encode("utf-8")


#: the longest upstream event id (UTF-8 bytes) the broker relays: sealed, it stays within the 256 characters
#: an agent's Last-Event-ID may have (``broker.mcp.checks.LAST_EVENT_ID``)
MAX_UPSTREAM_ID: Final = 128
_NONCE: Final = 12
_PAD: Final = 32


def event_id_context(server: str, session_id: str | None) -> bytes:
    """What a broker event id is bound to: the MCP server and the session (none in the stateless era)."""
    return f"mcp-event-id\x00{server}\x00{session_id or ''}".encode()


class EventIds:
    """The broker's SSE event ids: opaque to the agent, opened back into the upstream's for resumption."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes | None = None) -> None:
        self._aead = AESGCM(key if key is not None else AESGCM.generate_key(bit_length=256))

    def seal(self, upstream_id: str, context: bytes) -> str | None:
        """The broker's id for ``upstream_id``; None when it is too long to relay."""
        raw = upstream_id.encode("utf-8")
        if len(raw) > MAX_UPSTREAM_ID:
            return None
        raw += b"\x00" * (-len(raw) % _PAD)  # SSE ids never hold NUL (the parser drops such ids)
        nonce = os.urandom(_NONCE)
        sealed = nonce + self._aead.encrypt(nonce, raw, context)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def open(self, broker_id: str, context: bytes) -> str | None:
        """The upstream's id behind ``broker_id``; None unless this process sealed it for ``context``."""
        try:
            sealed = base64.urlsafe_b64decode(broker_id + "=" * (-len(broker_id) % 4))
            raw = self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], context)
            return raw.rstrip(b"\x00").decode("utf-8")
        except (ValueError, binascii.Error, InvalidTag):  # UnicodeDecodeError is a ValueError
            return None


#: this process's event ids
EVENT_IDS: Final = EventIds()
