"""``marketpipe stream`` as a user runs it: subprocesses against the vendor simulator (``--sim``) and
against a gateway served on a free port (``--gateway``), plus the one function every message goes
through (:func:`~marketpipe.cli.stream.fold`) and the table it feeds.

The commands are independent, so :func:`results` starts them all at once and each test checks its
own; the file takes about as long as the longest ``--duration``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rich.console import Console

from marketpipe.api.app import create_app
from marketpipe.cli.stream import Board, StreamError, fold, render
from marketpipe.sim.server import SimServer
from marketpipe.sim.stream import StreamConfig
from tests.api.conftest import ENV, gateway_config, serving

pytestmark = pytest.mark.timeout(90)

KEY = "clisecret"
WIDE = {"COLUMNS": "200"}


def _argv(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "marketpipe.cli.main", "stream", *args]


def _env(env: dict[str, str] | None = None) -> dict[str, str]:
    drop = ("ALPACA_", "APCA_", "POLYGON_", "MARKETPIPE_", "COLUMNS")
    base = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**base, **WIDE, **(env or {})}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway with client keys on and at most two symbols per stream client."""
    store = tmp_path_factory.mktemp("gw") / "g.duckdb"
    with SimServer(vendor="alpaca", stream_config=StreamConfig(rate=200)) as sim:
        cfg = gateway_config(sim.url, store, stream={"max_symbols_per_client": 2})
        app = create_app(cfg, env={**ENV, "MARKETPIPE_API_KEYS": f"cli:{KEY}"})
        with serving(app) as url:
            yield url


@pytest.fixture(scope="module")
def results(gateway: str) -> dict[str, subprocess.CompletedProcess[str]]:
    cases: dict[str, tuple[list[str], dict[str, str] | None]] = {
        "sim_json": (["AAPL", "MSFT", "--sim", "--duration", "3", "--json"], None),
        "sim_table": (["AAPL", "--sim", "--duration", "3"], None),
        "gateway_json": (
            ["AAPL", "MSFT", "--gateway", gateway, "--duration", "3", "--json"],
            {"MARKETPIPE_API_KEY": KEY},
        ),
        "gateway_table": (["MSFT", "--gateway", gateway, "--token", KEY, "--duration", "3"], None),
        "invalid": (["AAPL", "NO SUCH!", "--sim", "--duration", "2"], None),
        "too_many": (["AAPL", "MSFT", "SPY", "--gateway", gateway, "--token", KEY, "--duration", "10"], None),
        "bad_token": (["AAPL", "--gateway", gateway, "--token", "wrong", "--duration", "10"], None),
        "no_gateway": (["AAPL", "--gateway", "http://127.0.0.1:9", "--duration", "10"], None),
    }
    procs = {
        name: subprocess.Popen(_argv(args), env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (args, env) in cases.items()
    }
    done: dict[str, subprocess.CompletedProcess[str]] = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=60)
        done[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return done


def _prices(stdout: str) -> list[dict[str, Any]]:
    docs = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert docs and all(d["type"] == "price" for d in docs)
    return docs


def test_sim_json_lines_for_both_symbols(results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    r = results["sim_json"]
    assert r.returncode == 0, r.stderr
    docs = _prices(r.stdout)
    assert {d["symbol"] for d in docs} == {"AAPL", "MSFT"}
    assert {d["source"] for d in docs} == {"sim:alpaca"}
    trade = next(d for d in docs if d["event"] == "trade")
    assert trade["price"] > 0 and trade["is_real_time"] is True and trade["stale"] is False
    assert any(d["bid"] and d["ask"] and d["bid"] <= d["ask"] for d in docs)
    datetime.fromisoformat(trade["timestamp"])  # ISO timestamps, as on the gateway's wire
    assert "Traceback" not in r.stderr and "leaked" not in r.stderr  # a clean exit, DuckDB included


def test_sim_table_shows_prices(results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    r = results["sim_table"]
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if "AAPL" in line)
    assert "sim:alpaca" in row and "real-time" in row
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert float(cells[1].replace(",", "")) > 0  # the price column
    assert re.search(r"router (startup|primary_active) \(source .*\) · [\d,]+ messages · [\d.,]+/s", r.stdout)


def test_gateway_mode_json_and_table(results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    r = results["gateway_json"]
    assert r.returncode == 0, r.stderr
    docs = _prices(r.stdout)
    assert {d["symbol"] for d in docs} == {"AAPL", "MSFT"}
    assert {d["source"] for d in docs} == {"sim:alpaca"}
    t = results["gateway_table"]
    assert t.returncode == 0, t.stderr
    row = next(line for line in t.stdout.splitlines() if "MSFT" in line)
    assert "sim:alpaca" in row and "waiting" not in row


def test_invalid_symbol_is_a_clear_error(results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    r = results["invalid"]
    assert r.returncode == 2
    assert "error[INVALID_SYMBOL]" in r.stderr and "NO SUCH!" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_errors_from_the_gateway_are_shown(results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    r = results["too_many"]  # the gateway refuses the subscription: {"type": "error", ...} on the stream
    assert r.returncode == 2, r.stderr
    assert "error[INVALID_ARGUMENT]" in r.stderr and "at most 2 subscriptions" in r.stderr
    r = results["bad_token"]
    assert r.returncode == 1
    assert "error[AUTH_FAILED]" in r.stderr and "MARKETPIPE_API_KEY" in r.stderr
    r = results["no_gateway"]
    assert r.returncode == 1
    assert "error[PROVIDER_UNAVAILABLE]" in r.stderr and "cannot reach the gateway" in r.stderr
    for r in (results["too_many"], results["bad_token"], results["no_gateway"]):
        assert "Traceback" not in r.stderr


def test_ctrl_c_ends_cleanly() -> None:
    p = subprocess.Popen(
        _argv(["SPY", "--sim", "--json"]), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None
        first = p.stdout.readline()  # streaming
        assert json.loads(first)["symbol"] == "SPY"
        p.send_signal(signal.SIGINT)
        _, stderr = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, stderr
    assert "Traceback" not in stderr


# --- the fold and the table, in process ------------------------------------------------------------------


def _price(symbol: str, **kw: Any) -> dict[str, Any]:
    doc = {
        "type": "price",
        "event": "trade",
        "symbol": symbol,
        "price": 101.5,
        "size": 10,
        "bid": 101.4,
        "ask": 101.6,
        "change": 1.5,
        "change_pct": 1.5,
        "volume": 1200,
        "timestamp": (datetime.now(UTC) - timedelta(seconds=3)).isoformat(),
        "source": "sim:alpaca",
        "feed": "sip",
        "is_real_time": True,
        "quality_score": 1.0,
        "stale": False,
    }
    return {**doc, **kw}


def _text(board: Board) -> str:
    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(render(board))
    return console.export_text()


def test_fold_keeps_state_and_raises_stream_errors() -> None:
    board = Board(["AAPL", "MSFT"])
    assert fold(board, {"type": "welcome", "state": "startup", "active_source": None}) is None
    assert fold(board, {"type": "subscribed", "symbols": ["AAPL", "MSFT"]}) is None
    doc = _price("AAPL")
    assert fold(board, doc) is doc
    fold(board, _price("MSFT", change=-2.0, change_pct=-1.9, stale=True, quality_score=0.4))
    fold(board, {"type": "status", "state": "fallback_active", "active_source": "fallback"})
    fold(board, {"type": "warning", "code": "SLOW_CONSUMER", "message": "1000 messages waiting"})
    assert (board.state, board.active_source, board.subscribed) == ("fallback_active", "fallback", ["AAPL", "MSFT"])
    assert board.received == 6 and board.prices == 2
    text = _text(board)
    assert "101.50" in text and "+1.50" in text and "-1.90%" in text and "STALE" in text and "real-time" in text
    assert "3.0s" in text or "3.1s" in text  # age of the last update
    assert "router fallback_active" in text and "SLOW_CONSUMER" in text
    with pytest.raises(StreamError) as exc:
        fold(board, {"type": "error", "code": "INVALID_SYMBOL", "message": "invalid symbol 'X!'"})
    assert exc.value.code == "INVALID_SYMBOL" and exc.value.message == "invalid symbol 'X!'"


def test_rate_is_over_a_recent_window() -> None:
    board = Board(["AAPL"])
    t0 = time.monotonic()
    board.rate(t0)
    for _ in range(50):
        fold(board, _price("AAPL"))
    assert board.rate(t0 + 1.0) == pytest.approx(50.0)
    assert board.rate(t0 + 100.0) == pytest.approx(0.0, abs=1.0)
