"""The PostgreSQL audit store's pure decisions: where a chain continues after a commit whose outcome is unknown,
chain ids, the indexed copies of a record, migrations, messages without passwords, the shape of what a signed start
may sign (no database needed)."""

from __future__ import annotations

import pytest

from broker.audit.chain import GENESIS, checkpoint_record, load_keys
from broker.audit.pg import (
    INDEXED,
    MAX_INDEXED_CHARS,
    MIGRATIONS,
    SCHEMA_VERSION,
    SchemaTooNew,
    describe,
    indexed_columns,
    migration_steps,
)
from broker.audit.pgsink import (
    _INSERT,
    _INSERT_ANCHORED,
    ChainDiverged,
    _Row,
    batch_params,
    new_chain_id,
    reconcile,
)
from broker.audit.records import encode_line
from broker.audit.verify import verify_lines
from broker.jose import Signer, generate_ec_jwk

A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
BATCH = {4: B, 5: C}  # the failed batch: seq 4 and 5, after seq 3 (hash A) was committed


@pytest.mark.parametrize(
    ("committed", "found", "expected"),
    [
        (
            (3, A),
            (3, A),
            (3, A),
        ),  # the batch did not land: continue after the last commit (its seqs are reused)
        ((3, A), (5, C), (5, C)),  # it landed whole: continue after it (no gap, no re-write)
        ((0, GENESIS), None, (0, GENESIS)),  # nothing ever committed, nothing there
    ],
    ids=["not-landed", "landed", "empty-chain"],
)
def test_reconcile_continues_from_what_is_in_the_database(
    committed: tuple[int, str], found: tuple[int, str] | None, expected: tuple[int, str]
) -> None:
    assert reconcile(committed, BATCH, found) == expected


@pytest.mark.parametrize(
    ("found", "why"),
    [
        ((2, D), "rows were removed"),  # below what was committed
        (None, "rows were removed"),  # the chain's rows are gone
        ((3, D), "not a record this broker sealed"),  # seq 3 rewritten
        ((5, D), "not a record this broker sealed"),  # the batch's seq with another record: a second writer
        ((6, D), "not a record this broker sealed"),  # beyond anything sealed
    ],
    ids=["cut-below-commit", "all-gone", "committed-row-replaced", "fork-at-batch-seq", "foreign-tail"],
)
def test_reconcile_refuses_a_chain_it_did_not_write(found: tuple[int, str] | None, why: str) -> None:
    with pytest.raises(ChainDiverged, match=why):
        reconcile((3, A), BATCH, found)


def test_chain_ids_are_ulids_that_sort_by_start_time() -> None:
    early = new_chain_id(1_700_000_000.000, b"\xff" * 10)
    late = new_chain_id(1_700_000_000.001, b"\x00" * 10)
    assert len(early) == len(late) == 26
    assert early < late
    assert new_chain_id(1.0, b"\x01" * 10) != new_chain_id(1.0, b"\x02" * 10)


def test_indexed_copies_are_bounded_text_without_nul() -> None:
    record = {"event": "invocation", "decision": "deny", "subject": "x" * 5000, "actor": "a\x00b", "tool": 7}
    columns = dict(zip(INDEXED, indexed_columns(record), strict=True))
    assert (
        len(columns["subject"] or "") == MAX_INDEXED_CHARS
    )  # a btree entry must stay small (outage on demand)
    assert columns["actor"] == "a\ufffdb"  # PostgreSQL text cannot hold NUL
    assert columns["tool"] == "7"
    assert columns["txn"] is None


def test_migrations_run_in_order_once_and_a_newer_schema_is_refused() -> None:
    assert [version for version, _ in migration_steps(0)] == [v for v, _ in MIGRATIONS]
    assert migration_steps(SCHEMA_VERSION) == []
    with pytest.raises(SchemaTooNew, match="upgrade the broker"):
        migration_steps(SCHEMA_VERSION + 1)


def test_messages_name_the_database_never_its_password() -> None:
    assert describe("postgresql://audit:s3cret@db.internal:6432/fleet") == "db.internal:6432/fleet"
    assert "s3cret" not in describe("postgresql://audit:s3cret@db.internal/fleet")


def test_a_batch_with_a_checkpoint_moves_the_anchor_in_the_same_statement() -> None:
    record = {
        "seq": 1,
        "ts": "2026-01-01T00:00:00.000Z",
        "event": "invocation",
        "decision": "allow",
        "hash": A,
    }
    checkpoint = {"seq": 2, "ts": "2026-01-01T00:00:00.000Z", "event": "checkpoint", "decision": "allow"}
    checkpoint.update(hash=B, prev=A, sig="h.p.s")
    query, params = batch_params("chain", [_Row(record, "{}")])
    assert query == _INSERT and params["seq"] == [1]
    query, params = batch_params("chain", [_Row(record, "{}"), _Row(checkpoint, "{}")])
    assert query == _INSERT_ANCHORED
    assert (params["anchor_seq"], params["anchor_head"], params["anchor_sig"]) == (2, A, "h.p.s")


SIGNER = Signer.from_jwk(generate_ec_jwk())
IDENTITY = {"chain": "01CHAIN", "host": "web-1", "pid": 7}
SEEN = [{"chain": "01OLDER", "anchor_seq": 12}]
DIVERGED = {
    "chain": "01OLDER",
    "seq": 12,
    "head": A,
    "reason": "seq 13 in the database is not a record this broker sealed",
}


def signed_start(members: dict[str, object]) -> bytes:
    """A start signed by the broker key (a key holder) with these members: only their shape is in question."""
    start = checkpoint_record(
        seq=1, prev=GENESIS, ts="2026-01-01T00:00:00.000Z", signer=SIGNER, chain="01CHAIN", host="web-1", pid=7,
        members=members,
    )  # fmt: skip
    return encode_line(start).encode() + b"\n"


@pytest.mark.parametrize(
    "members",
    [{}, {"checkpoint_every": 100, "seen": SEEN}, {"checkpoint_every": 1, "seen": [], "diverged": DIVERGED}],
    ids=["none (an older broker)", "every-and-seen", "diverged"],
)
def test_a_signed_start_carries_its_members(members: dict[str, object]) -> None:
    keys = load_keys({"keys": [SIGNER.public_jwk()]})
    assert verify_lines([signed_start(members)], anchor=None, keys=keys, identity=IDENTITY).ok


@pytest.mark.parametrize(
    "members",
    [
        {"checkpoint_every": 0},
        {"checkpoint_every": True},
        {"seen": [{"chain": "01OLDER"}]},
        {"seen": [{"chain": "01OLDER", "anchor_seq": -1}]},
        {"seen": "01OLDER"},
        {"diverged": {"chain": "01OLDER", "seq": 12}},
        {"diverged": {**DIVERGED, "seq": "12"}},
        {"unknown": 1},
    ],
    ids=["every-0", "every-bool", "seen-no-seq", "seen-negative", "seen-not-a-list", "diverged-short",
         "diverged-seq-text", "unknown-member"],
)  # fmt: skip
def test_a_signed_start_with_a_malformed_member_is_no_signed_start(members: dict[str, object]) -> None:
    """A member the verifier would misread fails the start (seq 1), even signed by the broker's own key."""
    report = verify_lines([signed_start(members)], anchor=None, keys=None, identity=IDENTITY)
    assert not report.ok and report.first_bad_seq == 1
    assert (report.problem or "").startswith(
        "no signed start: bad signature: checkpoint JWS payload does not match"
    )
