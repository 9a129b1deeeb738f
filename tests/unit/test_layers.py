"""Lower layers never import the gateway: workers, the CLI tools, limits, auth and the store
stand on their own, so a worker or an admin command does not load the HTTP gateway."""

from __future__ import annotations

import ast
from pathlib import Path

import nilai

PACKAGE = Path(nilai.__file__).parent

LOWER_LAYERS = ("workers", "cli", "limits", "auth", "store", "billing")

# The CLI commands that start a gateway are its wiring: they must import it.
GATEWAY_WIRING = {"cli/serve.py", "cli/api.py"}


def _imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_lower_layer_module_imports_the_gateway():
    leaks: list[tuple[str, str]] = []
    for layer in LOWER_LAYERS:
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            relative = path.relative_to(PACKAGE).as_posix()
            if relative in GATEWAY_WIRING:
                continue
            for module in _imported_modules(ast.parse(path.read_text(), str(path))):
                in_gateway = module == "nilai.gateway" or module.startswith("nilai.gateway.")
                if in_gateway:
                    leaks.append((relative, module))
    assert leaks == []
