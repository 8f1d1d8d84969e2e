"""The demo expense backend (CONTRACT §11, §5 "Propagation") and the bench pieces, over real mTLS on 127.0.0.1.

Each test gets a fresh backend on a fresh SQLite file (port 0); clients present certificates from the
session's §10 PKI (the ``pki`` fixture of ``tests/conftest.py``, made by :func:`tests.certfactory.make_pki`).
Tool calls are sent the way the broker sends them (:class:`Broker`): a txn token minted with the PKI's broker
signing key over the agent's arguments, carrying the injected department, and the body with it set. Every
refusal also checks that nothing was approved.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from broker.dev.bench import bareproxy
from broker.dev.bench.loadgen import run_load
from broker.dev.demo.expense import TOOLS, build_app, https_url, serve, serve_unverified
from broker.jose import Signer, generate_ec_jwk
from broker.sdk.backend import public_jwks_from_file, txn_token_middleware
from broker.txn.tokens import mint_txn_token
from tests.certfactory import Pki, client_ssl_context, mint_untrusted_cert

BROKER_URL = "https://localhost:8443"
TRUST_DOMAIN = "example.org"
ACTOR = "spiffe://example.org/agents/expense-assistant"
ACME = {"name": "Acme Office Supply", "bank_account": "DE89370400440532013000"}
#: what the agent asks for; the broker injects the subject's department before forwarding
AGENT_8831: dict[str, Any] = {"invoice_id": "INV-8831", "amount": 4800}
APPROVE_8831: dict[str, Any] = {**AGENT_8831, "department": "42"}
STRANGER = Signer.from_jwk(generate_ec_jwk())
NO_TOKEN = "<no Txn-Token header>"
#: Broker.call's default ``injected``: ``{"department": department}``, as the broker injects for both tools
DEPARTMENT_ONLY: Any = object()


def mint(signer: Signer, arguments: dict[str, Any], *, tool: str, **overrides: Any) -> str:
    """A txn token as the broker mints it for alice via expense-assistant; ``overrides`` replace parameters."""
    params: dict[str, Any] = {
        "issuer": BROKER_URL,
        "audience": TRUST_DOMAIN,
        "subject": "alice",
        "scope": f"tool:{tool}",
        "actor_id": ACTOR,
        "tool": tool,
        "arguments": arguments,
        "policy_version": "0123456789ab",
        "cnf_jkt": None,
        "req_ip": "127.0.0.1",
        "authn": "dpop",
        "now": time.time(),
        **overrides,
    }
    return mint_txn_token(signer, **params).token


@dataclass
class Broker:
    """Calls the backend as the broker does; every keyword of :meth:`call` breaks one thing of an honest call."""

    session: aiohttp.ClientSession
    url: str
    signer: Signer

    def token(self, path: str, arguments: dict[str, Any], department: str = "42") -> str:
        """An honest token for ``path`` with the injected ``department``."""
        return mint(self.signer, arguments, tool=TOOLS[path], injected={"department": department})

    async def call(
        self,
        path: str = "/approve",
        arguments: dict[str, Any] = AGENT_8831,
        *,
        department: str = "42",
        injected: Any = DEPARTMENT_ONLY,
        body: Any = None,
        token: str | None = None,
        signer: Signer | None = None,
        **mint_overrides: Any,
    ) -> tuple[int, Any]:
        """``department`` is the injected one (``injected`` replaces the whole ``tctx.injected``); ``body``
        replaces the honest body, ``token`` the honest token (``NO_TOKEN``: no header); ``signer`` and the rest
        go to :func:`mint`."""
        if injected is DEPARTMENT_ONLY:
            injected = {"department": department}
        if token is None:
            token = mint(
                signer or self.signer, arguments, tool=TOOLS[path], injected=injected, **mint_overrides
            )
        if body is None:
            body = {**arguments, **(injected or {})}
        return await post(self.session, self.url + path, body, None if token == NO_TOKEN else token)


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, token: str | None = None
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Txn-Token"] = token
    async with session.post(url, data=data, headers=headers) as r:
        return r.status, await r.json()


@pytest.fixture(scope="module")
def agent_ssl(pki: Pki) -> ssl.SSLContext:
    cert, key, _ = pki.agent("expense-assistant")
    return client_ssl_context(pki, cert, key)


@pytest.fixture
async def client(agent_ssl: ssl.SSLContext) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=agent_ssl)) as session:
        yield session


@pytest.fixture
async def backend(pki: Pki, tmp_path: Path) -> AsyncIterator[str]:
    """The verifying backend with its defaults: the PKI's private broker-signing.jwk (public part used)."""
    runner = await serve("127.0.0.1:0", certs=pki.root, db_path=tmp_path / "expense.db")
    try:
        yield https_url(runner)
    finally:
        await runner.cleanup()


@pytest.fixture
def broker(pki: Pki, backend: str, client: aiohttp.ClientSession) -> Broker:
    return Broker(client, backend, Signer.from_file(pki.signing_jwk))


async def status_of(broker: Broker, invoice_id: str, department: str = "42") -> str:
    _, body = await broker.call("/invoices", {}, department=department)
    rows: dict[str, dict[str, Any]] = {row["invoice_id"]: row for row in body["invoices"]}
    return str(rows[invoice_id]["status"])


# --- /approve -------------------------------------------------------------------------------------------


async def test_approve_returns_the_approved_invoice_with_vendor(broker: Broker) -> None:
    status, body = await broker.call()
    assert status == 200
    assert body == {**APPROVE_8831, "status": "approved", "vendor": ACME, "approved_by": "alice"}
    assert await status_of(broker, "INV-8831") == "approved"


@pytest.mark.parametrize(
    ("arguments", "status", "error"),
    [
        ({**AGENT_8831, "invoice_id": "INV-0000"}, 404, "unknown_invoice"),
        ({**AGENT_8831, "amount": 4900}, 409, "amount_mismatch"),
        ({**AGENT_8831, "amount": 4800.01}, 409, "amount_mismatch"),
        ({**AGENT_8831, "amount": "4800"}, 400, "invalid_request"),
        ({**AGENT_8831, "amount": True}, 400, "invalid_request"),
        ({**AGENT_8831, "invoice_id": 8831}, 400, "invalid_request"),
        ({"invoice_id": "INV-8831"}, 400, "invalid_request"),
    ],
    ids=["unknown-invoice", "amount-differs", "amount-differs-by-cents", "amount-as-string", "amount-as-bool",
         "invoice-id-not-string", "amount-missing"],
)  # fmt: skip
async def test_approve_refuses_and_leaves_the_invoice_pending(
    broker: Broker, arguments: dict[str, Any], status: int, error: str
) -> None:
    got_status, got = await broker.call("/approve", arguments)
    assert (got_status, got["error"]) == (status, error)
    assert await status_of(broker, "INV-8831") == "pending"


@pytest.mark.parametrize(
    ("arguments", "department", "owner"),
    [
        ({"invoice_id": "INV-7", "amount": 350}, "42", "7"),
        (AGENT_8831, "7", "42"),
        ({"invoice_id": "INV-7", "amount": 350, "department": "7"}, "42", "7"),
    ],
    ids=["dept-42-approves-dept-7", "dept-7-approves-dept-42", "agent-asked-for-7-broker-injected-42"],
)
async def test_approve_of_another_departments_invoice_is_refused(
    broker: Broker, arguments: dict[str, Any], department: str, owner: str
) -> None:
    status, body = await broker.call("/approve", arguments, department=department)
    assert (status, body["error"]) == (403, "department_mismatch")
    assert await status_of(broker, str(arguments["invoice_id"]), department=owner) == "pending"


@pytest.mark.parametrize(
    ("path", "arguments", "injected", "body"),
    [
        # an old-style token without tctx.injected: the verifier lets "department" differ, so it proves nothing
        ("/approve", AGENT_8831, None, APPROVE_8831),
        ("/invoices", {}, None, {"department": "42"}),
        ("/approve", AGENT_8831, {"cost_center": "CC-1"}, None),
        ("/invoices", {}, {"cost_center": "CC-1"}, None),
        ("/approve", AGENT_8831, {"department": 42}, None),
        ("/invoices", {}, {"department": 42}, None),
    ],
    ids=["approve-no-tctx-injected", "invoices-no-tctx-injected", "approve-injected-without-department",
         "invoices-injected-without-department", "approve-department-not-string",
         "invoices-department-not-string"],
)  # fmt: skip
async def test_a_token_without_an_injected_department_is_refused(
    broker: Broker, path: str, arguments: dict[str, Any], injected: dict[str, Any] | None, body: Any
) -> None:
    status, got = await broker.call(path, arguments, injected=injected, body=body)
    assert (status, got["error"]) == (403, "no_department")
    assert await status_of(broker, "INV-8831") == "pending"


async def test_approve_accepts_the_same_amount_as_a_float(broker: Broker) -> None:
    status, body = await broker.call("/approve", {**AGENT_8831, "amount": 4800.0})
    assert (status, body["status"], body["amount"]) == (200, "approved", 4800)


async def test_reapproval_is_idempotent(broker: Broker) -> None:
    first = await broker.call(subject="alice")
    again = await broker.call(subject="bob")
    assert first == again
    assert first[1]["approved_by"] == "alice"


# --- /invoices: row-level security from the token -----------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "department", "departments", "must_include"),
    [
        ({}, "42", {"42"}, "INV-8831"),
        ({}, "7", {"7"}, "INV-7"),
        ({"department": "7"}, "42", {"42"}, "INV-9003"),
        ({"department": "42"}, "99", set(), None),
    ],
    ids=["dept-42", "dept-7", "agent-asked-for-7-broker-injected-42", "unknown-department-empty"],
)
async def test_invoices_returns_only_the_tokens_department(
    broker: Broker,
    arguments: dict[str, Any],
    department: str,
    departments: set[str],
    must_include: str | None,
) -> None:
    status, got = await broker.call("/invoices", arguments, department=department)
    assert status == 200
    assert {row["department"] for row in got["invoices"]} == departments
    if must_include is not None:
        row = next(row for row in got["invoices"] if row["invoice_id"] == must_include)
        assert set(row) == {"invoice_id", "amount", "department", "status", "vendor"}
        assert row["status"] == "pending"


async def test_invoices_ignores_the_bodys_department_even_without_the_body_check(
    pki: Pki,
    tmp_path: Path,
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]],
) -> None:
    # Defence in depth: with the verifier's body check off, a body asking for "7" still gets "42"'s rows.
    verifier = txn_token_middleware(
        jwks=public_jwks_from_file(pki.signing_jwk),
        issuer=BROKER_URL,
        audience=TRUST_DOMAIN,
        tools=TOOLS,
        check_body=False,
    )
    app = await aiohttp_client(build_app(tmp_path / "expense.db", verifier=verifier))
    token = mint(Signer.from_file(pki.signing_jwk), {}, tool="listInvoices", injected={"department": "42"})
    async with app.post("/invoices", json={"department": "7"}, headers={"Txn-Token": token}) as r:
        assert r.status == 200
        assert {row["department"] for row in (await r.json())["invoices"]} == {"42"}


# --- the Txn-Token: every refusal is 401 and reaches no handler ------------------------------------------------


TOKEN_REFUSALS: list[Any] = [
    pytest.param("/approve", lambda b: {"token": NO_TOKEN}, id="approve-missing-token"),
    pytest.param("/invoices", lambda b: {"token": NO_TOKEN}, id="invoices-missing-token"),
    pytest.param("/approve", lambda b: {"token": "not-a-jws"}, id="malformed"),
    pytest.param("/approve", lambda b: {"signer": STRANGER}, id="unknown-key"),
    pytest.param(
        "/approve",
        lambda b: {"signer": Signer(key=STRANGER.key, kid=b.signer.kid, alg="ES256")},
        id="forged-signature-with-the-brokers-kid",
    ),
    pytest.param("/approve", lambda b: {"issuer": "https://other-broker:8443"}, id="other-issuer"),
    pytest.param("/approve", lambda b: {"audience": "other.example"}, id="other-trust-domain"),
    pytest.param("/approve", lambda b: {"now": time.time() - 400}, id="expired"),
    pytest.param(
        "/approve", lambda b: {"token": b.token("/invoices", AGENT_8831)}, id="token-for-another-tool"
    ),
    pytest.param(
        "/approve", lambda b: {"body": {**APPROVE_8831, "amount": 4900}}, id="body-differs-from-token"
    ),
    pytest.param(
        "/approve", lambda b: {"body": {**APPROVE_8831, "department": "7"}}, id="forged-injected-department"
    ),
    pytest.param(
        "/invoices", lambda b: {"body": {"department": "7"}}, id="invoices-forged-injected-department"
    ),
    pytest.param(
        "/approve", lambda b: {"body": b'{"invoice_id": "INV-8831", "amount": NaN}'}, id="body-not-json"
    ),
]


@pytest.mark.parametrize(("path", "row"), TOKEN_REFUSALS)
async def test_token_refusals(broker: Broker, path: str, row: Callable[[Broker], dict[str, Any]]) -> None:
    status, body = await broker.call(path, AGENT_8831 if path == "/approve" else {}, **row(broker))
    assert (status, body["error"]) == (401, "invalid_txn_token")
    assert await status_of(broker, "INV-8831") == "pending"


@pytest.mark.parametrize(
    ("path", "arguments"), [("/approve", AGENT_8831), ("/invoices", {})], ids=["approve", "invoices"]
)
async def test_a_replayed_token_is_refused(broker: Broker, path: str, arguments: dict[str, Any]) -> None:
    token = broker.token(path, arguments)
    assert (await broker.call(path, arguments, token=token))[0] == 200
    status, body = await broker.call(path, arguments, token=token)
    assert (status, body["error"]) == (401, "invalid_txn_token")
    assert (await broker.call(path, arguments))[0] == 200  # a fresh txn is unaffected


@pytest.mark.parametrize(
    ("options", "status"),
    [
        (lambda pki, tmp: {"broker_jwks": _write(tmp, {"keys": [Signer.from_file(pki.signing_jwk).public_jwk()]})},
         200),
        (lambda pki, tmp: {"broker_jwks": _write(tmp, Signer.from_file(pki.signing_jwk).public_jwk())}, 200),
        (lambda pki, tmp: {"broker_jwks": _write(tmp, {"keys": [STRANGER.public_jwk()]})}, 401),
        (lambda pki, tmp: {"broker_url": "https://broker.example.org"}, 401),
        (lambda pki, tmp: {"trust_domain": "other.example"}, 401),
    ],
    ids=["public-jwks-file", "public-jwk-file", "another-brokers-keys", "other-broker-url", "other-trust-domain"],
)  # fmt: skip
async def test_serve_options_choose_keys_issuer_and_audience(
    pki: Pki, tmp_path: Path, client: aiohttp.ClientSession, options: Any, status: int
) -> None:
    runner = await serve("127.0.0.1:0", certs=pki.root, db_path=tmp_path / "e.db", **options(pki, tmp_path))
    try:
        broker = Broker(client, https_url(runner), Signer.from_file(pki.signing_jwk))
        assert (await broker.call("/invoices", {}))[0] == status
    finally:
        await runner.cleanup()


def _write(folder: Path, document: Any) -> Path:
    path = folder / "broker-keys.json"
    path.write_text(json.dumps(document))
    return path


async def test_without_a_verifier_the_tool_routes_are_closed(
    tmp_path: Path,
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]],
) -> None:
    app = await aiohttp_client(build_app(tmp_path / "expense.db"))
    for path in TOOLS:
        async with app.post(path, json={**APPROVE_8831}) as r:
            assert (r.status, (await r.json())["error"]) == (401, "invalid_txn_token")
    async with app.get("/healthz") as r:
        assert r.status == 200


def test_build_app_takes_a_verifier_or_no_verify_not_both(pki: Pki, tmp_path: Path) -> None:
    verifier = txn_token_middleware(
        jwks=public_jwks_from_file(pki.signing_jwk), issuer=BROKER_URL, audience=TRUST_DOMAIN
    )
    with pytest.raises(ValueError):
        build_app(tmp_path / "expense.db", verifier=verifier, no_verify=True)


async def test_approval_persists_across_restarts(
    pki: Pki, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    db_path = tmp_path / "persist.db"
    signer = Signer.from_file(pki.signing_jwk)
    runner = await serve("127.0.0.1:0", certs=pki.root, db_path=db_path)
    try:
        assert (await Broker(client, https_url(runner), signer).call())[0] == 200
    finally:
        await runner.cleanup()
    runner = await serve("127.0.0.1:0", certs=pki.root, db_path=db_path)
    try:
        broker = Broker(client, https_url(runner), signer)
        assert await status_of(broker, "INV-8831") == "approved"
        status, body = await broker.call(subject="bob")
        assert (status, body["approved_by"]) == (200, "alice")
    finally:
        await runner.cleanup()


# --- /_received -----------------------------------------------------------------------------------------


async def test_received_shows_headers_and_body_as_sent(broker: Broker, backend: str) -> None:
    token = broker.token("/invoices", {})
    headers = [("Content-Type", "application/json"), ("Txn-Token", token), ("X-Dup", "a"), ("X-Dup", "b")]
    async with broker.session.post(backend + "/invoices", data=b'{"department": "42"}', headers=headers) as r:
        assert r.status == 200
    async with broker.session.post(backend + "/invoices", json={}, headers={"Txn-Token": "t.o.k"}) as r:
        assert r.status == 401  # refused, and still recorded: the record is what arrived
    async with broker.session.get(backend + "/healthz") as r:
        assert r.status == 200
    async with broker.session.get(backend + "/_received") as r:
        received = (await r.json())["requests"]
    assert len(received) == 2  # health checks and reads of the record are not recorded
    entry, refused = received
    assert (entry["method"], entry["path"], entry["json"]) == ("POST", "/invoices", {"department": "42"})
    assert entry["body"] == '{"department": "42"}'
    assert entry["headers"]["txn-token"] == token
    assert entry["headers"]["x-dup"] == "a, b"
    assert refused["headers"]["txn-token"] == "t.o.k"


async def test_received_keeps_only_the_last_100(broker: Broker, backend: str) -> None:
    for seq in range(105):
        async with broker.session.post(backend + "/invoices", json={}, headers={"X-Seq": str(seq)}) as r:
            assert r.status == 401
    async with broker.session.get(backend + "/_received") as r:
        received = (await r.json())["requests"]
    assert [int(entry["headers"]["x-seq"]) for entry in received] == list(range(5, 105))
    async with broker.session.delete(backend + "/_received") as r:
        assert r.status == 200
    async with broker.session.get(backend + "/_received") as r:
        assert (await r.json())["requests"] == []


# --- --no-verify: the bench's raw backend ------------------------------------------------------------------


@pytest.fixture
async def raw_backend(pki: Pki, tmp_path: Path) -> AsyncIterator[str]:
    runner = await serve_unverified("127.0.0.1:0", certs=pki.root, db_path=tmp_path / "raw.db")
    try:
        yield https_url(runner)
    finally:
        await runner.cleanup()


async def test_unverified_backend_trusts_the_body(raw_backend: str, client: aiohttp.ClientSession) -> None:
    status, got = await post(client, raw_backend + "/invoices", {"department": "7"})
    assert (status, {row["department"] for row in got["invoices"]}) == (200, {"7"})
    assert (await post(client, raw_backend + "/invoices", {}))[1]["error"] == "no_department"
    status, got = await post(client, raw_backend + "/approve", APPROVE_8831)
    assert (status, got["approved_by"]) == (200, "unverified")


# --- TLS: only holders of a CA-issued certificate get in ------------------------------------------------


@pytest.fixture
async def bare(pki: Pki, raw_backend: str) -> AsyncIterator[str]:
    runner = await bareproxy.serve(
        "127.0.0.1:0", certs=pki.root, routes={"listInvoices": raw_backend + "/invoices"}
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
    raw_backend: str,
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
    for url in (backend, raw_backend):
        async with client.get(url + "/_received") as r:
            assert (await r.json())["requests"] == []  # nothing reached either backend


# --- the bench pieces -----------------------------------------------------------------------------------


async def test_bare_forwarder_relays_body_and_status(
    raw_backend: str, bare: str, client: aiohttp.ClientSession
) -> None:
    direct = await post(client, raw_backend + "/invoices", {"department": "42"})
    relayed = await post(client, bare + "/v1/tools/listInvoices", {"department": "42"})
    assert relayed == direct and direct[0] == 200
    assert (await post(client, bare + "/v1/tools/nope", {}))[0] == 404


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
@pytest.mark.parametrize(
    ("flags", "no_token_status"), [([], 401), (["--no-verify"], 200)], ids=["verifying", "no-verify"]
)
async def test_cli_prints_where_it_listens_and_stops_on_sigterm(
    pki: Pki, tmp_path: Path, client: aiohttp.ClientSession, flags: list[str], no_token_status: int
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.dev.demo.expense", "--listen", "127.0.0.1:0",
        "--certs", str(pki.root), "--db", str(tmp_path / "cli.db"), *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        url = line.split(" on ", 1)[1].split()[0]
        async with client.get(url + "/healthz") as r:
            assert r.status == 200
        assert (await post(client, url + "/invoices", {"department": "42"}))[0] == no_token_status
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.slow
def test_cli_refuses_an_unreadable_broker_key_file(pki: Pki, tmp_path: Path) -> None:
    import subprocess

    missing = tmp_path / "missing.jwk"
    result = subprocess.run(
        [sys.executable, "-m", "broker.dev.demo.expense", "--listen", "127.0.0.1:0", "--certs", str(pki.root),
         "--db", str(tmp_path / "cli.db"), "--broker-jwks", str(missing)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and str(missing) in result.stderr
