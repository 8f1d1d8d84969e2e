"""The pipeline's collaborators, built once at start-up, and the one way a decision is written to audit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.audit.store import AuditSink
from broker.context import RequestContext
from broker.errors import (
    AuditUnavailable,
)
from broker.gateway.forward import Forwarder
from broker.keys import KeyRing
from broker.observability import Metrics
from broker.state.base import StateStore
from broker.tracing import NULL_TRACER, Tracer
from broker.txn.minted import MintedHere

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
    audit: AuditSink
    approvals: ApprovalService
    forwarder: Forwarder
    #: spans (CONTRACT §16); the null tracer unless observability.tracing is configured
    tracer: Tracer = NULL_TRACER
    #: the txn tokens this process signed at exchange, so that their invocation skips re-verifying its own
    #: signature (broker.txn.minted)
    minted: MintedHere = field(default_factory=MintedHere)


async def audit_decision(services: Services, record: RequestContext) -> None:
    """Write this request's decision record and wait until it is on stable storage (group commit, CONTRACT §15:
    acknowledged means durable); raises AuditUnavailable if it cannot be written."""
    metrics = services.metrics
    try:
        with services.tracer.span("audit"):
            await services.audit.commit(record.audit_fields())
    except AuditUnavailable:
        metrics.audit_errors.inc()
        raise
    metrics.audit_records.inc()
    record.audited = True


async def audit_outcome(services: Services, record: RequestContext, body: bytes | None) -> None:
    """Write this forwarded call's ``outcome`` record (CONTRACT §15) before the agent gets ``body`` (None: a
    stream, whose bytes were hashed as they were relayed). Written once, even when it fails; raises
    AuditUnavailable — the agent must then not get the answer. It acknowledges no decision (the decision record
    was committed before the forward), so it waits only until no crash of this process can lose it
    (AuditSink.persist): the file store does not wait for its fsync (a second wait per call halved throughput);
    PostgreSQL waits for the commit."""
    outcome = record.outcome
    if outcome is None or outcome.recorded:
        return
    outcome.recorded = True
    fields = record.outcome_fields(time.perf_counter(), body)
    metrics = services.metrics
    try:
        await services.audit.persist(fields)
    except AuditUnavailable:
        metrics.audit_errors.inc()
        raise
    metrics.audit_records.inc()
