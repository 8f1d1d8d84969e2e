"""``python -m broker.dev.bench.connector``: what ``broker connect`` adds to one call on loopback, in ms.

Run by ``make bench`` after the whole-path set-ups; the figures are merged into ``var/bench.json`` under
``connector`` (the other keys are left as they are). One broker (``config/examples/expense.yaml``, audit fsync off:
the disk's latency is the broker's, not the connector's, and its noise would hide what is measured) in front of the
bench's backend, and one ``broker connect`` subprocess (its own process and event loop, as it runs beside an agent)
with a ``--token-file`` and a ``--local-token`` (local clients send it as a bearer token, the default set-up). Then
``--calls`` sequential ``listInvoices`` calls each way, interleaved so that both see the same machine: direct with
:class:`broker.sdk.agent.AgentClient` (mTLS + DPoP from this process), and plain HTTP to the connector, which adds
both. Reported: p50/p99 of each, and the added ms (p50 and p99 differences).

Latency on a shared machine is the machine's as much as the code's: the 1-minute load average is recorded beside
the figures; compare runs only at a similar load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from broker.dev.bench.__main__ import (
    READY_TIMEOUT,
    BenchEnv,
    SetupFailed,
    free_port,
    start_backend,
    start_broker,
    without_fsync,
)
from broker.dev.bench.loadgen import client_ssl_context
from broker.dev.demo.expense import run_event_loop
from broker.dev.idp import mint_access_token
from broker.sdk.agent import AgentClient, DpopSigner

AGENT = "expense-assistant"
TOOL = "listInvoices"
ARGUMENTS = {"department": "42"}
WARMUP_CALLS = 20


def alice_token(certs: Path) -> str:
    """alice (finance-managers, department 42) acting through the agent, bound to the agent's DPoP key."""
    signer = DpopSigner(json.loads((certs / "agents" / f"{AGENT}-dpop.jwk").read_text()))
    return mint_access_token(
        json.loads((certs / "idp.jwk").read_text()),
        sub="alice",
        now=time.time(),
        ttl=3600,
        act_sub=f"spiffe://example.org/agents/{AGENT}",
        cnf_jkt=signer.jkt,
        claims={"groups": ["finance-managers"], "department": "42", "approval_limit": 20000},
    )


@contextlib.asynccontextmanager
async def connect_process(
    broker_url: str, certs: Path, token_file: Path, local_token: Path, log: Path
) -> AsyncIterator[str]:
    """``broker connect`` on 127.0.0.1:0 from its announcement line to the end of the block; yields its URL."""
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "broker", "connect", "--broker", broker_url, "--certs", str(certs)),
            *("--agent", AGENT, "--token-file", str(token_file), "--local-token", str(local_token)),
            *("--listen", "127.0.0.1:0"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    try:
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                first = (await proc.stdout.readline()).decode()
        except TimeoutError:
            first = ""
        if not first.startswith("broker connect: serving http://"):
            tail = log.read_bytes().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]  # noqa: ASYNC240
            raise SetupFailed(f"broker connect did not start: {tail[0]}")
        yield first.split()[3]
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


def summary(seconds: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return {"p50_ms": round(statistics.median(seconds) * 1e3, 3), "p99_ms": round(cuts[98] * 1e3, 3)}


async def measure(args: argparse.Namespace, certs: Path, work: Path) -> dict[str, Any]:
    agents = certs / "agents"
    probe_ssl = client_ssl_context(certs / "ca.pem", agents / f"{AGENT}.pem", agents / f"{AGENT}-key.pem")
    env = BenchEnv(certs, work, f"https://127.0.0.1:{free_port()}", args.broker_config, probe_ssl)
    port, admin_port = free_port(), free_port()
    broker_url = f"https://127.0.0.1:{port}"
    token = alice_token(certs)
    token_file = work / "token.jwt"
    local_token = work / "connect.token"
    secret = secrets.token_urlsafe(32)
    for path, text in ((token_file, token), (local_token, secret)):
        path.touch(mode=0o600)  # broker connect refuses secret files that group or others can read
        path.write_text(text + "\n")
    local_auth = {"Authorization": f"Bearer {secret}"}  # the default: local clients present the local secret
    direct: list[float] = []
    proxied: list[float] = []
    async with (
        start_backend(env),
        start_broker(env, port, admin_port, name="broker-connector", config=without_fsync(env)),
        connect_process(broker_url, certs, token_file, local_token, work / "connect.log") as local,
        AgentClient.from_certs(broker_url, certs, agent=AGENT, access_token=token) as agent,
        aiohttp.ClientSession() as http,
    ):

        async def via_agent() -> float:
            started = time.perf_counter()
            reply = await agent.call_tool(TOOL, ARGUMENTS)
            elapsed = time.perf_counter() - started
            if reply.status != 200:
                raise SetupFailed(f"direct call answered {reply.status}: {reply.body!r}"[:300])
            return elapsed

        async def via_connector() -> float:
            started = time.perf_counter()
            async with http.post(f"{local}/v1/tools/{TOOL}", json=ARGUMENTS, headers=local_auth) as reply:
                body = await reply.read()
            elapsed = time.perf_counter() - started
            if reply.status != 200:
                raise SetupFailed(f"call through broker connect answered {reply.status}: {body[:200]!r}")
            return elapsed

        for _ in range(WARMUP_CALLS):  # connections, caches, the token file read
            await via_agent()
            await via_connector()
        for _ in range(args.calls):  # interleaved: both paths see the same moments of a shared machine
            direct.append(await via_agent())
            proxied.append(await via_connector())
    one, two = summary(direct), summary(proxied)
    return {
        "calls": args.calls,
        "direct": one,
        "via_connector": two,
        "added_p50_ms": round(two["p50_ms"] - one["p50_ms"], 3),
        "added_p99_ms": round(two["p99_ms"] - one["p99_ms"], 3),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    default_config = Path(__file__).resolve().parents[3] / "config" / "examples" / "expense.yaml"
    parser = argparse.ArgumentParser(
        prog="python -m broker.dev.bench.connector",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("var/bench.json"),
        help="merged under 'connector' (default %(default)s)",
    )
    parser.add_argument(
        "--calls", type=int, default=200, help="measured calls each way, interleaved (default %(default)s)"
    )
    parser.add_argument("--certs", type=Path, help="§10 PKI folder (default: generate one in a temp folder)")
    parser.add_argument(
        "--broker-config",
        type=Path,
        default=default_config,
        help="config for the broker (default: expense.yaml)",
    )
    args = parser.parse_args(argv)
    if args.calls < 2:
        parser.error("--calls must be at least 2")
    with tempfile.TemporaryDirectory(prefix="broker-bench-connector-") as tmp:
        work = Path(tmp)
        certs = args.certs
        if certs is None:
            from broker.dev.pki import generate

            certs = work / "certs"
            generate(certs)
        try:
            result = run_event_loop(measure(args, certs.resolve(), work))
        except SetupFailed as exc:
            print(f"connector bench failed: {exc}", file=sys.stderr)
            return 1
    one, two = result["direct"], result["via_connector"]
    print(
        f"broker connect on loopback, {result['calls']} calls each way: "
        f"direct p50 {one['p50_ms']:.2f} ms / p99 {one['p99_ms']:.2f} ms, "
        f"via connector p50 {two['p50_ms']:.2f} ms / p99 {two['p99_ms']:.2f} ms, "
        f"added p50 {result['added_p50_ms']:.2f} ms "
        f"(load average {result['loadavg_1m']} on {result['cpu_count']} cores)"
    )
    document: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    document["connector"] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
