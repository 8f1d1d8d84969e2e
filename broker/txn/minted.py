"""Txn tokens this process signed at an exchange, remembered until they come back for their invocation.

An agent exchanges (``POST /v1/token``) and then invokes, usually on the same keep-alive connection and so on the
same worker process. That process signed exactly those bytes moments before: verifying its own ES256 signature
again is ~90 µs of the ~130 a txn token's check costs. :class:`MintedHere` remembers, by SHA-256 of the whole
compact token, the verification key entry that was current when it was signed; :func:`broker.txn.tokens.
verify_txn_token` skips the signature verification — and only that — for a token it vouches for. Exact, not a
shortcut:

- only this process adds entries, at mint; only a token equal byte for byte to one it signed matches (a hash of
  header, payload and signature: a changed byte is another token, verified in full);
- it vouches only while the key map still holds *that same* entry under the token's ``kid`` (rebuilt on every
  rotation or retirement: then every token is verified in full again), so the verdict is the one a verification
  would give;
- every other check runs as for any token: size, strict parse, ``typ``, forbidden headers, ``kid``, ``alg``, the
  claims and their time window; single use is the state store's claim, as before.

Bounded (:data:`CAPACITY` entries, the oldest go first; a token lives at most 300 s). Per process: another worker
or replica verifies in full, as every process did before.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Final

from broker.identity.jwks import KeyEntry

#: entries kept (~130 bytes each, ~2 MiB in all): an agent invokes seconds after its exchange, so 16 s of
#: exchanges at 1,000 a second; a token that comes back after more exchanges than this is verified in full
CAPACITY: Final = 16_384


class MintedHere:
    """The txn tokens this process signed at exchanges (module docstring): :meth:`remember` at mint,
    :meth:`vouches` at verification. Not thread-safe: one per event loop (``Services.minted``)."""

    __slots__ = ("_capacity", "_entries")

    def __init__(self, capacity: int = CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        # an OrderedDict, not a dict: evicting a plain dict's oldest key walks the deleted slots before it
        self._entries: OrderedDict[bytes, KeyEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, token: str, entry: KeyEntry) -> None:
        """``token`` was just signed with the key ``entry`` verifies."""
        entries = self._entries
        digest = _digest(token)
        entries.pop(digest, None)
        while len(entries) >= self._capacity:
            entries.popitem(last=False)
        entries[digest] = entry

    def vouches(self, token: str, entry: KeyEntry) -> bool:
        """Whether this process signed exactly ``token`` with the key that ``entry`` (the key map's entry for
        the token's ``kid``, now) verifies."""
        try:
            digest = _digest(token)
        except UnicodeEncodeError:
            return False  # not a token this process made
        return self._entries.get(digest) is entry


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()
