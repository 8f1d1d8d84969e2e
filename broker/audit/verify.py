"""``broker audit verify``: check an audit log's hash chain, checkpoint signatures and head anchor.

What each attack of HOSTILE.md §1.7 looks like to the verifier:

- A01 an edited record: its ``hash`` no longer matches its content (or the line is not JSON any more);
- A02/A03 a deleted or reordered record: a ``seq`` gap or a ``prev`` that is not the previous ``hash``;
- A04 the last k records deleted: the head anchor (``<log>.head``) names a checkpoint the log no longer
  reaches; a crash's partial last line is reported the same way (truncated);
- A05 a chain rebuilt from genesis without the key: its checkpoints' signatures fail (or their payloads no
  longer match ``seq``/``prev``/``ts``), and the anchor no longer matches.

Records after the last checkpoint are chained but not yet signed: they are counted as ``unsealed``. Nothing
can prove that such a tail was not cut short; the report says how many records it holds, and ``max_unsealed``
fails a longer one. A checkpoint whose signed claims say ``final: true`` closes its chain (a PostgreSQL chain's
broker writes one when it stops cleanly): any record after it fails the chain, so records appended to a stopped
broker's chain are named instead of passing as an unsealed tail. The file store does not sign ``final`` (a file
continues after a restart), so its logs, old and new, verify as before.

Records named by an ``audit_resume`` record (CONTRACT §15: they followed the last checkpoint the broker could
verify when it started, so nothing proves a broker wrote them) are **unverified**: the log fails (exit 1) naming
the first of them, even though later checkpoints chain over them — unless ``accept_unverified`` lists that first
``seq`` (an operator who has reviewed them). A checkpoint whose signature fails inside such a range is part of it.

The verifier stops at the first problem and names it by ``seq`` (``first_bad_seq``) or, when the line cannot
be read, by line number (``first_bad_line``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from broker.audit.chain import (
    GENESIS,
    RESUME_EVENT,
    Keys,
    checkpoint_claims,
    checkpoint_problem,
    jws_payload,
    load_keys,
    parse_anchor,
    record_hash,
)
from broker.audit.sink import head_path_for
from broker.canonical import strict_loads
from broker.errors import InvalidRequest

__all__ = [
    "VerifyReport",
    "anchor_problem",
    "checkpoint_record_problem",
    "signed_members",
    "verify_lines",
    "verify_log",
]


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
    #: (first, last) ``seq`` of each range an ``audit_resume`` record names as unverified (accepted ones excluded)
    unverified: tuple[tuple[int, int], ...] = ()
    #: records in unverified ranges that ``accept_unverified`` accepted
    accepted_unverified: int = 0
    #: ``seq`` of the checkpoint signed ``final: true`` (its broker stopped cleanly; nothing may follow it), if any
    final_seq: int | None = None

    def summary(self) -> str:
        checked = "signatures checked" if self.signatures_checked else "signatures NOT checked (no --key)"
        if self.ok:
            text = f"OK: {self.records} records, {self.checkpoints} checkpoints, {checked}"
            if self.accepted_unverified:
                text += f"; {self.accepted_unverified} unverified records accepted"
            if self.final_seq is not None:
                text += "; closed by its final checkpoint"
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
        if self.problem is not None and self.problem.startswith("unverified"):
            return f"FAILED{at}: {self.problem} (otherwise {self.records} records intact, {checked})"
        return f"FAILED{at}: {self.problem} ({self.records} records intact before it, {checked})"


@dataclass(frozen=True)
class _Counts:
    records: int = 0
    checkpoints: int = 0
    unsealed: int = 0
    last_seq: int = 0


class _Bad(Exception):
    def __init__(
        self, problem: str, *, seq: int | None, line: int | None, counts: _Counts | None = None
    ) -> None:
        super().__init__(problem)
        self.problem, self.seq, self.line, self.counts = problem, seq, line, counts


def _read_anchor(path: Path, keys: Keys | None) -> dict[str, Any] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _Bad(f"head anchor {path} unreadable: {exc.strerror}", seq=None, line=None) from exc
    anchor = parse_anchor(raw)
    if anchor is None:
        raise _Bad(f"malformed head anchor {path}", seq=None, line=None)
    why = anchor_problem(anchor, keys)
    if why is not None:
        raise _Bad(f"head anchor {path}: {why}", seq=None, line=None)
    return anchor


def anchor_problem(
    anchor: Mapping[str, Any], keys: Keys | None, identity: Mapping[str, Any] | None = None
) -> str | None:
    """Why the head anchor ``{"seq", "head", "sig"}`` does not carry a valid checkpoint signature, or None.

    The anchor's sig is the anchored checkpoint's: it is checked on its own, the checkpoint may be gone.
    ``identity`` (a PostgreSQL chain's ``{"chain", "host", "pid"}``) must be signed too (:func:`_claims`)."""
    if keys is None:
        return None
    payload = jws_payload(anchor["sig"])
    ts = payload.get("ts") if isinstance(payload, dict) else None
    claims = _claims(anchor["seq"], anchor["head"], ts, identity, payload)
    return checkpoint_problem(anchor["sig"], claims=claims, keys=keys)


def _claims(seq: int, head: Any, ts: Any, identity: Mapping[str, Any] | None, payload: Any) -> dict[str, Any]:
    """What a checkpoint at ``seq`` signs: ``{seq, head, ts}`` in a file; in a PostgreSQL chain (``identity``)
    also its ``chain`` id, and in its first checkpoint (the signed start) the process's ``host`` and ``pid``.

    What only the signed ``payload`` can say is taken from it when well-formed (anything else there makes it
    differ from these claims, and the checkpoint fail): ``final: true``, and in a PostgreSQL chain the
    :func:`signed_members` of its start (``checkpoint_every``, ``seen``, ``diverged``) and of its final checkpoint
    (``seen``)."""
    if not isinstance(payload, dict):
        payload = {}
    final = payload.get("final") is True
    if identity is None:
        return checkpoint_claims(seq=seq, head=head, ts=ts, final=final)
    if seq == 1:
        return checkpoint_claims(
            seq=seq,
            head=head,
            ts=ts,
            chain=identity["chain"],
            host=identity["host"],
            pid=identity["pid"],
            final=final,
            members=signed_members(payload),
        )
    seen = signed_members(payload).get("seen") if final else None
    members = {"seen": seen} if seen is not None else None
    return checkpoint_claims(seq=seq, head=head, ts=ts, chain=identity["chain"], final=final, members=members)


def checkpoint_record_problem(
    record: Mapping[str, Any], *, keys: Keys | None, identity: Mapping[str, Any] | None
) -> str | None:
    """Why the checkpoint ``record`` (found on its own, e.g. a chain's last row) does not carry a valid signature
    over its claims (:func:`_claims`), or None: what it signs can then be trusted wherever it was found."""
    sig, seq = record.get("sig"), record.get("seq")
    if record.get("event") != "checkpoint" or type(seq) is not int:
        return "not a checkpoint"
    claims = _claims(seq, record.get("prev"), record.get("ts"), identity, jws_payload(sig))
    return checkpoint_problem(sig, claims=claims, keys=keys)


def signed_members(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The well-formed members a PostgreSQL chain's checkpoint may sign beyond ``seq``, ``head``, ``ts``,
    ``chain``, ``host``, ``pid``, ``final`` (:mod:`broker.audit.pgverify` says what each proves):
    ``checkpoint_every`` (int >= 1), ``seen`` (a list of ``{"chain": str, "anchor_seq": int >= 0}``) and
    ``diverged`` (``{"chain": str, "seq": int >= 1, "head": str, "reason": str}``). A malformed one is left out,
    so the payload no longer matches the claims built from this."""
    members: dict[str, Any] = {}
    every = payload.get("checkpoint_every")
    if type(every) is int and every >= 1:
        members["checkpoint_every"] = every
    seen = payload.get("seen")
    if isinstance(seen, list) and all(
        isinstance(entry, dict)
        and set(entry) == {"chain", "anchor_seq"}
        and isinstance(entry["chain"], str)
        and type(entry["anchor_seq"]) is int
        and entry["anchor_seq"] >= 0
        for entry in seen
    ):
        members["seen"] = seen
    diverged = payload.get("diverged")
    if (
        isinstance(diverged, dict)
        and set(diverged) == {"chain", "seq", "head", "reason"}
        and isinstance(diverged["chain"], str)
        and type(diverged["seq"]) is int
        and diverged["seq"] >= 1
        and isinstance(diverged["head"], str)
        and isinstance(diverged["reason"], str)
    ):
        members["diverged"] = diverged
    return members


def _resume_range(record: dict[str, Any], seq: int, line_no: int) -> tuple[int, int]:
    first, last = record.get("unverified_from"), record.get("unverified_to")
    if type(first) is not int or type(last) is not int or not 1 <= first <= last == seq - 1:
        raise _Bad("altered: malformed audit_resume record", seq=seq, line=line_no)
    return first, last


def verify_log(
    path: Path,
    *,
    public_jwks: Mapping[str, Any] | None,
    max_unsealed: int | None = None,
    accept_unverified: Collection[int] = (),
) -> VerifyReport:
    """Verify the audit log at ``path`` (and ``<path>.head`` if present); never raises for a bad log.

    ``public_jwks`` (a JWKS or one JWK) enables signature checks; None checks everything else.
    ``max_unsealed`` (e.g. ``checkpoint_every - 1``) fails a log with a longer unsigned tail: a chain
    rebuilt with its checkpoints turned into ordinary records would otherwise verify, unsealed, once its
    anchor is gone too. ``accept_unverified``: first ``seq`` of unverified ranges (``audit_resume``) that an
    operator has reviewed; they no longer fail the log. Raises JoseError for an unusable key set and OSError if
    the log cannot be opened.
    """
    path = Path(path)
    keys = load_keys(public_jwks) if public_jwks is not None else None
    try:
        anchor = _read_anchor(head_path_for(path), keys)
    except _Bad as bad:
        return _failed(bad, _Counts(), keys=keys, anchor=None, unverified=[], accepted_records=0)
    with path.open("rb") as fh:
        return verify_lines(
            fh, anchor=anchor, keys=keys, max_unsealed=max_unsealed, accept_unverified=accept_unverified
        )


def verify_lines(
    lines: Iterable[bytes],
    *,
    anchor: Mapping[str, Any] | None,
    keys: Keys | None,
    max_unsealed: int | None = None,
    accept_unverified: Collection[int] = (),
    identity: Mapping[str, Any] | None = None,
    unsealed_note: str = "",
) -> VerifyReport:
    """:func:`verify_log`'s checks over a chain's lines in order (each with its newline) and its head anchor
    (already read and its signature checked: :func:`anchor_problem`); line numbers count from 1. Also the
    checks of a chain stored in PostgreSQL (:mod:`broker.audit.pg`): with ``identity`` (``{"chain", "host",
    "pid"}`` of its ``audit_chains`` row) every checkpoint must sign that chain id, and the first record must be
    a valid checkpoint signing all three (the signed start), else the chain fails at seq 1. A record after a
    checkpoint signed ``final`` fails the chain. ``unsealed_note`` ends the message of a tail longer than
    ``max_unsealed`` (where the limit came from, how to allow more)."""
    accepted = frozenset(accept_unverified)
    records = checkpoints = unsealed = last_seq = accepted_records = 0
    final_seq: int | None = None  # the checkpoint signed ``final``: nothing may follow it
    unverified: list[tuple[int, int]] = []
    # A checkpoint whose signature fails is held back: if a later audit_resume names it as unverified it is part
    # of that range; otherwise it is the first bad record (reported whatever comes after it).
    pending: _Bad | None = None
    try:
        expected_prev = GENESIS
        for line_no, line in enumerate(lines, start=1):
            try:
                record = _intact_record(line, line_no)
                seq = record["seq"]
                if identity is not None and line_no == 1 and seq != 1:
                    raise _Bad(f"no signed start: the chain begins at seq {seq}", seq=seq, line=line_no)
                if seq != last_seq + 1:
                    raise _Bad(
                        f"missing or reordered: seq {seq} follows seq {last_seq}", seq=seq, line=line_no
                    )
                if record["prev"] != expected_prev:
                    raise _Bad(f"chain broken: prev is not the hash of seq {last_seq}", seq=seq, line=line_no)
                if final_seq is not None:
                    raise _Bad(
                        f"after the final checkpoint: seq {final_seq} is signed as the last record of this chain "
                        f"(its broker stopped cleanly), yet seq {seq} follows it: added later, not by that broker",
                        seq=seq,
                        line=line_no,
                    )
                event = record.get("event")
                sealing = event == "checkpoint"
                if identity is not None and seq == 1 and not sealing:
                    raise _Bad("no signed start: the first record is not a checkpoint", seq=seq, line=line_no)
                if sealing:
                    sig = record.get("sig")
                    claims = _claims(seq, record["prev"], record.get("ts"), identity, jws_payload(sig))
                    why = checkpoint_problem(sig, claims=claims, keys=keys)
                    if identity is not None and seq == 1 and why is not None:
                        raise _Bad(f"no signed start: {why}", seq=seq, line=line_no)
                    if why is not None:
                        sealing = False
                        if pending is None:
                            counts = _Counts(records, checkpoints, unsealed, last_seq)
                            pending = _Bad(why, seq=seq, line=line_no, counts=counts)
                    elif pending is not None:
                        raise pending  # a valid checkpoint over a failed one: that one is the first bad
                    elif claims.get("final") is True:
                        final_seq = seq
                if (
                    anchor is not None
                    and seq == anchor["seq"]
                    and (
                        event != "checkpoint"
                        or record["prev"] != anchor["head"]
                        or record.get("sig") != anchor["sig"]
                    )
                ):
                    raise _Bad("head anchor does not match this record", seq=seq, line=line_no)
                if event == RESUME_EVENT:
                    first, last = _resume_range(record, seq, line_no)
                    if pending is not None and pending.seq is not None and pending.seq >= first:
                        pending = None  # the failed checkpoint is one of the unverified records
                    if first in accepted:
                        accepted_records += last - first + 1
                    else:
                        unverified.append((first, last))
            except _Bad as bad:
                raise pending or bad from None
            expected_prev, last_seq = record["hash"], seq
            records += 1
            if sealing:
                checkpoints += 1
                unsealed = 0
            else:
                unsealed += 1
        if pending is not None:
            raise pending
        if identity is not None and last_seq == 0:
            raise _Bad("no signed start: the chain has no records", seq=1, line=None)
        if anchor is not None and anchor["seq"] > last_seq:
            raise _Bad(
                f"truncated: head anchor names seq {anchor['seq']} but log ends at {last_seq}",
                seq=last_seq + 1,
                line=None,
            )
        if max_unsealed is not None and unsealed > max_unsealed:
            raise _Bad(
                f"unsealed: {unsealed} records after the last checkpoint (more than {max_unsealed}{unsealed_note})",
                seq=last_seq - unsealed + 1,
                line=None,
            )
        if unverified:
            first, last = unverified[0]
            more = f"; {len(unverified) - 1} more such ranges" if len(unverified) > 1 else ""
            raise _Bad(
                f"unverified: seq {first}..{last} ({last - first + 1} records) followed the last signed "
                f"checkpoint when the broker restarted (audit_resume at seq {last + 1}): nothing proves the "
                f"broker wrote them{more}",
                seq=first,
                line=first,
            )
    except _Bad as bad:
        counts = bad.counts or _Counts(records, checkpoints, unsealed, last_seq)
        failed = _failed(
            bad, counts, keys=keys, anchor=anchor, unverified=unverified, accepted_records=accepted_records
        )
        return replace(failed, final_seq=final_seq)
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
        accepted_unverified=accepted_records,
        final_seq=final_seq,
    )


def _failed(
    bad: _Bad,
    counts: _Counts,
    *,
    keys: Keys | None,
    anchor: Mapping[str, Any] | None,
    unverified: list[tuple[int, int]],
    accepted_records: int,
) -> VerifyReport:
    return VerifyReport(
        ok=False,
        records=counts.records,
        checkpoints=counts.checkpoints,
        first_bad_seq=bad.seq,
        problem=bad.problem,
        unsealed=counts.unsealed,
        signatures_checked=keys is not None,
        first_bad_line=bad.line,
        last_seq=counts.last_seq,
        anchor_seq=anchor["seq"] if anchor is not None else None,
        unverified=tuple(unverified),
        accepted_unverified=accepted_records,
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
