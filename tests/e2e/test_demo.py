"""``make run`` + ``make demo`` as a user runs them: the stack (``python -m broker.dev.demo.stack``) and the demo agent
(``python -m broker.dev.demo.agent``) as subprocesses, real TLS, real files; the agent walks CONTRACT §11 rows 1-14."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.dev.demo.agent import STEPS
from tests.certfactory import Pki
from tests.e2e.test_cli import wait_ready as wait_until_ready

ROOT = Path(__file__).resolve().parents[2]
READY_WITHIN = 30.0
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    public_url: str
    admin_url: str
    audit: Path
    log: Path


async def wait_ready(stack: Stack) -> None:
    await wait_until_ready(stack.admin_url, stack.proc, stack.log)


@pytest.fixture
def stack(pki: Pki, tmp_path: Path) -> Iterator[Stack]:
    """``make run`` on free ports: the demo backend on port 0, the broker's public URL = its listener."""
    port, admin = free_port(), free_port()
    public_url = f"https://localhost:{port}"
    env = {
        **os.environ,
        "BROKER_LISTEN": f"127.0.0.1:{port}",
        "BROKER_ADMIN_LISTEN": f"127.0.0.1:{admin}",
        "BROKER_AUDIT_FILE": str(tmp_path / "audit.jsonl"),
        "BROKER_PUBLIC_URL": public_url,
    }
    env.pop("EXPENSE_UPSTREAM", None)
    log = tmp_path / "stack.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker.dev.demo.stack",
                "--certs",
                str(pki.root),
                "--backend-listen",
                "127.0.0.1:0",
                "--db",
                str(tmp_path / "expense.db"),
            ],
            stdout=out,
            stderr=out,
            env=env,
            cwd=ROOT,
        )
        try:
            yield Stack(proc, public_url, f"http://127.0.0.1:{admin}", tmp_path / "audit.jsonl", log)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)


def run_agent(pki: Pki, broker_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.dev.demo.agent", "--certs", str(pki.root), "--broker", broker_url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def step_lines(stdout: str) -> dict[str, str]:
    """``{step name: its line}`` for the lines of the agent's output that report a step."""
    lines = {}
    for line in stdout.splitlines():
        verdict, _, rest = line.partition(" ")
        if verdict in ("ok", "FAIL") and rest.strip():
            lines[rest.split()[0]] = line
    return lines


async def test_make_demo_walks_the_whole_scenario_twice_and_the_audit_verifies(
    pki: Pki, stack: Stack
) -> None:
    await wait_ready(stack)
    runs = [run_agent(pki, stack.public_url) for _ in range(2)]  # the second run: against the same broker

    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(timeout=30) == 0, stack.log.read_text()[-2000:]
    for number, run in enumerate(runs, 1):
        assert run.returncode == 0, (
            f"run {number}:\n{run.stdout}\n{run.stderr}\n{stack.log.read_text()[-3000:]}"
        )
        lines = step_lines(run.stdout)
        assert list(lines) == [step.name for step in STEPS], run.stdout
        assert all(line.startswith("ok ") for line in lines.values()), run.stdout
        assert f"all {len(STEPS)} steps matched" in run.stdout
    verified = subprocess.run(
        [sys.executable, "-m", "broker", "audit", "verify", str(stack.audit), "--key", str(pki.signing_jwk)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # CONTRACT §11 row 15: every refusal the walk provoked is on record with its reason
    records = [json.loads(line) for line in stack.audit.read_text().splitlines() if line]
    refusals = [r for r in records if r["decision"] in ("deny", "step_up", "pending", "error")]
    assert {r["decision"] for r in refusals} == {"deny", "step_up", "pending"}
    assert all(r["reason"] for r in refusals)


@pytest.mark.parametrize(
    ("certs", "status"),
    [("pki", 1), ("missing", 2)],
    ids=["no-broker-listening-fails-every-step", "no-certs-folder"],
)
def test_the_demo_agent_reports_failure(pki: Pki, tmp_path: Path, certs: str, status: int) -> None:
    root = str(pki.root) if certs == "pki" else str(tmp_path / "no-such-folder")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker.dev.demo.agent",
            "--certs",
            root,
            "--broker",
            f"https://localhost:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == status, result.stdout + result.stderr
    if status == 1:
        lines = step_lines(result.stdout)
        assert list(lines) == [step.name for step in STEPS]
        assert all(line.startswith("FAIL ") for line in lines.values())
        assert f"{len(STEPS)} of {len(STEPS)} steps did not match" in result.stdout
