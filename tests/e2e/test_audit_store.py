"""Acknowledged means durable, with real processes (CONTRACT §15): a ``broker run`` under load is killed with
SIGKILL and every request_id of every answer the agent received is in the store (the file with fsync, and
PostgreSQL); a private PostgreSQL stopped and started under load gives only ``503 audit_unavailable`` while it is
down, the broker recovers by itself, and the chain verifies.

The load, the broker process and the waits are :mod:`tests.e2e.test_faults`'s (open loop, bounded waits on
observed answers, never fixed sleeps)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from broker.audit.pg import iter_records
from tests.certfactory import Pki
from tests.conftest import RecordingUpstream
from tests.e2e.test_cli import broker_process, run_cli, wait_ready
from tests.e2e.test_faults import (
    OK,
    Load,
    Outcome,
    admin_get,
    agent_client,
    answered,
    audit_lines,
    fault_config,
    poll,
    tally,
    within,
)
from tests.pgutil import fresh_database, private_postgres

pytestmark = pytest.mark.slow

AUDIT_DOWN = (503, "audit_unavailable")
#: requests/s of the outage test's load: the test process is both the agent and the backend, on 2 shared cores
RATE = 40


@dataclass
class Broker:
    url: str
    admin: str
    proc: subprocess.Popen[bytes]


@asynccontextmanager
async def running_broker(config: dict[str, Any], tmp_path: Path, name: str) -> AsyncIterator[Broker]:
    """``broker run`` from ready to the end of the block (then SIGTERM), on the file or the PostgreSQL store."""
    with broker_process(config, tmp_path, name) as proc:
        admin = f"http://{config['server']['admin_listen']}"
        await wait_ready(admin, proc["proc"], proc["log"])
        yield Broker(config["server"]["public_url"], admin, proc["proc"])


def answered_ids(outcomes: list[Outcome]) -> set[str]:
    """The request_id of every answer received (not the refusals that, by definition, wrote nothing)."""
    return {o.request_id for o in outcomes if o.status and o.answer != AUDIT_DOWN and o.request_id}


def db_request_ids(url: str) -> set[str]:
    return {r["request_id"] for r in iter_records(url) if r.get("request_id")}


@pytest.mark.parametrize("store", ["file", "postgresql"])
async def test_sigkill_under_load_loses_no_acknowledged_record(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream, store: str
) -> None:
    config = fault_config(pki, tmp_path, upstream.url)
    with fresh_database() as url:
        if store == "postgresql":
            config["audit"] = {"store": url, "checkpoint_every": 50}
        else:
            config["audit"].update(fsync=True, checkpoint_every=50)
        async with (
            running_broker(config, tmp_path, f"kill-{store}") as broker,
            agent_client(pki, broker.url) as agent,
        ):
            async with Load(agent) as load:
                t0 = asyncio.get_running_loop().time()
                await load.until(answered(OK, after=t0, count=150), "150 calls answered under load")
                broker.proc.kill()  # SIGKILL: no drain, no final checkpoint, requests in flight
                broker.proc.wait()
            acknowledged = answered_ids(load.outcomes)
        assert len(acknowledged) >= 150
        if store == "postgresql":
            stored = db_request_ids(url)
            check = run_cli("audit", "verify", "--db", url, "--key", str(pki.signing_jwk))
        else:
            stored = {
                r["request_id"] for r in audit_lines(Path(config["audit"]["file"])) if r.get("request_id")
            }
            check = run_cli("audit", "verify", config["audit"]["file"], "--key", str(pki.signing_jwk))
    assert acknowledged <= stored, f"acknowledged but not in the store: {sorted(acknowledged - stored)[:5]}"
    assert check.returncode == 0, check.stdout + check.stderr  # an unsealed tail, but intact


async def test_postgres_stopped_and_started_under_load_fails_closed_and_recovers_by_itself(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    async with private_postgres() as pg:  # never the shared server
        config = fault_config(pki, tmp_path, upstream.url)
        config["audit"] = {"store": pg.url, "checkpoint_every": 20, "store_timeout_seconds": 2}
        async with (
            running_broker(config, tmp_path, "pg-outage") as broker,
            agent_client(pki, broker.url) as agent,
        ):
            async with Load(agent, rate=RATE) as load:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                await load.until(answered(OK, after=t0, count=25), "25 calls allowed before the outage")
                await pg.stop()
                down = loop.time()
                await load.until(answered(AUDIT_DOWN, after=down, count=25), "25 refusals while it is down")

                async def not_ready() -> bool:
                    status, body = await admin_get(broker.admin, "/readyz")
                    return status == 503 and json.loads(body)["checks"]["audit"] is False

                await poll(not_ready, "/readyz not ready while PostgreSQL is down")
                restarting = loop.time()
                await pg.start()
                up = loop.time()
                await load.until(answered(OK, after=up, count=25), "25 calls allowed after it returned")

                async def ready() -> bool:
                    return (await admin_get(broker.admin, "/readyz"))[0] == 200

                await poll(ready, "/readyz ready again")
            assert broker.proc.poll() is None  # recovered by itself, never restarted
        # the broker stopped (SIGTERM): its final checkpoint sealed the chain
        check = run_cli(
            "audit", "verify", "--db", pg.url, "--key", str(pki.signing_jwk), "--max-unsealed", "0"
        )
        with psycopg.connect(pg.url) as conn:
            chains = conn.execute("SELECT count(*) FROM audit_chains").fetchone()
        stored = db_request_ids(pg.url)

    outcomes = load.outcomes
    assert set(tally(outcomes)) <= {OK, AUDIT_DOWN}, tally(outcomes)  # never a 500, never a transport failure
    assert {o.answer for o in within(outcomes, down, restarting)} == {AUDIT_DOWN}
    assert check.returncode == 0, check.stdout + check.stderr  # one chain, intact: no gap, no fork
    assert chains == (1,)
    assert answered_ids(outcomes) <= stored  # every acknowledged decision is in the chain
    # nothing decided during the outage reached the backend (a call forwarded just before it may still be
    # answered 503: its outcome record could not be written)
    refused = {o.request_id for o in within(outcomes, down, restarting)}
    assert refused.isdisjoint(r.headers["X-Request-Id"] for r in upstream.received)


def test_an_unreachable_store_stops_the_start_with_one_line_without_the_password(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    config = fault_config(pki, tmp_path, upstream.url)
    config["audit"] = {"store": "postgresql://broker:s3cret@127.0.0.1:1/audit"}
    path = tmp_path / "down.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_cli("run", "-c", str(path))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("broker: cannot start: audit.store: cannot use PostgreSQL at 127.0.0.1:1/audit: ")
    assert "s3cret" not in result.stderr
