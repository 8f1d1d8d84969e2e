"""Closed-loop asyncio load generator over mTLS, for ``python -m broker.dev.bench`` (a benchmark, not a test).

``concurrency`` workers share one ``ClientSession`` whose pool holds exactly ``concurrency`` keep-alive
connections (like ``wrk -c``); each worker sends a request, reads the whole response, and sends the next.
``make_request`` runs once per request, so set-ups that need a fresh DPoP proof per request sign inside it
(its cost then counts against the load generator, which shares the machine's cores with the servers: compare
ratios taken in one run, never absolute figures across runs — PERF.md).

Only requests that start after ``warmup`` and finish before ``warmup + duration`` are counted; requests
still in flight at the end are dropped. ``rps`` counts 2xx responses only, so a set-up that answers every
request with an error cannot look fast; the latency percentiles are over those 2xx responses too.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

#: builds one request: (headers, body). Called once per request.
MakeRequest = Callable[[], tuple[dict[str, str], bytes]]


@dataclass(frozen=True)
class Result:
    rps: float  #: 2xx responses per second of the measured window
    p50_ms: float  #: median latency of 2xx responses (NaN when there were none)
    p99_ms: float
    errors: int  #: non-2xx responses plus transport failures (refused, reset, timeout, TLS)
    status_counts: dict[int, int]  #: HTTP status → count, within the window
    exceptions: dict[str, int] = field(default_factory=dict)  #: exception class name → count
    duration: float = 0.0
    answered: int = 0  #: responses of any status that arrived within the window (divides server CPU)

    def as_json(self) -> dict[str, Any]:
        def ms(value: float) -> float | None:
            return None if math.isnan(value) else round(value, 3)

        return {
            "rps": round(self.rps, 1),
            "p50_ms": ms(self.p50_ms),
            "p99_ms": ms(self.p99_ms),
            "errors": self.errors,
            "status_counts": {str(status): n for status, n in sorted(self.status_counts.items())},
            "exceptions": dict(self.exceptions),
        }


def client_ssl_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Client TLS 1.2+ presenting ``cert``/``key``; the server must chain to ``ca`` and match its host."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list; NaN for an empty one."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def run_load(
    url: str,
    *,
    concurrency: int,
    duration: float,
    make_request: MakeRequest,
    ssl_ctx: ssl.SSLContext | None,
    warmup: float = 1.0,
    method: str = "POST",
    request_timeout: float = 10.0,
    on_window: Callable[[str], None] | None = None,
) -> Result:
    """Load ``url`` for ``warmup + duration`` s (plus at most ``request_timeout`` for the last requests).

    ``on_window`` is called with ``"start"`` when the measured window opens and ``"end"`` when it closes (the
    bench samples the server's CPU time there)."""
    if concurrency < 1 or duration <= 0 or warmup < 0:
        raise ValueError("need concurrency >= 1, duration > 0, warmup >= 0")
    latencies: list[float] = []  # seconds, 2xx only, within the window
    statuses: Counter[int] = Counter()
    exceptions: Counter[str] = Counter()
    answered = [0]  # responses of any status that arrived within the window, whenever sent
    measure_from = time.perf_counter() + warmup
    stop_at = measure_from + duration

    connector = aiohttp.TCPConnector(limit=concurrency, ssl=ssl_ctx if ssl_ctx is not None else False)
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            while (start := time.perf_counter()) < stop_at:
                headers, body = make_request()
                status = 0
                failure: str | None = None
                try:
                    async with session.request(method, url, data=body, headers=headers) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    failure = type(exc).__name__
                end = time.perf_counter()
                if failure is None and measure_from <= end <= stop_at:
                    answered[0] += 1
                if start < measure_from or end > stop_at:
                    continue
                if failure is not None:
                    exceptions[failure] += 1
                    continue
                statuses[status] += 1
                if 200 <= status < 300:
                    latencies.append(end - start)

        async def window() -> None:
            assert on_window is not None
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            on_window("start")
            await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
            on_window("end")

        tasks = [worker() for _ in range(concurrency)]
        await asyncio.gather(*tasks, *([window()] if on_window is not None else []))

    latencies.sort()
    errors = sum(n for status, n in statuses.items() if not 200 <= status < 300) + sum(exceptions.values())
    return Result(
        rps=len(latencies) / duration,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        errors=errors,
        status_counts=dict(statuses),
        exceptions=dict(exceptions),
        duration=duration,
        answered=answered[0],
    )
