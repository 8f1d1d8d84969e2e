"""CONTRACT §15 with real processes: records a running broker did not write are never sealed as verified.

``python -m broker run`` subprocesses (started like tests/e2e/test_faults.py), a real agent over mTLS + DPoP, the
real ``broker audit verify`` CLI. The attacker of issue 11 can write the audit file but has not got the key: they
append forged records while the broker is down, or rewrite the unsealed tail a SIGKILL left (deny → allow) and
re-chain it. Each time the restarted broker writes an ``audit_resume`` record naming the first unverified ``seq``,
counts it, logs it, and ``broker audit verify --key … --max-unsealed 0`` fails naming that ``seq``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from broker.audit.chain import seal
from tests.certfactory import Pki
from tests.conftest import RecordingUpstream
from tests.e2e.test_cli import run_cli
from tests.e2e.test_faults import (
    ARGS,
    TOOL,
    admin_get,
    agent_client,
    audit_lines,
    fault_config,
    running_broker,
)

pytestmark = pytest.mark.slow


def verify(audit: Path, pki: Pki, *extra: str) -> tuple[int, str]:
    result = run_cli(
        "audit", "verify", str(audit), "--key", str(pki.signing_jwk), "--max-unsealed", "0", *extra
    )
    return result.returncode, result.stdout


def resume_counter(metrics: str) -> float:
    match = re.search(r"^broker_audit_resume_unverified_total (\S+)$", metrics, re.MULTILINE)
    assert match, "broker_audit_resume_unverified_total is not exported"
    return float(match.group(1))


def dump(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def rechain(lines: list[dict[str, Any]], start: int) -> bytes:
    """Re-seal every record from index ``start`` on (no key needed), so the hash chain is intact again."""
    prev = lines[start - 1]["hash"]
    out = [dump(r) for r in lines[:start]]
    for record in lines[start:]:
        body = {k: v for k, v in record.items() if k not in ("seq", "prev", "hash")}
        sealed = seal(body, seq=record["seq"], prev=prev)
        out.append(dump(sealed))
        prev = sealed["hash"]
    return b"".join(out)


async def calls(pki: Pki, url: str, n: int, *, args: dict[str, Any] = ARGS) -> list[int]:
    async with agent_client(pki, url) as agent:
        return [(await agent.call_tool(TOOL, args)).status for _ in range(n)]


async def test_records_appended_while_the_broker_was_down_are_reported_unverified(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    config = fault_config(pki, tmp_path, upstream.url)
    async with running_broker(config, tmp_path, "before") as broker:
        assert await calls(pki, broker.url, 3) == [200] * 3
    audit = broker.audit
    assert verify(audit, pki)[0] == 0  # clean stop: everything sealed

    # while the broker is down: two allow decisions for mallory, correctly chained, appended to the file
    lines = audit_lines(audit)
    first = lines[-1]["seq"] + 1
    forged = [
        {**lines[1], "seq": first + i, "subject": "mallory", "request_id": f"forged-{i}"} for i in range(2)
    ]
    audit.write_bytes(rechain([*lines, *forged], len(lines)))

    async with running_broker(config, tmp_path, "after") as broker:
        metrics = (await admin_get(broker.admin, "/metrics"))[1]
        assert await calls(pki, broker.url, 2) == [200] * 2
    assert resume_counter(metrics) == 1.0
    assert "audit log resumed with unverified records" in broker.log.read_text()

    records = audit_lines(audit)
    resume = next(r for r in records if r["event"] == "audit_resume")
    assert (resume["seq"], resume["unverified_from"], resume["unverified_to"]) == (
        first + 2,
        first,
        first + 1,
    )
    code, out = verify(audit, pki)
    assert code == 1, out
    assert out.startswith(f"FAILED at seq {first}") and "unverified" in out
    # the broker's own later checkpoints chain over the forged records but do not vouch for them
    assert any(r["event"] == "checkpoint" and r["seq"] > first + 2 for r in records)
    assert verify(audit, pki, "--accept-unverified", str(first))[0] == 0  # once reviewed


async def test_a_tail_rewritten_after_sigkill_is_reported_unverified(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    config = fault_config(pki, tmp_path, upstream.url)
    # a long timer so the tail is still unsealed when the process is killed (the default seals it within 1 s)
    config["audit"].update(checkpoint_every=100, checkpoint_seconds=3600)
    async with running_broker(config, tmp_path, "killed") as broker:
        assert await calls(pki, broker.url, 2) == [200] * 2
        denied = await calls(pki, broker.url, 1, args={"invoice_id": 7})  # not the tool's schema
        assert denied[0] in (400, 403, 422), denied
        assert await calls(pki, broker.url, 1) == [200]
        broker.proc.kill()
        broker.proc.wait(timeout=10)
    audit = broker.audit
    lines = audit_lines(audit)
    sealed_up_to = max((r["seq"] for r in lines if r["event"] == "checkpoint"), default=0)
    tail = [r for r in lines if r["seq"] > sealed_up_to]
    assert tail and any(r["decision"] == "deny" for r in tail), tail
    target = next(i for i, r in enumerate(lines) if r["seq"] > sealed_up_to and r["decision"] == "deny")
    lines[target].update(decision="allow", reason="", status=200)
    audit.write_bytes(rechain(lines, target))
    assert run_cli("audit", "verify", str(audit), "--key", str(pki.signing_jwk)).returncode == 0  # looks fine

    config["audit"]["checkpoint_seconds"] = 1
    async with running_broker(config, tmp_path, "restarted") as broker:
        metrics = (await admin_get(broker.admin, "/metrics"))[1]
        assert await calls(pki, broker.url, 1) == [200]
    assert resume_counter(metrics) == 1.0
    code, out = verify(audit, pki)
    assert code == 1 and out.startswith(f"FAILED at seq {sealed_up_to + 1}") and "unverified" in out, out
    resume = next(r for r in audit_lines(audit) if r["event"] == "audit_resume")
    assert resume["unverified_from"] == sealed_up_to + 1 and resume["unverified_to"] == lines[-1]["seq"]


async def test_an_idle_log_is_sealed_within_checkpoint_seconds_and_survives_sigkill(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    config = fault_config(pki, tmp_path, upstream.url)  # audit.checkpoint_seconds: default 1
    async with running_broker(config, tmp_path, "idle") as broker:
        assert await calls(pki, broker.url, 1) == [200]
        answered = time.monotonic()
        while audit_lines(broker.audit)[-1]["event"] != "checkpoint" and time.monotonic() - answered < 5:  # noqa: ASYNC110 (another process)
            await asyncio.sleep(0.02)  # poll the file another process writes, bounded
        sealed_after = time.monotonic() - answered
        assert audit_lines(broker.audit)[-1]["event"] == "checkpoint"
        assert sealed_after <= 2.0, sealed_after  # checkpoint_seconds (1) + polling and a busy machine
        assert verify(broker.audit, pki)[0] == 0  # while it runs: nothing unsigned
        broker.proc.kill()
        broker.proc.wait(timeout=10)
    async with running_broker(config, tmp_path, "idle-again") as broker:
        metrics = (await admin_get(broker.admin, "/metrics"))[1]
    assert resume_counter(metrics) == 0.0  # the kill left nothing unsealed, so nothing unverified
    assert not any(r["event"] == "audit_resume" for r in audit_lines(broker.audit))
    assert verify(broker.audit, pki)[0] == 0
