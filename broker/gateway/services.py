"""The pipeline's collaborators, built once at start-up, and the one way a decision is written to audit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.audit.sink import AuditLog
from broker.context import RequestContext
from broker.errors import (
    AuditUnavailable,
)
from broker.gateway.forward import Forwarder
from broker.keys import KeyRing
from broker.observability import Metrics
from broker.state.base import StateStore

if TYPE_CHECKING:  # the approvals service (aiohttp handlers) imports this module
    from broker.gateway.approvals import ApprovalService
    from broker.resources import RuntimeHolder


@dataclass(frozen=True)
class Services:
    """The long-lived collaborators of the pipeline, built once at start-up (``broker.app``). The runtime is
    swapped whole on reload: a call reads ``runtime.current`` once, at its start."""

    runtime: RuntimeHolder
    store: StateStore
    signer: KeyRing
    metrics: Metrics
    audit: AuditLog
    approvals: ApprovalService
    forwarder: Forwarder


async def audit_decision(services: Services, record: RequestContext) -> None:
    """Write this request's decision record and wait until it is on stable storage (group commit, CONTRACT §15:
    acknowledged means durable); raises AuditUnavailable if it cannot be written."""
    metrics = services.metrics
    try:
        await services.audit.commit(record.audit_fields())
    except AuditUnavailable:
        metrics.audit_errors.inc()
        raise
    metrics.audit_records.inc()
    record.audited = True
