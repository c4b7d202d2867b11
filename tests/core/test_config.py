from pathlib import Path

import pytest

from marketpipe.core.config import alpaca_credentials, config_from_dict, load_config
from marketpipe.core.errors import ConfigError, MissingCredentials


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MARKETPIPE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    cfg = load_config()
    assert cfg.provider("alpaca").rate_limit_per_min == 200
    assert cfg.source_path is None


def test_file_overrides_and_keeps_default_providers(tmp_path: Path) -> None:
    p = tmp_path / "m.toml"
    p.write_text(
        '[providers.alpaca]\nplan = "unlimited"\nrate_limit_per_min = 10000\n[providers.alpaca.retry]\nattempts = 2\n'
    )
    cfg = load_config(p)
    assert cfg.provider("alpaca").plan == "unlimited"
    assert cfg.provider("alpaca").retry.attempts == 2
    assert cfg.source_path == str(p)


@pytest.mark.parametrize(
    "raw",
    [
        {"providers": {"alpaca": {"api_key": "x"}}},
        {"providers": {"alpaca": {"plan": "gold"}}},
        {"providers": {"alpaca": {"nonsense": 1}}},
        {"store": {"path": 5}},
    ],
)
def test_bad_config_is_a_config_error(raw: dict) -> None:
    with pytest.raises(ConfigError):
        config_from_dict(raw)


def test_invalid_toml(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[providers\n")
    with pytest.raises(ConfigError):
        load_config(p)


def test_credentials_from_either_name_and_never_echoed() -> None:
    assert alpaca_credentials({"APCA_API_KEY_ID": "k", "APCA_API_SECRET_KEY": "s"}) == ("k", "s")
    assert alpaca_credentials({"ALPACA_API_KEY": "k2", "ALPACA_SECRET_KEY": "s2"}) == ("k2", "s2")
    with pytest.raises(MissingCredentials) as info:
        alpaca_credentials({"ALPACA_API_KEY": "PKSECRETVALUE"})
    assert "ALPACA_SECRET_KEY" in info.value.message
    assert "PKSECRETVALUE" not in str(info.value)
