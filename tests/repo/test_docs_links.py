"""scripts/check_links.py: the repository's Markdown links hold, and broken ones are caught."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_links.py"


def run_checker(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def check_links():
    """The checker imported as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_links", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_links"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("check_links", None)


def test_repository_links_are_valid():
    result = run_checker(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all OK" in result.stdout


def test_broken_links_fail_with_file_and_line(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Set-up steps\n\ntext\n")
    (tmp_path / "README.md").write_text(
        "# Title\n"
        "\n"
        "[ok](docs/guide.md) and [ok anchor](docs/guide.md#set-up-steps)\n"
        "[missing file](docs/nope.md)\n"
        "![missing image](img/logo.png)\n"
        "[bad anchor](docs/guide.md#no-such-heading)\n"
        "[bad local anchor](#nowhere) [good local anchor](#title)\n"
        "[bad url](https://exa mple.com/x) [good url](https://example.com/a_(b))\n"
        "```sh\n"
        "[inside code](not/checked.md)\n"
        "```\n"
        "`[inline code](not/checked.md)`\n"
    )
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "vendored.md").write_text("[skipped](nowhere.md)\n")

    result = run_checker(tmp_path)

    assert result.returncode == 1
    lines = result.stdout.splitlines()
    broken = [line for line in lines if not line.startswith("check_links:")]
    assert [line.split(": ", 1)[0] for line in broken] == [
        "README.md:4",
        "README.md:5",
        "README.md:6",
        "README.md:7",
        "README.md:8",
    ]
    assert "docs/nope.md" in broken[0]
    assert "no-such-heading" in broken[2]
    assert lines[-1] == "check_links: 2 Markdown files, 9 links checked, 5 broken"


def test_links_leaving_the_root_are_broken(tmp_path: Path):
    (tmp_path / "outside.md").write_text("# Outside\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("[up](../outside.md)\n")
    result = run_checker(repo)
    assert result.returncode == 1
    assert "README.md:1: link leaves the repository" in result.stdout


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Set-up", "set-up"),
        ("What `nilai verify` checks", "what-nilai-verify-checks"),
        ("Errors: status, type & code", "errors-status-type--code"),
        ("GET /v1/public_key", "get-v1public_key"),
        ("[Linked](x.md) heading", "linked-heading"),
        ("Ünïcode Title!", "ünïcode-title"),
    ],
)
def test_github_slugs(check_links, heading: str, slug: str):
    assert check_links.github_slug(heading) == slug


def test_repeated_and_setext_headings(check_links, tmp_path: Path):
    doc = tmp_path / "doc.md"
    doc.write_text('Intro\n=====\n\n## Step\n\n## Step\n\n<a id="custom"></a>\n')
    check_links.anchors_of.cache_clear()
    assert check_links.anchors_of(doc) == {"intro", "step", "step-1", "custom"}


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://example.com", True),
        ("http://127.0.0.1:8080/v1/models", True),
        ("https://[::1]:8080/", True),
        ("https://", False),
        ("https://bad_host.example", False),
        ("http://example.com:port/", False),
    ],
)
def test_url_syntax(check_links, url: str, ok: bool):
    assert (check_links.check_url(url) is None) is ok
