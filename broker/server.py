"""Listeners, TLS contexts and graceful shutdown.

SIGTERM/SIGINT: /readyz turns 503 (load balancers drain us), the listeners stop accepting, in-flight calls get
``server.shutdown_grace_seconds`` to finish, then the audit log writes its final checkpoint and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from aiohttp import web

from broker.admin import reload_config
from broker.app import build_admin_app, build_app
from broker.config.loader import ConfigProblem, LoadedConfig
from broker.config.models import Server, split_hostport
from broker.errors import BrokerError
from broker.listener import JsonErrorRunner
from broker.resources import DRAINING, METRICS, RUNTIME, WATCHER
from broker.rotation import Watcher, watch_files

log = structlog.get_logger("broker.server")


def server_ssl_context(server: Server) -> ssl.SSLContext:
    """TLS 1.2+ server context that verifies client certificates against the trust bundle.

    ``client_cert: require`` refuses a handshake without a certificate; ``optional`` admits one without (humans
    calling the approvals API) — in both modes a certificate that is presented must chain to the bundle and be
    within validity, or the handshake fails (HOSTILE M02, M04). Renegotiation is off (M17).
    """
    tls = server.tls
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.load_verify_locations(cafile=str(tls.client_ca))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_cert == "require" else ssl.CERT_OPTIONAL
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@dataclass
class RunningBroker:
    main: web.AppRunner
    admin: web.AppRunner
    app: web.Application

    @property
    def main_address(self) -> tuple[str, int]:
        host, port = self.main.addresses[0][:2]
        return str(host), int(port)

    @property
    def admin_address(self) -> tuple[str, int]:
        host, port = self.admin.addresses[0][:2]
        return str(host), int(port)

    async def stop(self) -> None:
        """Idempotent graceful stop: refuse new requests, let the ones in flight finish (bounded by the grace
        period), then close listeners, connections and resources (the audit log's final checkpoint last).

        The in-app count matters: aiohttp drains only the connections it knew of when shutdown began, so a
        connection whose TLS handshake completes later would otherwise be served while the upstream session and
        the audit log close under it."""
        drain = self.app[DRAINING]
        if drain.draining:
            return
        drain.draining = True
        if drain.in_flight:
            grace = self.app[RUNTIME].current.config.server.shutdown_grace_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drain.idle.wait(), timeout=grace)
        await (
            self.main.cleanup()
        )  # stop accepting, wait for in-flight calls, then cleanup_ctx (final checkpoint)
        await self.admin.cleanup()


async def start(loaded: LoadedConfig, *, reuse_port: bool = False) -> RunningBroker:
    """Start both listeners; raises ConfigError / OSError (port in use, unreadable key) before serving anything."""
    config = loaded.config
    server = config.server
    app = build_app(loaded)
    ssl_ctx = server_ssl_context(server)
    app[WATCHER] = Watcher(app, ssl_ctx)
    app.cleanup_ctx.append(watch_files)
    limits = server.limits
    metrics = app[METRICS]

    def count_parser_refusal(error: BrokerError) -> None:
        decision = "error" if error.status >= 500 else "deny"
        metrics.requests.labels(route="other", tool="-", decision=decision, code=error.code).inc()

    # JsonErrorRunner: what the HTTP parser refuses (bad method, framing, over-long lines) is JSON too (§8, §12)
    main = JsonErrorRunner(
        app,
        on_refusal=count_parser_refusal,
        access_log=None,  # every request is logged (and audited) by the broker middleware instead
        shutdown_timeout=server.shutdown_grace_seconds,
        handler_cancellation=True,
        # the idle and header-read bound of a connection (aiohttp arms it from the first byte until a request
        # is parsed): a client trickling headers (slowloris, HOSTILE P14) is closed after it, not after an hour
        keepalive_timeout=server.request_timeout_seconds,
        # after an early answer (413, 408, a refusal before the body was read) discard what is left of the body
        # for at most a second, then close — not aiohttp's 10 s of reading for a client that may never send it
        lingering_time=1.0,
        # one header may use the whole header budget (CONTRACT §12: headers up to 16 KiB are read, so an
        # oversized token is 401 invalid_token, not a parser error); the middleware checks the total (431)
        max_line_size=limits.header_line_bytes,
        max_field_size=limits.header_line_bytes,
        max_headers=128,
        auto_decompress=False,
    )
    await main.setup()
    admin: JsonErrorRunner | None = None
    try:
        await _listen(
            loaded, "listen", main, ssl_context=ssl_ctx, reuse_port=reuse_port or None, backlog=1024
        )
        admin = JsonErrorRunner(build_admin_app(app), access_log=None, shutdown_timeout=1)
        await admin.setup()
        await _listen(loaded, "admin_listen", admin, reuse_port=reuse_port or None)
    except BaseException:
        if admin is not None:
            await admin.cleanup()
        await main.cleanup()
        raise
    running = RunningBroker(main=main, admin=admin, app=app)
    log.info(
        "listening",
        main=f"https://{_fmt(running.main_address)}",
        admin=f"http://{_fmt(running.admin_address)}",
        public_url=server.public_url,
        policy_version=loaded.policy_version,
    )
    return running


Listener = Literal["listen", "admin_listen"]


class ListenError(OSError):
    """A listener cannot bind its address: one line (``FILE:LINE: server.listen 127.0.0.1:8443 is in use; set
    BROKER_LISTEN or server.listen``) naming the address and what moves it, never a traceback."""

    def __init__(self, problem: ConfigProblem, code: int | None) -> None:
        super().__init__(code, problem.message)
        self.problem = problem

    def __str__(self) -> str:
        return str(self.problem)


#: what a failed bind means for its address, by errno
BIND_FAILURES = {
    errno.EADDRINUSE: "is in use",
    errno.EACCES: "needs privileges (a port below 1024)",
    errno.EADDRNOTAVAIL: "is not an address of this host",
}


def bind_failure(exc: OSError) -> str:
    """What a failed bind means for its address: "is in use", "needs privileges (a port below 1024)", …"""
    return BIND_FAILURES.get(exc.errno or 0, f"cannot be listened on ({exc.strerror or exc})")


def listen_error(loaded: LoadedConfig, setting: Listener, exc: OSError) -> ListenError:
    """The :class:`ListenError` for ``server.<setting>``, naming the environment variable the config reads it
    from (``${BROKER_LISTEN:-…}``), if any, before the setting itself."""
    loc = ("server", setting)
    address = getattr(loaded.config.server, setting)
    movers = [*loaded.variables.get(loc, ()), f"server.{setting}"]
    what = bind_failure(exc)
    return ListenError(
        loaded.problem(loc, f"server.{setting} {address} {what}; set {' or '.join(movers)}"), exc.errno
    )


async def _listen(loaded: LoadedConfig, setting: Listener, runner: web.AppRunner, **site: Any) -> None:
    host, port = split_hostport(getattr(loaded.config.server, setting))
    try:
        await web.TCPSite(runner, host, port, **site).start()
    except OSError as exc:
        raise listen_error(loaded, setting, exc) from exc


def probe_listeners(loaded: LoadedConfig) -> None:
    """Bind and release both listen addresses; raise :class:`ListenError` for the first that cannot be bound.

    ``broker run --workers N`` calls it before starting workers, which bind with SO_REUSEPORT: without the probe
    a busy port would be a traceback in every worker (and a port held by another SO_REUSEPORT process of the same
    user would silently be shared with it)."""
    for setting in ("listen", "admin_listen"):
        host, port = split_hostport(getattr(loaded.config.server, setting))
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's listeners do
                probe.bind(address)
        except OSError as exc:
            raise listen_error(loaded, setting, exc) from exc


def _fmt(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    loaded: LoadedConfig,
    *,
    reuse_port: bool = False,
    on_started: Callable[[RunningBroker], None] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start(loaded, reuse_port=reuse_port)
    # What start-up built (modules, config, compiled policy and schemas) lives as long as the process: frozen, a
    # full collection walks only what requests allocate (a ~40 ms pause each time, on the event loop, before).
    # The first config reload unfreezes it (RuntimeHolder.swap): the runtime it replaces must stay collectable.
    gc.collect()
    gc.freeze()
    reloads: set[asyncio.Task[object]] = set()

    def on_sighup() -> None:
        task = asyncio.ensure_future(reload_config(running.app, source="sighup"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    if on_started is not None:
        on_started(running)
    await stop.wait()
    log.info("shutting down", grace_seconds=loaded.config.server.shutdown_grace_seconds)
    await running.stop()
    log.info("stopped")
