"""Where auditors' commands read records from: audit files (streamed line by line, several files in the order
given — a rotated log oldest first) or the PostgreSQL store (:func:`broker.audit.pg.iter_records`).

Reading is not verifying: ``broker audit verify`` checks the chain; these only refuse what is not a record (a line
that is not a JSON object), naming it as ``FILE:LINE``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["SourceError", "db_records", "file_records"]

#: a record line longer than this is not one the broker wrote (records carry digests, not payloads)
MAX_LINE_BYTES = 1024 * 1024


class SourceError(Exception):
    """One line for the operator: the file and line, or the database, and what is wrong."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def file_records(paths: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """The records of ``paths``, in order, one line at a time (a log of any size in constant memory)."""
    for path in paths:
        try:
            handle = path.open("rb")
        except OSError as exc:
            raise SourceError(f"{path}: cannot read: {exc.strerror or exc}") from None
        with handle:
            number = 0
            while True:
                line = handle.readline(MAX_LINE_BYTES + 1)
                if not line:
                    break
                number += 1
                if len(line) > MAX_LINE_BYTES:
                    raise SourceError(f"{path}:{number}: line longer than {MAX_LINE_BYTES} bytes")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line, parse_constant=_reject_constant)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise SourceError(f"{path}:{number}: not a JSON audit record ({exc})") from None
                if not isinstance(record, dict):
                    raise SourceError(f"{path}:{number}: not a JSON audit record (not an object)")
                yield record


def db_records(url: str, chain: str | None) -> Iterator[dict[str, Any]]:
    """The records of the PostgreSQL store at ``url`` (one chain, or every chain; each record with its
    ``chain_id``), as the store yields them."""
    try:
        import psycopg

        from broker.audit.pg import describe, iter_records
    except ImportError as exc:  # the store module ships with the PostgreSQL support (CONTRACT §15)
        raise SourceError(f"--db: the PostgreSQL audit store is not available: {exc}") from None
    try:
        yield from iter_records(url, chain=chain)
    except psycopg.Error as exc:  # unreachable, refused, no schema: one line, never the URL's password
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"--db {describe(url)}: {first}") from None
    except ValueError as exc:
        raise SourceError(f"--db {describe(url)}: {exc}") from None
