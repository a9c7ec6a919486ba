"""The benchmark suite behind ``qarm bench``: run every section, write JSON and a summary.

``run_suite(out_dir, quick)`` runs the sections below, writes one JSON file per section
plus ``summary.md`` (``-quick`` suffixed in quick mode, so a CI run never overwrites the
full-mode figures) and returns the markdown summary.

====================  ===================================================================
section               what
====================  ===================================================================
``rq``                RQ encode items/s and FLOP rate vs in-run GEMM; vs numpy, torch,
                      faiss flat, semantic-id; codebook fitting time
``batch``             raw 384-d -> aligner -> RQ + VQ top-25, streamed from parquet:
                      items/s, per-stage split, peak RSS at two chunk sizes and two n
``feast``             in-process online reads, ``qarm_cold``, HTTP under bounded load,
                      materialization rows/s (SQLite, Redis when present)
``training``          ``get_historical_features(qarm_ranker)`` rows/s and rows returned /
                      asked: the DuckDB offline store up to 1M entity rows, the file store
                      at 20k, in one run
``align``             aligner training pairs/s
``scale``             every offline stage from 10k items / 100k events up: seconds, CPU
                      seconds and peak RSS per stage, per-event / per-item cost fits
                      (``QARM_SCALE_RUNS="items:events,..."`` picks the sizes)
====================  ===================================================================

Environment knobs for runs by hand: ``QARM_BENCH_SECTIONS=rq,batch`` (a subset),
``QARM_BENCH_LARGE_N`` (the large streamed catalog of the full mode, default 10M),
``QARM_BENCH_WORK`` (keep generated catalogs there and reuse them; default a temp dir).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from benchmarks.timing import fmt, machine, merge_results

log = logging.getLogger(__name__)

SECTIONS = ("rq", "batch", "feast", "training", "align", "scale")
N_THREADS = 2  # the machine's cores, for batch work (serving paths pin 1)


def run_suite(out_dir: str | os.PathLike = "benchmarks/results", quick: bool = False) -> str:
    """Run the suite, write ``<out_dir>/*.json`` and ``summary.md``; return the markdown.

    Raises:
        RuntimeError: a section failed (the others still ran and were written; the
            summary names the failure).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if quick else ""
    wanted = [s.strip() for s in os.environ.get("QARM_BENCH_SECTIONS", ",".join(SECTIONS)).split(",")]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        raise ValueError(f"QARM_BENCH_SECTIONS: unknown section(s) {unknown}; pick from {SECTIONS}")
    keep = os.environ.get("QARM_BENCH_WORK")
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="qarm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    large_n = int(os.environ["QARM_BENCH_LARGE_N"]) if os.environ.get("QARM_BENCH_LARGE_N") else None

    info = machine()
    info["mode"] = "quick" if quick else "full"
    info["sections"] = [s for s in SECTIONS if s in wanted]
    info["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    t_suite = time.perf_counter()
    try:
        for name in SECTIONS:
            if name not in wanted:
                continue
            t0 = time.perf_counter()
            log.info("bench section %s", name)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    results[name] = _run_section(name, quick, work, large_n)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                results[name] = {"error": errors[name], "traceback": traceback.format_exc()}
            results[name]["section_seconds"] = time.perf_counter() - t0
            results[name]["mode"] = info["mode"]
            # merged: keys a section's own command wrote there (rq.json's sample_vs_full,
            # scale.json's stream) survive a suite run
            merge_results(out / f"{name}{suffix}.json", results[name], indent=2, default=_json)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    info["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    info["suite_seconds"] = round(time.perf_counter() - t_suite, 1)
    (out / f"machine{suffix}.json").write_text(json.dumps(info, indent=2))
    md = summarize(results, info)
    (out / f"summary{suffix}.md").write_text(md)
    if errors:
        raise RuntimeError(
            f"benchmark section(s) failed: {errors}; the others were written to {out}"
        )
    return md


def summarize_dir(out_dir: str | os.PathLike = "benchmarks/results", quick: bool = False) -> str:
    """Rebuild ``summary.md`` from the JSON files already in ``out_dir`` (sections run apart)."""
    out = Path(out_dir)
    suffix = "-quick" if quick else ""
    results = {}
    for name in SECTIONS:
        p = out / f"{name}{suffix}.json"
        if p.is_file():
            results[name] = json.loads(p.read_text())
    mp = out / f"machine{suffix}.json"
    info = json.loads(mp.read_text()) if mp.is_file() else {"mode": "quick" if quick else "full"}
    md = summarize(results, info)
    (out / f"summary{suffix}.md").write_text(md)
    return md


def _run_section(name: str, quick: bool, work: Path, large_n: int | None) -> dict:
    if name == "rq":
        from benchmarks import bench_rq

        return bench_rq.run(quick, n_threads=N_THREADS)
    if name == "batch":
        from benchmarks import bench_batch

        return bench_batch.run(quick, work / "batch", n_threads=N_THREADS, large_n=large_n)
    if name == "feast":
        from benchmarks import bench_feast

        return bench_feast.run(quick, work / "feast")
    if name == "training":
        from benchmarks import bench_training

        return bench_training.run(quick, work / "training")
    if name == "align":
        from benchmarks import bench_align

        return bench_align.run(quick, n_threads=N_THREADS)
    if name == "scale":
        from benchmarks import bench_scale

        return bench_scale.run(quick)
    raise ValueError(name)  # pragma: no cover


def _json(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


# ----------------------------------------------------------------------------- summary


def _met(ok) -> str:
    if ok is None:
        return "–"
    return "yes" if ok else "**no**"


def closing_rows(results: dict) -> list[tuple]:
    """(figure, ours, baseline, ratio, target, met) rows of the closing table."""
    rows: list[tuple] = []
    rq = results.get("rq", {})
    enc = rq.get("encode")
    if enc:
        c = enc["contenders"]
        ours = c[enc["qarm_best"]]
        rows.append((
            f"RQ encode, items/s ({enc['n']:,} x {enc['dim']}, L={enc['levels']}, K={enc['codes']}; "
            f"best config {ours['config']})",
            fmt(ours["items_per_s"]), f"faiss flat {fmt(c['faiss_flat']['items_per_s'])}",
            f"{fmt(c['faiss_flat']['qarm_speedup'])}x", ">= 1.5x",
            _met(c["faiss_flat"]["qarm_speedup"] >= 1.5),
        ))  # fmt: skip
        if "semantic_id" in c:
            rows.append(("RQ encode vs semantic-id RQKMeans.encode", fmt(ours["items_per_s"]),
                         f"semantic-id {fmt(c['semantic_id']['items_per_s'])}",
                         f"{fmt(c['semantic_id']['qarm_speedup'])}x", ">= 5x",
                         _met(c["semantic_id"]["qarm_speedup"] >= 5)))  # fmt: skip
        else:
            rows.append(("RQ encode vs semantic-id", "–", "not installed (skipped)", "–", ">= 5x", "–"))
        rows.append(("RQ encode vs numpy GEMM+argmin / torch cdist", fmt(ours["items_per_s"]),
                     f"{fmt(c['numpy_gemm_argmin']['items_per_s'])} / "
                     f"{fmt(c['torch_cdist_argmin']['items_per_s'])}",
                     f"{fmt(c['numpy_gemm_argmin']['qarm_speedup'])}x / "
                     f"{fmt(c['torch_cdist_argmin']['qarm_speedup'])}x", "–", "–"))  # fmt: skip
        rows.append(("RQ encode FLOP rate (distance GEMM), GFLOP/s", fmt(ours["gflops"], 1),
                     f"square GEMM {fmt(enc['gemm_peak']['gflops'], 1)} ({enc['gemm_peak']['config']})",
                     f"{fmt(enc['qarm_fraction_of_gemm_peak'] * 100, 0)}%", ">= 70%",
                     _met(enc["qarm_fraction_of_gemm_peak"] >= 0.7)))  # fmt: skip
        rows.append(("RQ encode as shipped, BLAS at 2 threads (qarm@2t)",
                     fmt(enc["configs"].get("qarm@2t", {}).get("items_per_s")),
                     f"qarm@1t {fmt(enc['configs'].get('qarm@1t', {}).get('items_per_s'))}",
                     f"{fmt(ratio_or_none(enc['configs'].get('qarm@2t', {}).get('items_per_s'), enc['configs'].get('qarm@1t', {}).get('items_per_s')))}x",
                     "–", "–"))  # fmt: skip
    fit = rq.get("fit")
    if fit:
        c = fit["contenders"]
        rows.append((f"Codebook fit, s (n={fit['n']:,}, L={fit['levels']}, K={fit['codes']}, "
                     f"{fit['n_iter']} iter)", fmt(c["qarm"]["seconds"]),
                     f"faiss k-means loop {fmt(c['faiss_kmeans_loop']['seconds'])}",
                     f"{fmt(c['faiss_kmeans_loop']['qarm_speedup'])}x", "–", "–"))  # fmt: skip
        if "semantic_id" in c:
            rows.append(("Codebook fit vs semantic-id (sklearn, scaled to n)", fmt(c["qarm"]["seconds"]),
                         f"{fmt(c['semantic_id']['seconds'])} s", f"{fmt(c['semantic_id']['qarm_speedup'])}x",
                         "–", "–"))  # fmt: skip
    batch = results.get("batch", {})
    runs = batch.get("runs") or {}
    if runs:
        n_small = runs["head_1t"]["n"]
        best = max((r for r in runs.values() if r and r["mode"] == "arrays" and r["n"] == n_small),
                   key=lambda r: r["items_per_s"])  # fmt: skip
        quick = best["n"] < 1_000_000
        n_1m = 1_000_000 / best["items_per_s"]
        stages = batch.get("stages", {}).get("stages", {})
        naive = sum(stages[k]["median_s"] for k in ("align: naive float32", "rq: numpy GEMM+argmin",
                                                      "vq: raw faiss search") if k in stages)  # fmt: skip
        ours_chunk = stages.get("all: encode_items", {}).get("median_s")
        rows.append((
            f"Batch transformation streamed from parquet, items/s (best run: n={best['n']:,}, "
            f"pool {batch['pool']:,} {best['vq_mode']}, chunk {best['chunk']:,}, "
            f"{best['threads']} thr; VQ {fmt(best['vq_s'] / best['total_s'] * 100, 0)}% of the time)",
            fmt(best["items_per_s"]), "–", "–", "–", "–",
        ))  # fmt: skip
        rows.append((
            f"Row-independence guards' cost: encode_items on one chunk of "
            f"{batch['stages']['rows']:,} rows, items/s, vs the same stages without guards "
            "(float32 aligner, numpy RQ, raw faiss search)",
            fmt(ratio_or_none(batch["stages"]["rows"], ours_chunk)),
            f"naive stages {fmt(ratio_or_none(batch['stages']['rows'], naive))}",
            f"{fmt(ratio_or_none(naive, ours_chunk))}x", "–", "–",
        ))  # fmt: skip
        rows.append(("Batch transformation, 1M items, s" + (" (quick: extrapolated, 20k exact "
                     "pool, not the target setting)" if quick else ""), fmt(n_1m, 0), "–", "–",
                     "< 60 s", "–" if quick else _met(n_1m < 60)))  # fmt: skip
        frame, head = runs["frame"], runs["head_1t"]
        rows.append(("Batch via encode_catalog (pandas, what materialize runs), items/s",
                     fmt(frame["items_per_s"]), f"arrays driver {fmt(head['items_per_s'])}",
                     f"{fmt(ratio_or_none(frame['items_per_s'], head['items_per_s']))}x",
                     "–", "–"))  # fmt: skip
        r_small, r_big = runs["chunk_small"], runs["n_big"]
        bounded = r_big["rss_over_floor_mib"] <= 1.15 * r_small["rss_over_floor_mib"] + 16
        rows.append((
            f"Peak RSS over floor, MiB: chunk {r_small['chunk']:,}, n={r_small['n']:,} -> "
            f"n={r_big['n']:,} (chunk {head['chunk']:,}: {fmt(head['rss_over_floor_mib'], 0)})",
            f"{fmt(r_small['rss_over_floor_mib'], 0)} -> {fmt(r_big['rss_over_floor_mib'], 0)}",
            f"floor {fmt(batch['floor']['peak_rss_mib'], 0)} MiB",
            f"{fmt(ratio_or_none(r_big['rss_over_floor_mib'], r_small['rss_over_floor_mib']))}x",
            "bounded by chunk, not n", _met(bounded),
        ))  # fmt: skip
    feast = results.get("feast", {})
    online = feast.get("online", {}).get("cases", {})
    if online:
        for n in (1, 32):
            q = online[f"qarm/{n}"]
            rows.append((f"Online read, all {feast['n_features']} qarm features, {n} item(s), p50 ms "
                         f"(p99)", f"{fmt(q['p50_ms'], 3)} ({fmt(q['p99_ms'], 2)})",
                         f"{feast['n_features']} Int64 {fmt(online[f'plain/{n}']['p50_ms'], 3)}",
                         f"{fmt(q['p50_ratio_to_plain'])}x", "<= 1.1x",
                         _met(q["p50_ratio_to_plain"] <= 1.1)))  # fmt: skip
        c1 = online["cold/1"]
        e1 = online["cold_encode_only/1"]
        labels = {"cold": "qarm_cold, raw_emb as a list", "cold_array": "qarm_cold, raw_emb "
                  "as a float32 array", "cold_b64": "qarm_cold_b64, base64 float32 bytes",
                  "cold_text": "qarm_cold_text, the text (MiniLM at request time)",
                  "cold_direct": "qarm_cold's UDF without Feast's typing (FastReader.cold_columns), "
                  "float32 array"}
        for kind, label in labels.items():
            c = online.get(f"{kind}/1")
            if c is None:
                continue
            rows.append((f"Cold ODFV {label}, 1 item, p50 ms", fmt(c["p50_ms"], 3),
                         f"plain read {fmt(online['plain/1']['p50_ms'], 3)}",
                         f"+{fmt(c['p50_delta_ms_vs_plain'], 2)} ms",
                         "<= +0.3 ms" if kind in ("cold_array", "cold_direct") else "–",
                         _met(c["p50_delta_ms_vs_plain"] <= 0.3)
                         if kind in ("cold_array", "cold_direct") else "–"))  # fmt: skip
        rows.append(("  of which our encode (encode_request, 1 row), p50 ms", fmt(e1["p50_ms"], 3),
                     "–", f"{fmt(ratio_or_none(e1['p50_ms'], c1['p50_ms']) * 100 if c1['p50_ms'] else None, 0)}% of cold",
                     "–", "–"))  # fmt: skip
    http = feast.get("http", {}).get("cases", {})
    if http:
        for case in ("qarm/1", "cold/1", "cold_b64/1", "qarm/32"):
            if case not in http:
                continue
            n = case.split("/")[1]
            base = http[f"plain/{n}"]
            h = http[case]
            best_c = max(h["levels"], key=lambda c: h["levels"][c]["rps"])
            lv = h["levels"][best_c]
            label = {"qarm": "warm (qarm)", "cold": "cold (qarm_cold, JSON list)",
                     "cold_b64": "cold (qarm_cold_b64, base64)"}[case.split("/")[0]]
            target, met = "–", "–"
            if case == "qarm/1":
                target, met = ">= 1000 req/s at p99 < 5 ms", _met(h["rps_at_p99_slo"] >= 1000)
            if case == "cold_b64/1":
                warm = http["qarm/1"]
                base = warm
                target = ">= 0.7x warm, max req/s"
                met = _met(ratio_or_none(h["max_rps"], warm["max_rps"]) >= 0.7)
            rows.append((f"HTTP feast serve, {label}, {n} item(s): max req/s (p99 ms at it); "
                         f"req/s within p99 < 5 ms", f"{fmt(lv['rps'])} ({fmt(lv['p99_ms'], 1)}); "
                         f"{fmt(h['rps_at_p99_slo'])}",
                         f"{'warm' if case == 'cold_b64/1' else 'plain'} {fmt(base['max_rps'])}; "
                         f"{fmt(base['rps_at_p99_slo'])}",
                         f"{fmt(ratio_or_none(h['max_rps'], base['max_rps']))}x",
                         target, met))  # fmt: skip
    if any(k.startswith("serve:") for k in http):
        from benchmarks.bench_feast import serve_rows

        rows += serve_rows(http, fmt, _met)
    omp1 = feast.get("http_omp1", {}).get("cases", {})
    if omp1.get("cold/1") and http.get("cold/1"):
        h = omp1["cold/1"]["levels"].get("1") or omp1["cold/1"]["levels"].get(1)
        ship = http["cold/1"]["levels"].get("1") or http["cold/1"]["levels"].get(1)
        rows.append(("HTTP cold (qarm_cold), 1 item, c=1, server started with OMP_NUM_THREADS=1: "
                     "req/s (p99 ms)", f"{fmt(h['rps'])} ({fmt(h['p99_ms'], 1)})",
                     f"as shipped {fmt(ship['rps'])} ({fmt(ship['p99_ms'], 1)})",
                     f"{fmt(ratio_or_none(h['rps'], ship['rps']))}x", "–", "–"))  # fmt: skip
    mat = feast.get("materialize", {})
    for backend in ("sqlite", "redis"):
        m = mat.get(backend)
        if not m:
            continue
        if "skipped" in m:
            rows.append((f"Materialization into {backend}", "–", m["skipped"], "–", ">= 0.9x", "–"))
            continue
        for view in ("qarm", "qarm_batch"):
            rows.append((f"Materialization into {backend}, `{view}`, rows/s (n={mat['rows']:,})",
                         fmt(m[view]["rows_per_s"]),
                         f"plain Int64 {fmt(m['item_plain_int']['rows_per_s'])}; same payload "
                         f"{fmt(m['item_plain_arrays']['rows_per_s'])}",
                         f"{fmt(m[view]['ratio_to_plain'])}x; {fmt(m[view]['ratio_to_plain_arrays'])}x",
                         ">= 0.9x" if view == "qarm" else "–",
                         _met(m[view]["ratio_to_plain"] >= 0.9) if view == "qarm" else "–"))  # fmt: skip
    tr = results.get("training", {}).get("cases")
    if tr:
        duck = {int(k.split("/")[1]): v for k, v in tr.items() if k.startswith("duckdb/")}
        files = {int(k.split("/")[1]): v for k, v in tr.items() if k.startswith("file/")}
        n, big = max(duck), duck[max(duck)]
        nf = max(files) if files else None
        base = "–"
        if nf and files[nf].get("timed_out_s"):
            base = (f"file store at n={nf:,}: no answer in {files[nf]['timed_out_s']} s "
                    f"(< {fmt(files[nf]['arrow_rows_per_s_below'])} rows/s)")
        elif nf:
            base = (f"file store at n={nf:,}: {fmt(files[nf]['arrow_rows_per_s'])} rows/s, "
                    f"{files[nf]['rows_returned']:,} of {nf:,} rows")
        same = duck.get(nf) if nf and "arrow_rows_per_s" in files[nf] else None
        rows.append((f"Training rows, `get_historical_features(qarm_ranker)`, DuckDB, n={n:,}: "
                     "rows/s (rows returned / asked)",
                     f"{fmt(big['arrow_rows_per_s'])} ({big['rows_returned']:,} / {n:,})", base,
                     f"{fmt(ratio_or_none(same['arrow_rows_per_s'], files[nf]['arrow_rows_per_s']))}x "
                     f"at n={nf:,}" if same else "–",
                     ">= 50k rows/s at 1M, every row",
                     _met(results["training"].get("target_met"))))  # fmt: skip
    al = results.get("align", {})
    if al.get("contenders"):
        c = al["contenders"]
        rows.append((f"Aligner training, pairs/s ({al['n_pairs']:,} pairs, {al['epochs']} epoch(s), "
                     f"batch {al['batch_size']})", fmt(c["train_aligner"]["pairs_per_s"]),
                     f"bare torch loop {fmt(c['bare torch loop']['pairs_per_s'])}",
                     f"{fmt(c['train_aligner']['ratio_to_bare_loop'])}x", "–", "–"))  # fmt: skip
    return rows


def ratio_or_none(a, b):
    try:
        return float(a) / float(b) if b else None
    except (TypeError, ValueError):
        return None


def summarize(results: dict, info: dict) -> str:
    """The markdown summary: machine, the closing table, then per-section notes."""
    lines = [f"## Benchmarks ({info['mode']} mode)", ""]
    lines.append(
        f"Machine: {info.get('cpu')}, {info.get('affinity_cpus') or info.get('logical_cpus')} cores, "
        f"{info.get('memory_gib')} GiB; {info.get('platform')}; Python {info.get('python')}; "
        + ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items() if v)
        + f"; BLAS {', '.join(info.get('blas', [])) or 'unknown'}. Load average "
        f"{info.get('load_avg_at_start')} at start, {info.get('load_avg_at_end')} at end "
        f"(shared machine); suite {info.get('suite_seconds')} s, started {info.get('started')}."
    )
    lines.append("")
    lines.append(
        "Every figure is paired with a baseline measured in the same run, interleaved "
        "(A B B A ..., medians). Batch work uses the 2 cores; serving paths are pinned to 1 "
        "thread. `@Nt`: BLAS/OpenMP at N threads; `@Nw`: N worker threads over row blocks with "
        "BLAS at 1 thread; each contender is shown at its best configuration."
    )
    lines.append("")
    lines.append("| figure | ours | baseline | ratio | target | met? |")
    lines.append("|---|---|---|---|---|---|")
    for row in closing_rows(results):
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    lines.append("")
    for name, res in results.items():
        if "error" in res:
            lines.append(f"**Section `{name}` failed**: `{res['error']}`")
            lines.append("")
    rq = results.get("rq", {}).get("encode")
    if rq:
        lines.append("RQ encode, every configuration (items/s, GFLOP/s):")
        lines.append("")
        lines.append("| config | items/s | GFLOP/s | codes equal to qarm@1t |")
        lines.append("|---|---|---|---|")
        for name, row in rq["configs"].items():
            lines.append(f"| {name} | {fmt(row.get('items_per_s'))} | {fmt(row.get('gflops'), 1)} | "
                         f"{fmt(row.get('code_agreement'), 4) if 'code_agreement' in row else '–'} |")  # fmt: skip
        lines.append("")
    batch = results.get("batch", {})
    if batch.get("runs"):
        lines.append("Batch transformation runs (child processes; seconds per stage):")
        lines.append("")
        lines.append("| run | driver | n | chunk | thr | items/s | load | read | align | RQ | VQ | write | "
                     "peak RSS MiB (over floor) |")  # fmt: skip
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for key, r in batch["runs"].items():
            if r is None:
                continue
            lines.append(
                f"| {key} | {r['mode']} | {r['n']:,} | {r['chunk']:,} | {r['threads']} | {fmt(r['items_per_s'])} | "
                f"{fmt(r['load_s'])} | {fmt(r['read_s'])} | {fmt(r['align_s'])} | {fmt(r['rq_s'])} | "
                f"{fmt(r['vq_s'])} | {fmt(r['write_s'])} | {fmt(r['peak_rss_mib'], 0)} "
                f"({fmt(r['rss_over_floor_mib'], 0)}) |"
            )
        lines.append("")
        st = batch.get("stages", {}).get("stages")
        if st:
            lines.append(f"Stages on one chunk of {batch['stages']['rows']:,} rows "
                         f"({batch['stages']['threads']} thread, VQ {batch['stages']['vq_mode']}):")  # fmt: skip
            lines.append("")
            lines.append("| stage | items/s |")
            lines.append("|---|---|")
            for name, row in st.items():
                lines.append(f"| {name} | {fmt(row['items_per_s'])} |")
            lines.append("")
        vq = batch.get("vq_index_options")
        if vq:
            lines.append(f"VQ candidate search options, pool {vq['pool']:,}, {vq['queries']:,} queries, "
                         f"{vq['threads']} thread:")  # fmt: skip
            lines.append("")
            lines.append("| index | queries/s | recall@k vs exact | build s |")
            lines.append("|---|---|---|---|")
            for name, row in vq["options"].items():
                lines.append(f"| {name} | {fmt(row['qps'])} | {fmt(row['recall_at_k'], 4)} | "
                             f"{fmt(row['build_s'])} |")  # fmt: skip
            lines.append("")
    online = results.get("feast", {}).get("online", {}).get("cases")
    if online:
        lines.append("Online reads in process (ms):")
        lines.append("")
        lines.append("| case | p50 | p99 | p50 / plain Int64 | p50 / same-payload plain |")
        lines.append("|---|---|---|---|---|")
        for name, row in online.items():
            lines.append(f"| {name} | {fmt(row['p50_ms'], 3)} | {fmt(row['p99_ms'], 3)} | "
                         f"{fmt(row['p50_ratio_to_plain'])} | {fmt(row['p50_ratio_to_plain_arrays'])} |")  # fmt: skip
        lines.append("")
    for key, title in (("http", "HTTP `feast serve` and `qarm serve` (`serve:*`, same run, interleaved), "
                                 "closed-loop load (req/s, p99 ms) per "
                                 "concurrency c:"),
                       ("http_omp1", "HTTP, the same server started with OMP_NUM_THREADS=1:")):
        http = results.get("feast", {}).get(key, {}).get("cases")
        if not http:
            continue
        lines.append(title)
        lines.append("")
        concs = sorted({int(c) for row in http.values() for c in row["levels"]})
        lines.append("| case | " + " | ".join(f"c={c}" for c in concs) + " |")
        lines.append("|---|" + "---|" * len(concs))
        for name, row in http.items():
            cells = []
            for c in concs:
                lv = row["levels"].get(c) or row["levels"].get(str(c))
                cells.append(f"{fmt(lv['rps'])} ({fmt(lv['p99_ms'], 1)})" if lv else "–")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    from benchmarks import bench_scale, bench_training

    if results.get("training", {}).get("cases"):
        lines += bench_training.markdown(results["training"])
    if results.get("scale", {}).get("records"):
        lines += bench_scale.markdown(results["scale"])
    return "\n".join(lines)
