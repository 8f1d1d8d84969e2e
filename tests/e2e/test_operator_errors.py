"""What a new operator tripped over (issue 14), from the outside: ``broker check``, ``broker run`` and ``make run``'s
stack in subprocesses. A config naming a file that is not there fails ``check`` and ``run`` alike with the same
``FILE:LINE: message`` line and no traceback; a listen address in use is one line naming it and what moves it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.certfactory import Pki

ROOT = Path(__file__).resolve().parents[2]
EXPENSE = "config/examples/expense.yaml"
pytestmark = pytest.mark.slow


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any BROKER_*/EXPENSE_* of the developer's shell, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "EXPENSE_"))}
    return env | extra


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env=env or clean_env(), check=False,
    )  # fmt: skip


@contextmanager
def port_in_use() -> Iterator[int]:
    """A port another process listens on (no SO_REUSEPORT: a broker cannot share it)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield int(held.getsockname()[1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config_text(
    pki: Pki, tmp: Path, *, listen: str, admin_listen: str, signing: Path, state: str = ""
) -> str:
    return f"""\
version: 1
server:
  listen: {listen}
  admin_listen: {admin_listen}
  public_url: https://localhost:8443
  tls: {{cert: {pki.broker}, key: {pki.broker_key}, client_ca: {pki.ca}}}
identity:
  trust_domain: example.org
  audience: https://broker.example.org
  issuers: [{{issuer: https://idp.example.org, jwks_file: {pki.idp_jwks}}}]
signing:
  key_file: {signing}
audit: {{file: {tmp / "audit.jsonl"}}}
{state}"""


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr


def test_check_and_run_refuse_a_missing_signing_key_with_the_same_line(pki: Pki, tmp_path: Path) -> None:
    absent = tmp_path / "keys" / "broker-signing.jwk"
    path = tmp_path / "broker.yaml"
    path.write_text(
        config_text(pki, tmp_path, listen="127.0.0.1:0", admin_listen="127.0.0.1:0", signing=absent)
    )
    expected = f"{path}:12: signing.key_file: cannot read {absent}: No such file or directory"
    check = run("-m", "broker", "check", "-c", str(path))
    assert (check.returncode, check.stdout, check.stderr.splitlines()) == (1, "", [expected])
    served = run("-m", "broker", "run", "-c", str(path))
    no_traceback(served)
    assert (served.returncode, served.stderr.splitlines()) == (1, [expected])


def test_check_reports_every_problem_in_one_pass(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "broker.yaml"
    text = config_text(pki, tmp_path, listen="nowhere", admin_listen="127.0.0.1:0", signing=pki.signing_jwk)
    text = text.replace(f"cert: {pki.broker},", f"cert: {tmp_path / 'absent.pem'},")
    text += (
        "policies:\n  - {id: p, tools: ['*'], when: 'subject.x &&'}\ncounters:\n  - {name: n, tool: [x]}\n"
    )
    path.write_text(text)
    result = run("-m", "broker", "check", "-c", str(path))
    no_traceback(result)
    lines = result.stderr.splitlines()
    assert result.returncode == 1
    assert lines[:2] == [
        f"{path}:3: server.listen: expected host:port, got 'nowhere'",
        f"{path}:6: server.tls.cert: cannot read {tmp_path / 'absent.pem'}: No such file or directory",
    ]
    assert lines[2].startswith(f"{path}:15: policies[0].when: invalid CEL: ")
    assert sorted(lines[3:]) == [
        f"{path}:17: counters[0].tool: unknown key; did you mean `tools`?",
        f"{path}:17: counters[0].tools: required key is missing",
        f"{path}:17: counters[0].window_seconds: required key is missing",
    ]


@pytest.mark.parametrize(
    ("busy", "expected"),
    [
        ("listen", "server.listen 127.0.0.1:{port} is in use; set BROKER_LISTEN or server.listen"),
        ("admin_listen", "server.admin_listen 127.0.0.1:{port} is in use; set server.admin_listen"),
    ],
    ids=["main-via-variable", "admin-no-variable"],
)
@pytest.mark.parametrize("workers", ["1", "2"], ids=["one-process", "workers"])
def test_run_names_a_busy_address_and_what_moves_it(
    pki: Pki, tmp_path: Path, busy: str, expected: str, workers: str
) -> None:
    state = "state: {backend: redis, redis_url: 'redis://127.0.0.1:1/0'}\n"  # --workers 2 needs it
    free = free_port()  # --workers N needs fixed ports
    with port_in_use() as port:
        addresses = {"listen": "${BROKER_LISTEN:-127.0.0.1:0}", "admin_listen": "127.0.0.1:0"}
        addresses = {k: v.replace(":0", f":{port if k == busy else free}") for k, v in addresses.items()}
        path = tmp_path / "broker.yaml"
        path.write_text(config_text(pki, tmp_path, **addresses, signing=pki.signing_jwk, state=state))
        result = run("-m", "broker", "run", "-c", str(path), "--workers", workers)
    no_traceback(result)
    line = 3 if busy == "listen" else 4
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"{path}:{line}: " + expected.format(port=port)


def stack(pki: Pki, tmp: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run(
        "-m", "broker.dev.demo.stack", "--config", EXPENSE, "--certs", str(pki.root), "--db", str(tmp / "e.db"),
        "--mcp-listen", "none", *args, env=clean_env(BROKER_AUDIT_FILE=str(tmp / "audit.jsonl"), **env),
    )  # fmt: skip


def test_make_run_names_a_busy_backend_port(pki: Pki, tmp_path: Path) -> None:
    with port_in_use() as port:
        result = stack(pki, tmp_path, "--backend-listen", f"127.0.0.1:{port}", env={})
    no_traceback(result)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"expense backend 127.0.0.1:{port} is in use; set BACKEND_LISTEN (make run) or --backend-listen"
    )


def test_make_run_names_a_busy_broker_port(pki: Pki, tmp_path: Path) -> None:
    backend = free_port()
    with port_in_use() as port:
        result = stack(
            pki, tmp_path, "--backend-listen", f"127.0.0.1:{backend}",
            env={"BROKER_LISTEN": f"127.0.0.1:{port}", "BROKER_ADMIN_LISTEN": "127.0.0.1:0"},
        )  # fmt: skip
    no_traceback(result)
    line = next(
        i for i, text in enumerate((ROOT / EXPENSE).read_text().splitlines(), 1) if "  listen:" in text
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"{EXPENSE}:{line}: server.listen 127.0.0.1:{port} is in use; set BROKER_LISTEN or server.listen"
    )


def make_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*\?=\s*(\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile sets no {name}"
    return match.group(1)


def expense_default(variable: str) -> str:
    match = re.search(rf"\$\{{{variable}:-([^}}]+)\}}", (ROOT / EXPENSE).read_text())
    assert match, variable
    return match.group(1)


def test_readme_lists_every_port_make_run_uses_and_what_moves_it() -> None:
    from broker.dev.demo.stack import build_parser

    defaults = build_parser().parse_args([])
    addresses = {
        "BROKER_LISTEN": expense_default("BROKER_LISTEN"),
        "BROKER_ADMIN_LISTEN": expense_default("BROKER_ADMIN_LISTEN"),
        "BACKEND_LISTEN": make_variable("BACKEND_LISTEN"),
        "MCP_LISTEN": make_variable("MCP_LISTEN"),
    }
    assert (addresses["BACKEND_LISTEN"], addresses["MCP_LISTEN"]) == (
        defaults.backend_listen,
        defaults.mcp_listen,
    )
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("`make run` listens on these ports") :].split("\n\n")[1]
    rows = {row.split("|")[1].strip(): row for row in table.splitlines()[2:]}
    for variable, address in addresses.items():
        port = address.rpartition(":")[2]
        assert port in rows and f"`{variable}" in rows[port], (variable, address)


def test_deploy_manifests_set_the_admin_token_and_prometheus_sends_it() -> None:
    objects = [
        doc
        for path in (ROOT / "deploy").rglob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    configmap = next(
        o for o in objects if o.get("kind") == "ConfigMap" and o["metadata"]["name"] == "broker-config"
    )
    token_file = yaml.safe_load(configmap["data"]["broker.yaml"])["server"]["admin_token_file"]
    deployment = next(
        o for o in objects if o.get("kind") == "Deployment" and o["metadata"]["name"] == "broker"
    )
    pod = deployment["spec"]["template"]["spec"]
    broker = next(c for c in pod["containers"] if c["name"] == "broker")
    mount = next(m for m in broker["volumeMounts"] if token_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    secret = volume["secret"]
    assert [i["path"] for i in secret["items"]] == [token_file.rpartition("/")[2]]
    monitor = next(o for o in objects if o.get("kind") == "ServiceMonitor")
    credentials = monitor["spec"]["endpoints"][0]["authorization"]["credentials"]
    assert credentials == {"name": secret["secretName"], "key": secret["items"][0]["key"]}
