"""``python -m broker.dev.bench``: whole-path throughput of the broker against a bare forwarder, in one run.

Set-ups (each server in its own subprocess on 127.0.0.1, ephemeral ports):

- ``backend``: the demo expense backend called directly (``POST /invoices``), i.e. the raw backend;
- ``bare``: :mod:`broker.dev.bench.bareproxy` in front of it (``POST /v1/tools/listInvoices``), the yardstick;
- ``broker``: ``broker run -c config/examples/expense.yaml`` in front of it, every request with the full
  identity checks (mTLS SVID + a fresh DPoP proof + the access token + the replay claim), memory state store;
- ``broker-postgres``: the ``broker`` set-up with the PostgreSQL audit store (``audit.store``) in a database of
  its own (created on ``BROKER_BENCH_PG_URL``'s server, default 127.0.0.1:5432, dropped after); the report adds
  ``broker-postgres/broker``: the PostgreSQL store against the file store with fsync on (target >= 0.8);
- ``broker-redis``: the same with the Redis state store (``BROKER_REDIS_URL``, default 127.0.0.1:6379);
- ``broker-redis-2w``: the same with ``--workers 2`` (two processes on one port);
- ``mcp-direct``: the demo MCP server (official SDK, stateless, JSON responses: PERF.md's MCP peer set-up) called
  directly with a 2026-07-28 ``tools/call listInvoices``; ``mcp-broker``: the same call through the broker's
  ``/mcp/expenses`` with the full identity checks. The report adds ``mcp-broker/mcp-direct`` (target >= 0.5).

All set-ups share one backend, started with ``--no-verify`` (a benchmarking aid of
:mod:`broker.dev.demo.expense`): it skips the Txn-Token check and takes the department from the body. The
``backend`` and ``bare`` rows send no Txn-Token, so a verifying backend would refuse them; and every row then
pays the same backend cost, so the ratios measure the broker alone. (The broker still mints and forwards its
tokens; the backend just does not verify them here.)

Every set-up is loaded with ``{"department":"42"}`` by :func:`broker.dev.bench.loadgen.run_load` over mTLS with an
agent SVID. The table and ``--out`` JSON give rps, p50/p99 and each set-up's ratio to ``bare``.

Per core (``--pin``, the default with >= 2 cores; :mod:`broker.dev.bench.cpu`): the server under test (its
process tree, ``--workers`` children included) runs on the first core, the bench's load generator and the
auxiliary servers (the backend, the MCP server behind the broker) on the others. Each row also gives
``cpu_us_per_request`` (the server's own user + system CPU time over the measured window, per answered request)
and ``server_cpu_util`` (its CPU seconds per wall second: near 1.0 the server's core was the bottleneck, below it
the load generator's cores were, or another process shared the server's core). ``ratios_cpu`` divides bare's CPU
per request by each set-up's: what one core of each serves, whoever limited the rate. ``--unpinned-too`` loads
every set-up a second time with no pinning (``unpinned`` in each row, ``ratios_unpinned``); ``--no-pin`` runs
only that. Unpinned, the load generator shares the cores with the servers: only ratios within one run mean
anything (PERF.md).

Rounds (``--rounds N``; ``make bench`` uses 3): a shared virtual machine's speed drifts by 10-40 % between minutes
(the same code measured 1,308 and 1,726 CPU µs per request ten minutes apart), more than most single changes are
worth. With rounds every set-up runs once per round, each ratio is computed within a round (its set-ups
measured a minute apart) and the median over the rounds is reported; a row is the set-up's median run, with
every round's rps and CPU µs per request under ``rounds``.

A new set-up is one more :class:`Setup` in :func:`build_setups`: a name, a URL, a ``make_request`` (called per
request: the place for fresh DPoP proofs) and a ``start`` context manager that brings its server up.
A set-up whose server does not become ready is reported as failed; the others still run. Exit status 1 then.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import yaml

from broker.dev.bench import cpu
from broker.dev.bench.loadgen import MakeRequest, Result, client_ssl_context, run_load
from broker.dev.demo.expense import run_event_loop
from broker.dev.idp import mint_access_token
from broker.sdk.agent import DpopSigner

READY_TIMEOUT = 30.0  # seconds a server gets to answer its readiness probe
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
LISTINVOICES_BODY = json.dumps({"department": "42"}).encode()
_MCP_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}
MCP_CALL_BODY = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "listInvoices", "arguments": {"department": "42"}, "_meta": _MCP_META},
    }
).encode()
#: the 2026-07-28 Streamable HTTP headers of that call (CONTRACT §7)
MCP_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": "2026-07-28",
    "Mcp-Method": "tools/call",
    "Mcp-Name": "listInvoices",
}


class SetupFailed(Exception):
    """A set-up's server did not come up; the message says why (exit status and the tail of its log)."""


@dataclass(frozen=True)
class Setup:
    """One row of the report: what to load, how to build each request, how to bring its server up."""

    name: str
    url: str
    make_request: MakeRequest  #: called per request (fresh DPoP proofs go here)
    start: Callable[[], AbstractAsyncContextManager[None]]  #: server up on enter, stopped on exit


@dataclass
class Placement:
    """Which processes are under test, and where every process runs (``--pin``; :mod:`broker.dev.bench.cpu`).

    ``split`` is (server cpus, load cpus) or None (fewer than 2 cores). When ``pinned``, the servers under test
    run on the server cpus, the bench (load generator) and the auxiliary servers (backend, the MCP server behind
    the broker) on the load cpus; otherwise everything may run everywhere."""

    split: tuple[set[int], set[int]] | None
    pinned: bool = False
    under_test: list[int] = field(default_factory=list)
    aux: list[int] = field(default_factory=list)

    def place(self) -> None:
        """Apply the current mode's affinity to the bench and every tracked process tree."""
        everywhere = set(cpu.available_cpus()) if self.split is None else self.split[0] | self.split[1]
        server, load = self.split if (self.pinned and self.split) else (everywhere, everywhere)
        os.sched_setaffinity(0, load)  # the bench's own threads started later inherit it
        for pid in self.aux:
            cpu.pin_tree(pid, load)
        for pid in self.under_test:
            cpu.pin_tree(pid, server)

    def track(self, pid: int, *, under_test: bool) -> None:
        (self.under_test if under_test else self.aux).append(pid)
        self.place()

    def untrack(self, pid: int) -> None:
        for group in (self.under_test, self.aux):
            if pid in group:
                group.remove(pid)

    def cpu_seconds(self) -> float:
        """CPU seconds so far of the processes under test (their trees: ``--workers`` children too)."""
        return cpu.cpu_seconds(self.under_test)

    def server_cpus(self) -> set[int]:
        """Where the servers under test may run now."""
        if self.pinned and self.split is not None:
            return self.split[0]
        return set(cpu.available_cpus()) if self.split is None else self.split[0] | self.split[1]


@dataclass(frozen=True)
class BenchEnv:
    certs: Path
    work: Path  # scratch folder: DB, audit file, server logs
    backend_url: str
    broker_config: Path
    probe_ssl: ssl.SSLContext  # presents the agent SVID; verifies servers against ca.pem
    mcp_url: str = ""  # the demo MCP server's endpoint (the mcp-* set-ups start it)
    placement: Placement = field(default_factory=lambda: Placement(None))


def free_port() -> int:
    """A port that was free a moment ago (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def plain_json() -> tuple[dict[str, str], bytes]:
    return {"Content-Type": "application/json"}, LISTINVOICES_BODY


# --- subprocesses ---------------------------------------------------------------------------------------


def _failure(name: str, what: str, log_path: Path, lines: int = 15) -> SetupFailed:
    """``NAME WHAT: <last log line>`` on the first line (the table shows it), the log's tail below."""
    try:
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-lines:]
    except OSError:
        tail = []
    last = tail[-1].strip() if tail else "no output"
    return SetupFailed("\n".join([f"{name} {what}: {last}", *tail]))


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the server's process group (it leads its own session), SIGKILL after STOP_TIMEOUT."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


@contextlib.asynccontextmanager
async def server_process(
    name: str,
    argv: Sequence[str],
    *,
    env: BenchEnv,
    ready: Callable[[], Awaitable[bool]],
    extra_env: dict[str, str],
    under_test: bool = True,
) -> AsyncIterator[None]:
    """Run a server subprocess from ``ready()`` being true to the end of the block (error, Ctrl-C too).

    ``under_test``: the set-up measures this server (pinned to the server core, its CPU time counted); else it is
    auxiliary (a backend) and runs beside the load generator."""
    log_path = env.work / f"{name}.log"
    with log_path.open("wb") as log:
        # Own session: a terminal Ctrl-C reaches only the bench, which then stops the group itself.
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **extra_env},
            start_new_session=True,
        )
        env.placement.track(proc.pid, under_test=under_test)
        try:
            deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
            while not await ready():
                if proc.returncode is not None:
                    raise _failure(name, f"exited with status {proc.returncode}", log_path)
                if asyncio.get_running_loop().time() > deadline:
                    raise _failure(name, f"not ready after {READY_TIMEOUT:.0f}s", log_path)
                await asyncio.sleep(0.05)  # polling a foreign process: there is nothing to wait on instead
            env.placement.place()  # again: worker processes and threads started since spawning
            yield
        finally:
            env.placement.untrack(proc.pid)
            await _stop(proc)


def probe(url: str, ssl_ctx: ssl.SSLContext | None) -> Callable[[], Awaitable[bool]]:
    """A readiness check: ``GET url`` answers 200 (``ssl_ctx`` None for plain HTTP)."""

    async def check() -> bool:
        timeout = aiohttp.ClientTimeout(total=2)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url, ssl=ssl_ctx if ssl_ctx is not None else False) as response,
            ):
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    return check


def start_backend(env: BenchEnv) -> AbstractAsyncContextManager[None]:
    """The shared backend, raw: ``--no-verify`` (module docstring) -- never a way to run it outside the bench."""
    argv = [
        sys.executable,
        "-m",
        "broker.dev.demo.expense",
        "--listen",
        env.backend_url.removeprefix("https://"),
    ]
    argv += ["--certs", str(env.certs), "--db", str(env.work / "expense.db"), "--no-verify"]
    ready = probe(env.backend_url + "/healthz", env.probe_ssl)
    return server_process("backend", argv, env=env, ready=ready, extra_env={}, under_test=False)


def start_bare(env: BenchEnv, port: int) -> AbstractAsyncContextManager[None]:
    argv = [sys.executable, "-m", "broker.dev.bench.bareproxy", "--listen", f"127.0.0.1:{port}"]
    argv += ["--certs", str(env.certs), "--route", f"listInvoices={env.backend_url}/invoices"]
    ready = probe(f"https://127.0.0.1:{port}/healthz", env.probe_ssl)
    return server_process("bare", argv, env=env, ready=ready, extra_env={})


class IdentityRequests:
    """Per request: the agent's access token and a fresh DPoP proof for ``url`` (what a real agent sends).

    Proofs are signed ahead of the measured window (:meth:`prepare`), so the load generator — which shares the
    cores with the servers — does not spend ~30 µs of ES256 signing per request while the broker is measured;
    if the pool runs dry, proofs are signed live.
    """

    def __init__(
        self,
        env: BenchEnv,
        url: str,
        agent: str = "expense-assistant",
        *,
        body: bytes = LISTINVOICES_BODY,
        headers: dict[str, str] | None = None,
    ) -> None:
        dpop_jwk = json.loads((env.certs / "agents" / f"{agent}-dpop.jwk").read_text())
        self.url = url
        self.body = body
        self.headers = headers or {}
        self.signer = DpopSigner(dpop_jwk)
        self.token = mint_access_token(
            json.loads((env.certs / "idp.jwk").read_text()),
            sub="alice",
            now=time.time(),
            ttl=3600,
            act_sub=f"spiffe://example.org/agents/{agent}",
            cnf_jkt=self.signer.jkt,
            claims={"groups": ["finance-managers"], "department": "42", "approval_limit": 20000},
        )
        self.authorization = f"DPoP {self.token}"
        self.pool: list[str] = []

    def prepare(self, count: int) -> None:
        self.pool = [self.signer.proof("POST", self.url, access_token=self.token) for _ in range(count)]

    def __call__(self) -> tuple[dict[str, str], bytes]:
        proof = self.pool.pop() if self.pool else self.signer.proof("POST", self.url, access_token=self.token)
        headers = {"Content-Type": "application/json", "Authorization": self.authorization, "DPoP": proof}
        return {**headers, **self.headers}, self.body


#: proofs signed ahead per second of load (above any rate one worker reaches here)
PROOFS_PER_SECOND = 4000
#: txn tokens obtained ahead (by real exchanges) per second of load for the invoke-with-txn-token set-up
TXN_TOKENS_PER_SECOND = 1200
APPROVE_ARGUMENTS = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}


def exchange_form(token: str, tool: str, arguments: dict[str, Any]) -> bytes:
    """The RFC 8693 form of a txn-token exchange (CONTRACT §5)."""
    return urlencode(
        {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "requested_token_type": "urn:ietf:params:oauth:token-type:txn_token",
            "audience": "example.org",
            "subject_token": token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "scope": f"tool:{tool}",
            "request_details": json.dumps({"tool": tool, "arguments": arguments}),
        }
    ).encode()


class ExchangeRequests(IdentityRequests):
    """Per request: ``POST /v1/token`` exchanging the agent's token for a txn token (approveExpense, 4800)."""

    def __init__(self, env: BenchEnv, base: str) -> None:
        super().__init__(
            env, base + "/v1/token", headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        self.body = exchange_form(self.token, "approveExpense", APPROVE_ARGUMENTS)


class TxnInvocations(IdentityRequests):
    """Per request: approveExpense presenting a txn token that a real exchange issued before the measured window
    (:meth:`prepare_live`), so what is measured is the invocation: verification, binding, single use, forward."""

    def __init__(self, env: BenchEnv, base: str) -> None:
        super().__init__(env, base + "/v1/tools/approveExpense", body=json.dumps(APPROVE_ARGUMENTS).encode())
        self.exchange = ExchangeRequests(env, base)
        self.exchange.signer, self.exchange.token = self.signer, self.token  # one agent key, one access token
        self.exchange.authorization = self.authorization
        self.exchange.body = exchange_form(self.token, "approveExpense", APPROVE_ARGUMENTS)
        self.txns: list[str] = []

    async def prepare_live(self, count: int, ssl_ctx: ssl.SSLContext) -> None:
        connector = aiohttp.TCPConnector(ssl=ssl_ctx, limit=32)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> str | None:
                headers, body = self.exchange()
                async with session.post(self.exchange.url, data=body, headers=headers) as resp:
                    return str((await resp.json())["access_token"]) if resp.status == 200 else None

            self.txns = [t for t in await asyncio.gather(*(one() for _ in range(count))) if t]

    def __call__(self) -> tuple[dict[str, str], bytes]:
        headers, body = super().__call__()
        if self.txns:  # dry: the call goes without one and is refused (counted as an error)
            headers["Txn-Token"] = self.txns.pop()
        return headers, body


def broker_env(env: BenchEnv, port: int, admin_port: int, state: str) -> dict[str, str]:
    """The expense.yaml variables of a broker on these ports, in front of the bench's backends."""
    return {
        "BROKER_STATE": state,
        "BROKER_REDIS_URL": os.environ.get("BROKER_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "BROKER_CERTS": str(env.certs),
        "BROKER_LISTEN": f"127.0.0.1:{port}",
        "BROKER_PUBLIC_URL": f"https://127.0.0.1:{port}",
        "BROKER_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "EXPENSE_UPSTREAM": env.backend_url,
        "EXPENSE_MCP_UPSTREAM": env.mcp_url,
        "BROKER_AUDIT_FILE": str(env.work / "audit.jsonl"),
    }


def start_broker(
    env: BenchEnv,
    port: int,
    admin_port: int,
    *,
    name: str = "broker",
    state: str = "memory",
    workers: int = 1,
    config: Path | None = None,
) -> AbstractAsyncContextManager[None]:
    overrides = broker_env(env, port, admin_port, state)
    argv = [
        sys.executable,
        "-m",
        "broker",
        "run",
        "-c",
        str(config or env.broker_config),
        "--workers",
        str(workers),
    ]
    ready = probe(f"http://127.0.0.1:{admin_port}/readyz", None)
    return server_process(name, argv, env=env, ready=ready, extra_env=overrides)


def config_variant(env: BenchEnv, name: str, change: Callable[[dict[str, Any]], None]) -> Path:
    """The broker config with ``change`` applied, written beside the bench's other files."""
    document = yaml.safe_load(env.broker_config.read_text())
    change(document)
    path = env.work / f"expense-bench-{name}.yaml"
    # relative paths in the shipped config are relative to its folder: keep them pointing there
    root = env.broker_config.resolve().parents[1].parent
    path.write_text(yaml.safe_dump(document, sort_keys=False).replace("../../", f"{root}/"))
    return path


def without_velocity_limit(env: BenchEnv) -> Path:
    """The broker config with the ``velocity`` rule never firing, for the invoke-with-txn-token set-up.

    Counters are exact (CONTRACT §12): the sixth approveExpense execution of one subject within 10 minutes needs a
    security review, so thousands of invocations of one subject would measure refusals. The counter itself stays
    (every invocation still reserves its place in ``approvals_10m``): only its rule is switched off."""

    def change(document: dict[str, Any]) -> None:
        for rule in document.get("policies", []):
            if rule.get("id") == "velocity":
                rule["when"] = "false"

    return config_variant(env, "no-velocity", change)


def without_filters(env: BenchEnv) -> Path:
    """The broker config with listInvoices carrying no response filters and no injected arguments: the
    ``broker-identity`` set-up, i.e. identity checks, policy, the edge txn token every forward carries (CONTRACT
    §5: a backend always gets one), audit and the forward — what every tool pays, whatever its filters."""

    def change(document: dict[str, Any]) -> None:
        for tool in document["tools"]:
            if tool["name"] == "listInvoices":
                tool.pop("response", None)
                tool.pop("inject", None)

    return config_variant(env, "identity", change)


def without_fsync(env: BenchEnv) -> Path:
    """The broker config with ``audit.fsync: false``: what group commit costs (CONTRACT §15) is the ratio of the
    ``broker`` set-up (fsync on, the default) to this one."""
    return config_variant(env, "no-fsync", lambda document: document["audit"].update(fsync=False))


#: the server the broker-postgres set-up creates its database on (a maintenance database URL)
BENCH_PG_URL = os.environ.get("BROKER_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.asynccontextmanager
async def start_postgres_broker(env: BenchEnv, port: int, admin_port: int) -> AsyncIterator[None]:
    """The ``broker`` set-up writing its audit chain to a fresh PostgreSQL database (dropped after)."""
    import psycopg  # the PostgreSQL store's own dependency

    name = f"broker_bench_{os.getpid()}_{port}"
    try:
        admin = await psycopg.AsyncConnection.connect(BENCH_PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        raise SetupFailed(f"broker-postgres: no PostgreSQL at {BENCH_PG_URL.split('@')[-1]}: {exc}") from exc
    async with admin:
        await admin.execute(f"CREATE DATABASE {name}".encode())
        try:
            url = BENCH_PG_URL.rsplit("/", 1)[0] + "/" + name

            def change(document: dict[str, Any]) -> None:
                document["audit"].pop("file", None)
                document["audit"]["store"] = url

            config = config_variant(env, "postgres", change)
            async with start_broker(env, port, admin_port, name="broker-postgres", config=config):
                yield
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())


def mcp_plain() -> tuple[dict[str, str], bytes]:
    return {"Content-Type": "application/json", **MCP_HEADERS}, MCP_CALL_BODY


def start_mcp_server(env: BenchEnv, *, under_test: bool = True) -> AbstractAsyncContextManager[None]:
    """The demo MCP server as PERF.md measured its peer: stateless, JSON responses (needs the ``demo`` extra)."""
    listen = env.mcp_url.removeprefix("https://").removesuffix("/mcp")
    argv = [sys.executable, "-m", "broker.dev.demo.mcp_server", "--listen", listen]
    argv += [
        "--certs",
        str(env.certs),
        "--db",
        str(env.work / "expense.db"),
        "--stateless",
        "--json-response",
    ]
    ready = probe(env.mcp_url.removesuffix("/mcp") + "/healthz", env.probe_ssl)
    return server_process("mcp-server", argv, env=env, ready=ready, extra_env={}, under_test=under_test)


@contextlib.asynccontextmanager
async def start_mcp_broker(env: BenchEnv, port: int, admin_port: int) -> AsyncIterator[None]:
    async with (
        start_mcp_server(env, under_test=False),
        start_broker(env, port, admin_port, name="mcp-broker"),
    ):
        yield


def build_setups(env: BenchEnv) -> list[Setup]:
    """All known set-ups, in report order. Ports are picked now, servers start only when a set-up runs."""
    bare_port, broker_port, admin_port = free_port(), free_port(), free_port()
    redis_port, redis_admin = free_port(), free_port()
    two_port, two_admin = free_port(), free_port()
    mcp_port, mcp_admin = free_port(), free_port()
    ex_port, ex_admin = free_port(), free_port()
    txn_port, txn_admin = free_port(), free_port()
    nofsync_port, nofsync_admin = free_port(), free_port()
    pg_port, pg_admin = free_port(), free_port()
    id_port, id_admin = free_port(), free_port()
    id_url = f"https://127.0.0.1:{id_port}/v1/tools/listInvoices"
    pg_url = f"https://127.0.0.1:{pg_port}/v1/tools/listInvoices"
    mcp_url = f"https://127.0.0.1:{mcp_port}/mcp/expenses"
    two_url = f"https://127.0.0.1:{two_port}/v1/tools/listInvoices"
    broker_url = f"https://127.0.0.1:{broker_port}/v1/tools/listInvoices"
    redis_url = f"https://127.0.0.1:{redis_port}/v1/tools/listInvoices"
    nofsync_url = f"https://127.0.0.1:{nofsync_port}/v1/tools/listInvoices"
    return [
        Setup("backend", env.backend_url + "/invoices", plain_json, contextlib.nullcontext),
        Setup(
            "bare",
            f"https://127.0.0.1:{bare_port}/v1/tools/listInvoices",
            plain_json,
            lambda: start_bare(env, bare_port),
        ),
        Setup(
            "broker",
            broker_url,
            IdentityRequests(env, broker_url),
            lambda: start_broker(env, broker_port, admin_port),
        ),
        Setup(
            "broker-identity",
            id_url,
            IdentityRequests(env, id_url),
            lambda: start_broker(env, id_port, id_admin, name="broker-identity", config=without_filters(env)),
        ),
        Setup(
            "broker-no-fsync",
            nofsync_url,
            IdentityRequests(env, nofsync_url),
            lambda: start_broker(
                env, nofsync_port, nofsync_admin, name="broker-no-fsync", config=without_fsync(env)
            ),
        ),
        Setup(
            "broker-postgres",
            pg_url,
            IdentityRequests(env, pg_url),
            lambda: start_postgres_broker(env, pg_port, pg_admin),
        ),
        Setup(
            "broker-redis",
            redis_url,
            IdentityRequests(env, redis_url),
            lambda: start_broker(env, redis_port, redis_admin, name="broker-redis", state="redis"),
        ),
        Setup(
            "broker-redis-2w",
            two_url,
            IdentityRequests(env, two_url),
            lambda: start_broker(env, two_port, two_admin, name="broker-redis-2w", state="redis", workers=2),
        ),
        Setup(
            "broker-exchange",
            f"https://127.0.0.1:{ex_port}/v1/token",
            ExchangeRequests(env, f"https://127.0.0.1:{ex_port}"),
            lambda: start_broker(env, ex_port, ex_admin, name="broker-exchange"),
        ),
        Setup(
            "broker-txn-invoke",
            f"https://127.0.0.1:{txn_port}/v1/tools/approveExpense",
            TxnInvocations(env, f"https://127.0.0.1:{txn_port}"),
            lambda: start_broker(
                env, txn_port, txn_admin, name="broker-txn-invoke", config=without_velocity_limit(env)
            ),
        ),
        Setup("mcp-direct", env.mcp_url, mcp_plain, lambda: start_mcp_server(env)),
        Setup(
            "mcp-broker",
            mcp_url,
            IdentityRequests(env, mcp_url, body=MCP_CALL_BODY, headers=MCP_HEADERS),
            lambda: start_mcp_broker(env, mcp_port, mcp_admin),
        ),
    ]


# --- running and reporting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One load run of a set-up: the load generator's result and the server's own CPU time over the window."""

    result: Result
    pinned: bool  #: server on the server core, everything else on the others
    cpu_us_per_request: float | None  #: server CPU µs (user + system, all its processes) per answered request
    server_cpu_util: float | None  #: server CPU seconds per wall second in the window (1.0 = one core busy)
    server_cpu_steal: float | None  #: share of the server's cores' time the hypervisor gave to others
    loadavg_1m: float  #: the machine's 1-minute load average at the end of the window

    @property
    def rps(self) -> float:
        return self.result.rps

    def as_json(self) -> dict[str, Any]:
        def rounded(value: float | None, digits: int) -> float | None:
            return None if value is None else round(value, digits)

        return {
            **self.result.as_json(),
            "pinned": self.pinned,
            "cpu_us_per_request": rounded(self.cpu_us_per_request, 1),
            "server_cpu_util": rounded(self.server_cpu_util, 3),
            "server_cpu_steal": rounded(self.server_cpu_steal, 3),
            "loadavg_1m": round(self.loadavg_1m, 2),
        }


@dataclass(frozen=True)
class Run:
    """A set-up's figures: ``main`` (pinned unless ``--no-pin``) and, with ``--unpinned-too``, ``unpinned``."""

    main: Measured
    unpinned: Measured | None = None


async def measure(setup: Setup, args: argparse.Namespace, env: BenchEnv) -> Measured:
    """Load ``setup`` once in the placement's current mode; sample its server's CPU time at the window's ends."""
    samples: dict[str, tuple[float, float, float]] = {}
    cores = env.placement.server_cpus()

    def on_window(edge: str) -> None:
        samples[edge] = (time.perf_counter(), env.placement.cpu_seconds(), cpu.steal_seconds(cores))

    if isinstance(setup.make_request, IdentityRequests):
        setup.make_request.prepare(int(PROOFS_PER_SECOND * (args.duration + args.warmup)))
    if isinstance(setup.make_request, TxnInvocations):
        count = int(TXN_TOKENS_PER_SECOND * (args.duration + args.warmup))
        await setup.make_request.prepare_live(count, env.probe_ssl)
    result = await run_load(
        setup.url,
        concurrency=args.concurrency,
        duration=args.duration,
        make_request=setup.make_request,
        ssl_ctx=env.probe_ssl,
        warmup=args.warmup,
        on_window=on_window,
    )
    cpu_us = util = steal = None
    if "start" in samples and "end" in samples and env.placement.under_test:
        (wall0, cpu0, steal0), (wall1, cpu1, steal1) = samples["start"], samples["end"]
        util = (cpu1 - cpu0) / (wall1 - wall0) if wall1 > wall0 else None
        steal = (steal1 - steal0) / ((wall1 - wall0) * len(cores)) if wall1 > wall0 else None
        answered_per_second = result.answered / args.duration
        if util is not None and answered_per_second > 0:
            cpu_us = util / answered_per_second * 1e6
    return Measured(result, env.placement.pinned, cpu_us, util, steal, os.getloadavg()[0])


async def measure_setup(
    setup: Setup, modes: Sequence[bool], args: argparse.Namespace, env: BenchEnv, round_number: int
) -> Run:
    """Start ``setup``'s servers and load it once per placement mode (pinned, then unpinned with
    ``--unpinned-too``); SetupFailed when its server does not come up."""
    placement = env.placement
    runs: list[Measured] = []
    async with setup.start():
        for pinned in modes:
            where = "pinned" if pinned else "unpinned"
            if args.rounds > 1:
                where += f", round {round_number} of {args.rounds}"
            print(
                f"running {setup.name} for {args.warmup:g}+{args.duration:g}s ({where}) ...",
                file=sys.stderr,
                flush=True,
            )
            placement.pinned = pinned
            if setup.name == "backend":  # the shared backend is the server under test here
                placement.under_test, placement.aux = placement.aux, placement.under_test
            try:
                placement.place()
                runs.append(await measure(setup, args, env))
            finally:
                if setup.name == "backend":
                    placement.under_test, placement.aux = placement.aux, placement.under_test
    return Run(runs[0], runs[1] if len(runs) > 1 else None)


async def run_bench(args: argparse.Namespace, certs: Path, work: Path) -> dict[str, list[Run] | str]:
    """Start the backend, then each selected set-up in turn, ``--rounds`` times over; per set-up its runs (one
    per round) or a failure message."""
    agents = certs / "agents"
    probe_ssl = client_ssl_context(
        certs / "ca.pem", agents / f"{args.agent}.pem", agents / f"{args.agent}-key.pem"
    )
    mcp_url = f"https://127.0.0.1:{free_port()}/mcp"
    placement = Placement(cpu.split_cpus(cpu.available_cpus()), pinned=args.pin)
    if args.pin and placement.split is None:
        print("--pin needs at least 2 cores: running unpinned", file=sys.stderr)
        placement.pinned = False
    args.pin = placement.pinned
    modes = [placement.pinned] + ([False] if placement.pinned and args.unpinned_too else [])
    env = BenchEnv(
        certs,
        work,
        f"https://127.0.0.1:{free_port()}",
        args.broker_config,
        probe_ssl,
        mcp_url,
        placement=placement,
    )
    setups = build_setups(env)
    if args.setups is not None:
        known = [setup.name for setup in setups]
        if unknown := [name for name in args.setups if name not in known]:
            raise SetupFailed(f"unknown set-ups {unknown}; known: {known}")
        setups = [setup for setup in setups if setup.name in args.setups]
    outcomes: dict[str, list[Run] | str] = {}
    # SIGTERM stops the bench like Ctrl-C does: cancel, so every server_process block stops its server.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    async with start_backend(env):
        for round_number in range(1, args.rounds + 1):
            for setup in setups:
                if isinstance(outcomes.get(setup.name), str):
                    continue  # failed in an earlier round
                try:
                    run = await measure_setup(setup, modes, args, env, round_number)
                except SetupFailed as exc:
                    print(exc, file=sys.stderr)
                    outcomes[setup.name] = str(exc)
                else:
                    done = outcomes.setdefault(setup.name, [])
                    assert not isinstance(done, str)
                    done.append(run)
                placement.pinned = modes[0]
    return outcomes


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def median_run(runs: Sequence[Run]) -> Run:
    """The run of median server CPU per request (by rps where CPU was not measured): a real run, whose figures
    belong together, rather than a mix of medians."""

    def cost(run: Run) -> float:
        cpu_us = run.main.cpu_us_per_request
        return cpu_us if cpu_us is not None else -run.main.rps

    return sorted(runs, key=cost)[(len(runs) - 1) // 2]


def ratios(rows: Mapping[str, Measured]) -> dict[str, float]:
    """Each set-up's rps over bare's, and the named pairs' (``mcp-broker/mcp-direct``, ``broker-postgres/broker``)."""
    found: dict[str, float] = {}
    bare = rows.get("bare")
    if bare is not None and bare.rps > 0:
        found.update({f"{name}/bare": round(row.rps / bare.rps, 3) for name, row in rows.items()})
        found.pop("bare/bare")
    pairs = [("mcp-broker", "mcp-direct"), ("broker-postgres", "broker")]
    for over, under in pairs:
        if over in rows and under in rows and rows[under].rps > 0:
            found[f"{over}/{under}"] = round(rows[over].rps / rows[under].rps, 3)
    return found


def cpu_ratios(rows: Mapping[str, Measured]) -> dict[str, float]:
    """Bare's CPU µs per request over each set-up's: what one core of each serves."""
    bare = rows.get("bare")
    bare_cpu = bare.cpu_us_per_request if bare is not None else None
    if not bare_cpu:
        return {}
    return {
        f"{name}/bare": round(bare_cpu / row.cpu_us_per_request, 3)
        for name, row in rows.items()
        if name != "bare" and row.cpu_us_per_request
    }


def median_ratios(
    rounds: Sequence[Mapping[str, Measured]], of: Callable[[Mapping[str, Measured]], dict[str, float]]
) -> dict[str, float]:
    """Each ratio taken within a round (its set-ups measured minutes apart, not a whole run apart), then the
    median over the rounds: the machine's drift between rounds cancels out of it."""
    per_round = [of(rows) for rows in rounds]
    keys = dict.fromkeys(key for found in per_round for key in found)
    return {key: statistics.median(found[key] for found in per_round if key in found) for key in keys}


def report(outcomes: Mapping[str, Sequence[Run] | str], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table and return the JSON document (``ratios`` only when ``bare`` ran).

    Each row of ``setups`` holds the main run (pinned by default) with ``cpu_us_per_request``; with
    ``--unpinned-too`` also ``unpinned``, and ``ratios_unpinned`` beside ``ratios``. ``ratios_cpu`` gives, per
    set-up, bare's CPU µs per request over the set-up's: the throughput ratio of one core of each. With
    ``--rounds N`` a row is the set-up's median run (:func:`median_run`), ``rounds`` lists every round's rps and
    CPU µs per request, and each ratio is the median of the ratios within each round (:func:`median_ratios`)."""
    doc: dict[str, Any] = {"setups": {}, "ratios": {}}
    measured = {name: list(runs) for name, runs in outcomes.items() if not isinstance(runs, str)}
    chosen = {name: median_run(runs) for name, runs in measured.items()}
    mains = {name: run.main for name, run in chosen.items()}
    unpinned = {name: run.unpinned for name, run in chosen.items() if run.unpinned}
    count = max((len(runs) for runs in measured.values()), default=0)
    rounds = [
        {name: runs[index].main for name, runs in measured.items() if index < len(runs)}
        for index in range(count)
    ]
    loose_rounds = [
        {
            name: loose
            for name, runs in measured.items()
            if index < len(runs) and (loose := runs[index].unpinned) is not None
        }
        for index in range(count)
    ]

    print(
        f"{'setup':<18} {'rps':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'vs bare':>8} "
        f"{'cpu us/req':>10} {'cpu util':>8} {'steal':>6}"
        + (f" | {'unpinned rps':>12} {'p50':>7} {'p99':>7} {'vs bare':>7} {'us/req':>7}" if unpinned else "")
    )
    doc["ratios"] = median_ratios(rounds, ratios)
    plain = median_ratios(loose_rounds, ratios)
    for name, outcome in outcomes.items():
        if isinstance(outcome, str):
            doc["setups"][name] = {"failed": outcome}
            print(f"{name:<18} FAILED: {outcome.splitlines()[0]}")
            continue
        row, loose = chosen[name].main, chosen[name].unpinned
        doc["setups"][name] = row.as_json()
        if count > 1:
            doc["setups"][name]["rounds"] = [
                {
                    "rps": round(run.main.rps, 1),
                    "cpu_us_per_request": run.main.as_json()["cpu_us_per_request"],
                }
                for run in outcome
            ]
        line = (
            f"{name:<18} {row.rps:>8.1f} {row.result.p50_ms:>8.2f} {row.result.p99_ms:>8.2f} "
            f"{row.result.errors:>7} {_fmt(doc['ratios'].get(f'{name}/bare'), '.2f'):>8} "
            f"{_fmt(row.cpu_us_per_request, '.0f'):>10} {_fmt(row.server_cpu_util, '.2f'):>8} "
            f"{_fmt(row.server_cpu_steal, '.2f'):>6}"
        )
        if loose is not None:
            doc["setups"][name]["unpinned"] = loose.as_json()
            line += (
                f" | {loose.rps:>12.1f} {loose.result.p50_ms:>7.2f} {loose.result.p99_ms:>7.2f} "
                f"{_fmt(plain.get(f'{name}/bare'), '.2f'):>7} {_fmt(loose.cpu_us_per_request, '.0f'):>7}"
            )
        print(line)
    if unpinned:
        doc["ratios_unpinned"] = plain
    if found_cpu := median_ratios(rounds, cpu_ratios):
        doc["ratios_cpu"] = found_cpu
    if "mcp-broker/mcp-direct" in doc["ratios"]:
        print(
            f"mcp-broker / mcp-direct: {doc['ratios']['mcp-broker/mcp-direct']:.2f} (tools/call via /mcp vs direct)"
        )
    if "broker-postgres/broker" in doc["ratios"]:
        ratio = doc["ratios"]["broker-postgres/broker"]
        print(f"broker-postgres / broker: {ratio:.2f} (the PostgreSQL audit store vs the file, fsync on)")
    exchanged, invoked = mains.get("broker-exchange"), mains.get("broker-txn-invoke")
    if exchanged is not None and invoked is not None and exchanged.rps > 0 and invoked.rps > 0:
        # one transaction = one exchange then one invocation, each at its measured rate
        flows = 1 / (1 / exchanged.rps + 1 / invoked.rps)
        doc["flows_per_second"] = {"exchange+invoke": round(flows, 1)}
        print(f"exchange + invoke round trips per second: {flows:.0f}")
    split = cpu.split_cpus(cpu.available_cpus())
    doc["meta"] = {
        "duration": args.duration,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "pinned": args.pin,
        "server_cpus": sorted(split[0]) if args.pin and split else None,
        "load_cpus": sorted(split[1]) if args.pin and split else None,
        "loadavg": [round(value, 2) for value in os.getloadavg()],
    }
    return doc


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_config = Path(__file__).resolve().parents[3] / "config" / "examples" / "expense.yaml"
    parser = argparse.ArgumentParser(
        prog="python -m broker.dev.bench", description="Broker vs bare forwarder benchmark."
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="measured seconds per set-up (default %(default)s)"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds first (default %(default)s)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="connections (default %(default)s)")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="load every set-up this many times, interleaved (round 1: each set-up once, then round 2, ...); "
        "rows are each set-up's median run, ratios the median of the ratios within each round — on a machine "
        "whose speed drifts between minutes, the only ratios worth comparing across commits (default %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("var/bench.json"), help="JSON report (default %(default)s)"
    )
    parser.add_argument("--certs", type=Path, help="§10 PKI folder (default: generate one in a temp folder)")
    parser.add_argument(
        "--agent", default="expense-assistant", help="agent SVID to load with (default %(default)s)"
    )
    parser.add_argument("--setups", help="comma-separated names (default: all, i.e. backend,bare,broker)")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=len(cpu.available_cpus()) >= 2,
        help="server under test on the first core, load generator and backends on the others "
        "(default: on with >= 2 cores)",
    )
    parser.add_argument(
        "--unpinned-too",
        action="store_true",
        help="with --pin: load each set-up unpinned as well, figures beside",
    )
    parser.add_argument(
        "--broker-config", type=Path, default=default_config, help="config for the broker set-up"
    )
    args = parser.parse_args(argv)
    if args.setups is not None:
        args.setups = [name.strip() for name in args.setups.split(",") if name.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        work = Path(tmp)
        certs = args.certs
        if certs is None:
            from broker.dev.pki import generate  # only needed when no PKI was given

            certs = work / "certs"
            generate(certs)
        try:
            outcomes = run_event_loop(run_bench(args, certs.resolve(), work))
        except SetupFailed as exc:  # unknown set-up name, or the backend did not start: nothing to compare
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("interrupted; servers stopped", file=sys.stderr)
            return 130
    doc = report(outcomes, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if any(isinstance(outcome, str) for outcome in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
