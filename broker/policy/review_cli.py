"""``broker access-review -c CONFIG --principals FILE [--against OTHER] [--format json|csv|table]`` (CONTRACT §15).

Only the configs' policies are compiled (no certificate or key is read), with the engine the broker runs; the
principals file format is in :mod:`broker.policy.review`. Without ``--against``: one row per (principal, agent,
tool). With it: one row per difference, CONFIG → OTHER (what each principal gains or loses if OTHER ships).
``json`` is JSON lines (one row per line). Exit status: 0 done, 1 a config or principals file with a problem
(each as ``FILE:LINE: message`` on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from broker.audit.formats import FORMATS, write_rows

__all__ = ["add_access_review_parser"]

ROW_COLUMNS = (
    "subject",
    "agent",
    "tool",
    "transports",
    "visible",
    "callable",
    "rule",
    "obligations",
    "obligations_when",
    "deny_when",
    "constraints",
)
CHANGE_COLUMNS = ("subject", "agent", "tool", "aspect", "before", "after", "effect")

_EPILOG = """\
examples:
  broker access-review -c config/examples/expense.yaml --principals config/examples/expense.principals.yaml
  broker access-review -c deployed.yaml --against candidate.yaml --principals staff.yaml --format table
"""


def add_access_review_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "access-review",
        help="for each listed principal and agent: the tools they can see and call, under which obligations",
        description="For each principal of --principals and each agent acting for it, from CONFIG's active "
        "policies: which tools are visible, which callable (yes / conditional / no), the obligations always "
        "required, and the rules that depend on a call's arguments or counters (rule id and expression). "
        "With --against, the differences from CONFIG to OTHER instead.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--config", required=True, metavar="CONFIG", help="the config in force")
    parser.add_argument(
        "--principals",
        required=True,
        type=Path,
        metavar="FILE",
        help="YAML list of {sub, claims, agents}; see config/examples/expense.principals.yaml",
    )
    parser.add_argument(
        "--against",
        metavar="OTHER",
        help="a candidate config: print what each principal gains or loses going from CONFIG to OTHER",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="json",
        help="json: JSON lines (default); csv: header row, RFC 4180; table: aligned columns",
    )
    parser.set_defaults(func=cmd_access_review)
    return parser


def cmd_access_review(args: argparse.Namespace) -> int:
    from broker.config.loader import ConfigError, load_config
    from broker.policy.fixtures import compile_policies
    from broker.policy.review import ReviewRow, diff_reviews, load_principals, review, tool_transports

    now = int(time.time())

    def rows_of(config_path: str) -> list[ReviewRow]:
        path = Path(config_path)
        policies, counters = compile_policies(path)
        tools = tool_transports(load_config(path).config)
        return review(policies, tools, counters, principals, now=now)

    try:
        principals = load_principals(args.principals)
        current = rows_of(args.config)
        candidate = rows_of(args.against) if args.against else None
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    if candidate is None:
        if args.format == "json":
            write_rows((r.to_json() for r in current), ROW_COLUMNS, "json", sys.stdout)
        else:
            cells = (
                {
                    **r.to_json(),
                    "obligations_when": [c.text() for c in r.obligations_when],
                    "deny_when": [c.text() for c in r.deny_when],
                }
                for r in current
            )
            write_rows(cells, ROW_COLUMNS, args.format, sys.stdout)
        return 0
    write_rows(
        (c.to_json() for c in diff_reviews(current, candidate)), CHANGE_COLUMNS, args.format, sys.stdout
    )
    return 0
