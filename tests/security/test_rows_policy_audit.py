"""HOSTILE §1.6 Y05, Y07 and §1.7 A08, A09 through a real broker: policies that do not compile, expensive
policies, an audit sink that fails, and secrets that must never reach the audit log or the logs."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from broker.audit.sink import AuditLog
from broker.audit.verify import verify_log
from broker.config.loader import ConfigError, load_config
from broker.errors import AuditUnavailable
from broker.jose import Signer
from broker.resources import AUDIT
from broker.server import start
from tests.certfactory import Pki
from tests.conftest import BrokerFactory, Recorded, RecordingUpstream, base_config
from tests.security.support import INVOICE, TOOL, admin, exchange_txn_token, retoken

# -- Y05: a policy that does not compile ----------------------------------------------------------------------

BAD_WHEN = [
    ("Y05-syntax-error", 'subject.groups.exists(g, g == "finance"'),
    ("Y05-undeclared-variable", '"finance" in subjct.groups'),
    ("Y05-dangling-operator", '"finance" in subject.groups &&'),
]


@pytest.mark.parametrize("when", [w for _, w in BAD_WHEN], ids=[i for i, _ in BAD_WHEN])
async def test_y05_a_broker_never_starts_without_a_compiled_policy(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream, when: str
) -> None:
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["policies"] = [{"id": "bad", "tools": ["*"], "effect": "allow", "when": when}]
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as caught:
        await start(load_config(path))
    assert any(str(path) in str(problem) and problem.line > 1 for problem in caught.value.problems)
    assert not (tmp_path / "audit.jsonl").exists()  # it never got as far as serving (or auditing) anything


@pytest.mark.parametrize("when", [w for _, w in BAD_WHEN], ids=[i for i, _ in BAD_WHEN])
async def test_y05_a_reload_that_does_not_compile_keeps_the_last_good_policy(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path, when: str
) -> None:
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["policies"].append(
        {"id": "cap", "tools": ["approveExpense"], "effect": "deny", "when": "args.amount > 5000"}
    )
    broker = await broker_factory(config)
    caller = broker.caller()
    before = (await admin(broker, "GET", "/admin/config"))[1]["policy_version"]
    broken = copy.deepcopy(config)
    broken["policies"] = [{"id": "bad", "tools": ["*"], "effect": "allow", "when": when}]  # would allow all
    broker.config_path.write_text(yaml.safe_dump(broken))
    status, body = await admin(broker, "POST", "/admin/reload")
    assert (status, body["result"]) == (422, "failure")
    assert (await admin(broker, "GET", "/admin/config"))[1]["policy_version"] == before
    assert (await caller.call("POST", TOOL, INVOICE)).status == 200
    denied = await caller.call("POST", TOOL, {**INVOICE, "amount": 6000})
    assert (denied.status, denied.error) == (403, "access_denied")  # the old deny rule still holds
    loads = [r for r in broker.audit_records() if r["event"] == "config_load"]
    assert [r["decision"] for r in loads] == ["allow", "error"]
    assert loads[-1]["reason"]


# -- Y07: an expensive expression over an attacker-sized list --------------------------------------------------


async def test_y07_an_expensive_expression_over_an_attacker_sized_list_is_denied(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    """CEL has no cost limit and runs on the event loop; this policy visits n**2 pairs (n = 10 000: ~30 s). The
    arguments rules read are bounded (broker.policy.cel.MAX_POLICY_LIST): a longer list denies at once."""
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["tools"].append(
        {
            "name": "bulk",
            "input_schema": {
                "type": "object",
                "properties": {"items": {"type": "array", "items": {"type": "integer"}}},
            },
            "upstream": {"url": f"{upstream.url}/bulk"},
        }
    )
    config["policies"].append(
        {
            "id": "no-pairs",
            "tools": ["bulk"],
            "effect": "deny",
            # never true for non-negative items, so every pair is visited: n^2 steps
            "when": "args.items.exists(x, args.items.exists(y, x + y == -1))",
        }
    )
    broker = await broker_factory(config)
    started = time.monotonic()
    reply = await broker.caller().call("POST", "/v1/tools/bulk", {"items": list(range(1500))})
    elapsed = time.monotonic() - started
    assert (reply.status, reply.error) == (403, "access_denied"), f"decided {reply.status} in {elapsed:.2f} s"


# -- A08: the audit sink fails -----------------------------------------------------------------------------------


async def test_a08_audit_write_failure_refuses_and_forwards_nothing(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    """A real OS-level failure of the sink, root-proof: every record is checkpointed (checkpoint_every: 1) and the
    head anchor's temporary file is made impossible to create (a directory sits at its path: EISDIR)."""
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["audit"]["checkpoint_every"] = 1
    broker = await broker_factory(config)
    caller = broker.caller()
    assert (await caller.call("POST", TOOL, INVOICE)).status == 200
    sink = broker.running.app[AUDIT]
    assert isinstance(sink, AuditLog)
    await sink.flush()  # the call's outcome record (not waited for by the call) and its anchor are on disk
    blocker = broker.audit_path.with_name(broker.audit_path.name + ".head.tmp")
    blocker.mkdir()
    refused = await caller.call("POST", TOOL, INVOICE)
    listing = await caller.call("GET", "/v1/tools")
    assert (refused.status, refused.error) == (503, "audit_unavailable")
    assert (listing.status, listing.error) == (503, "audit_unavailable")
    assert len(upstream.received) == 1  # the refused call never left the broker
    assert (await admin(broker, "GET", "/readyz"))[0] == 503
    blocker.rmdir()
    assert (await caller.call("POST", TOOL, INVOICE)).status == 200  # recovers without a restart
    assert len(upstream.received) == 2
    await broker.running.stop()
    report = verify_log(
        broker.audit_path, public_jwks={"keys": [Signer.from_file(pki.signing_jwk).public_jwk()]}
    )
    assert report.ok, report


async def test_a08_an_audit_log_that_cannot_be_opened_stops_the_start(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["audit"]["file"] = str(not_a_folder / "audit.jsonl")
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(AuditUnavailable):
        await start(load_config(path))
    assert upstream.received == []


# -- A09: no secrets in the audit log or the logs ----------------------------------------------------------------

SECRET_DEPARTMENT = "dept-5ecr3t-q9"
SECRET_ACCOUNT = "DE89370400440532013000"


async def test_a09_tokens_proofs_and_unaudited_values_never_reach_the_audit_log(
    broker_factory: BrokerFactory,
    upstream: RecordingUpstream,
    pki: Pki,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["tools"][0]["txn_token"] = "required"
    config["tools"][0]["response"] = {"mask": [{"path": "vendor.bank_account", "keep_last": 4}]}
    broker = await broker_factory(config)

    async def answer(_: Recorded) -> web.StreamResponse:
        return web.json_response({"vendor": {"bank_account": SECRET_ACCOUNT}})

    upstream.respond = answer
    caller = retoken(broker.caller(), department=SECRET_DEPARTMENT)
    arguments = {**INVOICE, "department": SECRET_DEPARTMENT}  # department is not an audit field
    txn_token = await exchange_txn_token(caller, arguments)
    auth = caller.auth_headers("POST", TOOL)
    ok = await caller.call("POST", TOOL, arguments, headers={"Txn-Token": txn_token}, auth=auth)
    assert ok.status == 200 and SECRET_ACCOUNT not in json.dumps(ok.body)
    replay = await caller.call("POST", TOOL, arguments, headers={"Txn-Token": txn_token}, auth=auth)
    assert replay.status == 401  # the same proof again
    forged = await caller.call("POST", TOOL, arguments, auth={"Authorization": f"DPoP {caller.token}x"})
    assert forged.status in (400, 401)
    await broker.running.stop()

    audit = broker.audit_path.read_text()
    logs = "".join(capsys.readouterr())
    secrets = {
        "access token signature": caller.token.split(".")[2],
        "access token payload": caller.token.split(".")[1],
        "DPoP proof signature": auth["DPoP"].split(".")[2],
        "txn token signature": txn_token.split(".")[2],
        "txn token payload": txn_token.split(".")[1],
        "masked response value": SECRET_ACCOUNT,
        "argument not listed in audit_fields": SECRET_DEPARTMENT,
    }
    for what, secret in secrets.items():
        assert secret not in audit, f"{what} is in the audit log"
        assert secret not in logs, f"{what} is in the logs"
    invocations = [
        r for r in json.loads("[" + ",".join(audit.splitlines()) + "]") if r["event"] == "invocation"
    ]
    assert invocations and all(r.get("args", {}).keys() <= {"invoice_id"} for r in invocations)
    assert all(r["args_digest"] for r in invocations if r["decision"] == "allow")
