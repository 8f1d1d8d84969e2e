"""CONTRACT §15 outcome records on real TLS: every forwarded call leaves an ``outcome`` record after its decision,
whose ``response_digest`` is the SHA-256 of the bytes the agent actually read — on /v1 and /mcp, buffered and
streamed — and an agent never gets an answer whose outcome could not be written (503 audit_unavailable)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from broker.audit.verify import verify_log
from broker.jose import Signer
from tests.conftest import BrokerUnderTest, Recorded, RecordingUpstream
from tests.integration.test_response_fail_closed import (
    BANK,
    Hostile,
    alice,
    answer,
    approved,
    mcp_call,
    progress,
    raw_answer,
    request,
    setup,
    sse,
    sse_answer,
)

__all__ = ["setup"]  # the fixture, shared with the response-path tests

Setup = tuple[BrokerUnderTest, Hostile, RecordingUpstream]
#: what the outcome record repeats of its decision record
SHARED = ("request_id", "subject", "actor", "tool", "txn", "trace_id", "policy_version")


def sha256_b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def records_of(broker: BrokerUnderTest, request_id: str) -> list[dict[str, Any]]:
    return [r for r in broker.audit_records() if r.get("request_id") == request_id]


def decision_and_outcome(broker: BrokerUnderTest, request_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    records = records_of(broker, request_id)
    assert [r["event"] for r in records][-1] == "outcome", records
    decision, outcome = records[-2], records[-1]
    assert decision["event"] in ("invocation", "mcp") and decision["decision"] == "allow"
    assert outcome["seq"] > decision["seq"]
    for name in SHARED:
        assert outcome[name] == decision[name], name
    assert isinstance(outcome["duration_ms"], float) and outcome["duration_ms"] >= 0
    return decision, outcome


async def test_v1_json_answer_has_an_outcome_with_the_digest_of_the_bytes_read(setup: Setup) -> None:
    broker, hostile, _ = setup
    hostile.v1 = raw_answer(200, '{"ok": true,   "n": 1}')
    status, headers, raw = await request(alice(broker), "POST", "/v1/tools/plainTool", {})
    assert status == 200
    _, outcome = decision_and_outcome(broker, headers["X-Request-Id"])
    assert (outcome["decision"], outcome["reason"], outcome["status"]) == ("allow", "", 200)
    assert outcome["response_digest"] == sha256_b64url(raw)
    assert "args" not in outcome


async def test_v1_masked_answer_digest_is_of_the_masked_bytes(setup: Setup) -> None:
    broker, hostile, _ = setup
    upstream_body = json.dumps(approved()).encode()
    hostile.v1 = raw_answer(200, upstream_body)
    status, headers, raw = await request(alice(broker), "POST", "/v1/tools/approveExpense", {})
    assert status == 200 and BANK not in raw.decode() and "****3000" in raw.decode()
    _, outcome = decision_and_outcome(broker, headers["X-Request-Id"])
    assert outcome["response_digest"] == sha256_b64url(raw) != sha256_b64url(upstream_body)
    assert (outcome["decision"], outcome["status"]) == ("allow", 200)


async def test_v1_upstream_failure_and_refused_answer_are_outcomes_with_decision_error(setup: Setup) -> None:
    broker, hostile, _ = setup
    hostile.v1 = raw_answer(503, '{"detail": "down"}')
    status, headers, raw = await request(alice(broker), "POST", "/v1/tools/plainTool", {})
    assert status == 502
    _, outcome = decision_and_outcome(broker, headers["X-Request-Id"])
    assert (outcome["decision"], outcome["status"]) == ("error", 503) and outcome["reason"]
    assert outcome["response_digest"] == sha256_b64url(raw)  # the 502 the agent got
    hostile.v1 = raw_answer(200, json.dumps({"data": approved()}))  # a wrapped answer: response_shape
    status, headers, raw = await request(alice(broker), "POST", "/v1/tools/approveExpense", {})
    assert status == 502
    _, outcome = decision_and_outcome(broker, headers["X-Request-Id"])
    assert (outcome["decision"], outcome["reason"], outcome["status"]) == ("error", "response_shape", 200)
    assert outcome["response_digest"] == sha256_b64url(raw)


async def test_refusals_without_a_forward_have_no_outcome(setup: Setup) -> None:
    broker, _, upstream = setup
    status, headers, _ = await request(alice(broker), "POST", "/v1/tools/noSuchTool", {})
    assert status == 404
    assert [r["event"] for r in records_of(broker, headers["X-Request-Id"])] == ["invocation"]
    status, headers, _ = await request(alice(broker), "POST", "/v1/tools/plainTool")  # no JSON body
    assert status == 415
    assert [r["event"] for r in records_of(broker, headers["X-Request-Id"])] == ["invocation"]
    assert not any(r.path == "/plainTool" for r in upstream.received)


async def test_mcp_json_answer_has_an_outcome_with_the_digest_of_the_bytes_read(setup: Setup) -> None:
    broker, hostile, _ = setup
    hostile.call = raw_answer(200, json.dumps(answer()))
    status, headers, raw = await mcp_call(alice(broker), "approveExpense")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert "****3000" in raw.decode()
    decision, outcome = decision_and_outcome(broker, headers["X-Request-Id"])
    assert decision["event"] == "mcp"
    assert (outcome["decision"], outcome["status"]) == ("allow", 200)
    assert outcome["response_digest"] == sha256_b64url(raw)


async def test_mcp_sse_answer_digest_is_of_the_concatenated_bytes_relayed(setup: Setup) -> None:
    broker, hostile, _ = setup
    plain = answer({"content": [{"type": "text", "text": "done"}]})
    hostile.call = sse_answer(progress(progress=1), sse(plain, id="e1"))
    status, headers, raw = await mcp_call(alice(broker), "plainTool", server="plain")
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert raw.count(b"data: ") == 2  # the progress notification and the answer, both relayed
    _, outcome = decision_and_outcome(broker, headers["X-Request-Id"])
    assert (outcome["decision"], outcome["reason"], outcome["status"]) == ("allow", "", 200)
    assert outcome["response_digest"] == sha256_b64url(raw)


async def test_mcp_sse_stream_cut_short_is_an_outcome_with_decision_error(setup: Setup) -> None:
    broker, hostile, _ = setup
    hostile.call = sse_answer(progress(progress=1))  # the stream ends without the answer
    status, headers, raw = await mcp_call(alice(broker), "plainTool", server="plain")
    assert status == 200 and b"cut short" in raw
    _, outcome = decision_and_outcome(broker, headers["X-Request-Id"])
    assert (outcome["decision"], outcome["reason"]) == ("error", "upstream_no_answer")
    assert outcome["response_digest"] == sha256_b64url(raw)


def _audit_fd(path: Path) -> int:
    """The broker's descriptor of its audit file (this process: the broker runs in the test's event loop)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                return int(name)
        except OSError:
            continue
    raise AssertionError(f"{path} is not open")


async def test_an_answer_whose_outcome_cannot_be_written_is_refused_503(setup: Setup) -> None:
    """Fail closed: the disk fills between the decision record and the outcome record (the audit file's
    descriptor is pointed at /dev/full while the upstream answers); the agent gets 503, never the answer."""
    broker, hostile, _ = setup
    fd = _audit_fd(broker.audit_path)
    saved = os.dup(fd)
    full = os.open("/dev/full", os.O_WRONLY)

    async def answer_then_fill_the_disk(_: Recorded) -> web.StreamResponse:
        os.dup2(full, fd)
        return web.json_response({"secret": "the answer"})

    hostile.v1 = answer_then_fill_the_disk
    try:
        status, headers, raw = await request(alice(broker), "POST", "/v1/tools/plainTool", {})
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(full)
    assert status == 503 and json.loads(raw)["error"] == "audit_unavailable"
    assert b"the answer" not in raw
    events = [r["event"] for r in records_of(broker, headers["X-Request-Id"])]
    assert events == ["invocation"]  # the decision; its outcome could not be written
    # the log recovers once the disk does
    hostile.v1 = raw_answer(200, "{}")
    status, headers, _ = await request(alice(broker), "POST", "/v1/tools/plainTool", {})
    assert status == 200
    decision_and_outcome(broker, headers["X-Request-Id"])


async def test_a_log_with_outcome_records_verifies(setup: Setup) -> None:
    broker, hostile, _ = setup
    hostile.v1 = raw_answer(200, json.dumps(approved()))
    hostile.call = raw_answer(200, json.dumps(answer()))
    for _ in range(3):
        assert (await request(alice(broker), "POST", "/v1/tools/approveExpense", {}))[0] == 200
        assert (await mcp_call(alice(broker), "approveExpense"))[0] == 200
    await broker.running.stop()
    assert sum(r["event"] == "outcome" for r in broker.audit_records()) == 6
    report = verify_log(
        broker.audit_path, public_jwks={"keys": [Signer.from_file(broker.pki.signing_jwk).public_jwk()]}
    )
    assert report.ok, report
