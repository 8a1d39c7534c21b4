"""The ok / warning / firing state of each rule and subject, and the changes worth a message.

As Prometheus does, a level must hold for the rule's ``for`` before the state follows it; going back
to ok resolves at once. A message is due only when the state changes (or every ``renotify`` while it
stays warning or firing); ``no_data`` says what an unmeasurable rule means: ``ok``, ``keep`` the state
as it is, or ``alert`` (firing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from velvet_core import clock
from velvet_core.alerts.evaluate import Instance, Reading
from velvet_core.alerts.rules import Rule

_RANK = {"ok": 0, "warning": 1, "firing": 2}


@dataclass
class Track:
    """What is known of one (rule, subject)."""

    state: str = "ok"  # the state last notified: ok, warning, firing
    notified_at: datetime | None = None
    warn_since: datetime | None = None  # the level has been warning or worse since then
    fire_since: datetime | None = None  # the level has been firing since then
    value: float | None = None


@dataclass
class Change:
    """A state change (or a reminder) for one subject, to be notified and recorded."""

    rule: Rule
    subject: str
    state: str  # firing, warning, resolved
    at: datetime
    value: float | None
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    repeat: bool = False
    no_data: bool = False


class Tracker:
    """The states of every rule's subjects; :meth:`step` feeds one evaluation and returns the changes."""

    def __init__(self) -> None:
        self.tracks: dict[tuple[str, str], Track] = {}

    def state(self, rule: str) -> str:
        """The rule's worst notified state over its subjects, ``pending`` when a level waits for ``for``."""
        worst, pending = "ok", False
        for (name, _), t in self.tracks.items():
            if name == rule:
                worst = max(worst, t.state, key=_RANK.__getitem__)
                pending = pending or (t.state == "ok" and t.warn_since is not None)
        return "pending" if worst == "ok" and pending else worst

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Start from the last recorded state of each (rule, subject): ``rule, subject, state, at``."""
        for r in rows:
            if r["state"] in ("firing", "warning"):
                self.tracks[(r["rule"], r["subject"])] = Track(
                    r["state"], r["at"], r["at"], r["at"] if r["state"] == "firing" else None, r.get("value"))

    def step(self, rule: Rule, reading: Reading | None, now: datetime) -> list[Change]:
        """Apply one evaluation of ``rule`` (``None``: it could not be evaluated, nothing changes)."""
        if reading is None:
            return []
        instances = reading.instances
        no_data = instances is None
        if instances is None:
            if rule.no_data == "keep":
                return []
            level = "firing" if rule.no_data == "alert" else "ok"
            instances = [Instance("", None, level, f"no data: {reading.note}", {"no_data": reading.note})]
        seen = {i.subject: i for i in instances}
        subjects = list(seen) + [s for (name, s) in self.tracks if name == rule.name and s not in seen]
        changes = []
        for subject in subjects:
            inst = seen.get(subject)
            t = self.tracks.setdefault((rule.name, subject), Track())
            level = inst.level if inst else "ok"
            t.warn_since = (t.warn_since or now) if level in ("warning", "firing") else None
            t.fire_since = (t.fire_since or now) if level == "firing" else None
            if t.fire_since and (now - t.fire_since).total_seconds() >= rule.for_:
                target = "firing"
            elif t.warn_since and (now - t.warn_since).total_seconds() >= rule.for_:
                target = "warning"
            else:
                target = "ok"
            value = inst.value if inst else None
            summary = inst.summary if inst else f"{subject or rule.name}: no longer seen"
            details = inst.details if inst else {}
            if target != t.state:
                changes.append(Change(rule, subject, "resolved" if target == "ok" else target, now, value,
                                      summary, details, no_data=no_data))
                t.state, t.notified_at = target, now
            elif target != "ok" and rule.renotify and t.notified_at \
                    and (now - t.notified_at).total_seconds() >= rule.renotify:
                changes.append(Change(rule, subject, target, now, value, summary, details, repeat=True,
                                      no_data=no_data))
                t.notified_at = now
            t.value = value
            if t.state == "ok" and t.warn_since is None:
                del self.tracks[(rule.name, subject)]
        return changes

    def dump(self) -> list[dict[str, Any]]:
        """The tracks as JSON-ready rows (for ``velvet alerts check``'s state file)."""
        out = []
        for (rule, subject), t in self.tracks.items():
            d = asdict(t)
            out.append({"rule": rule, "subject": subject,
                        **{k: v.isoformat() if isinstance(v, datetime) else v for k, v in d.items()}})
        return out

    def load(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            dt = {k: clock.parse(r[k]) if r.get(k) else None
                  for k in ("notified_at", "warn_since", "fire_since")}
            self.tracks[(r["rule"], r["subject"])] = Track(r.get("state", "ok"), value=r.get("value"), **dt)

    def forget_rules_except(self, names: set[str]) -> None:
        for key in [k for k in self.tracks if k[0] not in names]:
            del self.tracks[key]
