"""A refused hot reload says what ``broker check`` says (CONTRACT §2): every problem of the file — each file the
config names, every policy — as ``FILE:LINE: message``, through ``POST /admin/reload`` and through SIGHUP (the
log line), while the old config keeps serving."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.certfactory import Pki
from tests.conftest import BrokerFactory, base_config
from tests.e2e.test_cli import broker_process, run_cli, wait_ready
from tests.e2e.test_faults import fault_config

pytestmark = pytest.mark.slow
WITHIN = 20.0


def broken(config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """Three problems at once, two of them files that only ``broker check`` looked at one by one."""
    bad = json.loads(json.dumps(config))
    bad["identity"]["issuers"][0]["jwks_file"] = str(tmp_path / "missing-jwks.json")
    bad["tools"][0]["upstream"]["tls"] = {"ca": str(tmp_path / "missing-ca.pem")}
    bad["policies"] = [{"id": "typo", "tools": ["*"], "effect": "allow", "when": 'subjct.id != ""'}]
    return bad


def check_lines(path: Path) -> list[str]:
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1, result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 3, lines
    return lines


async def test_admin_reload_refusal_lists_what_broker_check_lists(
    broker_factory: BrokerFactory, pki: Pki, tmp_path: Path
) -> None:
    config = base_config(pki, tmp_path, upstream_url="https://127.0.0.1:9")
    broker = await broker_factory(config)
    broker.config_path.write_text(yaml.safe_dump(broken(config, tmp_path), sort_keys=False))
    expected = check_lines(broker.config_path)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{broker.admin_url}/admin/reload", json={}) as reply,
    ):
        body = await reply.json()
    assert reply.status == 422 and body["result"] == "failure"
    assert body["problems"] == expected
    assert any("missing-jwks.json" in p for p in expected) and any("missing-ca.pem" in p for p in expected)
    async with aiohttp.ClientSession() as session, session.get(f"{broker.admin_url}/readyz") as ready:
        assert ready.status == 200  # the old config still serves


async def test_sighup_refusal_logs_what_broker_check_lists(pki: Pki, tmp_path: Path) -> None:
    config = fault_config(pki, tmp_path, "https://127.0.0.1:9")
    with broker_process(config, tmp_path, "sighup") as proc:
        admin = f"http://{config['server']['admin_listen']}"
        await wait_ready(admin, proc["proc"], proc["log"])
        path = tmp_path / "sighup.yaml"
        path.write_text(yaml.safe_dump(broken(config, tmp_path), sort_keys=False))
        expected = check_lines(path)
        proc["proc"].send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WITHIN
        refused: list[dict[str, Any]] = []
        while not refused:
            assert time.monotonic() < deadline, proc["log"].read_text()[-2000:]
            await asyncio.sleep(0.05)  # poll another process's log file, bounded by the deadline
            lines = proc["log"].read_text().splitlines()
            refused = [
                r
                for r in map(_json_or_none, lines)
                if r and str(r.get("event")).startswith("config reload refused")
            ]
        assert refused[0]["source"] == "sighup"
        assert refused[0]["problems"] == expected


def _json_or_none(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
