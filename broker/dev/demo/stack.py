"""``make run``: the demo expense backend and the broker in one process, on the embedded defaults.

The backend listens on ``--backend-listen`` (exported as ``EXPENSE_UPSTREAM`` for the config unless already set),
the demo MCP server (:mod:`broker.dev.demo.mcp_server`, needs the ``demo`` extra) on ``--mcp-listen`` beside it
(``EXPENSE_MCP_UPSTREAM``; ``--mcp-listen none`` leaves it out);
the broker uses the given config (memory state store, local audit file). SIGINT/SIGTERM stops both gracefully.

Ports (README "Running it"): the broker 8443 (``BROKER_LISTEN``) and its admin listener 9090
(``BROKER_ADMIN_LISTEN``), the backend 9443 and the MCP server 9444 (``make run BACKEND_LISTEN=… MCP_LISTEN=…``).
A port that is taken is one line saying which and what moves it, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from broker.config.check import check_config
from broker.dev.demo import expense
from broker.observability import configure_logging
from broker.server import BIND_FAILURES, ListenError, bind_failure, start


def _banner(
    broker_main: str, broker_admin: str, backend: str, certs: Path, config: Path, mcp: str, idp: str
) -> str:
    return f"""
  expense backend   {backend}            (SQLite, mTLS; verifies the broker's txn tokens)
  expense MCP       {mcp}  (behind the broker at /mcp/expenses)
  broker            {broker_main}         config {config}
  admin             {broker_admin}        /healthz /readyz /metrics /admin/config
  development IdP   {idp}            (OpenID login for the approvals page: pick a demo user)
  approvals page    {broker_main}/approvals/  (sign in as carol or dave with MFA; your browser must trust
                    {certs}/ca.pem, or accept the warning for localhost)

  Try it: every call needs the agent's X.509-SVID, an access token and a fresh DPoP proof, so use an agent:
    make demo                      (walks the whole expense scenario, one line per step)
    README "Trying it by hand"     (one call with broker.sdk.agent.AgentClient and `broker token`)
  Audit log: broker audit verify <audit file> --key {certs}/broker-signing.jwk
  Stop with Ctrl-C.
"""


async def _run(args: argparse.Namespace) -> int:
    # the backend verifies txn tokens issued by the broker's public URL (the same ${BROKER_PUBLIC_URL:-...} as
    # expense.yaml); it starts first because the broker's config needs the backend's address
    try:
        backend = await expense.serve(
            args.backend_listen,
            certs=args.certs,
            db_path=args.db,
            broker_url=os.environ.get("BROKER_PUBLIC_URL", expense.DEFAULT_BROKER_URL),
        )
    except OSError as exc:
        if exc.errno not in BIND_FAILURES:
            raise  # not the address (the backend's certificate files, say): the traceback says what
        print(
            f"expense backend {args.backend_listen} {bind_failure(exc)}; "
            "set BACKEND_LISTEN (make run) or --backend-listen",
            file=sys.stderr,
        )
        return 1
    mcp_server: Any = None
    idp: Any = None
    try:
        mcp_server = await _start_mcp(args)
        idp = await _start_idp(args)
        if idp is not None:
            os.environ.setdefault("BROKER_OIDC_ISSUER", idp.url)
        os.environ.setdefault("EXPENSE_UPSTREAM", expense.https_url(backend))
        if mcp_server is not None:
            os.environ.setdefault("EXPENSE_MCP_UPSTREAM", mcp_server.url)
        os.environ.setdefault("BROKER_CERTS", str(args.certs.resolve()))
        checked = check_config(args.config)  # every file it names, every policy: one line per problem
        for problem in checked.problems:
            print(problem, file=sys.stderr)
        if checked.loaded is None:
            return 1
        try:
            running = await start(checked.loaded)
        except ListenError as exc:
            print(exc, file=sys.stderr)  # FILE:LINE: server.listen … is in use; set BROKER_LISTEN or …
            return 1
        try:
            _, main_port = running.main_address
            admin_host, admin_port = running.admin_address
            print(
                _banner(
                    f"https://localhost:{main_port}",
                    f"http://{admin_host}:{admin_port}",
                    expense.https_url(backend),
                    args.certs,
                    args.config,
                    mcp_server.url if mcp_server is not None else "not started",
                    idp.url if idp is not None else "not started",
                ),
                flush=True,
            )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await running.stop()
    finally:
        if idp is not None:
            await idp.stop()
        if mcp_server is not None:
            await mcp_server.stop()
        await backend.cleanup()
    return 0


async def _start_idp(args: argparse.Namespace) -> Any:
    """The development OpenID Provider (a RunningIdp) for the approvals page, or None (printed) when its port
    is taken: the agents' demo still runs, the page's sign-in says the identity provider is unavailable. Its one
    client is the broker's page, redirecting to ``$BROKER_PUBLIC_URL/approvals/callback``."""
    from broker.dev import idp_server

    public_url = os.environ.get("BROKER_PUBLIC_URL", "https://localhost:8443").rstrip("/")
    try:
        return await idp_server.serve(
            args.idp_listen,
            certs=args.certs,
            clients={"broker-approvals": (f"{public_url}/approvals/callback",)},
            allow_non_loopback=args.allow_non_loopback,
        )
    except idp_server.NotLoopbackError as exc:
        print(f"{exc} (--allow-non-loopback)", file=sys.stderr)
        return None
    except OSError as exc:
        if exc.errno not in BIND_FAILURES:
            raise
        print(
            f"development IdP not started: {args.idp_listen} {bind_failure(exc)}; "
            "set IDP_LISTEN (make run) or --idp-listen",
            file=sys.stderr,
        )
        return None


async def _start_mcp(args: argparse.Namespace) -> Any:
    """The demo MCP server on ``--mcp-listen`` (a RunningMcpServer), or None when disabled or not installed."""
    if args.mcp_listen.lower() in ("", "none", "off"):
        return None
    try:
        from broker.dev.demo import mcp_server  # the optional ``demo`` extra (the official MCP SDK)
    except ImportError:
        print(
            "demo MCP server not started: install the 'demo' extra (pip install -e '.[demo]')",
            file=sys.stderr,
        )
        return None
    try:
        return await mcp_server.serve(args.mcp_listen, certs=args.certs, db_path=args.db)
    except OSError as exc:  # e.g. the port is taken: the REST demo still runs, /mcp/expenses answers 502
        print(
            f"demo MCP server not started: {args.mcp_listen} {bind_failure(exc)}; "
            "set MCP_LISTEN (make run) or --mcp-listen",
            file=sys.stderr,
        )
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m broker.dev.demo.stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=Path("config/examples/expense.yaml"))
    parser.add_argument("--certs", type=Path, default=Path("certs"))
    parser.add_argument(
        "--backend-listen",
        default="127.0.0.1:9443",
        help="demo expense backend (make run BACKEND_LISTEN=...)",
    )
    parser.add_argument(
        "--mcp-listen",
        default="127.0.0.1:9444",
        help="demo MCP server; 'none' to leave it out (make run MCP_LISTEN=...)",
    )
    parser.add_argument(
        "--idp-listen",
        default="127.0.0.1:9445",
        help="development OpenID Provider for the approvals page (make run IDP_LISTEN=...); its issuer is "
        "https://localhost:<port> (BROKER_OIDC_ISSUER in expense.yaml)",
    )
    parser.add_argument(
        "--allow-non-loopback",
        action="store_true",
        help="let the development IdP listen on an --idp-listen address that is not loopback. Off by default: "
        "the IdP has no passwords and signs in anyone who reaches it as any demo user (MFA is a checkbox)",
    )
    parser.add_argument("--db", type=Path, default=Path("var/expense.db"))
    parser.add_argument("--log-format", choices=("json", "console"), default="console")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(fmt=args.log_format)
    return expense.run_event_loop(_run(args))


if __name__ == "__main__":
    sys.exit(main())
