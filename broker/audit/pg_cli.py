"""``broker audit init --db URL`` and ``broker audit verify --db URL [--chain ID]`` (the PostgreSQL store).

Exit codes as the file form: 0 intact, 1 a failed check (naming the chain and the first bad ``seq``), 2 usage
(an unreadable key, an unreachable database, a schema this broker does not know). ``--max-unsealed`` left out
means, with ``--db``, each chain's own ``checkpoint_every - 1`` (:mod:`broker.audit.pgverify`); a FILE's tail has no
default limit."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_init_parser(audit_sub: Any) -> None:
    init = audit_sub.add_parser(
        "init",
        help="create or migrate the audit schema in PostgreSQL (idempotent)",
        description="Create the audit tables (audit_schema_version, audit_chains, audit_records) or apply the "
        "migrations a newer broker brings. The broker does the same at start; run this when its database user "
        "may not create tables.",
    )
    init.add_argument("--db", required=True, metavar="URL", help="postgresql:// URL (libpq form)")
    init.set_defaults(func=cmd_audit_init)


#: ``broker audit verify --help``: the exit codes and what --max-unsealed defaults to (file and --db)
VERIFY_EPILOG = (
    "Exit status: 0 intact; 1 a check failed (the first bad record is named by seq, and by chain with --db) or, "
    "with --db, no chain was found; 2 the key or the database could not be read. --max-unsealed: without it a "
    "FILE's unsigned tail is reported, not limited; with --db each chain is held to its own checkpoint_every - 1 "
    "(signed in its start; 0 for a chain whose start does not say it) — a live broker's chain, or a killed one's, "
    "has at most that many records after its last checkpoint. A --db chain closed by its final checkpoint (a "
    "clean stop) has none: a record after it always fails, as does a chain deleted or cut below what a later "
    "chain's start saw, or records after a chain diverged."
)


def add_verify_db_options(verify: argparse.ArgumentParser) -> None:
    verify.epilog = VERIFY_EPILOG
    verify.add_argument(
        "--db",
        metavar="URL",
        help="verify the chains in this PostgreSQL database (audit.store) instead of a FILE",
    )
    verify.add_argument(
        "--chain",
        metavar="ID",
        help="with --db: only this chain (default every chain; `chain ID` names each in the output)",
    )


def cmd_audit_init(args: argparse.Namespace) -> int:
    import psycopg

    from broker.audit.pg import SchemaTooNew, describe, init_schema

    try:
        version = init_schema(args.db)
    except (psycopg.Error, SchemaTooNew) as exc:
        print(f"broker audit init: {describe(args.db)}: {_first_line(exc)}", file=sys.stderr)
        return 2
    print(f"ok: audit schema at version {version} in {describe(args.db)}")
    return 0


def cmd_audit_verify_db(args: argparse.Namespace, jwks: dict[str, Any] | None) -> int:
    import psycopg

    from broker.audit.pg import describe
    from broker.audit.pgverify import verify_db

    try:
        reports = verify_db(
            args.db,
            chain=args.chain,
            public_jwks=jwks,
            max_unsealed=args.max_unsealed,
            accept_unverified=args.accept_unverified or (),
        )
    except psycopg.Error as exc:
        print(f"broker audit verify: {describe(args.db)}: {_first_line(exc)}", file=sys.stderr)
        return 2
    if not reports:
        what = f"chain {args.chain}" if args.chain else "audit chain"
        print(f"FAILED: no {what} in {describe(args.db)}")
        return 1
    for chain in reports:
        print(chain.summary())
    return 0 if all(chain.report.ok for chain in reports) else 1


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
