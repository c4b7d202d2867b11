"""``import marketpipe as mp`` as the README uses it, each in a fresh interpreter (the import order is the point)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import SIM_ENV


def _python(code: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_", "MARKETPIPE_"))}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_mp_quality_is_the_function_whatever_was_imported_before() -> None:
    r = _python(
        """
        import sys
        import marketpipe as mp
        import marketpipe.quality.validate
        import marketpipe.service.data
        from marketpipe.quality import anomaly
        from marketpipe.quality.score import score_days
        assert callable(mp.quality) and mp.quality.__module__ == "marketpipe", mp.quality
        assert sys.modules["marketpipe.quality"].validate.__name__ == "marketpipe.quality.validate"
        assert anomaly.__name__ == "marketpipe.quality.anomaly" and callable(score_days)
        """
    )
    assert r.returncode == 0, r.stderr


def test_readme_snippet_in_its_own_order(sim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Before: ``mp.bars`` imported the services, which import ``marketpipe.quality.*``, and that replaced
    the function ``mp.quality`` with the subpackage: ``TypeError: 'module' object is not callable``."""
    cfg = tmp_path / "marketpipe.toml"
    cfg.write_text(
        f'[providers.alpaca]\nbase_url = "{sim.url}"\nplan = "unlimited"\nrate_limit_per_min = 100000\n'
        f'[store]\npath = "{tmp_path / "s.duckdb"}"\n'
    )
    r = _python(
        """
        import marketpipe as mp
        df = mp.bars("AAPL", "2024-03-04", "2024-03-05", timeframe="1Min")
        assert df.height == 780, df.height
        (aapl,) = mp.quality("AAPL", "2024-03-04", "2024-03-05")
        print(aapl.summary["score"])
        """,
        env={**SIM_ENV, "MARKETPIPE_CONFIG": str(cfg)},
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip()) > 0
