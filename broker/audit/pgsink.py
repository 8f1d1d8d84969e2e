"""The audit chain written to PostgreSQL (``audit.store: postgresql://…``, CONTRACT §15 fleet store).

The same chain as the file store (:mod:`broker.audit.records`, :mod:`broker.audit.chain`: same records, hashes and
signed checkpoints), one chain per process (a new ``chain_id`` at every start: a ULID, with host and pid in
``audit_chains``), stored as described in :mod:`broker.audit.pg`.

- **A signed start.** ``start`` commits the chain's row together with its first record: a checkpoint (seq 1,
  ``prev`` = genesis) whose signed claims carry the ``chain`` id, ``host`` and ``pid``, ``checkpoint_every``, and
  ``seen``: the :data:`SEEN_CHAINS` most recent chains in the database with their anchor seq
  (:mod:`broker.audit.pgverify` says what each proves); every later checkpoint signs the ``chain`` id too. A
  chain made up in the database without the key, records moved to another chain, or a chain deleted, then fail
  ``broker audit verify --db``. ``aclose`` closes the chain with a checkpoint signed ``final: true`` (records
  appended after it fail verify); a killed process leaves an unsealed tail that nothing seals later (the next
  process starts a new chain), at most ``checkpoint_every - 1`` records: a record and the checkpoint it makes due
  are always committed together.

- **Acknowledged means committed; group commit.** ``commit`` seals the record at once, in order, on the event
  loop, and returns once a transaction holding it has committed. One transaction is in flight at a time: it
  inserts every record sealed before it started (one ``INSERT … SELECT FROM unnest(…)`` statement — one round
  trip, atomic), and every committer waiting meanwhile shares the next one. A batch holding a checkpoint also
  moves the chain's anchor (``audit_chains.anchor_*``, the file's ``<log>.head``) in the same statement.
- **Fail closed, recover by itself.** A commit that fails or outlives ``timeout_seconds`` fails every committer
  waiting (``503 audit_unavailable``: nothing is acknowledged, nothing forwarded), drops the connection and marks
  the store unhealthy (``/readyz``); commits are refused at once until a reconnect (backoff up to 1 s) succeeds.
- **No gap, no fork when the outcome is unknown.** A failed batch may have committed (the connection died after
  the server committed). Before writing again the sink reads the chain's last row and :func:`reconcile` decides:
  it must be the last record known committed or one of the batch's own records (same ``seq`` and ``hash``); the
  chain continues from it, and the records sealed after it are dropped (their committers were refused). A
  checkpoint then seals whatever landed at once. Anything else (rows gone, a record this process never sealed:
  someone else wrote the chain) is a diverged chain: the sink never writes to it again, logs an error, and starts
  a new chain whose signed start names the diverged one, the last record committed there and why (``diverged``),
  then serves again — refusing commits (``503``, reason ``audit_chain_diverged``) only until that start is
  committed. ``broker audit verify --db`` then fails the diverged chain at the first record after that one.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog

from broker.audit.chain import GENESIS, checkpoint_record, format_ts
from broker.audit.durability import SealTimer, settle
from broker.audit.pg import INDEXED, SchemaTooNew, describe, ensure_schema, indexed_columns
from broker.audit.records import decision_record, encode_line, seal_scrubbed
from broker.errors import AuditUnavailable
from broker.jose import SigningKey

__all__ = ["SEEN_CHAINS", "ChainDiverged", "PgAuditSink", "new_chain_id", "reconcile"]

log = structlog.get_logger("broker.audit")

#: records per transaction at most (a backlog after a slow commit is written in several)
MAX_BATCH = 2000
#: sealed records waiting for a transaction at most; past it commits are refused (HOSTILE A08: bounded buffer)
MAX_PENDING = 50_000
#: reconnect backoff: first wait and cap, in seconds
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 1.0
#: chains a new chain's signed start names (``seen``), the most recent first: each chain is then named by the next
#: ones to start, so deleting it is evident; bounded so that a start stays a few KB however many chains there are
SEEN_CHAINS = 100
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

_COLUMNS = ("seq", "ts", "hash", "line", *INDEXED)
_TYPES = ("bigint", "timestamptz", *("text",) * (len(_COLUMNS) - 2))
_INSERT = (
    f"INSERT INTO audit_records (chain_id, {', '.join(_COLUMNS)}) "  # noqa: S608 - constant names
    f"SELECT %(chain)s, * FROM unnest({', '.join(f'%({c})s::{t}[]' for c, t in zip(_COLUMNS, _TYPES, strict=True))})"
)
#: data-modifying CTEs always run to completion: the insert and the anchor move commit together
_INSERT_ANCHORED = (
    f"WITH inserted AS ({_INSERT} RETURNING 1) UPDATE audit_chains SET anchor_seq = %(anchor_seq)s, "  # noqa: S608
    "anchor_head = %(anchor_head)s, anchor_sig = %(anchor_sig)s WHERE chain_id = %(chain)s"
)
_LAST_ROW = "SELECT seq, hash, event FROM audit_records WHERE chain_id = %s ORDER BY seq DESC LIMIT 1"
_SEEN = (
    "SELECT chain_id, coalesce(anchor_seq, 0) FROM audit_chains WHERE chain_id <> %s "
    "ORDER BY started_at DESC, chain_id DESC LIMIT %s"
)


def new_chain_id(now: float, random: bytes) -> str:
    """A ULID (48-bit milliseconds then 80 random bits, Crockford base32): chain ids sort by start time."""
    value = (math.floor(now * 1000) << 80) | int.from_bytes(random[:10], "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


class ChainDiverged(Exception):
    """The chain in the database is not the one this process wrote."""


def reconcile(
    committed: tuple[int, str], written: Mapping[int, str], found: tuple[int, str] | None
) -> tuple[int, str]:
    """Where the chain stands after a batch whose commit outcome is unknown.

    ``committed``: (seq, hash) of the last record known committed; ``written``: seq → hash of the records of the
    failed batch; ``found``: (seq, hash) of the chain's last row now (None: no row). Returns the (seq, hash) to
    continue from. Raises ChainDiverged when ``found`` is neither."""
    seq, digest = found if found is not None else (0, GENESIS)
    if seq == committed[0] and digest == committed[1]:
        return committed
    if seq > committed[0] and written.get(seq) == digest:
        return seq, digest
    if seq < committed[0]:
        raise ChainDiverged(
            f"the chain ends at seq {seq} but seq {committed[0]} was committed: rows were removed"
        )
    raise ChainDiverged(f"seq {seq} in the database is not a record this broker sealed")


@dataclass(frozen=True)
class _Row:
    record: dict[str, Any]
    line: str

    @property
    def seq(self) -> int:
        return int(self.record["seq"])

    @property
    def hash(self) -> str:
        return str(self.record["hash"])


def batch_params(chain_id: str, rows: Sequence[_Row]) -> tuple[str, dict[str, Any]]:
    """The statement and parameters that insert ``rows`` (and move the anchor to the last checkpoint among them)."""
    params: dict[str, Any] = {"chain": chain_id}
    params["seq"] = [row.seq for row in rows]
    params["ts"] = [row.record["ts"] for row in rows]
    params["hash"] = [row.hash for row in rows]
    params["line"] = [row.line for row in rows]
    indexed = [indexed_columns(row.record) for row in rows]
    for position, name in enumerate(INDEXED):
        params[name] = [values[position] for values in indexed]
    checkpoints = [row.record for row in rows if row.record["event"] == "checkpoint"]
    if not checkpoints:
        return _INSERT, params
    last = checkpoints[-1]
    params.update(anchor_seq=last["seq"], anchor_head=last["prev"], anchor_sig=last["sig"])
    return _INSERT_ANCHORED, params


class PgAuditSink(SealTimer):
    """An :class:`~broker.audit.store.AuditSink` on PostgreSQL (see the module docstring).

    ``transactions`` counts committed batches and ``records_written`` their records (checkpoints included)."""

    def __init__(
        self,
        url: str,
        *,
        signer: SigningKey,
        checkpoint_every: int = 100,
        checkpoint_seconds: float | None = None,
        timeout_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self.url = url
        self.where = describe(url)
        self.chain_id = new_chain_id(clock(), secrets.token_bytes(10))
        self.transactions = 0
        self.records_written = 0
        self._signer = signer
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = checkpoint_seconds
        self._timeout = timeout_seconds
        self._clock = clock
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._started = self._closed = False
        self._closing = False  # the final checkpoint is (being) queued: nothing may follow it
        self._diverged: str | None = None  # why the chain diverged, until a new chain is started
        self._diverged_from: dict[str, Any] | None = None  # the signed start's ``diverged`` member
        self._seq, self._head = 0, GENESIS  # the last record sealed
        self._committed = (0, GENESIS)  # the last record known committed
        self._since_checkpoint = 0
        self._pending: list[_Row] = []
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._flusher: asyncio.Task[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def healthy(self) -> bool:
        """Connected, the chain consistent, not closed: False from a failed commit until the reconnect."""
        return self._conn is not None and self._diverged is None and not self._closed

    @property
    def committed_seq(self) -> int:
        return self._committed[0]

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, create or migrate the schema (idempotent), register this process's chain."""
        if self._started:
            raise RuntimeError("audit store already started")
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            conn = await self._connect()
            await ensure_schema(conn)
            row = await self._open_chain(conn, self.chain_id)
        except SchemaTooNew as exc:
            await _close(conn)
            raise AuditUnavailable(f"audit.store {self.where}: {exc}", reason="audit_store_schema") from exc
        except (psycopg.Error, OSError, TimeoutError) as exc:
            await _close(conn)
            raise AuditUnavailable(
                f"audit.store: cannot use PostgreSQL at {self.where}: {_why(exc)}",
                reason="audit_store_unavailable",
            ) from exc
        self._conn, self._started = conn, True
        self._seq, self._head = self._committed = (row.seq, row.hash)
        self.transactions, self.records_written = 1, 1
        log.info("audit chain started", chain_id=self.chain_id, store=self.where)

    async def _open_chain(self, conn: psycopg.AsyncConnection[Any], chain_id: str) -> _Row:
        """Commit chain ``chain_id``'s row and its signed start (one transaction); the start's row. Raises
        psycopg.Error."""
        host, pid = socket.gethostname(), os.getpid()
        async with conn.transaction():
            seen = await _recent_chains(conn, chain_id)
            start: dict[str, Any] = {"checkpoint_every": self._checkpoint_every, "seen": seen}
            if self._diverged_from is not None:
                start["diverged"] = self._diverged_from
            # the signed start: a chain in the database is one only if its first record is this checkpoint
            genesis = checkpoint_record(
                seq=1,
                prev=GENESIS,
                ts=format_ts(self._clock()),
                signer=self._signer,
                chain=chain_id,
                host=host,
                pid=pid,
                members=start,
            )
            row = _Row(genesis, encode_line(genesis))
            await conn.execute(
                "INSERT INTO audit_chains (chain_id, host, pid) VALUES (%s, %s, %s)", (chain_id, host, pid)
            )
            await conn.execute(*batch_params(chain_id, [row]))
        return row

    async def aclose(self) -> None:
        """Close the chain with a checkpoint signed ``final`` (if connected), which also names the chains then in
        the database (``seen``), wait for the commit in flight, close. Commits are refused from the start of the
        close (nothing may follow a final checkpoint, so it is written even right after another checkpoint);
        committers still waiting are refused."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closing = True
        self._cancel_timer()
        seen = None
        if self.healthy and self._conn is not None:
            try:
                async with asyncio.timeout(self._timeout):
                    seen = await _recent_chains(self._conn, self.chain_id)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning("audit store: the final checkpoint names no chains", error=_why(exc))
        if self.healthy:  # again: the commit in flight may have failed meanwhile
            self._seal(final=True, seen=seen)
            self._kick()
        if self._flusher is not None:
            await asyncio.wait([self._flusher])
        self._closed = True
        if self._reconnector is not None:
            self._reconnector.cancel()
            await asyncio.wait([self._reconnector])
        self._fail_waiters(AuditUnavailable("audit store closed", reason="audit_closed"))
        await _close(self._conn)
        self._conn = None

    # -- writing -------------------------------------------------------------------------------------------

    async def commit(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Seal one decision record and return it once committed (group commit). Raises ValueError for fields
        outside CONTRACT §9, AuditUnavailable if the store is down or the commit failed or timed out."""
        unsealed = decision_record(fields, ts="")
        self._check_writable()
        unsealed["ts"] = ts = format_ts(self._clock())
        sealed = seal_scrubbed(unsealed, seq=self._seq + 1, prev=self._head)
        self._queue(sealed)
        if self._since_checkpoint >= self._checkpoint_every:
            self._seal(ts)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((sealed["seq"], future))
        self._kick()
        await future
        return sealed

    async def persist(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """A queued row dies with the process or a failed batch, so this is :meth:`commit` (AuditSink.persist)."""
        return await self.commit(fields)

    def _check_writable(self) -> None:
        if self._closed or self._closing or not self._started:
            raise AuditUnavailable("audit store is not open", reason="audit_closed")
        if self._diverged is not None:
            raise AuditUnavailable("audit chain diverged", reason="audit_chain_diverged")
        if self._conn is None:
            raise AuditUnavailable("audit store unavailable", reason="audit_store_unavailable")
        if len(self._pending) >= MAX_PENDING:
            raise AuditUnavailable("audit store backlog full", reason="audit_store_backlog")

    def _queue(self, record: dict[str, Any]) -> None:
        self._pending.append(_Row(record, encode_line(record)))
        self._seq, self._head = record["seq"], record["hash"]
        if record["event"] == "checkpoint":
            self._since_checkpoint = 0
            self._cancel_timer()
        else:
            self._since_checkpoint += 1
            self._arm_timer()

    def _seal(
        self, ts: str | None = None, *, final: bool = False, seen: list[dict[str, Any]] | None = None
    ) -> None:
        """Queue a checkpoint after the last record (``ts``: its timestamp, default now; ``final``: the chain's
        last, naming the ``seen`` chains)."""
        ts = ts or format_ts(self._clock())
        self._queue(
            checkpoint_record(
                seq=self._seq + 1,
                prev=self._head,
                ts=ts,
                signer=self._signer,
                chain=self.chain_id,
                final=final,
                members={"seen": seen} if seen is not None else None,
            )
        )

    def _kick(self) -> None:
        if self._flusher is None and self._conn is not None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        """One transaction at a time, each holding every record sealed before it started; until none is left."""
        try:
            while self._pending and self._conn is not None and self._diverged is None:
                size = MAX_BATCH
                if len(self._pending) > size and self._pending[size].record["event"] == "checkpoint":
                    # a record and the checkpoint it made due commit together: a killed broker's unsealed tail
                    # stays below checkpoint_every, which verify allows by default
                    size += 1
                batch = self._pending[:size]
                del self._pending[: len(batch)]
                error = await self._write(self._conn, batch)
                if error is not None:
                    await self._failed(batch, error)
                    return
                self._committed = (batch[-1].seq, batch[-1].hash)
                self.transactions += 1
                self.records_written += len(batch)
                while self._waiters and self._waiters[0][0] <= self._committed[0]:
                    settle(self._waiters.popleft()[1])
        finally:
            self._flusher = None

    async def _write(self, conn: psycopg.AsyncConnection[Any], batch: list[_Row]) -> BaseException | None:
        """Commit ``batch``; the error if it failed or did not finish within the timeout (outcome unknown)."""
        query, params = batch_params(self.chain_id, batch)
        task = asyncio.ensure_future(conn.execute(query, params))
        done, _ = await asyncio.wait([task], timeout=self._timeout)
        if not done:
            # answer the waiting calls now; psycopg's cancellation of the query may take seconds
            self._fail_waiters(AuditUnavailable("audit store timed out", reason="audit_store_unavailable"))
            task.cancel()
            await asyncio.wait([task])
            return TimeoutError(f"commit did not finish within {self._timeout}s")
        return None if task.cancelled() else task.exception()

    async def _failed(self, batch: list[_Row], error: BaseException) -> None:
        """Refuse every waiting committer, drop what was sealed after the last known commit, reconnect."""
        self._fail_waiters(AuditUnavailable("audit store unavailable", reason="audit_store_unavailable"))
        log.error(
            "audit commit failed; refusing calls until the store answers again",
            chain_id=self.chain_id,
            store=self.where,
            error=_why(error),
            first_seq=batch[0].seq,
            last_seq=self._seq,
        )
        written = {row.seq: row.hash for row in batch}
        self._pending.clear()
        self._seq, self._head = self._committed
        self._since_checkpoint = 0
        self._cancel_timer()
        conn, self._conn = self._conn, None
        await _close(conn)
        if not self._closed:
            self._reconnector = asyncio.get_running_loop().create_task(self._reconnect(written))

    async def _reconnect(self, written: Mapping[int, str]) -> None:
        delay = BACKOFF_FIRST
        try:
            while not self._closed:
                await asyncio.sleep(delay)  # backoff between attempts
                delay = min(delay * 2, BACKOFF_MAX)
                conn: psycopg.AsyncConnection[Any] | None = None
                try:
                    conn = await self._connect()
                    if self._diverged is not None:  # never written to again: a new chain, or nothing
                        await self._start_new_chain(conn)
                        return
                    cursor = await conn.execute(_LAST_ROW, (self.chain_id,))
                    row = await cursor.fetchone()
                    found = (int(row[0]), str(row[1])) if row is not None else None
                    try:
                        seq, digest = reconcile(self._committed, written, found)
                    except ChainDiverged as exc:
                        self._diverge(str(exc))
                        await self._start_new_chain(conn)
                        return
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    await _close(conn)
                    log.debug("audit store still unavailable", store=self.where, error=_why(exc))
                    continue
                landed = seq - self._committed[0]
                self._seq, self._head = self._committed = (seq, digest)
                self._conn = conn
                log.warning(
                    "audit store available again",
                    chain_id=self.chain_id,
                    seq=seq,
                    unknown_batch_landed=landed > 0,
                )
                if row is not None and row[2] != "checkpoint":
                    self._seal()  # seal what landed before the failure at once
                self._kick()
                return
        finally:
            self._reconnector = None

    def _diverge(self, why: str) -> None:
        """The chain in the database is not the one this process wrote: stop writing to it (commits are refused
        until :meth:`_start_new_chain` has committed a new chain's start, which names this one)."""
        self._diverged = why
        seq, digest = self._committed
        self._diverged_from = {"chain": self.chain_id, "seq": seq, "head": digest, "reason": why}
        log.error(
            "audit chain diverged: someone else wrote to it; starting a new chain that names it",
            chain_id=self.chain_id,
            why=why,
            last_committed_seq=seq,
        )

    async def _start_new_chain(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """After a divergence: commit a new chain's signed start (naming the diverged chain) on ``conn`` and
        continue there. Raises psycopg.Error or TimeoutError (the caller closes ``conn`` and tries again)."""
        assert self._diverged_from is not None
        diverged = self._diverged_from["chain"]
        chain_id = new_chain_id(self._clock(), secrets.token_bytes(10))
        async with asyncio.timeout(self._timeout):
            row = await self._open_chain(conn, chain_id)
        self.chain_id = chain_id
        self._seq, self._head = self._committed = (row.seq, row.hash)
        self._since_checkpoint = 0
        self._diverged = self._diverged_from = None
        self._conn = conn
        self.transactions += 1
        self.records_written += 1
        log.error(
            "audit chain diverged; the broker goes on in a new chain (run `broker audit verify --db`)",
            chain_id=self.chain_id,
            diverged_chain=diverged,
            store=self.where,
        )
        self._kick()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        async with asyncio.timeout(self._timeout):
            return await psycopg.AsyncConnection.connect(
                self.url,
                autocommit=True,  # each batch is one statement: its own transaction, one round trip
                connect_timeout=max(2, math.ceil(self._timeout)),
                application_name="broker-audit",
            )

    def _fail_waiters(self, error: AuditUnavailable) -> None:
        while self._waiters:
            settle(self._waiters.popleft()[1], error)

    # -- the checkpoint timer ------------------------------------------------------------------------------

    def _seal_due(self) -> None:
        self._timer = None
        if self._since_checkpoint and self.healthy and not self._closing:
            self._seal()  # an idle chain is sealed too
            self._kick()
        # unhealthy: the reconnect seals what landed


async def _recent_chains(conn: psycopg.AsyncConnection[Any], chain_id: str) -> list[dict[str, Any]]:
    """The :data:`SEEN_CHAINS` most recently started chains other than ``chain_id``, each with its anchor seq now
    (0: none), as a signed start or final checkpoint names them (``seen``). Raises psycopg.Error."""
    cursor = await conn.execute(_SEEN, (chain_id, SEEN_CHAINS))
    return [{"chain": str(chain), "anchor_seq": int(seq)} for chain, seq in await cursor.fetchall()]


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


async def _close(conn: psycopg.AsyncConnection[Any] | None) -> None:
    if conn is not None:
        await conn.close()
