"""Settings: one tree, read from ``NILAI_*`` variables and an optional YAML file.

The names are the operator contract (DESIGN §8), so fields are flat: each field ``x`` is the
variable ``NILAI_X`` and the YAML key ``x``. A YAML key that names no field is an error rather
than silently ignored.

Settings hold secrets (database and Redis URLs with passwords, API keys), so an invalid value is
never repeated in an error: pydantic's errors leave out the input (``hide_input_in_errors``), no
validator quotes a value that may hold credentials, and ``settings_problems`` words the errors
for the command line as location and message only.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Self, cast

import yaml
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from nilai.billing.prices import Price, parse_amount

CONFIG_FILE_VARIABLE = "NILAI_CONFIG_FILE"

AuthStrategy = Literal["api_key", "nuc", "credit"]
CommaList = Annotated[list[str], NoDecode]


POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")
"""Database URL schemes read as ``postgresql+asyncpg://``."""


def default_data_dir() -> Path:
    """Return the per-user data directory (``$XDG_DATA_HOME/nilai``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "nilai"


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _scheme_of(url: str) -> str:
    """The scheme of ``url`` for an error message; never the rest, which may hold a password."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]{0,31})://", url)
    return f"scheme {match.group(1).lower()!r}" if match else "no scheme"


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in the YAML file at ``path``; a ValueError that names a place, not a value.

    A file-backed YAML error carries no excerpt of the file, but its wording is redone here
    anyway, so that no future parser message can quote a line that holds a password.
    """
    try:
        with path.open(encoding="utf-8") as stream:
            data: object = yaml.safe_load(stream)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(
            f"{CONFIG_FILE_VARIABLE}={path}: not valid YAML{where}: {exc.problem}"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{CONFIG_FILE_VARIABLE}={path}: not a readable YAML file ({type(exc).__name__})"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        # A ValueError, as every other settings problem, for the commands to report alike.
        raise ValueError(  # noqa: TRY004
            f"{CONFIG_FILE_VARIABLE}={path}: must be a mapping of setting names to values, "
            f"not a {type(data).__name__}"
        )
    return cast("dict[str, Any]", data)


UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
"""A UUID in its usual text form (nilDB's collection and document ids)."""


def _http_urls(urls: list[str], what: str) -> list[str]:
    """``urls`` without trailing slashes, or a ValueError for one that is not http(s)."""
    for number, url in enumerate(urls, 1):
        if not url.startswith(("http://", "https://")):
            # The URL may carry user:password@, so only its position and scheme are named.
            raise ValueError(
                f"entry {number} has {_scheme_of(url)}; {what} must start with http:// or https://"
            )
    return [url.rstrip("/") for url in urls]


SERVER_TOOL_NAMES = ("execute_python",)
"""The tools the gateway can run itself (``NILAI_SERVER_TOOLS``)."""


class NilaiSettings(BaseSettings):
    """Everything an operator can configure; see ``.env.sample`` for each variable."""

    model_config = SettingsConfigDict(
        env_prefix="NILAI_",
        extra="forbid",
        frozen=True,
        validate_default=True,
        # str(ValidationError) would otherwise quote each bad value, password and all, in any
        # traceback or log line that shows it.
        hide_input_in_errors=True,
    )

    # server
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    data_dir: Path = Field(default_factory=default_data_dir)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    # auth
    auth_strategies: Annotated[list[AuthStrategy], NoDecode] = Field(
        default_factory=lambda: ["api_key"]  # pyright: ignore[reportUnknownLambdaType]
    )
    api_key: SecretStr | None = None
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list[SecretStr])
    api_key_hashes: CommaList = Field(default_factory=list)
    nuc_auto_accounts: bool = True
    nuc_root_issuers: CommaList = Field(default_factory=list)
    nuc_max_lifetime_s: int = Field(default=86_400, ge=60, le=30 * 86_400)
    nuc_replay_protection: bool = True

    # Nillion's credit service (nilauth-credit): keys for the ``credit`` strategy and metering
    # (docs/API.md "Credit metering")
    credit_url: str | None = None
    credit_api_token: SecretStr | None = None
    credit_timeout_s: float = Field(default=5.0, gt=0, le=60)
    credit_retry_after_s: int = Field(default=5, ge=1, le=3600)
    credit_fail_open: bool = False
    credit_fail_open_s: float = Field(default=300.0, gt=0, le=86_400)
    credit_meter_nuc: bool = True
    credit_default_max_tokens: int = Field(default=4096, ge=1)
    credit_unlock_grace_s: float = Field(default=10.0, ge=0, le=600)

    # private prompts in nilDB (off unless nildb_nodes is set; docs/API.md "Private prompts")
    nildb_nodes: CommaList = Field(default_factory=list)
    nildb_nilauth_url: str | None = None
    nildb_builder_key: SecretStr | None = None
    nildb_builder_key_file: Path | None = None
    nildb_collection: str | None = None
    nildb_delegation_ttl_s: int = Field(default=60, ge=10, le=3600)
    nildb_timeout_s: float = Field(default=5.0, gt=0, le=60)
    nildb_prompt_cache_s: float = Field(default=60.0, ge=0, le=3600)
    nildb_max_prompt_bytes: int = Field(default=4096, ge=1, le=1024 * 1024)

    # web search (off unless web_search_api_key is set; docs/API.md "Web search")
    web_search_api_key: SecretStr | None = None
    web_search_base_url: str = "https://api.search.brave.com"
    web_search_timeout_s: float = Field(default=5.0, gt=0, le=60)
    web_search_safesearch: Literal["off", "moderate", "strict"] = "moderate"
    web_search_results_per_query: int = Field(default=3, ge=1, le=20)
    web_search_max_topics: int = Field(default=3, ge=1, le=3)
    web_search_planner_max_tokens: int = Field(default=256, ge=16, le=4096)
    web_search_planner_timeout_s: float = Field(default=10.0, gt=0, le=120)
    web_search_page_timeout_s: float = Field(default=5.0, gt=0, le=60)
    web_search_deadline_s: float = Field(default=8.0, gt=0, le=120)
    web_search_max_page_bytes: int = Field(default=2 * 1024 * 1024, ge=1024, le=16 * 1024 * 1024)
    web_search_max_source_chars: int = Field(default=4000, ge=100, le=100_000)
    web_search_allow_networks: CommaList = Field(default_factory=list)

    # NilRAG (off unless nilrag_enabled; docs/API.md "NilRAG")
    nilrag_enabled: bool = False
    nilrag_model_dir: Path | None = None
    nilrag_node_timeout_s: float = Field(default=5.0, gt=0, le=60)
    nilrag_deadline_s: float = Field(default=15.0, gt=0, le=120)
    nilrag_max_response_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    nilrag_max_documents: int = Field(default=100_000, ge=1, le=10_000_000)
    nilrag_workers: int = Field(default=2, ge=1, le=32)
    nilrag_allow_networks: CommaList = Field(default_factory=list)

    # server-side tools (off unless server_tools names one; docs/API.md "Server-side tools")
    server_tools: CommaList = Field(default_factory=list)
    tool_max_rounds: int = Field(default=1, ge=1, le=10)
    tool_max_calls_per_round: int = Field(default=4, ge=1, le=32)
    tool_timeout_s: float = Field(default=10.0, gt=0, le=300)
    tool_max_output_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    code_executor: Literal["local", "disabled"] = "local"
    sandbox: Literal["auto", "bubblewrap", "rlimit"] = "auto"
    sandbox_memory_bytes: int = Field(default=512 * 1024 * 1024, ge=64 * 1024 * 1024)
    sandbox_cpu_s: int = Field(default=10, ge=1, le=600)
    sandbox_max_processes: int = Field(default=16, ge=1, le=1024)
    sandbox_max_file_bytes: int = Field(default=16 * 1024 * 1024, ge=0)

    # storage: accounts, keys, query logs
    database_url: SecretStr | None = None
    db_auto_migrate: bool = True
    key_cache_ttl_s: float = Field(default=3.0, gt=0, le=5)
    usage_queue_capacity: int = Field(default=100_000, ge=1)
    usage_batch_size: int = Field(default=500, ge=1)
    usage_flush_interval_s: float = Field(default=1.0, gt=0)
    usage_stall_s: float = Field(default=30.0, gt=0)

    # rate limits (0 switches a limit off) and concurrency
    rate_limit_minute: int = Field(default=100, ge=0)
    rate_limit_hour: int = Field(default=1000, ge=0)
    rate_limit_day: int = Field(default=10000, ge=0)
    rate_limit_lifetime: int = Field(default=0, ge=0)
    model_concurrency: int = Field(default=50, ge=1)
    model_concurrency_limits: CommaList = Field(default_factory=list)
    web_search_rps: int = Field(default=20, ge=0)
    web_search_rate_limit_minute: int = Field(default=10, ge=0)
    web_search_rate_limit_hour: int = Field(default=100, ge=0)
    web_search_rate_limit_day: int = Field(default=1000, ge=0)
    web_search_rate_limit_lifetime: int = Field(default=0, ge=0)
    rate_limit_fail_open: bool = False
    concurrency_lease_ttl_s: float = Field(default=15.0, gt=0, le=30)

    # shared state (limits, discovery); unset means in-process
    redis_url: SecretStr | None = None
    redis_prefix: str = Field(default="nilai:", min_length=1)
    redis_max_connections: int = Field(default=256, ge=4)

    # embedded default (nilai serve): model directory or hub id; unset means the tiny model
    model: str | None = None

    # discovery and routing
    upstream_urls: CommaList = Field(default_factory=list)
    discovery_ttl_s: float = Field(default=15.0, gt=0)
    discovery_refresh_s: float = Field(default=1.0, gt=0)
    endpoint_eject_s: float = Field(default=5.0, ge=0)
    endpoint_probe_s: float = Field(default=5.0, ge=0)
    discovery_grace_s: float = Field(default=30.0, ge=0)

    # upstream relay
    upstream_connect_timeout_s: float = Field(default=2.0, gt=0)
    upstream_read_timeout_s: float = Field(default=60.0, gt=0)
    request_timeout_s: float = Field(default=60.0, gt=0)
    upstream_max_connections: int = Field(default=1000, ge=1)

    # signing
    signing_key_path: Path | None = None

    # attestation (DESIGN §5)
    attestation_provider: Literal["simulated", "http", "tsm"] = "simulated"
    attestation_url: str | None = None
    attestation_tsm_path: Path = Path("/sys/kernel/config/tsm/report")
    attestation_timeout_s: float = Field(default=10.0, gt=0)
    attestation_rate_limit_minute: int = Field(default=60, ge=0)
    attestation_collateral: Path | None = None
    attestation_pccs_url: str | None = None

    # hardening
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)
    header_read_timeout_s: float = Field(default=10.0, gt=0)
    body_read_timeout_s: float = Field(default=30.0, gt=0)
    keepalive_timeout_s: float = Field(default=130.0, gt=0)
    max_connections: int = Field(default=1024, ge=1)
    max_messages: int = Field(default=2048, ge=1)
    max_json_items: int = Field(default=32_768, ge=16)
    stream_first_byte_timeout_s: float = Field(default=60.0, gt=0)
    stream_idle_timeout_s: float = Field(default=60.0, gt=0)
    shutdown_grace_s: float = Field(default=10.0, gt=0, le=600)
    hsts: bool = False
    metrics_enabled: bool = True
    metrics_allow: CommaList = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    forwarded_allow_ips: CommaList = Field(default_factory=list)
    docs_enabled: bool = True

    cors_origins: CommaList = Field(
        default_factory=lambda: ["http://localhost:3000", "http://localhost:8080"]
    )

    # pricing (docs/API.md "Pricing"): the default price, as decimal strings of currency units
    price_prompt_per_million: str = "2.0"
    price_completion_per_million: str = "2.0"
    price_web_search: str = "0.05"
    price_refresh_s: float = Field(default=10.0, gt=0, le=3600)
    admin_token: SecretStr | None = None

    @field_validator(
        "price_prompt_per_million",
        "price_completion_per_million",
        "price_web_search",
        mode="before",
    )
    @classmethod
    def _check_price(cls, value: object) -> str:
        # YAML may give a number; it is read as the decimal it is written as.
        if not isinstance(value, str | int | float | Decimal):
            raise ValueError("must be a decimal number such as 2.5")  # noqa: TRY004
        parse_amount(value)
        return str(value).strip()

    @property
    def default_price(self) -> Price:
        """The price of a model without one of its own, in micro-units."""
        return Price(
            prompt_per_million=parse_amount(self.price_prompt_per_million),
            completion_per_million=parse_amount(self.price_completion_per_million),
            web_search=parse_amount(self.price_web_search),
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Read init arguments, then the environment, then the YAML file if one is named."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_VARIABLE)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise ValueError(f"{CONFIG_FILE_VARIABLE}={config_file}: no such file")
            sources.append(InitSettingsSource(settings_cls, init_kwargs=_read_yaml(path)))
        return tuple(sources)

    @field_validator(
        "auth_strategies",
        "api_keys",
        "api_key_hashes",
        "nuc_root_issuers",
        "upstream_urls",
        "nildb_nodes",
        "web_search_allow_networks",
        "nilrag_allow_networks",
        "server_tools",
        "cors_origins",
        "metrics_allow",
        "forwarded_allow_ips",
        "model_concurrency_limits",
        mode="before",
    )
    @classmethod
    def _comma_lists(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("upstream_urls")
    @classmethod
    def _check_upstream_urls(cls, value: list[str]) -> list[str]:
        return _http_urls(value, "upstream URLs")

    @field_validator("nildb_nodes")
    @classmethod
    def _check_nildb_nodes(cls, value: list[str]) -> list[str]:
        return _http_urls(value, "nilDB node URLs")

    @field_validator("nildb_nilauth_url")
    @classmethod
    def _check_nilauth_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"has {_scheme_of(value)}; it must start with http:// or https://")
        return value.rstrip("/") if value else value

    @field_validator("nildb_collection")
    @classmethod
    def _check_collection(cls, value: str | None) -> str | None:
        if value is not None and not UUID.fullmatch(value):
            raise ValueError("nildb_collection must be a collection id (a UUID)")
        return value.lower() if value else value

    @field_validator("server_tools")
    @classmethod
    def _check_server_tools(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(SERVER_TOOL_NAMES))
        if unknown:
            raise ValueError(
                f"names {', '.join(unknown)}; the gateway can run {', '.join(SERVER_TOOL_NAMES)}"
            )
        return list(dict.fromkeys(value))

    @field_validator("web_search_base_url")
    @classmethod
    def _check_search_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"has {_scheme_of(value)}; it must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("attestation_url", "attestation_pccs_url")
    @classmethod
    def _check_attestation_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"has {_scheme_of(value)}; it must start with http:// or https://")
        return value

    @field_validator("api_key_hashes")
    @classmethod
    def _check_hashes(cls, value: list[str]) -> list[str]:
        for digest in value:
            if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                raise ValueError("api_key_hashes must be hex SHA-256 digests (64 characters)")
        return [digest.lower() for digest in value]

    @field_validator("metrics_allow", "web_search_allow_networks", "nilrag_allow_networks")
    @classmethod
    def _check_networks(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(
                    f"{info.field_name}: {item!r} is not an IP address or network"
                ) from exc
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        # uvicorn reads "10.0.0.1/8" strictly and would silently trust nothing for it, so each
        # entry is written out as the network it names; "*" (trust anyone) is refused.
        networks: list[str] = []
        for item in value:
            try:
                networks.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError as exc:
                raise ValueError(
                    f"{item!r} is not an IP address or network "
                    "(list the proxies' addresses; '*' is not accepted)"
                ) from exc
        return networks

    @field_validator("nuc_root_issuers")
    @classmethod
    def _check_root_issuers(cls, value: list[str]) -> list[str]:
        dids: list[str] = []
        for item in value:
            hex_key = item.removeprefix("did:nil:")
            if not re.fullmatch(r"0[23][0-9a-fA-F]{64}", hex_key):
                raise ValueError(
                    "nuc_root_issuers must be did:nil:<hex> DIDs or hex compressed public keys "
                    "(66 hex characters starting 02 or 03)"
                )
            dids.append("did:nil:" + hex_key.lower())
        return dids

    @field_validator("model_concurrency_limits")
    @classmethod
    def _check_concurrency(cls, value: list[str]) -> list[str]:
        for item in value:
            model, sep, count = item.rpartition("=")
            if not sep or not model or not count.isdigit() or int(count) < 1:
                raise ValueError(f"model_concurrency_limits entry {item!r} must be MODEL=N, N >= 1")
        return value

    @field_validator("database_url")
    @classmethod
    def _asyncpg_for_postgresql(cls, value: SecretStr | None) -> SecretStr | None:
        """``postgresql://`` and ``postgres://`` (libpq's spelling) mean the asyncpg driver.

        SQLAlchemy reads a bare ``postgresql://`` as psycopg2, which nilai does not install:
        the URL an operator copies from their provider would fail with ``No module named``.
        """
        if value is None:
            return None
        url = value.get_secret_value()
        for scheme in POSTGRESQL_SCHEMES:
            if url.startswith(scheme):
                return SecretStr("postgresql+asyncpg://" + url.removeprefix(scheme))
        return value

    @field_validator("credit_url")
    @classmethod
    def _check_credit_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"has {_scheme_of(value)}; it must start with http:// or https://")
        return value.rstrip("/") if value else None

    @model_validator(mode="after")
    def _check_strategies(self) -> Self:
        if not self.auth_strategies:
            raise ValueError("auth_strategies must name at least one strategy")
        if self.credit_url and self.credit_api_token is None:
            raise ValueError("credit_url needs credit_api_token (the credit service's API token)")
        if "credit" in self.auth_strategies and not self.credit_url:
            raise ValueError(
                "the credit strategy needs credit_url and credit_api_token (the credit service)"
            )
        if self.nildb_builder_key is not None and self.nildb_builder_key_file is not None:
            raise ValueError("set nildb_builder_key or nildb_builder_key_file, not both")
        return self

    @property
    def nildb_enabled(self) -> bool:
        """Whether private prompts from nilDB are on (``NILAI_NILDB_NODES`` is set)."""
        return bool(self.nildb_nodes)

    @property
    def nildb_missing(self) -> list[str]:
        """The nilDB settings still needed once ``nildb_nodes`` is set (variable names)."""
        missing: list[str] = []
        if self.nildb_nilauth_url is None:
            missing.append("NILAI_NILDB_NILAUTH_URL")
        if self.nildb_builder_key is None and self.nildb_builder_key_file is None:
            missing.append("NILAI_NILDB_BUILDER_KEY or NILAI_NILDB_BUILDER_KEY_FILE")
        if self.nildb_collection is None:
            missing.append("NILAI_NILDB_COLLECTION")
        return missing

    @property
    def web_search_enabled(self) -> bool:
        """Whether ``web_search: true`` is served (a search provider key is configured)."""
        return self.web_search_api_key is not None and bool(
            self.web_search_api_key.get_secret_value().strip()
        )

    @property
    def db_url(self) -> str:
        """The SQLAlchemy URL; by default a SQLite file in the data directory."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite+aiosqlite:///{self.data_dir / 'nilai.db'}"

    @property
    def concurrency_overrides(self) -> dict[str, int]:
        """Per-model concurrency from ``model_concurrency_limits`` (``MODEL=N`` entries)."""
        pairs = (item.rpartition("=") for item in self.model_concurrency_limits)
        return {model: int(count) for model, _, count in pairs}

    @property
    def key_path(self) -> Path:
        """Where the signing key lives."""
        return self.signing_key_path or self.data_dir / "signing_key.pem"

    @property
    def static_api_keys(self) -> list[str]:
        """API keys accepted from the settings (``NILAI_API_KEY`` and ``NILAI_API_KEYS``)."""
        keys = [key.get_secret_value() for key in self.api_keys]
        if self.api_key is not None:
            keys.append(self.api_key.get_secret_value())
        return [key for key in keys if key]


OTHER_VARIABLES = frozenset(
    {
        CONFIG_FILE_VARIABLE,
        "NILAI_VLLM_BIN",  # nilai worker vllm: the vllm executable
        "NILAI_INSTALL_HOOKS",  # make install: the git hooks
        "NILAI_DOMAIN",  # deploy/compose.yaml: Caddy's site address
        "NILAI_GATEWAY_WORKERS",  # deploy/compose.yaml: nilai api --workers
        "NILAI_URL",  # the locustfile and examples: the gateway to call
    }
)
"""``NILAI_*`` variables read outside these settings, so not mistakes."""


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per ``NILAI_*`` name in ``environ`` that nothing reads, with the closest known.

    A mistyped name (``NILAI_API_KEYY``) would otherwise be ignored without a word, and the
    gateway would run without the setting the operator thinks they made. Values are never shown.
    """
    known = {f"NILAI_{name.upper()}" for name in NilaiSettings.model_fields} | OTHER_VARIABLES
    lines: list[str] = []
    for name in sorted(environ):
        if not name.startswith("NILAI_") or name in known:
            continue
        # Compared without the shared prefix, which would make every name look close.
        suffixes = [other.removeprefix("NILAI_") for other in known]
        guess = difflib.get_close_matches(name.removeprefix("NILAI_"), suffixes, n=1)
        hint = f"; did you mean NILAI_{guess[0]}?" if guess else ""
        lines.append(f"{name} is not a nilai setting and is ignored{hint}")
    return lines


def settings_problems(exc: ValidationError) -> list[str]:
    """One line per error in ``exc``: where (the variable or YAML key) and what, never the value.

    ``NilaiSettings`` already leaves the input out of its errors; this also drops pydantic's
    layout (types, documentation links) that means nothing to an operator, and suggests the
    setting a mistyped YAML key was probably meant to be.
    """
    problems: list[str] = []
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        location = error["loc"]
        message = error["msg"].removeprefix("Value error, ")
        if not location:
            problems.append(message)
            continue
        name = str(location[0])
        items = "".join(f"[{part}]" for part in location[1:])
        if error["type"] == "extra_forbidden":
            guess = difflib.get_close_matches(name, NilaiSettings.model_fields, n=1)
            hint = f"; did you mean {guess[0]}?" if guess else ""
            problems.append(f"{name}{items}: not a setting (a key of {CONFIG_FILE_VARIABLE}){hint}")
        else:
            problems.append(f"{name}{items} (NILAI_{name.upper()}): {message}")
    return problems
