"""The local code executor: each ``execute_python`` call runs in a fresh, limited process.

Every run gets a new empty temporary directory (removed afterwards), an empty environment
(only ``PATH``, ``LANG`` and ``HOME``), ``python -I -S`` (standard library only, no site
packages, no user site, no ``PYTHON*`` variables) reading the code from stdin, and these
resource limits, set by a tiny launcher in the child just before it execs the code (so the
gateway never needs ``preexec_fn`` in its threaded process):

- ``RLIMIT_AS`` = ``memory_bytes`` (a huge allocation raises ``MemoryError``);
- ``RLIMIT_CPU`` = ``cpu_s`` (then ``SIGXCPU``/``SIGKILL``);
- ``RLIMIT_FSIZE`` = ``max_file_bytes`` (a bigger write fails with ``EFBIG``);
- ``RLIMIT_NOFILE`` = 64, ``RLIMIT_CORE`` = 0;
- ``RLIMIT_NPROC`` = ``max_processes``. The kernel does not enforce it for root, so when the
  gateway runs as root the launcher drops to ``nobody`` (uid/gid 65534, no supplementary
  groups) before ``exec``: then the process limit holds (a fork bomb gets ``EAGAIN``) and file
  permissions apply to the code.

A wall-clock timeout (``timeout_s``) kills the whole process group; stdout and stderr are read
concurrently and at most ``max_output_bytes`` of each is kept: past that the run is stopped.
The gateway never waits on the code in the event loop (asyncio subprocesses).

The two kinds, as measured on Linux 6.x with bubblewrap 0.8 (``tests/integration/tools``):

``bubblewrap``
    ``bwrap`` adds namespaces: its own network namespace (no interface but an isolated
    loopback: a connect to the host's 127.0.0.1 fails), its own PID namespace (the code sees
    only its own processes; when the run is killed the namespace dies with every process in
    it, even those that called ``setsid``), IPC and UTS namespaces, and its own file system
    view: ``/usr`` and the interpreter's prefix read-only, an empty root-owned ``/tmp``,
    ``/proc``, ``/dev``, and the work directory at ``/work``, the only place it can write.
    Nothing else of the host exists there (no ``/etc``, no data directory, no signing key),
    and it cannot see or signal the gateway's processes. As root, bubblewrap runs without a user
    namespace and keeps only ``CAP_SETUID``/``CAP_SETGID`` for the launcher, which drops to
    uid 65534 (all capabilities gone; bubblewrap sets ``no_new_privs``). Not root, bubblewrap
    uses a user namespace instead. The PID namespace's init reaps every process of the run.

``rlimit`` (weaker: a WARNING is logged at start-up)
    Only the resource limits, the empty environment and, as root, the uid drop isolate the
    code: it shares the host's network (it can connect anywhere the gateway can) and sees the
    whole file system as ``nobody`` would (anything world-readable: keep the data directory and
    the signing key ``0700``/``0600``); it can write wherever ``nobody`` may (``/tmp``,
    ``/dev/shm``), and such files outlive the run. Runs share uid 65534, so concurrent runs
    could signal each other. Code that calls ``setsid`` escapes the
    process-group kill; to bound that, whenever no run is active the executor kills every
    process of the sandbox uid started since the executor was created (so uid 65534 must not
    be used by anything else started later on this machine). As root the code's interpreter
    must be reachable by ``nobody``: the gateway's interpreter if it is, else the system's
    ``python3`` (the probe at construction picks it). A killed run's orphans are reparented to
    PID 1, which must reap them (a real init, e.g. ``docker run --init``/tini): unreaped
    zombies of uid 65534 would hold the process budget of every later run.

Neither kind sets a disk quota: the work directory may grow by ``max_file_bytes`` per file
for as long as the run lasts. In both kinds, as root, every run's code is uid 65534: the
``max_processes`` budget is shared by the runs going on at the same time.

Not root, the code keeps the gateway's uid in both kinds (``RLIMIT_NPROC`` then counts the
gateway user's processes, and in rlimit mode the code can read what the gateway can).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from nilai.tools.executor import Execution, SandboxKind

if TYPE_CHECKING:
    from nilai.settings import NilaiSettings

logger = logging.getLogger(__name__)

SANDBOX_UID = 65534
"""``nobody``: the uid (and gid) the code runs as when the gateway runs as root."""
MAX_OPEN_FILES = 64
WORK_MOUNT = "/work"
"""Where the work directory appears inside bubblewrap."""
CODE_PATH = "/usr/bin:/bin"

_PROBE_TIMEOUT_S = 20.0
_REAP_TIMEOUT_S = 5.0
_DRAIN_GRACE_S = 1.0
_SIGNAL_STATUS = range(129, 129 + 64)
"""bwrap exits with 128 + N when the code was killed by signal N."""

# The launcher: sets the limits, drops to the sandbox uid if asked, and becomes the code's
# interpreter. argv: uid gid python NAME=VALUE... (uid "-" = keep).
_LAUNCHER = """\
import os, resource, sys
uid, gid, python = sys.argv[1], sys.argv[2], sys.argv[3]
for item in sys.argv[4:]:
    name, value = item.split("=")
    resource.setrlimit(getattr(resource, name), (int(value), int(value)))
if uid != "-":
    os.setgroups([])
    os.setgid(int(gid))
    os.setuid(int(uid))
os.execv(python, [python, "-I", "-S", "-"])
"""


class SandboxUnavailable(RuntimeError):
    """The sandbox the settings ask for cannot run on this machine (a start-up error)."""


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """What one run may use."""

    timeout_s: float = 10.0
    max_output_bytes: int = 64 * 1024
    """Kept of stdout, and again of stderr; more stops the run."""
    memory_bytes: int = 512 * 1024 * 1024
    cpu_s: int = 10
    max_processes: int = 16
    max_file_bytes: int = 16 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings: NilaiSettings) -> SandboxLimits:
        """The limits the gateway's settings configure."""
        return cls(
            timeout_s=settings.tool_timeout_s,
            max_output_bytes=settings.tool_max_output_bytes,
            memory_bytes=settings.sandbox_memory_bytes,
            cpu_s=settings.sandbox_cpu_s,
            max_processes=settings.sandbox_max_processes,
            max_file_bytes=settings.sandbox_max_file_bytes,
        )

    def rlimits(self) -> dict[str, int]:
        """The ``resource`` limits the launcher sets (soft = hard), by ``RLIMIT_*`` name."""
        return {
            "RLIMIT_AS": self.memory_bytes,
            "RLIMIT_CPU": self.cpu_s,
            "RLIMIT_FSIZE": self.max_file_bytes,
            "RLIMIT_NOFILE": MAX_OPEN_FILES,
            "RLIMIT_NPROC": self.max_processes,
            "RLIMIT_CORE": 0,
        }


@dataclass(frozen=True, slots=True)
class SandboxPlan:
    """How runs are started: which kind, which programs, as whom."""

    kind: Literal["bubblewrap", "rlimit"]
    launcher_python: str
    """The interpreter that runs the launcher (the gateway's own, resolved)."""
    code_python: str
    """The interpreter the code runs in (reachable by the sandbox uid)."""
    python_prefix: str
    """Bound read-only into bubblewrap (``sys.base_prefix``)."""
    drop_to: int | None
    """The uid and gid to become before ``exec`` (``None``: keep the gateway's)."""
    bwrap: str | None = None

    def environment(self, workdir: Path) -> dict[str, str]:
        """The code's whole environment."""
        home = WORK_MOUNT if self.kind == "bubblewrap" else str(workdir)
        return {"PATH": CODE_PATH, "LANG": "C.UTF-8", "HOME": home}

    def command(self, limits: SandboxLimits, workdir: Path) -> list[str]:
        """The argv that runs the code (read from stdin) in ``workdir``."""
        drop = "-" if self.drop_to is None else str(self.drop_to)
        launcher = [
            self.launcher_python,
            "-I",
            "-S",
            "-c",
            _LAUNCHER,
            drop,
            drop,
            self.code_python,
            *(f"{name}={value}" for name, value in limits.rlimits().items()),
        ]
        if self.kind == "rlimit":
            return launcher
        if self.bwrap is None:
            raise SandboxUnavailable("a bubblewrap plan needs the bwrap program")
        return [self.bwrap, *self._bwrap_options(workdir), "--", *launcher]

    def _bwrap_options(self, workdir: Path) -> list[str]:
        options = [
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
        ]
        if self.drop_to is not None:
            # Root without a user namespace: the launcher needs these two to become nobody
            # (a real uid, so RLIMIT_NPROC holds); they vanish with the setuid.
            options += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            options.append("--unshare-user")
        for name, value in self.environment(workdir).items():
            options += ["--setenv", name, value]
        options += ["--ro-bind", "/usr", "/usr"]
        for top in ("bin", "sbin", "lib", "lib32", "lib64"):
            host = Path("/") / top
            if host.is_symlink():
                options += ["--symlink", os.readlink(host), str(host)]
            elif host.is_dir():
                options += ["--ro-bind", str(host), str(host)]
        prefix = Path(self.python_prefix)
        if not _is_within(prefix, Path("/usr")):
            # bwrap copies the modes of the host's parent directories (/root is 0700): make
            # them traversable so that nobody reaches the interpreter.
            for parent in reversed(prefix.parents[:-1]):
                options += ["--perms", "0755", "--dir", str(parent)]
            options += ["--ro-bind", str(prefix), str(prefix)]
        options += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",  # noqa: S108 - the sandbox's own empty tmpfs
            "--bind",
            str(workdir),
            WORK_MOUNT,
            "--chdir",
            WORK_MOUNT,
        ]
        return options


@dataclass
class _Capture:
    """One output stream, kept up to ``limit`` bytes."""

    limit: int
    chunks: list[bytes] = field(default_factory=list[bytes])
    size: int = 0
    over: bool = False

    def add(self, chunk: bytes) -> bool:
        """Keep what fits; ``True`` once the stream went past the limit."""
        room = self.limit - self.size
        if len(chunk) > room:
            self.over = True
            chunk = chunk[: max(room, 0)]
        self.chunks.append(chunk)
        self.size += len(chunk)
        return self.over

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", errors="replace")


class LocalExecutor:
    """Runs each call in a fresh sandboxed process on this machine (see the module docstring)."""

    def __init__(
        self,
        limits: SandboxLimits,
        *,
        sandbox: Literal["auto", "bubblewrap", "rlimit"] = "auto",
        bwrap: str | None = None,
        work_root: Path | None = None,
    ) -> None:
        """Choose and probe the sandbox once; raise ``SandboxUnavailable`` if none works.

        ``bwrap``: the program to use (default: ``bwrap`` on ``PATH``); ``work_root``: where
        the per-run directories are made (default: the system's temporary directory).
        """
        self.limits = limits
        self._work_root = work_root
        self._running: set[int] = set()
        """The process group ids of the runs going on."""
        self._active = 0
        self._closed = False
        self._started_ticks = boot_ticks()
        self._plan = _choose_plan(sandbox, bwrap, work_root)
        if self._plan.kind == "bubblewrap":
            logger.info("code executor: bubblewrap sandbox active (%s)", self._plan.bwrap)
        else:
            logger.warning(
                "code executor: only the rlimit sandbox is active: resource limits isolate the "
                "code, with no network or file system isolation (install bubblewrap)"
            )

    @property
    def kind(self) -> SandboxKind:
        """``bubblewrap`` or ``rlimit``."""
        return self._plan.kind

    @property
    def plan(self) -> SandboxPlan:
        """How runs are started (for diagnostics and tests)."""
        return self._plan

    async def run(self, code: str) -> Execution:
        """Run ``code`` once in a fresh process and directory; never raises for what it does."""
        if self._closed:
            return Execution("", "The code executor is shut down.", exit_code=None)
        self._active += 1
        try:
            workdir = await asyncio.to_thread(_make_workdir, self._work_root, self._plan.drop_to)
            try:
                return await self._run_in(workdir, code)
            finally:
                await asyncio.to_thread(_remove_tree, workdir)
        finally:
            self._active -= 1
            if self._active == 0 and self._plan.kind == "rlimit" and self._plan.drop_to:
                await asyncio.to_thread(_sweep_uid, self._plan.drop_to, self._started_ticks)

    async def aclose(self) -> None:
        """Kill every run still going; later calls run nothing."""
        self._closed = True
        for pid in list(self._running):
            _kill_group(pid)

    async def _run_in(self, workdir: Path, code: str) -> Execution:
        loop = asyncio.get_running_loop()
        limit = self.limits.max_output_bytes
        transport, run = await loop.subprocess_exec(
            lambda: _RunProtocol(limit),
            *self._plan.command(self.limits, workdir),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._plan.environment(workdir),
            cwd=workdir,
            start_new_session=True,
        )
        pid = transport.get_pid()
        self._running.add(pid)
        if self._closed:  # aclose() ran while this one was starting
            _kill_group(pid)
        timed_out = False
        try:
            # stdin=PIPE: a write transport (uvloop's are not asyncio.WriteTransport
            # subclasses, so no isinstance check). Buffered by the transport and flushed by
            # close(); python reads all of its program before running it. A code that died
            # early just discards the rest.
            stdin = cast(asyncio.WriteTransport, transport.get_pipe_transport(0))
            stdin.write(code.encode("utf-8", errors="replace"))
            stdin.close()
            async with asyncio.timeout(self.limits.timeout_s):
                await _first(run.exited.wait(), run.overflow.wait())
            if not run.overflow.is_set():
                # The code's process is gone; what it left in its group would keep the pipes
                # open: stop that, then read what is left. A process that left the group
                # (rlimit mode) may hold them open: it gets a short grace, not the timeout.
                _kill_group(pid)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_DRAIN_GRACE_S):
                        await _first(run.drained.wait(), run.overflow.wait())
        except TimeoutError:
            timed_out = True
        finally:
            _kill_group(pid)
            self._running.discard(pid)
            # Let the child watcher reap it (SIGKILL is prompt) before the transport closes.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_REAP_TIMEOUT_S):
                    await run.exited.wait()
            transport.close()
        truncated = run.out.over or run.err.over
        returncode = transport.get_returncode()
        by_signal = returncode is None or returncode < 0
        if self._plan.kind == "bubblewrap" and returncode in _SIGNAL_STATUS:
            by_signal = True
        exit_code = None if timed_out or truncated or by_signal else returncode
        return Execution(
            run.out.text(),
            run.err.text(),
            exit_code=exit_code,
            timed_out=timed_out,
            truncated=truncated,
        )


class _RunProtocol(asyncio.SubprocessProtocol):
    """Collects one run's output up to the cap, dropping (never buffering) the rest."""

    def __init__(self, limit: int) -> None:
        self.out = _Capture(limit)
        self.err = _Capture(limit)
        self.overflow = asyncio.Event()
        self.exited = asyncio.Event()
        self.drained = asyncio.Event()
        self._open_pipes = {1, 2}

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        capture = self.out if fd == 1 else self.err
        if isinstance(data, str):
            data = data.encode()
        if not capture.over and capture.add(data):
            self.overflow.set()

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open_pipes.discard(fd)
        if not self._open_pipes:
            self.drained.set()

    def process_exited(self) -> None:
        self.exited.set()


async def _first(*waits: Coroutine[Any, Any, object]) -> None:
    """Wait until the first of ``waits`` finishes; cancel the others."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _choose_plan(
    sandbox: Literal["auto", "bubblewrap", "rlimit"], bwrap: str | None, work_root: Path | None
) -> SandboxPlan:
    """The plan for ``sandbox``, probed: the first that really runs code."""
    launcher_python = os.path.realpath(sys.executable)
    drop_to = SANDBOX_UID if os.geteuid() == 0 else None
    reasons: list[str] = []
    if sandbox in ("auto", "bubblewrap"):
        program = bwrap or shutil.which("bwrap")
        if program is None:
            reasons.append("bwrap was not found on PATH")
        else:
            plan = SandboxPlan(
                "bubblewrap",
                launcher_python,
                launcher_python,
                sys.base_prefix,
                drop_to,
                bwrap=program,
            )
            problem = probe(plan, work_root)
            if problem is None:
                return plan
            reasons.append(f"bwrap does not work here: {problem}")
        if sandbox == "bubblewrap":
            raise SandboxUnavailable(
                "NILAI_SANDBOX=bubblewrap but "
                + "; ".join(reasons)
                + " (install bubblewrap, allow it namespaces, or choose another sandbox)"
            )
        logger.info("code executor: bubblewrap unusable (%s)", "; ".join(reasons))
    candidates = [launcher_python]
    if drop_to is not None:
        system = shutil.which("python3", path=CODE_PATH)
        if system is not None and os.path.realpath(system) != launcher_python:
            candidates.append(os.path.realpath(system))
    for code_python in candidates:
        plan = SandboxPlan("rlimit", launcher_python, code_python, sys.base_prefix, drop_to)
        problem = probe(plan, work_root)
        if problem is None:
            return plan
        reasons.append(f"rlimit with {code_python}: {problem}")
    raise SandboxUnavailable("no sandbox can run code here: " + "; ".join(reasons))


def probe(plan: SandboxPlan, work_root: Path | None = None) -> str | None:
    """Run a one-line program with ``plan``: ``None`` if it works, else why not.

    Blocking and quick (one short process): meant for start-up only.
    """
    limits = SandboxLimits(timeout_s=_PROBE_TIMEOUT_S)
    workdir = _make_workdir(work_root, plan.drop_to)
    try:
        done = subprocess.run(  # noqa: S603 - our own argv, no shell
            plan.command(limits, workdir),
            input=b"print(6 * 7)\n",
            capture_output=True,
            env=plan.environment(workdir),
            cwd=workdir,
            timeout=_PROBE_TIMEOUT_S,
            start_new_session=True,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        _remove_tree(workdir)
    if done.returncode == 0 and done.stdout == b"42\n":
        return None
    detail = done.stderr.decode("utf-8", errors="replace").strip().splitlines()[-1:]
    return f"exit status {done.returncode}" + (f" ({detail[0]})" if detail else "")


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _make_workdir(work_root: Path | None, owner: int | None) -> Path:
    path = Path(tempfile.mkdtemp(prefix="nilai-run-", dir=work_root))
    if owner is not None:
        os.chown(path, owner, owner)
    return path


def _remove_tree(path: Path) -> None:
    def make_writable(function: Callable[..., object], failed: str, exc: BaseException) -> None:
        # The code may have made a directory unreadable: the gateway cleans up regardless.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o700)
            os.chmod(failed, 0o700)
            function(failed)

    shutil.rmtree(path, onexc=make_writable)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _kill_group(pid: int) -> None:
    """SIGKILL the run's process group (its leader, ``pid``, is the launcher or bwrap)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def boot_ticks() -> int:
    """Now, in the clock ticks since boot that ``/proc/<pid>/stat`` start times use."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def sandbox_processes(uid: int, since_ticks: int = 0, *, zombies: bool = False) -> list[int]:
    """Processes of ``uid`` started at or after ``since_ticks``.

    ``zombies``: count dead, unreaped ones too (they hold ``RLIMIT_NPROC`` slots until reaped).
    """
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        dead = fields[0] in (b"Z", b"X")
        if (dead and not zombies) or int(fields[19]) < since_ticks:
            continue
        found.append(int(entry.name))
    return found


def _sweep_uid(uid: int, since_ticks: int, rounds: int = 20) -> None:
    """Kill what runs left behind as ``uid`` (rlimit mode: ``setsid`` escapes the group)."""
    for _ in range(rounds):
        pids = sandbox_processes(uid, since_ticks)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
