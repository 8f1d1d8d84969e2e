"""``--help`` says something for everything (CONTRACT §1): the whole ``broker`` argparse tree — the parser of
:func:`broker.cli.build_parser` and every subparser, including those other modules add — is walked, and every
subcommand, option and positional argument must carry help text."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from broker.cli import build_parser


def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, str | None]]:
    """(``broker sub … --option``, its help) for every subcommand and argument under ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, child in action.choices.items():
                yield f"{path} {name}", helps.get(name, helps.get(child.prog.rsplit(" ", 1)[-1]))
                if child is not parser:
                    yield from walk(child, f"{path} {name}")
            continue
        name = "/".join(action.option_strings) or action.metavar or action.dest
        yield f"{path} {name}", action.help


def missing_help(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(
        {
            place
            for place, text in walk(parser, parser.prog)
            if text != argparse.SUPPRESS and not (isinstance(text, str) and text.strip())
        }
    )


def test_every_subcommand_and_option_has_help_text() -> None:
    missing = missing_help(build_parser())
    assert not missing, "add help= to:\n" + "\n".join(missing)


def test_the_walk_reaches_nested_subcommands_and_positionals() -> None:
    places = {place for place, _ in walk(build_parser(), "broker")}
    assert {
        "broker run",
        "broker run -c/--config",
        "broker approvals show",
        "broker approvals show ID",
    } <= places
    assert "broker policy test FILE" in places


@pytest.mark.parametrize("where", ["option", "positional", "subcommand", "nested-subcommand"])
def test_the_walk_finds_what_lacks_help(where: str) -> None:
    parser = argparse.ArgumentParser(prog="demo")
    sub = parser.add_subparsers(dest="command", help="commands")
    good = sub.add_parser("good", help="has help")
    good.add_argument("--fine", help="documented")
    nested = good.add_subparsers(dest="inner", help="inner commands")
    nested.add_parser("ok", help="documented")
    if where == "option":
        good.add_argument("--bare")
    elif where == "positional":
        good.add_argument("thing")
    elif where == "subcommand":
        sub.add_parser("bare")
    else:
        nested.add_parser("bare")
    expected = {
        "option": "demo good --bare",
        "positional": "demo good thing",
        "subcommand": "demo bare",
        "nested-subcommand": "demo good bare",
    }[where]
    assert missing_help(parser) == [expected]
