"""broker.audit, CONTRACT §15: resume without trust (audit_resume), the checkpoint timer and group commit.

Real files in tmp_path and a real ES256 key. The fsync function is injected only to count fsyncs, to hold one in
flight, or to make it fail; everything else is the real code path."""

from __future__ import annotations

import asyncio
import errno
import gc
import hashlib
import json
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.audit.chain import GENESIS, checkpoint_record, seal
from broker.audit.durability import SyncThread
from broker.audit.sink import AuditLog, head_path_for
from broker.audit.verify import verify_log
from broker.errors import AuditUnavailable
from broker.jose import Signer, generate_ec_jwk
from broker.keys import KeyRing
from tests.unit.test_audit import StepClock, dump, jwks_of, make_fields, parse, read_lines, write_log


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.from_jwk(generate_ec_jwk())


@pytest.fixture(scope="module")
def attacker() -> Signer:
    return Signer.from_jwk(generate_ec_jwk())


def forge_append(path: Path, n: int, *, sign_with: Signer | None = None, **overrides: Any) -> int:
    """What someone who can write the file but has not got the key appends while the broker is down: n records
    correctly chained onto the last line (and, with ``sign_with``, a checkpoint signed by that key). Returns the
    seq of the first forged record."""
    last = parse(read_lines(path)[-1])
    seq: int = last["seq"] + 1
    prev: str = last["hash"]
    lines: list[bytes] = []
    first = seq
    for i in range(n):
        record = seal(
            {"ts": "2026-01-01T00:00:00.000Z", **make_fields(900 + i, **overrides)}, seq=seq, prev=prev
        )
        lines.append(dump(record))
        seq, prev = seq + 1, record["hash"]
    if sign_with is not None:
        lines.append(
            dump(checkpoint_record(seq=seq, prev=prev, ts="2026-01-01T00:00:01.000Z", signer=sign_with))
        )
    with path.open("ab") as fh:
        fh.write(b"".join(lines))
    return first


def rewrite_tail(path: Path, start_seq: int, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit every record from ``start_seq`` on and re-seal them, so the chain stays intact (no key needed)."""
    lines = read_lines(path)
    prev = parse(lines[start_seq - 2])["hash"] if start_seq > 1 else GENESIS
    for i in range(start_seq - 1, len(lines)):
        record = parse(lines[i])
        seq = record.pop("seq")
        del record["prev"], record["hash"]
        change(record)
        sealed = seal(record, seq=seq, prev=prev)
        lines[i], prev = dump(sealed), sealed["hash"]
    path.write_bytes(b"".join(lines))


def reopen(path: Path, signer: Signer | KeyRing, **kwargs: Any) -> AuditLog:
    log = AuditLog(path, signer=signer, checkpoint_every=100, clock=StepClock(time.time()), **kwargs)
    log.open()
    return log


# ---------------------------------------------------------------------------------------------------------
# resume without trust


def test_clean_restart_adopts_nothing_and_writes_no_resume(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, signer, 10)
    log = reopen(path, signer)
    assert log.resumed is None and log.records_written == 0
    log.append(make_fields(11))
    log.close()
    assert verify_log(path, public_jwks=jwks_of(signer), max_unsealed=0).ok


@pytest.mark.parametrize(
    "forged_checkpoint", [False, True], ids=["plain-records", "with-attacker-checkpoint"]
)
def test_records_appended_while_down_are_named_unverified(
    tmp_path: Path, signer: Signer, attacker: Signer, forged_checkpoint: bool
) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, signer, 10)  # records 1-10, checkpoint 11 (clean stop)
    found = path.read_bytes()
    first = forge_append(path, 3, sign_with=attacker if forged_checkpoint else None, subject="mallory")
    as_found = path.read_bytes()
    last_forged = first + 2 + int(forged_checkpoint)
    events: list[Any] = []
    log = reopen(path, signer, on_resume=events.append)
    for i in range(5):
        log.append(make_fields(20 + i))
    log.close()

    assert log.resumed is not None and events == [log.resumed]
    assert (log.resumed.unverified_from, log.resumed.unverified_to, log.resumed.anchor_seq) == (
        12,
        last_forged,
        11,
    )
    resume = parse(read_lines(path)[last_forged])
    assert resume["event"] == "audit_resume" and resume["seq"] == last_forged + 1
    assert (resume["unverified_from"], resume["unverified_to"], resume["anchor_seq"]) == (12, last_forged, 11)
    assert resume["unverified_offset"] == len(found)
    assert resume["file_bytes"] == len(as_found)
    assert resume["file_sha256"] == hashlib.sha256(as_found).hexdigest()
    assert (
        parse(read_lines(path)[last_forged + 1])["event"] == "checkpoint"
    )  # the resume record is sealed at once

    report = verify_log(path, public_jwks=jwks_of(signer), max_unsealed=0)
    assert not report.ok and report.first_bad_seq == 12
    assert report.unverified == ((12, last_forged),)
    assert report.problem is not None and report.problem.startswith(f"unverified: seq 12..{last_forged}")
    assert report.summary().startswith("FAILED at seq 12, line 12: unverified")
    # without the key the resume record still says so
    assert verify_log(path, public_jwks=None).first_bad_seq == 12
    # an operator who reviewed them accepts that range, and only that one
    accepted = verify_log(path, public_jwks=jwks_of(signer), max_unsealed=0, accept_unverified=[12])
    assert accepted.ok and accepted.accepted_unverified == last_forged - 11
    assert "unverified records accepted" in accepted.summary()
    assert not verify_log(path, public_jwks=jwks_of(signer), accept_unverified=[13]).ok


def test_a_rewritten_crash_tail_is_named_unverified(tmp_path: Path, signer: Signer) -> None:
    """A crash leaves records after the last checkpoint; someone flips a deny to allow and re-chains the tail."""
    path = tmp_path / "a.jsonl"
    log = write_log(path, signer, 105, close=False)  # checkpoint 101, then 102-106 unsealed
    assert log._file is not None
    log._file.close()  # the process dies: no final checkpoint
    log._file = None
    rewrite_tail(path, 104, lambda r: r.update(decision="allow", subject="mallory"))
    assert verify_log(path, public_jwks=jwks_of(signer)).ok  # before the restart: an ordinary unsealed tail

    log = reopen(path, signer)
    log.close()
    assert log.resumed is not None and (log.resumed.unverified_from, log.resumed.unverified_to) == (102, 106)
    report = verify_log(path, public_jwks=jwks_of(signer), max_unsealed=0)
    assert not report.ok and report.first_bad_seq == 102 and report.unverified == ((102, 106),)


def test_a_second_restart_keeps_the_verdict_and_adds_nothing(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, signer, 5)
    forge_append(path, 2)
    reopen(path, signer).close()
    before = path.read_bytes()
    again = reopen(path, signer)
    again.close()
    assert again.resumed is None and path.read_bytes() == before
    assert verify_log(path, public_jwks=jwks_of(signer)).unverified == ((7, 8),)


def test_a_log_without_any_checkpoint_is_unverified_from_seq_1(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(dump(seal({"ts": "t", **make_fields(1)}, seq=1, prev=GENESIS)))
    log = reopen(path, signer)
    log.close()
    assert log.resumed is not None and (log.resumed.unverified_from, log.resumed.anchor_seq) == (1, 0)
    assert log.resumed.unverified_offset == 0
    assert verify_log(path, public_jwks=jwks_of(signer)).first_bad_seq == 1


def test_checkpoints_of_a_previous_key_are_anchors(tmp_path: Path, signer: Signer) -> None:
    """After a signing-key rotation the old key's checkpoints still anchor the log (KeyRing previous keys)."""
    path = tmp_path / "a.jsonl"
    write_log(path, signer, 5)
    new = Signer.from_jwk(generate_ec_jwk())
    log = reopen(path, KeyRing(new, [signer.public_jwk()]))
    log.close()
    assert log.resumed is None
    # without the previous key nothing can be verified: honest, if harsh
    log = reopen(path, Signer.from_jwk(generate_ec_jwk()))
    log.close()
    assert log.resumed is not None and log.resumed.unverified_from == 1


def test_a_checkpoint_replaying_an_old_signature_is_not_an_anchor(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, signer, 5)  # checkpoint 6
    old_sig = parse(read_lines(path)[-1])["sig"]
    first = forge_append(path, 2)
    last = parse(read_lines(path)[-1])
    fields = {"ts": "t", **make_fields(0, event="checkpoint", decision="allow", reason=""), "sig": old_sig}
    with path.open("ab") as fh:
        fh.write(dump(seal(fields, seq=last["seq"] + 1, prev=last["hash"])))
    log = reopen(path, signer)
    log.close()
    assert log.resumed is not None and (log.resumed.unverified_from, log.resumed.unverified_to) == (
        first,
        first + 2,
    )


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda lines: [*lines[:-2], lines[-1]], id="record-missing-in-the-tail"),
        pytest.param(lambda lines: [*lines[:-2], lines[-2].replace(b'"alice"', b'"bob"'), lines[-1]],
                     id="record-edited-in-the-tail"),
        pytest.param(lambda lines: [*lines[:-1], b"\n", lines[-1]], id="blank-line-in-the-tail"),
    ],
)  # fmt: skip
def test_a_tail_that_does_not_chain_stops_the_start(
    tmp_path: Path, signer: Signer, damage: Callable[[list[bytes]], list[bytes]]
) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, signer, 5)
    forge_append(path, 3)
    path.write_bytes(b"".join(damage(read_lines(path))))
    before = path.read_bytes()
    with pytest.raises(AuditUnavailable) as caught:
        reopen(path, signer)
    assert caught.value.reason == "audit_log_corrupt"
    assert path.read_bytes() == before


def test_verifier_fails_a_valid_checkpoint_over_a_forged_one(
    tmp_path: Path, signer: Signer, attacker: Signer
) -> None:
    """What the old broker did (sealed a forged tail): without an audit_resume the forged checkpoint is the first
    bad record."""
    path = tmp_path / "a.jsonl"
    write_log(path, signer, 5)
    bad = forge_append(path, 2, sign_with=attacker) + 2
    last = parse(read_lines(path)[-1])
    with path.open("ab") as fh:
        fh.write(dump(checkpoint_record(seq=last["seq"] + 1, prev=last["hash"], ts="t", signer=signer)))
    report = verify_log(path, public_jwks=jwks_of(signer))
    assert not report.ok and report.first_bad_seq == bad
    assert report.problem is not None and report.problem.startswith("bad signature")
    assert report.records == bad - 1


def test_verifier_refuses_a_malformed_resume_record(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "a.jsonl"
    write_log(path, signer, 5)
    forge_append(path, 2)
    reopen(path, signer).close()
    rewrite_tail(path, 9, lambda r: r.update(unverified_from=9) if r["event"] == "audit_resume" else None)
    report = verify_log(path, public_jwks=None)
    assert not report.ok and report.first_bad_seq == 9
    assert report.problem == "altered: malformed audit_resume record"


def test_callers_cannot_write_log_events(tmp_path: Path, signer: Signer) -> None:
    log = reopen(tmp_path / "a.jsonl", signer)
    with pytest.raises(ValueError):
        log.append(make_fields(event="audit_resume"))
    log.append(make_fields(event="outcome"))
    log.close()


# ---------------------------------------------------------------------------------------------------------
# the checkpoint timer


@pytest.mark.parametrize("fsync", [False, True], ids=["no-fsync", "group-commit"])
async def test_an_idle_log_is_sealed_within_checkpoint_seconds(
    tmp_path: Path, signer: Signer, fsync: bool
) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, signer=signer, checkpoint_every=100, checkpoint_seconds=0.2, fsync=fsync)
    log.open()
    written = await log.commit(make_fields(1))
    started = time.monotonic()
    while log.unsealed and time.monotonic() - started < 5:  # noqa: ASYNC110 (the timer runs on this loop)
        await asyncio.sleep(0.01)
    sealed_after = time.monotonic() - started
    await log.flush()
    assert log.unsealed == 0 and 0.15 <= sealed_after <= 1.0, sealed_after
    lines = [parse(line) for line in read_lines(path)]
    assert [r["event"] for r in lines] == ["invocation", "checkpoint"] and lines[1]["prev"] == written["hash"]
    await asyncio.sleep(0.1)
    assert head_path_for(path).exists() and json.loads(head_path_for(path).read_bytes())["seq"] == 2
    await asyncio.sleep(0.3)
    assert len(read_lines(path)) == 2  # nothing to seal: no further checkpoint while idle
    assert verify_log(path, public_jwks=jwks_of(signer), max_unsealed=0).ok  # while the broker runs
    await log.aclose()
    assert len(read_lines(path)) == 2


async def test_a_checkpoint_by_count_resets_the_timer(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, signer=signer, checkpoint_every=3, checkpoint_seconds=0.2)
    log.open()
    for i in range(2):
        await log.commit(make_fields(i))  # seq 1, 2 + checkpoint 3
    await asyncio.sleep(0.35)
    await log.aclose()
    assert [parse(line)["event"] for line in read_lines(path)] == ["invocation", "invocation", "checkpoint"]


# ---------------------------------------------------------------------------------------------------------
# group commit


class SlowFsync:
    """os.fsync that takes ``delay`` and remembers, per completed call, the log's seq when it started."""

    def __init__(self, delay: float = 0.005) -> None:
        self.delay = delay
        self.log: AuditLog | None = None
        self.completed: list[int] = []
        self.fail_next = 0
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, fd: int) -> None:
        assert self.log is not None
        covering = self.log.seq
        self.gate.wait(10)
        if self.fail_next:
            self.fail_next -= 1
            raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)
        time.sleep(self.delay)
        self.completed.append(covering)


def group_log(path: Path, signer: Signer, fsync: SlowFsync, **kwargs: Any) -> AuditLog:
    log = AuditLog(path, signer=signer, fsync=True, fsync_fn=fsync, **kwargs)
    fsync.log = log
    log.open()
    return log


async def test_concurrent_commits_share_fsyncs_and_each_returns_after_its_own(
    tmp_path: Path, signer: Signer
) -> None:
    fsync = SlowFsync()
    path = tmp_path / "a.jsonl"
    log = group_log(path, signer, fsync, checkpoint_every=50)
    checked: list[bool] = []

    async def one(i: int) -> None:
        record = await log.commit(make_fields(i))
        # an fsync that started once this record was written has completed
        checked.append(any(covering >= record["seq"] for covering in fsync.completed))

    n = 500
    await asyncio.gather(*(one(i) for i in range(n)))
    assert checked == [True] * n
    assert log.durable_seq == log.seq == n + n // 50
    assert 1 <= log.fsyncs < n / 10, log.fsyncs  # batched: far fewer fsyncs than records
    assert log.fsyncs == len(fsync.completed)
    await log.aclose()
    report = verify_log(path, public_jwks=jwks_of(signer), max_unsealed=0)
    assert report.ok and report.records == n + n // 50
    assert json.loads(head_path_for(path).read_bytes())["seq"] == report.last_seq


async def test_the_event_loop_runs_while_an_fsync_is_in_flight(tmp_path: Path, signer: Signer) -> None:
    fsync = SlowFsync(delay=0)
    log = group_log(tmp_path / "a.jsonl", signer, fsync)
    fsync.gate.clear()  # the next fsync blocks until we let it go
    first = asyncio.create_task(log.commit(make_fields(1)))
    await asyncio.sleep(0.05)
    assert not first.done()  # not acknowledged: its fsync has not completed
    second = asyncio.create_task(log.commit(make_fields(2)))  # written now, waits for the next batch
    await asyncio.sleep(0.05)
    assert log.seq == 2 and log.durable_seq == 0 and not second.done()
    fsync.gate.set()
    await asyncio.gather(first, second)
    assert log.durable_seq == 2 and log.fsyncs == 2  # one in flight at a time; the second batch after it
    await log.aclose()


async def test_an_fsync_failure_fails_every_waiting_committer(tmp_path: Path, signer: Signer) -> None:
    fsync = SlowFsync()
    path = tmp_path / "a.jsonl"
    log = group_log(path, signer, fsync)
    await log.commit(make_fields(0))
    fsync.fail_next = 1
    results = await asyncio.gather(
        *(log.commit(make_fields(i)) for i in range(1, 21)), return_exceptions=True
    )
    assert results and all(isinstance(r, AuditUnavailable) for r in results), results
    assert {r.reason for r in results if isinstance(r, AuditUnavailable)} == {"audit_write_failed"}
    assert not log.healthy and log.durable_seq == 1
    # the disk answers again: the next batch covers the refused records too, and the log is healthy again
    record = await log.commit(make_fields(21))
    assert log.healthy and log.durable_seq == record["seq"] == 22
    await log.aclose()
    assert verify_log(path, public_jwks=jwks_of(signer), max_unsealed=0).ok


async def test_a_write_failure_refuses_only_that_record(tmp_path: Path, signer: Signer) -> None:
    import io

    fsync = SlowFsync()
    path = tmp_path / "a.jsonl"
    log = group_log(path, signer, fsync)
    good = log._file
    log._file = io.FileIO("/dev/full", "a")  # ENOSPC on every write
    with pytest.raises(AuditUnavailable) as caught:
        await log.commit(make_fields(1))
    assert caught.value.reason == "audit_write_failed" and not log.healthy and log.seq == 0
    log._file.close()
    log._file = good
    await log.commit(make_fields(1))
    assert log.healthy
    await log.aclose()


async def test_an_anchor_failure_in_a_batch_fails_its_committers(tmp_path: Path, signer: Signer) -> None:
    fsync = SlowFsync()
    path = tmp_path / "a.jsonl"
    log = group_log(path, signer, fsync, checkpoint_every=3)
    await log.commit(make_fields(1))
    blocker = head_path_for(path).with_name(head_path_for(path).name + ".tmp")
    blocker.mkdir()
    results = await asyncio.gather(*(log.commit(make_fields(i)) for i in (2, 3)), return_exceptions=True)
    # records 2 and 3 + checkpoint 4 are on disk, but the anchor of the checkpoint is not: both refused
    assert [getattr(r, "reason", r) for r in results] == ["audit_anchor_write_failed"] * 2
    assert not log.healthy and log.durable_seq == 4
    blocker.rmdir()
    await log.commit(make_fields(4))  # the anchor is written with the next batch
    assert log.healthy and json.loads(head_path_for(path).read_bytes())["seq"] == 4
    await log.aclose()
    assert verify_log(path, public_jwks=jwks_of(signer), max_unsealed=0).ok


async def test_a_cancelled_committer_does_not_stall_the_others(tmp_path: Path, signer: Signer) -> None:
    fsync = SlowFsync(delay=0)
    log = group_log(tmp_path / "a.jsonl", signer, fsync)
    fsync.gate.clear()
    cancelled = asyncio.create_task(log.commit(make_fields(1)))
    await asyncio.sleep(0.02)
    cancelled.cancel()
    other = asyncio.create_task(log.commit(make_fields(2)))
    await asyncio.sleep(0.02)
    fsync.gate.set()
    await other
    assert cancelled.cancelled() and log.durable_seq == 2
    await log.aclose()


async def test_close_waits_for_the_fsync_in_flight(tmp_path: Path, signer: Signer) -> None:
    fsync = SlowFsync(delay=0.05)
    path = tmp_path / "a.jsonl"
    log = group_log(path, signer, fsync)
    pending = [asyncio.create_task(log.commit(make_fields(i))) for i in range(10)]
    await asyncio.sleep(0.01)
    await log.aclose()
    await asyncio.gather(*pending)  # every committer was answered, none refused
    assert verify_log(path, public_jwks=jwks_of(signer), max_unsealed=0).ok


def test_append_with_fsync_is_durable_on_return(tmp_path: Path, signer: Signer) -> None:
    fsync = SlowFsync(delay=0)
    log = group_log(tmp_path / "a.jsonl", signer, fsync)
    log.append(make_fields(1))
    assert log.fsyncs == 1 and len(fsync.completed) == 1 and log.durable_seq == 1
    log.close()
    assert log.fsyncs == 2  # the final checkpoint


async def test_without_fsync_commit_returns_at_once(tmp_path: Path, signer: Signer) -> None:
    fsync = SlowFsync()
    log = AuditLog(tmp_path / "a.jsonl", signer=signer, fsync=False, fsync_fn=fsync)
    fsync.log = log
    log.open()
    await asyncio.gather(*(log.commit(make_fields(i)) for i in range(50)))
    await log.aclose()
    assert log.fsyncs == 0 and fsync.completed == []


# -- the fsync thread ----------------------------------------------------------------------------------------


def test_the_fsync_thread_answers_jobs_in_order_with_their_results_or_errors() -> None:
    ran: list[int] = []

    def job(n: int) -> None:
        if n == 2:
            raise OSError(errno.EIO, "disk gone")
        ran.append(n)

    async def main() -> list[BaseException | None]:
        thread = SyncThread("test-fsync")
        try:
            futures = [thread.run(job, n) for n in range(4)]
            return list(await asyncio.gather(*futures, return_exceptions=True))
        finally:
            thread.stop()

    outcomes = asyncio.run(main())
    assert ran == [0, 1, 3]
    assert outcomes[:2] == [None, None] and outcomes[3] is None
    assert isinstance(outcomes[2], OSError) and outcomes[2].errno == errno.EIO


def test_a_job_finishing_after_its_loop_closed_leaves_the_thread_serving() -> None:
    release = threading.Event()
    started = threading.Event()

    def held(_: object) -> None:
        started.set()
        release.wait(10)

    async def first(thread: SyncThread) -> None:
        thread.run(held, None)  # never awaited: this loop closes while the job runs
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)

    async def second(thread: SyncThread) -> str:
        await asyncio.wait_for(thread.run(lambda _: None, None), 10)  # a dead thread: TimeoutError
        return "answered"

    thread = SyncThread("test-fsync")
    try:
        asyncio.run(first(thread))
        release.set()  # the job ends now, its loop closed: the answer has nowhere to go
        assert asyncio.run(second(thread)) == "answered"
    finally:
        thread.stop()


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)  # its file, unclosed: the point
def test_a_log_dropped_without_close_is_collected_and_its_lock_released(
    tmp_path: Path, signer: Signer
) -> None:
    # review finding: the fsync thread held the last job, and with it the log: its file and flock for ever
    path = tmp_path / "a.jsonl"

    async def use_and_drop() -> weakref.ref[AuditLog]:
        log = AuditLog(path, signer=signer, fsync=True)
        log.open()
        await log.commit(make_fields(1))
        return weakref.ref(log)

    dropped = asyncio.run(use_and_drop())
    gc.collect()
    assert dropped() is None
    reopened = AuditLog(path, signer=signer, fsync=True)
    reopened.open()  # audit_log_locked while the first one lived
    reopened.close()


def test_an_unexpected_error_in_the_fsync_job_refuses_its_committers(tmp_path: Path, signer: Signer) -> None:
    def broken(fd: int) -> None:
        raise RuntimeError("not an OSError")

    async def main() -> BaseException | None:
        log = AuditLog(tmp_path / "a.jsonl", signer=signer, fsync=True, fsync_fn=broken)
        log.open()
        try:
            await asyncio.wait_for(log.commit(make_fields(1)), 10)  # it waited for ever
        except AuditUnavailable as refused:
            return refused
        finally:
            log._fsync_fn = os.fsync  # the final checkpoint's own fsync
            log.close()
        return None

    refused = asyncio.run(main())
    assert isinstance(refused, AuditUnavailable) and refused.reason == "audit_write_failed"


async def test_an_unexpected_error_keeps_the_checkpoint_anchor_due(tmp_path: Path, signer: Signer) -> None:
    """The batch that carried a checkpoint failed with something other than an OSError: its anchor is still
    written with the next batch, as after an I/O error — not left stale until the next checkpoint."""
    failures: list[BaseException] = []

    def flaky(fd: int) -> None:
        if failures:
            raise failures.pop()
        os.fsync(fd)

    path = tmp_path / "a.jsonl"
    log = AuditLog(path, signer=signer, fsync=True, fsync_fn=flaky, checkpoint_every=2)
    log.open()
    await log.commit(make_fields(1))
    failures.append(RuntimeError("not an OSError"))
    with pytest.raises(AuditUnavailable):
        await log.commit(make_fields(2))  # record 2 and checkpoint 3, one batch: its fsync fails
    assert not head_path_for(path).exists()
    await log.commit(make_fields(3))  # record 4 alone: no checkpoint of its own
    assert log.healthy and json.loads(head_path_for(path).read_bytes())["seq"] == 3
    await log.aclose()
    assert verify_log(path, public_jwks=jwks_of(signer), max_unsealed=0).ok
