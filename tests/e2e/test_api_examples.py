"""scripts/api_examples.py catches recorded examples that are not what the gateway answers.

That docs/API.md itself is current is CI's step "API examples (make docs-check)", the same
check: running it here too would start the gateway twice for one answer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "api_examples.py"
DOC = ROOT / "docs" / "API.md"


def check(doc: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--doc", str(doc)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_stale_examples_fail_the_check(tmp_path: Path):
    """The bug the check exists for: a hash the shown request does not give, headers not printed."""
    text = DOC.read_text()
    verify_at = text.index("<!-- api-example: verify -->")
    shown_hash = "request_sha256 fdd3faf6b74bb75fd1bb9bc1a3cd6fd667d75f5af9417172b6750ff3c5b24024"
    assert text.index(shown_hash, verify_at) > verify_at  # the hash of the shown req.json
    stale = text[:verify_at] + text[verify_at:].replace(shown_hash, "request_sha256 " + "0" * 64, 1)
    stale = stale.replace(
        "curl -s -i -N http://127.0.0.1:18080", "curl -s -N http://127.0.0.1:18080"
    )
    assert stale.count("<!-- api-example:") == text.count("<!-- api-example:")
    doc = tmp_path / "API.md"
    doc.write_text(stale)
    done = check(doc)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "--- verify (shown)" in done.stderr
    assert "--- chat-stream (shown)" in done.stderr
    assert "-HTTP/1.1 200 OK" in done.stderr  # shown, but not printed without -i
