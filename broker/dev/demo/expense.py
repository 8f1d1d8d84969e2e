"""Demo tool backend of the reference scenario (CONTRACT.md §11): expense invoices in SQLite, over mTLS.

Every tool call must carry the broker's ``Txn-Token`` (CONTRACT §5 "Propagation"), checked by
:func:`broker.sdk.backend.txn_token_middleware` with the broker's public key: signature, ``typ``, ``iss`` (the
broker's public URL), ``aud`` (the trust domain), expiry, the tool the token was minted for, the body equal to
what the token says the broker forwards (``tctx.arguments`` with ``tctx.injected`` set over them), and single
use. Every refusal there is ``401 {"error": "invalid_txn_token"}`` and reaches no handler.

Row-level security comes from the token, never from the body: the caller's department is the value the broker
injected (``tctx.injected.department``, taken from the subject's claim). A token without one gets
``403 no_department``.

- ``POST /approve`` ``{"invoice_id", "amount", "department"?}`` → ``200`` the approved invoice
  ``{"invoice_id","status","amount","department","vendor":{"name","bank_account"},"approved_by"}`` with
  ``approved_by`` = the token's ``sub``; ``400 invalid_request`` (malformed body), ``404 unknown_invoice``,
  ``403 department_mismatch`` (the invoice is another department's), ``409 amount_mismatch``. Approving
  twice returns the first approval unchanged (idempotent).
- ``POST /invoices`` ``{"department"?}`` → ``{"invoices":[{"invoice_id","amount","department","status","vendor"}]}``:
  only the rows of the token's department, whatever the body asks for.
- ``GET /healthz``; ``GET /_received`` (and ``DELETE`` to clear): the last 100 requests as received, headers
  and body, refused ones included, so demos and tests can see exactly what the broker forwarded.

Only holders of a certificate issued by ``certs/ca.pem`` (in the scenario: the broker) can connect; the
TLS handshake fails for anyone else (``require_client_cert=True``, TLS 1.2+).

``--no-verify`` is a benchmarking aid and nothing else (``python -m broker.dev.bench`` uses it for the backend all
its rows share, so that the ``backend`` row measures the raw backend): no ``Txn-Token`` is checked, the
department is the body's, ``approved_by`` is ``"unverified"``. Never run a reachable backend with it.

SQLite runs in the event-loop thread on one connection: every query is a point lookup or a scan of a
dozen rows (tens of µs), less than the ~50-100 µs thread hop ``asyncio.to_thread`` would add, and a single
thread needs no lock around the connection. WAL with ``synchronous=NORMAL`` keeps commits off fsync
(only checkpoints sync), so an approval does not stall the loop on the disk either.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sqlite3
import ssl
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from aiohttp import web

from broker.sdk.backend import TXN, TxnTokenMiddleware, public_jwks_from_file, txn_token_middleware

T = TypeVar("T")

#: (invoice_id, department, amount, vendor name, vendor bank account); every invoice starts "pending".
SEED_INVOICES: tuple[tuple[str, str, int, str, str], ...] = (
    ("INV-8831", "42", 4800, "Acme Office Supply", "DE89370400440532013000"),
    ("INV-7", "7", 350, "Seven Seas Catering", "GB29NWBK60161331926819"),
    ("INV-9001", "42", 6000, "Globex Furniture", "FR1420041010050500013M02606"),
    ("INV-9002", "42", 12000, "Initech Consulting", "NL91ABNA0417164300"),
    ("INV-9003", "42", 999999, "Umbrella Fleet Leasing", "IT60X0542811101000000123456"),
    ("INV-9004", "42", 100, "Hooli Coffee Service", "BE68539007547034"),
    ("INV-9005", "7", 1200, "Stark Travel", "ES9121000418450200051332"),
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS invoices (
    invoice_id TEXT PRIMARY KEY,
    department TEXT NOT NULL,
    amount NUMERIC NOT NULL,
    vendor_name TEXT NOT NULL,
    vendor_bank_account TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    approved_by TEXT
)
"""

RECEIVED_LIMIT = 100
#: routes not recorded in ``/_received``: readiness polls and reading the record itself would drown it
_UNRECORDED = frozenset({"/healthz", "/_received"})

#: request path -> the tool a Txn-Token must have been minted for (a token for one never opens the other)
TOOLS: Final = {"/approve": "approveExpense", "/invoices": "listInvoices"}
DEFAULT_BROKER_URL: Final = "https://localhost:8443"
DEFAULT_TRUST_DOMAIN: Final = "example.org"
#: ``approved_by`` under ``--no-verify`` (benchmarking aid): there is no verified subject
UNVERIFIED_SUBJECT: Final = "unverified"

DB: web.AppKey[sqlite3.Connection] = web.AppKey("expense_db")
#: True only under ``--no-verify``: handlers then take the department from the body
NO_VERIFY: web.AppKey[bool] = web.AppKey("expense_no_verify")
#: (method, path, query, header items, body) per request, rendered as JSON only when /_received is read
ReceivedRequest = tuple[str, str, str, tuple[tuple[str, str], ...], bytes]
RECEIVED: web.AppKey[deque[ReceivedRequest]] = web.AppKey("expense_received")


# --- storage --------------------------------------------------------------------------------------------


def open_db(db_path: Path) -> sqlite3.Connection:
    """Open (and on first use create and seed) the invoice DB. Seeding never overwrites an existing row,
    so approvals survive restarts."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db_path)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    with conn:
        conn.execute(_SCHEMA)
        conn.executemany(
            "INSERT OR IGNORE INTO invoices"
            " (invoice_id, department, amount, vendor_name, vendor_bank_account) VALUES (?, ?, ?, ?, ?)",
            SEED_INVOICES,
        )
    return conn


def fetch_invoice(db: sqlite3.Connection, invoice_id: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute(
        "SELECT * FROM invoices WHERE invoice_id = ?", (invoice_id,)
    ).fetchone()
    return row


def invoice_json(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "invoice_id": row["invoice_id"],
        "amount": row["amount"],
        "department": row["department"],
        "status": row["status"],
        "vendor": {"name": row["vendor_name"], "bank_account": row["vendor_bank_account"]},
    }


# --- txn-token verification ---------------------------------------------------------------------------


def backend_verifier(
    broker_jwks: Path, *, broker_url: str = DEFAULT_BROKER_URL, trust_domain: str = DEFAULT_TRUST_DOMAIN
) -> TxnTokenMiddleware:
    """The Txn-Token middleware for this backend: static keys from ``broker_jwks`` (a JWKS or one JWK; a private
    JWK contributes its public part only: :func:`broker.sdk.backend.public_jwks_from_file`), ``iss`` = ``broker_url``
    (the broker's ``server.public_url``), ``aud`` = ``trust_domain``, one tool per path, single use.

    ``injected=("department",)`` only matters for a token without ``tctx.injected``: its department cannot
    be told from a forged one, and the handlers refuse it (``no_department``). Raises ``ValueError`` when
    the file holds no usable verification key.
    """
    return txn_token_middleware(
        jwks=public_jwks_from_file(broker_jwks),
        issuer=broker_url,
        audience=trust_domain,
        tools=TOOLS,
        injected=("department",),
        single_use=True,
    )


# --- handlers -------------------------------------------------------------------------------------------


def _error(status: int, code: str, description: str) -> web.Response:
    return web.json_response({"error": code, "error_description": description}, status=status)


async def _json_object(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _is_number(value: Any) -> bool:
    # bool is an int subclass: ``true`` is no amount; nor are NaN/Infinity, which json.loads accepts.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls, as far as this backend may rely on it: the subject, and the department rows are scoped to."""

    subject: str
    department: str


def _caller(request: web.Request, body: dict[str, Any]) -> Caller | web.Response:
    """The verified caller (``request[TXN]``; the body's department under ``--no-verify``), or the refusal."""
    claims = request.get(TXN)
    if claims is not None:
        # Only the injected value: the broker set it from the subject's claim and the verifier checked that the
        # body carries exactly it. tctx.arguments is what the agent asked for, which proves nothing.
        subject, department = claims.sub, claims.injected.get("department")
    elif request.app[NO_VERIFY]:
        subject, department = UNVERIFIED_SUBJECT, body.get("department")
    else:  # build_app() without a verifier: the tool routes are closed, never open
        return _error(401, "invalid_txn_token", "transaction token required")
    if not isinstance(department, str):
        return _error(403, "no_department", "the transaction token names no department")
    return Caller(subject, department)


async def _verified_call(request: web.Request) -> tuple[dict[str, Any], Caller] | web.Response:
    """The JSON body and the caller the verified txn token names, or the refusal to send."""
    body = await _json_object(request)
    if body is None:
        return _error(400, "invalid_request", "body must be a JSON object")
    caller = _caller(request, body)
    if isinstance(caller, web.Response):
        return caller
    return body, caller


async def approve(request: web.Request) -> web.Response:
    call = await _verified_call(request)
    if isinstance(call, web.Response):
        return call
    body, caller = call
    invoice_id, amount = body.get("invoice_id"), body.get("amount")
    if not isinstance(invoice_id, str) or not _is_number(amount):
        return _error(400, "invalid_request", "need invoice_id (string) and amount (number)")
    db = request.app[DB]
    row = fetch_invoice(db, invoice_id)
    if row is None:
        return _error(404, "unknown_invoice", "no such invoice")
    if row["department"] != caller.department:  # row-level security, from the token
        return _error(403, "department_mismatch", "invoice belongs to another department")
    if amount != row["amount"]:
        return _error(409, "amount_mismatch", "amount differs from the invoice")
    if row["status"] != "approved":
        with db:
            db.execute(
                "UPDATE invoices SET status = 'approved', approved_by = ? WHERE invoice_id = ?",
                (caller.subject, invoice_id),
            )
        row = fetch_invoice(db, invoice_id)
        assert row is not None  # rows are never deleted
    return web.json_response({**invoice_json(row), "approved_by": row["approved_by"]})


async def list_invoices(request: web.Request) -> web.Response:
    call = await _verified_call(request)
    if isinstance(call, web.Response):
        return call
    _, caller = call
    # The body's department is ignored: the rows are the token's department's, whatever was asked for.
    query = "SELECT * FROM invoices WHERE department = ? ORDER BY invoice_id"
    rows = request.app[DB].execute(query, (caller.department,)).fetchall()
    return web.json_response({"invoices": [invoice_json(row) for row in rows]})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _received_json(entry: ReceivedRequest) -> dict[str, Any]:
    method, path, query, header_items, raw = entry
    headers: dict[str, str] = {}
    for name, value in header_items:
        # Lower-cased names; a repeated field joined with ", " as RFC 9110 §5.3 allows.
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    try:
        parsed: Any = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    body = raw.decode("utf-8", errors="replace")
    return {"method": method, "path": path, "query": query, "headers": headers, "body": body, "json": parsed}


async def received(request: web.Request) -> web.Response:
    """``{"requests": [{"method","path","query","headers","body","json"}]}``, oldest first."""
    return web.json_response({"requests": [_received_json(entry) for entry in request.app[RECEIVED]]})


async def clear_received(request: web.Request) -> web.Response:
    request.app[RECEIVED].clear()
    return web.json_response({"requests": []})


@web.middleware
async def _record_request(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Keep what arrived, before any handler logic: the point is to show what the broker really sent.

    Stored raw and rendered only when read, so the record costs the bench's baseline next to nothing."""
    if request.path not in _UNRECORDED:
        raw = await request.read()  # aiohttp caches the body, so the handler can still read it
        headers = tuple(request.headers.items())
        request.app[RECEIVED].append((request.method, request.path, request.query_string, headers, raw))
    return await handler(request)


def _verify_tool_routes(verifier: TxnTokenMiddleware) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Run ``verifier`` on the tool routes only: health checks and the record carry no token."""

    @web.middleware
    async def verify(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in TOOLS:
            return await verifier(request, handler)
        return await handler(request)

    return verify


def build_app(
    db_path: Path, *, verifier: TxnTokenMiddleware | None = None, no_verify: bool = False
) -> web.Application:
    """The backend application. The DB is opened on startup and closed on cleanup (``cleanup_ctx``).

    ``verifier`` (see :func:`backend_verifier`) checks the Txn-Token of every tool call. Without one the tool
    routes refuse every call (``401``), unless ``no_verify`` -- the benchmarking aid of the module docstring --
    says to trust the body instead. Giving both is a ``ValueError``.
    """
    if verifier is not None and no_verify:
        raise ValueError("give a verifier or no_verify, not both")
    # Record first: refused requests show up in /_received too (what arrived, not what was accepted).
    middlewares = [_record_request] if verifier is None else [_record_request, _verify_tool_routes(verifier)]
    app = web.Application(middlewares=middlewares)
    received_log: deque[ReceivedRequest] = deque(maxlen=RECEIVED_LIMIT)
    app[RECEIVED] = received_log
    app[NO_VERIFY] = no_verify

    async def database(app: web.Application) -> AsyncIterator[None]:
        app[DB] = open_db(db_path)
        try:
            yield
        finally:
            app[DB].close()

    app.cleanup_ctx.append(database)
    if verifier is not None:
        app.cleanup_ctx.append(verifier.cleanup_ctx)
    for path, handler in (("/approve", approve), ("/invoices", list_invoices)):
        app.router.add_post(path, handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/_received", received)
    app.router.add_delete("/_received", clear_received)
    return app


# --- TLS and serving (shared with broker.dev.bench.bareproxy) ---------------------------------------------------


def server_ssl_context(
    cert: Path, key: Path, *, ca: Path, require_client_cert: bool = True
) -> ssl.SSLContext:
    """Server TLS 1.2+ with ``cert``/``key``; client certificates verified against ``ca``.

    ``require_client_cert=False`` still verifies a certificate that is presented (CERT_OPTIONAL)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    # As the broker's listener does (broker.server): no renegotiation, no TLS compression, HTTP/1.1 only.
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) → (host, port). Port 0 picks a free port."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"listen address must be host:port, got {listen!r}")
    return host.strip("[]"), int(port)


def https_url(runner: web.AppRunner) -> str:
    """``https://host:port`` of the runner's first bound socket (the real port when listening on port 0)."""
    host, port = runner.addresses[0][:2]
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


async def start_site(app: web.Application, listen: str, ssl_ctx: ssl.SSLContext) -> web.AppRunner:
    """Run ``app`` on ``listen`` with TLS; the caller owns the runner (``await runner.cleanup()``)."""
    host, port = parse_listen(listen)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_ctx).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def _backend_ssl(certs: Path, require_client_cert: bool) -> ssl.SSLContext:
    return server_ssl_context(
        certs / "backend.pem",
        certs / "backend-key.pem",
        ca=certs / "ca.pem",
        require_client_cert=require_client_cert,
    )


async def serve(
    listen: str,
    *,
    certs: Path,
    db_path: Path,
    require_client_cert: bool = True,
    broker_url: str = DEFAULT_BROKER_URL,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    broker_jwks: Path | None = None,
) -> web.AppRunner:
    """Serve over HTTPS with ``certs/backend.pem``; clients need a cert issued by ``certs/ca.pem``, tool
    calls a Txn-Token signed by a key of ``broker_jwks`` (default ``certs/broker-signing.jwk``, public part
    only) for issuer ``broker_url`` and audience ``trust_domain``."""
    keys = broker_jwks if broker_jwks is not None else certs / "broker-signing.jwk"
    verifier = backend_verifier(keys, broker_url=broker_url, trust_domain=trust_domain)
    return await start_site(
        build_app(db_path, verifier=verifier), listen, _backend_ssl(certs, require_client_cert)
    )


async def serve_unverified(
    listen: str, *, certs: Path, db_path: Path, require_client_cert: bool = True
) -> web.AppRunner:
    """``--no-verify``: a benchmarking aid (module docstring). No Txn-Token is checked; mTLS still is."""
    return await start_site(
        build_app(db_path, no_verify=True), listen, _backend_ssl(certs, require_client_cert)
    )


async def run_until_signalled(
    runner: Awaitable[web.AppRunner], banner: Callable[[web.AppRunner], str]
) -> None:
    """Start a server, print one line, serve until SIGINT/SIGTERM, then clean up (connections, DB, pools)."""
    started = await runner
    try:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(banner(started), flush=True)
        await stop.wait()
    finally:
        await started.cleanup()


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when installed (PERF.md: ~2x aiohttp throughput), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker.dev.demo.expense", description="Demo expense tool backend (mTLS + Txn-Token)."
    )
    parser.add_argument("--listen", default="127.0.0.1:9443", help="host:port (default %(default)s)")
    parser.add_argument(
        "--certs", type=Path, default=Path("certs"), help="§10 PKI folder (default %(default)s)"
    )
    parser.add_argument(
        "--db", type=Path, default=Path("var/expense.db"), help="SQLite file (default %(default)s)"
    )
    parser.add_argument(
        "--broker-jwks",
        type=Path,
        metavar="FILE",
        help="the broker's JWKS or JWK (a private JWK: its public part only; default CERTS/broker-signing.jwk)",
    )
    parser.add_argument(
        "--broker-url", default=DEFAULT_BROKER_URL, help="txn-token issuer (default %(default)s)"
    )
    parser.add_argument(
        "--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="txn-token audience (default %(default)s)"
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="benchmarking aid ONLY (python -m broker.dev.bench): accept tool calls without a Txn-Token",
    )
    args = parser.parse_args(argv)
    if args.no_verify:
        print(
            "WARNING: --no-verify: Txn-Tokens are NOT checked (benchmarking aid)", file=sys.stderr, flush=True
        )
        server = serve_unverified(args.listen, certs=args.certs, db_path=args.db)
    else:
        server = serve(
            args.listen,
            certs=args.certs,
            db_path=args.db,
            broker_url=args.broker_url,
            trust_domain=args.trust_domain,
            broker_jwks=args.broker_jwks,
        )
    try:
        run_event_loop(
            run_until_signalled(
                server, lambda r: f"expense backend listening on {https_url(r)} (db {args.db})"
            )
        )
    except ValueError as exc:  # start-up: a bad --listen or --broker-jwks (the message names which)
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
