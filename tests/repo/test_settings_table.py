"""README's configuration table is generated from .env.sample and kept in step with it."""

import subprocess
import sys
from pathlib import Path

from nilai.settings import NilaiSettings

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import settings_table  # noqa: E402


def test_readme_table_is_up_to_date():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "settings_table.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_table_lists_every_setting_of_the_model():
    names = {name for name, _, _ in settings_table.rows((ROOT / ".env.sample").read_text())}
    fields = {f"NILAI_{field.upper()}" for field in NilaiSettings.model_fields}
    assert fields <= names


def test_a_stale_table_is_detected():
    readme = f"intro\n{settings_table.START}\n| old |\n{settings_table.END}\ntail\n"
    sample = "# The port.\n# NILAI_PORT=8080\n"
    updated = settings_table.with_table(readme, settings_table.table(sample))
    assert updated != readme
    assert "| `NILAI_PORT` | `8080` | The port. |" in updated
    assert updated.endswith("tail\n")
