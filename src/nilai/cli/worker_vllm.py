"""``nilai worker vllm``: start ``vllm serve`` tuned by ``VLLM_*`` variables and announce it."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

from nilai.cli.common import load_settings
from nilai.logging import configure_logging
from nilai.workers.vllm_launcher import (
    VLLM_BIN_VARIABLE,
    LaunchOptions,
    plan_worker,
    run_worker,
)

PROG = "nilai worker vllm"
EPILOG = """\
tuning (environment; docs/VLLM_TUNING.md):
  VLLM_TENSOR_PARALLEL_SIZE=1       VLLM_MAX_NUM_BATCHED_TOKENS=8192   VLLM_MAX_NUM_SEQS=256
  VLLM_GPU_MEMORY_UTILIZATION=0.9   VLLM_SWAP_SPACE=4 (GiB, or none)
  VLLM_ENFORCE_EAGER=false          VLLM_DISABLE_LOG_STATS=false

With NILAI_REDIS_URL set, the server is announced in discovery once /health answers, and
withdrawn before it is stopped. Arguments after -- go to `vllm serve` as they are, e.g.
  nilai worker vllm --model meta-llama/Llama-3.1-8B-Instruct -- --max-model-len 16384
"""


def register(workers: Any) -> None:
    """Add the ``vllm`` subcommand to the ``nilai worker`` subcommands."""
    # Any: argparse's subparsers action type is private.
    parser: argparse.ArgumentParser = workers.add_parser(
        "vllm",
        help="run `vllm serve` with VLLM_* tuning and announce it in discovery",
        description="Run `vllm serve`, wait until it is healthy, and keep it announced.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="hub id or local path of the model")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--served-model-name", help="model id clients use (default: --model)")
    parser.add_argument(
        "--vllm-bin",
        help=f"the vllm executable (default: {VLLM_BIN_VARIABLE} or `vllm` on PATH)",
    )
    parser.add_argument(
        "--announce-url",
        help="URL gateways reach the server at (default http://HOST:PORT; needed with a "
        "wildcard --host such as 0.0.0.0)",
    )
    parser.add_argument(
        "--health-timeout",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="how long the model may take to load before /health answers (default 900)",
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="wait after SIGTERM before vllm is killed (default 30)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the vllm command and exit without running"
    )
    parser.add_argument(
        "vllm_args",
        nargs=argparse.REMAINDER,
        metavar="-- VLLM_ARGS",
        help="extra `vllm serve` arguments, passed through as they are",
    )
    parser.set_defaults(handler=run)


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2


def _report(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Print the command (``--dry-run``) or run and supervise it; return the exit status."""
    extra: list[str] = list(args.vllm_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]  # older argparse keeps the separator in a REMAINDER list
    try:
        options = LaunchOptions(
            model=args.model,
            host=args.host,
            port=args.port,
            served_model_name=args.served_model_name,
            vllm_bin=args.vllm_bin,
            extra_args=tuple(extra),
        )
        plan = plan_worker(
            os.environ,
            options,
            announce_url=args.announce_url,
            health_timeout_s=args.health_timeout,
            grace_s=args.grace_period,
        )
    except ValueError as exc:  # TuningError included: the message names the variable
        return _fail(str(exc))
    if args.dry_run:
        print(shlex.join(plan.argv))
        return 0
    settings = load_settings("worker vllm")
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    return run_worker(plan, settings, _report)
