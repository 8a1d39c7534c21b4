"""The report against hostile and small inputs: fuzzed labels and numbers under a memory and time limit, and the
charts of a young database (one call, one batch, fast batches, empty) asserted on the SVG, on both backends."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.pg import fresh_pg_url
from support.reportdb import fill
from support.reportfuzz import NASTY, prepare, run_report
from velvet_core.report import charts
from velvet_core.storage.database import open_db

# text from traffic: any code point (wide, combining, right-to-left, controls, NUL) at any length up to 400
TEXT = st.one_of(st.sampled_from(NASTY), st.text(min_size=0, max_size=400),
                 st.text(st.characters(codec="utf-8"), min_size=100, max_size=400))
NUMBER = st.one_of(st.sampled_from([0.0, 8e-05, 1e-12, 1e12, 1e300]),
                   st.floats(min_value=0, max_value=1e308, allow_nan=False))


def fresh(backend: str, tmp: Path, n: list[int]) -> str:
    n[0] += 1
    return f"sqlite:///{tmp / f'f{n[0]}.db'}" if backend == "sqlite" else fresh_pg_url()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_report_survives_any_label_and_number(backend, tmp_path):
    """Was: a 150-character tag or a 200-character model hung pygal's title splitting (21 GB in 10 minutes)."""
    n = [0]

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(text=TEXT, number=NUMBER, age=st.sampled_from([0.0, 30.0]))
    def case(text: str, number: float, age: float) -> None:
        url = fresh(backend, tmp_path, n)
        prepare(url, text, number, age)
        out = tmp_path / f"r{n[0]}.html"
        assert run_report(url, out) == "ok", (text, number, age)
        html = out.read_text(encoding="utf-8")
        assert "\x00" not in html and "\x1b" not in html

    case()


@pytest.mark.parametrize("text", ["x" * 150, "m" * 200, "w " * 200])
def test_long_tag_and_model_report_in_a_child_with_limits(db_url, tmp_path, text):
    """The issue's two examples, each run once in a 1 GB / 90 s child."""
    prepare(db_url, text, 1.0)
    assert run_report(db_url, tmp_path / "r.html") == "ok"
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert text.strip()[:39] + "…" in html  # cut on the axis
    assert text.strip()[:charts.TOOLTIP_MAX - 1] in html  # in the tooltip or the table, at length


def test_label_is_the_one_gate():
    assert charts.label("a" * 500) == "a" * 39 + "…"
    assert charts.label("\x00\x1b]0;x\x07\u202eab") == "]0;x  ab"
    assert charts.label("") == charts.label(" \n ") == "(none)"
    assert charts.value(float("inf")) == charts.VALUE_MAX and charts.value(float("nan")) is None


def report_html(url: str, out: Path) -> str:
    assert run_report(url, out) == "ok"
    return out.read_text(encoding="utf-8")


def svgs(html: str) -> list[str]:
    return re.findall(r"<svg.*?</svg>", html, re.S)


def axis_labels(svg: str) -> list[str]:
    """The value axis' tick texts of one pygal chart."""
    m = re.search(r'<g class="axis y[^"]*">(.*?)</g>\s*</g>', svg, re.S) or re.search(
        r'<g class="axis y[^"]*">(.*)', svg, re.S)
    assert m
    return re.findall(r'<text[^>]*>([^<]*)</text>', m[1])


def assert_readable(html: str) -> None:
    """What every report must show: labels distinct on every axis, no scientific notation, no $0 series."""
    for svg in svgs(html):
        ticks = [t for t in axis_labels(svg) if t]
        assert len(ticks) == len(set(ticks)), ticks
        assert not any(re.search(r"\de[-+]\d", t) for t in ticks), ticks
        legends = re.findall(r'<g class="legend[^"]*">.*?<text[^>]*>([^<]*)</text>', svg, re.S)
        for name in legends:
            assert name.strip(), "an empty series in a legend"
    assert not re.search(r"\$\d+(\.\d+)?e-\d", html)


def test_young_database_one_call(db_url, tmp_path):
    fill(db_url, batches=0, calls=1)
    html = report_html(db_url, tmp_path / "r.html")
    assert_readable(html)
    traffic = html[html.index("id=traffic"):html.index("id=top")]
    charts_ = svgs(traffic)
    assert len(charts_) >= 3  # calls, error rate, latency (and TTFT when the call streamed)
    for svg in charts_[1:]:  # a single point of a line is drawn as a dot
        assert 'class="dot' in svg, "single point drawn without a marker"
    assert "no data" not in html


def test_young_database_fast_batches(db_url, tmp_path):
    fill(db_url, batches=2, calls=0, seed=11)
    db = open_db(db_url)
    # two batches done within a second of their creation
    db.execute_sql("UPDATE batches SET status = 'completed', in_progress_at = created_at, "
                   "finalizing_at = created_at, completed_at = created_at, failed_at = NULL, expired_at = NULL, "
                   "cancelled_at = NULL, turnaround_s = 0.4")
    db.close()
    html = report_html(db_url, tmp_path / "r.html")
    assert_readable(html)
    assert "no data" not in html
    # no number in scientific notation (a chart's random id such as "26cecd5e-0665" is not one)
    assert not re.search(r"(?<![\w.-])\d+(\.\d+)?e-\d", html)
    timeline = html[html.index("id=timeline"):html.index("id=turnaround")]
    bars = re.findall(r'<rect x="[\d.]+" y="[\d.]+" rx="0" ry="0" width="([\d.]+)" height="([\d.]+)"[^>]*'
                      r'class="rect reactive tooltip-trigger"', timeline)
    assert bars and all(float(w) >= 1 and float(h) >= 1 for w, h in bars)  # drawn wide enough to see
    assert "0.00 h" in timeline  # the tooltip says the real duration


def test_young_database_one_batch(db_url, tmp_path):
    fill(db_url, batches=1, calls=0, seed=11)
    html = report_html(db_url, tmp_path / "r.html")
    assert_readable(html)
    assert "no data" not in html


def test_axis_ticks_are_distinct_and_plain():
    for top in (8e-05, 0.0001, 0.00017, 0.3, 7, 12345.0, 1e14, 1e300, 0):
        for fmt in (charts._usd_axis, lambda v, d: f"{v * 100:.{max(0, d - 2)}f}%"):
            ticks, formatter = charts.scale(top, fmt)
            texts = [formatter(t) for t in ticks]
            assert len(set(texts)) == len(texts) and ticks[-1] >= min(top, charts.VALUE_MAX), texts
            assert not any("e" in t for t in texts), texts
    ticks, _ = charts.scale(2, lambda v, d: f"{v:.{d}f}", integer=True)
    assert ticks == [0, 1, 2]


def test_spend_legend_leaves_out_zero_series(db_url, tmp_path):
    fill(db_url, batches=0, calls=3)
    db = open_db(db_url)
    db.execute_sql("UPDATE calls SET cost_usd = 0 WHERE id = (SELECT MIN(id) FROM calls)")
    db.execute_sql("UPDATE calls SET model = 'zero-model' WHERE id = (SELECT MIN(id) FROM calls)")
    db.close()
    html = report_html(db_url, tmp_path / "r.html")
    spend = html[html.index("id=spend"):html.index("id=traffic")]
    assert "zero-model" not in spend and "saved by the batch discount" not in spend
    assert_readable(html)


def test_empty_database_report_is_plain(db_url, tmp_path):
    open_db(db_url).close()
    html = report_html(db_url, tmp_path / "r.html")
    assert not svgs(html) and "No live calls in this period." in html


def test_legends_do_not_overlap():
    """Long series names get fewer legend columns: each name ends before the next in its row begins."""
    rows = [{"day": "2026-01-01", "model": f"model-{i}-" + "x" * n, "live_usd": i + 1.0, "batch_usd": 0.0}
            for i, n in enumerate((2, 10, 25, 40, 60, 80, 100, 5))]
    svg = charts.spend_by_model(["2026-01-01"], rows)
    legend = r'class="legend[^"]*"><rect[^>]*/><text x="([\d.]+)" y="([\d.]+)">([^<]*)</text>'
    items = [(float(x), float(y), t) for x, y, t in re.findall(legend, svg)]
    assert len(items) == len(rows)
    for (x1, y1, t1), (x2, y2, _) in itertools.pairwise(items):
        if y1 == y2:
            assert x2 - x1 >= 6.5 * len(t1) + 12, (t1, x1, x2)  # 12 px font: about 6.5 px a character
