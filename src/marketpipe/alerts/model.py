"""What an alert is: a condition a rule found (:class:`Condition`), the alert it raises or keeps
(:class:`Alert`, with a stable id, severity, labels, first/last seen, resolved time) and what a sink is
asked to send (:class:`Notification`, a trigger or a resolve)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from marketpipe.core.config import SEVERITY_RANK, AlertSeverity

Action = Literal["trigger", "resolve"]
TRIGGER: Action = "trigger"
RESOLVE: Action = "resolve"


@dataclass(frozen=True, slots=True)
class Condition:
    """A rule's finding in one evaluation: ``key`` is the stable part of the alert id (the rule and the
    labels that name what is wrong, e.g. ``provider_availability/alpaca``)."""

    rule: str
    severity: AlertSeverity
    summary: str
    labels: dict[str, str] = field(default_factory=dict)
    value: float | None = None

    @property
    def key(self) -> str:
        return alert_id(self.rule, self.labels)


def alert_id(rule: str, labels: dict[str, str]) -> str:
    """``rule/label-values`` in label-name order: stable across runs, readable as PagerDuty's
    ``dedup_key`` (``marketpipe/`` is prefixed there) and short."""
    parts = [labels[k] for k in sorted(labels)]
    return "/".join([rule, *parts]) if parts else rule


@dataclass(frozen=True, slots=True)
class Alert:
    id: str
    rule: str
    severity: AlertSeverity
    summary: str
    labels: dict[str, str]
    first_seen: datetime
    last_seen: datetime
    value: float | None = None
    resolved_at: datetime | None = None

    @property
    def status(self) -> Literal["firing", "resolved"]:
        return "firing" if self.resolved_at is None else "resolved"

    @property
    def rank(self) -> int:
        return SEVERITY_RANK[self.severity]

    def seen(self, cond: Condition, at: datetime) -> Alert:
        return replace(self, severity=cond.severity, summary=cond.summary, value=cond.value, last_seen=at)

    def resolved(self, at: datetime) -> Alert:
        return replace(self, resolved_at=at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "rule": self.rule,
            "status": self.status,
            "severity": self.severity,
            "summary": self.summary,
            "labels": dict(self.labels),
            "value": self.value,
            "first_seen": self.first_seen.isoformat(),
            "last_seen": self.last_seen.isoformat(),
            "resolved_at": self.resolved_at.isoformat() if self.resolved_at else None,
        }


@dataclass(frozen=True, slots=True)
class Notification:
    """One message for the sinks: the alert as it is now, and whether it fired (or changed severity) or
    cleared. ``test`` marks the one sent by ``marketpipe alerts test``."""

    action: Action
    alert: Alert
    source: str
    test: bool = False

    @property
    def dedup_key(self) -> str:
        return f"marketpipe/{self.alert.id}"


def probe(source: str, at: datetime, action: Action = TRIGGER) -> Notification:
    """The notification ``marketpipe alerts test`` sends: marked as a test everywhere it shows."""
    alert = Alert("test", "test", "warning", f"test alert from marketpipe on {source}", {"sink": "test"}, at, at)
    return Notification(action, alert if action == TRIGGER else alert.resolved(at), source, test=True)
