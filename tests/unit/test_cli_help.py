"""`nilai --help` and its subcommands: every option says what it does and what it defaults to."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from nilai.cli import build_parser, main

ActionAt = tuple[str, argparse.Action]


def options(parser: argparse.ArgumentParser, path: str = "nilai") -> Iterator[ActionAt]:
    """Every argument of ``parser`` and of its subcommands, with the command it belongs to."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from options(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield path, action


def named(at: ActionAt) -> str:
    path, action = at
    return f"{path} {'/'.join(action.option_strings) or action.dest}"


def test_every_option_of_every_command_has_help_text():
    missing = [named(at) for at in options(build_parser()) if not at[1].help]
    assert missing == []


def test_every_option_with_a_default_shows_it_in_its_help():
    hidden = [
        named(at)
        for at in options(build_parser())
        if at[1].help != argparse.SUPPRESS
        and at[1].default not in (None, False)
        and "default" not in str(at[1].help)
    ]
    assert hidden == []


@pytest.mark.parametrize("argv", [[], ["worker"]])
def test_a_command_group_without_a_command_lists_its_commands(argv, capsys):
    assert main(argv) == 2
    printed = capsys.readouterr().err
    expected = ("serve", "api", "announce", "worker", "verify") if not argv else ("local", "tiny")
    assert all(f"    {name} " in printed for name in expected), printed
