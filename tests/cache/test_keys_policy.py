from __future__ import annotations

import math

import msgspec
import pytest

from marketpipe.cache import CacheConfig, build_cache, kind_of, make_key, split_key, ttl_for
from marketpipe.cache.base import key_matches


class TestMakeKey:
    def test_shape_and_determinism(self) -> None:
        key = make_key("bars", "AAPL", "1Min", "2024-01-02T00:00:00Z", "2024-01-03T00:00:00Z")
        kind, symbol, digest = key.split(":")
        assert (kind, symbol) == ("bars", "AAPL")
        assert len(digest) == 16 and all(c in "0123456789abcdef" for c in digest)
        assert key == make_key("bars", "AAPL", "1Min", "2024-01-02T00:00:00Z", "2024-01-03T00:00:00Z")
        assert split_key(key) == ("bars", "AAPL", digest)

    def test_symbol_is_uppercased_and_may_contain_dots(self) -> None:
        assert make_key("snapshot", "brk.b") == make_key("snapshot", "BRK.B")
        assert make_key("snapshot", "BRK.B").startswith("snapshot:BRK.B:")

    def test_parts_order_and_boundaries_matter(self) -> None:
        assert make_key("bars", "AAPL", "a", "b") != make_key("bars", "AAPL", "b", "a")
        assert make_key("bars", "AAPL", "ab", "c") != make_key("bars", "AAPL", "a", "bc")
        assert make_key("bars", "AAPL") != make_key("bars", "AAPL", "")

    @pytest.mark.parametrize("kind", ["", "Bars", "bars:x", "1bars", "latest quote"])
    def test_bad_kind(self, kind: str) -> None:
        with pytest.raises(ValueError, match="invalid cache kind"):
            make_key(kind, "AAPL")

    @pytest.mark.parametrize("symbol", ["", "  ", "A:B", "A B"])
    def test_bad_symbol(self, symbol: str) -> None:
        with pytest.raises(ValueError, match="invalid cache symbol"):
            make_key("bars", symbol)

    def test_kind_of_and_matching(self) -> None:
        key = make_key("latest_quote", "MSFT")
        assert kind_of(key) == "latest_quote"
        assert kind_of("no-separator") == "other"
        assert key_matches(key, "latest_quote", None)
        assert key_matches(key, None, "MSFT")
        assert key_matches(key, "latest_quote", "MSFT")
        assert not key_matches(key, "bars", None)
        assert not key_matches(key, None, "MSFTX")
        assert key_matches(key, None, None)


class TestPolicy:
    @pytest.mark.parametrize(
        ("kind", "market_open", "range_closed", "expected"),
        [
            ("bars", True, True, 86400 * 7),
            ("bars", False, True, 86400 * 7),
            ("bars", True, False, 5),
            ("bars", False, False, 60),
            ("latest_quote", True, False, 1),
            ("latest_trade", False, False, 30),
            ("snapshot", True, False, 2),
            ("snapshot", False, False, 30),
            ("reference", True, False, 86400),
        ],
    )
    def test_defaults(self, kind: str, market_open: bool, range_closed: bool, expected: float) -> None:
        assert ttl_for(kind, market_open=market_open, range_closed=range_closed) == expected

    def test_config_overrides(self) -> None:
        cfg = CacheConfig(bars_open_ttl=2.5)
        assert ttl_for("bars", market_open=True, range_closed=False, config=cfg) == 2.5

    def test_unknown_kind_is_loud(self) -> None:
        with pytest.raises(ValueError, match="no cache TTL policy for kind 'options'"):
            ttl_for("options", market_open=True, range_closed=False)

    def test_config_defaults(self) -> None:
        cfg = CacheConfig()
        assert cfg.memory_max_bytes == 256 * 1024 * 1024
        assert cfg.redis_url is None
        assert cfg.stale_for == 3600
        assert build_cache(cfg).l2 is None

    def test_config_decodes_and_rejects_unknown_fields(self) -> None:
        cfg = msgspec.convert({"redis_url": "redis://localhost:6379/0", "stale_for": 10}, CacheConfig)
        assert cfg.redis_url == "redis://localhost:6379/0" and cfg.stale_for == 10
        with pytest.raises(msgspec.ValidationError, match="unknown field"):
            msgspec.convert({"stale_fr": 10}, CacheConfig)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"memory_max_bytes": 0}, "memory_max_bytes must be > 0"),
            ({"stale_for": -1.0}, "stale_for must be a finite number >= 0"),
            ({"bars_open_ttl": math.nan}, "bars_open_ttl must be a finite number >= 0"),
            ({"redis_connect_timeout": 0.0}, "redis_connect_timeout must be a finite number > 0"),
            ({"redis_backoff_initial": 5.0, "redis_backoff_max": 1.0}, "redis_backoff_max"),
            ({"redis_url": "http://localhost"}, "redis_url must start with"),
            ({"redis_prefix": ""}, "redis_prefix must not be empty"),
        ],
    )
    def test_config_validation(self, kwargs: dict[str, object], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            CacheConfig(**kwargs)  # type: ignore[arg-type]
        # from a file, a value outside a typed field's bounds is refused by its type, naming the key;
        # the rules between fields (and the URL scheme) by __post_init__, with the message above
        field = message.split()[0]
        with pytest.raises(msgspec.ValidationError, match=rf"{message}|at `\$\.{field}`"):
            msgspec.convert(kwargs, CacheConfig)
