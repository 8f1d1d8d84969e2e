"""The audit chain in PostgreSQL (CONTRACT §15 fleet store): schema and migrations, the row a record becomes, and
the synchronous reader used by the command line (``broker audit init|query --db``; ``verify --db`` is
:mod:`broker.audit.pgverify`).

One chain per broker process: a row of ``audit_chains`` (``chain_id``, host, pid, start time, and the last signed
checkpoint — the file store's ``<log>.head``) and its records in ``audit_records``, primary key
``(chain_id, seq)`` so that two writers can never fork a chain (HOSTILE A06). Each record is stored as the exact
JSON line the file store would write (``line``: the hashed record, ASCII JSON) plus indexed copies of the fields
auditors search by. The copies are only an index: the verifier checks that each one matches its line. What a
chain's signed start and final checkpoint sign, and what that lets the verifier prove, is in
:mod:`broker.audit.pgverify`.

Library: psycopg 3 (pyproject.toml says why). The writer is :mod:`broker.audit.pgsink`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
from psycopg import sql

__all__ = [
    "INDEXED",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SchemaTooNew",
    "describe",
    "ensure_schema",
    "indexed_columns",
    "init_schema",
    "iter_records",
]

#: record fields copied into indexed columns (beside ``chain_id``, ``seq``, ``ts`` and ``hash``)
INDEXED = ("event", "decision", "subject", "actor", "tool", "txn", "request_id", "trace_id")
#: a copy longer than this is cut (the full value stays in ``line``): a btree entry must stay far below its ~2.7 KB
#: limit, or one agent-supplied 3 KB subject would fail every commit of its batch (an audit outage on demand)
MAX_INDEXED_CHARS = 256

#: (version, SQL) applied in order, each once, in one transaction under an advisory lock (replicas may start
#: together). Append a new version for a change; never edit one that has shipped (deploy/operations.md).
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE audit_chains (
            chain_id    text PRIMARY KEY,
            host        text NOT NULL,
            pid         integer NOT NULL,
            started_at  timestamptz NOT NULL DEFAULT now(),
            anchor_seq  bigint,
            anchor_head text,
            anchor_sig  text
        );
        CREATE TABLE audit_records (
            chain_id   text NOT NULL REFERENCES audit_chains (chain_id),
            seq        bigint NOT NULL,
            ts         timestamptz NOT NULL,
            event      text NOT NULL,
            decision   text NOT NULL,
            subject    text,
            actor      text,
            tool       text,
            txn        text,
            request_id text,
            trace_id   text,
            hash       text NOT NULL,
            line       text NOT NULL,
            PRIMARY KEY (chain_id, seq)
        );
        CREATE INDEX audit_records_ts ON audit_records (ts);
        CREATE INDEX audit_records_subject ON audit_records (subject, ts);
        CREATE INDEX audit_records_tool ON audit_records (tool, ts);
        CREATE INDEX audit_records_txn ON audit_records (txn);
        CREATE INDEX audit_records_request_id ON audit_records (request_id);
        CREATE INDEX audit_records_trace_id ON audit_records (trace_id);
        """,
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
#: pg_advisory_xact_lock key of schema changes (any constant: "audit" in ASCII)
_SCHEMA_LOCK = 0x6175646974
_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS audit_schema_version (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


class SchemaTooNew(Exception):
    """The database was migrated by a newer broker."""


def describe(url: str) -> str:
    """``host:port/dbname`` of a libpq URL, for messages (never the password)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "an unparseable PostgreSQL URL"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def migration_steps(current: int) -> list[tuple[int, str]]:
    """The migrations a database at schema version ``current`` still needs. Raises SchemaTooNew."""
    if current > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the audit schema is at version {current}, newer than this broker's {SCHEMA_VERSION}: upgrade the broker"
        )
    return [(version, text) for version, text in MIGRATIONS if version > current]


def indexed_columns(record: Mapping[str, Any]) -> tuple[str | None, ...]:
    """The indexed copies of ``record``'s :data:`INDEXED` fields: text, NUL replaced (PostgreSQL text cannot hold
    it), at most :data:`MAX_INDEXED_CHARS`; non-string values as compact JSON."""
    return tuple(_index_text(record.get(name)) for name in INDEXED)


def _index_text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("\x00", "\ufffd")[:MAX_INDEXED_CHARS]


# -- schema ------------------------------------------------------------------------------------------------------


def _apply(conn: psycopg.Connection[Any]) -> int:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute(_VERSION_TABLE)
        row = conn.execute("SELECT coalesce(max(version), 0) FROM audit_schema_version").fetchone()
        current = int(row[0]) if row else 0
        for version, text in migration_steps(current):
            conn.execute(text.encode())
            conn.execute("INSERT INTO audit_schema_version (version) VALUES (%s)", (version,))
    return SCHEMA_VERSION


def init_schema(url: str, *, timeout_seconds: float = 10.0) -> int:
    """``broker audit init --db``: create or migrate the schema (idempotent); returns the version in force.
    Raises psycopg.Error and SchemaTooNew."""
    with psycopg.connect(url, connect_timeout=max(2, int(timeout_seconds))) as conn:
        return _apply(conn)


async def ensure_schema(conn: psycopg.AsyncConnection[Any]) -> None:
    """The broker's own idempotent schema step at start (as :func:`init_schema`) on an open connection."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        await conn.execute(_VERSION_TABLE)
        cursor = await conn.execute("SELECT coalesce(max(version), 0) FROM audit_schema_version")
        row = await cursor.fetchone()
        for version, text in migration_steps(int(row[0]) if row else 0):
            await conn.execute(text.encode())
            await conn.execute("INSERT INTO audit_schema_version (version) VALUES (%s)", (version,))


# -- reading -----------------------------------------------------------------------------------------------------


def iter_records(url: str, chain: str | None = None) -> Iterator[dict[str, Any]]:
    """Every record in the database (or of ``chain``), ordered by chain then ``seq``: each the stored JSON line
    parsed, plus ``chain_id`` (not part of the hashed record). Streams with a server-side cursor. Raises
    psycopg.Error (unreachable database, no schema) and ValueError for a line that is not JSON."""
    with psycopg.connect(url) as conn, conn.transaction():
        query = sql.SQL("SELECT chain_id, line FROM audit_records {} ORDER BY chain_id, seq").format(
            sql.SQL("WHERE chain_id = %s") if chain is not None else sql.SQL("")
        )
        with conn.cursor(name="audit_records") as cursor:
            cursor.execute(query, (chain,) if chain is not None else ())
            for chain_id, line in cursor:
                record = json.loads(line)
                if isinstance(record, dict):
                    record["chain_id"] = chain_id
                    yield record
                else:
                    raise ValueError(f"audit chain {chain_id}: a stored line is not a JSON object")
