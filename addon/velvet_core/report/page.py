"""The report as one self-contained HTML page: inline CSS and SVG, and a few lines of optional script for
hover tooltips. Nothing is fetched: it opens offline, from a mail attachment as from a disk."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape as html_escape
from typing import Any

from velvet_core import __version__
from velvet_core.humanize import money
from velvet_core.report import charts

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0;background:#f4f5f7;
color:#222}main{max-width:1000px;margin:0 auto;padding:24px}h1{font-size:24px;margin:0 0 4px}
h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 4px;color:#555}.sub{color:#666;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:16px 0}
.card{background:#fff;border-radius:8px;padding:10px 14px;box-shadow:0 1px 2px rgba(0,0,0,.08);min-width:130px}
.card b{display:block;font-size:20px}
.card span{font-size:12px;color:#666}.chart{background:#fff;border-radius:8px;padding:6px;margin:8px 0;
box-shadow:0 1px 2px rgba(0,0,0,.08)}.chart svg{width:100%;height:auto;display:block}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:8px 0;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th{background:#fafafa}td.n{text-align:right;font-variant-numeric:tabular-nums}
.firing{color:#c0392b;font-weight:600}.warning{color:#b9770e;font-weight:600}.resolved{color:#1e8449}
.empty{color:#888;font-style:italic;margin:8px 0}code{font-size:12px}
#tip{position:fixed;pointer-events:none;background:#222;color:#fff;font-size:12px;padding:4px 8px;
border-radius:4px;display:none;z-index:9}
"""

# pygal keeps each value in <desc> elements and draws tooltips with a script it would load from a CDN;
# these lines show the same tooltips offline (the charts need no script at all).
SCRIPT = """
(function(){var tip=document.getElementById('tip'),all=document.querySelectorAll('.tooltip-trigger');
document.body.setAttribute('data-tooltips',all.length);
all.forEach(function(el){
var g=el.parentNode,v=g.querySelector('desc.value'),x=g.querySelector('desc.x_label');
el.addEventListener('mousemove',function(e){tip.textContent=(x?x.textContent+': ':'')+(v?v.textContent:'');
tip.style.display='block';tip.style.left=(e.clientX+12)+'px';tip.style.top=(e.clientY+12)+'px';});
el.addEventListener('mouseleave',function(){tip.style.display='none';});});})();
"""


def escape(text: str) -> str:
    """HTML text of a value that may come from traffic: escaped, and without control characters."""
    return html_escape(charts.clean(text))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{_cell(v)}</td>'
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(v: Any) -> str:
    if isinstance(v, Raw):
        return str(v)
    return "-" if v is None else escape(str(v))


class Raw(str):
    """HTML already escaped."""


def _chart(svg: str, label: str) -> str:
    return f'<div class="chart" role="img" aria-label="{escape(label)}">{svg}</div>'


def _empty(text: str) -> str:
    return f'<p class="empty">{escape(text)}</p>'


def _hours(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} h" if v >= 1 else f"{v * 60:.0f} min"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _example(x: dict[str, Any]) -> str:
    out = f"<code>{escape(x['batch_id'] or '')}</code>"
    return out + (f" · <code>{escape(x['custom_id'])}</code>" if x["custom_id"] else "")


def _metric(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_metric(x)}" for k, x in v.items())
    return "-" if v is None else str(v)


def build(data: dict[str, Any], step: Callable[[str], None] = lambda _: None) -> str:
    """The HTML page for ``collect``'s figures."""
    t = data["totals"]
    since, until = data["since"].replace("T", " ")[:16], data["until"].replace("T", " ")[:16]
    parts = [f"<h1>velvet report</h1><p class=sub>{escape(since)} → {escape(until)} UTC · OpenAI API traffic "
             "logged by velvet</p>"]
    cards = [("live calls", f"{t['calls']:,}"), ("error rate", _pct(t["error_rate"])),
             ("live spend", money(t["live_usd"])), ("batches", f"{t['batches']:,}"),
             ("batch lines", f"{t['batch_lines']:,}"), ("batch spend", money(t["batch_usd"])),
             ("saved by batching", money(t["batch_saved_usd"])), ("alerts", f"{len(data['alerts']):,}")]
    parts.append('<div class="cards">' + "".join(
        f"<div class=card><b>{escape(v)}</b><span>{escape(k)}</span></div>" for k, v in cards) + "</div>")

    step("drawing the batch timeline")
    tl = data["timeline"]
    parts.append("<h2 id=timeline>Batch timeline</h2>")
    if tl["rows"]:
        parts.append(f"<p class=sub>Queue, processing and finalize phases of {tl['shown']:,} of the "
                     f"{tl['batches']:,} batches created in the period (the most recent, and those that failed, "
                     f"expired or were cancelled, marked ✗: {tl['bad']:,} in all), against the 24 h window.</p>")
        parts.append(_chart(charts.timeline(tl), "batch timeline"))
    else:
        parts.append(_empty("No batches created in this period."))

    step("drawing turnaround and failures")
    ta = data["turnaround"]
    parts.append("<h2 id=turnaround>Turnaround</h2>")
    if ta["by_model"]:
        parts.append(_chart(charts.turnaround(ta), "turnaround p50 and p95 by model"))
        parts.append(_chart(charts.turnaround_histogram(ta), "turnaround distribution"))
        parts.append(_table(["model", "completed batches", "p50", "p95"],
                            [[m["model"], f"{m['batches']:,}", _hours(m["p50_hours"]), _hours(m["p95_hours"])]
                             for m in ta["by_model"]], numeric=(1, 2, 3)))
    else:
        parts.append(_empty("No completed batches in this period."))
    bf = data["batch_failures"]
    parts.append("<h2 id=failures>Batch line failures</h2>")
    if bf["by_model"]:
        parts.append(_chart(charts.failure_rates(bf), "failed line share by model"))
        parts.append(_table(["model", "lines", "failed", "share"],
                            [[m["model"], f"{m['lines']:,}", f"{m['failed']:,}", _pct(m["failed_rate"])]
                             for m in bf["by_model"]], numeric=(1, 2, 3)))
    if bf["top_errors"]:
        parts.append("<h3>Top error codes</h3>")
        parts.append(_table(["error code", "source", "count", "examples (batch · custom_id)"],
                            [[e["code"] or "(none)", e["source"], f"{e['count']:,}",
                              Raw("<br>".join(_example(x) for x in e["examples"]))] for e in bf["top_errors"]],
                            numeric=(2,)))
    if not bf["by_model"] and not bf["top_errors"]:
        parts.append(_empty("No batch output downloaded through the proxy in this period."))

    step("drawing spend")
    rows = data["spend_by_day"]
    days = sorted({r["day"] for r in rows})
    parts.append("<h2 id=spend>Spend per day</h2>")
    if any(r["live_usd"] or r["batch_usd"] for r in rows):
        parts.append("<h3>By model (live and batch)</h3>"
                     + _chart(charts.spend_by_model(days, rows), "spend by model"))
        parts.append("<h3>Live against batch, and what the batch discount saved</h3>"
                     + _chart(charts.live_vs_batch(days, rows), "live against batch spend"))
        parts.append(f"<p class=sub>Batch spend is counted on the day the batch ended; “saved” is what its tokens "
                     f"would have cost as live calls, less what they cost: {escape(money(t['batch_saved_usd']))} "
                     "in this period.</p>")
    else:
        parts.append(_empty("No spend recorded in this period."))
    if cache := data.get("cache_by_day"):
        parts.append("<h3>Answered by velvet's cache</h3>" + _table(
            ["day", "hits", "saved"], [[c["day"], f"{c['hits']:,}", money(c["saved_usd"])] for c in cache],
            numeric=(1, 2)))

    step("drawing traffic")
    pts = data["traffic"]["points"]
    bucket = data["bucket"]
    parts.append("<h2 id=traffic>Live traffic</h2>")
    if t["calls"]:
        parts.append(f"<h3>Calls per {bucket}</h3>" + _chart(charts.calls_per_bucket(pts, bucket), "calls"))
        parts.append("<h3>Error rate</h3>" + _chart(charts.error_rate(pts, bucket), "error rate"))
        parts.append("<h3>Latency (answered calls)</h3>"
                     + _chart(charts.latency(pts, bucket, "latency", "latency"), "latency"))
        if any(p["ttft_p50_ms"] is not None for p in pts):
            parts.append("<h3>Time to first token (streams)</h3>"
                         + _chart(charts.latency(pts, bucket, "ttft", "time to first token"),
                                  "time to first token"))
    else:
        parts.append(_empty("No live calls in this period."))

    parts.append("<h2 id=top>Top tags and API keys by spend</h2>")
    if data["top_tags"]:
        parts.append("<h3>Tags (velvet-metadata-* headers, batch metadata)</h3>"
                     + _chart(charts.top_spend(data["top_tags"], "tag"), "top tags"))
    else:
        parts.append(_empty("No tagged calls or batches in this period."))
    if data["top_keys"]:
        parts.append("<h3>API keys (fingerprints)</h3>" + _chart(charts.top_spend(data["top_keys"],
                                                                                 "key_fingerprint"), "top keys"))
        parts.append(_table(["key fingerprint", "calls", "live", "batch", "total"],
                            [[k["key_fingerprint"], f"{int(k['calls']):,}", money(k["live_usd"]),
                              money(k["batch_usd"]), money(k["cost_usd"])] for k in data["top_keys"]],
                            numeric=(1, 2, 3, 4)))

    parts.append("<h2 id=quality>Answer quality</h2>")
    if data.get("evals"):
        parts.append(_table(["eval", "check", "judged", "passed", "failed", "pending", "pass rate", "mean score",
                             "judge cost", "worst examples (call id, or batch custom_id)"],
                            [[e["name"], e["check"], f"{e['judged']:,}", f"{e['passed']:,}", f"{e['failed']:,}",
                              f"{e['pending']:,}", _pct(e["pass_rate"]),
                              "-" if e["mean_score"] is None else f"{e['mean_score']:.2f}", money(e["cost_usd"]),
                              ", ".join(e["worst"]) or "-"] for e in data["evals"]],
                            numeric=(2, 3, 4, 5, 6, 7, 8)))
        days = sorted({d["day"] for d in data.get("evals_by_day") or []})
        names = sorted({d["eval"] for d in data.get("evals_by_day") or []})
        rate = {(d["eval"], d["day"]): d["pass_rate"] for d in data.get("evals_by_day") or []}
        if days:
            parts.append("<h3>Pass rate per day</h3>" + _table(
                ["eval", *days], [[n, *(_pct(rate.get((n, d))) for d in days)] for n in names],
                numeric=tuple(range(1, len(days) + 1))))
    else:
        parts.append(_empty("No answers scored in this period (velvet_evals, velvet evals run)."))

    parts.append("<h2 id=alerts>Alerts</h2>")
    if data["alerts"]:
        parts.append(_table(["at (UTC)", "state", "rule", "message"],
                            [[a["at"].replace("T", " ").rstrip("Z"), Raw(f"<span class={escape(a['state'])}>"
                                                                          f"{escape(a['state'])}</span>"),
                              a["rule"], a["text"].split(": ", 1)[-1]] for a in data["alerts"]]))
    else:
        parts.append(_empty("No alert fired or resolved in this period."))
    if data.get("comparisons"):  # `velvet compare` runs of the period (velvet replay's experiments)
        parts.append("<h2 id=comparisons>Comparisons</h2>")
        for c in data["comparisons"]:
            parts.append(f"<p class=sub>{escape(c['a'])} → {escape(c['b'])}: {c['pairs']:,} pairs, "
                         f"{c['unpaired']:,} unpaired · {escape((c['created_at'] or '').replace('T', ' ')[:16])}"
                         "</p>")
            parts.append(_table(["metric", "a", "b", "delta"],
                                [[name, _metric(m.get("a")), _metric(m.get("b")), _metric(m.get("delta"))]
                                 for name, m in sorted((c["metrics"] or {}).items())], numeric=(1, 2, 3)))
    parts.append(f"<p class=sub>velvet {escape(__version__)} · generated {escape(until)} UTC</p>")
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            "content='width=device-width,initial-scale=1'><title>velvet report " + escape(since[:10]) + " to "
            + escape(until[:10]) + f"</title><style>{CSS}</style></head><body><main>" + "\n".join(parts)
            + f"</main><div id=tip></div><script>{SCRIPT}</script></body></html>\n")
