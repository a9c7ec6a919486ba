"""The streamed batch benchmark runs end to end at a tiny size and cleans up after itself."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_bench_stream_records_each_stage(tmp_path, monkeypatch):
    from benchmarks import bench_stream

    monkeypatch.setenv("QARM_BENCH_TMP", str(tmp_path))
    out = tmp_path / "scale.json"
    out.write_text(json.dumps({"records": []}))  # the pipeline sweep's keys are kept
    res = bench_stream.run(runs=[3000], out_path=out)
    rec = res["records"][0]
    assert "error" not in rec, rec.get("error")
    assert rec["encode"]["items_per_s"] > 0 and rec["prepare"]["peak_rss_mib"] > 0
    data = json.loads(out.read_text())
    assert data["records"] == [] and data["stream"]["records"][0]["n_items"] == 3000
    assert [p.name for p in tmp_path.iterdir()] == ["scale.json"]  # work dir removed
    assert "3,000" in "\n".join(bench_stream.markdown(res))
