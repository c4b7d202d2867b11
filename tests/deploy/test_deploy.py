"""The operator kit in ``deploy/``: the Prometheus rules pass Debian's ``promtool check rules`` and their unit
tests (``promtool test rules``); the Grafana dashboard has the structure that imports cleanly, every panel
expression parses as PromQL, and every metric the rules and the dashboard name is one the gateway's
``/metrics`` really exports; the example config loads, holds every key and equals the defaults; the systemd
unit passes ``systemd-analyze verify``; ``/metrics`` has process and build metrics and no ``*_created``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import yaml

from marketpipe.api.app import create_app
from marketpipe.core.config import Config, config_from_dict
from tests.api.conftest import ENV, gateway_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "marketpipe.json"
METRIC = re.compile(r"\b((?:marketpipe|process|python)_[a-z0-9_]+)\b")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is required: apt-get install prometheus (scripts/debian-packages.txt)")
    return path


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """The gateway's /metrics text and its metric families (name -> type)."""
    import asyncio

    tmp = tmp_path_factory.mktemp("gw")
    app = create_app(gateway_config("http://127.0.0.1:9", tmp / "gw.duckdb", stream={"enabled": False}), env=ENV)

    async def get() -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            text = (await c.get("/metrics")).text
        await app.state.mp.data.aclose()
        return text

    text = asyncio.run(get())
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))
    return text, families


def known(name: str, families: dict[str, str]) -> bool:
    """A series name /metrics exposes: a family's own name, or a histogram's _bucket/_sum/_count."""
    if name in families:
        return True
    return any(
        name.endswith(suffix) and families.get(name.removesuffix(suffix)) == "histogram"
        for suffix in ("_bucket", "_sum", "_count")
    )


def rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def panel_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def test_promtool_checks_the_rules() -> None:
    r = run(promtool(), "check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 13 rules found" in r.stdout


def test_promtool_unit_tests_the_rules() -> None:
    r = run(promtool(), "test", "rules", "rules.test.yml", cwd=RULES.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_group_level_labels_are_refused_by_this_promtool(tmp_path: Path) -> None:
    """Trap 9, kept visible: Debian's 2.42 rejects `labels:` on a group, so rules.yml puts them on each rule."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "groups:\n  - name: g\n    labels:\n      team: ops\n    rules:\n      - alert: A\n        expr: vector(1)\n"
    )
    r = run(promtool(), "check", "rules", str(bad))
    assert r.returncode != 0 and "field labels not found" in r.stdout + r.stderr
    assert all("labels" not in g for g in yaml.safe_load(RULES.read_text())["groups"])


def test_every_rule_names_its_severity_and_summary() -> None:
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in g["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_every_dashboard_expression_parses_as_promql(tmp_path: Path) -> None:
    """promtool parses each expression as a recording rule's (Grafana is not in Debian)."""
    rules = {
        "groups": [
            {"name": "dash", "rules": [{"record": f"dash:panel_{i}", "expr": e} for i, e in enumerate(panel_exprs())]}
        ]
    }
    f = tmp_path / "dash.yml"
    f.write_text(yaml.safe_dump(rules))
    r = run(promtool(), "check", "rules", str(f))
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_metric_named_by_the_rules_and_the_dashboard_is_exported(exported: tuple[str, dict[str, str]]) -> None:
    _, families = exported
    named = {m for e in [*rule_exprs(), *panel_exprs()] for m in METRIC.findall(e)}
    assert len(named) >= 20 and not known("marketpipe_not_a_metric_total", families)
    missing = sorted(m for m in named if not known(m, families))
    assert not missing, f"not in /metrics: {missing}"


def test_dashboard_structure_imports_cleanly() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["id"] is None and 8 <= len(d["uid"]) <= 40 and d["title"]
    assert isinstance(d["schemaVersion"], int) and d["version"] == 0
    assert set(d["time"]) == {"from", "to"} and d["templating"] == {"list": []} and d["annotations"] == {"list": []}
    (inp,) = d["__inputs"]
    assert (inp["name"], inp["type"], inp["pluginId"]) == ("DS_PROMETHEUS", "datasource", "prometheus")
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        assert p["type"] in ("timeseries", "stat", "gauge", "table"), p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        here = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & here, f"{p['title']} overlaps another panel"
        cells |= here
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs))
        assert all(t["datasource"] == p["datasource"] and t["expr"].strip() for t in p["targets"])
    titles = " ".join(p["title"].lower() for p in d["panels"])
    for topic in ("provider", "latency", "circuit", "cache hit", "quality", "stream", "fan-out", "router", "alert"):
        assert topic in titles, topic


def _keys(doc: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            path = f"{prefix}.{k}" if prefix else k
            out.add(path)
            out |= _keys(v, path)
    return out


def test_example_config_loads_holds_every_key_and_equals_the_defaults() -> None:
    path = DEPLOY / "marketpipe.toml"
    raw = tomllib.loads(path.read_text())
    cfg = config_from_dict(raw, source=str(path))
    defaults = msgspec.to_builtins(Config())
    assert msgspec.to_builtins(cfg) | {"source_path": None} == defaults
    text = path.read_text()
    unset = {k for k in _keys(defaults) if k.rsplit(".", 1)[-1] in re.findall(r"^# (\w+) = ", text, flags=re.MULTILINE)}
    missing = sorted(k for k in _keys(defaults) - _keys(raw) - unset if k not in ("source_path", "jobs"))
    assert not missing, f"keys the example does not show: {missing}"
    for line in text.splitlines():
        if re.match(r"^\w+ = ", line):
            assert "  # " in line, f"no comment: {line}"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (the unit is checked where it is)")
    unit = (DEPLOY / "systemd" / "marketpipe.service").read_text()
    assert "ExecStart=/opt/marketpipe/bin/marketpipe serve" in unit and "MARKETPIPE_LOG_FORMAT=json" in unit
    script = Path(sys.executable).parent / "marketpipe"
    if not script.is_file():
        pytest.skip("no installed marketpipe script to stand in for /opt/marketpipe/bin/marketpipe")
    f = tmp_path / "marketpipe.service"
    f.write_text(unit.replace("/opt/marketpipe/bin/marketpipe", str(script)))
    r = run(analyze, "verify", str(f))
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(unit.replace("/opt/marketpipe/bin/marketpipe", "marketpipe-relative"))
    assert run(analyze, "verify", str(broken)).returncode != 0  # the check does catch a bad unit


def test_metrics_hygiene(exported: tuple[str, dict[str, str]]) -> None:
    text, families = exported
    assert "_created" not in text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "python_info", "marketpipe_build_info"):
        assert re.search(rf"^{name}(\{{| )", text, flags=re.MULTILINE), name
    assert re.search(r'^marketpipe_build_info\{python="[\d.]+",version="[^"]+"\} 1\.0$', text, flags=re.MULTILINE)
    # state-sets: the text format shows them as gauges, one series per state with the state as a label
    assert families["marketpipe_circuit_status"] == families["marketpipe_stream_router_status"] == "gauge"
    from prometheus_client import generate_latest

    from marketpipe.core.metrics import CIRCUIT_STATE, CIRCUIT_STATUS, REGISTRY
    from marketpipe.core.resilience import CircuitBreaker

    breaker = CircuitBreaker("kitprobe")
    breaker.policy.failure_threshold = 1
    breaker.failure()
    lines = generate_latest(REGISTRY).decode().splitlines()
    assert 'marketpipe_circuit_status{marketpipe_circuit_status="open",provider="kitprobe"} 1.0' in lines
    assert 'marketpipe_circuit_status{marketpipe_circuit_status="closed",provider="kitprobe"} 0.0' in lines
    assert 'marketpipe_circuit_state{provider="kitprobe"} 2.0' in lines
    CIRCUIT_STATE.remove("kitprobe")  # no open circuit left behind for other tests' alert engines
    CIRCUIT_STATUS.remove("kitprobe")
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", text, flags=re.MULTILINE))
    assert set(families) <= set(helps) and all(h.strip() for h in helps.values())
    assert "0 closed, 1 half-open, 2 open" in helps["marketpipe_circuit_state"]
