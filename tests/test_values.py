"""storage/values.py: what a client or the API sent is made storable, never stops a write."""

from __future__ import annotations

import json

from support.helpers import calls, chat, headers_with
from support.helpers import start_writer as run
from velvet_core.storage.values import clean_rows


def test_poison_values_are_made_storable(db_url, tmp_path):
    """NUL characters, lone surrogates, 300-character models and out-of-range integers: every row lands."""
    poison = [
        chat(0, model="m" * 300),
        chat(1, model="gpt\\u0000x"),  # a JSON escape: the string holds a NUL character
        headers_with(chat(2), {"x-raw": "caf\udce9"}),  # a header byte that was not UTF-8 (surrogateescape)
        chat(3, extra=b',"max_tokens":100000000000000000000000000000'),
        chat(4, extra=b',"metadata":{"k":"v\\u0000"}'),
    ]
    ok = [chat(i) for i in range(10, 15)]
    w = run(db_url, tmp_path / "spool", [*poison, *ok])
    rows = calls(db_url)
    assert set(rows) == {s.flow_id for s in poison + ok}
    assert rows["flow-0"].model_requested == "m" * 300
    assert rows["flow-1"].model_requested == "gpt\ufffdx" and "NUL" in rows["flow-1"].problem
    assert json.loads(rows["flow-2"].request_headers)["x-raw"] == "caf\\udce9" and rows["flow-2"].problem is None
    assert all(rows[s.flow_id].problem is None for s in ok)
    assert w.health.dead_lettered == 0


def test_clean_rows_in_place():
    rows = [{"a": "ok", "b": "x\x00y", "n": 1 << 70, "m": -5, "problem": "earlier"}, {"c": "\udcff"}]
    clean_rows(rows)
    assert rows[0]["b"] == "x\ufffdy" and rows[0]["n"] is None and rows[0]["m"] == -5
    assert rows[0]["problem"].startswith("earlier; velvet made values storable: b: NUL")
    assert rows[1]["c"] == "\\udcff" and "surrogates" in rows[1]["problem"]
