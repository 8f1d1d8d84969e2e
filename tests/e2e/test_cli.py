"""The command line as a user runs it: subprocesses, real files, real sockets, the real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from broker.config.loader import load_config
from broker.runtime import build_runtime
from tests.certfactory import Pki, client_ssl_context
from tests.conftest import RecordingUpstream, base_config
from tests.dpopfactory import make_proof
from tests.redisutil import REDIS_URL, redis_stores, throwaway_redis
from tests.tokenfactory import make_token

ROOT = Path(__file__).resolve().parents[2]
BROKER = [sys.executable, "-m", "broker"]
READY_WITHIN = 30.0
pytestmark = pytest.mark.slow


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BROKER, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CONFIGS = sorted(
    p.relative_to(ROOT)
    for p in (ROOT / "config").rglob("*.yaml")
    if not p.name.endswith(
        (".policy-tests.yaml", ".principals.yaml")
    )  # inputs of `policy test`, `access-review`
)
FIXTURES = sorted(p.relative_to(ROOT) for p in (ROOT / "config").rglob("*.policy-tests.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_every_shipped_config_loads_and_compiles(path: Path, pki: Pki) -> None:
    env = {**os.environ, "BROKER_CERTS": str(pki.root)}
    loaded = load_config(ROOT / path, environ=env)
    build_runtime(loaded)
    result = run_cli("check", "-c", str(path), env={"BROKER_CERTS": str(pki.root)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {path}: policy_version ")


@pytest.mark.parametrize("fixture", FIXTURES, ids=str)
def test_shipped_policy_fixtures_pass(fixture: Path) -> None:
    config = fixture.with_name(fixture.name.replace(".policy-tests", ""))
    result = run_cli("policy", "test", str(fixture), "-c", str(config))
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip().endswith(" passed, 0 failed")


def test_policy_test_reports_a_mismatch_with_its_line(tmp_path: Path) -> None:
    fixture = tmp_path / "f.yaml"
    fixture.write_text(
        "cases:\n"
        "  - name: bob cannot approve\n"
        "    subject: {sub: bob, groups: [engineers], department: '42'}\n"
        "    actor: spiffe://example.org/agents/expense-assistant\n"
        "    tool: approveExpense\n"
        "    expect: {decision: allow}\n"
    )
    result = run_cli("policy", "test", str(fixture), "-c", "config/examples/expense.yaml")
    assert result.returncode == 1
    assert f"{fixture}:2: bob cannot approve: expected decision allow, got hidden" in result.stdout


def test_check_lists_every_problem_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\n"
        "server:\n"
        "  listen: nowhere\n"
        "  public_url: https://localhost:8443\n"
        "  tls: {cert: a.pem, key: b.pem, client_ca: c.pem}\n"
        "identity:\n"
        "  trust_domain: example.org\n"
        "  audience: x\n"
        "  proof: dpopp\n"
        "signing: {key_file: k.jwk}\n"
        "audit: {file: a.jsonl}\n"
        "tools:\n"
        "  - name: t\n"
        "    upstream: {url: 'https://x/'}\n"
        "    alow: true\n"
    )
    result = run_cli("check", "-c", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert f"{bad}:3: server.listen: expected host:port, got 'nowhere'" in lines
    assert f"{bad}:9: identity.proof: Input should be 'dpop', 'mtls' or 'either'" in lines
    assert f"{bad}:15: tools[0].alow: unknown key" in lines


def test_certs_writes_the_contract_layout(tmp_path: Path) -> None:
    result = run_cli("certs", "--out", str(tmp_path / "pki"), "--agent", "bot-a", "--human", "hank")
    assert result.returncode == 0, result.stderr
    names = sorted(str(p.relative_to(tmp_path / "pki")) for p in (tmp_path / "pki").rglob("*") if p.is_file())
    assert "agents/bot-a.pem" in names and "humans/hank-dpop.jwk" in names and "broker-signing.jwk" in names
    assert (tmp_path / "pki" / "ca-key.pem").stat().st_mode & 0o777 == 0o600


def test_token_command_mints_a_bound_token(pki: Pki) -> None:
    result = run_cli(
        "token",
        "--certs",
        str(pki.root),
        "--sub",
        "alice",
        "--agent",
        "expense-assistant",
        "--claim",
        "department=42",
        "--claim-json",
        "approval_limit=20000",
    )
    assert result.returncode == 0, result.stderr
    import jwt

    claims = jwt.decode(result.stdout.strip(), options={"verify_signature": False})
    assert (claims["sub"], claims["department"], claims["approval_limit"]) == ("alice", "42", 20000)
    assert claims["act"] == {"sub": pki.agent_id("expense-assistant")}


def test_workers_with_memory_store_are_refused(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "c.yaml"
    config = base_config(pki, tmp_path, upstream_url="https://127.0.0.1:1")
    config["server"]["listen"] = "127.0.0.1:18443"
    path.write_text(yaml.safe_dump(config))
    result = run_cli("run", "-c", str(path), "--workers", "2")
    assert result.returncode == 2
    assert "needs state.backend: redis" in result.stderr


# --- running brokers ------------------------------------------------------------------------------------------


@contextmanager
def broker_process(
    config: dict[str, Any], tmp_path: Path, name: str, *extra: str
) -> Iterator[dict[str, Any]]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / f"{name}.log").open("w")
    proc = subprocess.Popen([*BROKER, "run", "-c", str(path), *extra], stdout=log, stderr=log, cwd=ROOT)
    try:
        yield {"proc": proc, "log": tmp_path / f"{name}.log"}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


async def wait_ready(admin: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_WITHIN
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                async with s.get(f"{admin}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)  # readiness poll interval, bounded by the deadline
    pytest.fail(f"broker not ready: {log.read_text()[-2000:]}")


def redis_config(pki: Pki, tmp_path: Path, upstream: str, redis_url: str, prefix: str) -> dict[str, Any]:
    config = base_config(pki, tmp_path, upstream_url=upstream)
    config["server"]["listen"] = f"127.0.0.1:{free_port()}"
    config["server"]["admin_listen"] = f"127.0.0.1:{free_port()}"
    config["state"] = {"backend": "redis", "redis_url": redis_url, "key_prefix": prefix, "timeout_ms": 500}
    return config


class Agent:
    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        files = pki.agent("expense-assistant")
        self.dpop = json.loads(files.dpop_jwk.read_text())
        from broker.jose import jwk_thumbprint

        idp = json.loads(pki.idp_jwk.read_text())
        self.token = make_token(
            idp,
            claims={
                "cnf": {"jkt": jwk_thumbprint(self.dpop)},
                "act": {"sub": pki.agent_id("expense-assistant")},
                "client_id": pki.agent_id("expense-assistant"),
            },
            now=int(time.time()),
        )
        self.ssl = client_ssl_context(pki, files.cert, files.key)

    def headers(self, path: str) -> dict[str, str]:
        from broker.identity.dpop import ath_for

        proof = make_proof(
            self.dpop,
            htm="POST",
            htu="https://localhost:8443" + path,
            iat=int(time.time()),
            ath=ath_for(self.token),
        )
        return {"Authorization": f"DPoP {self.token}", "DPoP": proof}

    async def post(self, url: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl, force_close=True)) as s,
            s.post(url + path, json={"invoice_id": "INV-1", "amount": 1}, headers=headers) as resp,
        ):
            return resp.status, await resp.json()


@asynccontextmanager
async def two_brokers(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream, redis_url: str, prefix: str
) -> AsyncIterator[list[dict[str, Any]]]:
    configs = [redis_config(pki, tmp_path, upstream.url, redis_url, prefix) for _ in range(2)]
    for i, config in enumerate(configs):
        config["audit"]["file"] = str(tmp_path / f"audit-{i}.jsonl")
    with broker_process(configs[0], tmp_path, "a") as a, broker_process(configs[1], tmp_path, "b") as b:
        brokers = []
        for config, proc in ((configs[0], a), (configs[1], b)):
            await wait_ready(f"http://{config['server']['admin_listen']}", proc["proc"], proc["log"])
            brokers.append({"url": f"https://{config['server']['listen']}", **proc})
        yield brokers


@pytest.mark.redis
async def test_a_proof_replayed_on_another_broker_process_is_refused(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    async with (
        redis_stores() as stores,
        two_brokers(pki, tmp_path, upstream, REDIS_URL, stores.prefix) as brokers,
    ):
        agent = Agent(pki)
        path = "/v1/tools/approveExpense"
        headers = agent.headers(path)
        first = await agent.post(brokers[0]["url"], path, headers)
        second = await agent.post(brokers[1]["url"], path, headers)
    assert first[0] == 200
    assert (second[0], second[1]["error"]) == (401, "invalid_dpop_proof")
    assert len(upstream.received) == 1


@pytest.mark.redis
async def test_redis_outage_fails_closed_and_recovers(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    async with throwaway_redis() as redis:
        config = redis_config(pki, tmp_path, upstream.url, redis.url, "outage:")
        admin = f"http://{config['server']['admin_listen']}"
        with broker_process(config, tmp_path, "outage") as proc:
            await wait_ready(admin, proc["proc"], proc["log"])
            url, path, agent = f"https://{config['server']['listen']}", "/v1/tools/approveExpense", Agent(pki)
            assert (await agent.post(url, path, agent.headers(path)))[0] == 200
            await redis.kill()
            status, body = await agent.post(url, path, agent.headers(path))
            assert (status, body["error"]) == (503, "state_unavailable")
            async with aiohttp.ClientSession() as s, s.get(f"{admin}/readyz") as resp:
                assert resp.status == 503
            await redis.start()
            assert (await agent.post(url, path, agent.headers(path)))[0] == 200
    assert len(upstream.received) == 2


@pytest.mark.redis
async def test_two_workers_share_one_port_and_replay_state(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    async with redis_stores() as stores:
        config = redis_config(pki, tmp_path, upstream.url, REDIS_URL, stores.prefix)
        admin = f"http://{config['server']['admin_listen']}"
        audit = [tmp_path / "audit.w0.jsonl", tmp_path / "audit.w1.jsonl"]
        with broker_process(config, tmp_path, "workers", "--workers", "2") as proc:
            await wait_ready(admin, proc["proc"], proc["log"])
            # /readyz answered for one worker; each worker writes its config_load record when it is up
            deadline = time.monotonic() + READY_WITHIN
            while not all(p.exists() for p in audit) and time.monotonic() < deadline:  # noqa: ASYNC110 (another process)
                await asyncio.sleep(0.05)  # readiness poll, bounded by the deadline
            url, path, agent = f"https://{config['server']['listen']}", "/v1/tools/approveExpense", Agent(pki)
            results = [await agent.post(url, path, agent.headers(path)) for _ in range(8)]
            headers = agent.headers(path)
            replays = [await agent.post(url, path, headers) for _ in range(4)]
            async with aiohttp.ClientSession() as s, s.get(f"{admin}/metrics") as resp:
                metrics = await resp.text()
            proc["proc"].send_signal(signal.SIGTERM)
            assert proc["proc"].wait(timeout=30) == 0
    assert [r[0] for r in results] == [200] * 8
    assert sorted(r[0] for r in replays) == [200, 401, 401, 401]
    # any worker answers /metrics for all of them (multiprocess mode)
    assert (
        'broker_requests_total{code="ok",decision="allow",route="invoke",tool="approveExpense"} 9.0'
        in metrics
    )
    assert all(p.exists() for p in audit)
    for p in audit:
        assert run_cli("audit", "verify", str(p), "--key", str(pki.signing_jwk)).returncode == 0


def test_audit_verify_names_the_first_bad_record(pki: Pki, tmp_path: Path) -> None:
    from broker.audit.sink import AuditLog
    from broker.jose import Signer

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, signer=Signer.from_file(pki.signing_jwk), checkpoint_every=3)
    log.open()
    for i in range(7):
        log.append({"event": "invocation", "decision": "allow", "reason": "", "request_id": f"r{i}"})
    log.close()
    ok = run_cli("audit", "verify", str(path), "--key", str(pki.signing_jwk))
    assert ok.returncode == 0, ok.stdout
    lines = path.read_text().splitlines()
    lines[4] = lines[4].replace('"r3"', '"r9"')
    path.write_text("\n".join(lines) + "\n")
    bad = run_cli("audit", "verify", str(path), "--key", str(pki.signing_jwk))
    assert bad.returncode == 1
    assert "seq 5" in bad.stdout  # the fifth line: seq counts from 1


def test_audit_verify_of_a_missing_log_is_a_usage_error(pki: Pki, tmp_path: Path) -> None:
    """Exit 2 and one line (a missing log is not a failed chain, 1), never a traceback."""
    missing = run_cli("audit", "verify", str(tmp_path / "nothing.jsonl"), "--key", str(pki.signing_jwk))
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr and "Traceback" not in missing.stderr


async def test_unwritable_audit_log_refuses_and_forwards_nothing(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """A real write failure (RLIMIT_FSIZE on the broker process: the next append fails with EFBIG)."""
    import resource

    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["server"]["listen"] = f"127.0.0.1:{free_port()}"
    config["server"]["admin_listen"] = f"127.0.0.1:{free_port()}"
    audit = Path(config["audit"]["file"])
    url, path, agent = f"https://{config['server']['listen']}", "/v1/tools/approveExpense", Agent(pki)
    with broker_process(config, tmp_path, "audit-fault") as proc:
        await wait_ready(f"http://{config['server']['admin_listen']}", proc["proc"], proc["log"])
        assert (await agent.post(url, path, agent.headers(path)))[0] == 200
        pid = proc["proc"].pid
        _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (audit.stat().st_size, hard))
        status, body = await agent.post(url, path, agent.headers(path))
        assert (status, body["error"]) == (503, "audit_unavailable")
        assert len(upstream.received) == 1  # the refused call never left the broker
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, hard))
        assert (await agent.post(url, path, agent.headers(path)))[0] == 200
    assert len(upstream.received) == 2
    result = run_cli("audit", "verify", str(audit), "--key", str(pki.signing_jwk))
    assert result.returncode == 0, result.stdout
