"""The vLLM launcher's pure half: VLLM_* variables and options in, `vllm serve` argv out."""

from __future__ import annotations

import argparse
import asyncio
import shlex

import pytest

from nilai.cli import worker_vllm
from nilai.settings import NilaiSettings
from nilai.workers.vllm_launcher import (
    EXIT_NOT_STARTED,
    TUNING_VARIABLES,
    LaunchOptions,
    TuningError,
    VllmTuning,
    WorkerPlan,
    build_command,
    child_environment,
    local_url,
    plan_worker,
    run_worker,
    supervise,
)

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
DEFAULT_ARGV = [
    "vllm",
    "serve",
    MODEL,
    "--host",
    "127.0.0.1",
    "--port",
    "8000",
    "--tensor-parallel-size",
    "1",
    "--max-num-batched-tokens",
    "8192",
    "--max-num-seqs",
    "256",
    "--gpu-memory-utilization",
    "0.9",
    "--swap-space",
    "4",
]


def flag_value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, argv
    return argv[argv.index(flag) + 1]


def test_defaults_give_the_exact_command():
    assert build_command({}, LaunchOptions(model=MODEL)) == DEFAULT_ARGV
    assert VllmTuning.from_env({}) == VllmTuning()


def test_unrelated_variables_change_nothing():
    env = {"VLLM_LOGGING_LEVEL": "DEBUG", "HF_TOKEN": "x", "NILAI_PORT": "9"}
    assert build_command(env, LaunchOptions(model=MODEL)) == DEFAULT_ARGV


@pytest.mark.parametrize(
    ("variable", "value", "flag", "expected"),
    [
        ("VLLM_TENSOR_PARALLEL_SIZE", "2", "--tensor-parallel-size", "2"),
        ("VLLM_MAX_NUM_BATCHED_TOKENS", " 16384 ", "--max-num-batched-tokens", "16384"),
        ("VLLM_MAX_NUM_SEQS", "64", "--max-num-seqs", "64"),
        ("VLLM_GPU_MEMORY_UTILIZATION", "0.85", "--gpu-memory-utilization", "0.85"),
        ("VLLM_GPU_MEMORY_UTILIZATION", "1", "--gpu-memory-utilization", "1"),
        ("VLLM_SWAP_SPACE", "0", "--swap-space", "0"),
        ("VLLM_SWAP_SPACE", "16", "--swap-space", "16"),
        ("VLLM_SWAP_SPACE", "2.5", "--swap-space", "2.5"),
    ],
)
def test_each_variable_sets_its_flag(variable, value, flag, expected):
    argv = build_command({variable: value}, LaunchOptions(model=MODEL))
    assert flag_value(argv, flag) == expected
    assert len(argv) == len(DEFAULT_ARGV)


def test_swap_space_none_leaves_the_flag_out():
    argv = build_command({"VLLM_SWAP_SPACE": "None"}, LaunchOptions(model=MODEL))
    assert "--swap-space" not in argv
    assert argv == DEFAULT_ARGV[:-2]


@pytest.mark.parametrize(
    ("variable", "flag"),
    [("VLLM_ENFORCE_EAGER", "--enforce-eager"), ("VLLM_DISABLE_LOG_STATS", "--disable-log-stats")],
)
@pytest.mark.parametrize(
    ("value", "present"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        (" Yes ", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("NO", False),
    ],
)
def test_switches_add_a_bare_flag_only_when_true(variable, flag, value, present):
    argv = build_command({variable: value}, LaunchOptions(model=MODEL))
    assert (flag in argv) is present
    assert argv[: len(DEFAULT_ARGV)] == DEFAULT_ARGV
    if present:
        assert argv[len(DEFAULT_ARGV) :] == [flag]


def test_all_knobs_at_once():
    env = {
        "VLLM_TENSOR_PARALLEL_SIZE": "4",
        "VLLM_MAX_NUM_BATCHED_TOKENS": "4096",
        "VLLM_MAX_NUM_SEQS": "128",
        "VLLM_GPU_MEMORY_UTILIZATION": "0.95",
        "VLLM_SWAP_SPACE": "8",
        "VLLM_ENFORCE_EAGER": "true",
        "VLLM_DISABLE_LOG_STATS": "yes",
    }
    assert set(env) == set(TUNING_VARIABLES)
    assert VllmTuning.from_env(env).to_args() == [
        "--tensor-parallel-size",
        "4",
        "--max-num-batched-tokens",
        "4096",
        "--max-num-seqs",
        "128",
        "--gpu-memory-utilization",
        "0.95",
        "--swap-space",
        "8",
        "--enforce-eager",
        "--disable-log-stats",
    ]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VLLM_TENSOR_PARALLEL_SIZE", "0"),
        ("VLLM_TENSOR_PARALLEL_SIZE", "-2"),
        ("VLLM_TENSOR_PARALLEL_SIZE", "two"),
        ("VLLM_TENSOR_PARALLEL_SIZE", "1.5"),
        ("VLLM_MAX_NUM_BATCHED_TOKENS", ""),
        ("VLLM_MAX_NUM_BATCHED_TOKENS", "8k"),
        ("VLLM_MAX_NUM_SEQS", "0"),
        ("VLLM_GPU_MEMORY_UTILIZATION", "0"),
        ("VLLM_GPU_MEMORY_UTILIZATION", "1.01"),
        ("VLLM_GPU_MEMORY_UTILIZATION", "90%"),
        ("VLLM_GPU_MEMORY_UTILIZATION", "nan"),
        ("VLLM_SWAP_SPACE", "-1"),
        ("VLLM_SWAP_SPACE", "4GiB"),
        ("VLLM_SWAP_SPACE", "inf"),
        ("VLLM_ENFORCE_EAGER", "maybe"),
        ("VLLM_ENFORCE_EAGER", ""),
        ("VLLM_DISABLE_LOG_STATS", "on"),
    ],
)
def test_bad_values_raise_naming_the_variable(variable, value):
    with pytest.raises(TuningError, match=variable) as caught:
        build_command({variable: value}, LaunchOptions(model=MODEL))
    assert repr(value) in str(caught.value)


def test_token_budget_must_cover_the_sequences():
    env = {"VLLM_MAX_NUM_BATCHED_TOKENS": "128", "VLLM_MAX_NUM_SEQS": "256"}
    with pytest.raises(TuningError, match=r"VLLM_MAX_NUM_BATCHED_TOKENS .* VLLM_MAX_NUM_SEQS"):
        VllmTuning.from_env(env)
    equal = VllmTuning.from_env({**env, "VLLM_MAX_NUM_SEQS": "128"})
    assert (equal.max_num_batched_tokens, equal.max_num_seqs) == (128, 128)


@pytest.mark.parametrize(
    ("field", "value", "variable"),
    [
        ("max_num_seqs", 0, "VLLM_MAX_NUM_SEQS"),
        ("gpu_memory_utilization", 1.5, "VLLM_GPU_MEMORY_UTILIZATION"),
        ("swap_space_gib", -1.0, "VLLM_SWAP_SPACE"),
    ],
)
def test_the_dataclass_refuses_bad_values_too(field, value, variable):
    with pytest.raises(TuningError, match=variable):
        VllmTuning(**{field: value})


def test_extra_args_come_last_verbatim():
    extra = ("--max-model-len", "16384", "--chat-template", "a template with spaces")
    env = {"VLLM_ENFORCE_EAGER": "true"}
    argv = build_command(env, LaunchOptions(model=MODEL, extra_args=extra))
    assert argv[-len(extra) :] == list(extra)
    assert argv[-len(extra) - 1] == "--enforce-eager"


def test_served_model_name_host_and_port():
    options = LaunchOptions(model="/models/llama", host="0.0.0.0", port=9001, served_model_name="x")
    argv = build_command({}, options)
    assert argv[:3] == ["vllm", "serve", "/models/llama"]
    assert flag_value(argv, "--host") == "0.0.0.0"
    assert flag_value(argv, "--port") == "9001"
    assert flag_value(argv, "--served-model-name") == "x"
    assert "--served-model-name" not in build_command({}, LaunchOptions(model=MODEL))


def test_vllm_bin_option_then_environment_then_path():
    env = {"NILAI_VLLM_BIN": "/opt/venv/bin/vllm"}
    assert build_command(env, LaunchOptions(model=MODEL))[0] == "/opt/venv/bin/vllm"
    options = LaunchOptions(model=MODEL, vllm_bin="./vllm")
    assert build_command(env, options)[0] == "./vllm"
    assert build_command({}, LaunchOptions(model=MODEL))[0] == "vllm"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"model": " "}, "--model"), ({"model": "m", "port": 0}, "--port")],
)
def test_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LaunchOptions(**kwargs)


def test_child_environment_drops_nilai_and_tuning_variables():
    env = {
        "NILAI_REDIS_URL": "redis://secret@h/0",
        "NILAI_API_KEY": "k",
        "VLLM_MAX_NUM_SEQS": "8",
        "VLLM_LOGGING_LEVEL": "DEBUG",
        "HF_TOKEN": "hf",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }
    assert child_environment(env) == {
        "VLLM_LOGGING_LEVEL": "DEBUG",
        "HF_TOKEN": "hf",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("::1", "http://[::1]:8000"),
        ("vllm-1", "http://vllm-1:8000"),
    ],
)
def test_local_url(host, url):
    assert local_url(host, 8000) == url


def test_plan_urls():
    plan = plan_worker({}, LaunchOptions(model=MODEL, port=8001))
    assert plan.health_url == "http://127.0.0.1:8001/health"
    assert plan.announce_url == "http://127.0.0.1:8001"
    wildcard = plan_worker({}, LaunchOptions(model=MODEL, host="0.0.0.0"))
    assert wildcard.health_url == "http://127.0.0.1:8000/health"
    assert wildcard.announce_url is None
    named = plan_worker(
        {}, LaunchOptions(model=MODEL, host="0.0.0.0"), announce_url="http://vllm-llama:8000/"
    )
    assert named.announce_url == "http://vllm-llama:8000"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"announce_url": "vllm:8000"}, "--announce-url"),
        ({"health_timeout_s": 0}, "--health-timeout"),
        ({"grace_s": -1}, "--grace-period"),
    ],
)
def test_plan_refuses_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_worker({}, LaunchOptions(model=MODEL), **kwargs)


def test_supervise_reports_a_missing_executable(tmp_path):
    messages: list[str] = []
    missing = str(tmp_path / "no-such-vllm")
    plan = WorkerPlan(argv=(missing, "serve", "m"), env={}, health_url="", announce_url=None)
    assert asyncio.run(supervise(plan, report=messages.append)) == EXIT_NOT_STARTED
    assert missing in messages[0]


def test_wildcard_bind_with_redis_needs_an_announce_url():
    messages: list[str] = []
    plan = plan_worker({}, LaunchOptions(model=MODEL, host="0.0.0.0"))
    settings = NilaiSettings(redis_url="redis://127.0.0.1:6379/0")
    assert run_worker(plan, settings, messages.append) == 2
    assert "--announce-url" in messages[0]


# --- the command line ---


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nilai worker")
    worker_vllm.register(parser.add_subparsers(dest="kind", required=True))
    return parser.parse_args(["vllm", *argv])


def test_cli_defaults():
    args = parse("--model", MODEL)
    assert (args.host, args.port, args.health_timeout, args.dry_run) == (
        "127.0.0.1",
        8000,
        900.0,
        False,
    )
    assert args.vllm_args == []


def test_dry_run_prints_exactly_the_command(capsys, monkeypatch):
    for variable in TUNING_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("NILAI_VLLM_BIN", raising=False)
    monkeypatch.setenv("VLLM_MAX_NUM_SEQS", "32")
    args = parse(
        "--model", MODEL, "--served-model-name", "llama", "--dry-run",
        "--", "--max-model-len", "4096", "--chat-template", "a b",
    )  # fmt: skip
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    argv = shlex.split(out)
    assert argv == build_command(
        {"VLLM_MAX_NUM_SEQS": "32"},
        LaunchOptions(
            model=MODEL,
            served_model_name="llama",
            extra_args=("--max-model-len", "4096", "--chat-template", "a b"),
        ),
    )
    assert out.strip().endswith("--chat-template 'a b'")


def test_cli_bad_variable_exits_2_naming_it(capsys, monkeypatch):
    monkeypatch.setenv("VLLM_GPU_MEMORY_UTILIZATION", "90")
    args = parse("--model", MODEL, "--dry-run")
    assert args.handler(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "VLLM_GPU_MEMORY_UTILIZATION" in captured.err


def test_cli_bad_settings_exit_2(capsys, monkeypatch):
    monkeypatch.setenv("NILAI_PORT", "not-a-port")
    args = parse("--model", MODEL)
    assert args.handler(args) == 2
    assert "invalid settings" in capsys.readouterr().err


def test_cli_needs_the_separator_for_vllm_flags(capsys):
    with pytest.raises(SystemExit):
        parse("--model", MODEL, "--max-model-len", "4096")
    assert "unrecognized arguments" in capsys.readouterr().err
