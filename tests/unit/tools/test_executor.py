"""The pure parts of code execution: what the model reads, the limits, the sandbox commands."""

from __future__ import annotations

from pathlib import Path

import pytest

from nilai.settings import NilaiSettings
from nilai.tools.executor import DisabledExecutor, Execution, RecordingExecutor
from nilai.tools.sandbox import SandboxLimits, SandboxPlan

WORKDIR = Path("/srv/runs/nilai-run-abc")
LIMITS = SandboxLimits(
    timeout_s=3.0,
    max_output_bytes=2048,
    memory_bytes=128 * 1024 * 1024,
    cpu_s=2,
    max_processes=8,
    max_file_bytes=4096,
)


def _plan(
    kind: str = "bubblewrap", *, drop_to: int | None = 65534, prefix: str = "/opt/py/3.12"
) -> SandboxPlan:
    if kind == "rlimit":
        return SandboxPlan(
            "rlimit", "/opt/py/3.12/bin/python3.12", "/usr/bin/python3", prefix, drop_to
        )
    return SandboxPlan(
        "bubblewrap",
        "/opt/py/3.12/bin/python3.12",
        "/opt/py/3.12/bin/python3.12",
        prefix,
        drop_to,
        bwrap="/usr/bin/bwrap",
    )


def _option_values(argv: list[str], option: str) -> list[str]:
    """The value after each occurrence of ``option`` in ``argv``."""
    return [argv[i + 1] for i, item in enumerate(argv) if item == option]


@pytest.mark.parametrize(
    ("execution", "expected"),
    [
        (Execution("42\n", "", exit_code=0), "42\n"),
        (Execution("", "", exit_code=0), ""),
        (Execution("a\n", "boom\n", exit_code=1), "a\n\n[stderr]\nboom\n\n[exit status 1]"),
        (Execution("", "", exit_code=None, timed_out=True), "[killed: time limit reached]"),
        (
            Execution("", "MemoryError\n", exit_code=None),
            "[stderr]\nMemoryError\n\n[killed: resource limit reached]",
        ),
        (
            Execution("xxxx", "", exit_code=None, truncated=True),
            "xxxx\n[output truncated]\n[killed: resource limit reached]",
        ),
    ],
)
def test_for_model_reports_output_and_how_the_run_ended(execution: Execution, expected: str):
    assert execution.for_model() == expected


def test_limits_from_settings_take_every_sandbox_setting():
    settings = NilaiSettings(
        tool_timeout_s=2.5,
        tool_max_output_bytes=4096,
        sandbox_memory_bytes=256 * 1024 * 1024,
        sandbox_cpu_s=3,
        sandbox_max_processes=5,
        sandbox_max_file_bytes=1000,
    )
    assert SandboxLimits.from_settings(settings) == SandboxLimits(
        timeout_s=2.5,
        max_output_bytes=4096,
        memory_bytes=256 * 1024 * 1024,
        cpu_s=3,
        max_processes=5,
        max_file_bytes=1000,
    )


def test_rlimits_name_each_kernel_limit():
    assert LIMITS.rlimits() == {
        "RLIMIT_AS": 128 * 1024 * 1024,
        "RLIMIT_CPU": 2,
        "RLIMIT_FSIZE": 4096,
        "RLIMIT_NOFILE": 64,
        "RLIMIT_NPROC": 8,
        "RLIMIT_CORE": 0,
    }


def test_rlimit_command_is_the_launcher_alone():
    argv = _plan("rlimit").command(LIMITS, WORKDIR)
    assert argv[:4] == ["/opt/py/3.12/bin/python3.12", "-I", "-S", "-c"]
    # after the launcher's source: uid, gid, the code's interpreter, then the limits
    assert argv[5:] == [
        "65534",
        "65534",
        "/usr/bin/python3",
        "RLIMIT_AS=134217728",
        "RLIMIT_CPU=2",
        "RLIMIT_FSIZE=4096",
        "RLIMIT_NOFILE=64",
        "RLIMIT_NPROC=8",
        "RLIMIT_CORE=0",
    ]
    assert "bwrap" not in " ".join(argv)


def test_launcher_keeps_the_uid_when_not_root():
    argv = _plan("rlimit", drop_to=None).command(LIMITS, WORKDIR)
    assert argv[5:7] == ["-", "-"]


def test_environment_is_three_variables():
    assert _plan("rlimit").environment(WORKDIR) == {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(WORKDIR),
    }
    assert _plan().environment(WORKDIR)["HOME"] == "/work"


def test_bubblewrap_command_as_root_isolates_and_drops_to_nobody():
    argv = _plan().command(LIMITS, WORKDIR)
    assert argv[0] == "/usr/bin/bwrap"
    separator = argv.index("--")
    options, launcher = argv[1:separator], argv[separator + 1 :]
    for flag in (
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
    ):
        assert flag in options
    # no user namespace as root: the launcher becomes a real non-root uid, so RLIMIT_NPROC holds
    assert "--unshare-user" not in options
    assert _option_values(options, "--cap-add") == ["CAP_SETUID", "CAP_SETGID"]
    assert _option_values(options, "--bind") == [str(WORKDIR)]
    assert options[options.index("--bind") + 2] == "/work"
    assert _option_values(options, "--chdir") == ["/work"]
    assert _option_values(options, "--setenv") == ["PATH", "LANG", "HOME"]
    ro_binds = _option_values(options, "--ro-bind")
    assert "/usr" in ro_binds
    assert "/opt/py/3.12" in ro_binds
    # the interpreter's parents are made traversable for nobody, outermost first
    assert _option_values(options, "--dir") == ["/opt", "/opt/py"]
    assert _option_values(options, "--perms") == ["0755", "0755"]
    assert launcher[:4] == ["/opt/py/3.12/bin/python3.12", "-I", "-S", "-c"]
    assert launcher[5:8] == ["65534", "65534", "/opt/py/3.12/bin/python3.12"]


def test_bubblewrap_command_not_root_uses_a_user_namespace():
    options = _plan(drop_to=None).command(LIMITS, WORKDIR)
    assert "--unshare-user" in options
    assert "--cap-add" not in options


def test_bubblewrap_does_not_bind_an_interpreter_under_usr_twice():
    options = _plan(prefix="/usr").command(LIMITS, WORKDIR)
    assert _option_values(options, "--ro-bind").count("/usr") == 1
    assert "--dir" not in options


async def test_disabled_executor_runs_nothing():
    result = await DisabledExecutor().run("print(1)")
    assert result == Execution("", "Code execution is disabled on this gateway.", exit_code=1)


async def test_recording_executor_records_and_answers_from_its_script():
    executor = RecordingExecutor(answers={"print(6*7)": Execution("42\n", "", exit_code=0)})
    assert (await executor.run("print(6*7)")).stdout == "42\n"
    assert (await executor.run("other")).stdout == ""
    assert executor.calls == ["print(6*7)", "other"]
