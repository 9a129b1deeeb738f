"""Subprocesses (fake model servers, gateways) and what ``/proc`` tells about them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
NILAI = Path(sys.executable).parent / "nilai"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_GRACE_S = 5.0
# /proc/<pid>/stat fields after the command name: ppid is the 2nd, utime..cstime the 12th..15th.
PPID = 1
CPU_TIMES = slice(11, 15)


@dataclass
class Service:
    """One started process and where it listens."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The process id (``taskset`` execs the command, so it is the server itself)."""
        return self.process.pid

    def tail(self, chars: int = 3000) -> str:
        """The end of the process's log, for error messages."""
        return self.log.read_text(errors="replace")[-chars:]


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(name: str, argv: list[str], env: dict[str, str], cpus: str, log: Path) -> Service:
    """Start ``argv`` pinned to ``cpus`` in its own session, output to ``log``."""
    port = argv[argv.index("--port") + 1]
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 - fixed argv built here, no shell
            ["taskset", "-c", cpus, *argv],  # noqa: S607 - taskset from PATH (util-linux)
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Service(name, process, f"http://127.0.0.1:{port}", log)


def spawn_fake(name: str, token_delay_s: float, cpus: str, log_dir: Path) -> Service:
    """Start the fake model server (``ready_fake`` waits for it)."""
    argv = [
        sys.executable,
        "-m",
        "tests.fakes.fake_openai_server",
        "--port",
        str(free_port()),
        "--name",
        name,
        "--token-delay",
        str(token_delay_s),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return spawn(name, argv, env, cpus, log_dir / f"{name}.log")


def ready_fake(service: Service, tokens: int) -> None:
    """Wait for the fake server, then set its stream length over ``POST /_control``.

    The fake has no command-line flag for the token count, but its control endpoint sets any
    ``FakeConfig`` field; each stream then carries ``tokens + 1`` content chunks.
    """
    wait_ready(service, f"{service.url}/health", {})
    response = httpx.post(f"{service.url}/_control", json={"tokens": tokens}, timeout=5)
    response.raise_for_status()


def spawn_gateway(
    name: str, env: dict[str, str], cpu: str, log_dir: Path, *, workers: int = 1
) -> Service:
    """Start ``nilai api`` pinned to ``cpu`` (a ``taskset`` list; ``ready_gateway`` waits).

    ``workers`` > 1 runs ``nilai api --workers N``: a supervisor and N worker processes.
    """
    argv = [str(NILAI), "api", "--port", str(free_port())]
    if workers > 1:
        argv += ["--workers", str(workers)]
    return spawn(name, argv, {**os.environ, **env}, cpu, log_dir / f"{name}.log")


def ready_gateway(service: Service, api_key: str) -> None:
    """Wait until the gateway lists the fake model."""
    auth = {"Authorization": f"Bearer {api_key}"}
    wait_ready(service, f"{service.url}/v1/models", auth, expect=b'"fake-model"')


def wait_ready(
    service: Service, url: str, headers: dict[str, str], expect: bytes = b"", timeout_s: float = 60
) -> None:
    """Poll ``url`` until it answers 200 (containing ``expect``), or fail with the log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited:\n{service.tail()}")
        with contextlib.suppress(httpx.TransportError):
            response = httpx.get(url, headers=headers, timeout=2)
            if response.status_code == httpx.codes.OK and expect in response.content:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{service.name} not ready after {timeout_s}s:\n{service.tail()}")


def stop(service: Service) -> None:
    """SIGTERM the service's process group, then SIGKILL it if it lingers."""
    if service.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(service.pid, signal.SIGTERM)
    try:
        service.process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.pid, signal.SIGKILL)
        service.process.wait(timeout=STOP_GRACE_S)


# /proc


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after ``(comm)``, or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (scans ``/proc`` for parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            children.setdefault(int(fields[PPID]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(tree: list[int]) -> float:
    """User + system CPU of a process tree (from ``descendants``), reaped children included."""
    return sum(cpu_by_process(tree).values())


def cpu_by_process(tree: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each process in ``tree`` (its reaped children included)."""
    seconds: dict[int, float] = {}
    for member in tree:
        fields = _stat_fields(member)
        if fields:
            seconds[member] = sum(int(value) for value in fields[CPU_TIMES]) / CLOCK_TICKS
    return seconds


def memory_kb(tree: list[int]) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) summed over a process tree, in kB."""
    totals = {"VmRSS": 0, "VmHWM": 0}
    for member in tree:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in totals:
                    totals[key] += int(value.split()[0])
    return totals


def reset_peak_rss(tree: list[int]) -> bool:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5, Linux 4.0+); False if refused."""
    try:
        for member in tree:
            Path(f"/proc/{member}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo``."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown"


def load_average() -> str:
    """The 1/5/15-minute load averages, to show what else ran on the machine."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
