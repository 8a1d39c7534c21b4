"""``scripts/bench --quick --json`` runs and prints every key (figures are not asserted: no timings in tests)."""

from __future__ import annotations

import json
import os
import subprocess

from rig import ROOT

KEYS = {"live_rps_plain", "live_rps_velvet", "live_rps_ratio", "live_p50_ms_ratio", "live_p95_ms_ratio",
        "live_rps_ratio_no_journal",
        "stream_ttft_ms_plain", "stream_ttft_ms_velvet", "upload_mb", "upload_lines", "upload_s_plain",
        "upload_s_velvet", "upload_rss_mb_plain", "upload_rss_mb_velvet", "ingest_s", "ingest_lines_per_s_ratio",
        "download_s_plain", "download_s_velvet", "download_rss_mb_velvet", "rows_lost"}


def test_bench_quick_json():
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    r = subprocess.run([str(ROOT / "scripts" / "bench"), "--quick", "--json"], capture_output=True, text=True,
                       env=env, timeout=280)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert set(out) >= KEYS, KEYS - set(out)
    assert out["rows_lost"] == 0 and out["upload_lines"] == 5000  # correctness, not speed
    assert all(isinstance(out[k], int | float) and out[k] > 0 for k in KEYS - {"rows_lost"})
