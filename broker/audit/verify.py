"""``broker audit verify``: check an audit log's hash chain, checkpoint signatures and head anchor.

What each attack of HOSTILE.md §1.7 looks like to the verifier:

- A01 an edited record: its ``hash`` no longer matches its content (or the line is not JSON any more);
- A02/A03 a deleted or reordered record: a ``seq`` gap or a ``prev`` that is not the previous ``hash``;
- A04 the last k records deleted: the head anchor (``<log>.head``) names a checkpoint the log no longer
  reaches; a crash's partial last line is reported the same way (truncated);
- A05 a chain rebuilt from genesis without the key: its checkpoints' signatures fail (or their payloads no
  longer match ``seq``/``prev``/``ts``), and the anchor no longer matches.

Records after the last checkpoint are chained but not yet signed: they are counted as ``unsealed``. Nothing
can prove that such a tail was not cut short; the report says how many records it holds.

The verifier stops at the first problem and names it by ``seq`` (``first_bad_seq``) or, when the line cannot
be read, by line number (``first_bad_line``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.audit.chain import CHECKPOINT_TYP, GENESIS, record_hash
from broker.audit.sink import head_path_for
from broker.canonical import strict_loads
from broker.errors import InvalidRequest
from broker.jose import (
    JoseError,
    PublicKey,
    b64url_decode,
    jwk_thumbprint,
    public_key_from_jwk,
    verify_signature,
)

__all__ = ["VerifyReport", "verify_log"]

_Keys = dict[str, tuple[PublicKey, str | None]]  # kid -> (key, the JWK's "alg" if it names one)


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_log`; ``summary()`` is the line ``broker audit verify`` prints."""

    ok: bool
    #: records read and found intact (checkpoints included)
    records: int
    checkpoints: int
    #: the first record that fails, by its ``seq`` (the first missing one for a cut tail); None if unreadable
    first_bad_seq: int | None
    problem: str | None
    #: intact records after the last checkpoint: chained, but not covered by a signature yet
    unsealed: int
    signatures_checked: bool
    #: 1-based line of the first bad record (None when the problem is not on a line, e.g. a cut tail)
    first_bad_line: int | None = None
    #: ``seq`` of the last intact record (0 for an empty log)
    last_seq: int = 0
    #: ``seq`` named by ``<log>.head``; None when there is no anchor (a cut tail then goes unnoticed)
    anchor_seq: int | None = None

    def summary(self) -> str:
        checked = "signatures checked" if self.signatures_checked else "signatures NOT checked (no --key)"
        if self.ok:
            text = f"OK: {self.records} records, {self.checkpoints} checkpoints, {checked}"
            if self.unsealed:
                text += f"; {self.unsealed} records after the last checkpoint are not signed yet"
            if self.anchor_seq is None:
                text += "; no head anchor found, so a cut tail cannot be detected"
            return text
        where = []
        if self.first_bad_seq is not None:
            where.append(f"seq {self.first_bad_seq}")
        if self.first_bad_line is not None:
            where.append(f"line {self.first_bad_line}")
        at = f" at {', '.join(where)}" if where else ""
        return f"FAILED{at}: {self.problem} ({self.records} records intact before it, {checked})"


class _Bad(Exception):
    def __init__(self, problem: str, *, seq: int | None, line: int | None) -> None:
        super().__init__(problem)
        self.problem, self.seq, self.line = problem, seq, line


def _load_keys(public_jwks: Mapping[str, Any]) -> _Keys:
    """A JWKS (``{"keys": [...]}``) or a single JWK; private members are ignored. Raises JoseError."""
    jwks = public_jwks.get("keys") if "keys" in public_jwks else [public_jwks]
    if not isinstance(jwks, list):
        raise JoseError("JWKS 'keys' must be a list")
    keys: _Keys = {}
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


def _check_sig(sig: Any, *, claims: dict[str, Any], keys: _Keys | None) -> str | None:
    """Why the checkpoint JWS ``sig`` is not a valid signature over ``claims``, or None."""
    if not isinstance(sig, str) or sig.count(".") != 2:
        return "bad signature: checkpoint has no compact JWS"
    header_b64, payload_b64, signature_b64 = sig.split(".")
    header, payload = _decode_segment(header_b64), _decode_segment(payload_b64)
    if not isinstance(header, dict) or not isinstance(payload, dict):
        return "bad signature: checkpoint JWS is malformed"
    if header.get("typ") != CHECKPOINT_TYP:
        return f"bad signature: checkpoint JWS typ is {header.get('typ')!r}, not {CHECKPOINT_TYP!r}"
    if payload != claims:
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


def _read_anchor(path: Path, keys: _Keys | None) -> dict[str, Any] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _Bad(f"head anchor {path} unreadable: {exc.strerror}", seq=None, line=None) from exc
    try:
        anchor = strict_loads(raw)
    except InvalidRequest:
        anchor = None
    if (
        not isinstance(anchor, dict)
        or type(anchor.get("seq")) is not int
        or not isinstance(anchor.get("head"), str)
        or not isinstance(anchor.get("sig"), str)
    ):
        raise _Bad(f"malformed head anchor {path}", seq=None, line=None)
    if keys is not None:
        # The anchor's sig is the anchored checkpoint's: check it on its own, the checkpoint may be gone.
        payload = _decode_segment(anchor["sig"].split(".")[1]) if anchor["sig"].count(".") == 2 else None
        ts = payload.get("ts") if isinstance(payload, dict) else None
        claims = {"seq": anchor["seq"], "head": anchor["head"], "ts": ts}
        why = _check_sig(anchor["sig"], claims=claims, keys=keys)
        if why is not None:
            raise _Bad(f"head anchor {path}: {why}", seq=None, line=None)
    return anchor


def verify_log(
    path: Path, *, public_jwks: Mapping[str, Any] | None, max_unsealed: int | None = None
) -> VerifyReport:
    """Verify the audit log at ``path`` (and ``<path>.head`` if present); never raises for a bad log.

    ``public_jwks`` (a JWKS or one JWK) enables signature checks; None checks everything else.
    ``max_unsealed`` (e.g. ``checkpoint_every - 1``) fails a log with a longer unsigned tail: a chain
    rebuilt with its checkpoints turned into ordinary records would otherwise verify, unsealed, once its
    anchor is gone too. Raises JoseError for an unusable key set and OSError if the log cannot be opened.
    """
    path = Path(path)
    keys = _load_keys(public_jwks) if public_jwks is not None else None
    records = checkpoints = unsealed = last_seq = 0
    anchor: dict[str, Any] | None = None
    try:
        anchor = _read_anchor(head_path_for(path), keys)
        expected_prev = GENESIS
        with path.open("rb") as fh:
            for line_no, line in enumerate(fh, start=1):
                record = _intact_record(line, line_no)
                seq = record["seq"]
                if seq != last_seq + 1:
                    raise _Bad(
                        f"missing or reordered: seq {seq} follows seq {last_seq}", seq=seq, line=line_no
                    )
                if record["prev"] != expected_prev:
                    raise _Bad(f"chain broken: prev is not the hash of seq {last_seq}", seq=seq, line=line_no)
                if record.get("event") == "checkpoint":
                    claims = {"seq": seq, "head": record["prev"], "ts": record.get("ts")}
                    why = _check_sig(record.get("sig"), claims=claims, keys=keys)
                    if why is not None:
                        raise _Bad(why, seq=seq, line=line_no)
                if (
                    anchor is not None
                    and seq == anchor["seq"]
                    and (
                        record.get("event") != "checkpoint"
                        or record["prev"] != anchor["head"]
                        or record.get("sig") != anchor["sig"]
                    )
                ):
                    raise _Bad("head anchor does not match this record", seq=seq, line=line_no)
                expected_prev, last_seq = record["hash"], seq
                records += 1
                if record.get("event") == "checkpoint":
                    checkpoints += 1
                    unsealed = 0
                else:
                    unsealed += 1
        if anchor is not None and anchor["seq"] > last_seq:
            raise _Bad(
                f"truncated: head anchor names seq {anchor['seq']} but log ends at {last_seq}",
                seq=last_seq + 1,
                line=None,
            )
        if max_unsealed is not None and unsealed > max_unsealed:
            raise _Bad(
                f"unsealed: {unsealed} records after the last checkpoint (more than {max_unsealed})",
                seq=last_seq - unsealed + 1,
                line=None,
            )
    except _Bad as bad:
        return VerifyReport(
            ok=False,
            records=records,
            checkpoints=checkpoints,
            first_bad_seq=bad.seq,
            problem=bad.problem,
            unsealed=unsealed,
            signatures_checked=keys is not None,
            first_bad_line=bad.line,
            last_seq=last_seq,
            anchor_seq=anchor["seq"] if anchor is not None else None,
        )
    return VerifyReport(
        ok=True,
        records=records,
        checkpoints=checkpoints,
        first_bad_seq=None,
        problem=None,
        unsealed=unsealed,
        signatures_checked=keys is not None,
        last_seq=last_seq,
        anchor_seq=anchor["seq"] if anchor is not None else None,
    )


def _intact_record(line: bytes, line_no: int) -> dict[str, Any]:
    """The record on this line if it is complete, well-formed and its hash matches its content."""
    if not line.endswith(b"\n"):
        raise _Bad(f"truncated: partial last line {line_no}", seq=None, line=line_no)
    try:
        record = strict_loads(line)
    except InvalidRequest as exc:
        raise _Bad(f"altered: line is not valid JSON ({exc.reason})", seq=None, line=line_no) from None
    seq = record.get("seq") if isinstance(record, dict) else None
    if type(seq) is not int:
        raise _Bad("altered: line has no integer seq", seq=None, line=line_no)
    assert isinstance(record, dict)
    prev, digest = record.get("prev"), record.get("hash")
    if not isinstance(prev, str) or not isinstance(digest, str) or not prev.isascii():
        raise _Bad("altered: record has no prev/hash", seq=seq, line=line_no)
    if record_hash(prev, record) != digest:
        raise _Bad("altered: record content does not match its hash", seq=seq, line=line_no)
    return record
