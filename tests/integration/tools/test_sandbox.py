"""The local code executor on real processes, for each sandbox kind this machine can run.

Each case runs for ``bubblewrap`` and ``rlimit`` (bubblewrap cases skip where ``bwrap`` is
missing); where the two kinds differ on purpose (network, what a file path shows), the test
states both outcomes, so the weaker mode's guarantees are measured rather than assumed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pytest
import uvloop

from nilai.tools.executor import Execution
from nilai.tools.sandbox import (
    SANDBOX_UID,
    LocalExecutor,
    SandboxLimits,
    SandboxUnavailable,
    boot_ticks,
    sandbox_processes,
)
from tests.support.servers import wait_until, wait_until_async

pytestmark = pytest.mark.integration

Kind = Literal["bubblewrap", "rlimit"]
LIMITS = SandboxLimits(
    timeout_s=20.0,
    max_output_bytes=64 * 1024,
    memory_bytes=512 * 1024 * 1024,
    cpu_s=20,
    max_processes=16,
    max_file_bytes=1024 * 1024,
)
AS_ROOT = os.geteuid() == 0

KINDS: list[Kind] = ["bubblewrap", "rlimit"]


@functools.cache
def bubblewrap_works() -> bool:
    """Whether bubblewrap is installed and can run a sandbox here (some hosts forbid it)."""
    if shutil.which("bwrap") is None:
        return False
    try:
        LocalExecutor(LIMITS, sandbox="bubblewrap")
    except SandboxUnavailable:
        return False
    return True


MakeExecutor = Callable[..., LocalExecutor]


@pytest.fixture
def work_root() -> Iterator[Path]:
    """Where the runs' directories go: under /tmp and traversable, as the dropped uid needs."""
    root = Path(tempfile.mkdtemp(prefix="nilai-sandbox-test-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def make_executor(kind: Kind, work_root: Path) -> AsyncIterator[MakeExecutor]:
    """Executors of the test's kind, with ``LIMITS`` changed as asked; all closed afterwards."""
    made: list[LocalExecutor] = []

    def make(**changes: Any) -> LocalExecutor:
        executor = LocalExecutor(replace(LIMITS, **changes), sandbox=kind, work_root=work_root)
        assert executor.kind == kind
        made.append(executor)
        return executor

    yield make
    for executor in made:
        await executor.aclose()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> Kind:
    if request.param == "bubblewrap" and not bubblewrap_works():
        pytest.skip("bubblewrap is not installed or cannot run a sandbox on this host")
    return request.param


def test_runs_under_uvloop_as_the_gateway_serves(kind: Kind, work_root: Path):
    # The gateway's event loop is uvloop's, whose pipe transports are not asyncio's classes.
    executor = LocalExecutor(replace(LIMITS, timeout_s=2.0), sandbox=kind, work_root=work_root)

    async def run() -> list[Execution]:
        try:
            return [await executor.run("print(6*7)"), await executor.run("while True: pass")]
        finally:
            await executor.aclose()

    quick, looping = uvloop.run(run())
    assert (quick.stdout, quick.exit_code) == ("42\n", 0)
    assert looping.timed_out


def _no_run_processes_left(since: int) -> bool:
    return not sandbox_processes(SANDBOX_UID, since, zombies=True)


def _wait_for_no_leftovers(since: int) -> None:
    """Every process the runs started since ``since`` is gone (reaped); only checkable as root,
    where the code runs as its own uid."""
    if AS_ROOT:
        wait_until(lambda: _no_run_processes_left(since), what="the run's processes to go")


async def test_print_runs_and_exits_cleanly(make_executor: MakeExecutor):
    result = await make_executor().run("print(6*7)")
    assert (result.stdout, result.stderr, result.exit_code) == ("42\n", "", 0)
    assert (result.timed_out, result.truncated) == (False, False)


async def test_exit_status_and_traceback_come_back(make_executor: MakeExecutor):
    result = await make_executor().run("import sys\nprint('partial')\nsys.exit(3)")
    assert (result.stdout, result.exit_code) == ("partial\n", 3)
    failed = await make_executor().run("1 / 0")
    assert failed.exit_code == 1
    assert failed.stderr.endswith("ZeroDivisionError: division by zero\n")


async def test_infinite_loop_is_killed_within_timeout_plus_one_second(
    make_executor: MakeExecutor,
):
    executor = make_executor(timeout_s=1.0)
    since = boot_ticks()
    started = time.monotonic()
    result = await executor.run("while True: pass")
    # The one timing assertion in the suite: issue 20's acceptance line is "killed within
    # timeout + 1 s".
    assert time.monotonic() - started < 1.0 + 1.0
    assert (result.timed_out, result.exit_code) == (True, None)
    assert result.for_model() == "[killed: time limit reached]"
    _wait_for_no_leftovers(since)


@pytest.mark.skipif(not AS_ROOT, reason="the process limit holds only for the dropped uid")
async def test_fork_bomb_is_contained_and_leaves_no_process(make_executor: MakeExecutor):
    since = boot_ticks()
    result = await make_executor(timeout_s=10.0).run("import os\nwhile True: os.fork()")
    assert result.timed_out is False
    assert "BlockingIOError: [Errno 11] Resource temporarily unavailable" in result.stderr
    _wait_for_no_leftovers(since)
    again = await make_executor().run("print('still fine')")
    assert again.stdout == "still fine\n"


@pytest.mark.skipif(not AS_ROOT, reason="processes are found by the dropped uid")
async def test_a_process_that_leaves_the_group_does_not_outlive_the_run(
    make_executor: MakeExecutor,
):
    since = boot_ticks()
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(600)\n"
        "print('parent done')\n"
    )
    result = await make_executor().run(code)
    assert (result.stdout, result.exit_code) == ("parent done\n", 0)
    _wait_for_no_leftovers(since)


async def test_ten_gigabyte_allocation_fails_and_the_gateway_carries_on(
    make_executor: MakeExecutor,
):
    executor = make_executor()
    result = await executor.run("b = bytearray(10 * 1024**3)\nprint('allocated')")
    assert result.stdout == ""
    assert result.stderr.endswith("MemoryError\n")
    assert result.exit_code == 1
    assert (await executor.run("print(len(bytearray(1024)))")).stdout == "1024\n"


async def test_environment_is_empty_of_gateway_variables(
    make_executor: MakeExecutor, kind: Kind, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("NILAI_SIGNING_KEY_PASSPHRASE", "do-not-leak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak-either")
    code = "import os\nprint(sorted(os.environ))\nprint(os.environ['PATH'], os.environ['LANG'])"
    result = await make_executor().run(code)
    names = {"bubblewrap": "['HOME', 'LANG', 'PATH', 'PWD']", "rlimit": "['HOME', 'LANG', 'PATH']"}
    assert result.stdout == f"{names[kind]}\n/usr/bin:/bin C.UTF-8\n"
    assert "do-not-leak" not in result.stdout


@pytest.mark.skipif(not AS_ROOT, reason="the code keeps the gateway's uid when not root")
async def test_cannot_read_the_gateways_signing_key(
    make_executor: MakeExecutor, kind: Kind, tmp_path: Path
):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    key = data_dir / "signing.key"
    key.write_text("-----BEGIN EC PRIVATE KEY-----\n")
    key.chmod(0o600)
    code = (
        "import os\n"
        f"path = {str(key)!r}\n"
        "try:\n"
        "    print(open(path).read())\n"
        "except OSError as error:\n"
        "    print(type(error).__name__, os.path.exists(path), os.path.exists('/etc/hostname'))\n"
    )
    result = await make_executor().run(code)
    expected = {
        # bubblewrap: the host's directories are not there at all
        "bubblewrap": "FileNotFoundError False False\n",
        # rlimit: the path exists, but nobody may not enter the 0700 directory
        "rlimit": "PermissionError False True\n",
    }
    assert result.stdout == expected[kind]
    assert "BEGIN" not in result.stdout


@pytest.mark.skipif(not AS_ROOT, reason="the code keeps the gateway's uid when not root")
async def test_cannot_signal_the_gateway(make_executor: MakeExecutor, kind: Kind):
    code = (
        "import os\n"
        "try:\n"
        f"    os.kill({os.getpid()}, 0)\n"
        "    print('can signal')\n"
        "except OSError as error:\n"
        "    print(type(error).__name__)\n"
    )
    result = await make_executor().run(code)
    # bubblewrap: the gateway is outside the code's PID namespace; rlimit: another uid
    expected = {"bubblewrap": "ProcessLookupError\n", "rlimit": "PermissionError\n"}
    assert result.stdout == expected[kind]


async def test_loopback_connect(make_executor: MakeExecutor, kind: Kind):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=5).close()\n"
            "    print('connected')\n"
            "except OSError as error:\n"
            "    print(type(error).__name__)\n"
        )
        result = await make_executor().run(code)
    # bubblewrap has its own network namespace; the rlimit sandbox has no network isolation
    expected = {"bubblewrap": "ConnectionRefusedError\n", "rlimit": "connected\n"}
    assert result.stdout == expected[kind]


async def test_hundred_megabyte_print_is_capped_and_stopped(make_executor: MakeExecutor):
    executor = make_executor(max_output_bytes=4096)
    since = boot_ticks()
    result = await executor.run('print("x" * 100_000_000)\nprint("never")')
    assert result.truncated is True
    assert result.stdout == "x" * 4096
    assert (result.exit_code, result.timed_out) == (None, False)
    assert result.for_model().endswith("[output truncated]\n[killed: resource limit reached]")
    _wait_for_no_leftovers(since)


async def test_stderr_is_capped_too(make_executor: MakeExecutor):
    executor = make_executor(max_output_bytes=1024)
    result = await executor.run("import sys\nsys.stderr.write('e' * 50_000)\nprint('out')")
    assert result.truncated is True
    assert result.stderr == "e" * 1024


async def test_output_is_decoded_with_replacement(make_executor: MakeExecutor):
    result = await make_executor().run("import sys\nsys.stdout.buffer.write(b'ok \\xff\\n')")
    assert result.stdout == "ok \ufffd\n"


async def test_writing_past_the_file_size_limit_fails(make_executor: MakeExecutor):
    code = (
        "try:\n"
        "    with open('big', 'wb') as f:\n"
        "        f.write(b'x' * (1024 * 1024 + 1))\n"
        "except OSError as error:\n"
        "    print(error.errno)\n"
        "import os\n"
        "print(os.path.getsize('big'))\n"
    )
    result = await make_executor(max_file_bytes=1024 * 1024).run(code)
    assert result.stdout == f"27\n{1024 * 1024}\n"  # EFBIG; the file stops at the limit
    assert result.exit_code == 0


async def test_open_files_are_limited(make_executor: MakeExecutor):
    code = (
        "files = []\n"
        "try:\n"
        "    while True:\n"
        "        files.append(open('/dev/null'))\n"
        "except OSError as error:\n"
        "    print(error.errno, len(files) < 64)\n"
    )
    result = await make_executor().run(code)
    assert result.stdout == "24 True\n"  # EMFILE


async def test_concurrent_runs_each_get_their_own_result(make_executor: MakeExecutor):
    executor = make_executor()
    code = (
        "import os\n"
        "open('mine', 'w').write('{n}')\n"
        "print({n} * {n}, os.listdir('.'), open('mine').read())"
    )
    results = await asyncio.gather(*(executor.run(code.format(n=n)) for n in range(5)))
    assert [r.stdout for r in results] == [f"{n * n} ['mine'] {n}\n" for n in range(5)]


async def test_each_run_starts_in_an_empty_directory_removed_afterwards(
    make_executor: MakeExecutor, work_root: Path
):
    executor = make_executor()
    first = await executor.run("import os\nprint(os.listdir('.'))\nopen('left', 'w').write('x')")
    second = await executor.run("import os\nprint(os.listdir('.'))")
    assert (first.stdout, second.stdout) == ("[]\n", "[]\n")
    assert list(work_root.iterdir()) == []


async def test_aclose_stops_a_run_in_progress(make_executor: MakeExecutor):
    executor = make_executor(timeout_s=60.0)
    run = asyncio.ensure_future(executor.run("print('started', flush=True)\nwhile True: pass"))
    if AS_ROOT:
        await wait_until_async(_any_sandbox_process, what="the run to start")
    await executor.aclose()
    result = await asyncio.wait_for(run, timeout=30)
    assert (result.timed_out, result.exit_code) == (False, None)
    after = await executor.run("print(1)")
    assert after.exit_code is None
    assert after.stderr == "The code executor is shut down."


async def _any_sandbox_process() -> bool:
    return bool(sandbox_processes(SANDBOX_UID))


async def test_logs_name_the_kind_and_never_the_code_or_its_output(
    make_executor: MakeExecutor, kind: Kind, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG, logger="nilai.tools.sandbox")
    executor = make_executor()
    result = await executor.run("print('private-marker-' + 'output')  # private-marker-code")
    assert result.stdout == "private-marker-output\n"
    assert "private-marker" not in caplog.text
    levels = {r.levelname for r in caplog.records if "sandbox is active" in r.getMessage()}
    assert levels == ({"WARNING"} if kind == "rlimit" else set())
    active = [r.getMessage() for r in caplog.records if "active" in r.getMessage()]
    assert any(kind in message for message in active)


def test_asking_for_bubblewrap_without_it_is_a_startup_error(tmp_path: Path):
    with pytest.raises(SandboxUnavailable, match="bwrap"):
        LocalExecutor(LIMITS, sandbox="bubblewrap", bwrap=str(tmp_path / "no-bwrap"))


def test_auto_prefers_bubblewrap_when_it_works(work_root: Path):
    executor = LocalExecutor(LIMITS, sandbox="auto", work_root=work_root)
    assert executor.kind == ("bubblewrap" if bubblewrap_works() else "rlimit")
