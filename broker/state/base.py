"""The state store interface: replay, single use, revocations, sliding-window counters, small JSON records.

Every check that must hold across workers and replicas (CONTRACT §1 ``--workers``, §4 DPoP ``jti``, §5 single
use, §6 counters and approvals, §9 revocations) goes through :class:`StateStore`. Two implementations:
:class:`broker.state.memory.MemoryStore` (one process) and :class:`broker.state.redis.RedisStore` (shared).

Contract common to every implementation:

- **Fail closed** (HOSTILE §0.6, S01, S02, S04): any backend error or timeout raises
  :class:`broker.errors.StateUnavailable` with ``reason="state_<op>_failed"`` (``op`` in :data:`OPS`). There
  is never a local fallback: a replay cache that answers "unseen" when it cannot know reopens replay.
- **Atomic check-and-set** (S03): :meth:`StateStore.claim` and :meth:`StateStore.claim_all` test and record in
  one step; no caller ever does "exists?" then "set".
- **Keys are caller-built and already safe** (S08): a key part that comes from untrusted input (``jti``,
  subject, SPIFFE ID) is hashed by the caller with :func:`hash_key_part`. Keys must match :data:`KEY_PATTERN`;
  anything else is a programming error (``ValueError``), not a backend failure. The store adds its configured
  ``key_prefix`` and a per-kind namespace (``claim:``, ``json:``, ``ctr:``, ``rev:``).
- **Redis Cluster**: the slot of a key is chosen by its first ``{...}`` hash tag. Multi-key operations
  (:meth:`StateStore.claim_all`) need every key in one slot: build them with the same :func:`hash_tag`, e.g.
  ``f"{hash_tag(txn_digest)}:txn"`` and ``f"{hash_tag(txn_digest)}:dpop:{jti_digest}"``. A ``key_prefix`` that
  itself holds a tag (``"broker:{b}:"``) puts every key in one slot. Revocation keys share the tag ``{rev}``
  so that :meth:`StateStore.is_revoked` is one ``MGET``. :meth:`StateStore.guard` spans several slots
  (``{rev}``, the DPoP ``jti``, the txn token's tag), so on a Cluster ``RedisStore`` runs it as ordered steps
  with the same single-use and replay guarantees (why, and what is weaker: :mod:`broker.state.redis`).
- Value-level argument errors (a non-positive TTL, a non-finite amount, a record that is not JSON) raise
  ``ValueError``: they are bugs in the caller and must not be counted as backend failures.
- **Limits are reserved, not read then recorded** (CONTRACT §12: a limit of N calls, or a sum, per window is
  never exceeded whatever the interleaving — tokens minted ahead, parallel calls, several replicas or
  workers). Reading a counter with :meth:`StateStore.window_stats` and adding the event later with
  :meth:`StateStore.record_event` leaves a gap in which 20 parallel calls all read ``count=4`` against a limit
  of 5 and all pass. :meth:`StateStore.reserve_events` closes it: in one atomic step it reads what each
  counter held and adds this call's event, so concurrent callers see distinct counts (0, 1, 2, ...) and a rule
  ``count >= 5`` lets exactly 5 through. A call that is then refused hands its events back with
  :meth:`StateStore.release_events` (they must not count against the caller). Between the reservation and
  the release a refused call is counted: a concurrent call may be refused because of it — the safe side.
  A backend failure during a reservation may leave its events recorded (over-counting, also the safe side);
  it never under-counts.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from broker.errors import StateUnavailable
from broker.jose import b64url_encode

Op = Literal[
    "claim",
    "claim_all",
    "guard",
    "is_revoked",
    "revoke",
    "record_event",
    "window_stats",
    "reserve_events",
    "release_events",
    "put_json",
    "get_json",
    "compare_and_set_json",
    "delete_json",
    "ping",
]
#: the closed set of ``op`` values (the ``op`` label of ``broker_state_errors_total``)
OPS: Final[tuple[Op, ...]] = get_args(Op)

#: called with the failed operation's name before :class:`StateUnavailable` is raised (metrics hook)
ErrorCallback = Callable[[str], None]

#: characters a caller-built key may hold: base64url, hex, ``.``, ``:`` separators and ``{}`` hash tags.
#: No ``*``, whitespace, ``/`` or anything from a raw identifier (S08: hash those).
KEY_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:{}\-]{1,256}")
_KIND_PATTERN: Final = re.compile(r"[a-z][a-z_]{0,31}")
#: TTL ceiling: longer than any replay window or approval, short enough that a unit mix-up is caught.
MAX_TTL_SECONDS: Final = 366 * 24 * 3600.0
#: JSON records are small (an approval is well under 4 KiB); a cap keeps a bug from filling the store.
MAX_RECORD_BYTES: Final = 64 * 1024

# Hash tag shared by every revocation key (see the module docstring, "Redis Cluster").
REVOCATION_TAG: Final = "{rev}"


def hash_key_part(value: str | bytes) -> str:
    """base64url(SHA-256(value)): a fixed-length, delimiter-free key part for untrusted input (S08)."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    return b64url_encode(hashlib.sha256(data).digest())


def hash_tag(tag: str) -> str:
    """``{tag}``: keys carrying the same tag land in the same Redis Cluster slot (needed by ``claim_all``)."""
    if not KEY_PATTERN.fullmatch(tag) or "{" in tag or "}" in tag:
        raise ValueError("hash tag must be a non-empty key part without braces")
    return "{" + tag + "}"


def check_key(key: str) -> str:
    """Return ``key`` if it matches :data:`KEY_PATTERN`, else raise ``ValueError`` (caller forgot to hash)."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise ValueError("state key must match [A-Za-z0-9_.:{}-]{1,256}; hash untrusted parts")
    return key


def check_prefix(key_prefix: str) -> str:
    """A ``key_prefix`` is empty or follows the key rules (it may carry a ``{...}`` hash tag)."""
    if key_prefix and not KEY_PATTERN.fullmatch(key_prefix):
        raise ValueError("key_prefix must match [A-Za-z0-9_.:{}-]{0,256}")
    return key_prefix


def check_ttl(ttl_seconds: float) -> float:
    """A TTL is a finite number of seconds in (0, :data:`MAX_TTL_SECONDS`]."""
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int | float):
        raise ValueError("ttl_seconds must be a number")
    if not (0 < ttl_seconds <= MAX_TTL_SECONDS):  # also false for NaN
        raise ValueError("ttl_seconds must be in (0, MAX_TTL_SECONDS]")
    return float(ttl_seconds)


def ttl_ms(ttl_seconds: float) -> int:
    """TTL in whole milliseconds for Redis ``PX``, rounded up so that a key never lives shorter than asked."""
    return max(1, math.ceil(check_ttl(ttl_seconds) * 1000))


def check_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    return float(value)


def check_kind(kind: str) -> str:
    """A revocation kind is a short lowercase word (``txn``, ``jti``, ``sub``, ``act``, ``grant``)."""
    if not isinstance(kind, str) or not _KIND_PATTERN.fullmatch(kind):
        raise ValueError("revocation kind must match [a-z][a-z_]{0,31}")
    return kind


def revocation_key(kind: str, value: str) -> str:
    """Key (without prefix) of a revocation. The value is hashed here: subjects are raw strings (S08)."""
    return f"rev:{REVOCATION_TAG}:{check_kind(kind)}:{hash_key_part(value)}"


def encode_record(value: Mapping[str, Any]) -> str:
    """Compact JSON of a record, without its ``version`` member (the store owns that member)."""
    if not isinstance(value, Mapping):
        raise ValueError("record must be a JSON object")
    body = {k: v for k, v in value.items() if k != "version"}
    try:
        text = json_dumps(body)
    except (TypeError, ValueError) as exc:
        raise ValueError("record is not JSON-serialisable") from exc
    if len(text.encode("utf-8")) > MAX_RECORD_BYTES:
        raise ValueError("record larger than MAX_RECORD_BYTES")
    return text


def json_dumps(value: Any) -> str:
    # allow_nan=False: NaN/Infinity are not JSON (RFC 8259 §6) and would not round-trip through other readers.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def decode_record(text: str | bytes, version: int) -> dict[str, Any]:
    """Inverse of :func:`encode_record`; raises ``ValueError`` on stored data that is not a JSON object."""
    body = json.loads(text)
    if not isinstance(body, dict):
        raise ValueError("stored record is not a JSON object")
    body["version"] = version
    return body


def check_version(expected_version: int) -> int:
    if isinstance(expected_version, bool) or not isinstance(expected_version, int) or expected_version < 0:
        raise ValueError("expected_version must be an int >= 0")
    return expected_version


def check_items(items: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """Validate ``claim_all`` items: non-empty, distinct valid keys, valid TTLs."""
    checked = [(check_key(key), check_ttl(ttl)) for key, ttl in items]
    if not checked:
        raise ValueError("claim_all needs at least one key")
    if len({key for key, _ in checked}) != len(checked):
        raise ValueError("claim_all keys must be distinct")
    return checked


def check_reservation_items(items: Sequence[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """Validate ``reserve_events`` items ``(scope, amount, window_seconds)``: valid keys, finite amounts, valid
    windows, distinct scopes (a scope has one window, and two events of one reservation in one scope would
    each have to see the other: refused as a caller bug). May be empty."""
    checked = [
        (check_key(scope), check_finite("amount", amount), check_ttl(window))
        for scope, amount, window in items
    ]
    if len({scope for scope, _, _ in checked}) != len(checked):
        raise ValueError("reserve_events scopes must be distinct")
    return checked


@dataclass(frozen=True, slots=True)
class Reservation:
    """What :meth:`StateStore.reserve_events` saw and added, enough to hand exactly those events back.

    ``seen[i]`` is the ``(count, sum)`` of item ``i`` BEFORE its event was added (what a limit compares with);
    ``events[i]`` is ``(scope, member)``: the unique id of the event added to that scope, and ``at`` the
    timestamp every event of the reservation carries. Opaque to callers beyond ``seen``: pass it back to
    :meth:`StateStore.release_events` of a store with the same ``key_prefix`` (any replica).
    """

    seen: tuple[tuple[int, float], ...] = ()
    at: float = 0.0
    events: tuple[tuple[str, str], ...] = ()


#: the reservation of no items (no store call was made; releasing it does nothing)
NO_RESERVATION: Final = Reservation()


def check_reservation(reservation: Reservation) -> list[tuple[str, str]]:
    """The ``(scope, member)`` pairs of a reservation to release; ``ValueError`` for anything else."""
    if not isinstance(reservation, Reservation):
        raise ValueError("release_events needs the Reservation returned by reserve_events")
    events = [(check_key(scope), member) for scope, member in reservation.events]
    if any(not isinstance(member, str) or not member for _, member in events):
        raise ValueError("reservation members must be non-empty strings")
    check_finite("reservation time", reservation.at)
    return events


@dataclass(frozen=True, slots=True)
class Guarded:
    """What :meth:`StateStore.guard` found: a revoked kind, the index of a claim already taken, or neither."""

    revoked: str | None = None
    replayed: int | None = None

    @property
    def ok(self) -> bool:
        return self.revoked is None and self.replayed is None


GUARD_OK: Final = Guarded()


def unavailable(op: Op, description: str = "state store unavailable") -> StateUnavailable:
    """The one error every store raises when it cannot answer (503 ``state_unavailable``)."""
    return StateUnavailable(description, reason=f"state_{op}_failed")


class StateStore(ABC):
    """Async state store shared by the broker's stages. See the module docstring for the common contract."""

    @abstractmethod
    async def claim(self, key: str, ttl_seconds: float) -> bool:
        """Record ``key`` for ``ttl_seconds`` if absent. True: this call claimed it, False: it existed.

        Used for DPoP ``jti`` replay (RFC 9449 §11.1, TTL ≥ acceptance window + skew, S06) and txn-token
        single use.
        """

    @abstractmethod
    async def claim_all(self, items: Sequence[tuple[str, float]]) -> bool:
        """Claim all ``(key, ttl_seconds)`` atomically or none: True if none existed and all are now set.

        Lets an invocation record its DPoP ``jti`` and consume its txn token in one round trip, so that a
        refused claim never burns the other key. Keys must be distinct (``ValueError`` otherwise) and, for
        Redis Cluster, share a hash tag.
        """

    @abstractmethod
    async def is_revoked(self, kinds: Mapping[str, str]) -> str | None:
        """The first kind (in ``kinds`` order) whose value is revoked, else None.

        ``kinds`` maps each kind to its raw value, as in
        ``{"txn": txn, "jti": jti, "sub": sub, "act": spiffe_id}``.
        """

    @abstractmethod
    async def guard(self, revocations: Mapping[str, str], claims: Sequence[tuple[str, float]]) -> Guarded:
        """The last check of a request, in ONE atomic step (one Redis round trip): none of ``revocations``
        (kind -> raw value) is revoked, then every claim is recorded — all or none (its DPoP ``jti`` and, for
        an invocation, its txn token). ``claims`` may be empty (a revocation check only).

        On Redis Cluster the step is not one script: revocations are read first (nothing is claimed when one
        matches), then each claim is taken in order with ``SET NX`` and the first one taken refuses — claims
        before it stay recorded (a refused txn token burns the request's own ``jti``). See
        :mod:`broker.state.redis`."""

    @abstractmethod
    async def revoke(self, kind: str, value: str, ttl_seconds: float) -> None:
        """Revoke ``value`` of ``kind`` for ``ttl_seconds`` on all replicas. Never shortens a revocation."""

    @abstractmethod
    async def record_event(self, scope: str, amount: float, now: float, window_seconds: float) -> None:
        """Add an event of ``amount`` at ``now`` (epoch seconds) to ``scope``; drop events out of the window.

        A scope has ONE window: put the window in the scope name (``"sub:<hash>:tool:approveExpense:600"``),
        since recording with a short window trims events a longer one still needs.
        """

    @abstractmethod
    async def window_stats(self, scope: str, now: float, window_seconds: float) -> tuple[int, float]:
        """(count, sum of amounts) of the events of ``scope`` stamped in ``(now - window_seconds, +inf)``.

        Events stamped after ``now`` (another replica's clock ahead, S06) are counted: for limits,
        over-counting is the safe side.
        """

    @abstractmethod
    async def reserve_events(self, items: Sequence[tuple[str, float, float]], now: float) -> Reservation:
        """Reserve-then-decide (CONTRACT §12, module docstring): for every ``(scope, amount, window_seconds)``
        of ``items``, in ONE atomic step for all of them, read the ``(count, sum)`` of the scope's events in
        ``(now - window_seconds, +inf)`` — without the new one — then add an event of ``amount`` at ``now``,
        drop the events out of the window and re-arm the key's expiry, as :meth:`record_event` does.

        Returns the counts seen (in item order) and the ids of the events added, for
        :meth:`release_events`. Scopes must be distinct (``ValueError``). Empty ``items``: an empty
        reservation, without calling the backend. Reserved events are ordinary events afterwards:
        :meth:`window_stats` counts them and :meth:`record_event` may add to the same scopes.

        On Redis Cluster the step is atomic per hash slot, not across slots (see :mod:`broker.state.redis`):
        each counter stays exact on its own.
        """

    @abstractmethod
    async def release_events(self, reservation: Reservation) -> None:
        """Remove exactly the events of ``reservation`` (the call was refused after reserving: it must not
        count). Idempotent: releasing twice, or after the events left the window, does nothing more. Other
        events of the same scopes are untouched."""

    @abstractmethod
    async def put_json(self, key: str, value: Mapping[str, Any], ttl_seconds: float) -> None:
        """Store a JSON object unconditionally. Its ``version`` becomes the previous version + 1 (1 if new),
        so a rewrite never lets a stale :meth:`compare_and_set_json` succeed (no ABA)."""

    @abstractmethod
    async def get_json(self, key: str) -> dict[str, Any] | None:
        """The stored object with its integer ``version`` member, or None if absent or expired."""

    @abstractmethod
    async def compare_and_set_json(
        self, key: str, expected_version: int, value: Mapping[str, Any], ttl_seconds: float
    ) -> bool:
        """Write ``value`` as version ``expected_version + 1`` if the stored version is ``expected_version``.

        ``expected_version == 0`` means "only if absent" (create). Returns False when another writer got there
        first: re-read and retry. Any ``version`` member in ``value`` is ignored.
        """

    @abstractmethod
    async def delete_json(self, key: str) -> bool:
        """Remove a JSON record now; True if it existed. For records that are only ever created with
        ``compare_and_set_json(key, 0, …)`` or read (e.g. MCP session bindings evicted by a per-principal quota,
        CONTRACT §12): a record created again afterwards starts over at version 1, so a caller holding a version
        read before the delete could compare-and-set the new record (ABA) — never delete records that are
        updated by compare-and-set from a version read earlier."""

    @abstractmethod
    async def ping(self) -> None:
        """Readiness (``/readyz``): return if the store answers, else raise :class:`StateUnavailable`."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections. The store must not be used afterwards."""
