"""``nilai worker vllm``: run ``vllm serve`` tuned by ``VLLM_*`` variables, and announce it.

Two halves. A pure builder turns the environment and the command-line options into the
``vllm serve`` argv (``VllmTuning``, ``plan_worker``), so every knob is testable without vLLM.
A supervisor (``supervise``) runs that command, waits for its ``/health``, keeps it announced in
discovery while it runs, and on the way out withdraws the announcement *before* it stops the
server, so gateways stop routing to it first. docs/VLLM_TUNING.md explains each knob.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from http import HTTPStatus

import httpx

from nilai.discovery.announcer import Announcer, ModelOverrides
from nilai.discovery.redis import RedisDiscovery
from nilai.protocol.models import RESPONSES_FEATURE
from nilai.settings import NilaiSettings
from nilai.state.redis import make_redis
from nilai.upstream.http import make_http_client

VLLM_BIN_VARIABLE = "NILAI_VLLM_BIN"
TUNING_VARIABLES = (
    "VLLM_TENSOR_PARALLEL_SIZE",
    "VLLM_MAX_NUM_BATCHED_TOKENS",
    "VLLM_MAX_NUM_SEQS",
    "VLLM_GPU_MEMORY_UTILIZATION",
    "VLLM_SWAP_SPACE",
    "VLLM_ENFORCE_EAGER",
    "VLLM_DISABLE_LOG_STATS",
)
EXIT_NOT_STARTED = 127  # the shell's code for "command not found"
WITHDRAW_TIMEOUT_S = 5.0

_COUNT = "an integer of at least 1"
_FRACTION = "a number greater than 0 and at most 1, e.g. 0.9"
_GIB = "a number of GiB of at least 0, or 'none' to leave --swap-space out"
_SWITCH = "true or false (also 1/0 or yes/no)"
_TRUE_WORDS = frozenset({"true", "1", "yes"})
_FALSE_WORDS = frozenset({"false", "0", "no"})
# Bind addresses that mean "every interface": reachable locally through loopback only.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - not a bind

Report = Callable[[str], None]
Announce = Callable[[asyncio.Event], Awaitable[None]]


class TuningError(ValueError):
    """A ``VLLM_*`` variable holds a value vLLM would refuse; the message names the variable."""


def _bad(variable: str, requirement: str, value: object) -> TuningError:
    return TuningError(f"{variable} must be {requirement}; got {value!r}")


def _number(raw: str) -> float | None:
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _number_text(value: float) -> str:
    """Shortest exact text: ``4`` rather than ``4.0``, ``0.9`` rather than ``0.900000``."""
    return str(int(value)) if value.is_integer() else repr(value)


@dataclass(frozen=True)
class VllmTuning:
    """The vLLM engine knobs that nilai sets from ``VLLM_*`` variables.

    ``swap_space_gib`` is None when ``VLLM_SWAP_SPACE=none``: vLLM 0.18 dropped the flag.
    """

    tensor_parallel_size: int = 1
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.9
    swap_space_gib: float | None = 4.0
    enforce_eager: bool = False
    disable_log_stats: bool = False

    def __post_init__(self) -> None:
        counts = {
            "VLLM_TENSOR_PARALLEL_SIZE": self.tensor_parallel_size,
            "VLLM_MAX_NUM_BATCHED_TOKENS": self.max_num_batched_tokens,
            "VLLM_MAX_NUM_SEQS": self.max_num_seqs,
        }
        for variable, count in counts.items():
            if count < 1:
                raise _bad(variable, _COUNT, count)
        if self.max_num_batched_tokens < self.max_num_seqs:
            # vLLM refuses this at start-up, after minutes of loading; say so now.
            raise TuningError(
                f"VLLM_MAX_NUM_BATCHED_TOKENS ({self.max_num_batched_tokens}) must be at least "
                f"VLLM_MAX_NUM_SEQS ({self.max_num_seqs}): every running sequence needs a token "
                "of each step's budget"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise _bad("VLLM_GPU_MEMORY_UTILIZATION", _FRACTION, self.gpu_memory_utilization)
        if self.swap_space_gib is not None and not 0 <= self.swap_space_gib < math.inf:
            raise _bad("VLLM_SWAP_SPACE", _GIB, self.swap_space_gib)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> VllmTuning:
        """Read the knobs from ``env``; unset ones keep their defaults.

        Raises:
            TuningError: a variable is set to a value vLLM would not accept.
        """
        changes: dict[str, object] = {}
        for name, variable in (
            ("tensor_parallel_size", "VLLM_TENSOR_PARALLEL_SIZE"),
            ("max_num_batched_tokens", "VLLM_MAX_NUM_BATCHED_TOKENS"),
            ("max_num_seqs", "VLLM_MAX_NUM_SEQS"),
        ):
            if (raw := env.get(variable)) is not None:
                changes[name] = _parse_count(variable, raw)
        if (raw := env.get("VLLM_GPU_MEMORY_UTILIZATION")) is not None:
            changes["gpu_memory_utilization"] = _parse_fraction(raw)
        if (raw := env.get("VLLM_SWAP_SPACE")) is not None:
            changes["swap_space_gib"] = _parse_gib(raw)
        if (raw := env.get("VLLM_ENFORCE_EAGER")) is not None:
            changes["enforce_eager"] = _parse_switch("VLLM_ENFORCE_EAGER", raw)
        if (raw := env.get("VLLM_DISABLE_LOG_STATS")) is not None:
            changes["disable_log_stats"] = _parse_switch("VLLM_DISABLE_LOG_STATS", raw)
        return dataclasses.replace(cls(), **changes)

    def to_args(self) -> list[str]:
        """The ``vllm serve`` flags for these knobs."""
        args = [
            "--tensor-parallel-size",
            str(self.tensor_parallel_size),
            "--max-num-batched-tokens",
            str(self.max_num_batched_tokens),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--gpu-memory-utilization",
            _number_text(self.gpu_memory_utilization),
        ]
        if self.swap_space_gib is not None:
            args += ["--swap-space", _number_text(self.swap_space_gib)]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.disable_log_stats:
            args.append("--disable-log-stats")
        return args


def _parse_count(variable: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise _bad(variable, _COUNT, raw) from None
    if value < 1:
        raise _bad(variable, _COUNT, raw)
    return value


def _parse_fraction(raw: str) -> float:
    value = _number(raw)
    if value is None or not 0 < value <= 1:
        raise _bad("VLLM_GPU_MEMORY_UTILIZATION", _FRACTION, raw)
    return value


def _parse_gib(raw: str) -> float | None:
    if raw.strip().lower() == "none":
        return None
    value = _number(raw)
    if value is None or value < 0:
        raise _bad("VLLM_SWAP_SPACE", _GIB, raw)
    return value


def _parse_switch(variable: str, raw: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise _bad(variable, _SWITCH, raw)


@dataclass(frozen=True)
class LaunchOptions:
    """What the command line says about the server to start."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    vllm_bin: str | None = None
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ValueError("--model must name a model (a hub id or a local path)")
        if not 1 <= self.port <= 65535:  # noqa: PLR2004 - the TCP port range
            raise ValueError(f"--port must be between 1 and 65535; got {self.port}")


def build_command(env: Mapping[str, str], options: LaunchOptions) -> list[str]:
    """Build the ``vllm serve`` argv for ``options``, tuned by the ``VLLM_*`` variables in ``env``.

    Extra arguments come last, so vLLM's parser lets them override anything before them.

    Raises:
        TuningError: a ``VLLM_*`` variable holds a bad value.
    """
    tuning = VllmTuning.from_env(env)
    vllm_bin = options.vllm_bin or env.get(VLLM_BIN_VARIABLE) or "vllm"
    argv = [vllm_bin, "serve", options.model, "--host", options.host, "--port", str(options.port)]
    if options.served_model_name:
        argv += ["--served-model-name", options.served_model_name]
    return [*argv, *tuning.to_args(), *options.extra_args]


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """Return ``env`` without nilai's variables: vLLM needs none of them, and some are secrets.

    The tuning variables go too: they are flags now, and vLLM warns about ``VLLM_*`` names it
    does not know.
    """
    return {
        name: value
        for name, value in env.items()
        if not name.startswith("NILAI_") and name not in TUNING_VARIABLES
    }


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def local_url(host: str, port: int) -> str:
    """Where this machine reaches a server bound to ``host``: loopback for a wildcard bind."""
    return _url(_WILDCARDS.get(host, host), port)


@dataclass(frozen=True)
class WorkerPlan:
    """Everything the supervisor needs, decided before anything starts."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    health_url: str
    announce_url: str | None  # None: bound to every address and no --announce-url was given
    health_timeout_s: float = 900.0
    grace_s: float = 30.0


def plan_worker(
    env: Mapping[str, str],
    options: LaunchOptions,
    *,
    announce_url: str | None = None,
    health_timeout_s: float = 900.0,
    grace_s: float = 30.0,
) -> WorkerPlan:
    """Decide the command, its environment and its URLs.

    Raises:
        TuningError: a ``VLLM_*`` variable holds a bad value.
        ValueError: a URL or a time limit is malformed.
    """
    if announce_url is not None and not announce_url.startswith(("http://", "https://")):
        raise ValueError(
            f"--announce-url must start with http:// or https://; got {announce_url!r}"
        )
    if not health_timeout_s > 0 or not grace_s >= 0:
        raise ValueError("--health-timeout must be above 0 and --grace-period at least 0")
    if announce_url is None and options.host not in _WILDCARDS:
        announce_url = _url(options.host, options.port)
    return WorkerPlan(
        argv=tuple(build_command(env, options)),
        env=child_environment(env),
        health_url=local_url(options.host, options.port) + "/health",
        announce_url=announce_url.rstrip("/") if announce_url else None,
        health_timeout_s=health_timeout_s,
        grace_s=grace_s,
    )


def _stderr(message: str) -> None:
    sys.stderr.write(f"nilai worker vllm: {message}\n")
    sys.stderr.flush()


def redis_announcer(settings: NilaiSettings, url: str) -> Announce:
    """An ``Announce`` that keeps ``url`` in Redis discovery, as ``nilai announce`` does."""

    async def announce(stop: asyncio.Event) -> None:
        redis = make_redis(settings)
        assert redis is not None  # noqa: S101 - only called when NILAI_REDIS_URL is set
        http = make_http_client(settings)
        try:
            discovery = RedisDiscovery(redis, settings.redis_prefix)
            # vLLM serves the Responses API but does not say so in /v1/models.
            overrides = ModelOverrides(features=(RESPONSES_FEATURE,))
            announcer = Announcer(
                discovery, http, url, ttl_s=settings.discovery_ttl_s, overrides=overrides
            )
            await announcer.run(stop)
        finally:
            await http.aclose()
            await redis.aclose()

    return announce


def run_worker(plan: WorkerPlan, settings: NilaiSettings, report: Report = _stderr) -> int:
    """Run the planned server until it exits or a signal arrives; return its exit code."""
    announce: Announce | None = None
    if settings.redis_url is None or not settings.redis_url.get_secret_value():
        target = plan.announce_url or plan.health_url.removesuffix("/health")
        report(
            f"NILAI_REDIS_URL is not set, so this server is not announced; point a gateway at it "
            f"with NILAI_UPSTREAM_URLS={target} (an address the gateway can reach)"
        )
    elif plan.announce_url is None:
        report(
            "the server binds every address, so gateways' URL for it is unknown: pass "
            "--announce-url http://HOST:PORT (the address gateways reach it at)"
        )
        return 2
    else:
        announce = redis_announcer(settings, plan.announce_url)
    return asyncio.run(supervise(plan, announce=announce, report=report))


async def supervise(
    plan: WorkerPlan, *, announce: Announce | None = None, report: Report = _stderr
) -> int:
    """Start the server, wait for health, announce it, and stop it cleanly.

    SIGTERM and SIGINT (when this runs in the main thread) withdraw the announcement, then
    reach the server; a second signal reaches it at once.

    Returns:
        The server's exit code (128 + N when signal N ended it), or a non-zero code of the
        launcher's own when the server never became healthy or could not be started.
    """
    supervisor = _Supervisor(plan, report)
    with supervisor.signals_handled():  # before the start: no signal may orphan the server
        try:
            # A process group of its own: a terminal's Ctrl-C reaches vLLM once, through us,
            # and a last-resort SIGKILL also reaches the processes vLLM started.
            process = await asyncio.create_subprocess_exec(
                *plan.argv, env=dict(plan.env), process_group=0
            )
        except OSError as exc:
            report(f"cannot run {plan.argv[0]!r}: {exc.strerror or exc} (see --vllm-bin)")
            return EXIT_NOT_STARTED
        supervisor.process = process
        try:
            if await supervisor.wait_healthy():
                await supervisor.serve(announce)
        finally:
            code = await supervisor.shutdown()
    return supervisor.exit_code(code)


class _Supervisor:
    """One child process, its health, and how it is stopped."""

    def __init__(self, plan: WorkerPlan, report: Report) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._plan = plan
        self._report = report
        self.stop = asyncio.Event()
        self._signal: int | None = None
        self._healthy = False
        self._exited_early = False

    @property
    def process(self) -> asyncio.subprocess.Process:
        """The server's process, once started."""
        if self._process is None:
            raise RuntimeError("the server has not been started")
        return self._process

    @process.setter
    def process(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @contextlib.contextmanager
    def signals_handled(self) -> Generator[None]:
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(signum, self._on_signal, signum)
            except (RuntimeError, NotImplementedError):
                continue  # not the main thread: the caller controls the process instead
            installed.append(signum)
        try:
            yield
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        if self.stop.is_set():
            self._send(signum)  # asked twice: do not wait for the withdrawal
            return
        self._signal = signum
        self.stop.set()

    def _send(self, signum: int) -> None:
        if self._process is None:
            return  # still starting: shutdown() passes the signal on
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signum)

    async def _pause(self, seconds: float | None) -> None:
        """Sleep until ``seconds`` pass, a signal arrives, or the server exits."""
        waiters = {
            asyncio.ensure_future(self.stop.wait()),
            asyncio.ensure_future(self.process.wait()),
        }
        _, pending = await asyncio.wait(
            waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
        )
        for waiter in pending:
            waiter.cancel()
        if pending:
            await asyncio.wait(pending)

    async def wait_healthy(self) -> bool:
        """Poll ``/health`` until it answers 200; False on a signal, an exit or the time limit."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._plan.health_timeout_s
        delay = 0.1
        async with httpx.AsyncClient(trust_env=False, timeout=2.0) as http:
            while not self.stop.is_set():
                if (code := self.process.returncode) is not None:
                    self._exited_early = True
                    self._report(
                        f"vllm exited with code {code} before {self._plan.health_url} answered; "
                        "its own output above says why"
                    )
                    return False
                if await _answers(http, self._plan.health_url):
                    self._healthy = True
                    self._report(f"vllm is ready at {self._plan.health_url}")
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self._report(
                        f"{self._plan.health_url} did not answer 200 within "
                        f"{self._plan.health_timeout_s:g}s; stopping vllm (loading a large model "
                        "can take longer: raise --health-timeout)"
                    )
                    return False
                await self._pause(min(delay, remaining))
                delay = min(delay * 2, 2.0)
        return False

    async def serve(self, announce: Announce | None) -> None:
        """Keep the server announced until it exits or a signal arrives, then withdraw it."""
        task = asyncio.ensure_future(announce(self.stop)) if announce else None
        await self._pause(None)
        if self._signal is None and self.process.returncode is not None:
            self._report(f"vllm exited with code {self.process.returncode}")
        self.stop.set()
        if task is None:
            return
        try:
            await asyncio.wait_for(task, WITHDRAW_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - stopping the server matters more
            self._report(f"withdrawing the announcement failed: {type(exc).__name__}")

    async def shutdown(self) -> int:
        """Stop the server (the signal received, else SIGTERM; SIGKILL after the grace)."""
        process = self.process
        if process.returncode is None:
            self._send(self._signal or signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self._plan.grace_s)
            except TimeoutError:
                self._report(f"vllm did not stop within {self._plan.grace_s:g}s; killing it")
        # Whatever vLLM started and left behind would keep holding GPU memory.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        return await process.wait()

    def exit_code(self, code: int) -> int:
        """The launcher's exit status for a server that ended with ``code``."""
        status = 128 - code if code < 0 else code  # the shell's convention for signals
        if self._exited_early:
            return status or 1
        if not self._healthy and self._signal is None:
            return 1  # timed out: the SIGTERM was ours, its code says nothing
        return status


async def _answers(http: httpx.AsyncClient, url: str) -> bool:
    try:
        response = await http.get(url)
    except httpx.HTTPError:
        return False
    return response.status_code == HTTPStatus.OK
