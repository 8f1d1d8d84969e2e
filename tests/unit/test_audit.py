"""broker.audit: hash chain, signed checkpoints, head anchor, resume, failure handling (CONTRACT §9;
HOSTILE.md §0.5 and A01–A08). Real files in tmp_path, a real ES256 key, no mocks."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import resource
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.audit.chain import (
    CHECKPOINT_TYP,
    GENESIS,
    RECORD_FIELDS,
    checkpoint_claims,
    checkpoint_record,
    format_ts,
    record_hash,
    seal,
)
from broker.audit.sink import AuditLog, head_path_for
from broker.audit.verify import VerifyReport, verify_log
from broker.errors import AuditUnavailable
from broker.jose import Signer, b64url_decode, generate_ec_jwk, public_key_from_jwk, verify_signature
from tests.tamper import flip_char

# ---------------------------------------------------------------------------------------------------------
# factories

START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class StepClock:
    """A clock that advances one millisecond per reading: deterministic, distinct timestamps."""

    def __init__(self, start: float = START) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


def make_fields(i: int = 1, **overrides: Any) -> dict[str, Any]:
    """The fields the broker passes for one decision (CONTRACT §9)."""
    fields: dict[str, Any] = {
        "event": "invocation",
        "decision": "allow",
        "reason": "",
        "request_id": f"req-{i:04d}",
        "subject": "alice",
        "actor": "spiffe://example.org/agents/expense-assistant",
        "tool": "approveExpense",
        "args_digest": "x3Jw0sQ9mJm3Q3GkqB3ubm3Kq8PjXw0V9Xn2yIhcW3Q",
        "txn": f"txn-{i:04d}",
        "policy_version": "0123456789ab",
        "status": 200,
    }
    fields.update(overrides)
    return fields


def make_log(path: Path, signer: Signer, *, every: int = 100, clock: StepClock | None = None) -> AuditLog:
    log = AuditLog(path, signer=signer, checkpoint_every=every, clock=clock or StepClock())
    log.open()
    return log


def write_log(path: Path, signer: Signer, n: int, *, every: int = 100, close: bool = True) -> AuditLog:
    log = make_log(path, signer, every=every)
    for i in range(1, n + 1):
        log.append(make_fields(i))
    if close:
        log.close()
    return log


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def parse(line: bytes) -> dict[str, Any]:
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


def dump(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def jwks_of(signer: Signer) -> dict[str, Any]:
    return {"keys": [signer.public_jwk()]}


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.from_jwk(generate_ec_jwk())


@pytest.fixture(scope="module")
def attacker() -> Signer:
    return Signer.from_jwk(generate_ec_jwk())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, signer: Signer) -> Path:
    """250 decisions, checkpoint_every=100, closed: checkpoints at seq 101, 202 and 253 (the final one)."""
    path = tmp_path_factory.mktemp("pristine") / "audit.jsonl"
    write_log(path, signer, 250)
    return path


@pytest.fixture
def copy_of(tmp_path: Path) -> Callable[[Path], Path]:
    def copy(source: Path) -> Path:
        target = tmp_path / "copy" / source.name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(source, target)
        if head_path_for(source).exists():
            shutil.copyfile(head_path_for(source), head_path_for(target))
        return target

    return copy


# ---------------------------------------------------------------------------------------------------------
# chain.py (pure)


def test_record_hash_known_answer() -> None:
    record = {
        "seq": 1,
        "ts": "2026-01-01T00:00:00.000Z",
        "event": "invocation",
        "status": 200,
        "prev": GENESIS,
    }
    jcs = (
        b'{"event":"invocation","prev":"'
        + GENESIS.encode()
        + b'","seq":1,"status":200,"ts":"2026-01-01T00:00:00.000Z"}'
    )
    expected = hashlib.sha256(GENESIS.encode() + jcs).hexdigest()
    assert record_hash(GENESIS, record) == expected
    # a "hash" member is not part of what is hashed, and key order does not matter (JCS)
    assert record_hash(GENESIS, {"hash": "f" * 64, **dict(reversed(list(record.items())))}) == expected


def test_seal_orders_fields_and_ignores_caller_chain_fields() -> None:
    sealed = seal({"ts": "t", "event": "mcp", "seq": 99, "prev": "x", "hash": "y"}, seq=7, prev="a" * 64)
    assert list(sealed) == ["seq", "ts", "event", "prev", "hash"]
    assert (sealed["seq"], sealed["prev"]) == (7, "a" * 64)
    assert sealed["hash"] == record_hash("a" * 64, {k: v for k, v in sealed.items() if k != "hash"})


def test_checkpoint_record_signs_its_own_seq_prev_and_ts(signer: Signer) -> None:
    prev = "b" * 64
    record = checkpoint_record(seq=42, prev=prev, ts="2026-01-01T00:00:00.000Z", signer=signer)
    assert record["event"] == "checkpoint" and record["decision"] == "allow" and record["reason"] == ""
    assert all(record[name] is None for name in RECORD_FIELDS if name not in ("event", "decision", "reason"))
    header_b64, payload_b64, sig_b64 = record["sig"].split(".")
    header = json.loads(b64url_decode(header_b64))
    assert header == {"alg": "ES256", "typ": CHECKPOINT_TYP, "kid": signer.kid}
    assert json.loads(b64url_decode(payload_b64)) == checkpoint_claims(seq=42, head=prev, ts=record["ts"])
    key = public_key_from_jwk(signer.public_jwk())
    assert verify_signature(key, "ES256", f"{header_b64}.{payload_b64}".encode(), b64url_decode(sig_b64))
    # the sig is inside the hashed record
    assert record["hash"] == record_hash(prev, record)
    assert record["hash"] != record_hash(prev, {**record, "sig": flip_char(record["sig"])})


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        pytest.param(0.0, "1970-01-01T00:00:00.000Z", id="epoch"),
        pytest.param(START, "2026-01-01T00:00:00.000Z", id="whole-second"),
        pytest.param(START + 0.1239, "2026-01-01T00:00:00.123Z", id="millis-truncated"),
        pytest.param(START + 59.9999, "2026-01-01T00:00:59.999Z", id="never-rounds-up-a-second"),
    ],
)
def test_format_ts_is_rfc3339_utc_millis(epoch: float, expected: str) -> None:
    assert format_ts(epoch) == expected


# ---------------------------------------------------------------------------------------------------------
# a healthy log


def test_intact_log_verifies_with_three_checkpoints(pristine: Path, signer: Signer) -> None:
    report = verify_log(pristine, public_jwks=jwks_of(signer))
    assert report == VerifyReport(
        ok=True, records=253, checkpoints=3, first_bad_seq=None, problem=None, unsealed=0,
        signatures_checked=True, first_bad_line=None, last_seq=253, anchor_seq=253,
    )  # fmt: skip
    assert report.summary().startswith("OK: 253 records, 3 checkpoints, signatures checked")
    lines = [parse(line) for line in read_lines(pristine)]
    assert [r["seq"] for r in lines if r["event"] == "checkpoint"] == [101, 202, 253]
    assert lines[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(lines))


def test_verify_without_key_checks_chain_only(pristine: Path) -> None:
    report = verify_log(pristine, public_jwks=None)
    assert report.ok and not report.signatures_checked
    assert "NOT checked" in report.summary()


def test_verify_accepts_a_single_jwk(pristine: Path, signer: Signer) -> None:
    assert verify_log(pristine, public_jwks=signer.public_jwk()).ok


def test_record_layout_and_head_anchor(pristine: Path) -> None:
    lines = read_lines(pristine)
    first = parse(lines[0])
    assert list(first) == ["seq", "ts", *RECORD_FIELDS, "prev", "hash"]
    assert first["ts"] == "2026-01-01T00:00:00.001Z"
    last = parse(lines[-1])
    anchor = json.loads(head_path_for(pristine).read_bytes())
    assert anchor == {"seq": 253, "head": last["prev"], "sig": last["sig"]}


def test_records_written_counts_checkpoints(tmp_path: Path, signer: Signer) -> None:
    log = write_log(tmp_path / "a.jsonl", signer, 7, every=3)
    assert log.records_written == len(read_lines(tmp_path / "a.jsonl")) == 7 + 2 + 1
    assert not log.healthy  # closed


def test_empty_log_verifies(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert verify_log(path, public_jwks=None).ok


# ---------------------------------------------------------------------------------------------------------
# tampering (A01–A04): each row breaks one thing; the verifier names the first bad record


def edit(seq: int, old: bytes, new: bytes) -> Callable[[list[bytes]], list[bytes]]:
    def mutate(lines: list[bytes]) -> list[bytes]:
        assert old in lines[seq - 1]
        lines[seq - 1] = lines[seq - 1].replace(old, new, 1)
        return lines

    return mutate


def edit_and_rehash(seq: int) -> Callable[[list[bytes]], list[bytes]]:
    def mutate(lines: list[bytes]) -> list[bytes]:
        record = parse(lines[seq - 1])
        record["decision"], record["reason"] = "deny", "rewritten"
        lines[seq - 1] = dump(seal(record, seq=seq, prev=record["prev"]))
        return lines

    return mutate


def delete(*seqs: int) -> Callable[[list[bytes]], list[bytes]]:
    return lambda lines: [line for i, line in enumerate(lines, 1) if i not in seqs]


def swap(a: int, b: int) -> Callable[[list[bytes]], list[bytes]]:
    def mutate(lines: list[bytes]) -> list[bytes]:
        lines[a - 1], lines[b - 1] = lines[b - 1], lines[a - 1]
        return lines

    return mutate


def keep_first(n: int) -> Callable[[list[bytes]], list[bytes]]:
    return lambda lines: lines[:n]


def duplicate(seq: int) -> Callable[[list[bytes]], list[bytes]]:
    return lambda lines: [*lines[:seq], lines[seq - 1], *lines[seq:]]


def cut_last_line_in_half(lines: list[bytes]) -> list[bytes]:
    return [*lines[:-1], lines[-1][: len(lines[-1]) // 2]]


TAMPERING = [
    pytest.param(edit(120, b'"subject":"alice"', b'"subject":"alicf"'), 120, 120, "altered: record content",
                 id="a01-edit-value"),
    pytest.param(edit(120, b'"status":200', b'"status":403'), 120, 120, "altered: record content",
                 id="a01-edit-status"),
    pytest.param(edit(120, b'"seq":120', b'"seq":121'), 121, 120, "altered: record content", id="a01-edit-seq"),
    pytest.param(edit(120, b'"hash":"', b'"hash":"0'), 120, 120, "altered: record content", id="a01-edit-hash"),
    pytest.param(edit(120, b'{"seq":120', b'{"seq":120,'), None, 120, "altered: line is not valid JSON",
                 id="a01-break-json"),
    pytest.param(edit(101, b'"sig":"ey', b'"sig":"eX'), 101, 101, "altered: record content",
                 id="a01-edit-checkpoint-sig"),
    pytest.param(edit_and_rehash(120), 121, 121, "chain broken", id="a01-edit-and-rehash-one"),
    pytest.param(delete(120), 121, 120, "missing or reordered: seq 121 follows seq 119", id="a02-delete-middle"),
    pytest.param(delete(101), 102, 101, "missing or reordered", id="a02-delete-checkpoint"),
    pytest.param(delete(1), 2, 1, "missing or reordered: seq 2 follows seq 0", id="a02-delete-first"),
    pytest.param(swap(120, 121), 121, 120, "missing or reordered: seq 121 follows seq 119", id="a03-swap"),
    pytest.param(swap(1, 253), 253, 1, "missing or reordered", id="a03-swap-first-last"),
    pytest.param(duplicate(120), 120, 121, "missing or reordered: seq 120 follows seq 120", id="a03-replay-line"),
    pytest.param(keep_first(250), 251, None, "truncated: head anchor names seq 253 but log ends at 250",
                 id="a04-delete-last-3"),
    pytest.param(keep_first(252), 253, None, "truncated: head anchor names seq 253 but log ends at 252",
                 id="a04-delete-final-checkpoint"),
    pytest.param(keep_first(202), 203, None, "truncated: head anchor names seq 253 but log ends at 202",
                 id="a04-cut-at-a-checkpoint"),
    pytest.param(keep_first(0), 1, None, "truncated: head anchor names seq 253 but log ends at 0",
                 id="a04-emptied"),
    pytest.param(delete(*range(203, 253)), 253, 203, "missing or reordered: seq 253 follows seq 202",
                 id="tail-cut-before-final-checkpoint"),
    pytest.param(cut_last_line_in_half, None, 253, "truncated: partial last line 253", id="partial-last-line"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "bad_seq", "bad_line", "problem"), TAMPERING)
def test_tampering_is_detected(
    pristine: Path,
    signer: Signer,
    copy_of: Callable[[Path], Path],
    mutate: Callable[[list[bytes]], list[bytes]],
    bad_seq: int | None,
    bad_line: int | None,
    problem: str,
) -> None:
    path = copy_of(pristine)
    path.write_bytes(b"".join(mutate(read_lines(path))))
    for keys in (jwks_of(signer), None):  # the chain and the anchor catch these even without the key
        report = verify_log(path, public_jwks=keys)
        assert not report.ok
        assert report.problem is not None and report.problem.startswith(problem), report.problem
        assert (report.first_bad_seq, report.first_bad_line) == (bad_seq, bad_line)
        assert report.summary().startswith("FAILED")


def test_without_the_head_anchor_a_cut_tail_goes_unnoticed(
    pristine: Path, copy_of: Callable[[Path], Path]
) -> None:
    """Why the anchor exists (HOSTILE §0.5): the chain alone verifies after its last k records are deleted."""
    path = copy_of(pristine)
    path.write_bytes(b"".join(read_lines(path)[:250]))
    head_path_for(path).unlink()
    report = verify_log(path, public_jwks=None)
    assert report.ok and report.unsealed == 48 and report.anchor_seq is None
    assert "no head anchor found" in report.summary()


def rewrite_anchor(path: Path, **changes: Any) -> None:
    anchor = json.loads(head_path_for(path).read_bytes())
    anchor.update(changes)
    head_path_for(path).write_text(json.dumps(anchor))


@pytest.mark.parametrize(
    ("change", "with_key", "problem", "bad_seq"),
    [
        pytest.param({"head": "0" * 64}, False, "head anchor does not match this record", 253,
                     id="anchor-head-edited"),
        pytest.param({"head": "0" * 64}, True, "head anchor", None, id="anchor-head-edited-signature-checked"),
        pytest.param({"seq": 202}, False, "head anchor does not match this record", 202, id="anchor-seq-edited"),
        pytest.param({"sig": "x.y.z"}, True, "head anchor", None, id="anchor-sig-garbage"),
        pytest.param({"seq": "253"}, False, "malformed head anchor", None, id="anchor-seq-string"),
    ],
)  # fmt: skip
def test_tampered_head_anchor_is_detected(
    pristine: Path,
    signer: Signer,
    copy_of: Callable[[Path], Path],
    change: dict[str, Any],
    with_key: bool,
    problem: str,
    bad_seq: int | None,
) -> None:
    path = copy_of(pristine)
    rewrite_anchor(path, **change)
    report = verify_log(path, public_jwks=jwks_of(signer) if with_key else None)
    assert not report.ok
    assert report.problem is not None and report.problem.startswith(problem), report.problem
    assert report.first_bad_seq == bad_seq


# ---------------------------------------------------------------------------------------------------------
# A05: a chain rebuilt from genesis by someone who can write the file but has not got the key

Signing = Callable[[Signer, int, str, str, str], str]


def forge(path: Path, signing: Signing, signer: Signer, *, rewrite_anchor: bool) -> None:
    """Change seq 50's subject and re-seal every record from genesis, checkpoints signed by ``signing``."""
    prev, lines = GENESIS, []
    checkpoint: dict[str, Any] | None = None
    for line in read_lines(path):
        record = parse(line)
        seq, old_sig = record.pop("seq"), record.get("sig", "")
        del record["prev"], record["hash"]
        if seq == 50:
            record["subject"] = "mallory"
        if record["event"] == "checkpoint":
            record["sig"] = signing(signer, seq, prev, record["ts"], old_sig)
        sealed = seal(record, seq=seq, prev=prev)
        if record["event"] == "checkpoint":
            checkpoint = sealed
        lines.append(dump(sealed))
        prev = sealed["hash"]
    path.write_bytes(b"".join(lines))
    if rewrite_anchor:
        assert checkpoint is not None
        anchor = {"seq": checkpoint["seq"], "head": checkpoint["prev"], "sig": checkpoint["sig"]}
        head_path_for(path).write_text(json.dumps(anchor))


def sign_with(
    signer: Signer, seq: int, prev: str, ts: str, old_sig: str, *, typ: str = CHECKPOINT_TYP
) -> str:
    return signer.sign(checkpoint_claims(seq=seq, head=prev, ts=ts), typ=typ)


def sign_claiming_kid(kid: str) -> Signing:
    def sign(signer: Signer, seq: int, prev: str, ts: str, old_sig: str) -> str:
        claims = checkpoint_claims(seq=seq, head=prev, ts=ts)
        return signer.sign(claims, typ=CHECKPOINT_TYP, extra_headers={"kid": kid})

    return sign


def keep_old_sig(signer: Signer, seq: int, prev: str, ts: str, old_sig: str) -> str:
    return old_sig


@pytest.mark.parametrize(
    ("who", "signing", "rewrite", "problem", "bad_seq"),
    [
        pytest.param("attacker", sign_with, True, "head anchor", None, id="own-key-and-forged-anchor"),
        pytest.param("attacker", sign_with, False, "bad signature: checkpoint signed by a key not in", 101,
                     id="own-key-anchor-out-of-reach"),
        pytest.param("attacker", "claim-real-kid", False, "bad signature: checkpoint signature does not verify",
                     101, id="own-key-claiming-our-kid"),
        pytest.param("attacker", keep_old_sig, False, "bad signature: checkpoint JWS payload does not match",
                     101, id="replayed-old-signatures"),
        pytest.param("signer", lambda *a: sign_with(*a, typ="JWT"), False, "bad signature: checkpoint JWS typ",
                     101, id="wrong-typ"),
    ],
)  # fmt: skip
def test_a05_rebuilt_chain_fails_signatures(
    pristine: Path,
    signer: Signer,
    attacker: Signer,
    copy_of: Callable[[Path], Path],
    who: str,
    signing: Signing | str,
    rewrite: bool,
    problem: str,
    bad_seq: int | None,
) -> None:
    path = copy_of(pristine)
    sign = sign_claiming_kid(signer.kid) if signing == "claim-real-kid" else signing
    assert callable(sign)
    forge(path, sign, attacker if who == "attacker" else signer, rewrite_anchor=rewrite)
    report = verify_log(path, public_jwks=jwks_of(signer))
    assert not report.ok and report.signatures_checked
    assert report.problem is not None and report.problem.startswith(problem), report.problem
    assert report.first_bad_seq == bad_seq


def test_a05_a_complete_forgery_needs_the_key_to_be_caught(
    pristine: Path, attacker: Signer, signer: Signer, copy_of: Callable[[Path], Path]
) -> None:
    path = copy_of(pristine)
    forge(path, sign_with, attacker, rewrite_anchor=True)
    assert verify_log(path, public_jwks=None).ok  # consistent chain and anchor: only the signature tells
    assert not verify_log(path, public_jwks=jwks_of(signer)).ok


def downgrade_checkpoints(path: Path) -> None:
    """Rebuild the chain with every checkpoint turned into an ordinary record (no signature left to check)."""
    prev, lines = GENESIS, []
    for line in read_lines(path):
        record = parse(line)
        seq = record.pop("seq")
        del record["prev"], record["hash"]
        if record["event"] == "checkpoint":
            del record["sig"]
            record["event"] = "config_load"
        sealed = seal(record, seq=seq, prev=prev)
        lines.append(dump(sealed))
        prev = sealed["hash"]
    path.write_bytes(b"".join(lines))


def test_a05_checkpoints_downgraded_caught_by_anchor(
    pristine: Path, signer: Signer, copy_of: Callable[[Path], Path]
) -> None:
    path = copy_of(pristine)
    downgrade_checkpoints(path)
    report = verify_log(path, public_jwks=jwks_of(signer))
    assert not report.ok and report.first_bad_seq == 253
    assert report.problem == "head anchor does not match this record"


def test_a05_checkpoints_downgraded_and_anchor_gone_caught_by_max_unsealed(
    pristine: Path, signer: Signer, copy_of: Callable[[Path], Path]
) -> None:
    path = copy_of(pristine)
    downgrade_checkpoints(path)
    head_path_for(path).unlink()
    lenient = verify_log(path, public_jwks=jwks_of(signer))
    assert lenient.ok and (lenient.checkpoints, lenient.unsealed) == (0, 253)  # nothing signed: only counted
    strict = verify_log(path, public_jwks=jwks_of(signer), max_unsealed=99)
    assert not strict.ok and strict.first_bad_seq == 1
    assert strict.problem == "unsealed: 253 records after the last checkpoint (more than 99)"


# ---------------------------------------------------------------------------------------------------------
# crash tail: records after the last checkpoint


@pytest.fixture
def crashed(tmp_path: Path, signer: Signer, copy_of: Callable[[Path], Path]) -> Iterator[Path]:
    """A snapshot of a live log after 250 decisions: checkpoints 101 and 202, then 50 unsealed records."""
    log = write_log(tmp_path / "live.jsonl", signer, 250, close=False)
    yield copy_of(log.path)
    log.close()


def test_unsealed_tail_is_reported(crashed: Path, signer: Signer) -> None:
    report = verify_log(crashed, public_jwks=jwks_of(signer))
    assert report.ok and (report.records, report.checkpoints, report.unsealed) == (252, 2, 50)
    assert verify_log(crashed, public_jwks=jwks_of(signer), max_unsealed=99).ok  # a live tail is normal
    assert "50 records after the last checkpoint are not signed yet" in report.summary()


def test_cut_inside_unsealed_tail_is_detected(crashed: Path, signer: Signer) -> None:
    crashed.write_bytes(b"".join(delete(*range(210, 216))(read_lines(crashed))))
    report = verify_log(crashed, public_jwks=jwks_of(signer))
    assert not report.ok and report.first_bad_seq == 216 and report.first_bad_line == 210


def test_cut_end_of_unsealed_tail_only_shrinks_unsealed(crashed: Path, signer: Signer) -> None:
    """The documented limit: nothing signed covers these records yet, so the report can only count them."""
    crashed.write_bytes(b"".join(read_lines(crashed)[:240]))
    report = verify_log(crashed, public_jwks=jwks_of(signer))
    assert report.ok and report.unsealed == 38


def test_a_file_log_keeps_verifying_after_a_restart_because_the_file_store_signs_no_final(
    tmp_path: Path, signer: Signer
) -> None:
    """A file continues after a restart: its closing checkpoint is not final (old and new logs verify alike)."""
    path = tmp_path / "audit.jsonl"
    write_log(path, signer, 3)  # closed: seq 4 is the closing checkpoint
    write_log(path, signer, 2)  # the next run appends after it
    closing = parse(read_lines(path)[3])
    assert closing["event"] == "checkpoint" and "final" not in json.loads(
        b64url_decode(closing["sig"].split(".")[1])
    )
    report = verify_log(path, public_jwks=jwks_of(signer), max_unsealed=0)
    assert report.ok and report.final_seq is None, report.summary()


@pytest.mark.parametrize("after", [0, 1, 2], ids=["ends-there", "one-record-after", "two-after"])
def test_a_record_after_a_checkpoint_signed_final_fails_there(
    tmp_path: Path, signer: Signer, after: int
) -> None:
    """The verifier honours ``final: true`` wherever it is signed (the PostgreSQL store signs it at a clean stop)."""
    path = tmp_path / "audit.jsonl"
    write_log(path, signer, 3)
    last = parse(read_lines(path)[-1])
    final = checkpoint_record(
        seq=last["seq"] + 1, prev=last["hash"], ts=last["ts"], signer=signer, final=True
    )
    appended = [final]
    for i in range(after):  # appended without the key, correctly chained
        record = {"ts": final["ts"], **dict.fromkeys(RECORD_FIELDS), **make_fields(100 + i)}
        appended.append(seal(record, seq=appended[-1]["seq"] + 1, prev=appended[-1]["hash"]))
    with path.open("ab") as fh:
        fh.write(b"".join(dump(record) for record in appended))
    report = verify_log(path, public_jwks=jwks_of(signer))
    if after == 0:
        assert (
            report.ok
            and report.final_seq == final["seq"]
            and "closed by its final checkpoint" in report.summary()
        )
        return
    assert not report.ok and report.first_bad_seq == final["seq"] + 1
    assert (report.problem or "").startswith(
        f"after the final checkpoint: seq {final['seq']} is signed as the last"
    )
    assert (
        verify_log(path, public_jwks=None).first_bad_seq == final["seq"] + 1
    )  # the claim is read without a key too


# ---------------------------------------------------------------------------------------------------------
# A07: agent-supplied text cannot forge lines


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param('x\n{"seq":999,"event":"invocation","decision":"allow"}', id="newline-json"),
        pytest.param("x\r\ny", id="crlf"),
        pytest.param("\x1b[31mDENIED\x1b[0m\x1b]0;title\x07", id="ansi-escapes"),
        pytest.param("a\u2028b\u2029c\x85d", id="unicode-line-separators"),
        pytest.param("\u202eevil\u200b", id="bidi-and-zero-width"),
        pytest.param("\x00\x7f", id="nul-and-del"),
    ],
)
def test_a07_hostile_fields_stay_on_one_ascii_line(tmp_path: Path, signer: Signer, hostile: str) -> None:
    path = tmp_path / "a.jsonl"
    log = make_log(path, signer)
    written = log.append(make_fields(1, subject=hostile, reason=hostile, args={hostile: [hostile]}))
    log.close()
    lines = read_lines(path)
    assert len(lines) == 2  # the record and the closing checkpoint
    assert (
        lines[0].isascii()
        and lines[0].count(b"\n") == 1
        and b"\r" not in lines[0]
        and b"\x1b" not in lines[0]
    )
    record = parse(lines[0])
    assert record == written and record["subject"] == hostile and record["args"] == {hostile: [hostile]}
    assert verify_log(path, public_jwks=None).ok


def test_lone_surrogate_in_a_field_is_recorded_not_fatal(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "a.jsonl"
    log = make_log(path, signer)
    written = log.append(make_fields(1, subject="\ud800x", decision="deny", reason="invalid_token"))
    log.close()
    assert written["subject"] == "\ufffdx"
    assert verify_log(path, public_jwks=None).ok


def test_extra_fields_follow_contract_fields(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "a.jsonl"
    log = make_log(path, signer)
    written = log.append(
        {"event": "config_load", "decision": "allow", "args": {"amount": 4800.0}, "note": "x"}
    )
    log.close()
    assert list(written) == ["seq", "ts", *RECORD_FIELDS, "args", "note", "prev", "hash"]
    assert written["tool"] is None and written["status"] is None
    assert parse(read_lines(path)[0]) == written


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(make_fields(seq=5), id="reserved-seq"),
        pytest.param(make_fields(ts="2020-01-01T00:00:00.000Z"), id="reserved-ts"),
        pytest.param(make_fields(prev=GENESIS), id="reserved-prev"),
        pytest.param(make_fields(hash="0" * 64), id="reserved-hash"),
        pytest.param(make_fields(sig="a.b.c"), id="reserved-sig"),
        pytest.param(make_fields(event="checkpoint"), id="checkpoint-event-is-the-logs"),
        pytest.param(make_fields(event="login"), id="unknown-event"),
        pytest.param(make_fields(decision="maybe"), id="unknown-decision"),
        pytest.param({"decision": "allow"}, id="missing-event"),
    ],
)
def test_append_refuses_contract_violations(tmp_path: Path, signer: Signer, fields: dict[str, Any]) -> None:
    log = make_log(tmp_path / "a.jsonl", signer)
    with pytest.raises(ValueError):
        log.append(fields)
    assert (log.seq, log.records_written) == (0, 0)
    assert (tmp_path / "a.jsonl").read_bytes() == b""
    log.close()


def test_append_after_close_is_audit_unavailable(tmp_path: Path, signer: Signer) -> None:
    log = write_log(tmp_path / "a.jsonl", signer, 1)
    with pytest.raises(AuditUnavailable) as caught:
        log.append(make_fields())
    assert caught.value.reason == "audit_closed"


# ---------------------------------------------------------------------------------------------------------
# resume


def test_reopen_continues_the_chain(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, signer, 10)  # 10 records + closing checkpoint 11
    before = parse(read_lines(path)[-1])
    log = make_log(path, signer, clock=StepClock(START + 60))
    assert (log.seq, log.head) == (11, before["hash"])
    first_new = log.append(make_fields(11))
    for i in range(12, 16):
        log.append(make_fields(i))
    log.close()
    assert (first_new["seq"], first_new["prev"]) == (12, before["hash"])
    report = verify_log(path, public_jwks=jwks_of(signer))
    assert report.ok and (report.records, report.checkpoints, report.unsealed) == (17, 2, 0)


def test_reopen_after_crash_names_the_unsealed_tail_unverified(tmp_path: Path, signer: Signer) -> None:
    """CONTRACT §15: nothing proves a broker wrote a tail no checkpoint covers, so it is never sealed as verified."""
    path = tmp_path / "a.jsonl"
    write_log(path, signer, 10)
    # the state a crash before close() leaves: no checkpoint, no anchor
    path.write_bytes(b"".join(read_lines(path)[:10]))
    head_path_for(path).unlink()
    log = make_log(path, signer)
    assert log.seq == 12 and log.records_written == 2  # audit_resume 11 and its checkpoint 12
    assert log.resumed is not None and (log.resumed.unverified_from, log.resumed.unverified_to) == (1, 10)
    log.close()
    resume = parse(read_lines(path)[10])
    assert (resume["event"], resume["unverified_from"], resume["anchor_seq"]) == ("audit_resume", 1, 0)
    report = verify_log(path, public_jwks=jwks_of(signer))
    assert not report.ok and (report.records, report.checkpoints, report.unsealed) == (12, 1, 0)
    assert report.first_bad_seq == 1 and report.unverified == ((1, 10),)
    assert json.loads(head_path_for(path).read_bytes())["seq"] == 12


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-40]), "audit_log_corrupt", id="partial-last-line"),
        pytest.param(lambda p: p.write_bytes(b"".join(edit(11, b'"reason":""', b'"reason":"x"')(read_lines(p)))),
                     "audit_log_corrupt", id="last-record-edited"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes() + b"not json\n"), "audit_log_corrupt",
                     id="garbage-last-line"),
        pytest.param(lambda p: p.write_bytes(b"".join(read_lines(p)[:5])), "audit_log_truncated",
                     id="tail-cut-below-anchor"),
        pytest.param(lambda p: p.write_bytes(b""), "audit_log_truncated", id="emptied-under-anchor"),
        pytest.param(lambda p: head_path_for(p).write_text("{"), "audit_log_corrupt", id="anchor-unreadable"),
        pytest.param(lambda p: rewrite_anchor(p, head="1" * 64), "audit_log_corrupt", id="anchor-mismatch"),
    ],
)  # fmt: skip
def test_reopen_refuses_a_damaged_log(
    tmp_path: Path, signer: Signer, damage: Callable[[Path], None], reason: str
) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, signer, 10)
    damage(path)
    before = path.read_bytes()
    with pytest.raises(AuditUnavailable) as caught:
        make_log(path, signer)
    assert caught.value.reason == reason
    assert path.read_bytes() == before  # nothing appended: no second chain started


def test_a06_second_writer_on_the_same_file_is_refused(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "a.jsonl"
    first = write_log(path, signer, 3, close=False)
    with pytest.raises(AuditUnavailable) as caught:
        make_log(path, signer)
    assert caught.value.reason == "audit_log_locked"
    first.close()
    make_log(path, signer).close()  # the lock goes with the writer


# ---------------------------------------------------------------------------------------------------------
# write failures (A08): refuse, keep the chain consistent


def dev_full(path: Path) -> io.FileIO:
    return io.FileIO("/dev/full", "a")  # every write fails with ENOSPC, like a full disk


def read_only(path: Path) -> io.FileIO:
    return io.FileIO(path, "r")  # every write fails (EBADF / not writable)


@pytest.mark.parametrize("bad_handle", [dev_full, read_only], ids=["disk-full", "read-only"])
@pytest.mark.parametrize("every", [100, 6], ids=["plain-record", "record-due-a-checkpoint"])
def test_write_failure_refuses_and_keeps_the_chain(
    tmp_path: Path, signer: Signer, bad_handle: Callable[[Path], io.FileIO], every: int
) -> None:
    path = tmp_path / "a.jsonl"
    log = write_log(path, signer, 5, every=every, close=False)
    seq, head, before = log.seq, log.head, path.read_bytes()
    good = log._file
    log._file = bad_handle(path)
    with pytest.raises(AuditUnavailable) as caught:
        log.append(make_fields(6))
    assert caught.value.reason == "audit_write_failed"
    assert (log.seq, log.head, log.healthy) == (seq, head, False)
    assert path.read_bytes() == before
    log._file.close()
    log._file = good  # the disk is back
    written = log.append(make_fields(6))
    assert written["seq"] == seq + 1 and written["prev"] == head and log.healthy
    log.close()
    report = verify_log(path, public_jwks=jwks_of(signer))
    assert report.ok and report.unsealed == 0


def test_partial_write_is_rolled_back(tmp_path: Path, signer: Signer) -> None:
    """A short write (file size limit hit mid-line) is truncated away, so the file never forks or breaks."""
    path = tmp_path / "a.jsonl"
    log = write_log(path, signer, 5, close=False)
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 50, hard))
        with pytest.raises(AuditUnavailable):
            log.append(make_fields(6))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert path.read_bytes() == before and log.seq == 5
    log.append(make_fields(6))
    log.close()
    assert verify_log(path, public_jwks=jwks_of(signer)).ok


def test_anchor_write_failure_refuses_but_records_stay_chained(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "a.jsonl"
    log = write_log(path, signer, 4, every=5, close=False)
    blocker = head_path_for(path).with_name(head_path_for(path).name + ".tmp")
    blocker.mkdir()  # the anchor's temporary file cannot be created
    with pytest.raises(AuditUnavailable) as caught:
        log.append(make_fields(5))
    assert caught.value.reason == "audit_anchor_write_failed"
    assert log.seq == 6 and not log.healthy  # record 5 and checkpoint 6 are on disk
    blocker.rmdir()
    log.append(make_fields(6))
    log.close()
    assert log.healthy is False  # closed
    report = verify_log(path, public_jwks=jwks_of(signer))
    assert report.ok and report.checkpoints == 2
    assert json.loads(head_path_for(path).read_bytes())["seq"] == 8


def test_open_creates_parent_folders(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "deep" / "er" / "audit.jsonl"
    log = make_log(path, signer)
    assert log.healthy
    log.close()
    assert path.exists() and os.stat(path).st_mode & 0o077 == 0
