"""Free space under the audit file (CONTRACT §9 ``/readyz``): a broker that cannot write its audit refuses every
call (503 ``audit_unavailable``), so it should leave the load balancer's rotation *before* the disk is full."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["disk_free_bytes", "disk_low"]


def disk_free_bytes(audit_file: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem holding ``audit_file`` (its folder, if the
    file does not exist yet); None when it cannot be read."""
    for candidate in (audit_file, audit_file.parent):
        try:
            stats = os.statvfs(candidate)
        except OSError:
            continue
        return stats.f_bavail * stats.f_frsize
    return None


def disk_low(free: int | None, min_free_bytes: int) -> bool:
    """Whether the audit's filesystem is below ``audit.min_free_bytes`` (unknown free space counts as low;
    ``min_free_bytes`` 0 turns the check off)."""
    if min_free_bytes <= 0:
        return False
    return free is None or free < min_free_bytes
