"""Rotation without restart, under load: the broker's certificate and its signing key follow their files."""

from __future__ import annotations

import asyncio
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography import x509

from broker.dev.pki import CLIENT_AUTH, SERVER_AUTH, issue_certificate, write_pem_cert, write_pem_key
from broker.jose import generate_ec_jwk, write_private_jwk
from broker.resources import WATCHER
from tests.certfactory import Pki, client_ssl_context
from tests.conftest import BrokerFactory, BrokerUnderTest, RecordingUpstream, base_config

TOOL = "/v1/tools/approveExpense"
INVOICE = {"invoice_id": "INV-1", "amount": 1}


@pytest.fixture
async def rotating(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> BrokerUnderTest:
    """A broker whose certificate, key and signing key are copies it watches (the session PKI stays intact)."""
    own = tmp_path / "own"
    own.mkdir()
    for name in ("broker.pem", "broker-key.pem", "broker-signing.jwk"):
        shutil.copy(pki.root / name, own / name)
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["server"]["tls"].update(cert=str(own / "broker.pem"), key=str(own / "broker-key.pem"))
    config["signing"]["key_file"] = str(own / "broker-signing.jwk")
    config["tools"][0]["txn_token"] = "required"
    return await broker_factory(config)


async def served_certificate(broker: BrokerUnderTest) -> x509.Certificate:
    host, port = broker.running.main_address
    ctx = client_ssl_context(broker.pki, *broker.pki.agent("expense-assistant")[:2])
    _, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return x509.load_der_x509_certificate(der)


def new_broker_certificate(pki: Pki, folder: Path, *, mismatched_key: bool = False) -> x509.Certificate:
    ca_cert, ca_key = pki.load_ca()
    cert, key = issue_certificate(
        ca_cert,
        ca_key,
        common_name="broker (rotated)",
        dns=["localhost"],
        ips=["127.0.0.1"],
        uris=["spiffe://example.org/broker"],
        eku=(SERVER_AUTH, CLIENT_AUTH),
        not_before=pki.now - timedelta(minutes=1),
        not_after=pki.now + timedelta(days=1),
    )
    write_pem_cert(folder / "broker.pem", cert)
    if mismatched_key:
        _, other = issue_certificate(
            ca_cert, ca_key, common_name="other", not_before=pki.now, not_after=pki.now + timedelta(days=1)
        )
        write_pem_key(folder / "broker-key.pem", other)
    else:
        write_pem_key(folder / "broker-key.pem", key)
    return cert


async def load(caller: Any, count: int) -> list[int]:
    replies = await asyncio.gather(*(caller.call("GET", "/v1/tools") for _ in range(count)))
    return [r.status for r in replies]


async def test_server_certificate_rotates_under_load_without_a_failed_request(
    rotating: BrokerUnderTest,
) -> None:
    before = await served_certificate(rotating)
    caller = rotating.caller()
    in_flight = asyncio.create_task(load(caller, 30))
    await asyncio.sleep(0)  # let the first requests start before the files change
    rotated = new_broker_certificate(rotating.pki, Path(rotating.config_path).parent / "own")
    assert rotating.running.app[WATCHER].check() == ["server_tls"]
    assert await in_flight == [200] * 30
    after = await served_certificate(rotating)
    assert after.serial_number == rotated.serial_number != before.serial_number
    assert await load(caller, 5) == [200] * 5


async def test_a_broken_certificate_pair_is_refused_and_the_old_one_keeps_serving(
    rotating: BrokerUnderTest,
) -> None:
    before = await served_certificate(rotating)
    new_broker_certificate(rotating.pki, Path(rotating.config_path).parent / "own", mismatched_key=True)
    assert rotating.running.app[WATCHER].check() == []
    assert (await served_certificate(rotating)).serial_number == before.serial_number
    async with aiohttp.ClientSession() as s, s.get(rotating.admin_url + "/metrics") as resp:
        assert 'broker_rotations_total{result="failure",what="server_tls"} 1.0' in await resp.text()


async def test_signing_key_rotates_with_overlap(rotating: BrokerUnderTest) -> None:
    agent = rotating.caller()
    old_txn = (await agent.exchange("approveExpense", INVOICE)).body["access_token"]
    old_kid = jwt.get_unverified_header(old_txn)["kid"]

    new_key = generate_ec_jwk()
    write_private_jwk(Path(rotating.config_path).parent / "own" / "broker-signing.jwk", new_key)
    assert rotating.running.app[WATCHER].check() == ["signing_key"]

    published = [k["kid"] for k in (await agent.call("GET", "/.well-known/jwks.json", auth={})).body["keys"]]
    assert published == [new_key["kid"], old_kid]
    # a token signed before the rotation is still honoured while its key is published
    invoked = await agent.call("POST", TOOL, INVOICE, headers={"Txn-Token": old_txn})
    assert invoked.status == 200, invoked.body
    new_txn = (await agent.exchange("approveExpense", INVOICE)).body["access_token"]
    assert jwt.get_unverified_header(new_txn)["kid"] == new_key["kid"]
    assert (await agent.call("POST", TOOL, INVOICE, headers={"Txn-Token": new_txn})).status == 200
    rotations = [r["reason"] for r in rotating.audit_records() if r.get("source") == "rotation"]
    assert rotations == ["rotated signing_key"]
