"""Demo MCP server of the reference scenario (CONTRACT §11): the expense tools over MCP Streamable HTTP.

Built with the official ``mcp`` SDK (``MCPServer``, optional dependency group ``demo``) and served by uvicorn on
HTTPS that requires a client certificate issued by ``certs/ca.pem`` (in the scenario: the broker's), on the same
SQLite invoices as :mod:`broker.dev.demo.expense`. Tools:

- ``approveExpense(invoice_id, amount, department)`` → the approved invoice, the same JSON as the REST backend's
  ``POST /approve`` (``{"invoice_id","status","amount","department","vendor":{"name","bank_account"},
  "approved_by"}``); ``approved_by`` is the (unverified, demo only) ``sub`` of the ``Txn-Token`` header;
- ``listInvoices(department?)`` → ``{"invoices": [...]}`` of any department (row filtering is the broker's job);
- ``purgeInvoices(department?)`` → marks invoices purged: the tool no policy lets anyone call.

Every HTTP request that reaches the server is recorded (method, path, headers, body) in
:attr:`RunningMcpServer.received` and at ``GET /_received``, so tests and demos can see what the broker forwarded.
Sessions (2025 era) and the stateless 2026-07-28 era are both served; ``--stateless --json-response`` gives the
set-up PERF.md measures directly (FastMCP stateless, JSON responses).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sqlite3
import ssl
import sys
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from broker.dev.demo.expense import fetch_invoice, invoice_json, open_db, parse_listen, run_event_loop
from broker.jose import JoseError, b64url_decode

__all__ = ["RunningMcpServer", "build_server", "main", "serve"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RECEIVED_LIMIT = 200


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def as_json(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.path, "headers": self.headers, "json": self.json()}


def _txn_subject(ctx: Context) -> str:
    """The ``sub`` of the Txn-Token header. NOT VERIFIED (demo label only, like broker.dev.demo.expense)."""
    token = (ctx.headers or {}).get("txn-token", "")
    parts = token.split(".")
    if len(parts) != 3:
        return "unknown"
    try:
        claims = json.loads(b64url_decode(parts[1]))
    except (JoseError, ValueError):
        return "unknown"
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub if isinstance(sub, str) and sub else "unknown"


def build_server(db: sqlite3.Connection) -> MCPServer:
    """The expense tools on ``db`` (see :func:`broker.dev.demo.expense.open_db`)."""
    mcp = MCPServer("expenses", version="1", log_level="WARNING")

    @mcp.tool(name="approveExpense", description="Approve an invoice for payment.")
    async def approve_expense(
        invoice_id: str, amount: float, ctx: Context, department: str | None = None
    ) -> dict[str, Any]:
        if department is None:
            raise ToolError("department is required")
        row = fetch_invoice(db, invoice_id)
        if row is None:
            raise ToolError("unknown invoice")
        if amount != row["amount"]:
            raise ToolError("amount differs from the invoice")
        if department != row["department"]:
            raise ToolError("invoice belongs to another department")
        if row["status"] != "approved":
            with db:
                db.execute(
                    "UPDATE invoices SET status = 'approved', approved_by = ? WHERE invoice_id = ?",
                    (_txn_subject(ctx), invoice_id),
                )
            row = fetch_invoice(db, invoice_id)
            assert row is not None  # it was there a moment ago, in the same connection
        return {**invoice_json(row), "approved_by": row["approved_by"]}

    @mcp.tool(name="listInvoices", description="List invoices of your department.")
    async def list_invoices(department: str | None = None) -> dict[str, Any]:
        if department is None:
            rows = db.execute("SELECT * FROM invoices ORDER BY invoice_id").fetchall()
        else:
            query = "SELECT * FROM invoices WHERE department = ? ORDER BY invoice_id"
            rows = db.execute(query, (department,)).fetchall()
        return {"invoices": [invoice_json(row) for row in rows]}

    @mcp.tool(name="purgeInvoices", description="Delete the invoices of a department.")
    async def purge_invoices(department: str | None = None) -> dict[str, Any]:
        with db:
            if department is None:
                cursor = db.execute("UPDATE invoices SET status = 'purged'")
            else:
                cursor = db.execute(
                    "UPDATE invoices SET status = 'purged' WHERE department = ?", (department,)
                )
        return {"purged": cursor.rowcount}

    mcp.custom_route("/healthz", methods=["GET"])(_healthz)
    return mcp


async def _healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


class Recorder:
    """ASGI middleware: keeps each request (headers and whole body) before the MCP app sees it."""

    def __init__(self, app: ASGIApp, received: deque[Received]) -> None:
        self.app = app
        self.received = received

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ("/healthz", "/_received"):
            await self.app(scope, receive, send)
            return
        buffered: list[Message] = []
        body = b""
        while True:
            message = await receive()
            buffered.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.received.append(Received(scope["method"], scope["path"], headers, body))

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)


@dataclass
class RunningMcpServer:
    server: uvicorn.Server
    task: asyncio.Task[None]
    url: str
    mcp: MCPServer
    received: deque[Received]
    db: sqlite3.Connection

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task
        await self.server.shutdown()
        self.db.close()


def _ssl_files(certs: Path) -> dict[str, Any]:
    return {
        "ssl_certfile": str(certs / "backend.pem"),
        "ssl_keyfile": str(certs / "backend-key.pem"),
        "ssl_ca_certs": str(certs / "ca.pem"),
        "ssl_cert_reqs": ssl.CERT_REQUIRED,  # mTLS: only CA-issued client certificates (the broker's)
    }


async def serve(
    listen: str,
    *,
    certs: Path,
    db_path: Path,
    stateless: bool = False,
    json_response: bool = False,
    customize: Callable[[MCPServer], None] | None = None,
) -> RunningMcpServer:
    """Start the server in the running loop on ``listen`` (port 0: any free port); ``customize`` may add tools."""
    db = open_db(db_path)
    mcp = build_server(db)
    if customize is not None:
        customize(mcp)
    received: deque[Received] = deque(maxlen=RECEIVED_LIMIT)

    async def received_endpoint(request: Request) -> Response:
        return JSONResponse({"requests": [r.as_json() for r in received]})

    mcp.custom_route("/_received", methods=["GET"])(received_endpoint)

    app = Recorder(mcp.streamable_http_app(stateless_http=stateless, json_response=json_response), received)
    host, port = parse_listen(listen)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(
        app,
        http="h11",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
        **_ssl_files(certs),
    )
    server = uvicorn.Server(config)
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    if server.should_exit:
        db.close()
        raise OSError(f"the MCP server could not start on {listen}")
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    task = asyncio.create_task(server.main_loop())
    return RunningMcpServer(server, task, f"https://{shown}:{bound_port}/mcp", mcp, received, db)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker.dev.demo.mcp_server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--listen", default="127.0.0.1:9444", help="host:port (default %(default)s)")
    parser.add_argument(
        "--certs", type=Path, default=Path("certs"), help="§10 PKI folder (default %(default)s)"
    )
    parser.add_argument(
        "--db", type=Path, default=Path("var/expense.db"), help="SQLite file (default %(default)s)"
    )
    parser.add_argument("--stateless", action="store_true", help="no sessions (each request stands alone)")
    parser.add_argument("--json-response", action="store_true", help="answer JSON instead of SSE streams")
    args = parser.parse_args(argv)

    async def run() -> None:
        running = await serve(
            args.listen,
            certs=args.certs,
            db_path=args.db,
            stateless=args.stateless,
            json_response=args.json_response,
        )
        print(f"expense MCP server listening on {running.url} (db {args.db})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (2, 15):  # SIGINT, SIGTERM
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await running.stop()

    run_event_loop(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
