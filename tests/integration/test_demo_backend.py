"""The demo expense backend (CONTRACT §11) and the bench pieces, over real mTLS on 127.0.0.1.

Each test gets a fresh backend on a fresh SQLite file (port 0); clients present certificates from the
session's §10 PKI (the ``pki`` fixture of ``tests/conftest.py``, made by :func:`tests.certfactory.make_pki`).
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.bench import bareproxy
from broker.bench.loadgen import run_load
from broker.demo.expense import https_url, serve
from broker.jose import Signer, b64url_encode
from tests.certfactory import Pki, client_ssl_context, mint_untrusted_cert

ACME = {"name": "Acme Office Supply", "bank_account": "DE89370400440532013000"}
APPROVE_8831 = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}


@pytest.fixture(scope="module")
def agent_ssl(pki: Pki) -> ssl.SSLContext:
    cert, key, _ = pki.agent("expense-assistant")
    return client_ssl_context(pki, cert, key)


@pytest.fixture
async def backend(pki: Pki, tmp_path: Path) -> AsyncIterator[str]:
    runner = await serve("127.0.0.1:0", certs=pki.root, db_path=tmp_path / "expense.db")
    try:
        yield https_url(runner)
    finally:
        await runner.cleanup()


@pytest.fixture
async def client(agent_ssl: ssl.SSLContext) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=agent_ssl)) as session:
        yield session


async def call(
    client: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with client.post(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    ) as r:
        return r.status, await r.json()


async def invoice(client: aiohttp.ClientSession, backend: str, invoice_id: str) -> dict[str, Any]:
    _, body = await call(client, backend + "/invoices", {})
    rows: dict[str, dict[str, Any]] = {row["invoice_id"]: row for row in body["invoices"]}
    return rows[invoice_id]


def txn_token(pki: Pki, claims: dict[str, Any]) -> str:
    return Signer.from_file(pki.signing_jwk).sign(claims, typ="txntoken+jwt")


# --- /approve -------------------------------------------------------------------------------------------


async def test_approve_returns_the_approved_invoice_with_vendor(
    pki: Pki, backend: str, client: aiohttp.ClientSession
) -> None:
    status, body = await call(
        client, backend + "/approve", APPROVE_8831, {"Txn-Token": txn_token(pki, {"sub": "alice"})}
    )
    assert status == 200
    assert body == {**APPROVE_8831, "status": "approved", "vendor": ACME, "approved_by": "alice"}
    assert (await invoice(client, backend, "INV-8831"))["status"] == "approved"


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({**APPROVE_8831, "invoice_id": "INV-0000"}, 404, "unknown_invoice"),
        ({**APPROVE_8831, "amount": 4900}, 409, "amount_mismatch"),
        ({**APPROVE_8831, "amount": 4800.01}, 409, "amount_mismatch"),
        ({**APPROVE_8831, "department": "7"}, 409, "department_mismatch"),
        ({**APPROVE_8831, "amount": "4800"}, 400, "invalid_request"),
        ({**APPROVE_8831, "amount": True}, 400, "invalid_request"),
        ({**APPROVE_8831, "invoice_id": 8831}, 400, "invalid_request"),
        ({"invoice_id": "INV-8831", "amount": 4800}, 400, "invalid_request"),
        ([APPROVE_8831], 400, "invalid_request"),
        (b'{"invoice_id": "INV-8831", "amount": NaN, "department": "42"}', 400, "invalid_request"),
        (b'{"invoice_id": "INV-8831"', 400, "invalid_request"),
    ],
    ids=[
        "unknown-invoice", "amount-differs", "amount-differs-by-cents", "other-department",
        "amount-as-string", "amount-as-bool", "invoice-id-not-string", "department-missing",
        "body-not-object", "amount-nan", "broken-json",
    ],
)  # fmt: skip
async def test_approve_refuses_and_leaves_the_invoice_pending(
    backend: str, client: aiohttp.ClientSession, body: Any, status: int, error: str
) -> None:
    got_status, got = await call(client, backend + "/approve", body)
    assert (got_status, got["error"]) == (status, error)
    assert (await invoice(client, backend, "INV-8831"))["status"] == "pending"


async def test_approve_accepts_the_same_amount_as_a_float(
    backend: str, client: aiohttp.ClientSession
) -> None:
    status, body = await call(client, backend + "/approve", {**APPROVE_8831, "amount": 4800.0})
    assert (status, body["status"], body["amount"]) == (200, "approved", 4800)


@pytest.mark.parametrize(
    ("make_header", "approved_by"),
    [
        (lambda pki: None, "unknown"),
        (lambda pki: txn_token(pki, {"sub": "alice"}), "alice"),
        (lambda pki: "not-a-jwt", "unknown"),
        (lambda pki: "a." + b64url_encode(b"not json") + ".c", "unknown"),
        (lambda pki: "a.***.c", "unknown"),
        (lambda pki: txn_token(pki, {"sub": 42}), "unknown"),
        (lambda pki: txn_token(pki, {"txn": "t-1"}), "unknown"),
    ],
    ids=["no-header", "sub-claim", "not-three-parts", "payload-not-json", "payload-not-base64url",
         "sub-not-string", "no-sub"],
)  # fmt: skip
async def test_approved_by_is_the_txn_token_subject(
    pki: Pki, backend: str, client: aiohttp.ClientSession, make_header: Any, approved_by: str
) -> None:
    header = make_header(pki)
    headers = {"Txn-Token": header} if header is not None else {}
    status, body = await call(client, backend + "/approve", APPROVE_8831, headers)
    assert (status, body["approved_by"]) == (200, approved_by)


async def test_reapproval_is_idempotent(pki: Pki, backend: str, client: aiohttp.ClientSession) -> None:
    first = await call(
        client, backend + "/approve", APPROVE_8831, {"Txn-Token": txn_token(pki, {"sub": "alice"})}
    )
    again = await call(
        client, backend + "/approve", APPROVE_8831, {"Txn-Token": txn_token(pki, {"sub": "bob"})}
    )
    assert first == again
    assert first[1]["approved_by"] == "alice"


# --- /invoices ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "departments", "must_include"),
    [
        ({"department": "42"}, {"42"}, "INV-8831"),
        ({"department": "7"}, {"7"}, "INV-7"),
        ({}, {"42", "7"}, "INV-9003"),
        ({"department": "99"}, set(), None),
    ],
    ids=["dept-42", "dept-7", "all-departments", "unknown-department-empty"],
)
async def test_invoices_filters_by_department(
    backend: str, client: aiohttp.ClientSession, body: Any, departments: set[str], must_include: str | None
) -> None:
    status, got = await call(client, backend + "/invoices", body)
    assert status == 200
    assert {row["department"] for row in got["invoices"]} == departments
    if must_include is not None:
        row = next(row for row in got["invoices"] if row["invoice_id"] == must_include)
        assert set(row) == {"invoice_id", "amount", "department", "status", "vendor"}
        assert row["status"] == "pending"


async def test_invoices_refuses_a_non_string_department(backend: str, client: aiohttp.ClientSession) -> None:
    status, got = await call(client, backend + "/invoices", {"department": 42})
    assert (status, got["error"]) == (400, "invalid_request")


async def test_approval_persists_across_restarts(
    pki: Pki, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    db_path = tmp_path / "persist.db"
    runner = await serve("127.0.0.1:0", certs=pki.root, db_path=db_path)
    try:
        headers = {"Txn-Token": txn_token(pki, {"sub": "alice"})}
        assert (await call(client, https_url(runner) + "/approve", APPROVE_8831, headers))[0] == 200
    finally:
        await runner.cleanup()
    runner = await serve("127.0.0.1:0", certs=pki.root, db_path=db_path)
    try:
        url = https_url(runner)
        assert (await invoice(client, url, "INV-8831"))["status"] == "approved"
        status, body = await call(client, url + "/approve", APPROVE_8831)
        assert (status, body["approved_by"]) == (200, "alice")
    finally:
        await runner.cleanup()


# --- /_received -----------------------------------------------------------------------------------------


async def test_received_shows_headers_and_body_as_sent(backend: str, client: aiohttp.ClientSession) -> None:
    headers = [("Content-Type", "application/json"), ("Txn-Token", "t.o.k"), ("X-Dup", "a"), ("X-Dup", "b")]
    async with client.post(backend + "/invoices", data=b'{"department": "42"}', headers=headers) as r:
        assert r.status == 200
    async with client.get(backend + "/healthz") as r:
        assert r.status == 200
    async with client.get(backend + "/_received") as r:
        received = (await r.json())["requests"]
    assert len(received) == 1  # health checks and reads of the record are not recorded
    (entry,) = received
    assert (entry["method"], entry["path"], entry["json"]) == ("POST", "/invoices", {"department": "42"})
    assert entry["body"] == '{"department": "42"}'
    assert entry["headers"]["txn-token"] == "t.o.k"
    assert entry["headers"]["x-dup"] == "a, b"


async def test_received_keeps_only_the_last_100(backend: str, client: aiohttp.ClientSession) -> None:
    for seq in range(105):
        await call(client, backend + "/invoices", {"department": "7"}, {"X-Seq": str(seq)})
    async with client.get(backend + "/_received") as r:
        received = (await r.json())["requests"]
    assert [int(entry["headers"]["x-seq"]) for entry in received] == list(range(5, 105))
    async with client.delete(backend + "/_received") as r:
        assert r.status == 200
    async with client.get(backend + "/_received") as r:
        assert (await r.json())["requests"] == []


# --- TLS: only holders of a CA-issued certificate get in ------------------------------------------------


@pytest.fixture
async def bare(pki: Pki, backend: str) -> AsyncIterator[str]:
    runner = await bareproxy.serve(
        "127.0.0.1:0", certs=pki.root, routes={"listInvoices": backend + "/invoices"}
    )
    try:
        yield https_url(runner)
    finally:
        await runner.cleanup()


def _no_cert(pki: Pki, tmp: Path) -> ssl.SSLContext:
    return client_ssl_context(pki)


def _no_cert_tls12(pki: Pki, tmp: Path) -> ssl.SSLContext:
    ctx = client_ssl_context(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _untrusted_cert(pki: Pki, tmp: Path) -> ssl.SSLContext:
    return client_ssl_context(pki, *mint_untrusted_cert(tmp, "stranger"))


@pytest.mark.parametrize(
    ("server", "path"),
    [("backend", "/invoices"), ("bare", "/v1/tools/listInvoices")],
    ids=["backend", "bare-forwarder"],
)
@pytest.mark.parametrize(
    "make_ctx", [_no_cert, _no_cert_tls12, _untrusted_cert], ids=["no-cert", "no-cert-tls12", "untrusted-ca"]
)
async def test_tls_handshake_refuses_clients_without_a_ca_issued_cert(
    pki: Pki,
    tmp_path: Path,
    backend: str,
    bare: str,
    client: aiohttp.ClientSession,
    server: str,
    path: str,
    make_ctx: Any,
) -> None:
    base = {"backend": backend, "bare": bare}[server]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=make_ctx(pki, tmp_path))) as stranger:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with stranger.post(base + path, json={"department": "42"}) as r:
                await r.read()
    async with client.get(backend + "/_received") as r:
        assert (await r.json())["requests"] == []  # nothing reached the backend


# --- the bench pieces -----------------------------------------------------------------------------------


async def test_bare_forwarder_relays_body_and_status(
    backend: str, bare: str, client: aiohttp.ClientSession
) -> None:
    direct = await call(client, backend + "/invoices", {"department": "42"})
    relayed = await call(client, bare + "/v1/tools/listInvoices", {"department": "42"})
    assert relayed == direct
    assert (await call(client, bare + "/v1/tools/nope", {}))[0] == 404


async def test_run_load_smoke(agent_ssl: ssl.SSLContext, bare: str) -> None:
    body = json.dumps({"department": "42"}).encode()
    result = await run_load(
        bare + "/v1/tools/listInvoices",
        concurrency=4,
        duration=1.0,
        warmup=0.1,
        make_request=lambda: ({"Content-Type": "application/json"}, body),
        ssl_ctx=agent_ssl,
    )
    assert result.rps > 0
    assert result.errors == 0
    assert set(result.status_counts) == {200}
    assert result.p50_ms <= result.p99_ms


@pytest.mark.slow
async def test_cli_prints_where_it_listens_and_stops_on_sigterm(
    pki: Pki, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.demo.expense", "--listen", "127.0.0.1:0",
        "--certs", str(pki.root), "--db", str(tmp_path / "cli.db"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        url = line.split(" on ", 1)[1].split()[0]
        async with client.get(url + "/healthz") as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
