"""Logs are best effort: a failing log sink drops the line instead of failing the request that logged it."""

from __future__ import annotations

import errno
import io

import pytest

from broker.observability import BestEffortStream


class Full(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(errno.EFBIG, "File too large")  # what RLIMIT_FSIZE gives a process that writes past it

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("stream", [Full(), io.StringIO()], ids=["failing-sink", "closed-sink"])
def test_a_failing_log_sink_drops_the_line(stream: io.StringIO) -> None:
    if not isinstance(stream, Full):
        stream.close()
    best_effort = BestEffortStream(stream)
    assert best_effort.write('{"event": "access"}\n') == 0
    best_effort.flush()  # no exception either


def test_a_working_sink_gets_the_line() -> None:
    stream = io.StringIO()
    BestEffortStream(stream).write("line\n")
    assert stream.getvalue() == "line\n"
