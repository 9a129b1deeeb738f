"""The ``nilai`` command: argument parsing only; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence

from nilai import __version__
from nilai.cli import admin, announce, api, attest, import_upstream, serve, verify, worker
from nilai.cli.usage import show_commands


def build_parser() -> argparse.ArgumentParser:
    """The full command tree."""
    parser = argparse.ArgumentParser(
        prog="nilai", description="Confidential LLM gateway with signed answers."
    )
    parser.add_argument("--version", action="version", version=f"nilai {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    # A bare `nilai` shows what it can do instead of argparse's "arguments are required".
    parser.set_defaults(handler=functools.partial(show_commands, parser))
    for module in (serve, api, announce, worker, verify, attest, admin, import_upstream):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    args = build_parser().parse_args(argv)
    status: int = args.handler(args)
    return status
