"""A reload onto hostile YAML (HOSTILE Y09) is refused with one located problem; the loaded config stays in force."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.certfactory import Pki
from tests.conftest import BrokerFactory, RecordingUpstream, base_config

TOOL = "/v1/tools/approveExpense"
INVOICE = {"invoice_id": "INV-1", "amount": 100, "department": "42"}


@pytest.mark.parametrize(
    ("tail", "line", "expected"),
    [
        ("x: &a [*a]\n", 1, "recursive YAML alias *a: it is inside its own anchor &a"),
        (
            "l0: &l0 [x, x, x, x, x, x, x, x, x]\n"
            + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)),
            6,  # the alias that crosses the bound: l5's list of *l4
            "document too large",
        ),
    ],
    ids=["Y09-recursive-alias", "Y09-billion-laughs"],
)
async def test_reload_onto_hostile_yaml_keeps_the_loaded_config(
    broker_factory: BrokerFactory,
    upstream: RecordingUpstream,
    pki: Pki,
    tmp_path: Path,
    tail: str,
    line: int,
    expected: str,
) -> None:
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    broker = await broker_factory(config)
    caller = broker.caller()
    async with aiohttp.ClientSession() as s:
        async with s.get(broker.admin_url + "/admin/config") as resp:
            before = (await resp.json())["policy_version"]
        good = yaml.safe_dump(config)
        broker.config_path.write_text(good + tail)
        async with s.post(broker.admin_url + "/admin/reload", json={}) as resp:
            status, body = resp.status, await resp.json()
        assert (status, body["result"], body["policy_version"]) == (422, "failure", before)
        [problem] = body["problems"]
        assert problem.startswith(f"{broker.config_path}:{len(good.splitlines()) + line}: {expected}"), (
            problem
        )
        async with s.get(broker.admin_url + "/metrics") as resp:
            assert 'broker_config_reloads_total{result="failure"} 1.0' in await resp.text()
    assert (await caller.call("POST", TOOL, INVOICE)).status == 200
    assert len(upstream.received) == 1
