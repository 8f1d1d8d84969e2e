"""Every ``web.AppKey`` of the broker, in one module: the long-lived resources, the swappable runtime, the
per-subsystem state. Types are named for the checker only (``TYPE_CHECKING``), so this module imports nothing of
the broker at run time and any module may import it without closing an import circle."""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    import aiohttp

    from broker.admin import ReloadState
    from broker.audit.noise import NoiseRecorder
    from broker.audit.store import AuditSink
    from broker.gateway.approvals import ApprovalService
    from broker.gateway.forward import Forwarder
    from broker.gateway.services import Services
    from broker.keys import KeyRing
    from broker.mcp.endpoint import McpState
    from broker.mcp.pins import PinBook
    from broker.observability import Metrics
    from broker.rotation import Watcher
    from broker.runtime import Runtime
    from broker.state.base import StateStore
    from broker.tracing import Tracer
    from broker.web.oidc_login import WebLogin


@dataclass
class RuntimeHolder:
    """The config in force. Requests read ``current`` once at their start; a reload replaces it whole."""

    current: Runtime
    previous: Runtime | None = None

    def swap(self, new: Runtime) -> None:
        self.previous, self.current = self.current, new
        # the start-up heap is frozen (broker.server.serve), the first runtime with it: it is about to become
        # garbage (once it is no longer ``previous``), and a frozen reference cycle is never collected
        gc.unfreeze()


@dataclass
class Drain:
    """Graceful shutdown state: while ``draining``, new requests are refused (503 ``shutting_down``, Connection:
    close) and ``stop`` waits until ``in_flight`` reaches zero before the resources under them close."""

    draining: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


RUNTIME: web.AppKey[RuntimeHolder] = web.AppKey("runtime")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
AUDIT: web.AppKey[AuditSink] = web.AppKey("audit")
#: the broker's signing keys (current + still-published retired ones); signs like a Signer
SIGNER: web.AppKey[KeyRing] = web.AppKey("signer")
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("upstream_session")
FORWARDER: web.AppKey[Forwarder] = web.AppKey("forwarder")
STATE: web.AppKey[StateStore] = web.AppKey("state_store")
#: the pipeline's collaborators in one frozen record (``broker.gateway.pipeline.Services``), built at start-up
SERVICES: web.AppKey[Services] = web.AppKey("services")
APPROVALS: web.AppKey[ApprovalService] = web.AppKey("approvals")
#: refusals before identity, counted into ``summary`` audit records (CONTRACT §15)
NOISE: web.AppKey[NoiseRecorder] = web.AppKey("audit_noise")
#: SIGTERM starts draining: /readyz turns 503 so load balancers drain us first
DRAINING: web.AppKey[Drain] = web.AppKey("draining")
RELOAD: web.AppKey[ReloadState] = web.AppKey("reload_state")
WATCHER: web.AppKey[Watcher] = web.AppKey("rotation_watcher")
MCP_STATE: web.AppKey[McpState] = web.AppKey("mcp_state")
MCP_PINS: web.AppKey[PinBook] = web.AppKey("mcp_pins")
#: spans (CONTRACT §16): broker.tracing.NULL_TRACER unless observability.tracing is configured
TRACER: web.AppKey[Tracer] = web.AppKey("tracer")
#: the approvals page's login state (CONTRACT §14): issuers' discovered endpoints
WEB_LOGIN: web.AppKey[WebLogin] = web.AppKey("web_login")
#: on the admin app: the main (agent-facing) app it reports on
MAIN: web.AppKey[web.Application] = web.AppKey("main_app")
