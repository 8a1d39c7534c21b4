"""``scripts/bench --quick --json`` and ``scripts/bench --scale --quick --json`` run and print every key
(figures are not asserted: no timings in tests)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from support.pg import pg_base_url
from support.rig import ROOT

KEYS = {"live_rps_plain", "live_rps_velvet", "live_rps_ratio", "live_p50_ms_ratio", "live_p95_ms_ratio",
        "live_rps_ratio_no_journal", "live_rps_ratio_thread",
        "stream_ttft_ms_plain", "stream_ttft_ms_velvet", "upload_mb", "upload_lines", "upload_s_plain",
        "upload_s_velvet", "upload_rss_mb_plain", "upload_rss_mb_velvet", "ingest_s", "ingest_lines_per_s_ratio",
        "download_s_plain", "download_s_velvet", "download_rss_mb_velvet", "rows_lost", "ingest_s_pg",
        "pg_calls_per_s", "live_cpu_us_plain", "live_cpu_us_velvet", "live_cpu_ratio", "live_cpu_us_thread",
        "cli_ms_bare_python", "cli_ms_version", "cli_ms_batches_sqlite", "cli_ms_stats_sqlite",
        "cli_ms_batches_pg", "cli_ms_stats_pg", "cli_ms_version_over_bare", "cli_ms_batches_sqlite_over_bare",
        "evals_live_rps_ratio", "evals_backfill_per_s", "pg_calls_per_s_partitioned"}
CI_KEYS = ("live_rps_ratio", "cache_off_rps_ratio", "cache_on_miss_rps_ratio", "cache_miss_over_off_rps_ratio",
           "evals_live_rps_ratio", "cache_off_rps_ratio_keepalive", "cache_on_miss_rps_ratio_keepalive",
           "cache_miss_over_off_rps_ratio_keepalive")
SCALE_KEYS = {"batches_ms", "batch_ms", "lines_failed_ms", "calls_ms", "stats_ms", "stats_day_ms",
              "export_rows_per_s", "report_s", "report_rss_mb"}


def test_bench_quick_json(tmp_path):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["TMPDIR"] = str(tmp_path)  # (where it builds its databases: nothing is left there afterwards)
    r = subprocess.run([str(ROOT / "scripts" / "bench"), "--quick", "--json", "--pg", pg_base_url()],
                       capture_output=True, text=True, env=env, timeout=420)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert set(out) >= KEYS, KEYS - set(out)
    assert out["rows_lost"] == 0 and out["upload_lines"] == 5000  # correctness, not speed
    assert all(isinstance(out[k], int | float) and out[k] > 0 for k in KEYS - {"rows_lost"})
    assert out["writer_cpu_us_per_call"] >= 0  # 0 where the writer is a thread (one core)
    idle = [f"idle_{what}_per_s_{name}" for what in ("cpu_ms", "wakeups") for name in ("plain", "velvet")]
    assert all(isinstance(out[k], float) and out[k] >= 0 for k in idle), {k: out.get(k) for k in idle}
    assert out["idle_wakeups_per_s_velvet"] > 0  # (its threads wait with timeouts: a count that reads 0 is broken)
    assert not list(tmp_path.glob("velvet-bench-*"))
    for key in CI_KEYS:  # each ratio's 95 % interval (a bootstrap of its rounds)
        lo, hi = out[f"{key}_ci95"]
        assert 0 < lo <= hi, (key, lo, hi)


def test_median_ci_brackets_the_median_and_narrows_with_rounds():
    """The interval is a seeded bootstrap: the same rounds give the same interval, it holds the median, and more
    rounds of the same spread give a narrower one."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench import median_ci, paired
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    rounds = paired([400.0] * 8, [380.0, 420.0, 360.0, 395.0, 410.0, 300.0, 390.0, 405.0])
    assert rounds[0] == 0.95
    lo, hi = median_ci(rounds)
    assert lo <= statistics.median(rounds) <= hi and lo < hi
    assert median_ci(rounds) == [lo, hi]
    lo4, hi4 = median_ci(rounds * 4)
    assert lo <= lo4 <= hi4 <= hi and hi4 - lo4 < hi - lo
    assert median_ci([0.97] * 5) == [0.97, 0.97]


def test_bench_scale_quick_json():
    """A database built through the store on both backends; each query the CLI answers, timed."""
    r = subprocess.run([str(ROOT / "scripts" / "bench"), "--scale", "--quick", "--json", "--pg", pg_base_url()],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["scale_lines"] == 60_000 and out["scale_calls"] == 25_000
    keys = SCALE_KEYS | {f"{k}_pg" for k in SCALE_KEYS}
    assert set(out) >= keys, keys - set(out)
    assert all(isinstance(out[k], int | float) and out[k] >= 0 for k in keys)
    assert out["export_rows_per_s"] > 0 and out["export_rows_per_s_pg"] > 0
    for suffix in ("", "_pg"):
        cli = out[f"velvet_cli_ms{suffix}"]
        assert set(cli) == {"batches", "batch", "lines_failed", "calls", "stats", "stats_day"}
