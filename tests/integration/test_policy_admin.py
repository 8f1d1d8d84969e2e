"""Policy in the request path, and the operators' controls: reload, rollback, config, revocations, shadow policies."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.certfactory import Pki
from tests.conftest import BrokerFactory, BrokerUnderTest, Recorded, RecordingUpstream, base_config

TOOL = "/v1/tools/approveExpense"
INVOICE = {"invoice_id": "INV-1", "amount": 100, "department": "42"}
DEPT_RULES = [
    {"id": "finance", "tools": ["approveExpense"], "effect": "allow", "when": '"finance" in subject.groups'},
    {
        "id": "small-only",
        "tools": ["approveExpense"],
        "effect": "deny",
        "when": "args.amount > 1000",
        "reason": "amount too large for this agent",
    },
]


def policy_config(pki: Pki, tmp: Path, upstream: str, **overrides: Any) -> dict[str, Any]:
    config = base_config(pki, tmp, upstream_url=upstream, policies=copy.deepcopy(DEPT_RULES))
    config["tools"][0]["inject"] = {"department": "subject.department"}
    config.update(overrides)
    return config


async def admin(broker: BrokerUnderTest, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One admin call; a POST always carries a JSON body (CONTRACT §12: admin POSTs are application/json)."""
    if body is None and method == "POST":
        body = {}
    async with aiohttp.ClientSession() as s, s.request(method, broker.admin_url + path, json=body) as resp:
        return resp.status, await resp.json()


async def metrics(broker: BrokerUnderTest) -> str:
    async with aiohttp.ClientSession() as s, s.get(broker.admin_url + "/metrics") as resp:
        return await resp.text()


async def test_allow_deny_hidden_and_injection(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    broker = await broker_factory(policy_config(pki, tmp_path, upstream.url))
    finance = broker.caller(claims={"groups": ["finance"], "department": "42"})
    allowed = await finance.call("POST", TOOL, {**INVOICE, "department": "7"})
    denied = await finance.call("POST", TOOL, {**INVOICE, "amount": 5000})
    outsider = broker.caller("eve", claims={"groups": ["sales"], "department": "42"})
    hidden = await outsider.call("POST", TOOL, INVOICE)
    schema_probe = await outsider.call("POST", TOOL, {"nonsense": True})
    assert allowed.status == 200
    # the forged department never reaches the backend: the subject's own is injected
    assert upstream.received[0].json()["department"] == "42"
    assert (denied.status, denied.error) == (403, "access_denied")
    assert denied.body["error_description"] == "amount too large for this agent"
    # invisible tools answer like missing ones, before their arguments are even looked at
    assert (hidden.status, hidden.error) == (404, "unknown_tool")
    assert (schema_probe.status, schema_probe.error) == (404, "unknown_tool")
    assert len(upstream.received) == 1
    reasons = [
        r["reason"] for r in broker.audit_records() if r["event"] == "invocation" and r["decision"] == "deny"
    ]
    assert reasons[0].startswith("small-only")
    assert reasons[1].startswith("hidden")


async def test_reload_swaps_a_good_config_and_keeps_serving_through_a_bad_one(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    config = policy_config(pki, tmp_path, upstream.url)
    broker = await broker_factory(config)
    finance = broker.caller(claims={"groups": ["finance"], "department": "42"})
    before = (await admin(broker, "GET", "/admin/config"))[1]["policy_version"]

    config["policies"][1]["when"] = "args.amount > 50"  # tighter limit
    broker.config_path.write_text(yaml.safe_dump(config))
    status, body = await admin(broker, "POST", "/admin/reload")
    assert (status, body["result"]) == (200, "success")
    assert body["policy_version"] != before
    assert (await finance.call("POST", TOOL, INVOICE)).error == "access_denied"

    broken = dict(config, policies=[{"id": "x", "tools": ["approveExpense"], "when": "subjct.groups"}])
    broker.config_path.write_text(yaml.safe_dump(broken))
    status, body = await admin(broker, "POST", "/admin/reload")
    assert status == 422 and body["result"] == "failure"
    assert any("undeclared reference" in p for p in body["problems"])
    assert body["policy_version"] != before  # the reloaded (good) config is still in force
    assert (await finance.call("POST", TOOL, {**INVOICE, "amount": 10})).status == 200

    status, body = await admin(broker, "POST", "/admin/rollback")
    assert (status, body["policy_version"]) == (200, before)
    assert (await finance.call("POST", TOOL, INVOICE)).status == 200
    text = await metrics(broker)
    assert 'broker_config_reloads_total{result="failure"} 1.0' in text
    assert f'broker_config_info{{policy_version="{before}"}} 1.0' in text
    loads = [(r["decision"], r.get("source")) for r in broker.audit_records() if r["event"] == "config_load"]
    assert loads == [("allow", "start"), ("allow", "admin"), ("error", "admin"), ("allow", "admin")]


async def test_reload_under_load_loses_no_request(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    config = policy_config(pki, tmp_path, upstream.url)
    broker = await broker_factory(config)
    finance = broker.caller(claims={"groups": ["finance"], "department": "42"})
    gate, all_in_flight = asyncio.Event(), asyncio.Event()

    async def slow(_: Recorded) -> Any:
        if len(upstream.received) == 8:
            all_in_flight.set()
        await gate.wait()
        from aiohttp import web

        return web.json_response({"ok": True})

    upstream.respond = slow
    calls = [asyncio.create_task(finance.call("POST", TOOL, {**INVOICE, "amount": i + 1})) for i in range(8)]
    await all_in_flight.wait()
    config["policies"][1]["reason"] = "changed"
    broker.config_path.write_text(yaml.safe_dump(config))
    assert (await admin(broker, "POST", "/admin/reload"))[0] == 200
    broken = dict(config, version=2)
    broker.config_path.write_text(yaml.safe_dump(broken))
    assert (await admin(broker, "POST", "/admin/reload"))[0] == 422
    gate.set()
    assert [r.status for r in await asyncio.gather(*calls)] == [200] * 8


async def test_a_revoked_policy_version_mints_nothing_more(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    """CONTRACT §17: once the version in force is revoked, no grant (discovery) and no txn token (edge
    invocation) is minted under it, on any route, until another version is loaded."""
    broker = await broker_factory(policy_config(pki, tmp_path, upstream.url))
    finance = broker.caller(claims={"groups": ["finance"], "department": "42"})
    assert (await finance.call("GET", "/v1/tools")).status == 200
    version = (await admin(broker, "GET", "/admin/config"))[1]["policy_version"]
    assert (await admin(broker, "POST", "/admin/revocations", {"kind": "policy_version", "value": version}))[
        0
    ] == 200
    listing = await finance.call("GET", "/v1/tools")
    invoked = await finance.call("POST", TOOL, INVOICE)
    assert (listing.status, listing.error) == (invoked.status, invoked.error) == (403, "access_denied")
    assert upstream.received == []
    reasons = {r["reason"] for r in broker.audit_records() if r.get("decision") == "deny"}
    assert reasons == {"revoked_policy_version"}


async def test_revocations_take_effect_at_once(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    broker = await broker_factory(policy_config(pki, tmp_path, upstream.url))
    finance = broker.caller(claims={"groups": ["finance"], "department": "42"})
    assert (await finance.call("POST", TOOL, INVOICE)).status == 200
    status, _ = await admin(
        broker,
        "POST",
        "/admin/revocations",
        {"kind": "grant", "value": f"alice|{pki.agent_id('expense-assistant')}|approveExpense"},
    )
    assert status == 200
    revoked = await finance.call("POST", TOOL, INVOICE)
    listing = await finance.call("GET", "/v1/tools")
    assert (revoked.status, revoked.error) == (404, "unknown_tool")
    assert listing.body["tools"] == []
    assert (await admin(broker, "POST", "/admin/revocations", {"kind": "sub", "value": "alice"}))[0] == 200
    refused = await finance.call("GET", "/v1/tools")
    assert (refused.status, refused.error) == (401, "invalid_token")
    assert (await admin(broker, "POST", "/admin/revocations", {"kind": "everything", "value": "x"}))[0] == 400
    assert len(upstream.received) == 1
    revocations = [r for r in broker.audit_records() if r["event"] == "revocation"]
    assert [r["revoked_kind"] for r in revocations] == ["grant", "sub"]


async def test_shadow_policy_disagreements_are_counted_not_enforced(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    shadow = [dict(DEPT_RULES[0]), dict(DEPT_RULES[1], when="args.amount > 50")]
    broker = await broker_factory(policy_config(pki, tmp_path, upstream.url, shadow_policies=shadow))
    finance = broker.caller(claims={"groups": ["finance"], "department": "42"})
    assert (await finance.call("POST", TOOL, {**INVOICE, "amount": 100})).status == 200  # shadow would deny
    assert (await finance.call("POST", TOOL, {**INVOICE, "amount": 10})).status == 200  # both allow
    text = await metrics(broker)
    assert 'broker_policy_shadow_diffs_total{tool="approveExpense"} 1.0' in text


async def test_admin_config_describes_what_is_loaded(broker: BrokerUnderTest) -> None:
    status, body = await admin(broker, "GET", "/admin/config")
    assert status == 200
    assert body["tools"] == ["approveExpense"] and body["previous_policy_version"] is None
    assert body["policies"] == [{"id": "any-agent", "effect": "allow", "tools": ["*"]}]


async def test_admin_token_guards_every_admin_endpoint_but_the_probes(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("s3cret-admin-token-123\n")
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["server"]["admin_token_file"] = str(token_file)
    broker = await broker_factory(config)
    async with aiohttp.ClientSession() as s:
        async with s.get(broker.admin_url + "/admin/config") as resp:
            assert resp.status == 401
        async with s.post(
            broker.admin_url + "/admin/revocations", json={"kind": "sub", "value": "alice"}
        ) as resp:
            assert resp.status == 401
        wrong = {"Authorization": "Bearer not-the-token-at-all"}
        async with s.get(broker.admin_url + "/admin/config", headers=wrong) as resp:
            assert resp.status == 401
        right = {"Authorization": "Bearer s3cret-admin-token-123"}
        async with s.get(broker.admin_url + "/admin/config", headers=right) as resp:
            assert resp.status == 200
        # CONTRACT §12: every admin endpoint but /healthz and /readyz needs the token, /metrics too
        for probe in ("/healthz", "/readyz"):
            async with s.get(broker.admin_url + probe) as resp:
                assert resp.status == 200, probe
        async with s.get(broker.admin_url + "/metrics") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "invalid_token"
        async with s.get(broker.admin_url + "/metrics", headers=right) as resp:
            assert resp.status == 200
    # the refused revocation did nothing
    assert (await broker.caller().call("GET", "/v1/tools")).status == 200
