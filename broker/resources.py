"""Typed application state (``web.AppKey``): the long-lived resources and the swappable runtime."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from broker.audit.sink import AuditLog
from broker.gateway.forward import Forwarder
from broker.keys import KeyRing
from broker.observability import Metrics
from broker.runtime import Runtime
from broker.state.base import StateStore


@dataclass
class RuntimeHolder:
    """The config in force. Requests read ``current`` once at their start; a reload replaces it whole."""

    current: Runtime
    previous: Runtime | None = None

    def swap(self, new: Runtime) -> None:
        self.previous, self.current = self.current, new


RUNTIME = web.AppKey("runtime", RuntimeHolder)
METRICS = web.AppKey("metrics", Metrics)
AUDIT = web.AppKey("audit", AuditLog)
#: the broker's signing keys (current + still-published retired ones); signs like a Signer
SIGNER = web.AppKey("signer", KeyRing)
SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)
FORWARDER = web.AppKey("forwarder", Forwarder)
STATE = web.AppKey("state_store", StateStore)
#: set when SIGTERM starts a graceful shutdown: /readyz turns 503 so load balancers drain us first
DRAINING = web.AppKey("draining", dict)
