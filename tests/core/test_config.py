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


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"providers": {"alpaca": {"read_timeout": -1}}}, "providers.alpaca.read_timeout"),
        ({"providers": {"alpaca": {"connect_timeout": 0}}}, "providers.alpaca.connect_timeout"),
        ({"providers": {"polygon": {"probe_interval": float("nan")}}}, "providers.polygon.probe_interval"),
        ({"providers": {"mine": {"max_in_flight": 0}}}, "providers.mine.max_in_flight"),
        ({"providers": {"alpaca": {"rate_limit_per_min": -5}}}, "providers.alpaca.rate_limit_per_min"),
        ({"providers": {"alpaca": {"retry": {"attempts": 0}}}}, "providers.alpaca.retry.attempts"),
        ({"providers": {"alpaca": {"retry": {"base_seconds": -0.5}}}}, "providers.alpaca.retry.base_seconds"),
        (
            {"providers": {"alpaca": {"circuit": {"failure_threshold": 0}}}},
            "providers.alpaca.circuit.failure_threshold",
        ),
        ({"providers": {"alpaca": {"recent_sip": "wait"}}}, "providers.alpaca.recent_sip"),
        ({"backfill": {"page_limit": 0}}, "backfill.page_limit"),
        ({"backfill": {"page_limit": 50_000}}, "backfill.page_limit"),
        ({"backfill": {"concurrency": -1}}, "backfill.concurrency"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"client_rate_limit_per_min": 0}}, "server.client_rate_limit_per_min"),
        ({"cache": {"memory_max_bytes": -1}}, "cache.memory_max_bytes"),
        ({"cache": {"history_ttl": float("inf")}}, "cache.history_ttl"),
        ({"cache": {"bars_open_ttl": -1.0}}, "cache.bars_open_ttl"),
        ({"update": {"refresh_days": -1}}, "update.refresh_days"),
        ({"update": {"stale_after_minutes": 0}}, "update.stale_after_minutes"),
        ({"quality": {"recent_sessions": -1}}, "quality.recent_sessions"),
        ({"quality": {"weights": {"validity": -0.1}}}, "quality.weights.validity"),
        ({"quality": {"anomaly": {"split_tolerance": 1.5}}}, "quality.anomaly.split_tolerance"),
        ({"quality": {"anomaly": {"min_volume": -1}}}, "quality.anomaly.min_volume"),
        ({"stream": {"persist_every_seconds": -2}}, "stream.persist_every_seconds"),
        ({"stream": {"cross_check_seconds": -1}}, "stream.cross_check_seconds"),
        ({"jobs": [{"name": "j", "symbols": ["AAPL"], "strategy": "sometimes"}]}, "jobs[0].strategy"),
    ],
)
def test_values_that_cannot_work_are_refused_naming_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, source="m.toml")
    assert info.value.code == "CONFIG_ERROR"
    assert info.value.details["key"] == key
    assert info.value.message.startswith(f"m.toml: {key}: ")


def test_a_literal_error_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"providers": {"alpaca": {"plan": "gold"}}})
    assert "providers.alpaca.plan" in info.value.message
    assert "'free'" in info.value.message and "'unlimited'" in info.value.message


@pytest.mark.parametrize(
    ("raw", "key"),
    [({"providers": [1, 2]}, "providers"), ({"providers": {"alpaca": 1}}, "providers.alpaca")],
)
def test_providers_that_are_not_tables(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, source="m.toml")
    assert info.value.details["key"] == key
    assert f"{key}: must be a table" in info.value.message


def test_edge_values_that_work_are_kept() -> None:
    cfg = config_from_dict(
        {
            "providers": {"alpaca": {"retry": {"base_seconds": 0}, "read_timeout": 0.5}},
            "server": {"port": 65535},
            "cache": {"bars_open_ttl": 0},
            "backfill": {"page_limit": 10_000},
        }
    )
    assert cfg.provider("alpaca").retry.base_seconds == 0
    assert cfg.server.port == 65535 and cfg.cache.bars_open_ttl == 0


# --- per-vendor config classes (declared beside each adapter, registered with core's loader) ---------


def test_each_vendor_table_decodes_into_its_own_class() -> None:
    from marketpipe.core.config import ProviderConfig
    from marketpipe.providers.alpaca_config import AlpacaConfig
    from marketpipe.providers.polygon_config import PolygonConfig
    from marketpipe.providers.yahoo_config import YahooConfig

    cfg = config_from_dict({"providers": {"polygon": {"plan": "unlimited"}, "mine": {"priority": 7}}})
    assert type(cfg.provider("alpaca")) is AlpacaConfig and cfg.provider("alpaca", AlpacaConfig).feed == "sip"
    assert type(cfg.provider("polygon")) is PolygonConfig and cfg.provider("polygon", PolygonConfig).plan == "unlimited"
    assert type(cfg.provider("yahoo")) is YahooConfig and cfg.provider("yahoo").enabled is False
    assert type(cfg.provider("mine")) is ProviderConfig and cfg.provider("mine").priority == 7
    # the vendor defaults are the classes' defaults, kept under a partial table
    assert (cfg.provider("polygon").priority, cfg.provider("polygon").rate_limit_per_min) == (2, 5)
    with pytest.raises(ConfigError) as info:
        cfg.provider("polygon", AlpacaConfig)
    assert info.value.details["key"] == "providers.polygon"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"providers": {"polygon": {"recent_sip": "iex"}}}, "providers.polygon"),  # an Alpaca-only key
        ({"providers": {"yahoo": {"plan": "free"}}}, "providers.yahoo"),
        ({"providers": {"mine": {"feed": "sip"}}}, "providers.mine"),
        ({"providers": {"polygon": {"plan": "gold"}}}, "providers.polygon.plan"),
        ({"providers": {"yahoo": {"read_timeout": 0}}}, "providers.yahoo.read_timeout"),
    ],
)
def test_a_key_of_another_vendor_is_refused_naming_the_table(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, source="m.toml")
    assert info.value.code == "CONFIG_ERROR"
    assert info.value.details["key"] == key
    assert info.value.message.startswith(f"m.toml: {key}: ")


def test_the_registry_is_filled_whatever_is_imported_first() -> None:
    """A fresh interpreter that imports core's loader alone still decodes into the vendor classes
    (the package root registers them), and core itself never imports providers/."""
    import subprocess
    import sys

    code = (
        "from marketpipe.core.config import Config, config_from_dict\n"
        "print(sorted((n, type(c).__name__) for n, c in Config().providers.items()))\n"
        "print(type(config_from_dict({'providers': {'alpaca': {'plan': 'unlimited'}}}).provider('alpaca')).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.splitlines() == [
        "[('alpaca', 'AlpacaConfig'), ('polygon', 'PolygonConfig'), ('yahoo', 'YahooConfig')]",
        "AlpacaConfig",
    ]
    import ast

    core = Path(__file__).resolve().parents[2] / "src" / "marketpipe" / "core"
    for module in core.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("marketpipe.providers") for n in names), module


def test_apca_api_data_url_is_the_alpaca_base_url_unless_the_file_sets_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: the environment's data URL is part of the loaded config (the adapter, the live hub's stream
    host and ``config show`` all read it there); a base_url in the file wins, as the adapter always had it."""
    from marketpipe.providers.alpaca_config import AlpacaConfig
    from marketpipe.service.live.hub import stream_url

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MARKETPIPE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("APCA_API_DATA_URL", "http://127.0.0.1:8765")
    no_file = load_config()
    assert no_file.provider("alpaca", AlpacaConfig).base_url == "http://127.0.0.1:8765"
    assert stream_url(no_file) == "ws://127.0.0.1:8765"
    p = tmp_path / "m.toml"
    p.write_text('[providers.alpaca]\nplan = "unlimited"\n')
    from_env = load_config(p)
    assert from_env.provider("alpaca", AlpacaConfig).base_url == "http://127.0.0.1:8765"
    assert from_env.provider("alpaca", AlpacaConfig).plan == "unlimited"  # the file's keys are kept
    p.write_text('[providers.alpaca]\nbase_url = "http://10.0.0.9:9000"\n')
    assert load_config(p).provider("alpaca").base_url == "http://10.0.0.9:9000"
    monkeypatch.setenv("APCA_API_DATA_URL", "")  # set but empty: as if unset
    assert load_config().provider("alpaca").base_url is None
