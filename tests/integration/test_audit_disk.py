"""/readyz and the audit filesystem's free space (``audit.min_free_bytes``, CONTRACT §9), on the real admin
listener: a threshold above the free space turns the broker not ready, naming the reason; the gauge reports it."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp

from tests.certfactory import Pki
from tests.conftest import BrokerFactory, RecordingUpstream, base_config


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


async def readyz_and_gauge(admin_url: str) -> tuple[int, dict[str, object], float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(admin_url + "/readyz") as resp:
            status, body = resp.status, await resp.json()
        async with session.get(admin_url + "/metrics") as resp:
            text = await resp.text()
    [line] = [line for line in text.splitlines() if line.startswith("broker_audit_disk_free_bytes ")]
    return status, body, float(line.split()[1])


async def test_readyz_is_503_naming_audit_disk_below_min_free_bytes(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["audit"]["min_free_bytes"] = free_bytes(tmp_path) * 4 + 1  # more than this filesystem will have
    broker = await broker_factory(config)
    status, body, gauge = await readyz_and_gauge(broker.admin_url)
    assert status == 503 and body["status"] == "not_ready"
    assert body["failing"] == ["audit_disk"] and body["checks"]["audit_disk"] is False  # type: ignore[index]
    assert 0 < gauge < config["audit"]["min_free_bytes"]


async def test_readyz_is_ready_above_min_free_bytes(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["audit"]["min_free_bytes"] = 1
    broker = await broker_factory(config)
    status, body, gauge = await readyz_and_gauge(broker.admin_url)
    assert status == 200 and body["failing"] == [] and body["checks"]["audit_disk"] is True  # type: ignore[index]
    assert abs(gauge - free_bytes(tmp_path)) < 1 << 30  # the same filesystem, give or take other writers
