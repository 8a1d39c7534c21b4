"""The report's charts, drawn server-side as inline SVG with pygal (no script, no network needed to show them)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import pygal
from pygal.style import Style

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


_PYGAL_CONFIG = re.compile(r"<script type=\"text/javascript\">window\.pygal.*?</script>", re.S)


def render(chart: Any) -> str:
    # pygal writes its whole config as a script for its tooltip code, which we do not load: leave it out
    return _PYGAL_CONFIG.sub("", str(chart.render(is_unicode=True)))


def _label_every(n: int, target: int = 12) -> int:
    return max(1, n // target)


def timeline(t: dict[str, Any]) -> str:
    rows = t["rows"]
    longest = max((sum(r[f"{p}_hours"] or 0 for p in ("queue", "processing", "finalize")) for r in rows),
                  default=0)
    top = max(24.0, float(int(longest) + 1))
    c = pygal.HorizontalStackedBar(**_config(
        height=max(260, 40 + 17 * len(rows)), range=(0, top), include_x_axis=True, legend_at_bottom_columns=5,
        style=Style(**{**STYLE.to_dict(), "colors": PHASE_COLORS}), x_title="hours since the batch was created "
        "(the API's completion window is 24 h)", y_labels=list(range(0, int(top) + 1, 4 if top <= 48 else 12)),
        show_y_guides=True, show_x_guides=False, spacing=2))
    c.x_labels = [("✗ " if r["marked"] else "") + f"{r['id'][:22]} ({r['status']})" for r in rows]
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
            series[k].append({"value": round(v, 3), "label": r["id"]} if v else None)
    for name, values in series.items():
        c.add(name, values, formatter=lambda v: f"{v:.2f} h")
    return render(c)


def turnaround(t: dict[str, Any]) -> str:
    c = pygal.Bar(**_config(y_title="hours", height=300))
    c.x_labels = [m["model"] for m in t["by_model"]]
    c.add("p50", [m["p50_hours"] for m in t["by_model"]], formatter=lambda v: f"{v:.2f} h")
    c.add("p95", [m["p95_hours"] for m in t["by_model"]], formatter=lambda v: f"{v:.2f} h")
    return render(c)


def turnaround_histogram(t: dict[str, Any]) -> str:
    c = pygal.Bar(**_config(y_title="completed batches", x_title="turnaround (hours)", height=260,
                            show_legend=False))
    c.x_labels = [f"{h['hours']}-{h['hours'] + 1}" if h["hours"] < 24 else "24+" for h in t["histogram"]]
    c.add("batches", [h["batches"] for h in t["histogram"]])
    return render(c)


def failure_rates(f: dict[str, Any]) -> str:
    c = pygal.HorizontalBar(**_config(height=max(180, 60 + 30 * len(f["by_model"])), show_legend=False,
                                      x_title="share of lines that failed"))
    c.x_labels = [m["model"] for m in f["by_model"]]
    c.add("failed lines", [m["failed_rate"] for m in f["by_model"]], formatter=lambda v: f"{v * 100:.1f}%")
    c.value_formatter = lambda v: f"{v * 100:.0f}%"
    return render(c)


def spend_by_model(days: list[str], rows: list[dict[str, Any]]) -> str:
    totals: dict[str, float] = defaultdict(float)
    for r in rows:
        totals[r["model"]] += r["live_usd"] + r["batch_usd"]
    models = sorted(totals, key=lambda m: -totals[m])
    keep = models[:7]
    c = pygal.StackedBar(**_config(y_title="USD", x_label_rotation=0,
                                   x_labels_major_every=_label_every(len(days)), show_minor_x_labels=False))
    c.x_labels = days
    cell = {(r["day"], r["model"]): r["live_usd"] + r["batch_usd"] for r in rows}
    for m in keep:
        c.add(m, [cell.get((d, m)) or None for d in days], formatter=_usd)
    if len(models) > len(keep):
        c.add("other models", [sum(cell.get((d, m), 0) for m in models[len(keep):]) or None for d in days],
              formatter=_usd)
    c.value_formatter = _usd
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
    c.x_labels = days
    for i, name in enumerate(("live calls", "batches", "saved by the batch discount")):
        c.add(name, [per[d][i] or None for d in days], formatter=_usd)
    c.value_formatter = _usd
    return render(c)


def _usd(v: float | None) -> str:
    if v is None:
        return "-"
    return f"${v:,.2f}" if abs(v) >= 1 else f"${v:.4f}" if abs(v) >= 0.0001 else f"${v:.2g}"


def _line(points: list[dict[str, Any]], bucket: str, series: list[tuple[str, str]], y_title: str, fmt: Any,
          bar: bool = False, **kw: Any) -> str:
    hourly = bucket == "hour"
    labels = [p["at"][5:10] + (" " + p["at"][11:13] + "h" if hourly else "") for p in points]
    # hourly points are labelled at midnight only (a week has 168 of them)
    major = [x for x, p in zip(labels, points, strict=True) if not hourly or p["at"][11:13] == "00"]
    if not hourly and len(major) > 14:
        major = major[::_label_every(len(major), 14)]
    cls = pygal.Bar if bar else pygal.Line
    c = cls(**_config(y_title=y_title, height=280, x_labels_major=major, show_minor_x_labels=len(points) <= 14,
                      show_dots=len(points) <= 48, stroke_style={"width": 2}, allow_interruptions=True, **kw))
    c.x_labels = labels
    for key, name in series:
        c.add(name, [p[key] for p in points], formatter=fmt)
    c.value_formatter = fmt
    return render(c)


def calls_per_bucket(points: list[dict[str, Any]], bucket: str) -> str:
    return _line(points, bucket, [("calls", f"calls per {bucket}"), ("errors", "errors")], "calls",
                 lambda v: f"{v:,.0f}", bar=True)


def error_rate(points: list[dict[str, Any]], bucket: str) -> str:
    return _line(points, bucket, [("error_rate", "error rate")], "share of calls", lambda v: f"{v * 100:.1f}%",
                 show_legend=False)


def latency(points: list[dict[str, Any]], bucket: str, prefix: str, title: str) -> str:
    return _line(points, bucket, [(f"{prefix}_p50_ms", f"{title} p50"), (f"{prefix}_p95_ms", f"{title} p95")],
                 "ms", lambda v: f"{v:,.0f} ms")


def top_spend(rows: list[dict[str, Any]], label: str) -> str:
    c = pygal.HorizontalBar(**_config(height=max(160, 50 + 28 * len(rows)), show_legend=False, x_title="USD"))
    c.x_labels = [r[label] for r in rows]
    c.add("spend", [r["cost_usd"] for r in rows], formatter=_usd)
    c.value_formatter = _usd
    return render(c)
