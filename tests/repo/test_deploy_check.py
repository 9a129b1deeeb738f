"""The Helm chart, rendered offline: what each object must say, and what the chart must refuse.

scripts/deploy_check.py (``make deploy-check``) renders deploy/helm/nilai with Helm's own engine
and validates every object against the Kubernetes schemas; these tests read the rendered objects
for the properties a valid-but-wrong chart would lose: probes, a grace period that covers the
gateway's drain, the NetworkPolicy's selectors, an Ingress that never routes /metrics. They also
cover the commands deploy/README.md documents for Kubernetes.
"""

from __future__ import annotations

import importlib
import math
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python as helm
import pytest
import yaml
from coincurve import PrivateKey

from nilai.cli import build_parser
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
