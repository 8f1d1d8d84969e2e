"""broker.dev.bench.cpu: the bench's pinning and per-process CPU accounting (Linux /proc); no timing asserted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from broker.dev.bench import cpu

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_split_puts_the_server_on_the_first_cpu_and_the_rest_beside() -> None:
    assert cpu.split_cpus([0]) is None
    assert cpu.split_cpus([0, 1]) == ({0}, {1})
    assert cpu.split_cpus([2, 3, 5]) == ({2}, {3, 5})


def test_tree_and_cpu_seconds_count_a_child_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert child.pid in cpu.children(os.getpid())
        assert cpu.tree(os.getpid())[0] == os.getpid()
        assert child.pid in cpu.tree(os.getpid())
        assert cpu.cpu_seconds([os.getpid()]) >= cpu.cpu_seconds([child.pid]) >= 0.0
    finally:
        child.communicate(b"")
    assert cpu.cpu_seconds([child.pid]) == 0.0  # gone: nothing to read, no error


def test_pin_tree_sets_every_thread_of_a_process() -> None:
    allowed = cpu.available_cpus()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        cpu.pin_tree(child.pid, {allowed[-1]})
        assert os.sched_getaffinity(child.pid) == {allowed[-1]}
        cpu.pin_tree(child.pid, set(allowed))
        assert os.sched_getaffinity(child.pid) == set(allowed)
    finally:
        child.communicate(b"")


def test_steal_is_never_negative() -> None:
    assert cpu.steal_seconds(cpu.available_cpus()) >= 0.0
    assert cpu.steal_seconds([]) == 0.0
