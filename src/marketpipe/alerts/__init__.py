"""Alerts: the engine (rules over the pipeline's metrics and events, ``engine.py`` and ``rules.py``), the
sinks (Slack, PagerDuty, email, webhook: ``sinks.py``) and the per-sink workers between them
(``dispatch.py``). Depends on ``core`` only."""

from marketpipe.alerts.engine import AlertEngine
from marketpipe.alerts.model import Alert, Condition, Notification
from marketpipe.alerts.sinks import SINK_NAMES

__all__ = ["SINK_NAMES", "Alert", "AlertEngine", "Condition", "Notification"]
