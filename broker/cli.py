"""The ``broker`` command line (CONTRACT §1). Every command has ``--help``; exit 0 ok, 1 failed check, 2 usage."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from broker.config.loader import LoadedConfig
from broker.observability import configure_logging

DESCRIPTION = """\
broker: the Policy Enforcement Point between AI agents and their tools.
Agents call tools through it over mTLS (X.509-SVID) with DPoP-bound tokens; every decision is audited."""


def _checked(path: str) -> LoadedConfig | None:
    """The config at ``path`` if it has no problem at all (every file it names loads, every policy compiles);
    else None, after printing every problem as ``FILE:LINE: message`` on stderr."""
    from broker.config.check import check_config

    result = check_config(path)
    for problem in result.problems:
        print(problem, file=sys.stderr)
    return result.loaded


def cmd_check(args: argparse.Namespace) -> int:
    loaded = _checked(args.config)
    if loaded is None:
        return 1
    config = loaded.config
    print(
        f"ok: {args.config}: policy_version {loaded.policy_version}, {len(config.tools)} tools, "
        f"{len(config.mcp_servers)} MCP servers, {len(config.policies)} policies"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from broker.errors import AuditUnavailable
    from broker.server import ListenError, probe_listeners, serve
    from broker.workers import WorkersRefused, check_workers, run_workers

    loaded = _checked(args.config)
    if loaded is None:
        return 1
    try:
        check_workers(loaded, args.workers)
    except WorkersRefused as exc:
        print(f"broker run: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1:
        try:
            probe_listeners(loaded)  # a busy port is one line here, not a traceback in every worker
        except ListenError as exc:
            print(exc, file=sys.stderr)
            return 1
        return run_workers(
            args.config, loaded, args.workers, log_format=args.log_format, log_level=args.log_level
        )
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        runner = asyncio.run
    try:
        runner(serve(loaded))
    except ListenError as exc:
        print(exc, file=sys.stderr)  # FILE:LINE: server.listen … is in use; set BROKER_LISTEN or …
        return 1
    except OSError as exc:
        print(f"broker: cannot start: {exc}", file=sys.stderr)
        return 1
    except AuditUnavailable as exc:  # the audit file or store cannot be opened: one line naming it
        print(f"broker: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from broker.dev.pki import generate

    try:
        paths = generate(
            Path(args.out),
            trust_domain=args.trust_domain,
            agents=tuple(args.agent or ("expense-assistant", "travel-bot")),
            humans=tuple(args.human or ("carol", "dave", "sam")),
        )
    except ValueError as exc:
        print(f"broker certs: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(paths)} files to {args.out} (trust domain {args.trust_domain}); private keys are mode 0600"
    )
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from broker.audit.verify import verify_log
    from broker.keys import public_jwks_from_file

    jwks = None
    if args.key:
        try:
            jwks = public_jwks_from_file(Path(args.key))
        except ValueError as exc:
            print(f"broker audit verify: cannot read key {args.key}: {exc}", file=sys.stderr)
            return 2
    if (args.db is None) == (args.file is None):
        print("broker audit verify: give a FILE or --db URL (one of them)", file=sys.stderr)
        return 2
    if args.db is not None:
        from broker.audit.pg_cli import cmd_audit_verify_db

        return cmd_audit_verify_db(args, jwks)
    try:
        report = verify_log(
            Path(args.file),
            public_jwks=jwks,
            max_unsealed=args.max_unsealed,
            accept_unverified=args.accept_unverified or (),
        )
    except OSError as exc:  # a missing or unreadable log is a usage problem (2), not a failed chain (1)
        print(f"broker audit verify: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1


def cmd_policy_test(args: argparse.Namespace) -> int:
    from broker.policy.fixtures import main as run

    return run(args.file, args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broker", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        default="json",
        help="JSON lines for machines (default) or console for humans; logs go to stderr",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="the least severe log lines written (default info)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="serve agents (main TLS listener + admin listener)",
        description="Serve: the main listener (TLS, client certificates) and the admin listener "
        "(/healthz, /readyz, /metrics). SIGTERM drains in-flight calls and writes the final "
        "audit checkpoint.",
    )
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config (see config/)")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N processes on one port (SO_REUSEPORT); N>1 needs state.backend: redis (default 1)",
    )
    run.set_defaults(func=cmd_run)

    check = sub.add_parser(
        "check",
        help="validate a config; exit 1 listing FILE:LINE: message per problem",
        description="Load, validate and compile a config (schemas, TLS files) without serving.",
    )
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config to check")
    check.set_defaults(func=cmd_check)

    certs = sub.add_parser(
        "certs",
        help="write a development PKI (CA, broker, backend, agent SVIDs, keys)",
        description="Development PKI in the CONTRACT §10 layout. Not for production: use SPIRE.",
    )
    certs.add_argument("--out", required=True, metavar="DIR", help="folder to write (created if missing)")
    certs.add_argument(
        "--trust-domain",
        default="example.org",
        help="SPIFFE trust domain of every SVID (default example.org)",
    )
    certs.add_argument(
        "--agent",
        action="append",
        metavar="NAME",
        help="agent SVID to issue (repeatable; default expense-assistant, travel-bot)",
    )
    certs.add_argument(
        "--human",
        action="append",
        metavar="NAME",
        help="human DPoP key to write (repeatable; default carol, dave, sam)",
    )
    certs.set_defaults(func=cmd_certs)

    # dev/ and sdk/ are never imported by the server path: only when the parser is built
    from broker.dev.idp import add_token_parser
    from broker.sdk.approvals_cli import add_approvals_parser
    from broker.sdk.connect import add_connect_parser

    add_token_parser(sub)
    add_approvals_parser(sub)
    add_connect_parser(sub)

    policy = sub.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    ptest = policy_sub.add_parser(
        "test",
        help="run YAML policy fixture cases against a config's policies",
        description="Each case gives a principal, a tool and (optionally) arguments, and the expected decision "
        "(allow/deny/hidden), obligations, rule and reason. Exit 1 on any mismatch. See "
        "config/examples/expense.policy-tests.yaml.",
    )
    ptest.add_argument("file", metavar="FILE", help="the fixture file")
    ptest.add_argument(
        "-c", "--config", required=True, metavar="CONFIG", help="YAML config whose policies are tested"
    )
    ptest.set_defaults(func=cmd_policy_test)

    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    verify = audit_sub.add_parser(
        "verify",
        help="check the hash chain, checkpoint signatures and head anchor",
        description="Exit 0 if the log (a FILE, or every chain in --db) is intact, else 1 naming the first bad "
        "record (and its chain).",
    )
    verify.add_argument("file", metavar="FILE", nargs="?", help="the audit log (JSON lines)")
    verify.add_argument(
        "--key",
        metavar="JWKS",
        help="the broker's public JWKS (or its signing JWK) to check checkpoint signatures",
    )
    verify.add_argument(
        "--max-unsealed",
        type=int,
        metavar="N",
        help="fail if more than N records follow the last signed checkpoint (use checkpoint_every - 1 for a log "
        "of a stopped broker: catches a chain rebuilt without checkpoints)",
    )
    verify.add_argument(
        "--accept-unverified",
        type=int,
        action="append",
        metavar="SEQ",
        help="records a restarted broker could not verify (an audit_resume record) fail the log, named by their "
        "first seq; after reviewing them, pass that seq to accept that range (repeatable)",
    )
    verify.set_defaults(func=cmd_audit_verify)
    from broker.audit.pg_cli import add_init_parser, add_verify_db_options

    add_verify_db_options(verify)  # --db URL [--chain ID]: the PostgreSQL store
    add_init_parser(audit_sub)  # audit init --db URL

    from broker.audit.report_cli import add_audit_question_parsers
    from broker.policy.review_cli import add_access_review_parser

    add_audit_question_parsers(audit_sub)  # audit query, audit report approvals
    add_access_review_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(fmt=args.log_format, level=args.log_level)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
