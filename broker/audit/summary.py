"""Unauthenticated noise, counted instead of recorded one by one (CONTRACT §15, HOSTILE §0 "work an
unauthenticated peer can cause"). Pure: no I/O, the clock is passed in.

A refusal before identity is established (no client certificate, one that is not a valid SVID, a malformed
request from such a peer) costs an attacker nothing and would cost the audit a full record (~400 bytes) each. So
these refusals are counted per (reason, client network: IPv4 /24, IPv6 /48 — the smallest block one site
is commonly given, so one attacker's many /64s count once) and written as at most one
``summary`` record per key per window (10 s): ``count``, ``window_start``, ``window_end``, ``reason``,
``client_network``, ``decision: "deny"``. A key's window opens at its first refusal and closes ``window``
seconds later; its record is due then (:meth:`NoiseSummary.due`), or at shutdown (:meth:`NoiseSummary.drain`).

One client network therefore adds at most one record per reason it can provoke per window, whatever its rate.
The number of keys open at once is bounded (``max_keys``, 256): past it, refusals are counted under
``client_network: "other"``, so memory and the audit's growth stay bounded under a spread-out flood too — at most
``max_keys`` + the reasons' "other" keys records per window (~300 bytes each: under 10 KB/s in all).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Final

from broker.audit.chain import format_ts

__all__ = ["OTHER_NETWORK", "SUMMARY_EVENT", "UNKNOWN_NETWORK", "NoiseSummary", "Summary", "client_network"]

SUMMARY_EVENT: Final = "summary"
WINDOW_SECONDS: Final = 10.0
MAX_KEYS: Final = 256
#: a peer address that is not an IP address (a Unix socket, none)
UNKNOWN_NETWORK: Final = "unknown"
#: the key of refusals from networks past ``max_keys``
OTHER_NETWORK: Final = "other"


def client_network(address: str | None) -> str:
    """The network a client address counts under: ``a.b.c.0/24`` for IPv4 (IPv4-mapped IPv6 too), the /48 for
    IPv6, ``unknown`` for anything else."""
    if not address:
        return UNKNOWN_NETWORK
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return UNKNOWN_NETWORK
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


@dataclass(slots=True)
class _Window:
    start: float
    count: int


@dataclass(frozen=True, slots=True)
class Summary:
    """One closed window of one key: what a ``summary`` record says."""

    reason: str
    client_network: str
    count: int
    start: float
    end: float

    def fields(self) -> dict[str, Any]:
        """The record's fields (the audit log adds ``seq``, ``ts``, ``prev``, ``hash``)."""
        return {
            "event": SUMMARY_EVENT,
            "decision": "deny",
            "reason": self.reason,
            "client_network": self.client_network,
            "count": self.count,
            "window_start": format_ts(self.start),
            "window_end": format_ts(self.end),
        }


class NoiseSummary:
    """Counts of refusals per (reason, client network) in windows of ``window`` seconds."""

    __slots__ = ("_keys", "_max_keys", "_window")

    def __init__(self, *, window: float = WINDOW_SECONDS, max_keys: int = MAX_KEYS) -> None:
        if window <= 0 or max_keys < 1:
            raise ValueError("window and max_keys must be positive")
        self._window = window
        self._max_keys = max_keys
        self._keys: dict[tuple[str, str], _Window] = {}

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def pending(self) -> int:
        """Refusals counted and not yet in a record."""
        return sum(window.count for window in self._keys.values())

    def add(self, reason: str, network: str, now: float) -> None:
        """Count one refusal of ``reason`` from ``network`` (:func:`client_network`) at ``now`` (epoch seconds)."""
        key = (reason, network)
        window = self._keys.get(key)
        if window is None:
            if len(self._keys) >= self._max_keys:
                key = (reason, OTHER_NETWORK)
                window = self._keys.get(key)
            if window is None:
                self._keys[key] = _Window(start=now, count=1)
                return
        window.count += 1

    def next_due(self) -> float | None:
        """When the earliest open window closes (epoch seconds), None when nothing is counted."""
        if not self._keys:
            return None
        return min(window.start for window in self._keys.values()) + self._window

    def due(self, now: float) -> list[Summary]:
        """The windows closed by ``now``, removed from the counts (a later refusal opens a new window)."""
        closed = [key for key, window in self._keys.items() if window.start + self._window <= now]
        return [self._summary(key, self._keys.pop(key), window_closed=True, now=now) for key in closed]

    def drain(self, now: float) -> list[Summary]:
        """Every window, closed or not (shutdown): nothing counted is lost."""
        summaries = [
            self._summary(key, window, window_closed=False, now=now) for key, window in self._keys.items()
        ]
        self._keys.clear()
        return summaries

    def restore(self, summary: Summary) -> None:
        """Count a summary again (its record could not be written): it goes out with its key's next record."""
        key = (summary.reason, summary.client_network)
        window = self._keys.get(key)
        if window is None:
            self._keys[key] = _Window(start=summary.start, count=summary.count)
        else:
            window.start = min(window.start, summary.start)
            window.count += summary.count

    def _summary(self, key: tuple[str, str], window: _Window, *, window_closed: bool, now: float) -> Summary:
        end = (
            window.start + self._window
            if window_closed
            else max(min(now, window.start + self._window), window.start)
        )
        return Summary(reason=key[0], client_network=key[1], count=window.count, start=window.start, end=end)
