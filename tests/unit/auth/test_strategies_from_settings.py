"""Authenticators built from the settings: configured API keys, and private keys sent by mistake."""

import pytest

from nilai.auth.strategies import PRIVATE_KEY_SENT, make_authenticator
from nilai.errors import AuthenticationFailed
from nilai.settings import NilaiSettings

PUBLIC_KEY = bytes.fromhex("02" + "11" * 32)


async def test_api_key_strategy_uses_settings_keys(tmp_path):
    settings = NilaiSettings(data_dir=tmp_path, api_key="k1", api_keys=["k2", "k3"])
    authenticator = make_authenticator(settings, None, PUBLIC_KEY)  # type: ignore[arg-type]
    for key in ("k1", "k2", "k3"):
        assert (await authenticator.authenticate(key)).method == "api_key"


async def test_a_configured_hex_api_key_is_not_mistaken_for_a_private_key(tmp_path):
    hex_key = "ab" * 32
    settings = NilaiSettings(data_dir=tmp_path, api_key=hex_key)
    authenticator = make_authenticator(settings, None, PUBLIC_KEY)  # type: ignore[arg-type]
    assert (await authenticator.authenticate(hex_key)).method == "api_key"
    with pytest.raises(AuthenticationFailed) as refused:
        await authenticator.authenticate("cd" * 32)
    assert refused.value.message == PRIVATE_KEY_SENT
