"""CPU pinning and per-process CPU time for ``python -m broker.dev.bench`` (Linux ``/proc``; no psutil).

Pinning: the server under test runs on :data:`SERVER_CPUS` (core 0), the bench itself (the load generator) and
every auxiliary process (backend, the bare forwarder's upstream, the MCP server behind the broker) on the other
cores, so a set-up's rate is what one core of that server does, whatever it is. Affinity is set on every thread of
every process of a tree (the root and its descendants: ``--workers`` children too), so threads started before the
call are moved as well; processes and threads started later inherit it.

CPU time: ``utime + stime`` of every live process of a tree, from ``/proc/PID/stat`` (all threads included),
plus ``cutime + cstime`` (children already reaped). Sampled at the start and the end of the measured window.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

_TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def available_cpus() -> list[int]:
    """The CPUs this process may run on (sorted)."""
    return sorted(os.sched_getaffinity(0))


def split_cpus(cpus: list[int]) -> tuple[set[int], set[int]] | None:
    """(server cpus, load cpus): the first CPU for the server, the rest for everything else; None below 2."""
    if len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is parenthesised and may hold spaces: split after its closing parenthesis
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from ``/proc/PID/task/*/children``)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found.extend(int(child) for child in (task / "children").read_text().split())
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    seen: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        todo.extend(children(current))
    return seen


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of the trees rooted at ``pids`` (live processes, plus reaped children)."""
    total = 0
    for root in pids:
        for pid in tree(root):
            fields = _stat_fields(pid)
            if fields is None:
                continue
            # after the name: state(0) ... utime(11) stime(12) cutime(13) cstime(14)
            total += sum(int(value) for value in fields[11:15])
    return total * _TICK


def steal_seconds(cpus: Iterable[int]) -> float:
    """Seconds the hypervisor ran something else while these CPUs wanted to run (``/proc/stat``, steal column);
    0.0 on bare metal. A virtual machine's neighbours slow its code down: read CPU figures with it."""
    wanted = {f"cpu{index}" for index in cpus}
    total = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            fields = line.split()
            if fields and fields[0] in wanted and len(fields) > 8:
                total += int(fields[8])
    return total * _TICK


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Set the affinity of every thread of every process of ``pid``'s tree (gone processes are skipped)."""
    for member in tree(pid):
        try:
            tasks = [int(task.name) for task in Path(f"/proc/{member}/task").iterdir()]
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(task, cpus)
