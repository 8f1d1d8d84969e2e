"""``broker approvals (list | show ID | approve ID | deny ID)``: the approvers' command line (CONTRACT §1, §3).

An approver acts directly, as themselves: their own access token (``--token`` or ``$BROKER_TOKEN``), bound to
their own DPoP key ``DIR/humans/NAME-dpop.jwk``, and no client certificate. The broker's certificate is
verified against ``DIR/ca.pem``. ``--broker`` must be the broker's ``server.public_url``: DPoP proofs name
the URL they are for (RFC 9449 §4.2 ``htu``).

Output (``--format``, the same default for every action): ``table`` (default) prints a header and one row per
approval — every approval the caller can decide for ``list``, the one approval for ``show``, and the new state
for ``approve`` and ``deny``; ``json`` prints the API's JSON answer (``--json`` is short for ``--format json``).
Text that came from agents is printed with control characters escaped, in both formats.
Exit status: 0 done, 1 refused or unreachable (the error code and description on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp

from broker.sdk.agent import AgentClient, ClientReply

__all__ = ["FORMATS", "add_approvals_parser", "cmd_approvals", "render_table"]

FORMATS = ("table", "json")
COLUMNS = ("ID", "STATE", "TOOL", "SUBJECT", "AGENT", "REQUIRED", "VOTES", "EXPIRES", "ARGUMENTS")

_EPILOG = """\
examples:
  export BROKER_TOKEN=$(broker token --certs certs --sub carol --dpop-key certs/humans/carol-dpop.jwk \\
      --claim-json groups='["managers"]' --claim acr=mfa)
  broker approvals list --certs certs --human carol
  broker approvals approve 3q2-7wAAAAAAAAAAAAAAAA --certs certs --human carol
"""


def add_approvals_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``approvals`` command to a ``broker`` argparse subparsers object; return it."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "approvals",
        help="approvers: list, show, approve or deny approval requests",
        description="Approvers' front end to the approvals API, with your own token and DPoP key.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--broker",
        default=os.environ.get("BROKER_URL")
        or os.environ.get("BROKER_PUBLIC_URL")
        or "https://localhost:8443",
        metavar="URL",
        help="the broker's public_url (default $BROKER_URL, else $BROKER_PUBLIC_URL, else https://localhost:8443)",
    )
    common.add_argument(
        "--certs", required=True, type=Path, metavar="DIR", help="the `broker certs` folder (CONTRACT §10)"
    )
    common.add_argument("--human", required=True, metavar="NAME", help="use DIR/humans/NAME-dpop.jwk")
    common.add_argument(
        "--token", metavar="TOKEN", help="your access token (default $BROKER_TOKEN; prefer the variable)"
    )
    common.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="table: a header and one row per approval (default); json: the API's JSON answer",
    )
    common.add_argument(
        "--json", dest="format", action="store_const", const="json", help="short for --format json"
    )
    actions = parser.add_subparsers(dest="approvals_command", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[common], help="pending approvals you can decide")
    for name, text in (
        ("show", "an approval's status"),
        ("approve", "approve a request"),
        ("deny", "deny a request"),
    ):
        action = actions.add_parser(name, parents=[common], help=text)
        action.add_argument("id", metavar="ID", help="the approval id (approval_id of the refused call)")
    parser.set_defaults(func=cmd_approvals)
    return parser


def cmd_approvals(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("BROKER_TOKEN")
    if not token:
        print("broker approvals: give --token or set BROKER_TOKEN", file=sys.stderr)
        return 2
    try:
        client = AgentClient.from_certs(args.broker, args.certs, human=args.human, access_token=token)
    except (ValueError, OSError) as exc:
        print(f"broker approvals: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(client, args))
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        print(f"broker approvals: cannot reach {args.broker}: {type(exc).__name__} {exc}", file=sys.stderr)
        return 1


async def _run(client: AgentClient, args: argparse.Namespace) -> int:
    command = args.approvals_command
    async with client:
        if command == "list":
            reply = await client.request("GET", "/v1/approvals")
        elif command == "show":
            reply = await client.approval(args.id)
        else:
            reply = await client.decide(args.id, command)
    body = _body(reply)
    if reply.status != 200 or not isinstance(body, dict):
        description = body.get("error_description", "") if isinstance(body, dict) else ""
        code = _plain(reply.error or "error")
        print(f"broker approvals: {reply.status} {code}: {_plain(description)}", file=sys.stderr)
        return 1
    if args.format == "json":
        # ASCII only: the arguments are the agent's, and a terminal must not receive its control sequences
        print(json.dumps(body, indent=2, ensure_ascii=True))
        return 0
    approvals = body.get("approvals", []) if command == "list" else [body]
    if approvals:
        print(render_table([item for item in approvals if isinstance(item, dict)]))
    else:
        print("no pending approvals you can decide")
    return 0


def _body(reply: ClientReply) -> Any:
    try:
        return reply.json()
    except ValueError:
        return None


def _plain(value: Any) -> str:
    """Printable text: control and format characters (ANSI escapes, bidi overrides) shown escaped."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def row(status: dict[str, Any]) -> list[str]:
    """One approval's cells, in :data:`COLUMNS` order (printable text only)."""
    votes = [f"{v.get('sub')}:{v.get('decision')}" for v in status.get("approvals", [])]
    cells = (
        status.get("id"),
        status.get("state"),
        status.get("tool"),
        status.get("subject"),
        status.get("actor"),
        ",".join(status.get("required", [])) or "-",
        ",".join(votes) or "-",
        status.get("expires_at"),
        status.get("arguments"),
    )
    return [_plain(cell) if cell is not None else "-" for cell in cells]


def render_table(statuses: list[dict[str, Any]]) -> str:
    """A header and one row per approval, columns padded to their widest cell (the last one is not padded)."""
    rows = [list(COLUMNS), *(row(status) for status in statuses)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(r, widths, strict=False)), r[-1]]) for r in rows
    )
