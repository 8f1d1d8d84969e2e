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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

__all__ = ["SseError", "SseEvent", "SseParser", "encode_event"]

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
