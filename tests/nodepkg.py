"""Node packages the tests run, pinned in a ``package.json`` + ``package-lock.json`` of their own folder
(``tests/oidc``, ``tests/stock_clients``) and installed there with ``npm ci`` the first time a test needs them."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


def _pinned_version(folder: Path, package: str) -> str:
    return str(json.loads((folder / "package.json").read_text())["dependencies"][package])


def _installed_version(folder: Path, package: str) -> str | None:
    try:
        return str(json.loads((folder / "node_modules" / package / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def ensure_npm_ci(folder: Path, package: str, missing: Callable[[str], NoReturn]) -> str:
    """The ``node`` binary, after ``npm ci`` in ``folder`` if the pinned ``package`` is not installed there;
    ``missing(why)`` (a skip, or a failure under ``CI=true``) when node or npm is absent or the install fails."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing("node or npm is not on PATH")
    if _installed_version(folder, package) == _pinned_version(folder, package):
        return node
    # One installer at a time (parallel test processes); the others wait on the lock, then see it installed.
    with open(folder / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_version(folder, package) != _pinned_version(folder, package):
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=folder,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if done.returncode != 0 or _installed_version(folder, package) != _pinned_version(
                folder, package
            ):
                missing(f"npm ci in {folder} failed: {done.stderr.strip()[-2000:]}")
    return node
