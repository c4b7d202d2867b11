"""``marketpipe alerts test --sink NAME`` and ``marketpipe alerts rules``: check a sink end to end, and
list the rules the engine evaluates with their effective thresholds (registered on the main app)."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import typer
from rich.table import Table

from marketpipe.cli.common import ConfigOpt, app, handle_errors, load_config, out

alerts_app = typer.Typer(help="Alert sinks and rules.", no_args_is_help=True)
app.add_typer(alerts_app, name="alerts")


@alerts_app.command("test")
@handle_errors
def alerts_test(
    sink: Annotated[str, typer.Option("--sink", help="slack | pagerduty | email | webhook")],
    config: ConfigOpt = None,
    no_resolve: Annotated[bool, typer.Option("--no-resolve", help="send the trigger only, no resolve")] = False,
) -> None:
    """Send one test alert (and its resolve) to SINK, with the retries a real one gets."""
    from marketpipe.alerts.dispatch import send_test

    cfg = load_config(config)
    sent = asyncio.run(send_test(cfg.alerts, sink, os.environ, resolve=not no_resolve))
    out.print(f"test alert sent to {sink}: {' + '.join(sent)}")


@alerts_app.command("rules")
@handle_errors
def alerts_rules(config: ConfigOpt = None) -> None:
    """The rules and their effective settings (the alerts.rules tables), and which sinks are enabled."""
    import msgspec

    from marketpipe.alerts.rules import RULE_NAMES, rule_config
    from marketpipe.alerts.sinks import SINK_NAMES

    cfg = load_config(config).alerts
    table = Table(box=None, header_style="bold", pad_edge=False)
    for head in ("rule", "enabled", "severity", "threshold", "critical", "window s", "for s", "min count"):
        table.add_column(head)
    for name in RULE_NAMES:
        r = rule_config(cfg.rules, name)
        table.add_row(
            name,
            "yes" if r.enabled else "no",
            r.severity,
            f"{r.threshold:g}",
            "" if r.critical_threshold is None else f"{r.critical_threshold:g}",
            f"{r.window_seconds:g}",
            f"{r.for_seconds:g}",
            str(r.min_count),
        )
    out.print(table)
    for name in SINK_NAMES:
        s = msgspec.to_builtins(getattr(cfg.sinks, name))
        out.print(f"sink {name}: {'enabled' if s['enabled'] else 'off'}, min_severity {s['min_severity']}")
