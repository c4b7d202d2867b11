"""Schemathesis fuzzes the gateway's own OpenAPI spec against a live server (bounded examples per
operation): whatever the parameters, the answer is never a 5xx — bad input is a structured 4xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from marketpipe.api.app import create_app
from marketpipe.api.errors import ALPACA_PREFIX  # the vendor-shaped routes answer errors in the vendor's shape
from marketpipe.sim.server import SimServer
from tests.api.conftest import ENV, gateway_config, serving


@pytest.fixture(scope="module")
def live_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with SimServer(vendor="alpaca") as vendor:
        store: Path = tmp_path_factory.mktemp("fuzz") / "gw.duckdb"
        app = create_app(gateway_config(vendor.url, store), env=ENV)
        with serving(app) as url:
            yield url


def test_no_server_errors(live_gateway: str) -> None:
    """Every operation of the spec, a bounded number of generated cases each (derandomized, so a
    failure repeats)."""
    schema = schemathesis.openapi.from_url(f"{live_gateway}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    failures: list[str] = []
    calls: list[str] = []
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case: schemathesis.Case) -> None:
            calls.append(case.formatted_path)
            response = case.call(base_url=live_gateway, timeout=60)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.query} -> {response.text[:300]}")
            elif response.status_code >= 400 and not case.formatted_path.startswith(ALPACA_PREFIX):
                err = response.json()["error"]
                assert err["code"] and err["message"] and "request_id" in err

        check()
    assert len(calls) >= 3 * len(operations)  # the generator really ran
    assert not failures, "\n".join(failures[:10])
