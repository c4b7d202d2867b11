"""Issue 12's fault scenarios: kill -9, SIGINT/SIGTERM, disk full, bad vendor pages, 5xx bursts, hangs,
resets, 429 storms, and the gateway under a hanging vendor and bad input.

Every scenario runs the real CLI (``marketpipe backfill`` / ``repair`` / ``serve``) as a subprocess
against the simulator, then checks the invariants of :mod:`tests.chaos.harness`: the store equals the
unfaulted reference (after a re-run where the fault made data unavailable), the ledger claims nothing
the store does not hold, no traceback, no secret anywhere, no gateway 5xx, every process bounded.
"""

from __future__ import annotations

import functools
import re
import signal
import time
from collections.abc import Callable

import pytest

from tests.chaos.harness import (
    RUN_BOUND,
    SIGNAL_BOUND,
    SYMBOLS,
    Answer,
    Chaos,
    Finished,
    fsize_limit,
)

pytestmark = pytest.mark.chaos

FAULTED = "MSFT"  # the symbol a persistent fault is aimed at
FAULTED_PATH = f"^/v2/stocks/{FAULTED}/bars$"  # single-symbol units: one symbol per request
OTHERS = [s for s in SYMBOLS if s != FAULTED]


def ok(done: Finished) -> None:
    assert done.returncode == 0, f"the run did not complete\n{done.tail()}"


def requests_since(chaos: Chaos, mark: int, attempt: int) -> str:
    now = chaos.sim.requests()
    return f"run {attempt}: {now - mark} vendor requests answered since the signal ({now} in the run)"


def error_lines(done: Finished) -> list[str]:
    return [line for line in done.stderr.splitlines() if re.search(r"error\[[A-Z_]+\]", line)]


# --- processes killed and interrupted --------------------------------------------------------------------


def test_kill9_at_random_points_then_rerun_equals_reference(chaos: Chaos) -> None:
    """SIGKILL during start-up and after a seeded random number of vendor requests (plus a random few
    ms), each run resuming the store the last one left; after each kill the ledger claims only what is
    held, and a last run makes the store equal to the reference."""
    store, cfg = chaos.root / "store.duckdb", chaos.config()
    chaos.sim.set_faults({"kind": "latency", "latency_ms": 20})  # a run lasts long enough to be hit mid-way
    points = [0, *(chaos.rng.randint(1, 12) for _ in range(4))]  # 0: before the first request
    kills = 0
    for k in points:
        chaos.sim.reset_stats()
        proc = chaos.start_backfill(store, cfg)
        if k == 0:
            time.sleep(chaos.rng.uniform(0.1, 0.6))
        else:
            chaos.sim.wait_requests(k, proc)
            time.sleep(chaos.rng.uniform(0.0, 0.03))
        done = proc.killed()
        kills += done.returncode == -signal.SIGKILL
        chaos.assert_claims_held(store)
    assert kills >= 3, f"only {kills} of {len(points)} runs were still running when killed"
    chaos.sim.clear()
    ok(chaos.backfill(store, cfg))
    chaos.assert_equal_reference(store)
    chaos.assert_clean()


@pytest.mark.parametrize(("sig", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_run_ends_within_bound_then_rerun_equals_reference(
    chaos: Chaos, sig: signal.Signals, exit_code: int
) -> None:
    """Ctrl-C or SIGTERM while requests are in flight, three times at seeded random points of a run of
    ~470 small pages (each run resuming the last one's store): the process says so and exits 130/143
    within 3 s, the vendor answers no more than the requests already in flight, what it committed is
    consistent; a last run completes the store. (Small pages and quick answers: a cancellation that
    races a finishing request is what used to be swallowed.)"""
    store, cfg = chaos.root / "store.duckdb", chaos.config(backfill={"page_limit": 10})
    chaos.sim.set_faults({"kind": "latency", "latency_ms": 10})
    for attempt in range(3):
        chaos.sim.reset_stats()
        proc = chaos.start_backfill(store, cfg)
        chaos.sim.wait_requests(chaos.rng.randint(20, 100), proc)
        assert proc.alive(), f"run {attempt}: the run ended before the signal\n{proc.wait(1).tail()}"
        sent = time.monotonic()
        at_signal = chaos.sim.requests()
        proc.send(sig)
        done = proc.wait(
            SIGNAL_BOUND,
            since=sent,
            evidence=functools.partial(requests_since, chaos, at_signal, attempt),
        )
        after = chaos.sim.requests() - at_signal
        assert done.returncode == exit_code, f"run {attempt}: exit {done.returncode}, want {exit_code}\n{done.tail()}"
        assert re.search(r"interrupt|terminat|signal|cancel", done.stderr, re.I), f"no message\n{done.tail()}"
        assert after <= 8, f"run {attempt}: {after} vendor requests answered after the signal\n{done.tail()}"
        chaos.assert_claims_held(store)
    chaos.sim.clear()
    ok(chaos.backfill(store, cfg))
    chaos.assert_equal_reference(store)
    chaos.assert_clean()


# --- disk full ---------------------------------------------------------------------------------------------


def test_disk_full_ends_with_store_error_then_rerun_equals_reference(chaos: Chaos) -> None:
    """The store cannot grow (RLIMIT_FSIZE: writes past 200 kB fail with EFBIG, well before the run's
    ~530 kB of WAL): the run ends within its bound with exit 1 and one ``error[STORE_ERROR]`` line, the
    store is consistent, and with space again a re-run makes it equal to the reference."""
    store, cfg = chaos.root / "store.duckdb", chaos.config()
    done = chaos.start_backfill(store, cfg, preexec=fsize_limit(200_000)).wait(RUN_BOUND)
    assert done.returncode == 1, done.tail()
    codes = done.error_codes()
    assert codes == ["STORE_ERROR"], f"want exactly one error[STORE_ERROR] line, got {codes}\n{done.tail()}"
    img = chaos.assert_claims_held(store)
    assert img.rows < chaos.reference.rows, "the size limit did not bite"
    ok(chaos.backfill(store, cfg))
    chaos.assert_equal_reference(store)
    chaos.assert_clean()


# --- bad vendor pages: the unit fails, nothing is claimed, a re-run completes --------------------------------

BAD_PAGES = {
    "html_200": r"MALFORMED_RESPONSE",  # a proxy's HTML page with status 200
    "truncated_json": r"MALFORMED_RESPONSE",  # the body stops half-way
    "empty_json": r"MALFORMED_RESPONSE",  # 200 with body {}
    "null_page": r"MALFORMED_RESPONSE",  # 200 with {"bars": null} and no other key
    "token_loop": r"PAGINATION_\w+|MALFORMED_RESPONSE",  # the same next_page_token forever
}


@pytest.mark.parametrize("kind", list(BAD_PAGES))
def test_bad_pages_fail_the_unit_unclaimed_then_rerun_equals_reference(chaos: Chaos, kind: str) -> None:
    """Every page of one symbol is bad: its units fail with a stable code, the ledger claims none of
    what it lacks, the other symbols are complete. Without the fault, for ``{}`` and null pages (which a
    lax decoder took for "no bars" and claimed) ``repair`` must fetch the missing bars back; then a
    backfill re-run makes the store, ledger included, equal to the reference."""
    store, cfg = chaos.root / "store.duckdb", chaos.config()
    chaos.sim.set_faults({"kind": kind, "paths": FAULTED_PATH})
    done = chaos.backfill(store, cfg)
    assert done.returncode == 1, f"{kind}: the run did not report the failed unit\n{done.tail()}"
    lines = error_lines(done)
    assert lines, done.tail()
    for line in lines:
        code = re.search(r"error\[([A-Z_]+)\]", line)
        assert code and re.fullmatch(BAD_PAGES[kind], code.group(1)), f"{kind}: unexpected {line!r}\n{done.tail()}"
        assert FAULTED in line and not any(s in line for s in OTHERS), f"{kind}: {line!r}"
    chaos.assert_claims_held(store)
    chaos.assert_equal_reference(store, symbols=OTHERS)
    chaos.sim.clear()
    if kind in ("empty_json", "null_page"):
        chaos.sim.reset_stats()
        ok(chaos.repair(store, cfg))
        assert chaos.sim.requests() > 0, "repair sent no request for what the store lacks"
        chaos.assert_equal_reference(store, ledger=False)
    ok(chaos.backfill(store, cfg))
    chaos.assert_equal_reference(store)
    chaos.assert_clean()


# --- transient vendor trouble: the run completes -----------------------------------------------------------


def test_burst_of_five_500s_run_completes(chaos: Chaos) -> None:
    """Exactly five consecutive 500s open the circuit (threshold 5): the backfill must wait for it
    (recovery 1 s) or fail over, not end the job; and while it is open no requests are sent. One request
    at a time, so the five failures are consecutive whatever the timing, and eight attempts per request,
    so no unit runs out of retries on the burst itself: what could end a unit is the open circuit."""
    store = chaos.root / "store.duckdb"
    cfg = chaos.config(backfill={"concurrency": 1}, provider={"max_in_flight": 1}, retry={"attempts": 8})
    chaos.sim.set_faults({"kind": "http_500", "times": 5})
    done = chaos.backfill(store, cfg)
    ok(done)
    statuses = chaos.sim.by_status()
    assert statuses.get("500") == 5, statuses
    assert chaos.sim.requests() <= chaos.reference.ingest_pages + 5 + 8, (
        f"{statuses}: requests sent against an open circuit?"
    )
    chaos.assert_equal_reference(store)
    chaos.assert_clean()


def test_transient_hangs_with_short_timeouts_run_completes_within_bound(chaos: Chaos) -> None:
    """Three requests hang (30 s) against a 0.5 s read timeout: retried, the run completes in bound."""
    store, cfg = chaos.root / "store.duckdb", chaos.config(provider={"read_timeout": 0.5})
    chaos.sim.set_faults({"kind": "hang", "hang_seconds": 30, "times": 3})
    ok(chaos.backfill(store, cfg, bound=15))
    chaos.assert_equal_reference(store)
    chaos.assert_clean()


def test_one_symbol_hanging_ends_within_bound_then_rerun_equals_reference(chaos: Chaos) -> None:
    """Every request for one symbol hangs: its units fail with a timeout within the bound, the rest is
    complete and nothing unheld is claimed; a re-run without the hang completes the store."""
    store, cfg = chaos.root / "store.duckdb", chaos.config(provider={"read_timeout": 0.5})
    chaos.sim.set_faults({"kind": "hang", "hang_seconds": 30, "paths": FAULTED_PATH})
    done = chaos.backfill(store, cfg)
    assert done.returncode == 1, done.tail()
    lines = error_lines(done)
    assert lines and all(FAULTED in line and not any(s in line for s in OTHERS) for line in lines), done.tail()
    chaos.assert_claims_held(store)
    chaos.assert_equal_reference(store, symbols=OTHERS)
    chaos.sim.clear()
    ok(chaos.backfill(store, cfg))
    chaos.assert_equal_reference(store)
    chaos.assert_clean()


def test_connection_resets_run_completes(chaos: Chaos) -> None:
    """Connections aborted without an answer (seeded, 30% of requests, four in all): retried."""
    store, cfg = chaos.root / "store.duckdb", chaos.config()
    chaos.sim.set_faults({"kind": "reset", "ratio": 0.3, "times": 4})
    ok(chaos.backfill(store, cfg))
    assert chaos.sim.by_status().get("reset") == 4, chaos.sim.by_status()
    chaos.assert_equal_reference(store)
    chaos.assert_clean()


def test_429_storm_with_reset_header_run_completes(chaos: Chaos) -> None:
    """Eight 429s in a row, each saying when the quota is back (``X-RateLimit-Reset``, Alpaca's form of
    Retry-After): waited out, not counted as an outage; the run completes within its bound."""
    store, cfg = chaos.root / "store.duckdb", chaos.config()
    chaos.sim.set_faults({"kind": "rate_limit", "times": 8, "reset_seconds": 1.0})
    ok(chaos.backfill(store, cfg))
    assert chaos.sim.by_status().get("429") == 8, chaos.sim.by_status()
    chaos.assert_equal_reference(store)
    chaos.assert_clean()


def test_429_storm_with_retry_after_is_honoured(chaos: Chaos) -> None:
    """Six 429s in a row that carry ``Retry-After: 1`` (a proxy in front of the vendor): each is waited
    out for the time it names — the run takes at least that long, is not an outage — and completes."""
    store, cfg = chaos.root / "store.duckdb", chaos.config(backfill={"concurrency": 1}, retry={"attempts": 8})
    chaos.sim.set_faults({"kind": "rate_limit", "times": 6, "reset_seconds": 0.0, "retry_after": 1.0})
    done = chaos.backfill(store, cfg)
    ok(done)
    assert chaos.sim.by_status().get("429") == 6, chaos.sim.by_status()
    assert done.seconds >= 5.0, f"six Retry-After: 1 answers waited out in {done.seconds:.2f}s"
    chaos.assert_equal_reference(store)
    chaos.assert_clean()


# --- the gateway ---------------------------------------------------------------------------------------------


def test_gateway_vendor_hang_every_answer_within_deadline(chaos: Chaos) -> None:
    """The vendor hangs and the gateway's providers keep their patient defaults (30 s read timeout,
    5 attempts); with ``[server] request_timeout = 2`` every answer comes within the deadline: data,
    or 503 with Retry-After — never a longer wait, never another 5xx."""
    deadline = 2.0
    cfg = chaos.config(
        provider={"read_timeout": 30.0},
        retry={"attempts": 5, "base_seconds": 0.5, "max_seconds": 30.0},
        server={"request_timeout": deadline},
    )
    s = chaos.secrets
    v1 = {"Authorization": f"Bearer {s.client_secret}"}
    v2 = {"APCA-API-KEY-ID": s.client_id, "APCA-API-SECRET-KEY": s.client_secret}
    with chaos.serve(chaos.root / "gateway.duckdb", cfg) as gw:
        chaos.sim.set_faults({"kind": "hang", "hang_seconds": 60})
        calls: list[tuple[str, str, str, dict[str, str] | None]] = [
            ("v1 bars", "GET", "/v1/bars/AAPL?start=2024-03-04&end=2024-03-04", v1),
            ("v1 multi bars", "GET", "/v1/bars?symbols=MSFT,SPY&start=2024-03-05&end=2024-03-05", v1),
            ("v1 latest quote", "GET", "/v1/quotes/AAPL/latest", v1),
            ("v1 snapshots", "GET", "/v1/snapshots?symbols=NVDA", v1),
            ("v2 bars", "GET", "/v2/stocks/NVDA/bars?timeframe=1Min&start=2024-03-04T14:30:00Z&limit=10", v2),
        ]
        answers = gw.many(calls, timeout=120)
        chaos.sim.clear()
        slow = [a.brief() for a in answers if a.seconds > deadline + 2.0]
        assert not slow, "answers past the deadline:\n" + "\n".join(slow)
        for a in answers:
            assert a.status is not None, a.brief()
            assert a.status in (200, 503), a.brief()
            if a.status == 503:
                assert "retry-after" in a.headers, a.brief()
        health = gw.request("health after", "GET", "/health")
        assert health.status == 200, health.brief()
    chaos.assert_clean()


def test_gateway_bad_input_burst_no_500_no_secret(chaos: Chaos) -> None:
    """Far-future and malformed ranges, an unknown symbol's quality, a 1 MB header, a 10 MB admin body,
    then wrong keys: never a 5xx, bad input a 4xx, the header and body refused and not echoed back,
    repeated failed key attempts throttled, no secret in the log or any answer, and the gateway keeps
    serving on the same keep-alive connection. Every finding is reported, not just the first."""
    s = chaos.secrets
    v1 = {"Authorization": f"Bearer {s.client_secret}"}
    v2 = {"APCA-API-KEY-ID": s.client_id, "APCA-API-SECRET-KEY": s.client_secret}
    admin = {"Authorization": f"Bearer {s.admin_token}", "Content-Type": "application/json"}
    v2_bars = "/v2/stocks/AAPL/bars?timeframe=1Min&start=2024-03-04T00:00:00Z"
    bars = "/v1/bars/AAPL?start=2024-03-04&end=2024-03-04"
    bad: list[tuple[str, str]] = [
        ("end 9999-12-31", "/v1/bars/AAPL?start=2024-03-01&end=9999-12-31"),
        ("start 9999-12-31", "/v1/bars/AAPL?start=9999-12-31"),
        ("multi end 9999-12-31", "/v1/bars?symbols=AAPL,MSFT&start=2024-03-01&end=9999-12-31"),
        ("quality end 9999-12-31", "/v1/quality/AAPL?start=2024-03-04&end=9999-12-31"),
        ("start not a time", "/v1/bars/AAPL?start=last%20tuesday"),
        ("timeframe 7Sec", "/v1/bars/AAPL?start=2024-03-04&timeframe=7Sec"),
        ("bad symbol", "/v1/bars/AA%20PL!?start=2024-03-04"),
        ("limit 0", "/v1/bars/AAPL?start=2024-03-04&limit=0"),
        ("limit 1e20", "/v1/bars/AAPL?start=2024-03-04&limit=100000000000000000000"),
    ]
    findings: list[str] = []

    def expect(a: Answer, allowed: Callable[[int | None], bool], what: str) -> None:
        if not allowed(a.status):
            findings.append(f"want {what}: {a.brief()}")

    def is_4xx(status: int | None) -> bool:
        return status is not None and 400 <= status < 500

    def refused(status: int | None) -> bool:
        return status is None or is_4xx(status)

    with chaos.serve(chaos.root / "gateway.duckdb", chaos.config()) as gw:
        first = gw.request("bars", "GET", bars, headers=v1)
        assert first.status == 200, first.brief()
        for label, path in bad:
            expect(gw.request(label, "GET", path, headers=v1), is_4xx, "a 4xx")
        # An answer about what the store holds, not a 500 (polars ShapeError on a store without the symbol).
        quality = gw.request("quality, symbol not in the store", "GET", "/v1/quality/SPY?start=2024-06-03", headers=v1)
        expect(quality, lambda c: c == 200 or is_4xx(c), "200 or a 4xx")
        expect(
            gw.request("v2 start not a time", "GET", "/v2/stocks/AAPL/bars?timeframe=1Min&start=garbage", headers=v2),
            is_4xx,
            "a 4xx",
        )
        # The vendor accepts an end far in the future (and serves up to now); its compatible face may too.
        far = gw.request("v2 end 9999-12-31", "GET", v2_bars + "&end=9999-12-31T00:00:00Z", headers=v2)
        expect(far, lambda c: c == 200 or is_4xx(c), "200 or a 4xx")
        huge = gw.request("1 MB header", "GET", bars, headers={**v1, "X-Pad": "a" * 2**20}, fresh=True)
        expect(huge, refused, "refused (a 4xx or a closed connection)")
        filler = b'{"symbol": "' + b"A" * (10 * 2**20) + b'"}'
        big = gw.request(
            "10 MB admin body", "POST", "/admin/cache/invalidate", headers=admin, content=filler, fresh=True
        )
        expect(big, refused, "refused (a 4xx or a closed connection)")
        if len(big.body) >= 4096:
            findings.append(f"the 10 MB body was echoed back: {len(big.body)} bytes, {big.body[:120]!r}")
        expect(gw.request("bars again", "GET", bars, headers=v1), lambda c: c == 200, "200 (still serving)")
        # Wrong keys last: failed attempts are throttled per address, which then refuses this address a while.
        for label, headers in (("wrong admin token", {"Authorization": "Bearer nope"}), ("no admin token", None)):
            expect(gw.request(label, "POST", "/admin/reconnect", headers=headers), lambda c: c in (401, 403), "401/403")
        wrong: list[tuple[str, str, dict[str, str] | None]] = [
            ("no client key", bars, None),
            ("wrong v2 secret", v2_bars, {"APCA-API-KEY-ID": s.client_id, "APCA-API-SECRET-KEY": "wrong"}),
            *((f"wrong client key #{i}", bars, {"X-API-Key": f"not-a-key-{i}"}) for i in range(20)),
        ]
        answers = [gw.request(label, "GET", path, headers=headers) for label, path, headers in wrong]
        for a in answers:
            expect(a, lambda c: c in (401, 403, 429), "401/403/429")
        if not any(a.status == 429 for a in answers):
            findings.append(f"{len(answers)} failed key attempts in a row, none throttled")
        expect(gw.request("health", "GET", "/health"), lambda c: c == 200, "200 (healthy)")
    chaos.assert_clean(also=findings)
