"""Faults under load, with real processes: what an agent sees when Redis, the backend, the audit file, the config
file or the process itself fails while calls are flowing (issue 7, item 1).

Every test runs ``python -m broker run`` as a subprocess on loopback ports, puts an open-loop background load of
:data:`RATE` requests/s on it (:class:`Load`: one request every ``1/RATE`` s whatever the answers, each with a
fresh DPoP proof, over one keep-alive mTLS session), injects one fault, and asserts on the answers the agent got,
classified by when each request started and ended relative to the fault. Waiting is on observed answers
(:meth:`Load.until`, bounded), never on fixed sleeps; foreign processes (Redis, the backend, the broker's admin
endpoint) are polled with a bound.

HOSTILE S05 (a Redis that restarts without persistence forgets recent claims): a proof accepted just before
such a restart is accepted again after it. We therefore do not claim "no replay across a restart" for the
non-persistent server; the outage test asserts the property that does hold — a proof or txn token presented
*while Redis was down* was not consumed (it works after recovery, once) — and a separate test shows that with
``appendfsync always`` a proof and a txn token used before a restart stay refused after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from broker.dev.idp import mint_access_token
from broker.jose import jwk_thumbprint
from broker.sdk.agent import AgentClient
from tests.certfactory import Pki, client_ssl_context
from tests.conftest import Recorded, RecordingUpstream, backend_ssl_context, base_config
from tests.e2e.test_cli import broker_process, free_port, run_cli, wait_ready
from tests.redisutil import throwaway_redis

pytestmark = pytest.mark.slow

#: requests per second of the background load
RATE = 100
#: bound of every wait on the load's answers or on a foreign process
WITHIN = 20.0
AGENT = "expense-assistant"
TOOL = "approveExpense"
PATH = f"/v1/tools/{TOOL}"
ARGS = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}
OK = (200, None)
STATE_DOWN = (503, "state_unavailable")


# --- the broker, its clients and the load ----------------------------------------------------------------------


def fault_config(pki: Pki, tmp_path: Path, upstream_url: str, *, timeout: float = 2.0) -> dict[str, Any]:
    """:func:`base_config` on free ports, ``public_url`` = the real address (so ``AgentClient``'s htu matches)."""
    port = free_port()
    config = base_config(pki, tmp_path, upstream_url=upstream_url)
    config["server"].update(
        listen=f"127.0.0.1:{port}",
        admin_listen=f"127.0.0.1:{free_port()}",
        public_url=f"https://127.0.0.1:{port}",
    )
    config["tools"][0]["upstream"]["timeout_seconds"] = timeout
    return config


@dataclass
class Broker:
    url: str
    admin: str
    proc: subprocess.Popen[bytes]
    log: Path
    config_path: Path
    audit: Path


@asynccontextmanager
async def running_broker(config: dict[str, Any], tmp_path: Path, name: str) -> AsyncIterator[Broker]:
    """``broker run`` from ready to the end of the block (then SIGTERM, like test_cli's ``broker_process``)."""
    with broker_process(config, tmp_path, name) as proc:
        admin = f"http://{config['server']['admin_listen']}"
        await wait_ready(admin, proc["proc"], proc["log"])
        yield Broker(
            url=config["server"]["public_url"],
            admin=admin,
            proc=proc["proc"],
            log=proc["log"],
            config_path=tmp_path / f"{name}.yaml",
            audit=Path(config["audit"]["file"]),
        )


def agent_client(pki: Pki, url: str, *, sub: str = "alice") -> AgentClient:
    """``sub`` acting through the expense assistant: its SVID, its DPoP key, a token bound to both."""
    files = pki.agent(AGENT)
    dpop = json.loads(files.dpop_jwk.read_text())
    token = mint_access_token(
        json.loads(pki.idp_jwk.read_text()),
        sub=sub,
        now=time.time(),
        act_sub=pki.agent_id(AGENT),
        cnf_jkt=jwk_thumbprint(dpop),
    )
    return AgentClient(
        url,
        ca=pki.ca,
        cert=files.cert,
        key=files.key,
        dpop_jwk=dpop,
        access_token=token,
        trust_domain=pki.trust_domain,
    )


@dataclass(frozen=True)
class Outcome:
    """One request of the load: loop times, the status (0: no HTTP answer) and the error code or exception."""

    started: float
    ended: float
    status: int
    error: str | None
    request_id: str | None

    @property
    def answer(self) -> tuple[int, str | None]:
        return self.status, self.error


@dataclass
class Load:
    """Open-loop load: a call of ``TOOL`` every ``1/rate`` s, each in its own task, until :meth:`stop`."""

    client: AgentClient
    rate: float = RATE
    outcomes: list[Outcome] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _inflight: set[asyncio.Task[None]] = field(default_factory=set)
    _pacer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Load:
        self._pacer = asyncio.create_task(self._pace())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _pace(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            task = asyncio.create_task(self._one())
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            next_at += 1 / self.rate
            await asyncio.sleep(max(0.0, next_at - loop.time()))  # pacing of an open-loop load

    async def _one(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            reply = await self.client.call_tool(TOOL, ARGS)
            status, error, request_id = reply.status, reply.error, reply.headers.get("X-Request-Id")
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, error, request_id = 0, type(exc).__name__, None
        self.outcomes.append(Outcome(started, loop.time(), status, error, request_id))
        async with self._changed:
            self._changed.notify_all()

    async def until(self, predicate: Callable[[list[Outcome]], bool], what: str) -> float:
        """Wait (at most :data:`WITHIN` s) until ``predicate(outcomes)``; returns the loop time then."""
        try:
            async with asyncio.timeout(WITHIN), self._changed:
                await self._changed.wait_for(lambda: predicate(self.outcomes))
        except TimeoutError:
            pytest.fail(f"not within {WITHIN}s: {what}; answers so far {tally(self.outcomes)}")
        return asyncio.get_running_loop().time()

    async def stop(self) -> None:
        """Stop sending and wait for every request in flight to end."""
        if self._pacer is not None:
            self._pacer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pacer
            self._pacer = None
        await asyncio.gather(*self._inflight)


def tally(outcomes: Sequence[Outcome]) -> dict[tuple[int, str | None], int]:
    return dict(Counter(o.answer for o in outcomes))


def answered(answer: tuple[int, str | None], *, after: float, count: int) -> Callable[[list[Outcome]], bool]:
    """At least ``count`` requests that started after ``after`` got ``answer``."""
    return lambda outcomes: sum(o.started >= after and o.answer == answer for o in outcomes) >= count


def within(outcomes: Sequence[Outcome], start: float, end: float) -> list[Outcome]:
    """The requests that started after ``start`` and ended before ``end``: wholly inside a phase."""
    return [o for o in outcomes if o.started >= start and o.ended <= end]


async def poll(check: Callable[[], Any], what: str) -> Any:
    """Poll a foreign process until ``await check()`` is truthy (bounded by :data:`WITHIN`); returns it."""
    deadline = time.monotonic() + WITHIN
    while time.monotonic() < deadline:
        if result := await check():
            return result
        await asyncio.sleep(0.05)  # poll interval: another process, nothing to wait on
    pytest.fail(f"not within {WITHIN}s: {what}")


async def admin_get(admin: str, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(admin + path) as resp:
        return resp.status, await resp.text()


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def audit_verifies(path: Path, pki: Pki) -> subprocess.CompletedProcess[str]:
    return run_cli("audit", "verify", str(path), "--key", str(pki.signing_jwk))


# --- Redis ----------------------------------------------------------------------------------------------------


def redis_state(url: str) -> dict[str, Any]:
    # a generous bound (like tests/redisutil.py): a dead Redis refuses connections at once anyway
    return {"backend": "redis", "redis_url": url, "key_prefix": "faults:", "timeout_ms": 2000}


@pytest.mark.redis
async def test_redis_killed_under_load_refuses_503_consumes_nothing_and_recovers(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    async with throwaway_redis() as redis:
        config = fault_config(pki, tmp_path, upstream.url)
        config["state"] = redis_state(redis.url)
        async with (
            running_broker(config, tmp_path, "redis-kill") as broker,
            agent_client(pki, broker.url) as agent,
        ):
            # exchanged before the outage: the exchange needs the store too
            txn = (await agent.exchange(TOOL, ARGS)).json()["access_token"]
            async with Load(agent) as load:
                t0 = asyncio.get_running_loop().time()
                await load.until(answered(OK, after=t0, count=50), "50 calls allowed before the outage")
                await redis.kill()
                down = asyncio.get_running_loop().time()
                await load.until(
                    answered(STATE_DOWN, after=down, count=100), "100 refusals while Redis is down"
                )
                # a proof and a txn token presented while the store is down
                proof = agent.proof_for("POST", PATH)
                proof_while_down = await agent.request("POST", PATH, json=ARGS, headers={"DPoP": proof})
                txn_while_down = await agent.call_tool(TOOL, ARGS, txn_token=txn)
                restarting = asyncio.get_running_loop().time()
                await redis.start()
                up = asyncio.get_running_loop().time()
                await load.until(answered(OK, after=up, count=50), "50 calls allowed after Redis returned")
            proof_after = await agent.request("POST", PATH, json=ARGS, headers={"DPoP": proof})
            proof_again = await agent.request("POST", PATH, json=ARGS, headers={"DPoP": proof})
            txn_after = await agent.call_tool(TOOL, ARGS, txn_token=txn)
            txn_again = await agent.call_tool(TOOL, ARGS, txn_token=txn)
            assert broker.proc.poll() is None  # recovered by itself, never restarted

    outcomes = load.outcomes
    assert set(tally(outcomes)) <= {OK, STATE_DOWN}, tally(outcomes)  # never 500, never a transport failure
    assert {o.answer for o in within(outcomes, down, restarting)} == {STATE_DOWN}
    assert (proof_while_down.status, proof_while_down.error) == STATE_DOWN
    assert (txn_while_down.status, txn_while_down.error) == STATE_DOWN
    # not consumed while down: each works once after recovery, and only once
    assert (proof_after.status, proof_again.status, proof_again.error) == (200, 401, "invalid_dpop_proof")
    assert (txn_after.status, txn_again.status, txn_again.error) == (200, 403, "invalid_txn_token")
    # nothing refused reached the backend
    refused = {o.request_id for o in outcomes if o.status != 200}
    assert refused.isdisjoint(r.headers["X-Request-Id"] for r in upstream.received)


def reason_of(audit: Path, request_id: str | None) -> str:
    (record,) = [r for r in audit_lines(audit) if r.get("request_id") == request_id]
    return str(record["reason"])


@pytest.mark.redis
async def test_a_persistent_redis_keeps_refusing_a_proof_and_a_txn_used_before_its_restart(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """With ``appendfsync always`` (the operator's answer to S05) single use survives a SIGKILL of Redis."""
    (tmp_path / "redis").mkdir()
    aof = ("--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path / "redis"))
    async with throwaway_redis(aof) as redis:
        config = fault_config(pki, tmp_path, upstream.url)
        config["state"] = redis_state(redis.url)
        async with (
            running_broker(config, tmp_path, "redis-aof") as broker,
            agent_client(pki, broker.url) as agent,
        ):
            proof = agent.proof_for("POST", PATH)
            txn = (await agent.exchange(TOOL, ARGS)).json()["access_token"]
            before = [
                await agent.request("POST", PATH, json=ARGS, headers={"DPoP": proof}),
                await agent.call_tool(TOOL, ARGS, txn_token=txn),
            ]
            await redis.kill()
            await redis.start()
            proof_replay = await agent.request("POST", PATH, json=ARGS, headers={"DPoP": proof})
            txn_replay = await agent.call_tool(TOOL, ARGS, txn_token=txn)
            fresh = await agent.call_tool(TOOL, ARGS)
    assert [r.status for r in before] == [200, 200]
    assert (proof_replay.status, proof_replay.error) == (401, "invalid_dpop_proof")
    assert reason_of(broker.audit, proof_replay.headers["X-Request-Id"]) == "dpop_replay"
    assert (txn_replay.status, txn_replay.error) == (403, "invalid_txn_token")
    assert reason_of(broker.audit, txn_replay.headers["X-Request-Id"]) == "txn_replayed"
    assert fresh.status == 200


# --- the tool backend -----------------------------------------------------------------------------------------


@dataclass
class DemoBackend:
    """``python -m broker.dev.demo.expense --no-verify`` on a fixed port: it can be SIGKILLed and come back."""

    pki: Pki
    tmp_path: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> None:
        argv = [sys.executable, "-m", "broker.dev.demo.expense", "--listen", f"127.0.0.1:{self.port}"]
        argv += ["--certs", str(self.pki.root), "--db", str(self.tmp_path / "expense.db"), "--no-verify"]
        with (self.tmp_path / "backend.log").open("a") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        files = self.pki.agent(AGENT)  # any certificate of the CA opens the backend's mTLS
        ctx = client_ssl_context(self.pki, files.cert, files.key)

        async def healthy() -> bool:
            log = self.tmp_path / "backend.log"
            assert self.proc is not None and self.proc.poll() is None, log.read_text()
            try:
                async with aiohttp.ClientSession() as s, s.get(f"{self.url}/healthz", ssl=ctx) as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await poll(healthy, "demo backend ready")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


async def test_backend_killed_under_load_gives_502_then_recovers_on_the_same_port(
    pki: Pki, tmp_path: Path
) -> None:
    backend = DemoBackend(pki, tmp_path, free_port())
    await backend.start()
    try:
        config = fault_config(pki, tmp_path, backend.url)
        async with (
            running_broker(config, tmp_path, "backend-kill") as broker,
            agent_client(pki, broker.url) as agent,
            Load(agent) as load,
        ):
            t0 = asyncio.get_running_loop().time()
            await load.until(answered(OK, after=t0, count=50), "50 calls answered by the backend")
            backend.kill()
            down = asyncio.get_running_loop().time()
            await load.until(
                answered((502, "upstream_error"), after=down, count=50), "50 502s while it is down"
            )
            restarting = asyncio.get_running_loop().time()
            await backend.start()
            up = asyncio.get_running_loop().time()
            await load.until(answered(OK, after=up, count=50), "50 calls answered after the backend returned")
            assert broker.proc.poll() is None
    finally:
        backend.kill()
    outcomes = load.outcomes
    assert set(tally(outcomes)) <= {OK, (502, "upstream_error")}, tally(outcomes)
    assert {o.answer for o in within(outcomes, down, restarting)} == {(502, "upstream_error")}
    records = audit_lines(broker.audit)
    # each failed forward: the allow record written before it, then its outcome record, decision error (CONTRACT §15)
    failed = [r for r in records if r["event"] == "outcome" and r["decision"] == "error"]
    assert len(failed) == tally(outcomes)[(502, "upstream_error")]
    # refused connections, or a connection the kill cut mid-answer: never an upstream status
    assert {r["reason"] for r in failed} <= {"upstream_connect_failed", "upstream_protocol_error"}
    assert {r["status"] for r in failed} == {None}


@dataclass
class RawUpstream:
    """A TLS backend (client certificate required) that reads one request, writes ``answer`` verbatim and
    closes; ``answer=None`` never answers (the connection is held until the block ends)."""

    pki: Pki
    answer: bytes | None
    received: int = 0
    url: str = ""
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            self.received += 1
            if self.answer is None:
                await self._release.wait()
            else:
                writer.write(self.answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass  # the broker gave up (its timeout) or closed first: nothing to answer
        finally:
            writer.close()
            self._writers.discard(writer)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[RawUpstream]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=backend_ssl_context(self.pki))
        self.url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            self._release.set()
            server.close()
            for writer in list(self._writers):
                writer.close()
            await server.wait_closed()


def http_answer(content_type: str, body: bytes, *, length: int | None = None) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {length or len(body)}\r\n"
    return head.encode() + b"Connection: close\r\n\r\n" + body


#: the tool's upstream timeout in the slow row, which must answer 504 at it
TOOL_TIMEOUT = 1.0
#: scheduling slack on a shared 2-core machine for "at the tool's timeout"
TIMEOUT_SLACK = 1.5
MASKED = {"mask": [{"path": "vendor.bank_account", "keep_last": 4}]}


@pytest.mark.parametrize(
    ("answer", "response_filters", "expected"),
    [
        (None, None, (504, "upstream_timeout")),
        (b"SSH-2.0-OpenSSH_9.6\r\n", None, (502, "upstream_error")),
        (http_answer("application/json", b'{"a":', length=100), None, (502, "upstream_error")),
        (http_answer("text/html", b"<html>oops</html>"), None, (502, "upstream_error")),
        (http_answer("application/json", b"{not json"), MASKED, (502, "upstream_error")),
    ],
    ids=["slow-504", "not-http-502", "truncated-502", "not-json-type-502", "unparseable-json-filtered-502"],
)
async def test_a_slow_or_garbage_backend_under_load_gets_its_status(
    pki: Pki,
    tmp_path: Path,
    answer: bytes | None,
    response_filters: dict[str, Any] | None,
    expected: tuple[int, str],
) -> None:
    async with RawUpstream(pki, answer).serving() as raw:
        # garbage rows: a timeout no TLS handshake on a busy shared machine reaches, so only garbage fails them
        timeout = TOOL_TIMEOUT if answer is None else WITHIN
        config = fault_config(pki, tmp_path, raw.url, timeout=timeout)
        if response_filters is not None:
            config["tools"][0]["response"] = response_filters
        async with (
            running_broker(config, tmp_path, "garbage") as broker,
            agent_client(pki, broker.url) as agent,
        ):
            async with Load(agent) as load:
                t0 = asyncio.get_running_loop().time()
                await load.until(answered(expected, after=t0, count=100), f"100 answers {expected}")
            ready = (await admin_get(broker.admin, "/readyz"))[0]
    assert ready == 200  # a failing backend is the backend's problem: the broker stays ready
    assert tally(load.outcomes) == {expected: len(load.outcomes)}
    assert raw.received == len(load.outcomes)  # each call reached the backend exactly once: no retries
    if answer is None:
        latencies = sorted(o.ended - o.started for o in load.outcomes)
        assert latencies[0] >= TOOL_TIMEOUT and latencies[-1] <= TOOL_TIMEOUT + TIMEOUT_SLACK, latencies


# --- the audit file -------------------------------------------------------------------------------------------


async def test_unwritable_audit_under_load_refuses_503_and_forwards_nothing_unaudited(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """A real write failure: RLIMIT_FSIZE on the broker process at the log's size (appends fail with EFBIG)."""
    config = fault_config(pki, tmp_path, upstream.url)
    async with (
        running_broker(config, tmp_path, "audit-fault") as broker,
        agent_client(pki, broker.url) as agent,
        Load(agent) as load,
    ):
        t0 = asyncio.get_running_loop().time()
        await load.until(answered(OK, after=t0, count=50), "50 calls allowed before the fault")
        pid = broker.proc.pid
        _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (broker.audit.stat().st_size, hard))
        down = asyncio.get_running_loop().time()
        unaudited = (503, "audit_unavailable")
        await load.until(
            answered(unaudited, after=down, count=100), "100 refusals while the log is unwritable"
        )
        restoring = asyncio.get_running_loop().time()
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, hard))
        up = asyncio.get_running_loop().time()
        await load.until(answered(OK, after=up, count=50), "50 calls allowed after the log is writable again")
    outcomes = load.outcomes
    assert set(tally(outcomes)) <= {OK, unaudited}, tally(outcomes)
    assert {o.answer for o in within(outcomes, down, restoring)} == {unaudited}
    forwarded = Counter(r.headers["X-Request-Id"] for r in upstream.received)
    assert max(forwarded.values()) == 1
    answered_ok = {o.request_id for o in outcomes if o.status == 200}
    allowed = {r["request_id"] for r in audit_lines(broker.audit) if r["decision"] == "allow"}
    # nothing forwarded unaudited: each forward had its allow record first; a forward whose outcome record could
    # not be written was answered 503, not with the tool's answer (CONTRACT §15, fail closed)
    assert answered_ok <= set(forwarded) <= allowed
    assert audit_verifies(broker.audit, pki).returncode == 0


# --- reload and shutdown ---------------------------------------------------------------------------------------


def reload_failures(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith('broker_config_reloads_total{result="failure"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize(
    "breakage",
    [
        "policies: [unclosed\n",
        "policies:\n  - {id: broken, tools: ['*'], effect: allow, when: 'actor.id =='}\n",
    ],
    ids=["yaml-syntax", "cel-compile-error"],
)
async def test_sighup_with_a_broken_config_under_load_fails_no_request(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream, breakage: str
) -> None:
    config = fault_config(pki, tmp_path, upstream.url)
    async with (
        running_broker(config, tmp_path, "sighup") as broker,
        agent_client(pki, broker.url) as agent,
        Load(agent) as load,
    ):
        before = json.loads((await admin_get(broker.admin, "/admin/config"))[1])
        t0 = asyncio.get_running_loop().time()
        await load.until(answered(OK, after=t0, count=50), "50 calls allowed before the reload")
        text = broker.config_path.read_text()
        broker.config_path.write_text(text.split("policies:")[0] + breakage)
        broker.proc.send_signal(signal.SIGHUP)

        async def refused() -> float:
            return reload_failures((await admin_get(broker.admin, "/metrics"))[1])

        failures = await poll(refused, "the reload counted as failed")
        seen = asyncio.get_running_loop().time()
        await load.until(answered(OK, after=seen, count=50), "50 calls allowed after the failed reload")
        after = json.loads((await admin_get(broker.admin, "/admin/config"))[1])
    assert tally(load.outcomes) == {OK: len(load.outcomes)}  # zero failed requests
    assert failures == 1.0
    assert after["policy_version"] == before["policy_version"]
    assert [p["id"] for p in after["policies"]] == ["any-agent"]
    (record,) = [
        r for r in audit_lines(broker.audit) if r["event"] == "config_load" and r["decision"] == "error"
    ]
    assert record["source"] == "sighup" and record["policy_version"] == before["policy_version"]


async def test_sigterm_under_load_finishes_in_flight_calls_and_seals_the_audit_log(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    release, held = asyncio.Event(), asyncio.Event()
    in_flight = 20

    async def hold(record: Recorded) -> web.StreamResponse:
        if len(upstream.received) >= in_flight:
            held.set()
        await release.wait()  # the backend answers once the broker is draining
        return web.json_response({"approved": record.json()["invoice_id"]})

    upstream.respond = hold
    config = fault_config(pki, tmp_path, upstream.url, timeout=WITHIN)
    async with (
        running_broker(config, tmp_path, "sigterm") as broker,
        agent_client(pki, broker.url) as agent,
        Load(agent) as load,
    ):
        async with asyncio.timeout(WITHIN):
            await held.wait()
        in_flight_at_sigterm = {r.headers["X-Request-Id"] for r in upstream.received}
        broker.proc.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            try:
                return (await admin_get(broker.admin, "/readyz"))[0] == 503
            except aiohttp.ClientConnectionError:
                return False

        await poll(draining, "/readyz 503 after SIGTERM")
        release.set()
        exit_code = await asyncio.to_thread(broker.proc.wait, WITHIN)
    by_id = {o.request_id: o for o in load.outcomes if o.request_id is not None}
    assert exit_code == 0, broker.log.read_text()[-2000:]
    assert len(in_flight_at_sigterm) >= in_flight
    # every call in flight when SIGTERM arrived finished
    assert {by_id[request_id].answer for request_id in in_flight_at_sigterm} == {OK}
    # The other answers are not asserted: a connection whose TLS handshake completes after SIGTERM is still
    # served, and its call cut when the app's resources close (502, 500 "Session is closed", 503
    # audit_unavailable; intermittently here) -- pinned deterministically by the xfail test below.
    assert audit_lines(broker.audit)[-1]["event"] == "checkpoint"
    result = audit_verifies(broker.audit, pki)
    assert result.returncode == 0, result.stdout + result.stderr


async def raw_call(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, agent: AgentClient, host: str
) -> None:
    """Write one ``TOOL`` call (token, fresh proof) on an already open connection."""
    body = json.dumps(ARGS).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: {host}\r\nAuthorization: DPoP {agent.access_token}\r\n"
        f"DPoP: {agent.proof_for('POST', PATH)}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()


async def test_a_request_arriving_during_the_drain_is_refused_cleanly_while_in_flight_calls_finish(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """aiohttp drains only the connections it knew when shutdown began; the broker therefore counts requests in
    flight itself and refuses new ones with 503 shutting_down (Connection: close) until they are done — a late
    connection is never served while the upstream session and the audit log close under it."""
    release, arrived = asyncio.Event(), asyncio.Event()

    async def hold(record: Recorded) -> web.StreamResponse:
        arrived.set()
        await release.wait()
        return web.json_response({"approved": record.json()["invoice_id"]})

    upstream.respond = hold
    config = fault_config(pki, tmp_path, upstream.url, timeout=WITHIN)
    files = pki.agent(AGENT)
    async with (
        running_broker(config, tmp_path, "late-tls") as broker,
        agent_client(pki, broker.url) as agent,
    ):
        first = asyncio.create_task(agent.call_tool(TOOL, ARGS))  # in flight when SIGTERM arrives
        async with asyncio.timeout(WITHIN):
            await arrived.wait()
        host, port = broker.url.removeprefix("https://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))  # accepted; TLS after the signal
        broker.proc.send_signal(signal.SIGTERM)
        await writer.start_tls(client_ssl_context(pki, files.cert, files.key), server_hostname=host)
        await raw_call(reader, writer, agent, broker.url.removeprefix("https://"))
        async with asyncio.timeout(WITHIN):
            answer = await reader.read()  # the broker answers and closes
        writer.close()
        assert len(upstream.received) == 1  # the late call never reached the backend
        release.set()
        assert (await first).status == 200  # the call in flight finished
        assert await asyncio.to_thread(broker.proc.wait, WITHIN) == 0
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), head
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"] == "shutting_down"


# --- slowloris ------------------------------------------------------------------------------------------------

SLOW_CONNECTIONS = 20
SLOW_BYTE_INTERVAL = 0.1
#: "bounded latency" for the normal clients while the slow ones trickle (observed p99 ≈ 10-50 ms here)
NORMAL_LATENCY_BOUND = 1.0


async def trickle(url: str, ssl_ctx: ssl.SSLContext, stop: asyncio.Event) -> tuple[int, bool]:
    """Send a request's headers one byte per :data:`SLOW_BYTE_INTERVAL` s until ``stop``; (bytes sent, whether the
    broker closed the connection first)."""
    host, port = url.removeprefix("https://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ssl_ctx)
    head = f"POST {PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nX-Pad: ".encode()
    head += b"a" * 4000
    closed_by_broker = asyncio.ensure_future(reader.read())
    sent = 0
    try:
        while not stop.is_set() and not closed_by_broker.done():
            writer.write(head[sent : sent + 1])
            sent += 1
            await writer.drain()
            await asyncio.wait([closed_by_broker], timeout=SLOW_BYTE_INTERVAL)  # the trickle's pace
    except ConnectionError:
        return sent, True
    finally:
        closed = closed_by_broker.done()
        closed_by_broker.cancel()
        writer.close()
    return sent, closed


async def test_slowloris_connections_do_not_starve_normal_clients(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    config = fault_config(pki, tmp_path, upstream.url)
    stop = asyncio.Event()
    files = pki.agent(AGENT)
    ssl_ctx = client_ssl_context(pki, files.cert, files.key)
    async with (
        running_broker(config, tmp_path, "slowloris") as broker,
        agent_client(pki, broker.url) as agent,
    ):
        trickles = [asyncio.create_task(trickle(broker.url, ssl_ctx, stop)) for _ in range(SLOW_CONNECTIONS)]
        async with Load(agent, rate=50) as load:
            t0 = asyncio.get_running_loop().time()
            await load.until(answered(OK, after=t0, count=250), "250 normal calls during the trickle")
        stop.set()
        slow = await asyncio.gather(*trickles)
    latencies = sorted(o.ended - o.started for o in load.outcomes)
    assert tally(load.outcomes) == {OK: len(load.outcomes)}
    assert latencies[int(len(latencies) * 0.99)] <= NORMAL_LATENCY_BOUND, latencies[-10:]
    assert all(sent >= 10 for sent, _ in slow)  # they really trickled all along


async def test_a_connection_that_never_finishes_its_headers_is_closed_at_the_request_timeout(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    config = fault_config(pki, tmp_path, upstream.url)
    config["server"]["request_timeout_seconds"] = 2
    files = pki.agent(AGENT)
    stop = asyncio.Event()
    async with running_broker(config, tmp_path, "slow-headers") as broker:
        task = asyncio.create_task(trickle(broker.url, client_ssl_context(pki, files.cert, files.key), stop))
        # the deadline under test, plus slack, bounds the wait
        done, _ = await asyncio.wait([task], timeout=2 + TIMEOUT_SLACK + 2)
        stop.set()
        sent, closed_by_broker = await task
    assert done and closed_by_broker, f"still open after {sent} bytes"
