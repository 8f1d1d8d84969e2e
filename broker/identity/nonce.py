"""Stateless DPoP server nonces that every replica accepts (RFC 9449 §8, §9; HOSTILE D20).

A nonce is ``base64url(version || issued_at || tag)`` where ``issued_at`` is the issue time in whole
seconds (8 bytes, big-endian) and ``tag`` is the first 16 bytes of
``HMAC-SHA256(secret, "broker-dpop-nonce" || 0x00 || version || issued_at || jkt)``.
Any replica configured with the same secret can check it without shared state; the nonce "rotates" on its
own because the timestamp changes, and it expires ``lifetime`` seconds after issue (Abblix/Oidc.Server#103
uses the same rolling-HMAC idea).

Key binding (decision): by default a nonce is bound to the RFC 7638 thumbprint of the DPoP key it was
issued to, so a nonce handed to one client key is useless with another key (HOSTILE D20 "minted for another
key"). Binding costs nothing here: the broker only issues nonces after it has verified a proof and so knows
its ``jkt`` (the ``use_dpop_nonce`` challenge and the ``DPoP-Nonce`` header on later responses). Pass
``bind_to_key=False`` for unbound nonces; a service never accepts the other kind, so there is no downgrade
from bound to unbound.

The 16-byte (128-bit) truncated tag is ample for a value that lives minutes; 32-byte secrets are required.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from broker.jose import JoseError, b64url_decode, b64url_encode

_VERSION = b"\x01"
_DOMAIN = b"broker-dpop-nonce\x00"
_TAG_BYTES = 16
_RAW_BYTES = 1 + 8 + _TAG_BYTES
_ENCODED_CHARS = (_RAW_BYTES * 8 + 5) // 6
#: accept nonces issued up to this many seconds "in the future" (clock differences between replicas)
FUTURE_SKEW = 5


class NonceService:
    """Issues and checks server nonces; pure apart from the secret (callers pass ``now``)."""

    def __init__(self, secret: bytes, lifetime: int = 300, *, bind_to_key: bool = True) -> None:
        if not isinstance(secret, bytes) or len(secret) < 32:
            raise ValueError("nonce secret must be at least 32 random bytes")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int) or lifetime <= 0:
            raise ValueError("nonce lifetime must be a positive number of seconds")
        self._secret = secret
        self.lifetime = lifetime
        self.bind_to_key = bind_to_key

    def _tag(self, issued_at: bytes, jkt: str | None) -> bytes:
        bound = jkt.encode("utf-8") if self.bind_to_key and jkt is not None else b""
        mac = hmac.new(self._secret, _DOMAIN + _VERSION + issued_at + bound, hashlib.sha256)
        return mac.digest()[:_TAG_BYTES]

    def issue(self, now: float, jkt: str | None = None) -> str:
        """A fresh nonce for ``DPoP-Nonce``; ``jkt`` (the client key's thumbprint) is required when bound."""
        if self.bind_to_key and not isinstance(jkt, str):
            raise ValueError("a key-bound nonce needs the client's jkt")
        issued_at = struct.pack(">Q", int(now))
        return b64url_encode(_VERSION + issued_at + self._tag(issued_at, jkt))

    def check(self, nonce: object, jkt: object, now: float) -> bool:
        """True iff ``nonce`` was issued by a service with this secret (for ``jkt`` when bound), at a time
        in ``[now - lifetime, now + FUTURE_SKEW]``. Any malformed input gives False, never an exception."""
        if not isinstance(nonce, str) or len(nonce) != _ENCODED_CHARS:
            return False
        if self.bind_to_key and not isinstance(jkt, str):
            return False
        try:
            raw = b64url_decode(nonce)
        except JoseError:
            return False
        # The re-encoding check refuses alternative spellings (non-zero trailing bits of the last char).
        if len(raw) != _RAW_BYTES or raw[:1] != _VERSION or b64url_encode(raw) != nonce:
            return False
        try:
            expected = self._tag(raw[1:9], jkt if isinstance(jkt, str) else None)
        except UnicodeEncodeError:  # a jkt with lone surrogates cannot be one we issued for
            return False
        # Constant-time tag comparison first; the timestamp is public, checking it after leaks nothing.
        if not hmac.compare_digest(raw[9:], expected):
            return False
        issued = int.from_bytes(raw[1:9], "big")
        return now - self.lifetime <= issued <= now + FUTURE_SKEW
