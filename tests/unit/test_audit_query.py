"""broker.audit.query: the pure record filter of `broker audit query` (CONTRACT §15)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from broker.audit.query import RecordFilter, TimeError, matching, parse_time, record_time

NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


def rec(seq: int, ts: str = "2026-05-01T11:30:00.000Z", **fields: Any) -> dict[str, Any]:
    base = {"seq": seq, "ts": ts, "event": "invocation", "decision": "allow", "subject": "alice", "tool": "t"}
    return {**base, **fields}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-05-01T12:00:00Z", NOW),
        ("2026-05-01T12:00:00.123Z", NOW + timedelta(milliseconds=123)),
        ("2026-05-01T14:00:00+02:00", NOW),
        ("2026-05-01T12:00:00.123456789Z", NOW + timedelta(microseconds=123456)),
        ("-30m", NOW - timedelta(minutes=30)),
        ("-1h", NOW - timedelta(hours=1)),
        ("-2d", NOW - timedelta(days=2)),
        ("-45s", NOW - timedelta(seconds=45)),
    ],
    ids=["utc", "millis", "offset", "nanos-truncated", "minus-30m", "minus-1h", "minus-2d", "minus-45s"],
)
def test_parse_time(text: str, expected: datetime) -> None:
    assert parse_time(text, now=NOW) == expected


@pytest.mark.parametrize(
    "text",
    [
        "yesterday",
        "2026-05-01",
        "2026-05-01T12:00:00",
        "+1h",
        "-1w",
        "-999999999d",
        "2026-13-01T00:00:00Z",
        "",
    ],
    ids=["word", "date-only", "no-offset", "future-relative", "weeks", "overflow", "month-13", "empty"],
)
def test_parse_time_refuses(text: str) -> None:
    with pytest.raises(TimeError):
        parse_time(text, now=NOW)


def test_record_time_reads_the_logs_format_and_nothing_else() -> None:
    assert record_time({"ts": "2026-05-01T12:00:00.000Z"}) == NOW
    assert record_time({"ts": "-1h"}) is None  # a relative time is an argument, never a record's time
    assert record_time({"ts": None}) is None and record_time({}) is None


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, [1, 2, 3, 4]),
        ({"subject": ["alice"]}, [1, 2, 4]),
        ({"subject": ["alice", "bob"]}, [1, 2, 3, 4]),
        ({"subject": ["alice"], "decision": ["deny"]}, [2]),
        ({"tool": ["other"]}, [4]),
        ({"event": ["outcome"]}, [4]),
        ({"txn": ["T1"]}, [1]),
        ({"request_id": ["R1"]}, [1, 4]),
        ({"actor": ["spiffe://example.org/agents/a"]}, [1]),
        ({"subject": ["ALICE"]}, []),
    ],
    ids=[
        "none",
        "subject",
        "repeated-is-any",
        "fields-are-all",
        "tool",
        "event",
        "txn",
        "request-id-joins-outcome",
        "actor",
        "exact-case",
    ],
)
def test_field_filters(filters: dict[str, list[str]], expected: list[int]) -> None:
    records = [
        rec(1, txn="T1", request_id="R1", actor="spiffe://example.org/agents/a"),
        rec(2, decision="deny", request_id="R2"),
        rec(3, subject="bob"),
        rec(4, event="outcome", tool="other", request_id="R1"),
    ]
    rule = RecordFilter.build(now=NOW, **filters)
    assert [r["seq"] for r in matching(records, rule)] == expected


def test_time_window_since_inclusive_until_exclusive() -> None:
    records = [
        rec(1, ts="2026-05-01T10:59:59.999Z"),
        rec(2, ts="2026-05-01T11:00:00.000Z"),
        rec(3, ts="2026-05-01T11:59:59.999Z"),
        rec(4, ts="2026-05-01T12:00:00.000Z"),
        rec(5, ts="garbage"),
        rec(6, ts=None),
    ]
    rule = RecordFilter.build(since="-1h", until="2026-05-01T14:00:00+02:00", now=NOW)
    assert [r["seq"] for r in matching(records, rule)] == [2, 3]
    # without a time filter a record without a readable ts still matches
    assert [r["seq"] for r in matching(records, RecordFilter.build(now=NOW))] == [1, 2, 3, 4, 5, 6]


def test_offsets_compare_as_instants() -> None:
    tz = timezone(timedelta(hours=-5))
    rule = RecordFilter.build(since=datetime(2026, 5, 1, 7, 0, tzinfo=tz).isoformat(), now=NOW)
    assert rule.accepts(rec(1, ts="2026-05-01T12:00:00.000Z"))
    assert not rule.accepts(rec(1, ts="2026-05-01T11:59:59.999Z"))


def test_matching_is_lazy() -> None:
    def endless() -> Iterator[dict[str, Any]]:
        for seq in itertools.count(1):
            yield rec(seq, subject="bob" if seq % 3 else "alice")

    found = matching(endless(), RecordFilter.build(subject=["alice"], now=NOW))
    assert [r["seq"] for r in itertools.islice(found, 3)] == [3, 6, 9]


def test_unknown_filter_is_refused() -> None:
    with pytest.raises(ValueError, match="no such filter"):
        RecordFilter.build(now=NOW, hash=["x"])
