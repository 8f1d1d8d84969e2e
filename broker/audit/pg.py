"""The audit chain in PostgreSQL (CONTRACT §15 fleet store): schema and migrations, the row a record becomes, and
the synchronous readers used by the command line (``broker audit init|verify|query --db``).

One chain per broker process: a row of ``audit_chains`` (``chain_id``, host, pid, start time, and the last signed
checkpoint — the file store's ``<log>.head``) and its records in ``audit_records``, primary key
``(chain_id, seq)`` so that two writers can never fork a chain (HOSTILE A06). Each record is stored as the exact
JSON line the file store would write (``line``: the hashed record, ASCII JSON) plus indexed copies of the fields
auditors search by. The copies are only an index: :func:`verify_db` checks that each one matches its line, so an
``UPDATE`` of either is named by chain and ``seq``. Every chain begins with a checkpoint that signs its
``chain_id``, host and pid (seq 1), and every checkpoint signs the ``chain_id``: :func:`verify_db` fails a chain
without that signed start, or with a checkpoint signed for another chain.

Library: psycopg 3 (pyproject.toml says why). The writer is :mod:`broker.audit.pgsink`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql

from broker.audit.chain import Keys, load_keys
from broker.audit.verify import VerifyReport, anchor_problem, verify_lines

__all__ = [
    "INDEXED",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ChainReport",
    "SchemaTooNew",
    "describe",
    "ensure_schema",
    "indexed_columns",
    "init_schema",
    "iter_records",
    "verify_db",
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
#: ts as the record writes it (format_ts): compared, not parsed
_TS_TEXT = """to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


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


@dataclass(frozen=True)
class ChainReport:
    """One chain's :class:`~broker.audit.verify.VerifyReport` and where it came from."""

    chain_id: str
    host: str
    pid: int
    report: VerifyReport

    def summary(self) -> str:
        text = f"chain {self.chain_id} ({self.host} pid {self.pid}): {self.report.summary()}"
        report = self.report
        if report.ok and report.unsealed:
            first = report.last_seq - report.unsealed + 1
            text += (
                f"; unverified: seq {first}..{report.last_seq} follow the last signed checkpoint (a broker that "
                "did not stop cleanly): nothing proves they were not rewritten"
            )
        return text


def verify_db(
    url: str,
    *,
    chain: str | None,
    public_jwks: Mapping[str, Any] | None,
    max_unsealed: int | None = None,
    accept_unverified: Collection[int] = (),
) -> list[ChainReport]:
    """``broker audit verify --db``: the file verifier's checks on every chain (or ``chain``), plus each row's
    indexed copies against its line. Empty when the chain (or every chain) is missing. Raises psycopg.Error and
    JoseError (unusable keys)."""
    keys = load_keys(public_jwks) if public_jwks is not None else None
    reports = []
    with psycopg.connect(url) as conn:
        chains = conn.execute(
            "SELECT chain_id, host, pid, anchor_seq, anchor_head, anchor_sig FROM audit_chains "
            "WHERE %(chain)s::text IS NULL OR chain_id = %(chain)s ORDER BY started_at, chain_id",
            {"chain": chain},
        ).fetchall()
        for chain_id, host, pid, anchor_seq, anchor_head, anchor_sig in chains:
            anchor = None
            if anchor_seq is not None:
                anchor = {"seq": int(anchor_seq), "head": anchor_head, "sig": anchor_sig}
            rows = conn.execute(
                f"SELECT seq, {_TS_TEXT}, hash, line, {', '.join(INDEXED)} FROM audit_records "  # noqa: S608
                "WHERE chain_id = %s ORDER BY seq",
                (chain_id,),
            ).fetchall()
            identity = {"chain": chain_id, "host": host, "pid": int(pid)}
            report = _verify_rows(rows, anchor, keys, max_unsealed, accept_unverified, identity)
            reports.append(ChainReport(chain_id, host, int(pid), report))
    return reports


def _verify_rows(
    rows: list[tuple[Any, ...]],
    anchor: dict[str, Any] | None,
    keys: Keys | None,
    max_unsealed: int | None,
    accept_unverified: Collection[int],
    identity: Mapping[str, Any],
) -> VerifyReport:
    anchor_why = anchor_problem(anchor, keys, identity) if anchor is not None else None
    report = verify_lines(
        (row[3].encode("utf-8") + b"\n" for row in rows),
        anchor=anchor if anchor_why is None else None,
        keys=keys,
        max_unsealed=max_unsealed,
        accept_unverified=accept_unverified,
        identity=identity,
    )
    if anchor_why is not None and report.first_bad_seq is None and report.first_bad_line is None:
        # a bad anchor fails the chain; a bad record (e.g. no signed start) is named first, by its seq
        return _bad(f"chain anchor: {anchor_why}", seq=None, intact=0, checkpoints=0, keys=keys)
    if report.first_bad_line is not None:
        # the verifier counts lines; a database row is named by its seq column
        line_seq = rows[report.first_bad_line - 1][0] if report.first_bad_line <= len(rows) else None
        report = replace(report, first_bad_line=None, first_bad_seq=report.first_bad_seq or line_seq)
    checkpoints = 0
    for index, row in enumerate(rows):
        if report.first_bad_seq is not None and row[0] >= report.first_bad_seq:
            break
        problem = _row_problem(row)
        if problem is not None:
            return _bad(problem, seq=int(row[0]), intact=index, checkpoints=checkpoints, keys=keys)
        checkpoints += row[4] == "checkpoint"
    return report


def _row_problem(row: tuple[Any, ...]) -> str | None:
    """Why the row's own columns disagree with its (intact) line, or None."""
    seq, ts, digest, line = row[:4]
    record = json.loads(line)
    expected = (record.get("seq"), record.get("ts"), record.get("hash"), *indexed_columns(record))
    names = ("seq", "ts", "hash", *INDEXED)
    for name, column, value in zip(names, (seq, ts, digest, *row[4:]), expected, strict=True):
        if column != value:
            return f"altered: column {name} is {column!r} but the record says {value!r}"
    return None


def _bad(problem: str, *, seq: int | None, intact: int, checkpoints: int, keys: Keys | None) -> VerifyReport:
    return VerifyReport(
        ok=False,
        records=intact,
        checkpoints=checkpoints,
        first_bad_seq=seq,
        problem=problem,
        unsealed=0,
        signatures_checked=keys is not None,
        last_seq=intact,
    )
