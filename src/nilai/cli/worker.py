"""``nilai worker``: model servers (the built-in local engine, the tiny model, vLLM)."""

from __future__ import annotations

import argparse
import functools
from typing import Any

from nilai.cli import worker_local, worker_vllm
from nilai.cli.usage import show_commands


def register(commands: Any) -> None:
    """Add the ``worker`` command group."""
    # Any: argparse's subparsers action type is private.
    parser: argparse.ArgumentParser = commands.add_parser("worker", help="run a model server")
    workers = parser.add_subparsers(dest="worker", metavar="KIND")
    parser.set_defaults(handler=functools.partial(show_commands, parser))
    worker_local.register(workers)
    worker_vllm.register(workers)
