"""The PostgreSQL audit store on a real PostgreSQL (a fresh database per test): records and checkpoints land and
verify, tampering is named by chain and seq, commits batch, and a commit whose outcome is unknown (the answer or
the request lost on a real socket, through a TCP proxy) leaves neither a gap nor a fork."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest

from broker.audit.chain import GENESIS, RECORD_FIELDS, checkpoint_record, seal
from broker.audit.pg import MIGRATIONS, iter_records
from broker.audit.pgsink import PgAuditSink
from broker.audit.pgverify import verify_db
from broker.audit.records import encode_line
from broker.errors import AuditUnavailable
from broker.jose import Signer, b64url_decode
from tests.certfactory import Pki
from tests.e2e.test_cli import run_cli
from tests.pgutil import fresh_database

WITHIN = 15.0


@pytest.fixture
def db() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture
def jwks(pki: Pki) -> dict[str, Any]:
    return {"keys": [Signer.from_file(pki.signing_jwk).public_jwk()]}


def make_sink(pki: Pki, url: str, **kwargs: Any) -> PgAuditSink:
    kwargs.setdefault("checkpoint_every", 5)
    return PgAuditSink(url, signer=Signer.from_file(pki.signing_jwk), **kwargs)


def decision(n: int, **fields: Any) -> dict[str, Any]:
    return {
        "event": "invocation",
        "decision": "allow",
        "request_id": f"req-{n}",
        "subject": "alice",
        **fields,
    }


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll an in-process condition with a deadline (the reconnect loop has no event to wait on)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WITHIN
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"not within {WITHIN}s: {what}")
        await asyncio.sleep(0.02)  # poll interval of a bounded wait


def sql(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(query.encode(), params)
        return cursor.fetchall() if cursor.description else []


async def test_records_and_checkpoints_land_as_the_file_would_write_them_and_verify(
    pki: Pki, db: str, jwks: dict[str, Any]
) -> None:
    sink = make_sink(pki, db)
    await sink.start()
    written = [await sink.commit(decision(n)) for n in range(12)]
    await sink.aclose()

    rows = sql(db, "SELECT seq, event, decision, subject, request_id, line FROM audit_records ORDER BY seq")
    by_seq = {row[0]: row for row in rows}
    for record in written:  # the exact line the file store would write, and its indexed copies
        _, event, decided, subject, request_id, line = by_seq[record["seq"]]
        assert line == encode_line(record)
        assert (event, decided, subject, request_id) == ("invocation", "allow", "alice", record["request_id"])
    checkpoints = [row[0] for row in rows if row[1] == "checkpoint"]
    assert checkpoints == [1, 7, 13, 16]  # the signed start, every 5 records, and the final one at close
    ((anchor_seq, host, pid),) = sql(db, "SELECT anchor_seq, host, pid FROM audit_chains")
    assert anchor_seq == 16 and host and pid > 0
    assert sql(db, "SELECT max(version) FROM audit_schema_version") == [(MIGRATIONS[-1][0],)]

    (chain,) = verify_db(db, chain=None, public_jwks=jwks)
    assert chain.chain_id == sink.chain_id
    assert (chain.report.ok, chain.report.records, chain.report.checkpoints) == (True, 16, 4), chain.summary()
    streamed = list(iter_records(db))
    assert [r["seq"] for r in streamed] == list(range(1, 17))
    assert {r["chain_id"] for r in streamed} == {sink.chain_id}


async def test_each_process_writes_its_own_chain(pki: Pki, db: str, jwks: dict[str, Any]) -> None:
    first, second = make_sink(pki, db), make_sink(pki, db)
    await first.start()
    await second.start()
    await asyncio.gather(*(sink.commit(decision(n)) for n in range(7) for sink in (first, second)))
    await first.aclose()
    await second.aclose()
    reports = verify_db(db, chain=None, public_jwks=jwks)
    assert {r.chain_id for r in reports} == {first.chain_id, second.chain_id}
    assert all(r.report.ok for r in reports)
    assert [r["chain_id"] for r in iter_records(db, second.chain_id)] == [second.chain_id] * 10


TAMPERING = [
    # (what an attacker with write access to the database does, the seq the verifier names, its reason)
    ("UPDATE audit_records SET decision = 'deny' WHERE seq = 3", 3, "column decision is 'deny'"),
    (
        "UPDATE audit_records SET line = replace(line, '\"allow\"', '\"deny\"') WHERE seq = 3",
        3,
        "does not match",
    ),
    # as in a file: the record after the hole is the first that does not follow
    ("DELETE FROM audit_records WHERE seq = 3", 4, "seq 4 follows seq 2"),
    ("UPDATE audit_records SET seq = seq + 100 WHERE seq = 3", 4, "seq 4 follows seq 2"),
]


@pytest.mark.parametrize(("statement", "seq", "why"), TAMPERING, ids=["column", "line", "delete", "move"])
async def test_tampering_with_a_row_is_named_by_chain_and_seq(
    pki: Pki, db: str, jwks: dict[str, Any], statement: str, seq: int, why: str
) -> None:
    sink = make_sink(pki, db)
    await sink.start()
    for n in range(8):
        await sink.commit(decision(n))
    await sink.aclose()
    sql(db, statement)
    (chain,) = verify_db(db, chain=sink.chain_id, public_jwks=jwks)
    assert not chain.report.ok
    assert chain.report.first_bad_seq == seq, chain.summary()
    assert why in (chain.report.problem or "")


async def test_a_cut_tail_is_caught_by_the_chain_anchor(pki: Pki, db: str, jwks: dict[str, Any]) -> None:
    sink = make_sink(pki, db)
    await sink.start()
    for n in range(8):
        await sink.commit(decision(n))
    await sink.aclose()  # final checkpoint at seq 10 is the anchor
    sql(db, "DELETE FROM audit_records WHERE seq > 7")
    (chain,) = verify_db(db, chain=None, public_jwks=jwks)
    assert (chain.report.ok, chain.report.first_bad_seq) == (False, 8)
    assert "truncated" in (chain.report.problem or "")


async def test_verify_db_command_exits_1_naming_chain_and_seq_and_init_is_idempotent(
    pki: Pki, db: str
) -> None:
    assert run_cli("audit", "init", "--db", db).returncode == 0
    again = run_cli("audit", "init", "--db", db)
    assert (again.returncode, again.stdout.strip()) == (
        0,
        f"ok: audit schema at version {MIGRATIONS[-1][0]} in {db.split('@')[1]}",
    )
    sink = make_sink(pki, db)
    await sink.start()
    for n in range(4):
        await sink.commit(decision(n))
    await sink.aclose()
    key = str(pki.signing_jwk)
    intact = run_cli("audit", "verify", "--db", db, "--key", key)
    assert intact.returncode == 0 and intact.stdout.startswith(f"chain {sink.chain_id} "), intact
    sql(db, "UPDATE audit_records SET decision = 'deny' WHERE seq = 2")
    tampered = run_cli("audit", "verify", "--db", db, "--chain", sink.chain_id, "--key", key)
    assert tampered.returncode == 1
    assert tampered.stdout.startswith(f"chain {sink.chain_id} ")
    assert "FAILED at seq 2: altered: column decision" in tampered.stdout
    missing = run_cli("audit", "verify", "--db", db, "--chain", "nope")
    assert (missing.returncode, missing.stdout.startswith("FAILED: no chain nope")) == (1, True)
    down = run_cli("audit", "verify", "--db", "postgresql://u:s3cret@127.0.0.1:1/x")
    assert down.returncode == 2 and "s3cret" not in down.stderr and len(down.stderr.splitlines()) == 1


async def test_concurrent_commits_share_transactions(pki: Pki, db: str, jwks: dict[str, Any]) -> None:
    sink = make_sink(pki, db, checkpoint_every=100)
    await sink.start()
    records = await asyncio.gather(*(sink.commit(decision(n)) for n in range(300)))
    await sink.aclose()
    assert sorted(r["seq"] for r in records) == sorted(set(r["seq"] for r in records))
    # rows inserted by one transaction share its xmin
    ((rows, transactions),) = sql(
        db, "SELECT count(*), count(DISTINCT xmin::text) FROM audit_records WHERE event = 'invocation'"
    )
    assert rows == 300
    assert transactions < 30, transactions  # group commit: far fewer transactions than records
    assert sink.transactions < 30
    (chain,) = verify_db(db, chain=None, public_jwks=jwks)
    assert chain.report.ok, chain.summary()


async def test_hostile_field_values_are_stored_exactly_and_break_no_batch(
    pki: Pki, db: str, jwks: dict[str, Any]
) -> None:
    sink = make_sink(pki, db)
    await sink.start()
    hostile = {
        "subject": "x" * 20_000,
        "actor": "nul\x00byte",
        "tool": "\u202eevil\n",
        "trace_id": {"a": [1]},
    }
    others = [sink.commit(decision(n)) for n in range(5)]
    written, *_ = await asyncio.gather(sink.commit(decision(99, **hostile)), *others)
    await sink.aclose()
    ((line,),) = sql(db, "SELECT line FROM audit_records WHERE seq = %s", written["seq"])
    assert json.loads(line)["subject"] == "x" * 20_000 and json.loads(line)["actor"] == "nul\x00byte"
    (chain,) = verify_db(db, chain=None, public_jwks=jwks)
    assert chain.report.ok, chain.summary()


async def test_a_newer_schema_or_no_database_refuses_to_start_with_one_line(pki: Pki, db: str) -> None:
    sql(db, "CREATE TABLE audit_schema_version (version integer PRIMARY KEY, applied_at timestamptz)")
    sql(db, "INSERT INTO audit_schema_version (version) VALUES (99)")
    with pytest.raises(AuditUnavailable, match="newer than this broker") as newer:
        await make_sink(pki, db).start()
    assert newer.value.reason == "audit_store_schema"
    with pytest.raises(AuditUnavailable, match=r"cannot use PostgreSQL at 127.0.0.1:1/x") as down:
        await make_sink(pki, "postgresql://u:s3cret@127.0.0.1:1/x", timeout_seconds=1).start()
    assert "s3cret" not in str(down.value)


# -- a commit whose outcome is unknown ----------------------------------------------------------------------------


class LossyProxy:
    """TCP proxy to PostgreSQL that, once armed, loses the next request (client → server) or the next answer
    (server → client) and cuts the connection: the client cannot know whether its commit happened."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.lose: str | None = None  # "request" or "answer"
        self.lost = asyncio.Event()
        self.port = 0

    async def __aenter__(self) -> LossyProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
            try:
                while data := await src.read(65536):
                    if self.lose == direction:
                        self.lose = None
                        self.lost.set()
                        return
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                return
            finally:
                writer.transport.abort()
                up_writer.transport.abort()

        await asyncio.gather(pump(reader, up_writer, "request"), pump(up_reader, writer, "answer"))


@pytest.fixture
async def proxied(db: str) -> AsyncIterator[tuple[LossyProxy, str]]:
    async with LossyProxy(("127.0.0.1", 5432)) as proxy:
        yield proxy, db.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")


@pytest.mark.parametrize("lose", ["answer", "request"])
async def test_a_commit_with_an_unknown_outcome_leaves_no_gap_and_no_fork(
    pki: Pki, db: str, jwks: dict[str, Any], proxied: tuple[LossyProxy, str], lose: str
) -> None:
    proxy, url = proxied
    sink = make_sink(pki, url, checkpoint_every=100)
    await sink.start()
    before = [await sink.commit(decision(n)) for n in range(3)]
    proxy.lose = lose
    outcomes = await asyncio.gather(
        *(sink.commit(decision(10 + n)) for n in range(5)), return_exceptions=True
    )
    assert proxy.lost.is_set()
    assert all(isinstance(o, AuditUnavailable) for o in outcomes), outcomes  # nothing acknowledged
    assert not sink.healthy
    await until(lambda: sink.healthy, "the sink reconnected")
    after = [await sink.commit(decision(20 + n)) for n in range(3)]
    await sink.aclose()

    stored = {r["request_id"] for r in iter_records(db) if r["event"] == "invocation"}
    assert {r["request_id"] for r in before + after} <= stored  # every acknowledged record is there
    refused = {f"req-{10 + n}" for n in range(5)}
    if lose == "answer":  # the commit happened: those records stay, the chain continues after them
        assert refused <= stored
        assert after[0]["seq"] == before[-1]["seq"] + 5 + 2  # + the checkpoint that sealed what landed
    else:  # it did not: the chain continues from the last known commit, the seqs are reused
        assert refused.isdisjoint(stored)
        assert after[0]["seq"] == before[-1]["seq"] + 1 + 1  # + the checkpoint sealing seq 1..3 at reconnect
    (chain,) = verify_db(db, chain=None, public_jwks=jwks)
    assert chain.report.ok, chain.summary()  # no gap, no fork, every checkpoint signed


# -- forged chains: an attacker with write access to the database, without the signing key (issue 11) ------------


async def kill(sink: PgAuditSink) -> None:
    """As SIGKILL leaves a chain: no final checkpoint; the connection just goes away."""
    sink._closed = True
    sink._cancel_timer()
    if sink._conn is not None:
        await sink._conn.close()


def forge(db: str, chain_id: str, lines: list[dict[str, Any]]) -> None:
    """Insert records as the sink would (hashes recomputed by ``seal``), no key needed."""
    from broker.audit.pgsink import _Row, batch_params

    query, params = batch_params(chain_id, [_Row(record, encode_line(record)) for record in lines])
    _execute(db, query, params)


def _execute(db: str, query: str, params: dict[str, Any]) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(query.encode(), params)


def rechain(records: list[dict[str, Any]], start: int = 1, prev: str = GENESIS) -> list[dict[str, Any]]:
    out = []
    for offset, record in enumerate(records):
        sealed = seal(record, seq=start + offset, prev=prev)
        out.append(sealed)
        prev = sealed["hash"]
    return out


def verify_cli(db: str, pki: Pki, *more: str) -> Any:
    return run_cli("audit", "verify", "--db", db, "--key", str(pki.signing_jwk), *more)


def line_of(output: str, chain_id: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith(f"chain {chain_id} ")]
    return line


async def test_a_clean_chain_starts_signed_and_verifies(pki: Pki, db: str) -> None:
    sink = make_sink(pki, db)
    await sink.start()
    for n in range(3):
        await sink.commit(decision(n))
    await sink.aclose()
    ((line,),) = sql(db, "SELECT line FROM audit_records WHERE seq = 1")
    start = json.loads(line)
    assert (start["event"], start["prev"]) == ("checkpoint", GENESIS)
    claims = json.loads(b64url_decode(start["sig"].split(".")[1]))
    assert claims["chain"] == sink.chain_id
    assert set(claims) == {"seq", "head", "ts", "chain", "host", "pid", "checkpoint_every", "seen"}
    assert (claims["checkpoint_every"], claims["seen"]) == (5, [])  # the first chain in the database
    ((line,),) = sql(db, "SELECT line FROM audit_records WHERE seq = 5")
    closing = json.loads(b64url_decode(json.loads(line)["sig"].split(".")[1]))
    assert (closing["final"], closing["seen"]) == (True, [])
    result = verify_cli(db, pki, "--max-unsealed", "0")
    assert result.returncode == 0, result.stdout
    assert "OK: 5 records, 2 checkpoints" in line_of(result.stdout, sink.chain_id)
    assert "closed by its final checkpoint" in line_of(result.stdout, sink.chain_id)


async def test_a_rewritten_unsealed_tail_of_a_killed_chain_is_reported_unverified(pki: Pki, db: str) -> None:
    sink = make_sink(pki, db)  # checkpoint_every 5: 1 start, 2..6, checkpoint 7, 8..10 unsealed
    await sink.start()
    for n in range(8):
        await sink.commit(decision(n))
    await kill(sink)
    rows = sql(
        db, "SELECT line FROM audit_records WHERE chain_id = %s AND seq <= 7 ORDER BY seq", sink.chain_id
    )
    tail = [
        json.loads(line) for (line,) in sql(db, "SELECT line FROM audit_records WHERE seq > 7 ORDER BY seq")
    ]
    for record in tail:
        record["decision"] = "deny"
    sql(db, "DELETE FROM audit_records WHERE seq > 7")
    forge(db, sink.chain_id, rechain(tail, start=8, prev=json.loads(rows[-1][0])["hash"]))

    lenient = verify_cli(db, pki)  # the default: the chain's checkpoint_every - 1 (4) from its signed start
    assert lenient.returncode == 0
    assert "unverified: seq 8..10 follow the last signed checkpoint" in line_of(lenient.stdout, sink.chain_id)
    strict = verify_cli(db, pki, "--max-unsealed", "0")
    assert strict.returncode == 1
    assert "FAILED at seq 8: unsealed: 3 records" in line_of(strict.stdout, sink.chain_id), strict.stdout


def invented(n: int) -> dict[str, Any]:
    return {"ts": "2026-01-01T00:00:00.000Z", **dict.fromkeys(RECORD_FIELDS), **decision(n)}


@pytest.mark.parametrize("start", ["none", "bogus-signature", "another-chains-start"])
async def test_a_made_up_chain_has_no_signed_start(pki: Pki, db: str, start: str) -> None:
    real = make_sink(pki, db)
    await real.start()
    await real.commit(decision(0))
    await real.aclose()
    forged = "01FORGEDCHAIN0000000000000"
    sql(db, "INSERT INTO audit_chains (chain_id, host, pid) VALUES (%s, 'web-1', 4242)", forged)
    records = [invented(n) for n in range(3)]
    if start == "bogus-signature":
        fake = {**invented(9), "event": "checkpoint", "sig": "eyJhbGciOiJFUzI1NiJ9.e30.AAAA"}
        records.insert(0, fake)
    elif start == "another-chains-start":
        ((line,),) = sql(db, "SELECT line FROM audit_records WHERE chain_id = %s AND seq = 1", real.chain_id)
        copied = json.loads(line)
        records = [copied, *rechain(records, start=2, prev=copied["hash"])]
    forge(db, forged, records if start == "another-chains-start" else rechain(records))

    result = verify_cli(db, pki)
    assert result.returncode == 1
    assert "FAILED at seq 1: no signed start" in line_of(result.stdout, forged), result.stdout
    assert "OK" in line_of(result.stdout, real.chain_id)


@pytest.mark.parametrize("how", ["records", "records-and-anchor", "host"])
async def test_records_relabelled_to_another_chain_fail_it(pki: Pki, db: str, how: str) -> None:
    a, b = make_sink(pki, db), make_sink(pki, db)
    await a.start()
    await b.start()
    for n in range(7):
        await a.commit(decision(n))
        await b.commit(decision(100 + n))
    await a.aclose()
    await b.aclose()
    if how == "host":  # the signed start names the process that wrote the chain
        sql(db, "UPDATE audit_chains SET host = 'elsewhere' WHERE chain_id = %s", b.chain_id)
    else:  # b's records replaced by a's (a itself is left without records)
        sql(db, "DELETE FROM audit_records WHERE chain_id = %s", b.chain_id)
        sql(db, "UPDATE audit_records SET chain_id = %s WHERE chain_id = %s", b.chain_id, a.chain_id)
    if how == "records-and-anchor":
        sql(
            db,
            "UPDATE audit_chains b SET anchor_seq = a.anchor_seq, anchor_head = a.anchor_head, "
            "anchor_sig = a.anchor_sig FROM audit_chains a WHERE a.chain_id = %s AND b.chain_id = %s",
            a.chain_id,
            b.chain_id,
        )
    result = verify_cli(db, pki)
    assert result.returncode == 1
    assert "FAILED at seq 1: no signed start" in line_of(result.stdout, b.chain_id), result.stdout


async def test_a_checkpoint_signed_for_another_chain_is_named(pki: Pki, db: str) -> None:
    # only a key holder could sign this; it shows the verifier binds every checkpoint to its chain
    signer = Signer.from_file(pki.signing_jwk)
    chain_id = "01OTHERCHECKPOINT000000000"
    assert run_cli("audit", "init", "--db", db).returncode == 0
    sql(db, "INSERT INTO audit_chains (chain_id, host, pid) VALUES (%s, 'web-1', 4242)", chain_id)
    ts = "2026-01-01T00:00:00.000Z"
    start = checkpoint_record(
        seq=1, prev=GENESIS, ts=ts, signer=signer, chain=chain_id, host="web-1", pid=4242
    )
    middle = rechain([invented(1), invented(2)], start=2, prev=start["hash"])
    foreign = checkpoint_record(seq=4, prev=middle[-1]["hash"], ts=ts, signer=signer, chain="01SOMEOTHER")
    forge(db, chain_id, [start, *middle, foreign])
    result = verify_cli(db, pki, "--chain", chain_id)
    assert result.returncode == 1
    assert "FAILED at seq 4: bad signature: checkpoint signed for chain '01SOMEOTHER'" in line_of(
        result.stdout, chain_id
    ), result.stdout
