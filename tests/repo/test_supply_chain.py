"""What the builds install is pinned: packages by constraints.txt, base images by digest."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
COMPOSE = ROOT / "deploy" / "compose.yaml"
CONSTRAINTS = ROOT / "constraints.txt"
HADOLINT = Path(sys.executable).parent / "hadolint"
DIGEST = "sha256:" + "ab" * 32
TAGGED = re.compile(r"[a-z0-9][a-z0-9._/-]*:[A-Za-z0-9_][A-Za-z0-9_.-]*")
PINNED = re.compile(rf"{TAGGED.pattern}@sha256:[0-9a-f]{{64}}")


@pytest.fixture
def pin_images() -> ModuleType:
    """scripts/pin_images.py (imported per test: the Dockerfile checks run on any checkout)."""
    return importlib.import_module("pin_images")


@pytest.fixture
def lock() -> ModuleType:
    """scripts/lock.py."""
    return importlib.import_module("lock")


# --- base images -------------------------------------------------------------------------------


def base_image_problems(text: str) -> list[str]:
    """Every ``FROM`` that is neither pinned by digest nor named by a global ``*_IMAGE`` ARG.

    The ARG's default must be a tag (and, once `make pin-images` ran, a digest): the one place
    scripts/pin_images.py pins. A ``FROM`` may also name an earlier stage.
    """
    arguments: dict[str, str] = {}
    stages: set[str] = set()
    problems: list[str] = []
    seen_from = False
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        instruction = words[0].upper()
        if instruction == "ARG" and not seen_from:
            name, _, default = words[1].partition("=")
            arguments[name] = default
        if instruction != "FROM":
            continue
        seen_from = True
        words = [word for word in words[1:] if not word.startswith("--platform")]
        image = words[0]
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2].lower())
        variable = re.fullmatch(r"\$\{?([A-Z][A-Z0-9_]*_IMAGE)\}?", image)
        if image.lower() in stages or PINNED.fullmatch(image):
            continue
        if variable and variable.group(1) in arguments:
            default = arguments[variable.group(1)]
            if TAGGED.fullmatch(default.split("@")[0]) and (
                "@" not in default or PINNED.fullmatch(default)
            ):
                continue
            problems.append(f"{line}: ARG {variable.group(1)}={default} is not repository:tag")
            continue
        problems.append(f"{line}: neither pinned by digest nor a *_IMAGE build argument")
    return problems


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_every_base_image_is_pinned_by_digest_or_named_by_the_pinned_argument(dockerfile: Path):
    assert base_image_problems(dockerfile.read_text()) == []


@pytest.mark.parametrize(
    "line",
    [
        "FROM python:3.12-slim-bookworm",
        "FROM python",
        "FROM ${SOMETHING}",
        "FROM ${UNDECLARED_IMAGE}",
    ],
)
def test_an_unpinned_from_line_is_found(line: str):
    assert base_image_problems(f"ARG OTHER_IMAGE=x:1\n{line}\n") != []


def test_compose_pulls_tagged_images_only(pin_images: ModuleType):
    """Every pulled image has a tag (pinned by `make pin-images`); ``local`` ones are built."""
    references = [image.reference for image in pin_images.images(COMPOSE)]
    assert references
    for reference in references:
        assert TAGGED.fullmatch(reference.split("@")[0]), reference
        assert not reference.split("@")[0].endswith(":latest"), reference


def test_pin_images_knows_every_base_image(pin_images: ModuleType):
    """What scripts/pin_images.py rewrites is exactly what the FROM lines and compose pull."""
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        used = set(re.findall(r"^FROM\s+\$\{?([A-Z][A-Z0-9_]*_IMAGE)\}?", text, re.MULTILINE))
        declared = set(re.findall(r"^ARG\s+([A-Z][A-Z0-9_]*_IMAGE)=", text, re.MULTILINE))
        assert used == declared, dockerfile.name
        assert len(pin_images.images(dockerfile)) == len(declared), dockerfile.name
    compose_images = re.findall(r"^\s*image:\s*(\S+)", COMPOSE.read_text(), re.MULTILINE)
    pulled = [image for image in compose_images if not image.endswith(":local")]
    assert [image.reference for image in pin_images.images(COMPOSE)] == pulled


def test_pin_images_writes_digests_in_place(pin_images: ModuleType, tmp_path: Path):
    """--update with a stand-in registry: every image pinned, tags kept, hadolint still happy."""
    copies = []
    for source in [*DOCKERFILES, COMPOSE]:
        copy = tmp_path / source.name
        shutil.copyfile(source, copy)
        copies.append(copy)
    asked: list[str] = []

    def registry(tag: str) -> str:
        asked.append(tag)
        return DIGEST

    changes = pin_images.update(copies, registry)
    assert changes
    assert len(asked) == len(set(asked))  # one question per tag
    for copy in copies:
        found = pin_images.images(copy)
        assert found
        assert all(image.pinned and image.reference.endswith(DIGEST) for image in found)
    for copy in copies[:-1]:
        assert base_image_problems(copy.read_text()) == []
    assert pin_images.update(copies, registry) == []  # nothing left to change
    if HADOLINT.exists():
        done = subprocess.run(
            [str(HADOLINT), *map(str, copies[:-1])], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_pin_images_reads_the_index_digest_from_docker_buildx(
    pin_images: ModuleType, tmp_path: Path, monkeypatch
):
    """The first ``Digest:`` of `docker buildx imagetools inspect` is the multi-platform index."""
    fake = tmp_path / "docker"
    fake.write_text(
        "#!/bin/sh\n"
        '[ "$2" = version ] && exit 0\n'
        f'printf "Name:      docker.io/library/$5\\nMediaType: application/'
        f"vnd.oci.image.index.v1+json\\nDigest:    {DIGEST}\\n\\nManifests:\\n"
        f'  Name:      docker.io/library/$5@sha256:{"cd" * 32}\\n"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert pin_images.resolve("python:3.12-slim-bookworm") == DIGEST


def test_pin_images_refuses_an_answer_that_is_not_a_digest(
    pin_images: ModuleType, tmp_path: Path, monkeypatch
):
    fake = tmp_path / "docker"
    fake.write_text('#!/bin/sh\n[ "$2" = version ] && exit 0\necho "Digest:    latest"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match="not a sha256 digest"):
        pin_images.resolve("python:3.12-slim-bookworm")


# --- packages ----------------------------------------------------------------------------------


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            found[canonicalize_name(name)] = version
    return found


def test_constraints_pin_every_installed_dependency_at_its_installed_version(lock: ModuleType):
    """The install the tests run on is the locked one (on any platform: pins it lacks aside)."""
    gateway, rest = lock.installed()
    locked = pins()
    differing = {
        name: (version, locked.get(name))
        for name, version in {**gateway, **rest}.items()
        if locked.get(name) != version
    }
    assert differing == {}, (
        "installed != constraints.txt: `make setup` installs the locked versions; after an "
        "upgrade or a new dependency, `make lock`"
    )


def test_constraints_are_what_make_lock_writes(lock: ModuleType):
    """On the lock platform (CI's): no stale pins either, and the gateway's section is right."""
    if lock.this_platform() != (*lock.LOCK_PLATFORM, lock.LOCK_PYTHON):
        pytest.skip("constraints.txt is made on Linux x86_64 with CPython 3.12")
    assert CONSTRAINTS.read_text() == lock.constraints()


def test_every_requirement_of_pyproject_is_pinned_within_its_range(lock: ModuleType):
    """Holds on any machine: a dependency added or raised in pyproject.toml needs `make lock`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"]]
    for extra in lock.EXTRAS:
        lines += project["optional-dependencies"][extra]
    locked = pins()
    environment = {**default_environment(), "extra": ""}
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement.name} is not in constraints.txt"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"constraints.txt pins {name}=={locked[name]}, outside {requirement}"
        )


def test_no_pin_has_extras_or_urls():
    """pip refuses extras in a constraints file; a URL would pin a place, not a version."""
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[A-Za-z0-9.+!_-]+", line), line


def test_every_install_uses_the_constraints():
    """setup (and so CI), both images and the build context all take constraints.txt."""
    assert "--constraint constraints.txt -e '.[dev,local,nildb,websearch,rag,attest]'" in (
        (ROOT / "scripts" / "setup.sh").read_text()
    )
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        installs = re.findall(r"pip install(?:[^\n]*\\\n)*[^\n]*", text)  # with continuations
        wheel_installs = [install for install in installs if "nilai-*.whl" in install]
        assert wheel_installs, dockerfile.name
        assert all("--constraint" in install for install in wheel_installs), dockerfile.name
    assert "!constraints.txt" in (ROOT / ".dockerignore").read_text().splitlines()
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    keys = re.findall(r"key: venv-.*", workflow)
    assert keys
    assert all("'constraints.txt'" in key for key in keys)
