"""Smoke run of the benchmark suite's functions at minuscule sizes.

Checks that every section's code runs and returns the fields the summary reads. Nothing
here asserts a timing or a speed-up (benchmarks are never timed tests); the Feast section
is exercised by ``python -m benchmarks --quick`` in CI, as it needs a materialized repo.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def tiny_x():
    from benchmarks.bench_rq import world_vectors

    return world_vectors(1_500, dim=16)


@pytest.fixture(scope="module")
def tiny_codebooks(tiny_x):
    from qarm_features.codes.rq import ResidualQuantizer

    return ResidualQuantizer(n_levels=2, n_codes=16, n_iter=3, seed=0).fit(tiny_x).codebooks_


def test_rq_sample_vs_full_fits_every_row_once_and_reports_both():
    from benchmarks import bench_rq
    from qarm_features.config import RQConfig

    x = bench_rq.world_vectors(3_000, dim=16)  # > 256 rows per centroid at K = 8: sampled
    cfg = RQConfig(n_levels=2, n_codes=8, n_iter=3)
    res = bench_rq.sample_vs_full(x=x, rq_cfg=cfg)
    fits = res["fits"]
    assert fits["sample"]["fit_rows"] == fits["sample_next_seed"]["fit_rows"] == 256 * 8
    assert fits["full"]["fit_rows"] == len(x) == res["n_items"]
    seeds = [fits[name]["seed"] for name in ("sample", "full", "sample_next_seed")]
    assert seeds == [0, 0, 1]
    for row in fits.values():
        assert len(row["utilization"]) == len(row["entropy"]) == 2
        assert len(row["residual_energy_per_level"]) == 2
        assert 0 < row["reconstruction_error"] < 1 and 0 <= row["collision_rate"] <= 1
        assert row["fit_seconds"] > 0 and row["peak_rss_mib"] > 0
    for key in ("level1_ami", "level1_ari", "level1_ami_sample_vs_next_seed"):
        assert -1 <= res[key] <= 1, key
    assert res["level1_ami"] < 1  # different rows, different cells somewhere


def test_rq_sample_vs_full_command_merges_into_the_results_file(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "rq.json"
    out.write_text(json.dumps({"fit": {"kept": True}}))
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_rq", "--sample-vs-full", "--n-items", "2000",
         "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["fit"] == {"kept": True}
    res = data["sample_vs_full"]
    assert res["n_items"] == 2000 and res["dim"] == 64
    assert res["fits"]["full"]["fit_rows"] == 2000


def test_timing_helpers():
    from benchmarks.timing import interleave, latencies, machine, ratio, sgemm_case

    calls = []
    stats = interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                       repeats=3, warmup=1)  # fmt: skip
    assert [len(s.times) for s in stats.values()] == [3, 3]
    assert calls[2:] == ["a", "b", "b", "a", "a", "b"]  # A B, B A, A B: interleaved
    lat = latencies({"x": lambda: None, "y": lambda: None}, n_calls=20, block=5, warmup=1)
    assert len(lat["x"].times) == len(lat["y"].times) == 20
    fn, flops = sgemm_case(8, 8, 8)
    fn()
    assert flops == 2 * 8**3
    assert np.isnan(ratio(1.0, 0.0))
    info = machine()
    assert info["logical_cpus"] >= 1 and "numpy" in info["versions"]


def test_rq_encode_and_fit_sections(tiny_x, tiny_codebooks):
    from benchmarks import bench_rq
    from benchmarks.suite import closing_rows, summarize

    enc = bench_rq.bench_encode(tiny_x, tiny_codebooks, repeats=1, n_threads=2,
                                broadcast_rows=64, gemm_size=64)  # fmt: skip
    assert {"qarm", "qarm_blocks", "faiss_flat", "numpy_gemm_argmin"} <= set(enc["contenders"])
    for name, row in enc["configs"].items():
        if "code_agreement" in row:  # every contender finds the same nearest centroids
            assert row["code_agreement"] > 0.99, name
    fit = bench_rq.bench_fit(tiny_x, levels=2, k=16, n_iter=2, repeats=1, thread_counts=(1,),
                             semid_rows=500)  # fmt: skip
    assert fit["contenders"]["qarm"]["seconds"] > 0
    results = {"rq": {"encode": enc, "fit": fit}}
    md = summarize(results, {"mode": "smoke", "versions": {}, "blas": []})
    assert "| figure | ours | baseline | ratio | target | met? |" in md
    assert len(closing_rows(results)) >= 4


def test_rq_baselines_agree(tiny_x, tiny_codebooks):
    from benchmarks import bench_rq

    ref = bench_rq.encode_numpy(tiny_x, tiny_codebooks)
    assert (bench_rq.encode_torch(tiny_x, tiny_codebooks) == ref).all(axis=1).mean() > 0.99
    assert (bench_rq.FaissFlatRQ(tiny_codebooks).encode(tiny_x) == ref).all(axis=1).mean() > 0.99
    part = bench_rq.encode_numpy_broadcast(tiny_x[:100], tiny_codebooks)
    assert (part == ref[:100]).all(axis=1).mean() > 0.99


def test_batch_stream_job(tmp_path):
    import pyarrow.parquet as pq

    from benchmarks import bench_batch
    from benchmarks.timing import run_child

    bundle = bench_batch.make_world_bundle(tmp_path / "b", pool=300, raw_dim=32, out_dim=8,
                                           hidden=16, codes=16, vq_k=5)  # fmt: skip
    src = bench_batch.write_catalog(tmp_path / "cat.parquet", 700, raw_dim=32, row_group=256)
    outs = {}
    for mode in ("arrays", "frame"):
        dst = tmp_path / f"out-{mode}.parquet"
        res = bench_batch.stream_encode(str(bundle), str(src), str(dst), 200, mode, 1)
        assert res["n"] == 700
        outs[mode] = pq.read_table(dst).to_pandas().sort_values("item_id").reset_index(drop=True)
    a, f = outs["arrays"], outs["frame"]
    for col in ("rq_code_l1", "rq_code_l2", "rq_code_l3"):
        assert (a[col].to_numpy() == f[col].to_numpy()).all()  # both drivers: same codes
    assert (np.stack(a["vq_codes"]) == np.stack(f["vq_codes"])).all()
    floor = run_child("benchmarks.bench_batch:idle", {"bundle": str(bundle), "n_threads": 1})
    assert floor["peak_rss_mib"] >= floor["rss_after_import_mib"] > 0
    stages = bench_batch.stage_compare(str(bundle), rows=200, repeats=1)
    assert "all: encode_items" in stages["stages"]


def test_align_section_pieces():
    from benchmarks import bench_align
    from qarm_features.config import AlignerConfig

    raw, ids, pairs = bench_align.make_pairs(300, raw_dim=32)
    assert len(pairs) > 0 and raw.shape == (300, 32)
    bench_align.bare_loop(raw, ids, pairs, AlignerConfig(batch_size=64, hidden=16, out_dim=8), 1)


def test_loadgen_against_a_local_server():
    from benchmarks import loadgen

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"ok": True}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        res = loadgen.run(server.server_address[1], b"{}", concurrency=2, duration=0.3)
    finally:
        server.shutdown()
    assert res["requests"] > 0 and res["errors"] == 0 and res["p99_ms"] >= res["p50_ms"]


def test_scale_section_at_a_tiny_size():
    from benchmarks.bench_scale import _summary, markdown, scale_world, stages

    ids, content, log = scale_world(300, 3000, content_dim=16, seed=1)
    assert content.shape == (300, 16) and len(log) == 3000
    assert log.groupby("user_id")["timestamp"].apply(lambda t: t.is_monotonic_increasing).all()
    rec = stages(2000, 20_000, max_epochs=1, mf_epochs=2, n_threads=1)
    for stage in ("retrieval", "mining", "pairs", "aligner", "codes", "total"):
        assert rec[stage]["seconds"] > 0 and rec[stage]["peak_rss_mib"] > 0
    summary = _summary([rec, dict(rec, n_items=4000, n_events=40_000)])
    assert summary["fits"]["pairs"]["per"] == "n_events"
    assert any("2,000" in line for line in markdown(summary))


def test_mining_vs_a_git_ref_at_a_tiny_size():
    """bench_scale --mining-vs: each side's children import their own checkout (the child
    asserts it), and HEAD's miner gives this checkout's pairs and stats."""
    from benchmarks.bench_scale import mining_vs

    res = mining_vs("HEAD", runs=((2000, 20_000),), rounds=2)
    (rec,) = res["runs"]
    assert len(rec["HEAD_cpu_s"]) == len(rec["ours_cpu_s"]) == 2 and rec["ratio"] > 0
    assert rec["pairs_equal"] and rec["stats_equal"] and rec["n_pairs"] > 1000


def test_training_section_renders_a_timed_out_file_store():
    from benchmarks.suite import closing_rows, summarize

    duck = {"offline_store": "duckdb", "rows_asked": 1000, "rows_returned": 1000,
            "first_call_100_rows_s": 0.5, "arrow_s": 0.1, "arrow_rows_per_s": 10_000.0,
            "no_history_fraction": 0.12, "peak_rss_mib": 500.0}  # fmt: skip
    training = {
        "setup": {"n_items": 10, "n_users": 5, "n_history_rows": 7},
        "cases": {
            "file/1000": {
                "offline_store": "file",
                "rows_asked": 1000,
                "rows_returned": None,
                "timed_out_s": 120,
                "arrow_rows_per_s_below": 8.3,
            },
            "duckdb/1000": duck,
        },
        "target_met": None,
    }
    rows = closing_rows({"training": training})
    (row,) = [r for r in rows if r[0].startswith("Training rows")]
    assert "1,000 / 1,000" in row[1] and "no answer in 120 s" in row[2] and row[3] == "–"
    md = summarize({"training": training}, {"mode": "smoke", "versions": {}, "blas": []})
    assert "| file/1000 | no answer in 120 s |" in md and "| duckdb/1000 | 1,000 / 1,000 |" in md
    training["cases"]["file/1000"] = dict(duck, offline_store="file", rows_returned=880,
                                          arrow_rows_per_s=100.0)  # fmt: skip
    (row,) = [r for r in closing_rows({"training": training}) if r[0].startswith("Training")]
    assert "880 of 1,000 rows" in row[2] and row[3].startswith("100")


def test_a_suite_run_keeps_what_a_sections_own_command_wrote(tmp_path, monkeypatch):
    """`python -m benchmarks` merges each section into its file: `--sample-vs-full`'s key in
    rq.json survives it (a whole-file write dropped it)."""
    import json

    from benchmarks import suite

    (tmp_path / "rq.json").write_text(json.dumps({"sample_vs_full": {"ratio": 1.016}}))
    monkeypatch.setenv("QARM_BENCH_SECTIONS", "rq")
    monkeypatch.setattr(suite, "_run_section", lambda *a, **k: {"rows": [1]})
    suite.run_suite(tmp_path)
    data = json.loads((tmp_path / "rq.json").read_text())
    assert data["sample_vs_full"] == {"ratio": 1.016} and data["rows"] == [1]
