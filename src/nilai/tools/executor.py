"""Running code for the ``execute_python`` tool: the ``CodeExecutor`` protocol and its results.

Implementations: ``nilai.tools.sandbox.LocalExecutor`` (a fresh sandboxed process per call,
inside this machine) and ``DisabledExecutor``; tests use ``RecordingExecutor``. Every
implementation runs the code off the event loop and never raises for what the code does: a
crash, a timeout or a limit is a result the model is told about.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

SandboxKind = Literal["bubblewrap", "rlimit", "disabled", "test"]
"""How strongly the code is isolated: ``bubblewrap`` (namespaces: no network, its own file
system view and process tree, plus resource limits), ``rlimit`` (resource limits and an empty
environment only), ``disabled`` (nothing runs)."""


@dataclass(frozen=True, slots=True)
class Execution:
    """What one run of the code produced."""

    stdout: str
    stderr: str
    exit_code: int | None
    """The process's exit status; ``None`` when it was killed (``timed_out`` or a limit)."""
    timed_out: bool = False
    truncated: bool = False
    """The output went past the cap and was cut (the process was then stopped)."""

    def for_model(self) -> str:
        """The tool result the model reads: the output, and how the run ended if not cleanly."""
        parts: list[str] = []
        if self.stdout:
            parts.append(self.stdout)
        if self.stderr:
            parts.append(f"[stderr]\n{self.stderr}")
        if self.truncated:
            parts.append("[output truncated]")
        if self.timed_out:
            parts.append("[killed: time limit reached]")
        elif self.exit_code is None:
            parts.append("[killed: resource limit reached]")
        elif self.exit_code != 0:
            parts.append(f"[exit status {self.exit_code}]")
        return "\n".join(parts)


class CodeExecutor(Protocol):
    """Runs untrusted Python code and reports what it printed."""

    @property
    def kind(self) -> SandboxKind:
        """How the code is isolated (logged at start-up and shown by ``/readyz``)."""
        ...

    async def run(self, code: str) -> Execution:
        """Run ``code`` once, in a fresh sandbox, within the executor's limits."""
        ...

    async def aclose(self) -> None:
        """Stop every run still going and release what the executor holds."""
        ...


class DisabledExecutor:
    """Runs nothing: every call says that code execution is off."""

    kind: SandboxKind = "disabled"

    async def run(self, code: str) -> Execution:
        """Report that nothing ran."""
        return Execution("", "Code execution is disabled on this gateway.", exit_code=1)

    async def aclose(self) -> None:
        """Nothing to release."""


@dataclass
class RecordingExecutor:
    """The in-memory twin for tests: records each call and answers from a script."""

    answers: dict[str, Execution] = field(default_factory=dict[str, Execution])
    """Results by exact code; other code gets ``default``."""
    default: Execution = field(default_factory=lambda: Execution("", "", exit_code=0))
    calls: list[str] = field(default_factory=list[str])
    kind: SandboxKind = "test"

    async def run(self, code: str) -> Execution:
        """Record ``code`` and return its scripted result."""
        self.calls.append(code)
        return self.answers.get(code, self.default)

    async def aclose(self) -> None:
        """Nothing to release."""
