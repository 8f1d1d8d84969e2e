"""Rotation without restart: the broker's certificate, key, trust bundle and signing key follow their files.

SVIDs live an hour (SPIRE rotates them at half-life), so a gateway that needs a restart per rotation is not
deployable. A watcher polls the files' (mtime, size, inode) every ``server.tls.reload_interval_seconds``:

- **server TLS** (cert, key, client CA): the new files are first loaded into a scratch context (a half-written or
  mismatched pair is refused and the old one keeps serving), then into the *live* context, so every new handshake
  uses them while established connections keep theirs. Trust-bundle rotation adds the new CAs; removing a CA from
  the live set needs a restart (OpenSSL stores cannot drop certificates).
- **upstream client certificates**: each pooled upstream TLS context reloads its certificate and key the same way.
- **signing key**: the new key signs from now on; the old one stays published for the overlap (broker.keys).

Every rotation is logged, counted in ``broker_rotations_total{what,result}`` and written to the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from broker.admin import config_load_record
from broker.errors import AuditUnavailable
from broker.jose import JoseError, Signer
from broker.resources import AUDIT, METRICS, RUNTIME, SIGNER, WATCHER

log = structlog.get_logger("broker.rotation")

Stamp = tuple[int, int, int] | None


def stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass
class Watcher:
    """Which files were seen in which state; ``check`` applies what changed (also called directly by tests)."""

    app: web.Application
    server_ssl: ssl.SSLContext
    stamps: dict[Path, Stamp] = field(default_factory=dict)
    #: rotation records being committed (awaited before the audit store closes)
    audits: set[asyncio.Task[None]] = field(default_factory=set)

    def _files(self) -> dict[str, tuple[Path, ...]]:
        runtime = self.app[RUNTIME].current
        tls = runtime.config.server.tls
        upstream = tuple(Path(p) for files in runtime.upstream_tls for p in files)
        return {
            "server_tls": (Path(tls.cert), Path(tls.key), Path(tls.client_ca)),
            "upstream_tls": upstream,
            "signing_key": (Path(runtime.config.signing.key_file),),
        }

    def prime(self) -> None:
        for paths in self._files().values():
            for path in paths:
                self.stamps[path] = stamp(path)

    def _changed(self, paths: tuple[Path, ...]) -> bool:
        current = {path: stamp(path) for path in paths}
        changed = any(self.stamps.get(path) != value for path, value in current.items())
        self.stamps.update(current)
        return changed

    def check(self) -> list[str]:
        """Apply every rotation whose files changed; returns what was rotated."""
        rotated = []
        for what, paths in self._files().items():
            if not self._changed(paths):
                continue
            try:
                getattr(self, f"_rotate_{what}")()
            except (OSError, ssl.SSLError, JoseError, ValueError) as exc:
                self.app[METRICS].rotations.labels(what=what, result="failure").inc()
                log.error("rotation refused; the old files stay in use", what=what, error=str(exc))
                continue
            self.app[METRICS].rotations.labels(what=what, result="success").inc()
            log.info("rotated", what=what)
            self._audit(what)
            rotated.append(what)
        return rotated

    def _rotate_server_tls(self) -> None:
        tls = self.app[RUNTIME].current.config.server.tls
        scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        scratch.load_cert_chain(str(tls.cert), str(tls.key))  # refuses a mismatched or half-written pair
        scratch.load_verify_locations(cafile=str(tls.client_ca))
        self.server_ssl.load_cert_chain(str(tls.cert), str(tls.key))
        self.server_ssl.load_verify_locations(cafile=str(tls.client_ca))

    def _rotate_upstream_tls(self) -> None:
        for (ca, cert, key), context in self.app[RUNTIME].current.upstream_tls.items():
            scratch = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
            scratch.load_cert_chain(cert, key)
            context.load_cert_chain(cert, key)
            context.load_verify_locations(cafile=ca)

    def _rotate_signing_key(self) -> None:
        path = self.app[RUNTIME].current.config.signing.key_file
        self.app[SIGNER].rotate(Signer.from_file(Path(path)), now=time.time())

    def _audit(self, what: str) -> None:
        """Commit the rotation's record (group commit, like every record); ``audits`` holds it until written."""
        record = config_load_record(
            self.app[RUNTIME].current, decision="allow", reason=f"rotated {what}", source="rotation"
        )
        task = asyncio.get_running_loop().create_task(self._commit(record))
        self.audits.add(task)
        task.add_done_callback(self.audits.discard)

    async def _commit(self, record: dict[str, Any]) -> None:
        try:
            await self.app[AUDIT].commit(record)
            self.app[METRICS].audit_records.inc()
        except AuditUnavailable:
            self.app[METRICS].audit_errors.inc()
            log.error("rotation could not be audited", reason=record["reason"])


async def watch_files(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: poll the rotated files for the life of the app."""
    watcher = app[WATCHER]
    watcher.prime()
    interval = app[RUNTIME].current.config.server.tls.reload_interval_seconds

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            watcher.check()

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if watcher.audits:
        await asyncio.wait(watcher.audits)
