"""The README's scaling table is rendered from ``benchmarks/results/scale.json``."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.bench_scale import _write, readme_table

ROOT = Path(__file__).resolve().parents[2]


def test_readme_scaling_table_equals_the_one_rendered_from_scale_json():
    """Every line of the table and the fitted-line sentence, as ``readme_table`` renders
    them (regenerate: ``python -c "from benchmarks.bench_scale import readme_table; ..."``)."""
    summary = json.loads((ROOT / "benchmarks/results/scale.json").read_text())
    want = readme_table(summary)
    readme = (ROOT / "README.md").read_text().splitlines()
    assert want[0] in readme, "README.md: the scaling table's header is missing"
    i = readme.index(want[0])
    assert readme[i : i + len(want)] == want


def test_a_run_replaces_its_size_and_keeps_the_others(tmp_path):
    """A 1M-only run leaves the smaller points and the file's other sections in place."""
    def rec(n_items, n_events, s):
        st = {"seconds": s, "cpu_seconds": s, "peak_rss_mib": 100.0}
        return {"n_items": n_items, "n_events": n_events, "pairs": st,
                **{k: st for k in ("retrieval", "mining", "aligner", "codes", "total")}}

    path = tmp_path / "scale.json"
    path.write_text(json.dumps({"stream": {"kept": 1}}))
    _write(path, [rec(10, 100, 1.0), rec(20, 400, 2.0)])
    _write(path, [rec(20, 400, 3.0)])
    data = json.loads(path.read_text())
    assert data["stream"] == {"kept": 1}
    assert [(r["n_events"], r["pairs"]["seconds"]) for r in data["records"]] == [(100, 1.0), (400, 3.0)]
    table = readme_table(data)
    assert table[2].startswith("| 10 | 100 | 1.0 / 100 |") and "3.0 / 100" in table[3]
    _write(path, [{**rec(20, 400, 3.0), "mining": {"seconds": 3.0, "cpu_seconds": 3.0,
                                                  "peak_rss_mib": 900.0, "peak_anon_mib": 700.0}}])
    assert "| 3.0 / 900 (700) |" in readme_table(json.loads(path.read_text()))[3]


def test_a_record_marked_not_in_fit_is_shown_with_its_reason_and_left_out_of_the_fits():
    def rec(n_items, n_events, s, **kw):
        st = {"seconds": s, "cpu_seconds": s, "peak_rss_mib": 100.0}
        return {"n_items": n_items, "n_events": n_events, "pairs": st, **kw,
                **{k: st for k in ("retrieval", "mining", "aligner", "codes", "total")}}

    from benchmarks.bench_scale import _summary

    same = [rec(10, 100, 1.0), rec(20, 200, 2.0), rec(40, 400, 4.0)]
    odd = rec(80, 800, 100.0, not_in_fit="older kernel")
    summary = _summary(same + [odd])
    assert abs(summary["fits"]["mining"]["us_per_unit"] - 1e4) < 1e-6  # 1 s per 100 events
    table = readme_table(summary)
    assert table[5].startswith("| 80* | 800 |") and "\\* 80 / 800: older kernel" in table
