"""`nilai api` start-up failures and warnings: one line naming the setting, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import free_port

pytestmark = pytest.mark.e2e

NILAI = str(Path(sys.executable).parent / "nilai")
SECRET = "hunter2-db"
# Nothing listens on port 1: the connection is refused at once.
UNREACHABLE_DB = f"postgresql://nilai:{SECRET}@127.0.0.1:1/nilai"


def nilai_api(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `nilai api` (expected to stop by itself) with only ``env`` as NILAI_* variables."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("NILAI_")}
    variables.update(NILAI_DATA_DIR=str(tmp_path / "data"), NILAI_PORT=str(free_port()))
    variables.update(env)
    return subprocess.run(
        [NILAI, "api", *args],
        env=variables,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def unreachable_database(tmp_path_factory: pytest.TempPathFactory):
    """One run for several checks: a provider's postgresql:// URL, no keys, a mistyped name."""
    tmp_path = tmp_path_factory.mktemp("unreachable")
    return nilai_api(tmp_path, NILAI_DATABASE_URL=UNREACHABLE_DB, NILAI_API_KEYY="sk-typo")


def test_an_unreachable_database_stops_start_up_in_one_line_naming_its_masked_url(
    unreachable_database: subprocess.CompletedProcess[str],
):
    output = unreachable_database.stdout + unreachable_database.stderr
    assert unreachable_database.returncode != 0, output
    assert "Traceback" not in output
    failures = [line for line in output.splitlines() if "cannot start" in line]
    assert len(failures) == 1, output
    # postgresql:// was read as asyncpg (no "No module named 'psycopg2'"), the password masked.
    assert "NILAI_DATABASE_URL=postgresql+asyncpg://nilai:***@127.0.0.1:1/nilai" in failures[0]
    assert "Connection refused" in failures[0]
    assert SECRET not in output


def test_a_mistyped_variable_is_warned_about_with_the_closest_setting(
    unreachable_database: subprocess.CompletedProcess[str],
):
    assert (
        "NILAI_API_KEYY is not a nilai setting and is ignored; did you mean NILAI_API_KEY?"
        in unreachable_database.stderr
    )
    assert "sk-typo" not in unreachable_database.stderr


def test_a_gateway_without_configured_keys_warns_that_only_stored_keys_get_in(
    unreachable_database: subprocess.CompletedProcess[str],
):
    assert "no API key is configured" in unreachable_database.stderr
    assert "nilai keys create" in unreachable_database.stderr


@pytest.mark.parametrize("level", ["info", "debug"])
def test_an_unreadable_signing_key_stops_start_up_in_one_line_traceback_at_debug(
    tmp_path: Path, level: str
):
    key = tmp_path / "signing_key.pem"
    key.write_text("not a key")
    key.chmod(0o600)
    done = nilai_api(
        tmp_path, NILAI_SIGNING_KEY_PATH=str(key), NILAI_API_KEY="sk-test", NILAI_LOG_LEVEL=level
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    failures = [line for line in output.splitlines() if "cannot start" in line]
    assert len(failures) == 1, output
    assert f"cannot read the signing key {key} (NILAI_SIGNING_KEY_PATH" in failures[0]
    assert ("Traceback" in output) == (level == "debug")
    assert "no API key is configured" not in output


def test_a_start_up_failure_with_several_workers_exits_non_zero_in_one_line(tmp_path: Path):
    """uvicorn's supervisor would stop with status 0 after each worker printed the failure."""
    done = nilai_api(
        tmp_path, "--workers", "2", NILAI_API_KEY="sk-test", NILAI_DATABASE_URL=UNREACHABLE_DB
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    failures = [line for line in output.splitlines() if "cannot start" in line]
    assert len(failures) == 1, output
    assert "Traceback" not in output
