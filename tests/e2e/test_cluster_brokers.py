"""Two broker processes behind one public URL, sharing a throwaway 3-master Redis Cluster (``redis+cluster://``).

What one broker records, the other enforces: a DPoP proof used on one is refused on the other (RFC 9449 §11.1),
a txn token consumed on one is refused on the other (CONTRACT §5, single use), a counter fed by both limits both
(CONTRACT §6), and a revocation posted to one broker's admin API refuses the other's next call (CONTRACT §9).

Both brokers have the same ``public_url`` (``https://localhost:8443``), as replicas behind a load balancer do:
proofs (``htu``) and txn tokens (``iss``) name it. The clients are :class:`broker.sdk.agent.AgentClient` with a
resolver that sends ``localhost:8443`` to one broker's real port — the load balancer's choice, made by the test.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.abc import AbstractResolver, ResolveResult

from broker.jose import jwk_thumbprint
from broker.sdk.agent import AgentClient
from tests.certfactory import Pki
from tests.conftest import RecordingUpstream, recording_upstream
from tests.e2e.test_cli import broker_process, redis_config, wait_ready
from tests.redisutil import ThrowawayCluster, throwaway_cluster
from tests.tokenfactory import make_token

pytestmark = [pytest.mark.slow, pytest.mark.redis]
#: async tests share the module's event loop, where the cluster, the upstream and the brokers live
shared_loop = pytest.mark.asyncio(loop_scope="module")

PUBLIC_HOST, PUBLIC_PORT = "localhost", 8443
APPROVE = "approveExpense"
TRANSFER = "transferFunds"  # txn_token: required — the agent exchanges first (CONTRACT §5)
COUNTED_LIMIT = 3


class ToBroker(AbstractResolver):
    """Resolves the public name to one broker's loopback port: which replica the load balancer picked."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        assert (host, port) == (PUBLIC_HOST, PUBLIC_PORT), (host, port)
        return [
            ResolveResult(
                hostname=host, host="127.0.0.1", port=self.port, family=socket.AF_INET, proto=0, flags=0
            )
        ]

    async def close(self) -> None:
        return None


class RoutedClient(AgentClient):
    """An :class:`AgentClient` for the public URL whose connections go to one chosen broker."""

    def __init__(self, broker_port: int, **kwargs: Any) -> None:
        super().__init__(f"https://{PUBLIC_HOST}:{PUBLIC_PORT}", **kwargs)
        self._broker_port = broker_port

    async def __aenter__(self) -> RoutedClient:
        connector = aiohttp.TCPConnector(ssl=self._ssl or True, resolver=ToBroker(self._broker_port))
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self


def configure(config: dict[str, Any], upstream_url: str) -> dict[str, Any]:
    """Add a tool that needs a txn token, and a counter that denies the 4th approval in 10 minutes."""
    transfer = json.loads(json.dumps(config["tools"][0]))
    transfer.update(name=TRANSFER, txn_token="required", upstream={"url": f"{upstream_url}/transfer"})
    config["tools"].append(transfer)
    config["counters"] = [{"name": "approvals_10m", "tools": [APPROVE], "window_seconds": 600}]
    config["policies"].insert(
        0,
        {
            "id": "velocity",
            "tools": [APPROVE],
            "effect": "deny",
            "when": f"counters.approvals_10m.count >= {COUNTED_LIMIT}",
            "reason": "too many approvals in 10 minutes",
        },
    )
    return config


# -- the module's cluster, upstream and two brokers ----------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster() -> AsyncIterator[ThrowawayCluster]:
    async with throwaway_cluster(masters=3) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def upstream(pki: Pki) -> AsyncIterator[RecordingUpstream]:
    async with recording_upstream(pki) as recorder:
        yield recorder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster-brokers")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def brokers(
    pki: Pki, workdir: Path, upstream: RecordingUpstream, cluster: ThrowawayCluster
) -> AsyncIterator[list[dict[str, Any]]]:
    """Two ``python -m broker run`` processes: same public URL, same signing key, same cluster and prefix."""
    with ExitStack() as stack:
        running = []
        for name in ("a", "b"):
            config = redis_config(pki, workdir, upstream.url, cluster.url, "brokers:")
            config["audit"]["file"] = str(workdir / f"audit-{name}.jsonl")
            configure(config, upstream.url)
            process = stack.enter_context(broker_process(config, workdir, name))
            admin = f"http://{config['server']['admin_listen']}"
            port = int(config["server"]["listen"].rsplit(":", 1)[1])
            running.append({"admin": admin, "port": port, "audit": config["audit"]["file"], **process})
        for broker in running:
            await wait_ready(broker["admin"], broker["proc"], broker["log"])
        yield running


class Agent:
    """One fresh subject (tests share the brokers) acting through the expense assistant, on either broker."""

    def __init__(self, pki: Pki, brokers: list[dict[str, Any]]) -> None:
        self.pki, self.brokers = pki, brokers
        self.sub = f"user-{uuid.uuid4().hex[:8]}"
        files = pki.agent("expense-assistant")
        self.files = files
        self.dpop = json.loads(files.dpop_jwk.read_text())
        agent_id = pki.agent_id("expense-assistant")
        self.token = make_token(
            json.loads(pki.idp_jwk.read_text()),
            claims={
                "sub": self.sub,
                "cnf": {"jkt": jwk_thumbprint(self.dpop)},
                "act": {"sub": agent_id},
                "client_id": agent_id,
            },
            now=int(time.time()),
        )

    def on(self, index: int) -> RoutedClient:
        return RoutedClient(
            self.brokers[index]["port"],
            ca=self.pki.ca,
            cert=self.files.cert,
            key=self.files.key,
            dpop_jwk=self.dpop,
            access_token=self.token,
        )


@pytest.fixture
def agent(pki: Pki, brokers: list[dict[str, Any]]) -> Agent:
    return Agent(pki, brokers)


INVOICE = {"invoice_id": "INV-1", "amount": 10}


def refusals(broker: dict[str, Any], subject: str) -> list[str]:
    """The reasons of the refused requests of ``subject`` in the broker's audit log (written before it answers)."""
    records = [json.loads(line) for line in Path(broker["audit"]).read_text().splitlines() if line.strip()]
    return [r["reason"] for r in records if r.get("subject") == subject and r["decision"] != "allow"]


# -- the checks ----------------------------------------------------------------------------------------------


@shared_loop
async def test_a_proof_used_on_one_broker_is_refused_on_the_other(
    agent: Agent, brokers: list[dict[str, Any]], upstream: RecordingUpstream
) -> None:
    before = len(upstream.received)
    async with agent.on(0) as a, agent.on(1) as b:
        proof = a.proof_for("POST", f"/v1/tools/{APPROVE}")
        first = await a.request("POST", f"/v1/tools/{APPROVE}", json=INVOICE, headers={"DPoP": proof})
        replayed = await b.request("POST", f"/v1/tools/{APPROVE}", json=INVOICE, headers={"DPoP": proof})
        fresh = await b.call_tool(APPROVE, INVOICE)  # the same agent with a new proof is fine
    assert first.status == 200
    assert (replayed.status, replayed.error) == (401, "invalid_dpop_proof")
    assert refusals(brokers[1], agent.sub) == ["dpop_replay"]
    assert fresh.status == 200
    assert len(upstream.received) - before == 2


@shared_loop
@pytest.mark.parametrize(("mint_on", "use_on", "reuse_on"), [(0, 0, 1), (0, 1, 0)], ids=["a-a-b", "a-b-a"])
async def test_a_txn_token_consumed_on_one_broker_is_refused_on_the_other(
    agent: Agent,
    brokers: list[dict[str, Any]],
    upstream: RecordingUpstream,
    mint_on: int,
    use_on: int,
    reuse_on: int,
) -> None:
    before = len(upstream.received)
    async with agent.on(mint_on) as minter, agent.on(use_on) as user, agent.on(reuse_on) as reuser:
        exchanged = await minter.exchange(TRANSFER, INVOICE)
        assert exchanged.status == 200, exchanged.body
        txn_token = exchanged.json()["access_token"]
        used = await user.call_tool(TRANSFER, INVOICE, txn_token=txn_token)
        reused = await reuser.call_tool(TRANSFER, INVOICE, txn_token=txn_token)
        without = await reuser.call_tool(TRANSFER, INVOICE)
    assert used.status == 200, used.body
    assert (reused.status, reused.error) == (403, "invalid_txn_token")
    assert (without.status, without.error) == (403, "invalid_txn_token")
    assert refusals(brokers[reuse_on], agent.sub) == ["txn_replayed", "txn_missing"]
    assert len(upstream.received) - before == 1


@shared_loop
async def test_a_counter_fed_by_both_brokers_limits_both(
    agent: Agent, brokers: list[dict[str, Any]], upstream: RecordingUpstream
) -> None:
    before = len(upstream.received)
    async with agent.on(0) as a, agent.on(1) as b:
        allowed = [await (a if i % 2 else b).call_tool(APPROVE, INVOICE) for i in range(COUNTED_LIMIT)]
        over = [await a.call_tool(APPROVE, INVOICE), await b.call_tool(APPROVE, INVOICE)]
    assert [r.status for r in allowed] == [200] * COUNTED_LIMIT
    # a deny rule that does not read the arguments hides the tool (CONTRACT: answered like a missing tool)
    assert [(r.status, r.error) for r in over] == [(404, "unknown_tool")] * 2
    velocity = "hidden: velocity: too many approvals in 10 minutes"
    assert [refusals(broker, agent.sub) for broker in brokers] == [[velocity], [velocity]]
    assert len(upstream.received) - before == COUNTED_LIMIT


@shared_loop
async def test_a_revocation_posted_to_one_broker_refuses_the_other(
    agent: Agent, brokers: list[dict[str, Any]], upstream: RecordingUpstream
) -> None:
    before = len(upstream.received)
    async with agent.on(0) as a, agent.on(1) as b:
        assert (await b.call_tool(APPROVE, INVOICE)).status == 200
        async with (
            aiohttp.ClientSession() as admin,
            admin.post(
                f"{brokers[0]['admin']}/admin/revocations", json={"kind": "sub", "value": agent.sub}
            ) as resp,
        ):
            assert resp.status == 200
        on_b, on_a = await b.call_tool(APPROVE, INVOICE), await a.call_tool(APPROVE, INVOICE)
    assert [(r.status, r.error) for r in (on_b, on_a)] == [(401, "invalid_token")] * 2
    assert [refusals(broker, agent.sub) for broker in brokers] == [["revoked_sub"], ["revoked_sub"]]
    assert len(upstream.received) - before == 1
