"""What a command group does when no command is named: show the commands it has."""

from __future__ import annotations

import argparse
import sys


def show_commands(parser: argparse.ArgumentParser, _args: argparse.Namespace) -> int:
    """Print ``parser``'s help, with its list of commands, and return the usage-error status.

    Status 2, as argparse's own usage errors: no command was given, so nothing ran, and a script
    that calls ``nilai`` without one should notice.
    """
    parser.print_help(sys.stderr)
    return 2
