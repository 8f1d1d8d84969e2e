"""Announcing new approval requests to the configured webhooks (CONTRACT §6), off the request path.

:meth:`WebhookNotifier.announce` only puts the approval in a bounded queue and returns: a slow, failing or
silent receiver never delays the agent's answer. A background worker signs one announcement per approval
(a compact JWS by the broker key, ``typ: approval-request+jwt``, verifiable with ``/.well-known/jwks.json``)
and POSTs it as ``application/jose`` to every webhook, each delivery in its own task, retried on a non-2xx
answer, a timeout or a connection error with exponential backoff and full jitter, up to ``max_attempts``.

A webhook with ``format: slack`` gets Slack-compatible incoming-webhook JSON instead (:func:`slack_message`:
``text`` and ``blocks`` naming the tool, requester, agent, reason, expiry and the approval page's link, never the
arguments: a chat channel is not where they are judged, the page shows them after login). Agent-chosen text is
escaped for Slack's mrkdwn (``&``, ``<``, ``>``), so an argument cannot forge a link or a mention.

Delivery is at least once per webhook and best effort: receivers should deduplicate by ``approval_id``.
A full queue drops the announcement (logged, ``on_result("dropped")``); so does shutdown for what is still
queued. The approval itself is unaffected: approvers can always find it with ``broker approvals list``.
Redirects are not followed: the signed body carries the call's arguments and must go where configured only.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import aiohttp
import structlog

from broker.config.models import Webhook
from broker.jose import SigningKey
from broker.txn.approval_rules import Approval, rfc3339

__all__ = ["ANNOUNCEMENT_TYP", "WebhookNotifier", "announcement_claims", "slack_message"]

log = structlog.get_logger("broker.webhooks")

ANNOUNCEMENT_TYP: Final = "approval-request+jwt"
#: most concurrent deliveries; beyond it the queue waits (and, once full, drops)
MAX_IN_FLIGHT: Final = 16
MAX_BACKOFF_SECONDS: Final = 60.0
#: called with "delivered", "failed" (attempts exhausted) or "dropped" (queue full): a metrics hook
ResultCallback = Callable[[str], None]


def announcement_claims(approval: Approval, *, public_url: str, now: float) -> dict[str, Any]:
    """The JWS payload of an announcement. ``exp`` = the approval's expiry: a stale announcement is void."""
    return {
        "iss": public_url,
        "iat": int(now),
        "exp": int(approval.expires_at),
        "approval_id": approval.id,
        "approval_url": f"{public_url}/approvals/{approval.id}",
        "tool": approval.tool,
        "arguments": dict(approval.arguments),
        "requester": approval.subject,
        "agent": approval.actor,
        "reason": approval.reason,
        "required": list(approval.required),
        "expires_at": rfc3339(approval.expires_at),
    }


def _slack_escape(text: str) -> str:
    # https://api.slack.com/reference/surfaces/formatting#escaping: exactly these three
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_message(approval: Approval, *, public_url: str) -> dict[str, Any]:
    """Slack incoming-webhook JSON announcing ``approval`` with a link to its page (no arguments)."""
    url = f"{public_url}/approvals/{approval.id}"
    required = ", ".join(approval.required)
    summary = (
        f"Approval needed ({required}): `{_slack_escape(approval.tool)}` requested by "
        f"{_slack_escape(approval.subject)} through {_slack_escape(approval.actor or 'no agent')}"
    )
    details = (
        f"*Why:* {_slack_escape(approval.reason or '-')}\n*Expires:* {rfc3339(approval.expires_at)}\n"
        f"<{url}|Review the arguments and decide>"
    )
    return {
        "text": f"{summary}. Decide at {url}",
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": summary}},
            {"type": "section", "text": {"type": "mrkdwn", "text": details}},
        ],
        "unfurl_links": False,
    }


class WebhookNotifier:
    """Signs and delivers approval announcements in the background. ``start()`` in a running loop, then
    ``announce()`` from anywhere on that loop; ``await close()`` at shutdown (before the session closes)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        signer: SigningKey,
        webhooks: Sequence[Webhook],
        *,
        public_url: str,
        max_attempts: int = 5,
        base_delay: float = 0.5,
        queue_size: int = 1000,
        on_result: ResultCallback | None = None,
    ) -> None:
        if max_attempts < 1 or base_delay < 0 or queue_size < 1:
            raise ValueError("max_attempts and queue_size must be >= 1, base_delay >= 0")
        self.session = session
        self.signer = signer
        self.public_url = public_url.rstrip("/")
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.on_result = on_result
        self.dropped = 0
        self._started = False
        self._queue: asyncio.Queue[Approval] = asyncio.Queue(maxsize=queue_size)
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._worker: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._random = random.Random()  # noqa: S311 - jitter, not a secret
        #: (webhook, ssl context or True for the system trust store)
        self.targets: list[tuple[Webhook, ssl.SSLContext | bool]] = []
        self.set_webhooks(webhooks)

    def set_webhooks(self, webhooks: Sequence[Webhook]) -> None:
        """Replace the webhook list (config reload); raises ``OSError``/``ssl.SSLError`` for an unusable
        ``ca`` before anything changes. Takes effect for announcements not yet started."""
        self.targets = [
            (hook, ssl.create_default_context(cafile=str(hook.ca)) if hook.ca is not None else True)
            for hook in webhooks
        ]
        if self.targets and self._worker is None and self._started:
            self.start()

    def _report(self, result: str) -> None:
        if self.on_result is not None:
            self.on_result(result)

    def announce(self, approval: Approval) -> None:
        """Queue ``approval`` for announcement and return at once; never raises, never waits."""
        if not self.targets:
            return
        try:
            self._queue.put_nowait(approval)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning(
                "approval announcement dropped: queue full", approval_id=approval.id, dropped=self.dropped
            )
            self._report("dropped")

    def start(self) -> None:
        self._started = True
        if self._worker is None and self.targets:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="approval-webhooks")

    async def close(self) -> None:
        """Stop the worker and in-flight deliveries; what is still queued is not announced (logged)."""
        self._started = False
        tasks = [t for t in (self._worker, *self._deliveries) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._worker = None
        if not self._queue.empty():
            log.warning("approval announcements not sent at shutdown", count=self._queue.qsize())

    async def _run(self) -> None:
        while True:
            approval = await self._queue.get()
            try:
                body = self.signer.sign(
                    announcement_claims(approval, public_url=self.public_url, now=time.time()),
                    typ=ANNOUNCEMENT_TYP,
                )
            except ValueError:  # a signing key that cannot sign is a config error, logged per approval
                log.exception("approval announcement could not be signed", approval_id=approval.id)
                continue
            slack: str | None = None
            for hook, ssl_context in self.targets:
                payload = body
                if hook.format == "slack":
                    slack = slack or json.dumps(slack_message(approval, public_url=self.public_url))
                    payload = slack
                await self._slots.acquire()
                task = asyncio.get_running_loop().create_task(
                    self._deliver(hook, ssl_context, approval, payload)
                )
                self._deliveries.add(task)
                task.add_done_callback(self._delivered)

    def _delivered(self, task: asyncio.Task[None]) -> None:
        self._deliveries.discard(task)
        self._slots.release()

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based): full jitter over an exponential cap."""
        cap = min(MAX_BACKOFF_SECONDS, self.base_delay * 2 ** (attempt - 1))
        return self._random.uniform(cap / 2, cap)

    async def _deliver(
        self, hook: Webhook, ssl_context: ssl.SSLContext | bool, approval: Approval, body: str
    ) -> None:
        timeout = aiohttp.ClientTimeout(total=hook.timeout_seconds)
        content_type = "application/json" if hook.format == "slack" else "application/jose"
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        for attempt in range(1, self.max_attempts + 1):
            outcome: str
            try:
                async with self.session.post(
                    hook.url,
                    data=body,
                    headers=headers,
                    ssl=ssl_context,
                    timeout=timeout,
                    allow_redirects=False,
                ) as response:
                    await response.read()
                    if 200 <= response.status < 300:
                        log.info("approval announced", approval_id=approval.id, attempt=attempt)
                        self._report("delivered")
                        return
                    outcome = f"status {response.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                outcome = type(exc).__name__
            log.warning(
                "approval announcement failed", approval_id=approval.id, attempt=attempt, outcome=outcome
            )
            if attempt < self.max_attempts:
                await asyncio.sleep(self.backoff(attempt))
        log.error("approval announcement abandoned", approval_id=approval.id, attempts=self.max_attempts)
        self._report("failed")
