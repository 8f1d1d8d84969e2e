"""``python -m broker.dev.bench.soak`` (``make soak``): mixed traffic at half capacity for a long time (issue 7 item 2).

Starts the demo expense backend (verifying every Txn-Token, single use) and ``broker run -c
config/examples/expense.yaml`` with the memory or the Redis state store (``--state``; Redis at
``BROKER_REDIS_URL``, default 127.0.0.1:6379), each in its own subprocess on loopback ports. Then:

1. **capacity**: ``listInvoices`` in a closed loop (:func:`broker.dev.bench.loadgen.run_load`, fresh DPoP proofs) for
   ``--capacity-seconds``; the soak rate is half of it. ``--rate R`` skips this and uses R requests/s.
2. **soak**: an open-loop mix at the rate for ``--duration`` seconds — **600 s (10 minutes) by default**; every
   response is checked against the status (and error code) it must have:

   ============== ================================================================= ==========================
   scenario       requests                                                          expected
   ============== ================================================================= ==========================
   list           ``listInvoices {"department":"42"}``                              200
   approve        exchange for ``approveExpense`` INV-8831 (4800, 42), then the call 200, 200
   txn_replay     the same, then the call again with the same txn token             200, 200, 403
   proof_replay   ``listInvoices``, then the same request with the same proof       200, 401
   deny           ``listInvoices {"department":"7"}`` (the deny rule)               403
   bad_proof      a proof for another URL, or signed with another agent's key       401
   exchange       an exchange whose txn token is never used                         200
   ============== ================================================================= ==========================

   The demo backend approves INV-8831 idempotently. The reference config's velocity rule demands a security
   review from the 6th approval of one subject in 10 minutes, so approvals rotate over a pool of subjects sized
   for at most 4 per subject per window (every other scenario cycles through the same pool, which fills the
   broker's token cache during warm-up).
3. **memory**: the broker's RSS (``VmRSS`` of ``/proc/<pid>/status``) every ``--sample-every`` seconds. *Flat*
   means: of the samples after warm-up (the first ``--warmup-fraction`` of the run), the last third's maximum is
   within 10 % of the first third's maximum.
4. **audit**: SIGTERM (exit status 0 expected), ``broker audit verify`` on the log, and one record per decision:
   every soak response's request id appears in exactly one record, ``allow`` exactly for the 2xx ones, and the log
   holds nothing else but the start's ``config_load`` record, one record per capacity request and checkpoints.

Prints a table, writes ``--out`` (default ``var/soak.json``) and exits 0 only when nothing was unexpected, memory
was flat, the broker exited 0 and the audit log verified with one record per decision.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from broker.dev.bench.__main__ import (
    READY_TIMEOUT,
    BenchEnv,
    IdentityRequests,
    SetupFailed,
    broker_env,
    free_port,
    probe,
    server_process,
)
from broker.dev.bench.loadgen import client_ssl_context, percentile, run_load
from broker.dev.demo.expense import run_event_loop
from broker.dev.idp import mint_access_token
from broker.sdk.agent import ACCESS_TOKEN_TYPE, TOKEN_EXCHANGE, TXN_TOKEN_TYPE, DpopSigner

AGENT = "expense-assistant"
APPROVE_ARGS = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}
#: scenario → weight (per 100 scenarios)
MIX = {
    "list": 45,
    "approve": 6,
    "txn_replay": 2,
    "proof_replay": 10,
    "deny": 12,
    "bad_proof": 12,
    "exchange": 13,
}
REQUESTS_PER_SCENARIO = {"approve": 2, "txn_replay": 3, "proof_replay": 2}  # the others: 1
#: requests per scenario on average (1.2): the open loop starts scenarios at rate / MEAN_REQUESTS per second
MEAN_REQUESTS = sum(w * REQUESTS_PER_SCENARIO.get(s, 1) for s, w in MIX.items()) / sum(MIX.values())
#: the reference config's velocity rule (counters.approvals_10m.count >= 5 in 600 s) with margin
VELOCITY_WINDOW, APPROVALS_PER_WINDOW = 600.0 + 30.0, 4
FLAT_TOLERANCE = 0.10
MAX_IN_FLIGHT = 4000  # scenarios; beyond this the broker is not keeping up and the run says so


@dataclass
class Subject:
    sub: str
    token: str
    approvals: deque[float] = field(default_factory=deque)  #: times of this subject's allowed approvals


@dataclass
class Tally:
    """Per ``scenario.step``: answers by (status, error); unexpected answers with their details."""

    answers: Counter[tuple[str, int, str | None]] = field(default_factory=Counter)
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    #: request id → whether it was a 2xx (the audit check)
    request_ids: dict[str, bool] = field(default_factory=dict)
    dropped: int = 0  #: scenarios not started because MAX_IN_FLIGHT were still running


class Traffic:
    """The soak's agent: one keep-alive mTLS session, a pool of subjects, the scenarios of the module docstring."""

    def __init__(self, certs: Path, base_url: str, session: aiohttp.ClientSession, pool_size: int) -> None:
        self.base_url = base_url
        self.session = session
        agents = certs / "agents"
        self.signer = DpopSigner(json.loads((agents / f"{AGENT}-dpop.jwk").read_text()))
        self.stranger = DpopSigner(json.loads((agents / "travel-bot-dpop.jwk").read_text()))
        self.idp = json.loads((certs / "idp.jwk").read_text())
        # subjects unique per run: a shared Redis keeps their velocity counters for 10 minutes
        self.run_id = uuid.uuid4().hex[:8]
        self.pool: deque[Subject] = deque(self._subject(i) for i in range(pool_size))
        self.approvers: deque[Subject] = deque(self.pool)
        self.tally = Tally()

    def _subject(self, index: int) -> Subject:
        sub = f"soak-{self.run_id}-{index}"
        token = mint_access_token(
            self.idp,
            sub=sub,
            now=time.time(),
            ttl=86_400,
            act_sub=f"spiffe://example.org/agents/{AGENT}",
            cnf_jkt=self.signer.jkt,
            claims={"groups": ["finance-managers"], "department": "42", "approval_limit": 20000},
        )
        return Subject(sub, token)

    def next_subject(self) -> Subject:
        self.pool.rotate(-1)
        return self.pool[0]

    def next_approver(self, now: float) -> Subject:
        """A subject with fewer than APPROVALS_PER_WINDOW approvals in the window (a new one if none is)."""
        candidate = self.approvers[0]
        while candidate.approvals and now - candidate.approvals[0] > VELOCITY_WINDOW:
            candidate.approvals.popleft()
        if len(candidate.approvals) >= APPROVALS_PER_WINDOW:  # the least recently used is busy: all are
            candidate = self._subject(len(self.pool))
            self.pool.append(candidate)
            self.approvers.appendleft(candidate)
        self.approvers.rotate(-1)
        return candidate

    async def send(
        self,
        step: str,
        expected: tuple[int, str | None],
        subject: Subject,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        form: dict[str, str] | None = None,
        proof: str | None = None,
        txn: str | None = None,
    ) -> tuple[int, dict[str, Any] | None, str]:
        """POST, check the answer against ``expected`` (status, error code); returns (status, JSON, proof sent)."""
        url = self.base_url + path
        proof = proof or self.signer.proof("POST", url, access_token=subject.token)
        headers = {"Authorization": f"DPoP {subject.token}", "DPoP": proof}
        if txn is not None:
            headers["Txn-Token"] = txn
        started = time.perf_counter()
        status, parsed, request_id = 0, None, None
        try:
            async with self.session.post(url, json=body, data=form, headers=headers) as resp:
                raw = await resp.read()
                status, request_id = resp.status, resp.headers.get("X-Request-Id")
            with contextlib.suppress(ValueError):
                parsed = json.loads(raw)
        except (aiohttp.ClientError, TimeoutError) as exc:
            parsed = {"error": type(exc).__name__}
        self.tally.latencies.append(time.perf_counter() - started)
        error = parsed.get("error") if isinstance(parsed, dict) and status != 200 else None
        self.tally.answers[(step, status, error)] += 1
        if request_id is not None:
            self.tally.request_ids[request_id] = 200 <= status < 300
        if (status, error) != expected:
            self.tally.unexpected.append(
                {"step": step, "expected": list(expected), "got": [status, error], "request_id": request_id}
            )
        return status, parsed if isinstance(parsed, dict) else None, proof

    def exchange_form(self, subject: Subject) -> dict[str, str]:
        return {
            "grant_type": TOKEN_EXCHANGE,
            "requested_token_type": TXN_TOKEN_TYPE,
            "audience": "example.org",
            "subject_token": subject.token,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "scope": "tool:approveExpense",
            "request_details": json.dumps({"tool": "approveExpense", "arguments": APPROVE_ARGS}),
        }

    async def run(self, scenario: str, index: int) -> None:
        ok = (200, None)
        if scenario == "list":
            await self.send(
                "list", ok, self.next_subject(), "/v1/tools/listInvoices", body={"department": "42"}
            )
        elif scenario == "deny":
            expected = (403, "access_denied")
            await self.send(
                "deny", expected, self.next_subject(), "/v1/tools/listInvoices", body={"department": "7"}
            )
        elif scenario == "bad_proof":
            subject, path = self.next_subject(), "/v1/tools/listInvoices"
            if index % 2:  # a proof for another URL (RFC 9449 §4.3 check 9)
                proof = self.signer.proof(
                    "POST", self.base_url + "/v1/tools/approveExpense", access_token=subject.token
                )
            else:  # a valid proof by a key the token is not bound to (cnf.jkt, RFC 9449 §6.1)
                proof = self.stranger.proof("POST", self.base_url + path, access_token=subject.token)
            await self.send(
                "bad_proof",
                (401, "invalid_dpop_proof"),
                subject,
                path,
                body={"department": "42"},
                proof=proof,
            )
        elif scenario == "proof_replay":
            subject, path, body = self.next_subject(), "/v1/tools/listInvoices", {"department": "42"}
            status, _, proof = await self.send("proof_replay.first", ok, subject, path, body=body)
            if status == 200:
                expected = (401, "invalid_dpop_proof")
                await self.send("proof_replay.replay", expected, subject, path, body=body, proof=proof)
        elif scenario == "exchange":
            subject = self.next_subject()
            await self.send("exchange", ok, subject, "/v1/token", form=self.exchange_form(subject))
        else:  # approve, txn_replay
            subject = self.next_approver(time.monotonic())
            status, reply, _ = await self.send(
                f"{scenario}.exchange", ok, subject, "/v1/token", form=self.exchange_form(subject)
            )
            if status != 200 or reply is None:
                return
            txn = str(reply["access_token"])
            path = "/v1/tools/approveExpense"
            status, _, _ = await self.send(f"{scenario}.call", ok, subject, path, body=APPROVE_ARGS, txn=txn)
            if status == 200:
                subject.approvals.append(time.monotonic())
                if scenario == "txn_replay":
                    expected = (403, "invalid_txn_token")
                    await self.send("txn_replay.replay", expected, subject, path, body=APPROVE_ARGS, txn=txn)


def pool_size_for(rate: float, duration: float) -> int:
    """Subjects needed so that no one approves more than APPROVALS_PER_WINDOW times in a velocity window."""
    approvals_per_s = rate / MEAN_REQUESTS * (MIX["approve"] + MIX["txn_replay"]) / sum(MIX.values())
    window = min(duration, VELOCITY_WINDOW)
    return max(50, math.ceil(approvals_per_s * window / APPROVALS_PER_WINDOW * 1.25))


async def drive(traffic: Traffic, rate: float, duration: float) -> float:
    """Start scenarios open-loop so that requests arrive at ``rate``/s for ``duration`` s; returns the elapsed."""
    deck = [s for s, w in MIX.items() for _ in range(w)]
    random.Random(7).shuffle(deck)  # a fixed interleaving: runs are comparable
    loop = asyncio.get_running_loop()
    started = next_at = loop.time()
    running: set[asyncio.Task[None]] = set()
    index = 0
    while (now := loop.time()) < started + duration:
        if len(running) >= MAX_IN_FLIGHT:
            traffic.tally.dropped += 1
        else:
            task = asyncio.create_task(traffic.run(deck[index % len(deck)], index))
            running.add(task)
            task.add_done_callback(running.discard)
        index += 1
        next_at += MEAN_REQUESTS / rate
        await asyncio.sleep(max(0.0, next_at - now))  # the open loop's pace
    await asyncio.gather(*running)
    return loop.time() - started


def rss_kb(pid: int) -> int:
    """``VmRSS`` of ``pid`` in kB (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")


async def sample_rss(pid: int, every: float, samples: list[tuple[float, int]]) -> None:
    """Append (seconds since start, VmRSS kB) every ``every`` s until cancelled."""
    started = time.monotonic()
    while True:
        samples.append((round(time.monotonic() - started, 1), rss_kb(pid)))
        await asyncio.sleep(every)  # the sampling period


def flatness(samples: list[tuple[float, int]], warmup: float) -> dict[str, Any]:
    """Last third's max within FLAT_TOLERANCE of the first third's max, over the samples after ``warmup``."""
    kept = [kb for t, kb in samples if t >= warmup]
    if len(kept) < 3:
        return {"flat": None, "why": f"only {len(kept)} samples after warm-up"}
    third = len(kept) // 3
    first, last = max(kept[:third]), max(kept[-third:])
    growth = (last - first) / first
    return {
        "flat": growth <= FLAT_TOLERANCE,
        "first_third_max_kb": first,
        "last_third_max_kb": last,
        "growth": round(growth, 4),
        "warmup_seconds": warmup,
    }


# --- processes -------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def broker_process(
    env: BenchEnv, port: int, admin_port: int, state: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``broker run`` (one process: its pid is the one whose RSS is sampled), ready on enter, killed on error."""
    overrides = broker_env(env, port, admin_port, state)
    log_path = env.work / "broker.log"
    ready = probe(f"http://127.0.0.1:{admin_port}/readyz", None)
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            "run",
            "-c",
            str(env.broker_config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **overrides},
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while not await ready():
                if proc.returncode is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise SetupFailed(f"broker not ready (status {proc.returncode}):\n{tail}")
                await asyncio.sleep(0.05)  # polling a foreign process
            yield proc
        finally:
            if proc.returncode is None:  # the soak stops it itself; this is the error path
                proc.kill()
                await proc.wait()


def start_backend(env: BenchEnv, public_url: str) -> contextlib.AbstractAsyncContextManager[None]:
    """The demo backend as in production: it verifies every Txn-Token (issuer = the broker's public URL)."""
    argv = [
        sys.executable,
        "-m",
        "broker.dev.demo.expense",
        "--listen",
        env.backend_url.removeprefix("https://"),
    ]
    argv += ["--certs", str(env.certs), "--db", str(env.work / "expense.db"), "--broker-url", public_url]
    ready = probe(env.backend_url + "/healthz", env.probe_ssl)
    return server_process("backend", argv, env=env, ready=ready, extra_env={})


def check_audit(path: Path, certs: Path, tally: Tally, capacity_requests: int) -> dict[str, Any]:
    """``broker audit verify`` and one record per decision (module docstring, point 4)."""
    verify = subprocess.run(  # noqa: S603 - our own CLI with fixed arguments
        [
            sys.executable,
            "-m",
            "broker",
            "audit",
            "verify",
            str(path),
            "--key",
            str(certs / "broker-signing.jwk"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    events = Counter(r["event"] for r in records)
    soak: Counter[str] = Counter()
    mismatched: list[str] = []
    others: Counter[tuple[str, str, str | None]] = Counter()
    for record in records:
        request_id = record.get("request_id")
        if request_id in tally.request_ids:
            soak[request_id] += 1
            if (record["decision"] == "allow") != tally.request_ids[request_id]:
                mismatched.append(request_id)
        elif record["event"] != "checkpoint":
            others[(record["event"], record["decision"], record.get("tool"))] += 1
    expected_others: Counter[tuple[str, str, str | None]] = Counter({("config_load", "allow", None): 1})
    if capacity_requests:
        expected_others[("invocation", "allow", "listInvoices")] = capacity_requests
    one_each = len(soak) == len(tally.request_ids) and set(soak.values()) <= {1}
    return {
        "verify_exit": verify.returncode,
        "verify_output": (verify.stdout + verify.stderr).strip()[-500:],
        "records": len(records),
        "events": dict(events),
        "soak_decisions": len(tally.request_ids),
        "soak_records": sum(soak.values()),
        "decision_mismatches": len(mismatched),
        "other_records": {"/".join(str(k) for k in key): n for key, n in others.items()},
        "one_record_per_decision": one_each and not mismatched and others == expected_others,
        "ends_with_checkpoint": bool(records) and records[-1]["event"] == "checkpoint",
    }


# --- the run ---------------------------------------------------------------------------------------------------


class Counted:
    """``make_request`` that counts its calls: one call is one request, hence one decision to find in the log."""

    def __init__(self, inner: IdentityRequests) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self) -> tuple[dict[str, str], bytes]:
        self.calls += 1
        return self.inner()


async def soak(args: argparse.Namespace, certs: Path, work: Path) -> dict[str, Any]:
    agents = certs / "agents"
    ssl_ctx = client_ssl_context(certs / "ca.pem", agents / f"{AGENT}.pem", agents / f"{AGENT}-key.pem")
    env = BenchEnv(certs, work, f"https://127.0.0.1:{free_port()}", args.broker_config, ssl_ctx)
    port, admin_port = free_port(), free_port()
    base_url = f"https://127.0.0.1:{port}"
    doc: dict[str, Any] = {"state": args.state, "duration": args.duration}
    async with start_backend(env, base_url), broker_process(env, port, admin_port, args.state) as proc:
        capacity_requests = 0
        rate = args.rate
        if rate is None:
            print(f"measuring capacity for {args.capacity_seconds:g}s ...", file=sys.stderr, flush=True)
            counted = Counted(IdentityRequests(env, base_url + "/v1/tools/listInvoices"))
            result = await run_load(
                base_url + "/v1/tools/listInvoices",
                concurrency=32,
                duration=args.capacity_seconds,
                make_request=counted,
                ssl_ctx=ssl_ctx,
            )
            capacity_requests = counted.calls
            doc["capacity"] = {"rps": round(result.rps, 1), **result.as_json()}
            rate = max(1.0, result.rps / 2)
        doc["rate"] = round(rate, 1)
        pool = pool_size_for(rate, args.duration)
        connector = aiohttp.TCPConnector(ssl=ssl_ctx, limit=256)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            traffic = Traffic(certs, base_url, session, pool)
            print(
                f"soak at {rate:.0f} req/s for {args.duration:g}s ({pool} subjects) ...",
                file=sys.stderr,
                flush=True,
            )
            samples: list[tuple[float, int]] = []
            sampler = asyncio.create_task(sample_rss(proc.pid, args.sample_every, samples))
            try:
                elapsed = await drive(traffic, rate, args.duration)
                samples.append((round(elapsed, 1), rss_kb(proc.pid)))  # the end of the run, too
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
        proc.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(proc.wait(), 60)
    tally = traffic.tally
    latencies = sorted(tally.latencies)
    sent = sum(tally.answers.values())
    doc.update(
        subjects=len(traffic.pool),
        elapsed=round(elapsed, 1),
        requests=sent,
        achieved_rps=round(sent / elapsed, 1),
        p50_ms=round(percentile(latencies, 50) * 1000, 2),
        p99_ms=round(percentile(latencies, 99) * 1000, 2),
        max_ms=round(latencies[-1] * 1000, 2) if latencies else None,
        unexpected=len(tally.unexpected),
        unexpected_first=tally.unexpected[:20],
        dropped_scenarios=tally.dropped,
        answers={
            f"{step} {status} {error or ''}".strip(): n
            for (step, status, error), n in sorted(
                tally.answers.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or "")
            )
        },
        rss_samples_kb=samples,
        memory=flatness(samples, args.duration * args.warmup_fraction),
        broker_exit=exit_code,
        audit=check_audit(work / "audit.jsonl", certs, tally, capacity_requests),
    )
    return doc


def passed(doc: dict[str, Any]) -> bool:
    audit = doc["audit"]
    return (
        doc["unexpected"] == 0
        and doc["dropped_scenarios"] == 0
        and doc["memory"]["flat"] is True
        and doc["broker_exit"] == 0
        and audit["verify_exit"] == 0
        and audit["ends_with_checkpoint"]
        and audit["one_record_per_decision"]
    )


def report(doc: dict[str, Any]) -> None:
    capacity = doc.get("capacity")
    head = f"soak: state={doc['state']}  rate={doc['rate']} req/s"
    head += f" (half of {capacity['rps']} measured)" if capacity else " (given)"
    print(head + f"  duration={doc['duration']:g}s  subjects={doc['subjects']}")
    print(f"{'step':<22} {'status':>6} {'error':<20} {'count':>8}")
    for key, count in doc["answers"].items():
        step, status, *error = key.split(" ")
        print(f"{step:<22} {status:>6} {' '.join(error):<20} {count:>8}")
    print(
        f"requests {doc['requests']} in {doc['elapsed']}s = {doc['achieved_rps']} req/s; "
        f"p50 {doc['p50_ms']} ms, p99 {doc['p99_ms']} ms, max {doc['max_ms']} ms"
    )
    print(
        f"unexpected answers: {doc['unexpected']}   scenarios dropped (overload): {doc['dropped_scenarios']}"
    )
    rss = "  ".join(f"{t:g}s:{kb / 1024:.1f}" for t, kb in doc["rss_samples_kb"])
    print(f"broker RSS MB: {rss}")
    memory = doc["memory"]
    if memory["flat"] is None:
        print(f"memory: not judged ({memory['why']})")
    else:
        print(
            f"memory flat: {'yes' if memory['flat'] else 'NO'} (after {memory['warmup_seconds']:g}s warm-up: "
            f"first third max {memory['first_third_max_kb'] / 1024:.1f} MB, last third max "
            f"{memory['last_third_max_kb'] / 1024:.1f} MB, {memory['growth']:+.1%})"
        )
    audit = doc["audit"]
    print(
        f"broker exit status {doc['broker_exit']}; audit verify exit {audit['verify_exit']}; "
        f"{audit['records']} records {audit['events']}; last is a checkpoint: {audit['ends_with_checkpoint']}"
    )
    print(
        f"one record per decision: {'yes' if audit['one_record_per_decision'] else 'NO'} "
        f"({audit['soak_records']} records for {audit['soak_decisions']} soak decisions, "
        f"{audit['decision_mismatches']} mismatched; others {audit['other_records']})"
    )
    print("SOAK PASSED" if passed(doc) else "SOAK FAILED")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_config = Path(__file__).resolve().parents[3] / "config" / "examples" / "expense.yaml"
    parser = argparse.ArgumentParser(
        prog="python -m broker.dev.bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=600.0, help="soak seconds (default %(default)s)")
    parser.add_argument("--rate", type=float, help="requests/s (default: half the measured capacity)")
    parser.add_argument("--state", choices=("memory", "redis"), default="memory", help="broker state store")
    parser.add_argument(
        "--capacity-seconds", type=float, default=5.0, help="capacity measurement (default 5)"
    )
    parser.add_argument("--sample-every", type=float, default=10.0, help="RSS sampling period (default 10)")
    parser.add_argument(
        "--warmup-fraction", type=float, default=0.2, help="RSS samples ignored (default 0.2)"
    )
    parser.add_argument("--certs", type=Path, help="§10 PKI folder (default: generate one in a temp folder)")
    parser.add_argument("--broker-config", type=Path, default=default_config)
    parser.add_argument("--work", type=Path, help="keep logs, DB and audit log here (default: a temp folder)")
    parser.add_argument(
        "--out", type=Path, default=Path("var/soak.json"), help="JSON report (default %(default)s)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="broker-soak-") as tmp:
        work = args.work.resolve() if args.work is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        certs = args.certs
        if certs is None:
            from broker.dev.pki import generate

            certs = work / "certs"
            generate(certs)
        try:
            doc = run_event_loop(soak(args, certs.resolve(), work))
        except SetupFailed as exc:
            print(f"soak failed: {exc}", file=sys.stderr)
            return 1
    report(doc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if passed(doc) else 1


if __name__ == "__main__":
    sys.exit(main())
