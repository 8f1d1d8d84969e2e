"""Helpers for PostgreSQL tests: a fresh database per test on the shared server, and a private server.

    with fresh_database() as url:          # CREATE DATABASE t_<random> on 127.0.0.1:5432, dropped after
        ...

    async with private_postgres() as pg:    # initdb + pg_ctl in a temp dir on a free port (never the shared one)
        await pg.stop(); await pg.start()   # an outage and the recovery, same port and data

PostgreSQL missing (nothing answering, no server binaries): the test is skipped with a message, or FAILS under
``CI=true`` — a CI run never passes by skipping the audit-store tests.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Final, NoReturn

import psycopg
import pytest

from tests.redisutil import free_port

PG_ADMIN_URL: Final = os.environ.get("BROKER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
READY_WITHIN_SECONDS: Final = 30.0


def pg_missing(why: str) -> NoReturn:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why} (CI=true: PostgreSQL is required, not optional)")
    pytest.skip(f"{why}; start PostgreSQL on 127.0.0.1:5432 (CI=true turns this skip into a failure)")


def _with_db(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


@contextmanager
def fresh_database(admin_url: str = PG_ADMIN_URL) -> Iterator[str]:
    """A new, empty database (random name) for the block; its URL. Dropped after (connections forced out)."""
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pg_missing(f"no PostgreSQL answering at {admin_url} ({type(exc).__name__})")
    name = f"t_{uuid.uuid4().hex[:16]}"
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            yield _with_db(admin_url, name)
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _server_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        pg_missing(f"PostgreSQL server binary {name} not found (/usr/lib/postgresql/*/bin)")
    return found[-1]


def _as_postgres() -> list[str]:
    # initdb and postgres refuse to run as root
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclass
class PrivatePostgres:
    """A PostgreSQL server of its own (data in a temp dir, a free port on 127.0.0.1, trust auth)."""

    datadir: str
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        command = [*_as_postgres(), _server_bin("pg_ctl"), "-D", self.datadir, "-w", "-t", "30", *args]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.fail(f"pg_ctl {' '.join(args)} failed: {done.stdout}{done.stderr}")

    async def start(self) -> None:
        """Start and return once it accepts connections (pg_ctl -w waits, bounded by -t)."""
        options = f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 -c fsync=on"
        await asyncio.to_thread(self._ctl, "start", "-o", options, "-l", os.path.join(self.datadir, "log"))

    async def stop(self) -> None:
        """Fast shutdown: every client connection is terminated (the outage a broker sees)."""
        await asyncio.to_thread(self._ctl, "stop", "-m", "fast")


@asynccontextmanager
async def private_postgres() -> AsyncIterator[PrivatePostgres]:
    """initdb a private cluster in a temp dir, start it on a free port; stopped and removed at exit."""
    workdir = tempfile.mkdtemp(prefix="broker-pg-")
    datadir = os.path.join(workdir, "data")
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
    initdb = [
        *_as_postgres(),
        _server_bin("initdb"),
        "-D",
        datadir,
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
    ]
    done = await asyncio.to_thread(subprocess.run, initdb, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(f"initdb failed: {done.stdout}{done.stderr}")
    server = PrivatePostgres(datadir, free_port())
    try:
        await server.start()
        yield server
    finally:
        subprocess.run(
            [*_as_postgres(), _server_bin("pg_ctl"), "-D", datadir, "-m", "immediate", "stop"],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(workdir, ignore_errors=True)
