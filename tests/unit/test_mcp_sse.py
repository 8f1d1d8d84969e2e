"""broker.mcp.sse: incremental SSE parsing and re-encoding (WHATWG "Server-sent events"; HOSTILE P24)."""

from __future__ import annotations

from typing import Any

import pytest

from broker.mcp.checks import LAST_EVENT_ID
from broker.mcp.sse import (
    MAX_UPSTREAM_ID,
    EventIds,
    SseError,
    SseEvent,
    SseParser,
    encode_event,
    event_id_context,
)


def parse(*chunks: bytes, max_event_bytes: int = 1024) -> list[SseEvent]:
    parser = SseParser(max_event_bytes=max_event_bytes)
    events: list[SseEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


def every_split(data: bytes) -> list[tuple[bytes, ...]]:
    return [(data[:i], data[i:]) for i in range(len(data) + 1)]


STREAM = b'event: message\nid: 1\ndata: {"a":1}\n\n'


@pytest.mark.parametrize(
    ("chunks", "events"),
    [
        ((STREAM,), [SseEvent(data='{"a":1}', event="message", id="1")]),
        ((b"data: a\r\ndata: b\r\n\r\n",), [SseEvent(data="a\nb")]),
        ((b"data: a\rdata: b\r\r",), [SseEvent(data="a\nb")]),
        ((b"data: a\r", b"\n\r", b"\n"), [SseEvent(data="a")]),
        ((b"\xef\xbb\xbfdata: bom\n\n",), [SseEvent(data="bom")]),
        ((b": keep-alive\n\ndata: x\n\n",), [SseEvent(data="x")]),
        ((b"data:no-space\n\n",), [SseEvent(data="no-space")]),
        ((b"data:  two spaces\n\n",), [SseEvent(data=" two spaces")]),
        ((b"data\n\n",), [SseEvent(data="")]),
        ((b"id: 7\ndata:\n\n",), [SseEvent(data="", id="7")]),
        ((b"id: 7\n\n",), [SseEvent(id="7")]),
        ((b"retry: 1500\n\n",), [SseEvent(retry=1500)]),
        ((b"retry: 15x\ndata: y\n\n",), [SseEvent(data="y")]),
        ((b"id: a\x00b\ndata: y\n\n",), [SseEvent(data="y")]),
        ((b"foo: bar\n\n",), []),
        ((b"\n\n\n",), []),
        ((b"data: unfinished\n",), []),
    ],
    ids=[
        "lf",
        "crlf",
        "cr",
        "crlf-split",
        "bom",
        "comment",
        "no-space",
        "one-space-removed",
        "bare-data",
        "priming",
        "id-only",
        "retry",
        "bad-retry",
        "nul-id",
        "unknown-field",
        "blank-lines",
        "no-terminator",
    ],
)
def test_parsing(chunks: tuple[bytes, ...], events: list[SseEvent]) -> None:
    assert parse(*chunks) == events


@pytest.mark.parametrize("chunks", every_split(STREAM + b"data: second\r\n\r\n"))
def test_events_are_the_same_however_the_stream_is_split(chunks: tuple[bytes, ...]) -> None:
    assert parse(*chunks) == [SseEvent(data='{"a":1}', event="message", id="1"), SseEvent(data="second")]


def test_an_event_is_dispatched_as_soon_as_its_blank_line_arrives() -> None:
    parser = SseParser(max_event_bytes=1024)
    assert parser.feed(b"data: first\n") == []
    assert parser.feed(b"\n") == [SseEvent(data="first")]
    assert parser.feed(b"data: second\n\n") == [SseEvent(data="second")]


@pytest.mark.parametrize(
    ("chunks", "reason"),
    [
        ((b"data: " + b"x" * 200,), "sse_event_too_large"),  # one line without a newline, never finished
        ((b"data: " + b"x" * 50 + b"\n", b"data: " + b"x" * 50 + b"\n", b"data: x\n"), "sse_event_too_large"),
        ((b"data: \xff\xfe\n\n",), "sse_not_utf8"),
    ],
    ids=["endless-line", "many-lines", "not-utf8"],
)
def test_p24_refused_streams(chunks: tuple[bytes, ...], reason: str) -> None:
    with pytest.raises(SseError) as refused:
        parse(*chunks, max_event_bytes=100)
    assert refused.value.reason == reason


def test_the_size_cap_is_per_event() -> None:
    event = b"data: " + b"x" * 80 + b"\n\n"
    assert len(parse(event * 5, max_event_bytes=100)) == 5


@pytest.mark.parametrize(
    ("event", "wire"),
    [
        (SseEvent(data='{"a":1}', event="message", id="3"), b'event: message\nid: 3\ndata: {"a":1}\n\n'),
        (SseEvent(data="a\nb"), b"data: a\ndata: b\n\n"),
        (SseEvent(data="a\r\nevent: x\rb"), b"data: a\ndata: event: x\ndata: b\n\n"),
        (SseEvent(data=""), b"data: \n\n"),
        (SseEvent(id="7", retry=10), b"id: 7\nretry: 10\n\n"),
    ],
    ids=["full", "multiline", "smuggled-field", "empty-data", "no-data"],
)
def test_encoding(event: SseEvent, wire: bytes) -> None:
    assert encode_event(event) == wire
    (parsed,) = parse(wire)  # what is written parses back to one event with the same fields
    assert (parsed.event, parsed.id, parsed.retry) == (event.event, event.id, event.retry)


@pytest.mark.parametrize("field", ["event", "id"])
def test_line_breaks_in_fields_cannot_be_encoded(field: str) -> None:
    with pytest.raises(ValueError, match="line breaks"):
        encode_event(SseEvent(data="x", **{field: "a\nb"}))  # type: ignore[arg-type]


# --- the broker's event ids (CONTRACT §12: upstream id fields never reach the agent verbatim) ----------------

CONTEXT = event_id_context("expenses", "session-1")


@pytest.mark.parametrize(
    "upstream_id",
    ["1", "stream-7_42", "DE89370400440532013000", "ü" * 64, "x" * MAX_UPSTREAM_ID],
    ids=["short", "sdk-style", "secret-like", "non-ascii", "longest"],
)
def test_event_ids_are_opaque_and_open_back(upstream_id: str) -> None:
    ids = EventIds()
    sealed = ids.seal(upstream_id, CONTEXT)
    assert sealed is not None and LAST_EVENT_ID.fullmatch(sealed)
    assert len(upstream_id) < 8 or upstream_id.lower() not in sealed.lower()
    assert ids.open(sealed, CONTEXT) == upstream_id
    assert ids.seal(upstream_id, CONTEXT) != sealed  # a fresh nonce each time


def test_event_ids_hide_the_length_of_short_ids() -> None:
    ids = EventIds()
    assert len({len(ids.seal("x" * n, CONTEXT) or "") for n in range(1, 33)}) == 1


@pytest.mark.parametrize(
    "forged",
    [
        lambda s: s[:-2] + ("AA" if not s.endswith("AA") else "BB"),
        lambda s: "DE89370400440532013000",
        lambda s: "",
        lambda s: "!!!!",
        lambda s: EventIds().seal("1", CONTEXT) or "",
    ],
    ids=["tampered", "plain-upstream-id", "empty", "not-base64", "another-process"],
)
def test_event_ids_not_sealed_here_open_to_nothing(forged: Any) -> None:
    ids = EventIds()
    sealed = ids.seal("1", CONTEXT)
    assert sealed is not None
    assert ids.open(forged(sealed), CONTEXT) is None


def test_event_ids_are_bound_to_server_and_session() -> None:
    ids = EventIds()
    sealed = ids.seal("1", CONTEXT) or ""
    assert ids.open(sealed, event_id_context("expenses", "session-2")) is None
    assert ids.open(sealed, event_id_context("other", "session-1")) is None


def test_overlong_upstream_ids_are_not_relayed() -> None:
    assert EventIds().seal("x" * (MAX_UPSTREAM_ID + 1), CONTEXT) is None
