"""``broker audit query`` and ``broker audit report approvals``: the auditor's questions (CONTRACT §15), over an
audit file (or rotated files, oldest first) or the PostgreSQL store.

Output on stdout: ``json`` (default) is JSON lines — one record (query: exactly as stored) or one row per line;
``csv`` has a header row (RFC 4180, formula-looking cells prefixed with ``'``); ``table`` aligned columns.
Exit status: 0 (also when nothing matched), 1 a source that cannot be read (one line on stderr naming it), 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.audit.formats import FORMATS, write_rows
from broker.audit.query import FIELDS, RecordFilter, TimeError, matching, parse_time
from broker.audit.sources import SourceError, db_records, file_records

__all__ = ["add_audit_question_parsers"]

#: query's csv/table columns (json prints whole records)
QUERY_COLUMNS = (
    "seq",
    "ts",
    "event",
    "decision",
    "reason",
    "request_id",
    "subject",
    "actor",
    "tool",
    "args_digest",
    "txn",
    "approval_id",
    "status",
)

_TIME_HELP = "RFC 3339 (2026-05-01T12:00:00Z) or relative to now, written with = (--since=-30m, -1h, -2d)"
_QUERY_EPILOG = """\
examples:
  broker audit query --file var/audit.jsonl --subject alice --decision deny --since=-1h
  broker audit query --db postgresql://audit@db/broker --tool approveExpense --format csv > calls.csv
  broker audit query --file audit.jsonl.1 --file audit.jsonl --request-id 9f2c…   # a decision and its outcome
"""


def _add_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--file",
        action="append",
        type=Path,
        metavar="FILE",
        help="an audit log file; repeat for rotated files, oldest first",
    )
    source.add_argument(
        "--db", metavar="URL", help="the PostgreSQL audit store (audit.store), postgresql://…"
    )
    parser.add_argument(
        "--chain", metavar="ID", help="with --db: only this broker process's chain (chain_id)"
    )
    parser.add_argument("--since", metavar="T", help=f"records at or after T; {_TIME_HELP}")
    parser.add_argument("--until", metavar="T", help=f"records before T; {_TIME_HELP}")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="json",
        help="json: JSON lines (default); csv: header row, RFC 4180; table: aligned columns",
    )


def add_audit_question_parsers(audit_sub: Any) -> None:
    """Add ``query`` and ``report approvals`` to the ``broker audit`` subparsers."""
    query = audit_sub.add_parser(
        "query",
        help="print the audit records matching filters (JSON lines by default)",
        description="Print the records that match every given filter (a repeated filter matches any of its "
        "values), in log order. Reading is not verifying: run `broker audit verify` for the chain.",
        epilog=_QUERY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_source(query)
    helps = {
        "subject": "the human (token sub) the call was for",
        "actor": "the agent's SPIFFE ID",
        "tool": "the tool name",
        "decision": "allow, deny, step_up, pending or error",
        "event": "discovery, exchange, invocation, approval, mcp, outcome, config_load, …",
        "txn": "the txn token id (joins an exchange and its invocation)",
        "request_id": "the broker's request id (joins a decision and its outcome)",
    }
    for name in FIELDS:
        query.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            action="append",
            metavar=name.upper().replace("_", "-"),
            help=f"{helps[name]} (repeatable)",
        )
    query.set_defaults(func=cmd_audit_query)

    report = audit_sub.add_parser("report", help="reports over the audit log")
    report_sub = report.add_subparsers(dest="report_command", required=True, metavar="REPORT")
    approvals = report_sub.add_parser(
        "approvals",
        help="who approved what, when, for whom, and whether the approved call executed",
        description="One row per approval: id, tool, requester and agent, required obligations, args digest and "
        "audit fields, created, each approver's decision with its time, the final state, and whether the approved "
        "call executed (with the upstream status of its outcome record). --since/--until select by creation.",
    )
    _add_source(approvals)
    approvals.set_defaults(func=cmd_report_approvals)


def _records(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    if args.file:
        if args.chain:
            raise SourceError("--chain applies to --db (an audit file holds one chain)")
        return file_records(list(args.file))
    return db_records(args.db, args.chain)


def _fail(command: str, message: str) -> int:
    print(f"broker audit {command}: {message}", file=sys.stderr)
    return 1


def cmd_audit_query(args: argparse.Namespace) -> int:
    from broker.audit.records import encode_line

    try:
        rule = RecordFilter.build(
            since=args.since,
            until=args.until,
            now=datetime.now(UTC),
            **{name: getattr(args, name) for name in FIELDS},
        )
    except TimeError as exc:
        print(f"broker audit query: {exc}", file=sys.stderr)
        return 2
    out = sys.stdout
    try:
        found = matching(_records(args), rule)
        if args.format == "json":
            for record in found:
                out.write(encode_line(record) + "\n")  # exactly the stored line
        else:
            write_rows(found, QUERY_COLUMNS, args.format, out)
    except SourceError as exc:
        out.flush()
        return _fail("query", str(exc))
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        return 0
    return 0


def cmd_report_approvals(args: argparse.Namespace) -> int:
    from broker.audit.approvals_report import COLUMNS, approval_rows

    now = datetime.now(UTC)
    try:
        since = parse_time(args.since, now=now) if args.since else None
        until = parse_time(args.until, now=now) if args.until else None
    except TimeError as exc:
        print(f"broker audit report approvals: {exc}", file=sys.stderr)
        return 2
    try:
        rows = approval_rows(_records(args), since=since, until=until)
    except SourceError as exc:
        return _fail("report approvals", str(exc))
    if args.format == "json":
        write_rows((row.to_json() for row in rows), COLUMNS, "json", sys.stdout)
    else:
        write_rows((row.to_cells() for row in rows), COLUMNS, args.format, sys.stdout)
    return 0
