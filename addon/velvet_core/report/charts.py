"""The report's charts, drawn server-side as inline SVG with pygal (no script, no network needed to show them)."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pygal
from pygal.style import Style

from velvet_core.humanize import money

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
STYLE = Style(
    background="#ffffff", plot_background="#ffffff", foreground="#333333", foreground_strong="#111111",
    foreground_subtle="#dddddd", colors=PALETTE, opacity=".9", opacity_hover="1", transition="0ms",
    font_family="system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif",
    label_font_size=11, major_label_font_size=11, legend_font_size=12, title_font_size=14, value_font_size=10,
    tooltip_font_size=12,
)
# phases of the timeline: queue, processing, finalizing, still running, and the phase a batch ended badly in
PHASE_COLORS = ("#9ecae1", "#4e79a7", "#59a14f", "#bab0ac", "#e15759")


def _config(**kw: Any) -> dict[str, Any]:
    base = {"style": STYLE, "js": [], "disable_xml_declaration": True, "width": 960, "height": 340,
            "legend_at_bottom": True, "legend_at_bottom_columns": 6, "print_values": False, "margin": 12,
            "margin_bottom": 24,
            "explicit_size": False, "no_data_text": "no data", "truncate_legend": 40, "truncate_label": 40}
    base.update(kw)
    return base


# Longest text pygal is handed as an axis label or series name. Longer labels widen the label margin until the
# plot has no width left, and pygal's title splitting then loops forever (a 150-character tag: 21 GB in 10 min).
LABEL_MAX = 40
TOOLTIP_MAX = 300
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def clean(text: object) -> str:
    """Text from traffic without control or direction characters (each becomes a space)."""
    return _CONTROL.sub(" ", str(text))


def label(text: object, limit: int = LABEL_MAX) -> str:
    """Any text from traffic made safe for the chart library: no control or direction characters, at most
    `limit` characters (cut with …). Every label, series name and tooltip goes through here; the tables keep the
    full text."""
    s = clean(text).strip() or "(none)"
    return s if len(s) <= limit else s[:limit - 1] + "…"


def labels(texts: list[Any]) -> list[str]:
    return [label(t) for t in texts]


# beyond this pygal's axis arithmetic overflows (a cost of 1e300 from a server's usage crashed the report)
VALUE_MAX = 1e15


def value(v: float | None) -> float | None:
    """A number the chart library can place: finite, within ±VALUE_MAX (else clamped; NaN is no value)."""
    if v is None or math.isnan(v):
        return None
    return max(-VALUE_MAX, min(VALUE_MAX, float(v)))


def point(v: float | None, full: object) -> dict[str, Any] | None:
    """A bar whose tooltip names it in full (up to TOOLTIP_MAX characters), as the axis cannot."""
    return None if v is None else {"value": v, "label": label(full, TOOLTIP_MAX)}


def _number(v: Any) -> float | None:
    return v["value"] if isinstance(v, dict) else v


def add(c: Any, name: str, values: list[Any], fmt: Any, skip_zero: bool = False) -> None:
    """Add a series: its name and labels cut by label(), values made placeable by value(). A series that is all
    zero or empty is left out of the chart and its legend when `skip_zero` (a $0 model says nothing)."""
    values = [None if _number(v) is None else {**v, "value": value(v["value"])} if isinstance(v, dict)
              else value(v) for v in values]
    if skip_zero and not any(_number(v) for v in values):
        return
    nums = [_number(v) for v in values]
    # an isolated point of a line has no segment to draw: give the series its dots, or it shows nothing
    isolated = any(n is not None and (i == 0 or nums[i - 1] is None)
                   and (i + 1 == len(nums) or nums[i + 1] is None) for i, n in enumerate(nums))
    dots = isolated or sum(n is not None for n in nums) <= 48
    c.add(label(name), values, formatter=fmt, show_dots=dots)


def nice_ticks(top: float, integer: bool = False, count: int = 5) -> list[float]:
    """Axis ticks from 0 to at least `top` at a 1-2-5 step (whole numbers when `integer`)."""
    top = value(top) or 0.0
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, round(step))
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def scale(top: float, fmt: Callable[[float, int], str], integer: bool = False
          ) -> tuple[list[float], Callable[[float], str]]:
    """Ticks from 0 to `top` and their formatter: `fmt(v, decimals)` gets as many decimals as the tick step needs,
    so that no two labels read the same and none is in scientific notation (pygal's own ticks for tiny ranges
    are)."""
    ticks = nice_ticks(top, integer)
    step = ticks[1] - ticks[0]
    decimals = 0 if step >= 1 else -math.floor(math.log10(step))
    return ticks, lambda v: fmt(v, decimals)


def axis(c: Any, top: float, fmt: Callable[[float, int], str], integer: bool = False) -> None:
    """Set the chart's value axis by scale()."""
    c.y_labels, c.value_formatter = scale(top, fmt, integer)


def _top(values: list[Any]) -> float:
    return max((n for n in (_number(v) for v in values) if n is not None), default=0.0)


def _usd_axis(v: float, d: int) -> str:
    return f"${v:,.{max(d, 2) if d else 0}f}"


_PYGAL_CONFIG = re.compile(r"<script type=\"text/javascript\">window\.pygal.*?</script>", re.S)


def render(chart: Any) -> str:
    if not chart.raw_series:  # every series was left out (all $0): pygal needs one to draw its "no data"
        chart.add("", [])
    # legends share the width: fewer columns for longer names, so that they do not run into each other
    longest = max((len(kw.get("title") or "") for _, kw in chart.raw_series), default=0)
    cfg = chart.config
    cfg.legend_at_bottom_columns = max(1, min(cfg.legend_at_bottom_columns, 900 // (7 * longest + 40)))
    # pygal writes its whole config as a script for its tooltip code, which we do not load: leave it out
    return _PYGAL_CONFIG.sub("", str(chart.render(is_unicode=True)))


def _label_every(n: int, target: int = 12) -> int:
    return max(1, n // target)


def _h(v: float) -> str:
    return f"{v:.2f} h"


def timeline(t: dict[str, Any]) -> str:
    rows = t["rows"]
    longest = max((sum(r[f"{p}_hours"] or 0 for p in ("queue", "processing", "finalize")) for r in rows),
                  default=0)
    top = max(24.0, float(int(min(longest, 1e6)) + 1))
    c = pygal.HorizontalStackedBar(**_config(
        height=max(260, 40 + 17 * len(rows)), range=(0, top), include_x_axis=True, legend_at_bottom_columns=5,
        style=Style(**{**STYLE.to_dict(), "colors": PHASE_COLORS}), x_title="hours since the batch was created "
        "(the API's completion window is 24 h)", y_labels=list(range(0, int(top) + 1, 4 if top <= 48 else 12)),
        show_y_guides=True, show_x_guides=False, spacing=2))
    c.x_labels = labels([("✗ " if r["marked"] else "") + f"{r['id'][:22]} ({r['status']})" for r in rows])
    series: dict[str, list[Any]] = {k: [] for k in ("queue", "processing", "finalizing", "still running",
                                                    "ended badly (✗)")}
    for r in rows:
        parts = {"queue": r["queue_hours"], "processing": r["processing_hours"], "finalizing": r["finalize_hours"],
                 "still running": None, "ended badly (✗)": None}
        last = {"queue": "queue", "processing": "processing", "finalize": "finalizing"}[r["last_phase"]]
        if r["open"]:
            parts["still running"], parts[last] = parts[last], None
        elif r["marked"]:
            parts["ended badly (✗)"], parts[last] = parts[last], None
        for k, v in parts.items():
            # a phase of a second is a value too (0.000 h): None would leave a fast batch out, and a period of
            # fast batches with a "no data" over the timeline
            series[k].append(_phase(v, top, r["id"]) if v is not None else None)
    for name, values in series.items():
        add(c, name, values, _h)
    return render(c)


def _phase(hours: float, top: float, batch_id: str) -> dict[str, Any] | None:
    """A phase bar at least 1/250 of the axis wide, so that a batch done in a second still shows; its tooltip
    says the real duration."""
    p = point(max(hours, top / 250), batch_id)
    if p is not None:
        p["formatter"] = lambda _v, real=hours: _h(real)
    return p


def turnaround(t: dict[str, Any]) -> str:
    c = pygal.Bar(**_config(y_title="hours", height=300))
    c.x_labels = labels([m["model"] for m in t["by_model"]])
    add(c, "p50", [point(m["p50_hours"], m["model"]) for m in t["by_model"]], _h)
    add(c, "p95", [point(m["p95_hours"], m["model"]) for m in t["by_model"]], _h)
    axis(c, max((m["p95_hours"] or 0 for m in t["by_model"]), default=0), lambda v, d: f"{v:,.{d}f}")
    return render(c)


def turnaround_histogram(t: dict[str, Any]) -> str:
    c = pygal.Bar(**_config(y_title="completed batches", x_title="turnaround (hours)", height=260,
                            show_legend=False))
    c.x_labels = labels([f"{h['hours']}-{h['hours'] + 1}" if h["hours"] < 24 else "24+" for h in t["histogram"]])
    add(c, "batches", [h["batches"] for h in t["histogram"]], _count)
    axis(c, max((h["batches"] for h in t["histogram"]), default=0), lambda v, d: f"{v:,.0f}", integer=True)
    return render(c)


def failure_rates(f: dict[str, Any]) -> str:
    c = pygal.HorizontalBar(**_config(height=max(180, 60 + 30 * len(f["by_model"])), show_legend=False,
                                      x_title="share of lines that failed"))
    c.x_labels = labels([m["model"] for m in f["by_model"]])
    add(c, "failed lines", [point(m["failed_rate"], m["model"]) for m in f["by_model"]], _pct)
    c.value_formatter = lambda v: f"{v * 100:.0f}%"
    return render(c)


def spend_by_model(days: list[str], rows: list[dict[str, Any]]) -> str:
    totals: dict[str, float] = defaultdict(float)
    for r in rows:
        totals[r["model"]] += r["live_usd"] + r["batch_usd"]
    models = sorted((m for m in totals if totals[m]), key=lambda m: -totals[m])
    keep = models[:7]
    c = pygal.StackedBar(**_config(y_title="USD", x_label_rotation=0,
                                   x_labels_major_every=_label_every(len(days)), show_minor_x_labels=False))
    c.x_labels = labels(days)
    cell: dict[tuple[str, str], float] = defaultdict(float)
    for r in rows:
        cell[r["day"], r["model"]] += r["live_usd"] + r["batch_usd"]
    for m in keep:
        add(c, m, [point(cell.get((d, m)) or None, m) for d in days], money, skip_zero=True)
    if len(models) > len(keep):
        add(c, "other models", [sum(cell.get((d, m), 0) for m in models[len(keep):]) or None for d in days],
            money, skip_zero=True)
    axis(c, max((sum(cell.get((d, m), 0) for m in models) for d in days), default=0), _usd_axis)
    return render(c)


def live_vs_batch(days: list[str], rows: list[dict[str, Any]]) -> str:
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for r in rows:
        p = per[r["day"]]
        p[0] += r["live_usd"]
        p[1] += r["batch_usd"]
        p[2] += max(0.0, r["batch_sync_usd"] - r["batch_usd"])
    c = pygal.Bar(**_config(y_title="USD", x_labels_major_every=_label_every(len(days)),
                            show_minor_x_labels=False))
    c.x_labels = labels(days)
    for i, name in enumerate(("live calls", "batches", "saved by the batch discount")):
        add(c, name, [per[d][i] or None for d in days], money, skip_zero=True)
    axis(c, max((max(per[d]) for d in days), default=0), _usd_axis)
    return render(c)


def _count(v: float) -> str:
    return f"{v:,.0f}"


def _pct(v: float) -> str:
    return f"{v * 100:.1f}%"


def _line(points: list[dict[str, Any]], bucket: str, series: list[tuple[str, str]], y_title: str, fmt: Any,
          scale: Callable[[float, int], str], bar: bool = False, integer: bool = False, **kw: Any) -> str:
    hourly = bucket == "hour"
    names = [p["at"][5:10] + (" " + p["at"][11:13] + "h" if hourly else "") for p in points]
    # hourly points are labelled at midnight only (a week has 168 of them)
    major = [x for x, p in zip(names, points, strict=True) if not hourly or p["at"][11:13] == "00"]
    if not hourly and len(major) > 14:
        major = major[::_label_every(len(major), 14)]
    cls = pygal.Bar if bar else pygal.Line
    c = cls(**_config(y_title=y_title, height=280, x_labels_major=major, show_minor_x_labels=len(points) <= 14,
                      stroke_style={"width": 2}, allow_interruptions=True, **kw))
    c.x_labels = labels(names)
    for key, name in series:
        add(c, name, [p[key] for p in points], fmt)
    axis(c, max((_top([p[key] for p in points]) for key, _ in series), default=0), scale, integer)
    return render(c)


def calls_per_bucket(points: list[dict[str, Any]], bucket: str) -> str:
    return _line(points, bucket, [("calls", f"calls per {bucket}"), ("errors", "errors")], "calls", _count,
                 lambda v, d: f"{v:,.0f}", bar=True, integer=True)


def error_rate(points: list[dict[str, Any]], bucket: str) -> str:
    return _line(points, bucket, [("error_rate", "error rate")], "share of calls", _pct,
                 lambda v, d: f"{v * 100:.{max(0, d - 2)}f}%", show_legend=False)


def latency(points: list[dict[str, Any]], bucket: str, prefix: str, title: str) -> str:
    return _line(points, bucket, [(f"{prefix}_p50_ms", f"{title} p50"), (f"{prefix}_p95_ms", f"{title} p95")],
                 "ms", lambda v: f"{v:,.0f} ms", lambda v, d: f"{v:,.{d}f} ms")


def top_spend(rows: list[dict[str, Any]], key: str) -> str:
    c = pygal.HorizontalBar(**_config(height=max(160, 50 + 28 * len(rows)), show_legend=False, x_title="USD"))
    c.x_labels = labels([r[key] for r in rows])
    add(c, "spend", [point(r["cost_usd"], r[key]) for r in rows], money)
    axis(c, max((r["cost_usd"] or 0 for r in rows), default=0), _usd_axis)
    return render(c)
