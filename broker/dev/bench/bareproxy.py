"""A bare aiohttp forwarder: the yardstick every broker set-up in ``python -m broker.dev.bench`` is compared with.

It does no checks at all: no identity beyond the TLS handshake, no policy, no audit, no header hygiene. What
it does share with the broker is the cost floor of the path: server TLS with client certificates verified
against ``certs/ca.pem``, upstream mTLS with ``certs/broker.pem`` over ONE pooled ``ClientSession``
(keep-alive connections, TLS context built once), uvloop when installed (PERF.md "bare aiohttp forwarder").

``POST /v1/tools/{name}`` → ``POST <route url>`` with the same body and ``Content-Type``; the upstream's
status, body and ``Content-Type`` come back unchanged. Unknown names get ``404 unknown_tool``.
``GET /healthz`` answers locally (readiness).

    python -m broker.dev.bench.bareproxy --listen 127.0.0.1:8443 --certs certs \\
        --route listInvoices=https://127.0.0.1:9443/invoices
"""

from __future__ import annotations

import argparse
import ssl
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
from aiohttp import web

from broker.dev.bench.loadgen import client_ssl_context
from broker.dev.demo.expense import (
    https_url,
    run_event_loop,
    run_until_signalled,
    server_ssl_context,
    start_site,
)

ROUTES: web.AppKey[dict[str, str]] = web.AppKey("bare_routes")
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("bare_session")


async def forward(request: web.Request) -> web.Response:
    url = request.app[ROUTES].get(request.match_info["name"])
    if url is None:
        return web.json_response({"error": "unknown_tool"}, status=404)
    body = await request.read()
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    async with request.app[SESSION].post(url, data=body, headers=headers) as upstream:
        payload = await upstream.read()
        content_type = upstream.headers.get("Content-Type", "application/octet-stream")
        return web.Response(status=upstream.status, body=payload, headers={"Content-Type": content_type})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(routes: Mapping[str, str], upstream_ssl: ssl.SSLContext) -> web.Application:
    """The forwarder; the upstream ``ClientSession`` lives from startup to cleanup (``cleanup_ctx``)."""
    app = web.Application()
    app[ROUTES] = dict(routes)

    async def upstream_session(app: web.Application) -> AsyncIterator[None]:
        # aiohttp's default pool limit (100) is above any concurrency the bench uses: no queueing here.
        connector = aiohttp.TCPConnector(ssl=upstream_ssl)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=30)
        ) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(upstream_session)
    app.router.add_post("/v1/tools/{name}", forward)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(listen: str, *, certs: Path, routes: Mapping[str, str]) -> web.AppRunner:
    """Serve with the broker's TLS set-up: ``broker.pem`` as server and as upstream client certificate."""
    server_ctx = server_ssl_context(certs / "broker.pem", certs / "broker-key.pem", ca=certs / "ca.pem")
    upstream_ctx = client_ssl_context(certs / "ca.pem", certs / "broker.pem", certs / "broker-key.pem")
    return await start_site(build_app(routes, upstream_ctx), listen, server_ctx)


def parse_route(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith("https://"):
        raise argparse.ArgumentTypeError(f"route must be name=https://..., got {text!r}")
    return name, url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker.dev.bench.bareproxy", description="Bare mTLS forwarder."
    )
    parser.add_argument("--listen", default="127.0.0.1:8443", help="host:port (default %(default)s)")
    parser.add_argument(
        "--certs", type=Path, default=Path("certs"), help="§10 PKI folder (default %(default)s)"
    )
    parser.add_argument("--route", type=parse_route, action="append", required=True, metavar="NAME=URL")
    args = parser.parse_args(argv)
    routes = dict(args.route)
    server = serve(args.listen, certs=args.certs, routes=routes)
    run_event_loop(run_until_signalled(server, lambda r: f"bare forwarder listening on {https_url(r)}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
