"""One decision record, from a caller's fields to the exact line that is stored: shared by every audit sink (the
file, :mod:`broker.audit.sink`, and PostgreSQL, :mod:`broker.audit.pg`) so both write the same format (CONTRACT §9).

Pure functions: no clock, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from broker.audit.chain import DECISIONS, EVENTS, LOG_EVENTS, RECORD_FIELDS, RESERVED_FIELDS, seal

__all__ = ["decision_record", "encode_line", "seal_scrubbed"]

# A7: ASCII-only lines; every control character (newline, ESC, ...) and non-ASCII character is escaped.
_LINE_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def encode_line(record: Mapping[str, Any]) -> str:
    """The stored form of a sealed record: one line of ASCII JSON, without its newline."""
    return _LINE_ENCODER.encode(record)


def decision_record(fields: Mapping[str, Any], *, ts: str) -> dict[str, Any]:
    """The unsealed record for a caller's ``fields``: ``ts`` first, then CONTRACT §9's fields (null when missing),
    then any extra JSON-valued fields. Raises ValueError for a reserved field (``seq``, ``ts``, ``prev``, ``hash``,
    ``sig``) or an ``event``/``decision`` outside the closed sets (``checkpoint``/``audit_resume`` are the log's)."""
    reserved = RESERVED_FIELDS.intersection(fields)
    if reserved:
        raise ValueError(f"audit fields {sorted(reserved)} are filled in by the log")
    event, decision = fields.get("event"), fields.get("decision")
    if event not in EVENTS or event in LOG_EVENTS:
        raise ValueError(f"audit event {event!r} is not one of CONTRACT §9's")
    if decision not in DECISIONS:
        raise ValueError(f"audit decision {decision!r} is not one of CONTRACT §9's")
    record: dict[str, Any] = {"ts": ts}
    for name in RECORD_FIELDS:
        record[name] = fields.get(name)
    for name, value in fields.items():
        if name not in record:
            record[name] = value
    return record


def seal_scrubbed(record: Mapping[str, Any], *, seq: int, prev: str) -> dict[str, Any]:
    """:func:`~broker.audit.chain.seal`, with lone surrogates replaced by U+FFFD if the record has any."""
    try:
        return seal(record, seq=seq, prev=prev)
    except UnicodeEncodeError:
        return seal(_scrub_surrogates(record), seq=seq, prev=prev)


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
