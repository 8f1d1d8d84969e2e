"""``python -m broker.dev.bench``: whole-path throughput of the broker against a bare forwarder, in one run.

Set-ups (each server in its own subprocess on 127.0.0.1, ephemeral ports):

- ``backend``: the demo expense backend called directly (``POST /invoices``), i.e. the raw backend;
- ``bare``: :mod:`broker.dev.bench.bareproxy` in front of it (``POST /v1/tools/listInvoices``), the yardstick;
- ``broker``: ``broker run -c config/examples/expense.yaml`` in front of it, every request with the full
  identity checks (mTLS SVID + a fresh DPoP proof + the access token + the replay claim), memory state store;
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
agent SVID. The table and ``--out`` JSON give rps, p50/p99 and each set-up's ratio to ``bare``. The load
generator shares the cores with the servers, so only ratios within one run mean anything (PERF.md).

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
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import yaml

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


@dataclass(frozen=True)
class BenchEnv:
    certs: Path
    work: Path  # scratch folder: DB, audit file, server logs
    backend_url: str
    broker_config: Path
    probe_ssl: ssl.SSLContext  # presents the agent SVID; verifies servers against ca.pem
    mcp_url: str = ""  # the demo MCP server's endpoint (the mcp-* set-ups start it)


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
) -> AsyncIterator[None]:
    """Run a server subprocess from ``ready()`` being true to the end of the block (error, Ctrl-C too)."""
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
        try:
            deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
            while not await ready():
                if proc.returncode is not None:
                    raise _failure(name, f"exited with status {proc.returncode}", log_path)
                if asyncio.get_running_loop().time() > deadline:
                    raise _failure(name, f"not ready after {READY_TIMEOUT:.0f}s", log_path)
                await asyncio.sleep(0.05)  # polling a foreign process: there is nothing to wait on instead
            yield
        finally:
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
    return server_process(
        "backend", argv, env=env, ready=probe(env.backend_url + "/healthz", env.probe_ssl), extra_env={}
    )


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


def without_fsync(env: BenchEnv) -> Path:
    """The broker config with ``audit.fsync: false``: what group commit costs (CONTRACT §15) is the ratio of the
    ``broker`` set-up (fsync on, the default) to this one."""
    return config_variant(env, "no-fsync", lambda document: document["audit"].update(fsync=False))


def mcp_plain() -> tuple[dict[str, str], bytes]:
    return {"Content-Type": "application/json", **MCP_HEADERS}, MCP_CALL_BODY


def start_mcp_server(env: BenchEnv) -> AbstractAsyncContextManager[None]:
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
    return server_process("mcp-server", argv, env=env, ready=ready, extra_env={})


@contextlib.asynccontextmanager
async def start_mcp_broker(env: BenchEnv, port: int, admin_port: int) -> AsyncIterator[None]:
    async with start_mcp_server(env), start_broker(env, port, admin_port, name="mcp-broker"):
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
            "broker-no-fsync",
            nofsync_url,
            IdentityRequests(env, nofsync_url),
            lambda: start_broker(
                env, nofsync_port, nofsync_admin, name="broker-no-fsync", config=without_fsync(env)
            ),
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


async def run_bench(args: argparse.Namespace, certs: Path, work: Path) -> dict[str, Result | str]:
    """Start the backend, then each selected set-up in turn; a result or a failure message per set-up."""
    agents = certs / "agents"
    probe_ssl = client_ssl_context(
        certs / "ca.pem", agents / f"{args.agent}.pem", agents / f"{args.agent}-key.pem"
    )
    mcp_url = f"https://127.0.0.1:{free_port()}/mcp"
    env = BenchEnv(certs, work, f"https://127.0.0.1:{free_port()}", args.broker_config, probe_ssl, mcp_url)
    setups = build_setups(env)
    if args.setups is not None:
        known = [setup.name for setup in setups]
        if unknown := [name for name in args.setups if name not in known]:
            raise SetupFailed(f"unknown set-ups {unknown}; known: {known}")
        setups = [setup for setup in setups if setup.name in args.setups]
    outcomes: dict[str, Result | str] = {}
    # SIGTERM stops the bench like Ctrl-C does: cancel, so every server_process block stops its server.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    async with start_backend(env):
        for setup in setups:
            print(
                f"running {setup.name} for {args.warmup:g}+{args.duration:g}s ...",
                file=sys.stderr,
                flush=True,
            )
            if isinstance(setup.make_request, IdentityRequests):
                setup.make_request.prepare(int(PROOFS_PER_SECOND * (args.duration + args.warmup)))
            try:
                async with setup.start():
                    if isinstance(setup.make_request, TxnInvocations):
                        count = int(TXN_TOKENS_PER_SECOND * (args.duration + args.warmup))
                        await setup.make_request.prepare_live(count, probe_ssl)
                    outcomes[setup.name] = await run_load(
                        setup.url,
                        concurrency=args.concurrency,
                        duration=args.duration,
                        make_request=setup.make_request,
                        ssl_ctx=probe_ssl,
                        warmup=args.warmup,
                    )
            except SetupFailed as exc:
                print(exc, file=sys.stderr)
                outcomes[setup.name] = str(exc)
    return outcomes


def report(outcomes: dict[str, Result | str], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table and return the JSON document (``ratios`` only when ``bare`` ran)."""
    bare = outcomes.get("bare")
    bare_rps = bare.rps if isinstance(bare, Result) and bare.rps > 0 else None
    doc: dict[str, Any] = {"setups": {}, "ratios": {}}
    print(f"{'setup':<10} {'rps':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>8} {'vs bare':>8}")
    for name, outcome in outcomes.items():
        if isinstance(outcome, str):
            doc["setups"][name] = {"failed": outcome}
            print(f"{name:<10} FAILED: {outcome.splitlines()[0]}")
            continue
        doc["setups"][name] = outcome.as_json()
        ratio = outcome.rps / bare_rps if bare_rps else None
        if ratio is not None and name != "bare":
            doc["ratios"][f"{name}/bare"] = round(ratio, 3)
        shown = f"{ratio:.2f}" if ratio is not None else "-"
        print(
            f"{name:<10} {outcome.rps:>10.1f} {outcome.p50_ms:>9.2f} {outcome.p99_ms:>9.2f} "
            f"{outcome.errors:>8} {shown:>8}"
        )
    direct, gated = outcomes.get("mcp-direct"), outcomes.get("mcp-broker")
    if isinstance(direct, Result) and isinstance(gated, Result) and direct.rps > 0:
        doc["ratios"]["mcp-broker/mcp-direct"] = round(gated.rps / direct.rps, 3)
        print(f"mcp-broker / mcp-direct: {gated.rps / direct.rps:.2f} (tools/call through /mcp vs direct)")
    exchanged, invoked = outcomes.get("broker-exchange"), outcomes.get("broker-txn-invoke")
    if (
        isinstance(exchanged, Result)
        and isinstance(invoked, Result)
        and exchanged.rps > 0
        and invoked.rps > 0
    ):
        # one transaction = one exchange then one invocation, each at its measured rate
        flows = 1 / (1 / exchanged.rps + 1 / invoked.rps)
        doc["flows_per_second"] = {"exchange+invoke": round(flows, 1)}
        print(f"exchange + invoke round trips per second: {flows:.0f}")
    doc["meta"] = {
        "duration": args.duration,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return doc


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
        "--out", type=Path, default=Path("var/bench.json"), help="JSON report (default %(default)s)"
    )
    parser.add_argument("--certs", type=Path, help="§10 PKI folder (default: generate one in a temp folder)")
    parser.add_argument(
        "--agent", default="expense-assistant", help="agent SVID to load with (default %(default)s)"
    )
    parser.add_argument("--setups", help="comma-separated names (default: all, i.e. backend,bare,broker)")
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
