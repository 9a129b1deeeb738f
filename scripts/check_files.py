"""Syntax checks for data files, used by the local pre-commit hooks (no downloads needed).

Usage: ``python scripts/check_files.py {yaml,toml} FILE...``; exits 1 naming each bad file.
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import yaml


def check_yaml(path: Path) -> None:
    """Parse every document of a YAML file."""
    with path.open("rb") as stream:
        for _ in yaml.safe_load_all(stream):
            pass


def check_toml(path: Path) -> None:
    """Parse a TOML file."""
    with path.open("rb") as stream:
        tomllib.load(stream)


CHECKS: dict[str, tuple[Callable[[Path], None], tuple[type[Exception], ...]]] = {
    "yaml": (check_yaml, (yaml.YAMLError, UnicodeDecodeError)),
    "toml": (check_toml, (tomllib.TOMLDecodeError, UnicodeDecodeError)),
}


def main(argv: list[str]) -> int:
    """Check each file with the named checker; return 1 if any is invalid."""
    if not argv or argv[0] not in CHECKS:
        sys.stderr.write(f"usage: check_files.py {{{','.join(CHECKS)}}} FILE...\n")
        return 2
    check, errors = CHECKS[argv[0]]
    status = 0
    for name in argv[1:]:
        try:
            check(Path(name))
        except errors as exc:
            sys.stderr.write(f"{name}: invalid {argv[0]}: {exc}\n")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
