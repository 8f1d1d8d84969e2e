"""What the server needs of an audit store, and which one a config asks for (CONTRACT §9, §15).

Two stores write the same chain (same records, hashes and signed checkpoints): the file
(:class:`broker.audit.sink.AuditLog`, ``audit.file``, the default) and PostgreSQL
(:class:`broker.audit.pgsink.PgAuditSink`, ``audit.store: postgresql://…``). Code outside ``broker/audit`` sees only
:class:`AuditSink`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from broker.audit.tail import ResumeReport
from broker.config.models import Audit
from broker.jose import SigningKey

__all__ = ["AuditSink", "make_sink"]


class AuditSink(Protocol):
    """An open-once, hash-chained audit store with group commit."""

    @property
    def healthy(self) -> bool:
        """Open, and the last write succeeded (``/readyz``): False while the store is failing."""
        ...

    async def start(self) -> None:
        """Open the store (and resume or begin the chain); raises AuditUnavailable with a one-line reason."""
        ...

    async def commit(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Seal one decision record and return it (as written) once it is durable — the caller may acknowledge
        the decision only then. Raises ValueError for fields outside CONTRACT §9 and AuditUnavailable when the
        record is not known to be durable (the decision must then be refused)."""
        ...

    async def persist(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Seal one record that acknowledges no decision (a forwarded call's ``outcome``) and return it once no
        crash of this process can lose it — not necessarily once it is on stable storage: the file returns as soon
        as the line is written (durable with the next group commit, which this starts; a host crash within that
        fsync can lose it), PostgreSQL once committed (a queued row dies with the process or the connection).
        Raises ValueError as ``commit``, and AuditUnavailable when the record cannot be kept."""
        ...

    async def aclose(self) -> None:
        """Seal the chain with a final checkpoint and close (after in-flight commits were answered)."""
        ...


def make_sink(
    config: Audit, *, signer: SigningKey, on_resume: Callable[[ResumeReport], None] | None = None
) -> AuditSink:
    """The store ``config`` names: PostgreSQL for ``store``, else the file."""
    if config.store is not None:
        from broker.audit.pgsink import PgAuditSink  # psycopg is imported only when a database is configured

        return PgAuditSink(
            config.store,
            signer=signer,
            checkpoint_every=config.checkpoint_every,
            checkpoint_seconds=config.checkpoint_seconds,
            timeout_seconds=config.store_timeout_seconds,
        )
    from broker.audit.sink import AuditLog

    assert config.file is not None  # Audit's validator: exactly one of file and store
    return AuditLog(
        config.file,
        signer=signer,
        checkpoint_every=config.checkpoint_every,
        checkpoint_seconds=config.checkpoint_seconds,
        fsync=config.fsync,
        on_resume=on_resume,
    )
