"""The operators' Locust file compiles and defines a user with tasks (Locust itself optional)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

LOCUSTFILE = Path(__file__).resolve().parents[2] / "locustfile.py"


def _tree() -> ast.Module:
    source = LOCUSTFILE.read_text(encoding="utf-8")
    compile(source, str(LOCUSTFILE), "exec")
    return ast.parse(source, filename=str(LOCUSTFILE))


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _is_task(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return _base_name(target) == "task"


def test_it_defines_an_http_user_with_tasks() -> None:
    users = [
        node
        for node in _tree().body
        if isinstance(node, ast.ClassDef) and any(_base_name(b) == "HttpUser" for b in node.bases)
    ]
    assert users, "no HttpUser subclass"
    for user in users:
        tasks = {
            node.name
            for node in user.body
            if isinstance(node, ast.FunctionDef) and any(map(_is_task, node.decorator_list))
        }
        assert {"chat", "chat_stream", "list_models"} <= tasks, tasks


def test_it_documents_how_to_install_locust_and_reports_ttft() -> None:
    source = LOCUSTFILE.read_text(encoding="utf-8")
    docstring = ast.get_docstring(_tree()) or ""
    assert "pip install locust" in docstring
    assert "chat stream TTFT" in source
    assert "signature" in source
    for setting in ("NILAI_URL", "NILAI_API_KEY", "NILAI_MODEL", "NILAI_STREAM_RATIO"):
        assert setting in source, setting


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust not installed")
def test_it_imports_under_locust() -> None:
    # Locust patches the standard library (gevent) on import: keep that out of this process.
    probe = (
        "import importlib.util, sys\n"
        "from locust import HttpUser\n"
        f"spec = importlib.util.spec_from_file_location('nilai_locustfile', {str(LOCUSTFILE)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "users = [v for v in vars(module).values()\n"
        "         if isinstance(v, type) and issubclass(v, HttpUser) and v is not HttpUser]\n"
        "assert users and all(u.tasks for u in users), users\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
