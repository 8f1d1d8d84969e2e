"""``broker run --workers N``: N processes serving one port (SO_REUSEPORT), supervised by the parent.

Why processes: one event loop saturates one core (PERF.md); the kernel spreads connections across the workers'
sockets. What must hold across them does: replay, single use and counters live in Redis (N>1 with the memory
store is refused at start), metrics use prometheus-client's multiprocess mode so any worker's ``/metrics``
answers for all, and each worker writes its own audit chain (``audit.jsonl`` → ``audit.w0.jsonl``, …) because
one chain appended by several processes would fork (HOSTILE A06).

Supervision is fail-fast: if a worker dies, the others are stopped and the parent exits non-zero, so the
process manager (systemd, Kubernetes) restarts the whole broker rather than running with fewer workers silently.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

import structlog

from broker.config.loader import LoadedConfig, load_config
from broker.config.models import split_hostport

log = structlog.get_logger("broker.workers")


class WorkersRefused(ValueError):
    """A worker count the config cannot support; the message says what to change."""


def check_workers(loaded: LoadedConfig, workers: int) -> None:
    config = loaded.config
    if workers < 1:
        raise WorkersRefused("--workers must be at least 1")
    if workers == 1:
        return
    if config.state.backend != "redis":
        raise WorkersRefused(
            f"--workers {workers} needs state.backend: redis — with the memory store each worker would keep its "
            "own replay and single-use records, and a DPoP proof or txn token could be used once per worker"
        )
    for name in ("listen", "admin_listen"):
        if split_hostport(getattr(config.server, name))[1] == 0:
            raise WorkersRefused(
                f"--workers {workers} needs a fixed port in server.{name} (port 0 is per process)"
            )


def worker_audit_file(path: Path, index: int) -> Path:
    return path.with_name(f"{path.stem}.w{index}{path.suffix}")


def for_worker(loaded: LoadedConfig, index: int) -> LoadedConfig:
    """The same config (and policy_version) with this worker's own audit chain."""
    if loaded.config.audit.file is None:
        return loaded  # a PostgreSQL store: every process starts its own chain
    audit = loaded.config.audit.model_copy(
        update={"file": worker_audit_file(loaded.config.audit.file, index)}
    )
    return dataclasses.replace(loaded, config=loaded.config.model_copy(update={"audit": audit}))


def _worker_main(config_path: str, index: int, log_format: str, log_level: str) -> None:
    from broker.observability import configure_logging
    from broker.server import serve

    configure_logging(fmt=log_format, level=log_level)
    structlog.contextvars.bind_contextvars(worker=index)
    loaded = for_worker(load_config(config_path), index)
    try:
        import uvloop

        uvloop.run(serve(loaded, reuse_port=True))
    except ImportError:  # pragma: no cover
        import asyncio

        asyncio.run(serve(loaded, reuse_port=True))


def run_workers(
    config_path: str, loaded: LoadedConfig, workers: int, *, log_format: str, log_level: str
) -> int:
    """Start ``workers`` processes; supervise them until SIGTERM/SIGINT or the death of one. Returns the exit code."""
    check_workers(loaded, workers)
    metrics_dir = tempfile.mkdtemp(prefix="broker-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited event loop or sockets
    procs: list[BaseProcess] = []
    stopping = False

    def stop_all(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    def reload_all(signum: int, _frame: object) -> None:
        for proc in procs:  # every worker compiles and swaps the config itself
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGHUP, reload_all)
    try:
        for index in range(workers):
            worker = ctx.Process(
                target=_worker_main,
                args=(config_path, index, log_format, log_level),
                name=f"broker-worker-{index}",
            )
            worker.start()
            procs.append(worker)
        log.info("workers started", workers=workers, pids=[p.pid for p in procs])
        exit_code = 0
        while not stopping:
            for proc in procs:
                proc.join(timeout=0.2)
                if not proc.is_alive() and not stopping:
                    log.error("worker exited; stopping the others", worker=proc.name, exitcode=proc.exitcode)
                    exit_code = 1
                    stop_all(signal.SIGTERM, None)
        grace = loaded.config.server.shutdown_grace_seconds + 5
        deadline = time.monotonic() + grace
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
        return exit_code
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        sys.stdout.flush()
