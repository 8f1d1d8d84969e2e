"""``broker audit verify --db``: what the verifier checks in the PostgreSQL store (:mod:`broker.audit.pg`).

Each chain gets the file verifier's checks (:func:`broker.audit.verify.verify_lines`: hashes, links, checkpoint
signatures, its anchor — the file's ``<log>.head`` — and the unsealed tail), and each row's indexed copies are
compared with its line, so an ``UPDATE`` of either is named by chain and ``seq``. Every chain begins with a
checkpoint that signs its ``chain_id``, host and pid (seq 1, the signed start), and every checkpoint signs the
``chain_id``: a chain without that signed start, with a checkpoint signed for another chain, or whose row has no
anchor fails.

What else a signed start says, so that someone who can write the database but has no signing key cannot add to,
cut or delete a chain unnoticed (HOSTILE A04/A05):

- ``checkpoint_every``: its writer never leaves more than ``checkpoint_every - 1`` records after its last
  checkpoint, so that is the chain's default ``max_unsealed`` (0 for a chain whose start does not say it).
- ``seen``: ``[{"chain", "anchor_seq"}]``, the most recent chains in the database when it started
  (:data:`broker.audit.pgsink.SEEN_CHAINS` of them), each with its anchor then. A chain named there must still
  exist and have a checkpoint at that seq: deleting a chain, or cutting it below what a later chain saw, is named.
- ``diverged``: ``{"chain", "seq", "head", "reason"}`` when its broker found its previous chain changed under it
  (:func:`broker.audit.pgsink.reconcile`) and went on in this one; ``seq`` and ``head`` are the last record it had
  committed there. The diverged chain must end with exactly that record (this signature seals it, so its tail is
  not unsealed); anything after it fails, named by ``seq``.

The checkpoint a broker writes when it stops cleanly signs ``final: true`` — a record after it fails the chain —
and ``seen`` as of then, which also names the chains started after its own. Only the newest chains, which no other
chain's start or final checkpoint names yet, can be deleted or cut back unnoticed (deploy/operations.md).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

import psycopg

from broker.audit.chain import Keys, jws_payload, load_keys
from broker.audit.pg import INDEXED, indexed_columns
from broker.audit.verify import VerifyReport, anchor_problem, checkpoint_record_problem, verify_lines

__all__ = ["ChainReport", "verify_db"]

#: ts as the record writes it (format_ts): compared, not parsed
_TS_TEXT = """to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


@dataclass(frozen=True)
class ChainReport:
    """One chain's :class:`~broker.audit.verify.VerifyReport` and where it came from (``host`` None: a chain that
    another chain's signed start or final checkpoint names but that is gone from the database)."""

    chain_id: str
    host: str | None
    pid: int | None
    report: VerifyReport
    #: the most records allowed after its last checkpoint (None: no limit applied — a diverged chain's end is
    #: signed by the chain its broker went on in)
    max_unsealed: int | None = None
    #: what other chains' signed starts say about it (that it diverged)
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        if self.host is None:
            return f"chain {self.chain_id} (missing): FAILED: {self.report.problem}"
        text = f"chain {self.chain_id} ({self.host} pid {self.pid}): {self.report.summary()}"
        report = self.report
        if report.ok and report.unsealed:
            first = report.last_seq - report.unsealed + 1
            text += (
                f"; unverified: seq {first}..{report.last_seq} follow the last signed checkpoint (a live broker's "
                f"chain, or one whose broker did not stop cleanly; at most {self.max_unsealed} allowed): nothing "
                "proves they were not rewritten"
            )
        return "; ".join((text, *self.notes))


@dataclass(frozen=True)
class _Chain:
    """A row of ``audit_chains``, the line of its first record and of its last checkpoint (None: none)."""

    chain_id: str
    host: str
    pid: int
    anchor_seq: int | None
    anchor_head: str | None
    anchor_sig: str | None
    start_line: str | None
    last_checkpoint_line: str | None

    @property
    def identity(self) -> dict[str, Any]:
        return {"chain": self.chain_id, "host": self.host, "pid": self.pid}

    @property
    def anchor(self) -> dict[str, Any] | None:
        if self.anchor_seq is None or self.anchor_head is None or self.anchor_sig is None:
            return None
        return {"seq": self.anchor_seq, "head": self.anchor_head, "sig": self.anchor_sig}


@dataclass(frozen=True)
class _Named:
    """What valid signed starts and final checkpoints say about other chains: chain → [(who said it, e.g. "chain X's
    signed start", the anchor seq seen)], and chain → [(the chain its broker went on in, the ``diverged`` member)]."""

    seen: dict[str, list[tuple[str, int]]]
    diverged: dict[str, list[tuple[str, Mapping[str, Any]]]]

    @classmethod
    def of(cls, starts: Mapping[str, Mapping[str, Any]], finals: Mapping[str, Mapping[str, Any]]) -> _Named:
        seen: dict[str, list[tuple[str, int]]] = {}
        diverged: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
        for where, signed in (("signed start", starts), ("final checkpoint", finals)):
            for by, claims in signed.items():
                for entry in claims.get("seen", ()):
                    seen.setdefault(entry["chain"], []).append((f"chain {by}'s {where}", entry["anchor_seq"]))
        for by, claims in starts.items():
            if "diverged" in claims:
                diverged.setdefault(claims["diverged"]["chain"], []).append((by, claims["diverged"]))
        return cls(seen, diverged)


_CHAINS = (
    "SELECT c.chain_id, c.host, c.pid, c.anchor_seq, c.anchor_head, c.anchor_sig, first.line, last.line "
    "FROM audit_chains c "
    "LEFT JOIN audit_records first ON first.chain_id = c.chain_id AND first.seq = 1 "
    "LEFT JOIN LATERAL (SELECT line FROM audit_records r WHERE r.chain_id = c.chain_id AND r.event = 'checkpoint' "
    "ORDER BY seq DESC LIMIT 1) last ON true ORDER BY c.started_at, c.chain_id"
)


def verify_db(
    url: str,
    *,
    chain: str | None,
    public_jwks: Mapping[str, Any] | None,
    max_unsealed: int | None = None,
    accept_unverified: Collection[int] = (),
) -> list[ChainReport]:
    """``broker audit verify --db``: the file verifier's checks on every chain (or ``chain``), plus each row's
    indexed copies against its line, a non-NULL anchor, and what the valid signed starts and final checkpoints of
    all chains say about the others (module docstring): each chain one of them saw is still there and has a
    checkpoint at the anchor seen, and a diverged chain holds nothing after the last record its broker committed.
    ``max_unsealed`` None: each chain's own ``checkpoint_every - 1`` from its signed start (0 when it does not say).
    A chain they name that is gone is reported as missing. Empty when the chain (or every chain) is missing and
    nothing names it. Raises psycopg.Error and JoseError (unusable keys)."""
    keys = load_keys(public_jwks) if public_jwks is not None else None
    reports = []
    with psycopg.connect(url) as conn:
        chains = [
            _Chain(str(c), str(host), int(pid), seq, head, sig, first, last)
            for c, host, pid, seq, head, sig, first, last in conn.execute(_CHAINS).fetchall()
        ]
        starts = {c.chain_id: start for c in chains if (start := _signed_start(c, keys)) is not None}
        finals = {c.chain_id: final for c in chains if (final := _signed_final(c, keys)) is not None}
        named = _Named.of(starts, finals)
        for row in chains:
            if chain is not None and row.chain_id != chain:
                continue
            rows = conn.execute(
                f"SELECT seq, {_TS_TEXT}, hash, line, {', '.join(INDEXED)} FROM audit_records "  # noqa: S608
                "WHERE chain_id = %s ORDER BY seq",
                (row.chain_id,),
            ).fetchall()
            start = starts.get(row.chain_id)
            reports.append(_verify_chain(row, rows, start, named, keys, max_unsealed, accept_unverified))
    present = {row.chain_id for row in chains}
    for gone in sorted((set(named.seen) | set(named.diverged)) - present):
        if chain is None or gone == chain:
            reports.append(_missing(gone, named, keys))
    return reports


def _signed_start(chain: _Chain, keys: Keys | None) -> dict[str, Any] | None:
    """The claims of the chain's signed start (seq 1) if it is valid for its row, else None."""
    if chain.start_line is None:
        return None
    line = chain.start_line.encode("utf-8") + b"\n"
    if not verify_lines([line], anchor=None, keys=keys, identity=chain.identity).ok:
        return None
    claims = jws_payload(json.loads(chain.start_line).get("sig"))
    return claims if isinstance(claims, dict) else None


def _signed_final(chain: _Chain, keys: Keys | None) -> dict[str, Any] | None:
    """The claims of the chain's last checkpoint if it is valid and signed ``final`` for this chain, else None: its
    signature vouches for what it says wherever it is found (even with records appended after it)."""
    if chain.last_checkpoint_line is None:
        return None
    try:
        record = json.loads(chain.last_checkpoint_line)
    except ValueError:
        return None
    if not isinstance(record, dict) or checkpoint_record_problem(record, keys=keys, identity=chain.identity):
        return None
    claims = jws_payload(record.get("sig"))
    return claims if isinstance(claims, dict) and claims.get("final") is True else None


def _verify_chain(
    chain: _Chain,
    rows: list[tuple[Any, ...]],
    start: Mapping[str, Any] | None,
    named: _Named,
    keys: Keys | None,
    max_unsealed: int | None,
    accept_unverified: Collection[int],
) -> ChainReport:
    diverged = named.diverged.get(chain.chain_id, [])
    note = ""
    if diverged:
        # the chain its broker went on in signs this one's last committed record: nothing after it may be there
        limit = None
    elif max_unsealed is not None:
        limit = max_unsealed
    else:
        limit, note = _default_max_unsealed(start)
    report = _verify_rows(rows, chain.anchor, keys, limit, accept_unverified, chain.identity, note)
    report = _first_problem(report, _named_problems(chain.chain_id, rows, named), rows, keys)
    notes = []
    if report.ok:
        for by, claim in diverged:
            report = replace(report, unsealed=0)
            notes.append(
                f"diverged after seq {claim['seq']} ({claim['reason']}): its broker went on in chain {by}, whose "
                "signed start seals this chain's end"
            )
    return ChainReport(chain.chain_id, chain.host, chain.pid, report, limit, tuple(notes))


def _default_max_unsealed(start: Mapping[str, Any] | None) -> tuple[int, str]:
    """The unsealed tail a chain may have without ``--max-unsealed``, and what the failure says about it."""
    every = start.get("checkpoint_every") if start is not None else None
    if isinstance(every, int):
        return every - 1, (
            ": the chain's checkpoint_every - 1, signed in its start — no broker leaves a longer tail; "
            "--max-unsealed N overrides"
        )
    return 0, (
        ": its signed start does not say its checkpoint_every (a broker older than this check); the chain of a "
        "live or killed broker keeps up to checkpoint_every - 1 records unsealed: pass --max-unsealed N to allow them"
    )


def _named_problems(chain_id: str, rows: list[tuple[Any, ...]], named: _Named) -> list[tuple[int, str]]:
    """(seq, problem) for each thing another chain's signed start or final checkpoint says of this one that its
    rows contradict."""
    problems = []
    by_seq = {int(row[0]): row for row in rows}
    last = int(rows[-1][0]) if rows else 0
    for who, seen in named.seen.get(chain_id, ()):
        if seen > last:
            problems.append(
                (
                    last + 1,
                    f"truncated: {who} saw this chain's anchor at seq {seen}, but the chain ends at seq {last}",
                )
            )
        elif seen and (seen not in by_seq or by_seq[seen][4] != "checkpoint"):
            problems.append(
                (seen, f"rewritten: {who} saw a checkpoint at seq {seen}; this record is not one")
            )
    for by, claim in named.diverged.get(chain_id, ()):
        seq, reason = claim["seq"], claim["reason"]
        if seq > last:
            problems.append(
                (
                    last + 1,
                    f"truncated: the signed start of chain {by} says this chain's broker had committed seq {seq} "
                    f"when it found the chain changed ({reason}), but the chain ends at seq {last}",
                )
            )
        elif seq not in by_seq or by_seq[seq][2] != claim["head"]:
            problems.append(
                (
                    seq,
                    f"diverged: not the record its broker committed as seq {seq} (named by chain {by}'s start)",
                )
            )
        elif last > seq:
            problems.append(
                (
                    seq + 1,
                    f"diverged: seq {seq + 1}..{last} are not its broker's: it found the chain changed ({reason}) and "
                    f"went on in chain {by}, whose signed start names seq {seq} as this chain's last",
                )
            )
    return problems


def _first_problem(
    report: VerifyReport, problems: list[tuple[int, str]], rows: list[tuple[Any, ...]], keys: Keys | None
) -> VerifyReport:
    """The report, or the first of ``problems`` if it comes before the report's own first bad seq."""
    if not problems:
        return report
    seq, problem = min(problems)
    if not report.ok and (report.first_bad_seq is None or report.first_bad_seq <= seq):
        return report
    before = [row for row in rows if row[0] < seq]
    checkpoints = sum(row[4] == "checkpoint" for row in before)
    return _bad(problem, seq=seq, intact=len(before), checkpoints=checkpoints, keys=keys)


def _missing(chain_id: str, named: _Named, keys: Keys | None) -> ChainReport:
    said = [f"{who} saw it (anchor at seq {seq})" for who, seq in named.seen.get(chain_id, ())]
    said += [
        f"chain {by}'s signed start says it diverged after seq {claim['seq']}"
        for by, claim in named.diverged.get(chain_id, ())
    ]
    problem = f"missing: the chain is gone from the database, but {'; '.join(said)}"
    return ChainReport(chain_id, None, None, _bad(problem, seq=None, intact=0, checkpoints=0, keys=keys))


def _verify_rows(
    rows: list[tuple[Any, ...]],
    anchor: dict[str, Any] | None,
    keys: Keys | None,
    max_unsealed: int | None,
    accept_unverified: Collection[int],
    identity: Mapping[str, Any],
    unsealed_note: str = "",
) -> VerifyReport:
    if anchor is None:
        # every chain's start writes its anchor with its first record, in one transaction
        anchor_why: str | None = (
            "missing: the chain's row has no anchor, which its signed start always writes"
        )
    else:
        anchor_why = anchor_problem(anchor, keys, identity)
    report = verify_lines(
        (row[3].encode("utf-8") + b"\n" for row in rows),
        anchor=anchor if anchor_why is None else None,
        keys=keys,
        max_unsealed=max_unsealed,
        accept_unverified=accept_unverified,
        identity=identity,
        unsealed_note=unsealed_note,
    )
    if anchor_why is not None and report.first_bad_seq is None and report.first_bad_line is None:
        # a bad anchor fails the chain; a bad record (e.g. no signed start) is named first, by its seq
        return _bad(f"chain anchor: {anchor_why}", seq=None, intact=0, checkpoints=0, keys=keys)
    if report.first_bad_line is not None:
        # the verifier counts lines; a database row is named by its seq column
        line_seq = rows[report.first_bad_line - 1][0] if report.first_bad_line <= len(rows) else None
        report = replace(report, first_bad_line=None, first_bad_seq=report.first_bad_seq or line_seq)
    checkpoints = 0
    for index, row in enumerate(rows):
        if report.first_bad_seq is not None and row[0] >= report.first_bad_seq:
            break
        problem = _row_problem(row)
        if problem is not None:
            return _bad(problem, seq=int(row[0]), intact=index, checkpoints=checkpoints, keys=keys)
        checkpoints += row[4] == "checkpoint"
    return report


def _row_problem(row: tuple[Any, ...]) -> str | None:
    """Why the row's own columns disagree with its (intact) line, or None."""
    seq, ts, digest, line = row[:4]
    record = json.loads(line)
    expected = (record.get("seq"), record.get("ts"), record.get("hash"), *indexed_columns(record))
    names = ("seq", "ts", "hash", *INDEXED)
    for name, column, value in zip(names, (seq, ts, digest, *row[4:]), expected, strict=True):
        if column != value:
            return f"altered: column {name} is {column!r} but the record says {value!r}"
    return None


def _bad(problem: str, *, seq: int | None, intact: int, checkpoints: int, keys: Keys | None) -> VerifyReport:
    return VerifyReport(
        ok=False,
        records=intact,
        checkpoints=checkpoints,
        first_bad_seq=seq,
        problem=problem,
        unsealed=0,
        signatures_checked=keys is not None,
        last_seq=intact,
    )
