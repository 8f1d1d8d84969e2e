"""build_app(): the only wiring module — routes, the middleware, long-lived resources.

Resources are owned by ``cleanup_ctx`` in the order they depend on each other: the audit log opens first and
closes last (its final checkpoint is written after the last in-flight request finished), the upstream session
closes before it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from broker.admin import (
    ReloadState,
    add_admin_routes,
    admin_guard,
    config_load_record,
)
from broker.audit.disk import disk_free_bytes, disk_low
from broker.audit.noise import NoiseRecorder
from broker.audit.store import make_sink
from broker.config.loader import LoadedConfig
from broker.config.models import split_hostport
from broker.context import CTX
from broker.errors import StateUnavailable
from broker.gateway import exchange, tools
from broker.gateway.approvals import ApprovalService, decide_approval, get_approval, list_approvals
from broker.gateway.forward import Forwarder, client_session, close_session
from broker.gateway.http1 import Http1Pool
from broker.gateway.middleware import broker_middleware
from broker.gateway.services import Services
from broker.jose import Signer
from broker.keys import KeyRing, public_jwks_from_file
from broker.mcp import endpoint as mcp
from broker.observability import Metrics
from broker.resources import (
    APPROVALS,
    AUDIT,
    DRAINING,
    FORWARDER,
    MAIN,
    METRICS,
    NOISE,
    RELOAD,
    RUNTIME,
    SERVICES,
    SESSION,
    SIGNER,
    STATE,
    TRACER,
    WEB_LOGIN,
    Drain,
    RuntimeHolder,
)
from broker.runtime import build_runtime, read_admin_token
from broker.state import make_store
from broker.tracing import NULL_TRACER
from broker.web import approvals_page
from broker.web.oidc_login import WebLogin


def build_app(loaded: LoadedConfig, *, metrics: Metrics | None = None) -> web.Application:
    """The agent-facing application for a loaded config. Raises ConfigError if the config does not compile."""
    config = loaded.config
    runtime = build_runtime(loaded)
    app = web.Application(
        middlewares=[broker_middleware], client_max_size=config.server.limits.max_body_bytes
    )
    app[RUNTIME] = RuntimeHolder(runtime)
    app[METRICS] = metrics or Metrics()
    app[METRICS].set_policy_version(loaded.policy_version)
    app[METRICS].config_reloads.labels(result="success").inc()
    # current key first, then the previous ones still published until their tokens expire (rotation overlap)
    app[SIGNER] = KeyRing(
        Signer.from_file(config.signing.key_file),
        [jwk for path in config.signing.previous_key_files for jwk in public_jwks_from_file(path)["keys"]],
    )
    # the file (audit.file) or PostgreSQL (audit.store); everything below sees only the AuditSink protocol
    app[AUDIT] = make_sink(
        config.audit, signer=app[SIGNER], on_resume=lambda _: app[METRICS].audit_resume_unverified.inc()
    )
    app[DRAINING] = Drain()
    app[RELOAD] = ReloadState()
    app[TRACER] = NULL_TRACER
    if config.observability.tracing is not None:
        # imported only when configured: without tracing no request imports or calls OpenTelemetry
        from broker.otel import OtelTracer

        tracer = OtelTracer(config.observability.tracing)
        app[TRACER] = tracer
        app.middlewares.insert(0, tracer.middleware)  # outermost: the server span covers the whole request
        app.cleanup_ctx.append(tracer.lifetime)  # first in, last out: flushed after the last request
    app.cleanup_ctx.append(_audit_log)
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_state_store)
    app.cleanup_ctx.append(_issuer_keys)
    app.cleanup_ctx.append(_approvals)
    app.cleanup_ctx.append(_services)
    app.cleanup_ctx.append(_audit_noise)  # after the services (its writes); closes before the audit log
    app.cleanup_ctx.append(mcp.mcp_resources)

    app.router.add_post("/v1/tools/{name}", tools.invoke_tool)
    app.router.add_get("/v1/tools", tools.list_tools)
    app.router.add_post("/v1/token", exchange.token_exchange)
    app.router.add_get("/v1/approvals", list_approvals)
    app.router.add_get("/v1/approvals/{id}", get_approval)
    app.router.add_post("/v1/approvals/{id}", decide_approval)
    app[WEB_LOGIN] = WebLogin()
    approvals_page.add_routes(app)  # CONTRACT §14: /approvals/ (humans in a browser)
    app.router.add_route("*", "/mcp/{server}", mcp.mcp_endpoint)
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/.well-known/oauth-protected-resource", protected_resource_metadata)
    return app


async def _audit_log(app: web.Application) -> AsyncIterator[None]:
    audit = app[AUDIT]
    await audit.start()
    await audit.commit(config_load_record(app[RUNTIME].current, decision="allow", reason="", source="start"))
    yield
    await audit.aclose()  # final checkpoint: after every in-flight request has been answered


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    session = client_session()  # webhooks, MCP servers, issuers' keys
    app[SESSION] = session
    pool = Http1Pool()  # /v1 forwarding (broker.gateway.http1: the hot path's own client)
    app[FORWARDER] = Forwarder(
        pool,
        app[METRICS],
        max_response_bytes=app[RUNTIME].current.limits.max_response_bytes,
        tracer=app[TRACER],
    )
    yield
    await pool.close()
    await close_session(session)


async def _state_store(app: web.Application) -> AsyncIterator[None]:
    state = app[RUNTIME].current.config.state
    metrics = app[METRICS]
    app[STATE] = make_store(
        state.backend,
        redis_url=state.redis_url,
        key_prefix=state.key_prefix,
        timeout_seconds=state.timeout_ms / 1000,
        max_entries=state.max_entries,
        on_error=lambda op: metrics.state_errors.labels(op=op).inc(),
    )
    yield
    await app[STATE].close()


async def _issuer_keys(app: web.Application) -> AsyncIterator[None]:
    authenticator = app[RUNTIME].current.authenticator
    await authenticator.start(now=time.time(), session=app[SESSION])
    yield
    await authenticator.close()


async def _approvals(app: web.Application) -> AsyncIterator[None]:
    config = app[RUNTIME].current.config
    service = ApprovalService.create(
        config.approvals, app[STATE], app[SIGNER], app[SESSION], app[METRICS], config.server.public_url
    )
    app[APPROVALS] = service
    service.start()
    yield
    await service.close()  # before the upstream session closes


async def _services(app: web.Application) -> AsyncIterator[None]:
    """The pipeline's collaborators, frozen once every resource they name exists."""
    app[SERVICES] = Services(
        runtime=app[RUNTIME],
        store=app[STATE],
        signer=app[SIGNER],
        metrics=app[METRICS],
        audit=app[AUDIT],
        approvals=app[APPROVALS],
        forwarder=app[FORWARDER],
        tracer=app[TRACER],
    )
    yield


async def _audit_noise(app: web.Application) -> AsyncIterator[None]:
    """Summary records of unauthenticated refusals (:mod:`broker.audit.noise`); the open windows are written at
    shutdown, after the last request and before the audit store closes."""
    services, metrics = app[SERVICES], app[METRICS]
    recorder = NoiseRecorder(
        services.audit.commit, on_written=metrics.audit_records.inc, on_error=metrics.audit_errors.inc
    )
    app[NOISE] = recorder
    recorder.start()
    yield
    await recorder.close()


async def protected_resource_metadata(request: web.Request) -> web.StreamResponse:
    request[CTX].route = "metadata"
    body = request.app[RUNTIME].current.authenticator.protected_resource_metadata()
    return web.json_response(body, headers={"Cache-Control": "public, max-age=300"})


async def jwks(request: web.Request) -> web.StreamResponse:
    """The broker's public keys (CONTRACT §5): backends verify txn tokens, agents verify grants."""
    request[CTX].route = "metadata"
    keys = request.app[SIGNER].jwks(time.time())
    return web.json_response(keys, headers={"Cache-Control": "public, max-age=60"})


def build_admin_app(main: web.Application) -> web.Application:
    """Plain-HTTP admin listener (loopback by default): health, readiness, metrics, operators' controls —
    behind :func:`broker.admin.admin_guard` (its own host names only, no browser requests, the admin token)."""
    server = main[RUNTIME].current.config.server
    token = read_admin_token(server.admin_token_file) if server.admin_token_file else None
    admin_host, _ = split_hostport(server.admin_listen)
    admin = web.Application(middlewares=[admin_guard(admin_host, token)])
    admin[MAIN] = main
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    admin.router.add_get("/metrics", metrics_endpoint)
    add_admin_routes(admin)
    admin.router.add_get("/admin/mcp/pins", mcp.pins_endpoint)
    admin.router.add_post("/admin/mcp/pins/{server}/{tool}/accept", mcp.accept_pin_endpoint)
    return admin


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    main = request.app[MAIN]
    try:
        await main[STATE].ping()
        state_ok = True
    except StateUnavailable:
        state_ok = False
    audit = main[RUNTIME].current.config.audit
    disk_ok = True
    if audit.file is not None:
        free = disk_free_bytes(audit.file)
        if free is not None:
            main[METRICS].audit_disk_free.set(free)
        disk_ok = not disk_low(free, audit.min_free_bytes)
    checks = {
        "config": True,
        "audit": main[AUDIT].healthy,
        "audit_disk": disk_ok,  # false below audit.min_free_bytes: leave the rotation before writes fail
        "state": state_ok,
        "accepting": not main[DRAINING].draining,  # false once SIGTERM started the drain
    }
    ready = all(checks.values())
    body = {
        "status": "ready" if ready else "not_ready",
        "checks": checks,
        "failing": sorted(name for name, ok in checks.items() if not ok),
        "policy_version": main[RUNTIME].current.policy_version,
        "time": datetime.now(UTC).isoformat(),
    }
    return web.json_response(body, status=200 if ready else 503)


async def metrics_endpoint(request: web.Request) -> web.StreamResponse:
    audit = request.app[MAIN][RUNTIME].current.config.audit
    if audit.file is not None and (free := disk_free_bytes(audit.file)) is not None:
        request.app[MAIN][METRICS].audit_disk_free.set(free)
    output = request.app[MAIN][METRICS].exposition()
    return web.Response(body=output, headers={"Content-Type": CONTENT_TYPE_LATEST})
