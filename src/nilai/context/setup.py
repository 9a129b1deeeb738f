"""Build the private-context services from the settings (called from the gateway's lifespan)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import httpx
from secp256k1 import PrivateKey  # pyright: ignore[reportMissingTypeStubs]

from nilai.context.nilauth import DelegationIssuer, NilauthRootTokens, load_builder_key
from nilai.context.nildb import NilDBPromptVault
from nilai.context.prompts import CachedPrompts, PromptsOff, PromptVault
from nilai.settings import NilaiSettings
from nilai.startup import StartupError

NOT_CONFIGURED = "NILAI_NILDB_NODES is not set"


@dataclass(frozen=True, slots=True)
class PrivatePrompts:
    """Where prompt documents are read, and who mints delegations (None: nilDB is off)."""

    vault: PromptVault
    delegations: DelegationIssuer | None


def make_private_prompts(settings: NilaiSettings, http: httpx.AsyncClient) -> PrivatePrompts:
    """The nilDB services, or the refusing ones when nilDB is not configured.

    Raises:
        StartupError: nilDB is half configured, or the builder key cannot be read.
    """
    if not settings.nildb_enabled:
        return PrivatePrompts(PromptsOff(NOT_CONFIGURED), None)
    missing = settings.nildb_missing
    if missing:
        raise StartupError(
            "NILAI_NILDB_NODES is set, so private prompts are on, but "
            + ", ".join(missing)
            + " is not set"
        )
    try:
        # Imported now, at start-up: the first prompt's request would otherwise pay for the
        # import (~40 ms) on the event loop.
        importlib.import_module("blindfold")
    except ImportError:
        raise StartupError(
            "NILAI_NILDB_NODES is set, but blindfold, which reveals the prompts' shares, is not "
            "installed: pip install 'nilai[nildb]'"
        ) from None
    key = _builder_key(settings)
    if settings.nildb_nilauth_url is None or settings.nildb_collection is None:  # checked above
        raise StartupError("nilDB settings are incomplete")
    roots = NilauthRootTokens(
        http, settings.nildb_nilauth_url, key, timeout_s=settings.nildb_timeout_s
    )
    vault = NilDBPromptVault(
        http,
        settings.nildb_nodes,
        key,
        settings.nildb_collection,
        timeout_s=settings.nildb_timeout_s,
        max_prompt_bytes=settings.nildb_max_prompt_bytes,
    )
    cached = CachedPrompts(vault, ttl_s=settings.nildb_prompt_cache_s)
    issuer = DelegationIssuer(roots, key, ttl_s=settings.nildb_delegation_ttl_s)
    return PrivatePrompts(cached, issuer)


def _builder_key(settings: NilaiSettings) -> PrivateKey:
    if settings.nildb_builder_key is not None:
        source, text = "NILAI_NILDB_BUILDER_KEY", settings.nildb_builder_key.get_secret_value()
    else:
        path = settings.nildb_builder_key_file
        if path is None:  # nildb_missing names this case
            raise StartupError("NILAI_NILDB_BUILDER_KEY or NILAI_NILDB_BUILDER_KEY_FILE is needed")
        source = f"NILAI_NILDB_BUILDER_KEY_FILE={path}"
        text = _read(path, source)
    try:
        return load_builder_key(text)
    except ValueError as exc:
        raise StartupError(f"{source}: {exc}") from None


def _read(path: Path, source: str) -> str:
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"cannot read {source}: {type(exc).__name__}") from None
