"""Build the server tools from the settings (only when ``NILAI_SERVER_TOOLS`` names one)."""

from __future__ import annotations

from nilai.settings import NilaiSettings
from nilai.startup import StartupError
from nilai.tools.executor import CodeExecutor, DisabledExecutor
from nilai.tools.server import ServerTools


def make_server_tools(settings: NilaiSettings) -> ServerTools | None:
    """The server tools, or None when none is enabled (every tool call goes to the client).

    Raises:
        StartupError: ``NILAI_SANDBOX=bubblewrap`` and bubblewrap cannot run here.
    """
    if not settings.server_tools:
        return None
    executor: CodeExecutor
    if settings.code_executor == "disabled":
        executor = DisabledExecutor()
    else:
        # Imported here: the sandbox probes the machine, which only a gateway with tools needs.
        from nilai.tools.sandbox import (  # noqa: PLC0415
            LocalExecutor,
            SandboxLimits,
            SandboxUnavailable,
        )

        try:
            executor = LocalExecutor(
                SandboxLimits.from_settings(settings), sandbox=settings.sandbox
            )
        except SandboxUnavailable as exc:
            raise StartupError(f"NILAI_SANDBOX=bubblewrap: {exc}") from exc
    return ServerTools(
        executor, settings.server_tools, max_calls_per_round=settings.tool_max_calls_per_round
    )
