"""The audit hash chain and its signed checkpoints (CONTRACT §9), as pure functions.

A record is a flat JSON object. Sealing gives it ``seq`` (1, 2, 3, … in file order), ``prev`` (the previous
record's ``hash``; 64 zeros for the first) and ``hash`` = hex SHA-256(ASCII(prev) ‖ JCS(record without
``hash``)). JCS (RFC 8785) makes the hash independent of key order and of how the line was escaped on disk.

A bare chain proves order and integrity but not completeness: whoever can write the file can cut its tail or
rebuild it from genesis (HOSTILE.md §0.5, A04/A05). So every ``checkpoint_every`` records, and at shutdown, a
``checkpoint`` record carries ``sig``: a compact JWS by the broker signing key (``typ: audit-checkpoint+jwt``)
over ``{"seq", "head", "ts"}`` — its own ``seq`` and ``ts``, and ``head`` = its ``prev``. The ``sig`` is part
of the hashed record, so the next record's ``prev`` covers it too. The latest checkpoint is also kept outside
the log (``<log>.head``) by :mod:`broker.audit.sink`, which is what makes tail truncation detectable.

Records that follow the last checkpoint a restarting broker can verify were not provably written by a broker
(appended while it was down, or a crash's unsealed tail, possibly rewritten): the broker names them in an
``audit_resume`` record (:func:`resume_record`, CONTRACT §15) before it writes anything else, so the checkpoints
that later cover them do not vouch for them, and ``broker audit verify`` reports them as unverified.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from typing import Any

from broker.canonical import canonicalize, strict_loads
from broker.errors import InvalidRequest
from broker.jose import (
    JoseError,
    PublicKey,
    SigningKey,
    b64url_decode,
    jwk_thumbprint,
    public_key_from_jwk,
    verify_signature,
)

__all__ = [
    "CHECKPOINT_TYP",
    "DECISIONS",
    "EVENTS",
    "GENESIS",
    "LOG_EVENTS",
    "RECORD_FIELDS",
    "RESERVED_FIELDS",
    "RESUME_EVENT",
    "Keys",
    "checkpoint_claims",
    "checkpoint_problem",
    "checkpoint_record",
    "format_ts",
    "jws_payload",
    "load_keys",
    "record_hash",
    "resume_record",
    "seal",
]

GENESIS = "0" * 64
CHECKPOINT_TYP = "audit-checkpoint+jwt"

#: CONTRACT §9 closed sets.
EVENTS = frozenset(
    {
        "discovery",
        "exchange",
        "invocation",
        "approval",
        "mcp",
        "config_load",
        "revocation",
        "checkpoint",
        "outcome",
        "summary",
        "audit_resume",
    }
)
RESUME_EVENT = "audit_resume"
#: Written by the log itself, never by a caller.
LOG_EVENTS = frozenset({"checkpoint", RESUME_EVENT})
DECISIONS = frozenset({"allow", "deny", "step_up", "pending", "error"})
#: The fields every record carries (null when not applicable), in the order they are written to the file.
RECORD_FIELDS = (
    "event",
    "decision",
    "reason",
    "request_id",
    "subject",
    "actor",
    "tool",
    "args_digest",
    "txn",
    "policy_version",
    "status",
)
#: Filled in by the chain, never by the caller.
RESERVED_FIELDS = frozenset({"seq", "ts", "prev", "hash", "sig"})


#: the last whole second :func:`format_ts` formatted, and its text: records come many per second (hot path)
_last_second: tuple[int, str] = (-1, "")


def format_ts(epoch: float) -> str:
    """RFC 3339 UTC timestamp with milliseconds (truncated), e.g. ``2026-05-01T12:00:00.123Z``."""
    global _last_second
    seconds, millis = divmod(math.floor(epoch * 1000), 1000)
    second, text = _last_second
    if second != seconds:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _last_second = (seconds, text)
    return f"{text}.{millis:03d}Z"


def record_hash(prev: str, record_without_hash: Mapping[str, Any]) -> str:
    """Hex SHA-256 of ``prev`` (ASCII) then the JCS bytes of the record; a ``hash`` member is ignored."""
    body = record_without_hash
    if "hash" in body or type(body) is not dict:
        body = {name: value for name, value in body.items() if name != "hash"}
    return hashlib.sha256(prev.encode("ascii") + canonicalize(body)).hexdigest()


def seal(record: Mapping[str, Any], *, seq: int, prev: str) -> dict[str, Any]:
    """A new dict: ``seq`` first, the record's other members in their order, then ``prev`` and ``hash``.

    The order is only for people reading the file; the hash is over JCS and does not depend on it.
    """
    sealed: dict[str, Any] = {"seq": seq}
    for name, value in record.items():
        if name not in ("seq", "prev", "hash"):
            sealed[name] = value
    sealed["prev"] = prev
    sealed["hash"] = record_hash(prev, sealed)
    return sealed


def checkpoint_claims(
    *,
    seq: int,
    head: str,
    ts: str,
    chain: str | None = None,
    host: str | None = None,
    pid: int | None = None,
    final: bool = False,
    members: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JWS payload of a checkpoint: its own seq and ts, and ``head`` = its ``prev``.

    A chain in PostgreSQL (:mod:`broker.audit.pgsink`) also signs its ``chain`` id in every checkpoint, and its
    first checkpoint (seq 1, the signed start) the ``host`` and ``pid`` of the process; the checkpoint that closes
    such a chain signs ``final: true`` (nothing may follow it); both sign further ``members`` (``checkpoint_every``,
    ``seen``, ``diverged``: :mod:`broker.audit.pgverify`). The file's checkpoints are ``{seq, head, ts}`` only."""
    claims: dict[str, Any] = {"seq": seq, "head": head, "ts": ts}
    if chain is not None:
        claims["chain"] = chain
    if host is not None:
        claims["host"] = host
    if pid is not None:
        claims["pid"] = pid
    if final:
        claims["final"] = True
    if members:
        claims.update(members)
    return claims


def checkpoint_record(
    *,
    seq: int,
    prev: str,
    ts: str,
    signer: SigningKey,
    chain: str | None = None,
    host: str | None = None,
    pid: int | None = None,
    final: bool = False,
    members: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A sealed checkpoint: event ``checkpoint``, decision ``allow``, other CONTRACT fields null, ``sig``
    (over :func:`checkpoint_claims`; ``chain``, ``host``, ``pid``, ``final``, ``members`` only in the signed
    payload)."""
    record: dict[str, Any] = {"ts": ts}
    record.update(dict.fromkeys(RECORD_FIELDS))
    record.update(event="checkpoint", decision="allow", reason="")
    claims = checkpoint_claims(
        seq=seq, head=prev, ts=ts, chain=chain, host=host, pid=pid, final=final, members=members
    )
    record["sig"] = signer.sign(claims, typ=CHECKPOINT_TYP)
    return seal(record, seq=seq, prev=prev)


def resume_record(
    *,
    seq: int,
    prev: str,
    ts: str,
    unverified_from: int,
    anchor_seq: int,
    unverified_offset: int,
    file_bytes: int,
    file_sha256: str,
) -> dict[str, Any]:
    """A sealed ``audit_resume`` record (CONTRACT §15): records ``unverified_from`` .. ``seq - 1`` follow the last
    checkpoint the broker could verify (``anchor_seq``, 0 for none) and were not written by this process.

    ``file_bytes`` is the size of the log as the broker found it (the offset of this record) and ``file_sha256`` the
    hex SHA-256 of those bytes; ``unverified_offset`` is where the first unverified record starts in them.
    """
    record: dict[str, Any] = {"ts": ts}
    record.update(dict.fromkeys(RECORD_FIELDS))
    record.update(event=RESUME_EVENT, decision="error", reason="unverified_records")
    record.update(
        unverified_from=unverified_from,
        unverified_to=seq - 1,
        anchor_seq=anchor_seq,
        unverified_offset=unverified_offset,
        file_bytes=file_bytes,
        file_sha256=file_sha256,
    )
    return seal(record, seq=seq, prev=prev)


# -- checking checkpoint signatures (the verifier, and the broker when it resumes a log) ----------------------

Keys = dict[str, tuple[PublicKey, str | None]]  # kid -> (key, the JWK's "alg" if it names one)


def load_keys(public_jwks: Mapping[str, Any]) -> Keys:
    """A JWKS (``{"keys": [...]}``) or a single JWK; private members are ignored. Raises JoseError."""
    jwks = public_jwks.get("keys") if "keys" in public_jwks else [public_jwks]
    if not isinstance(jwks, list):
        raise JoseError("JWKS 'keys' must be a list")
    keys: Keys = {}
    for jwk in jwks:
        if not isinstance(jwk, Mapping):
            raise JoseError("JWKS entries must be objects")
        kid = jwk.get("kid") or jwk_thumbprint(jwk)
        alg = jwk.get("alg")
        keys[str(kid)] = (public_key_from_jwk(jwk), alg if isinstance(alg, str) else None)
    return keys


def _decode_segment(segment: str) -> Any:
    try:
        return strict_loads(b64url_decode(segment))
    except (JoseError, InvalidRequest):
        return None


def jws_payload(sig: Any) -> Any:
    """The decoded payload of a compact JWS, or None (no signature check)."""
    if not isinstance(sig, str) or sig.count(".") != 2:
        return None
    return _decode_segment(sig.split(".")[1])


def checkpoint_problem(sig: Any, *, claims: Mapping[str, Any], keys: Keys | None) -> str | None:
    """Why the checkpoint JWS ``sig`` is not a valid signature over ``claims``, or None.

    With ``keys`` None only the form, ``typ`` and payload are checked, not the signature."""
    if not isinstance(sig, str) or sig.count(".") != 2:
        return "bad signature: checkpoint has no compact JWS"
    header_b64, payload_b64, signature_b64 = sig.split(".")
    header, payload = _decode_segment(header_b64), _decode_segment(payload_b64)
    if not isinstance(header, dict) or not isinstance(payload, dict):
        return "bad signature: checkpoint JWS is malformed"
    if header.get("typ") != CHECKPOINT_TYP:
        return f"bad signature: checkpoint JWS typ is {header.get('typ')!r}, not {CHECKPOINT_TYP!r}"
    if payload.get("chain") != claims.get("chain"):
        return f"bad signature: checkpoint signed for chain {payload.get('chain')!r}, not {claims.get('chain')!r}"
    if payload != claims:
        if "chain" in claims:
            return "bad signature: checkpoint JWS payload does not match the record's seq, prev, ts and chain"
        return "bad signature: checkpoint JWS payload does not match the record's seq, prev and ts"
    if keys is None:
        return None
    kid = header.get("kid")
    entry = keys.get(kid) if isinstance(kid, str) else None
    if entry is None:
        return "bad signature: checkpoint signed by a key not in the given JWKS"
    key, key_alg = entry
    alg = header.get("alg")
    if not isinstance(alg, str) or (key_alg is not None and alg != key_alg):
        return "bad signature: checkpoint JWS alg does not fit the key"
    try:
        signature = b64url_decode(signature_b64)
    except JoseError:
        return "bad signature: checkpoint JWS is malformed"
    if not verify_signature(key, alg, f"{header_b64}.{payload_b64}".encode("ascii"), signature):
        return "bad signature: checkpoint signature does not verify"
    return None


def parse_anchor(raw: bytes) -> dict[str, Any] | None:
    """The head anchor ``{"seq", "head", "sig"}`` in ``raw`` (the bytes of ``<log>.head``), None if malformed."""
    try:
        anchor = strict_loads(raw)
    except InvalidRequest:
        return None
    if (
        not isinstance(anchor, dict)
        or type(anchor.get("seq")) is not int
        or not isinstance(anchor.get("head"), str)
        or not isinstance(anchor.get("sig"), str)
    ):
        return None
    return anchor
