"""``broker audit query``: which audit records match an auditor's question (CONTRACT §15).

Pure: :class:`RecordFilter` is built from the command's arguments (times resolved against a given ``now``) and
:func:`matching` filters any iterable of records lazily, so a log of any size streams through. Reading the
records is :mod:`broker.audit.sources`. Each field filter is exact (no pattern: an auditor's question should not
depend on escaping) and, given several values, matches any of them; different fields must all match. Times are
compared as instants: ``--since`` inclusive, ``--until`` exclusive; a record without a readable ``ts`` never
matches a time filter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

__all__ = ["FIELDS", "RecordFilter", "TimeError", "matching", "parse_time", "record_time"]

#: filterable record members, by the option that names them (``--request-id`` → ``request_id``)
FIELDS: Final = ("subject", "actor", "tool", "decision", "event", "txn", "request_id")

_RELATIVE = re.compile(r"-(\d{1,9})([smhd])")
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d{1,9})?([Zz]|[+-]\d\d:\d\d)")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class TimeError(ValueError):
    """A time argument that is neither RFC 3339 with an offset nor relative (``-30m``)."""


def parse_time(text: str, *, now: datetime) -> datetime:
    """An RFC 3339 timestamp with ``Z`` or an offset (``2026-05-01T12:00:00Z``), or ``-N`` followed by ``s``,
    ``m``, ``h`` or ``d``: that long before ``now``."""
    relative = _RELATIVE.fullmatch(text)
    if relative is not None:
        try:
            return now - timedelta(**{_UNITS[relative.group(2)]: int(relative.group(1))})
        except OverflowError:
            raise TimeError(f"{text!r} reaches before year 1") from None
    return _absolute(text)


def _absolute(text: str) -> datetime:
    if not _RFC3339.fullmatch(text):
        raise TimeError(
            f"{text!r} is not an RFC 3339 time (2026-05-01T12:00:00Z) or relative (-30m, -1h, -2d)"
        )
    stamp = re.sub(r"[Zz]$", "+00:00", text)
    stamp = re.sub(r"\.(\d{6})\d+", r".\1", stamp)  # Python reads microseconds at most
    try:
        return datetime.fromisoformat(stamp)
    except ValueError as exc:
        raise TimeError(f"{text!r}: {exc}") from None


def record_time(record: Mapping[str, Any]) -> datetime | None:
    """The instant of a record's ``ts`` (the log writes ``2026-05-01T12:00:00.123Z``), or None if unreadable."""
    ts = record.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        return _absolute(ts)
    except TimeError:
        return None


@dataclass(frozen=True)
class RecordFilter:
    """Field name → accepted values (an empty tuple: any), and a time window."""

    values: Mapping[str, tuple[str, ...]]
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def build(
        cls,
        *,
        since: str | None = None,
        until: str | None = None,
        now: datetime,
        **values: Sequence[str] | None,
    ) -> RecordFilter:
        """From the command's arguments; raises :class:`TimeError`, or ValueError for an unknown field."""
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise ValueError(f"no such filter: {sorted(unknown)}")
        return cls(
            values={name: tuple(v) for name, v in values.items() if v},
            since=parse_time(since, now=now) if since else None,
            until=parse_time(until, now=now) if until else None,
        )

    def accepts(self, record: Mapping[str, Any]) -> bool:
        for name, accepted in self.values.items():
            if record.get(name) not in accepted:
                return False
        if self.since is None and self.until is None:
            return True
        when = record_time(record)
        if when is None:
            return False
        return (self.since is None or when >= self.since) and (self.until is None or when < self.until)


def matching(records: Iterable[Mapping[str, Any]], rule: RecordFilter) -> Iterator[Mapping[str, Any]]:
    """The records ``rule`` accepts, in their order, lazily."""
    return (record for record in records if rule.accepts(record))
