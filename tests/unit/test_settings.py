import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from nilai.settings import NilaiSettings, default_data_dir


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
