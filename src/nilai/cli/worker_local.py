"""``nilai worker local`` and ``nilai worker tiny``: the built-in engine and its tiny model."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from nilai.cli.common import load_settings
from nilai.discovery.announcer import Announcer, until_answering
from nilai.discovery.redis import RedisDiscovery
from nilai.logging import configure_logging
from nilai.settings import NilaiSettings
from nilai.state.redis import make_redis
from nilai.upstream.http import make_http_client

PARENT_CHECK_S = 1.0


def register(workers: Any) -> None:
    """Add ``local`` and ``tiny`` to the worker group."""
    # Any: argparse's subparsers action type is private.
    local: argparse.ArgumentParser = workers.add_parser(
        "local", help="serve a Hugging Face model with the built-in engine (transformers)"
    )
    local.add_argument("--model", required=True, help="local directory or Hugging Face hub id")
    local.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)"
    )
    local.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    local.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    local.add_argument("--model-id", help="id to serve the model under (default: its name)")
    local.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    local.set_defaults(handler=run_local)

    tiny: argparse.ArgumentParser = workers.add_parser(
        "tiny", help="write a tiny random-weight model (readable noise) for offline use"
    )
    tiny.add_argument("directory", type=Path, help="where to write it (created if missing)")
    tiny.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    tiny.set_defaults(handler=run_tiny)


def run_tiny(args: argparse.Namespace) -> int:
    """Write the tiny model and say what it is."""
    from nilai.workers.local.tiny import NOISE_NOTICE, write_tiny_model

    started = time.monotonic()
    print(f"Writing a tiny random-weight model to {args.directory} ...", flush=True)
    write_tiny_model(args.directory, seed=args.seed)
    print(f"Done in {time.monotonic() - started:.1f}s.\n{NOISE_NOTICE}")
    return 0


def run_local(args: argparse.Namespace) -> int:
    """Load the model, then serve it until interrupted."""
    settings = load_settings("worker local")
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    from nilai.workers.local.engine import ModelNotFoundError, TransformersEngine
    from nilai.workers.local.server import create_worker_app

    print(f"Loading {args.model} on {args.device} ...", flush=True)
    started = time.monotonic()
    try:
        engine = TransformersEngine(args.model, device=args.device, model_id=args.model_id)
    except ModelNotFoundError as exc:
        print(f"nilai worker local: {exc}", file=sys.stderr)
        return 2
    print(f"Loaded {engine.model_id} in {time.monotonic() - started:.1f}s.", flush=True)
    app = create_worker_app(engine)
    url = f"http://{args.host}:{args.port}"
    app.router.lifespan_context = _lifespan(settings, url, args.parent_pid)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False)
    return 0


def _lifespan(settings: NilaiSettings, url: str, parent_pid: int | None) -> Any:
    """Announce to shared discovery once serving; exit if the parent process dies.

    With ``parent_pid`` the worker runs under ``nilai serve``, whose gateway registers it
    in-process and says so; the worker then says nothing about discovery itself.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncGenerator[None]:
        stop = asyncio.Event()
        redis = make_redis(settings)
        http = make_http_client(settings)
        announcing = watcher = None
        if redis is not None:
            discovery = RedisDiscovery(redis, settings.redis_prefix)
            announcer = Announcer(discovery, http, url, ttl_s=settings.discovery_ttl_s)
            announcing = asyncio.create_task(_announce_when_serving(announcer, http, url, stop))
        elif parent_pid is None:
            print(f"Not announced (NILAI_REDIS_URL unset); gateways reach it via {url}.")
        if parent_pid is not None:
            watcher = asyncio.create_task(_exit_with_parent(parent_pid))
        try:
            yield
        finally:
            stop.set()
            if watcher is not None:
                watcher.cancel()
            await asyncio.gather(*(t for t in (announcing, watcher) if t), return_exceptions=True)
            await http.aclose()
            if redis is not None:
                await redis.aclose()

    return lifespan


async def _announce_when_serving(
    announcer: Announcer, http: httpx.AsyncClient, url: str, stop: asyncio.Event
) -> None:
    """Announce once the worker answers on ``url``, then keep it announced until ``stop``.

    This runs from the app's start-up, before uvicorn listens: announcing at once would find
    the worker not answering and leave it unannounced (404 at the gateways) for a lease period.
    """
    if await until_answering(http, url, stop):
        await announcer.run(stop)


async def _exit_with_parent(parent_pid: int) -> None:
    """`nilai serve` may be killed without cleaning up; never outlive it."""
    while os.getppid() == parent_pid:  # noqa: ASYNC110 - nothing to wait on but polling
        await asyncio.sleep(PARENT_CHECK_S)
    print("parent process is gone; stopping the worker", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
