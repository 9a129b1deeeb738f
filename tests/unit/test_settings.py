import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from nilai.settings import NilaiSettings, default_data_dir, unknown_variables


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith("NILAI_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    return tmp_path


def _yaml(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "nilai.yaml"
    path.write_text(text)
    monkeypatch.setenv("NILAI_CONFIG_FILE", str(path))
    return path


def test_defaults(tmp_path: Path):
    settings = NilaiSettings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.auth_strategies == ["api_key"]
    assert settings.cors_origins == ["http://localhost:3000", "http://localhost:8080"]
    assert settings.upstream_urls == []
    assert settings.api_key is None
    assert settings.api_keys == []
    assert settings.static_api_keys == []
    assert settings.redis_url is None
    assert settings.redis_prefix == "nilai:"
    assert settings.log_level == "info"
    assert settings.data_dir == tmp_path / "xdg" / "nilai"


def test_data_dir_falls_back_to_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("XDG_DATA_HOME")
    expected = tmp_path / "home" / ".local" / "share" / "nilai"
    assert default_data_dir() == expected
    assert NilaiSettings().data_dir == expected


def test_key_path_default_is_under_data_dir(tmp_path: Path):
    settings = NilaiSettings()
    assert settings.key_path == tmp_path / "xdg" / "nilai" / "signing_key.pem"
    moved = NilaiSettings(data_dir=tmp_path / "elsewhere")
    assert moved.key_path == tmp_path / "elsewhere" / "signing_key.pem"


def test_explicit_signing_key_path_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("NILAI_SIGNING_KEY_PATH", str(tmp_path / "k.pem"))
    assert NilaiSettings().key_path == tmp_path / "k.pem"


def test_scalar_env_values(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NILAI_HOST", "0.0.0.0")
    monkeypatch.setenv("NILAI_PORT", "9001")
    monkeypatch.setenv("NILAI_LOG_LEVEL", "debug")
    monkeypatch.setenv("NILAI_REDIS_URL", "redis://h:1/0")
    settings = NilaiSettings()
    assert settings.host == "0.0.0.0"
    assert settings.port == 9001
    assert settings.log_level == "debug"
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == "redis://h:1/0"
    assert "redis://h" not in repr(settings)


def test_api_keys_comma_list(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NILAI_API_KEYS", "key-one, key-two,,key-three ")
    settings = NilaiSettings()
    assert [k.get_secret_value() for k in settings.api_keys] == ["key-one", "key-two", "key-three"]
    assert settings.static_api_keys == ["key-one", "key-two", "key-three"]
    assert "key-one" not in repr(settings)


def test_static_api_keys_combines_both_variables(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NILAI_API_KEYS", "a,b")
    monkeypatch.setenv("NILAI_API_KEY", "single")
    assert NilaiSettings().static_api_keys == ["a", "b", "single"]


def test_empty_api_key_is_not_accepted_as_a_key(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NILAI_API_KEY", "")
    assert NilaiSettings().static_api_keys == []


def test_upstream_urls_comma_list_strips_trailing_slashes(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NILAI_UPSTREAM_URLS", "http://a:8000/, https://b.example/v//,http://c")
    assert NilaiSettings().upstream_urls == ["http://a:8000", "https://b.example/v", "http://c"]


@pytest.mark.parametrize("url", ["ftp://a", "a.example:8000", "localhost:8000"])
def test_upstream_urls_must_be_http(monkeypatch: pytest.MonkeyPatch, url: str):
    monkeypatch.setenv("NILAI_UPSTREAM_URLS", f"http://ok,{url}")
    with pytest.raises(ValidationError, match="must start with http"):
        NilaiSettings()


def test_auth_strategies_comma_list(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NILAI_AUTH_STRATEGIES", "api_key,nuc")
    assert NilaiSettings().auth_strategies == ["api_key", "nuc"]


def test_invalid_auth_strategy_is_rejected(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NILAI_AUTH_STRATEGIES", "api_key,password")
    with pytest.raises(ValidationError, match="auth_strategies"):
        NilaiSettings()


def test_empty_auth_strategies_is_rejected(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NILAI_AUTH_STRATEGIES", " , ")
    with pytest.raises(ValidationError, match="at least one strategy"):
        NilaiSettings()


def test_cors_origins_comma_list(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NILAI_CORS_ORIGINS", "https://x.example, https://y.example")
    assert NilaiSettings().cors_origins == ["https://x.example", "https://y.example"]


@pytest.mark.parametrize(("name", "value"), [("NILAI_PORT", "70000"), ("NILAI_PORT", "x")])
def test_out_of_range_values_are_rejected(monkeypatch: pytest.MonkeyPatch, name: str, value: str):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        NilaiSettings()


def test_settings_are_frozen():
    settings = NilaiSettings()
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]


def test_yaml_file_values_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    _yaml(
        tmp_path,
        "port: 9100\n"
        "host: 10.0.0.1\n"
        "upstream_urls:\n  - http://m1:8000/\n  - http://m2:8000\n"
        "auth_strategies: [api_key, nuc]\n"
        "api_keys: [yaml-key]\n"
        "discovery_ttl_s: 3.5\n",
        monkeypatch,
    )
    settings = NilaiSettings()
    assert settings.port == 9100
    assert settings.host == "10.0.0.1"
    assert settings.upstream_urls == ["http://m1:8000", "http://m2:8000"]
    assert settings.auth_strategies == ["api_key", "nuc"]
    assert settings.static_api_keys == ["yaml-key"]
    assert settings.discovery_ttl_s == 3.5


def test_yaml_comma_string_is_split(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    _yaml(tmp_path, 'cors_origins: "https://a, https://b"\n', monkeypatch)
    assert NilaiSettings().cors_origins == ["https://a", "https://b"]


def test_unknown_yaml_key_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    _yaml(tmp_path, "port: 9100\nprot: 9200\n", monkeypatch)
    with pytest.raises(ValidationError, match="prot"):
        NilaiSettings()


def test_invalid_yaml_value_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    _yaml(tmp_path, "upstream_urls: [ftp://x]\n", monkeypatch)
    with pytest.raises(ValidationError, match="must start with http"):
        NilaiSettings()


def test_missing_yaml_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("NILAI_CONFIG_FILE", str(tmp_path / "absent.yaml"))
    with pytest.raises(ValueError, match="no such file"):
        NilaiSettings()


def test_env_takes_precedence_over_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    _yaml(tmp_path, "port: 9100\nhost: 10.0.0.1\nupstream_urls: [http://yaml]\n", monkeypatch)
    monkeypatch.setenv("NILAI_PORT", "9200")
    monkeypatch.setenv("NILAI_UPSTREAM_URLS", "http://env/")
    settings = NilaiSettings()
    assert settings.port == 9200
    assert settings.upstream_urls == ["http://env"]
    assert settings.host == "10.0.0.1"  # not set in env: the YAML value stays


def test_init_arguments_take_precedence_over_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NILAI_PORT", "9200")
    assert NilaiSettings(port=9300).port == 9300


def test_every_setting_is_documented_in_env_sample():
    from pathlib import Path

    text = (Path(__file__).parents[2] / ".env.sample").read_text()
    missing = [name for name in NilaiSettings.model_fields if f"NILAI_{name.upper()}=" not in text]
    assert missing == []


# --- errors never repeat a value (SECURITY.md: no secrets in output) ---------------------------

SECRET = "S3cretPassw0rd"  # pragma: allowlist secret
NILAI = str(Path(sys.executable).parent / "nilai")

# (what is wrong, environment, YAML file text or None, the setting the error must name)
BAD_SETTINGS = [
    ("upstream URL", {"NILAI_UPSTREAM_URLS": f"ftp://user:{SECRET}@host"}, None, "upstream_urls"),
    (
        "second upstream URL",
        {"NILAI_UPSTREAM_URLS": f"http://ok,user:{SECRET}@host:8000"},
        None,
        "upstream_urls",
    ),
    (
        "attestation URL",
        {"NILAI_ATTESTATION_URL": f"ftp://user:{SECRET}@host"},
        None,
        "attestation_url",
    ),
    (
        "mistyped YAML key",
        {},
        f"databse_url: postgresql+asyncpg://nilai:{SECRET}@db/nilai\n",
        "databse_url",
    ),
    ("YAML value of the wrong type", {}, f"port: '{SECRET}'\n", "port"),
    (
        "bad YAML upstream URL",
        {},
        f"upstream_urls: [ftp://nilai:{SECRET}@model:8000]\n",
        "upstream_urls",
    ),
]


def _bad_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], yaml_text: str | None
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if yaml_text is not None:
        _yaml(tmp_path, yaml_text, monkeypatch)


@pytest.mark.parametrize(
    ("env", "yaml_text", "field"),
    [case[1:] for case in BAD_SETTINGS],
    ids=[case[0] for case in BAD_SETTINGS],
)
def test_settings_errors_name_the_setting_but_never_its_value(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    env: dict[str, str],
    yaml_text: str | None,
    field: str,
):
    """str(ValidationError) is what a traceback or a log line shows: no input in it."""
    _bad_settings(monkeypatch, tmp_path, env, yaml_text)
    with pytest.raises(ValidationError) as raised:
        NilaiSettings()
    assert field in str(raised.value)
    assert SECRET not in str(raised.value)
    assert SECRET not in repr(raised.value.errors(include_input=False))


# Every case through `nilai api`; the two other ways settings errors are printed (the admin
# commands, `nilai worker local`) with one case each from the environment and from YAML.
COMMAND_CASES = [(["api"], case) for case in BAD_SETTINGS] + [
    (command, case)
    for command in (["keys", "list"], ["worker", "local", "--model", "m"])
    for case in (BAD_SETTINGS[0], BAD_SETTINGS[3])
]


@pytest.mark.parametrize(
    ("command", "env", "yaml_text", "field"),
    [(command, *case[1:]) for command, case in COMMAND_CASES],
    ids=[f"{' '.join(command[:2])}: {case[0]}" for command, case in COMMAND_CASES],
)
def test_commands_print_where_settings_are_wrong_never_the_secret(
    tmp_path: Path,
    command: list[str],
    env: dict[str, str],
    yaml_text: str | None,
    field: str,
):
    """The commands' own output: exit 2, the setting named, the password nowhere."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("NILAI_")}
    variables.update(env, NILAI_DATA_DIR=str(tmp_path / "data"))
    if yaml_text is not None:
        config = tmp_path / "nilai.yaml"
        config.write_text(yaml_text)
        variables["NILAI_CONFIG_FILE"] = str(config)
    done = subprocess.run(
        [NILAI, *command], env=variables, capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "invalid settings" in done.stderr
    assert field in done.stderr
    assert SECRET not in output
    assert "Traceback" not in output


def test_a_yaml_syntax_error_names_the_line_not_its_text(tmp_path: Path):
    config = tmp_path / "nilai.yaml"
    config.write_text(f"database_url: postgresql://nilai:{SECRET}@db/nilai\n  port: [9100\n")
    variables = {k: v for k, v in os.environ.items() if not k.startswith("NILAI_")}
    variables["NILAI_CONFIG_FILE"] = str(config)
    done = subprocess.run(
        [NILAI, "api"], env=variables, capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "not valid YAML at line 2" in done.stderr
    assert SECRET not in output
    assert "Traceback" not in output


def test_a_yaml_file_that_is_not_a_mapping_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    _yaml(tmp_path, "- port\n- 9100\n", monkeypatch)
    with pytest.raises(ValueError, match="must be a mapping of setting names"):
        NilaiSettings()


# --- forwarded headers -------------------------------------------------------------------------


def test_forwarded_headers_are_believed_from_no_one_by_default():
    assert NilaiSettings().forwarded_allow_ips == []


def test_forwarded_allow_ips_are_written_out_as_networks(monkeypatch: pytest.MonkeyPatch):
    """uvicorn parses "10.1.2.3/8" strictly and would silently trust nothing for it."""
    monkeypatch.setenv("NILAI_FORWARDED_ALLOW_IPS", "127.0.0.1, 10.1.2.3/8,::1")
    assert NilaiSettings().forwarded_allow_ips == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]


@pytest.mark.parametrize("value", ["*", "proxy.internal", "10.0.0.0/33"])
def test_forwarded_allow_ips_must_be_addresses(monkeypatch: pytest.MonkeyPatch, value: str):
    monkeypatch.setenv("NILAI_FORWARDED_ALLOW_IPS", value)
    with pytest.raises(ValidationError, match="forwarded_allow_ips"):
        NilaiSettings()


@pytest.mark.parametrize(
    ("url", "read_as"),
    [
        ("postgresql://nilai:pw@db:5432/nilai", "postgresql+asyncpg://nilai:pw@db:5432/nilai"),
        ("postgres://nilai:pw@db/nilai", "postgresql+asyncpg://nilai:pw@db/nilai"),
        ("postgresql+asyncpg://nilai@db/nilai", "postgresql+asyncpg://nilai@db/nilai"),
        ("sqlite+aiosqlite:////var/lib/nilai.db", "sqlite+aiosqlite:////var/lib/nilai.db"),
    ],
)
def test_a_postgresql_url_is_read_with_the_asyncpg_driver(
    monkeypatch: pytest.MonkeyPatch, url: str, read_as: str
):
    """The URL a provider hands out (``postgresql://``, ``postgres://``) works as written."""
    monkeypatch.setenv("NILAI_DATABASE_URL", url)
    assert NilaiSettings().db_url == read_as


def test_a_mistyped_nilai_variable_is_named_with_the_closest_setting():
    environ = {
        "NILAI_API_KEYY": "sk-secret",
        "NILAI_PORT": "8080",
        "NILAI_ZQXW": "1",
        "NILAIX": "1",
        "PATH": "/bin",
    }
    assert unknown_variables(environ) == [
        "NILAI_API_KEYY is not a nilai setting and is ignored; did you mean NILAI_API_KEY?",
        "NILAI_ZQXW is not a nilai setting and is ignored",
    ]


def test_variables_nilai_reads_outside_its_settings_are_not_unknown():
    environ = dict.fromkeys(
        ["NILAI_CONFIG_FILE", "NILAI_VLLM_BIN", "NILAI_INSTALL_HOOKS", "NILAI_URL"], "x"
    )
    assert unknown_variables(environ) == []


def test_admin_commands_warn_about_a_mistyped_variable_before_naming_their_database(
    tmp_path: Path,
):
    """A typo in NILAI_DATABASE_URL sends an admin command to the default database: say so."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("NILAI_")}
    variables.update(
        NILAI_DATA_DIR=str(tmp_path / "data"), NILAI_DATABASE_URLL="sqlite+aiosqlite:///x.db"
    )
    done = subprocess.run(
        [NILAI, "accounts", "list"],
        env=variables,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    warning, database = done.stderr.splitlines()[:2]
    assert warning == (
        "warning: NILAI_DATABASE_URLL is not a nilai setting and is ignored; "
        "did you mean NILAI_DATABASE_URL?"
    )
    assert database.startswith("using the SQLite database ")
