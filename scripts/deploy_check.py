"""Render the Helm chart offline and validate every object it makes (``make deploy-check``).

For each values file (the chart's defaults, production, two models, and a Secret the chart makes
itself) the chart is rendered by Helm's own engine (helm-python-sdk: Helm's Go SDK, no cluster
and no network), which also checks the values against ``values.schema.json``. Then:

* every rendered object is validated against the Kubernetes OpenAPI schemas of the oldest and
  the newest Kubernetes version the chart supports (kubernetes-validate ships them);
* every ``NILAI_*`` variable the chart sets is a setting the gateway reads, and the announce
  sidecar's arguments parse with the real ``nilai announce`` command line;
* the deliberately broken values (deploy/helm/ci/broken-values.yaml) are refused, with a message
  naming each mistake.

Exit status 0 when all holds; 1, with what failed, otherwise.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import helm_python as helm
import kubernetes_validate  # pyright: ignore[reportMissingTypeStubs]
import yaml
from coincurve import PrivateKey

from nilai.cli import build_parser
from nilai.settings import NilaiSettings

ROOT = Path(__file__).resolve().parent.parent
HELM_DIR = ROOT / "deploy" / "helm"
CHART_DIR = HELM_DIR / "nilai"
BROKEN_VALUES = HELM_DIR / "ci" / "broken-values.yaml"
RELEASE = "nilai"
NAMESPACE = "nilai"
KUBE_VERSIONS = ("1.30.0", "1.37.0")
"""The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest schemas."""

CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor")}
"""Kinds of operators' CRDs: not in the Kubernetes schemas; their basic shape is checked here."""

BROKEN_MISTAKES = (
    "/gateway/replicas",
    "/gateway/drain/shutdownGraceSeconds",
    "NILAI_SHUTDOWN_GRACE_S",
    "/ingress/paths/0",
    "/models/0/name",
    "/models/0/tensorParallelSize",
    "'gpu' not allowed",
)
"""What the refusal of the broken values must name: one entry per mistake in the file."""


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


@dataclass
class Rendered:
    """The objects one values file renders to, by the template each came from."""

    scenario: str
    objects: list[tuple[str, dict[str, Any]]] = field(
        default_factory=list[tuple[str, dict[str, Any]]]
    )

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """Every rendered object of ``kind``."""
        return [obj for _, obj in self.objects if obj.get("kind") == kind]


def load_values(path: Path) -> dict[str, Any]:
    """The values in a YAML file (an empty file is no values)."""
    data: object = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise TypeError(f"{path}: values must be a mapping")
    return cast("dict[str, Any]", data)


def secret_made_by_chart() -> dict[str, Any]:
    """Values that make the chart write the Secret itself, with a freshly made signing key.

    The URLs name no real server; the key and passwords are made here, so that no secret (not
    even a dummy one) sits in the repository.
    """
    password = secrets.token_hex(16)
    return {
        "secrets": {
            "existingSecret": "",
            "create": {
                "redisUrl": f"redis://:{password}@redis.nilai.svc:6379/0",
                "databaseUrl": f"postgresql+asyncpg://nilai:{password}@postgres.nilai.svc:5432/nilai",
                "signingKey": PrivateKey().to_pem().decode(),
                "apiKeys": [secrets.token_hex(32)],
            },
        },
        "ingress": {"enabled": True, "paths": ["/v1", "/docs", "/openapi.json"]},
    }


def scenarios() -> dict[str, dict[str, Any]]:
    """The values each scenario renders with (on top of the chart's defaults)."""
    return {
        "default": {},
        "production": load_values(HELM_DIR / "values-production.yaml"),
        "two-models": load_values(HELM_DIR / "values-two-models.yaml"),
        "chart-made-secret": secret_made_by_chart(),
    }


def render(scenario: str, values: Mapping[str, Any]) -> Rendered:
    """Render the chart as ``helm template`` would, and parse every object.

    Raises:
        helm.HelmError: the values do not meet the schema, or a template failed.
    """
    rendered = Rendered(scenario)
    with helm.Chart.load(CHART_DIR) as chart:
        manifests = chart.render(dict(values), name=RELEASE, namespace=NAMESPACE, is_install=True)
    for template, text in sorted(manifests.items()):
        if not template.endswith(".yaml"):
            continue  # NOTES.txt
        for document in yaml.safe_load_all(text):
            if document:
                rendered.objects.append((template, cast("dict[str, Any]", document)))
    return rendered


def _schema_problems(template: str, obj: dict[str, Any]) -> Iterator[str]:
    where = f"{template}: {obj.get('kind')} {obj.get('metadata', {}).get('name')}"
    if (obj.get("apiVersion"), obj.get("kind")) in CUSTOM_RESOURCES:
        spec = obj.get("spec")
        if not obj.get("metadata", {}).get("name") or not isinstance(spec, dict):
            yield f"{where}: needs metadata.name and a spec"
        elif not cast("dict[str, Any]", spec).get("endpoints"):
            yield f"{where}: needs spec.endpoints"
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)  # pyright: ignore[reportUnknownMemberType]
        except kubernetes_validate.ValidationError as error:  # pyright: ignore[reportUnknownMemberType]
            path = "/".join(str(part) for part in cast("Any", error).path)
            yield f"{where} (Kubernetes {version}): {error.message} at /{path}"
        except kubernetes_validate.SchemaNotFoundError:  # pyright: ignore[reportUnknownMemberType]
            yield f"{where}: no Kubernetes {version} schema for this apiVersion and kind"


def _containers(rendered: Rendered) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("Deployment", "StatefulSet"):
        for workload in rendered.of_kind(kind):
            spec = workload["spec"]["template"]["spec"]
            for container in [*spec.get("initContainers", []), *spec["containers"]]:
                yield workload["metadata"]["name"], container


def _setting_problems(rendered: Rendered) -> Iterator[str]:
    """The chart passes only settings the code reads, and arguments its commands accept."""
    known = {f"NILAI_{name.upper()}" for name in NilaiSettings.model_fields}
    for workload, container in _containers(rendered):
        for variable in container.get("env", []):
            name = str(variable["name"])
            if name.startswith("NILAI_") and name not in known:
                yield f"{workload}/{container['name']}: {name} is not a nilai setting"
        if container.get("command") == ["nilai", "announce"]:
            argv = ["announce", *(str(arg) for arg in container.get("args", []))]
            argv = [arg.replace("$(POD_IP)", "10.0.0.1") for arg in argv]
            try:
                build_parser().parse_args(argv)
            except SystemExit:
                yield f"{workload}/announce: `nilai {' '.join(argv)}` does not parse"


def check_scenario(scenario: str, values: Mapping[str, Any]) -> list[str]:
    """Render one scenario and return every problem found (none: it passed)."""
    try:
        rendered = render(scenario, values)
    except helm.HelmError as error:
        return [f"{scenario}: the chart did not render: {error}"]
    problems = [
        problem for template, obj in rendered.objects for problem in _schema_problems(template, obj)
    ]
    problems += _setting_problems(rendered)
    kinds = sorted({str(obj["kind"]) for _, obj in rendered.objects})
    _say(f"{scenario}: {len(rendered.objects)} objects ({', '.join(kinds)})")
    return [f"{scenario}: {problem}" for problem in problems]


def check_lint() -> list[str]:
    """``helm lint``'s errors (its warnings, e.g. the test-only dependencies absent, pass)."""
    report = helm.lint(CHART_DIR)
    return [f"helm lint: {message}" for message in report.get("errors", [])]


def check_broken() -> list[str]:
    """The broken values are refused at render time, and the refusal names each mistake."""
    try:
        render("broken", load_values(BROKEN_VALUES))
    except helm.HelmValuesError as error:
        message = str(error)
        _say(f"broken values refused, as they must be:\n{message.rstrip()}")
        missing = [mistake for mistake in BROKEN_MISTAKES if mistake not in message]
        return [f"broken values: the refusal does not name {mistake!r}" for mistake in missing]
    return [f"broken values: {BROKEN_VALUES.relative_to(ROOT)} rendered, but must be refused"]


def main(argv: list[str] | None = None) -> int:
    """Run every check; print what failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--write", type=Path, help="also write each scenario's manifests into this directory"
    )
    args = parser.parse_args(argv)
    problems: list[str] = []
    for scenario, values in scenarios().items():
        problems += check_scenario(scenario, values)
        if args.write:
            out = Path(args.write) / f"{scenario}.yaml"
            out.parent.mkdir(parents=True, exist_ok=True)
            objects = [obj for _, obj in render(scenario, values).objects]
            out.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    problems += check_lint()
    problems += check_broken()
    if problems:
        sys.stderr.write("\nhelm chart check FAILED:\n  " + "\n  ".join(problems) + "\n")
        return 1
    versions = " and ".join(KUBE_VERSIONS)
    _say(f"helm chart check passed (Kubernetes {versions} schemas)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
