"""``broker audit init --db URL`` and ``broker audit verify --db URL [--chain ID]`` (the PostgreSQL store).

Exit codes as the file form: 0 intact, 1 a failed check (naming the chain and the first bad ``seq``), 2 usage
(an unreadable key, an unreachable database, a schema this broker does not know)."""

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


def add_verify_db_options(verify: argparse.ArgumentParser) -> None:
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

    from broker.audit.pg import describe, verify_db

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
