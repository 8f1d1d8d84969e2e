"""Writing the ``summary`` records of unauthenticated noise (:mod:`broker.audit.summary` counts them).

:meth:`NoiseRecorder.count` is called on the refusal path (synchronous, no I/O); a task writes each closed window
through the audit store's ``commit`` (the file or PostgreSQL alike) when it closes, and :meth:`NoiseRecorder.close`
writes the open ones at shutdown, before the audit store closes (``broker.app`` orders the ``cleanup_ctx``).
A summary whose write fails is counted again and retried with its key's next window: noise may be late in the
audit, never silently lost while the broker runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from broker.audit.summary import NoiseSummary, Summary, client_network
from broker.errors import AuditUnavailable

__all__ = ["NoiseRecorder"]

log = structlog.get_logger("broker.audit")

Commit = Callable[[Mapping[str, Any]], Awaitable[Any]]


class NoiseRecorder:
    """Counts refusals before identity and writes at most one ``summary`` per (reason, network) per window."""

    def __init__(
        self,
        commit: Commit,
        *,
        on_written: Callable[[], None] | None = None,
        on_error: Callable[[], None] | None = None,
        summary: NoiseSummary | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._commit = commit
        self._on_written = on_written
        self._on_error = on_error
        self._summary = summary if summary is not None else NoiseSummary()
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Refusals counted and not yet written."""
        return self._summary.pending

    def count(self, reason: str, address: str | None) -> None:
        """One refusal of ``reason`` from the peer at ``address`` (its network is what is kept)."""
        self._summary.add(reason, client_network(address), self._clock())
        self._wakeup.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-noise-summary")

    async def close(self) -> None:
        """Stop the task and write every open window (shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def flush(self) -> None:
        """Write every open window now (shutdown; tests that read the log)."""
        await self._write(self._summary.drain(self._clock()), retry=False)

    async def _run(self) -> None:
        summary = self._summary
        while True:
            due_at = summary.next_due()
            if due_at is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            delay = due_at - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)  # a timer: windows close on the clock, not on an event
                continue
            await self._write(summary.due(self._clock()), retry=True)

    async def _write(self, summaries: list[Summary], *, retry: bool) -> None:
        for index, item in enumerate(summaries):
            try:
                await self._commit(item.fields())
            except AuditUnavailable as exc:
                if self._on_error is not None:
                    self._on_error()
                lost = summaries[index:]
                log.error(
                    "audit summary records not written",
                    reason=exc.reason,
                    records=len(lost),
                    refusals=sum(s.count for s in lost),
                    retried=retry,
                )
                if retry:
                    for summary in lost:
                        self._summary.restore(summary)
                    await asyncio.sleep(1.0)  # the store is down: do not spin on it
                return
            if self._on_written is not None:
                self._on_written()
