import pytest

from nilai.gateway.lifespan import make_authenticator
from nilai.settings import NilaiSettings


def test_unsupported_auth_strategy_refuses_to_start(tmp_path):
    settings = NilaiSettings(data_dir=tmp_path, auth_strategies=["api_key", "nuc"])
    with pytest.raises(ValueError, match="nuc"):
        make_authenticator(settings, None)  # type: ignore[arg-type]


async def test_api_key_strategy_uses_settings_keys(tmp_path):
    settings = NilaiSettings(data_dir=tmp_path, api_key="k1", api_keys=["k2", "k3"])
    authenticator = make_authenticator(settings, None)  # type: ignore[arg-type]
    for key in ("k1", "k2", "k3"):
        assert (await authenticator.authenticate(key)).method == "api_key"
