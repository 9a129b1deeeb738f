"""Run the gateway (settings from the environment) on an event loop in asyncio debug mode.

    python -m tests.support.debug_loop_gateway PORT SLOW_CALLBACK_S

asyncio then logs, on stderr, every callback that runs longer than SLOW_CALLBACK_S
("Executing <Task ...> took 0.031 seconds"). Used by tests/e2e/test_event_loop.py.
"""

from __future__ import annotations

import asyncio
import sys

import uvicorn

from nilai.gateway.app import create_app_from_env
from nilai.logging import configure_logging


async def serve(port: int, slow_callback_s: float) -> None:
    """Serve until SIGINT/SIGTERM with the slow-callback threshold set."""
    asyncio.get_running_loop().slow_callback_duration = slow_callback_s
    # Debug mode records where every coroutine was created; that bookkeeping alone can stretch
    # a step past the threshold, so keep the slow-callback check and drop the origin tracking.
    sys.set_coroutine_origin_tracking_depth(0)
    config = uvicorn.Config(
        create_app_from_env(), host="127.0.0.1", port=port, log_level="warning", log_config=None
    )
    await uvicorn.Server(config).serve()


if __name__ == "__main__":
    configure_logging("warning")
    asyncio.run(serve(int(sys.argv[1]), float(sys.argv[2])), debug=True)
