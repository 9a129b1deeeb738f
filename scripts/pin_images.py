"""Pin the container images nilai builds on and deploys by digest (``make pin-images``).

A tag such as ``python:3.12-slim-bookworm`` moves whenever it is rebuilt; a digest names one
image for good, so a rebuild of the gateway gets the base that was reviewed. Where the images
are named:

- ``docker/*.Dockerfile``: each base image once, as ``ARG <NAME>_IMAGE=<repository>:<tag>``
  before the first ``FROM``, which uses ``${<NAME>_IMAGE}`` (tests/repo/test_supply_chain.py
  refuses any other ``FROM``);
- ``deploy/compose.yaml``: ``image: <repository>:<tag>`` (images built from this repository,
  tagged ``local``, are not pulled and not pinned).

``--update`` asks the registry for each tag's current digest (the multi-platform index, so
every platform stays pinned) and writes ``<repository>:<tag>@sha256:<digest>`` in place: the
tag stays for the reader, Docker pulls by the digest. It needs ``docker buildx imagetools`` (or
``crane``) and access to the registries. Review the change as any dependency update.

    python3 scripts/pin_images.py            # list every image and whether it is pinned
    python3 scripts/pin_images.py --check    # exit 1 if one is not pinned (for release jobs)
    python3 scripts/pin_images.py --update   # resolve the digests and write them
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
IMAGE_ARG = re.compile(r"^(ARG\s+[A-Z][A-Z0-9_]*_IMAGE=)(\S+)\s*$")
COMPOSE_IMAGE = re.compile(r"^(\s*image:\s*)(\S+)\s*$")
LOCAL_TAG = ":local"

# Plain Python 3.9+ throughout: a release machine with Docker need not have nilai's virtualenv.
Resolver = Callable[[str], str]


@dataclass(frozen=True)
class Image:
    """One image reference in a file: where it is written and what it says."""

    path: Path
    line: int
    reference: str

    @property
    def tag(self) -> str:
        """The reference without its digest."""
        return self.reference.split("@", 1)[0]

    @property
    def pinned(self) -> bool:
        """Whether the reference carries a sha256 digest."""
        _, _, digest = self.reference.partition("@")
        return bool(DIGEST.fullmatch(digest))

    def __str__(self) -> str:
        shown = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{shown}:{self.line}: {self.reference}"


def default_files() -> list[Path]:
    """The Dockerfiles and the compose file of this repository."""
    return [*sorted((ROOT / "docker").glob("*.Dockerfile")), ROOT / "deploy" / "compose.yaml"]


def images(path: Path) -> list[Image]:
    """The image references ``path`` names: ``*_IMAGE`` build arguments or compose images."""
    pattern = COMPOSE_IMAGE if path.suffix in (".yaml", ".yml") else IMAGE_ARG
    found: list[Image] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = pattern.match(line)
        if match and not match.group(2).endswith(LOCAL_TAG):
            found.append(Image(path, number, match.group(2)))
    return found


def resolve(tag: str) -> str:
    """The digest a registry serves for ``tag`` now (its multi-platform index, if it has one)."""
    docker = shutil.which("docker")
    if docker and _run([docker, "buildx", "version"], check=False).returncode == 0:
        output = _run([docker, "buildx", "imagetools", "inspect", tag]).stdout
        # The first "Digest:" line is the image's own (the index); the per-platform manifests
        # follow under "Manifests:".
        for line in output.splitlines():
            if line.startswith("Digest:"):
                return _digest(line.removeprefix("Digest:").strip(), tag)
        raise RuntimeError(f"docker buildx imagetools inspect {tag}: no digest in its output")
    crane = shutil.which("crane")
    if crane:
        return _digest(_run([crane, "digest", tag]).stdout.strip(), tag)
    raise RuntimeError(
        "neither `docker buildx` nor `crane` is installed: cannot ask a registry for digests"
    )


def _run(command: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    # The program is one found on PATH above; the only argument from a file is an image tag.
    return subprocess.run(command, capture_output=True, text=True, check=check)  # noqa: S603


def _digest(text: str, tag: str) -> str:
    if not DIGEST.fullmatch(text):
        raise RuntimeError(f"{tag}: the registry answered {text!r}, not a sha256 digest")
    return text


def update(paths: Iterable[Path], resolver: Resolver = resolve) -> list[str]:
    """Rewrite every image in ``paths`` as ``tag@digest``; the changes, one line each."""
    changes: list[str] = []
    digests: dict[str, str] = {}
    for path in paths:
        lines = path.read_text().splitlines(keepends=True)
        for image in images(path):
            if image.tag not in digests:
                digests[image.tag] = resolver(image.tag)
            pinned = f"{image.tag}@{digests[image.tag]}"
            if pinned != image.reference:
                lines[image.line - 1] = lines[image.line - 1].replace(image.reference, pinned, 1)
                changes.append(f"{image} -> {pinned}")
        path.write_text("".join(lines))
    return changes


def main(argv: list[str]) -> int:
    """List (no option), ``--check`` or ``--update`` the images of this repository."""
    if argv not in ([], ["--check"], ["--update"]):
        sys.stderr.write("usage: pin_images.py [--check | --update]\n")
        return 2
    paths = default_files()
    if argv == ["--update"]:
        try:
            changes = update(paths)
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else exc
            sys.stderr.write(f"pin_images: {detail}\n")
            return 1
        sys.stdout.write("".join(f"{change}\n" for change in changes) or "all pinned already\n")
        return 0
    found = [image for path in paths for image in images(path)]
    for image in found:
        sys.stdout.write(f"{'pinned  ' if image.pinned else 'UNPINNED'} {image}\n")
    unpinned = [image for image in found if not image.pinned]
    if argv == ["--check"] and unpinned:
        sys.stderr.write(f"{len(unpinned)} image(s) not pinned by digest: run `make pin-images`\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
