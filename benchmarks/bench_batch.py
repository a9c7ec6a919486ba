"""The full batch transformation, streamed from parquet: items/s and peak RSS.

raw 384-d content (synthetic world) -> aligner (float64 forward) -> RQ codes + VQ top-25
over the bundle's pool -> ``qarm`` rows written to parquet, chunk by chunk. Each run is a
child process (:func:`benchmarks.timing.run_child`), so its peak RSS is its own; runs at
two chunk sizes and two catalog sizes show that memory follows the chunk, not ``n``.

Two drivers over the same files:

- ``frame``: the real batch function, :func:`qarm_features.feast.sources.encode_catalog`, on a
  pandas frame per chunk (what the materialization job runs), output via pandas/arrow;
- ``arrays``: the same encode (:func:`qarm_features.bundle.encode.encode_items` stages) fed from
  arrow buffers as numpy without pandas, with a time split per stage (align / RQ / VQ /
  read / write). The gap between the two is the cost of the pandas edge.

The bundle is built here on the synthetic world (its first ``pool`` items are the VQ pool,
aligner weights random and seeded, RQ codebooks fitted), because a real aligner cannot be
trained on 100k items within a benchmark's budget; throughput does not depend on it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

RAW_DIM = 384


# ----------------------------------------------------------------------------- inputs
def make_world_bundle(
    path: str | Path,
    *,
    pool: int,
    raw_dim: int = RAW_DIM,
    out_dim: int = 64,
    hidden: int = 256,
    levels: int = 3,
    codes: int = 256,
    vq_k: int = 25,
    seed: int = 0,
) -> Path:
    """A valid bundle whose catalog (and VQ pool) is the world's first ``pool`` items."""
    from qarm_features.bundle.testing import make_random_bundle
    from qarm_features.datasets.synthetic import SyntheticWorld

    world = SyntheticWorld(n_items=pool, n_users=1, content_dim=raw_dim, seed=seed)
    raw = np.concatenate([c for _, c in world.iter_content(65_536)])
    return make_random_bundle(
        path, raw_emb=raw, out_dim=out_dim, hidden=hidden, n_levels=levels, n_codes=codes,
        vq_k=vq_k, seed=seed, dataset="synthetic-bench",
    )


def write_catalog(
    path: str | Path, n: int, *, raw_dim: int = RAW_DIM, seed: int = 0, row_group: int = 16_384
) -> Path:
    """Stream ``n`` world items to parquet: ``item_id``, ``raw_emb`` (fixed-size list), ``event_timestamp``.

    Row groups of ``row_group`` rows: a parquet reader holds at least one row group, so the
    group size, like the chunk size, bounds the job's memory.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qarm_features.datasets.synthetic import SyntheticWorld

    path = Path(path)
    world = SyntheticWorld(n_items=n, n_users=1, content_dim=raw_dim, seed=seed)
    schema = pa.schema([
        ("item_id", pa.int64()),
        ("raw_emb", pa.list_(pa.float32(), raw_dim)),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
    ])  # fmt: skip
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema, compression="none") as writer:
        for ids, content in world.iter_content(65_536):
            m = len(ids)
            emb = pa.FixedSizeListArray.from_arrays(pa.array(content.reshape(-1)), raw_dim)
            ts = pa.array(np.zeros(m, dtype="datetime64[us]"), pa.timestamp("us", tz="UTC"))
            writer.write_table(
                pa.table([pa.array(ids.astype(np.int64)), emb, ts], schema=schema),
                row_group_size=row_group,
            )
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- the job
def stream_encode(
    bundle: str, src: str, dst: str, chunk: int, mode: str = "arrays", n_threads: int = 2
) -> dict:
    """Encode the catalog at ``src`` into ``qarm`` rows at ``dst``, ``chunk`` rows at a time.

    Runs in a child process (peak RSS is measured around it). Returns timings.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.timing import threads

    timings = {"load_s": 0.0, "read_s": 0.0, "align_s": 0.0, "rq_s": 0.0, "vq_s": 0.0,
               "encode_s": 0.0, "write_s": 0.0}  # fmt: skip
    t_all = time.perf_counter()
    with threads(n_threads):
        from qarm_features.bundle.artifact import load_bundle

        # encode_items' own stages (the bundle's cached coders)
        from qarm_features.bundle.encode import align

        t0 = time.perf_counter()
        b = load_bundle(bundle)
        rq, vq = b.rq, b.vq  # builds the VQ index (ANN for a large pool): once per process
        timings["load_s"] = time.perf_counter() - t0
        vq_mode = getattr(vq, "mode_", None)
        # pre_buffer=False: with the default (True) pyarrow 26 keeps every pre-buffered
        # row group of the file alive until the iterator ends, so memory grows with n
        # (measured: 318 MB of arrow pool for 200k x 384 floats; 40 MB without).
        pf = pq.ParquetFile(src, pre_buffer=False)
        writer = None
        n = 0
        try:
            batches = pf.iter_batches(batch_size=chunk, columns=["item_id", "raw_emb", "event_timestamp"])
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                if mode == "frame":
                    df = batch.to_pandas()
                timings["read_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                if mode == "frame":
                    from qarm_features.feast.sources import encode_catalog

                    out = encode_catalog(b, df)
                    timings["encode_s"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    table = pa.Table.from_pandas(out, preserve_index=False)
                else:
                    ids = batch.column(0).to_numpy()
                    raw = batch.column(1).values.to_numpy().reshape(len(ids), -1)
                    table = _encode_arrays(b, rq, vq, align, ids, raw, batch.column(2), timings)
                    timings["encode_s"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                if writer is None:
                    writer = pq.ParquetWriter(dst, table.schema, compression="none")
                writer.write_table(table)
                timings["write_s"] += time.perf_counter() - t0
                n += batch.num_rows
        finally:
            if writer is not None:
                writer.close()
    total = time.perf_counter() - t_all
    return {
        "mode": mode, "chunk": chunk, "n": n, "threads": n_threads, "vq_mode": vq_mode,
        "vq_ann_recall": getattr(vq, "ann_recall_", None),
        "total_s": total, "items_per_s": n / total if total > 0 else None,
        "items_per_s_excl_load": n / max(total - timings["load_s"], 1e-9), **timings,
    }  # fmt: skip


def _encode_arrays(b, rq, vq, align, ids, raw, ts, timings):
    """encode_items' stages on one chunk, timed, into an arrow table (no pandas)."""
    import pyarrow as pa

    from qarm_features._validate import check_embeddings

    raw = check_embeddings(raw, name="raw_emb", dim=b.raw_dim)
    t0 = time.perf_counter()
    a = align(b, raw)
    t1 = time.perf_counter()
    codes = rq.encode(a)
    t2 = time.perf_counter()
    vq_codes = vq.encode(a, exclude_ids=ids)
    t3 = time.perf_counter()
    timings["align_s"] += t1 - t0
    timings["rq_s"] += t2 - t1
    timings["vq_s"] += t3 - t2
    cols = {"item_id": pa.array(ids), "event_timestamp": ts,
            "aligned_emb": pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])}  # fmt: skip
    from qarm_features.schema import CodeSchema

    for level, name in enumerate(CodeSchema(codes.shape[1]).rq_columns):
        cols[name] = pa.array(codes[:, level])
    cols["vq_codes"] = pa.FixedSizeListArray.from_arrays(
        pa.array(vq_codes.reshape(-1)), vq_codes.shape[1]
    )
    cols["qarm_version"] = pa.array([b.version] * len(ids), pa.string())
    return pa.table(cols)


def idle(bundle: str, n_threads: int = 2) -> dict:
    """RSS floor: the job's imports, the bundle and its quantizers; encode nothing."""
    import pandas  # noqa: F401 - the job's imports count in the floor
    import pyarrow.parquet  # noqa: F401

    import qarm_features.feast.sources  # noqa: F401
    from benchmarks.timing import threads

    with threads(n_threads):
        from qarm_features.bundle.artifact import load_bundle

        t0 = time.perf_counter()
        load_bundle(bundle).warm()
        return {"load_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- VQ what-if
def vq_index_options(bundle: str, *, queries: int, n_threads: int = 1) -> dict:
    """VQ candidate search on the bundle's pool: the shipped HNSW vs IVF alternatives.

    Recall@k against exact search and queries/s of the raw faiss search (the part that
    dominates VQ encode), on world items that are not the pool's. Runs in-process.
    """
    import faiss

    from benchmarks.timing import interleave, threads
    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.bundle.encode import align
    from qarm_features.datasets.synthetic import SyntheticWorld

    b = load_bundle(bundle)
    pool = np.ascontiguousarray(b.vq_pool_emb)
    k, c = b.vq_k, b.vq_k + 1 + 16
    # queries: items of the same world (same seed as the pool's) beyond the pool's ids
    world = SyntheticWorld(n_items=b.raw_emb.shape[0] + queries, n_users=1,
                           content_dim=b.raw_dim, seed=0)  # fmt: skip
    raw = np.concatenate([x for _, x in world.iter_content(65_536)])[-queries:]
    q = align(b, raw)
    vq_cfg = b.config.vq.model_dump()
    out = {"pool": int(pool.shape[0]), "queries": queries, "k": k, "threads": n_threads}
    with threads(n_threads):
        flat = faiss.IndexFlatIP(pool.shape[1])
        flat.add(pool)
        _, truth = flat.search(q[: min(queries, 2000)], k)
        options = {
            f"{vq_cfg.get('ann_index', 'HNSW32')} efSearch={vq_cfg.get('ann_ef_search', 128)} (shipped)":
                (vq_cfg.get("ann_index", "HNSW32"), "efSearch", vq_cfg.get("ann_ef_search", 128)),
            "HNSW32 efSearch=64": ("HNSW32", "efSearch", 64),
            "IVF1024,Flat nprobe=4": ("IVF1024,Flat", "nprobe", 4),
            "IVF1024,Flat nprobe=8": ("IVF1024,Flat", "nprobe", 8),
            "IVF1024,Flat nprobe=12": ("IVF1024,Flat", "nprobe", 12),
            "IVF1024,Flat nprobe=16": ("IVF1024,Flat", "nprobe", 16),
        }  # fmt: skip
        built, build_s = {}, {}
        for name, (spec, param, value) in options.items():
            t0 = time.perf_counter()
            key = spec
            if key not in built:
                index = faiss.index_factory(pool.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
                index.train(pool)
                index.add(pool)
                built[key] = index
                build_s[key] = time.perf_counter() - t0
        results = {}

        def searcher(spec, param, value):
            def run():
                faiss.ParameterSpace().set_index_parameter(built[spec], param, value)
                results[(spec, param, value)] = built[spec].search(q, c)[1]

            return run

        cases = {name: searcher(*opt) for name, opt in options.items()}
        cases["exact (IndexFlatIP)"] = lambda: flat.search(q, c)
        stats = interleave(cases, repeats=3, warmup=0)
    rows = {}
    for name, opt in options.items():
        got = results[opt][: truth.shape[0]]
        recall = float(np.mean([np.intersect1d(g, t).size for g, t in zip(got, truth)]) / k)
        rows[name] = {"qps": queries / stats[name].median, "recall_at_k": recall,
                      "build_s": build_s[opt[0]]}  # fmt: skip
    rows["exact (IndexFlatIP)"] = {"qps": queries / stats["exact (IndexFlatIP)"].median,
                                   "recall_at_k": 1.0, "build_s": 0.0}  # fmt: skip
    out["options"] = rows
    return out


# ----------------------------------------------------------------------------- stages
def naive_align(weights: dict, raw: np.ndarray) -> np.ndarray:
    """The aligner forward in float32, as a torch/numpy user would write it (no float64)."""
    x = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    y = x @ weights["proj.weight"].T
    if "mlp.0.weight" in weights:
        h = np.maximum(x @ weights["mlp.0.weight"].T + weights["mlp.0.bias"], 0.0)
        y += h @ weights["mlp.2.weight"].T + weights["mlp.2.bias"]
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


def stage_compare(bundle: str, *, rows: int, repeats: int, n_threads: int = 1) -> dict:
    """Each stage of the transformation against its naive float32 form, interleaved.

    Ours carries the row-independence guarantees (float64 aligner, guarded RQ, float64
    VQ re-scoring, the pandas edge); the naive forms do not. Same chunk, same threads.
    """
    import pandas as pd

    from benchmarks.bench_rq import encode_numpy
    from benchmarks.timing import interleave, threads
    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.bundle.encode import align, encode_items
    from qarm_features.datasets.synthetic import SyntheticWorld
    from qarm_features.feast.sources import encode_catalog

    with threads(n_threads):
        b = load_bundle(bundle)
        rq, vq = b.rq, b.vq
    world = SyntheticWorld(n_items=rows, n_users=1, content_dim=b.raw_dim, seed=3)
    raw = np.concatenate([c for _, c in world.iter_content(65_536)])
    ids = np.arange(1, rows + 1, dtype=np.int64)  # ids 1..pool are pool items: self-exclusion runs
    a = align(b, raw)
    w32 = {k: np.asarray(v, np.float32) for k, v in b.aligner_weights.items()}
    cb = np.asarray(b.rq_codebooks)
    k = b.vq_k
    frame = pd.DataFrame({"item_id": ids, "raw_emb": list(raw)})

    def naive_vq():
        _, cand = vq.index_.search(a, k + 1)
        keep = cand != ids[:, None]
        return np.stack([r[m][:k] for r, m in zip(cand, keep)])

    cases = {
        "align: qarm (float64)": lambda: align(b, raw),
        "align: naive float32": lambda: naive_align(w32, raw),
        "rq: qarm (guarded)": lambda: rq.encode(a),
        "rq: numpy GEMM+argmin": lambda: encode_numpy(a, cb),
        "vq: qarm (re-scored)": lambda: vq.encode(a, exclude_ids=ids),
        "vq: raw faiss search": naive_vq,
        "all: encode_items": lambda: encode_items(b, raw, ids),
        "all: encode_catalog (pandas)": lambda: encode_catalog(b, frame),
    }
    with threads(n_threads):
        stats = interleave(cases, repeats=repeats, warmup=1)
    out = {name: {"median_s": st.median, "items_per_s": rows / st.median} for name, st in stats.items()}
    return {"rows": rows, "threads": n_threads, "vq_mode": getattr(vq, "mode_", None),
            "stages": out}  # fmt: skip


# ----------------------------------------------------------------------------- section
def run(quick: bool, work: Path, n_threads: int = 2, large_n: int | None = None) -> dict:
    """Build the bundle and catalogs under ``work``; run the streamed job in child processes."""
    from benchmarks.timing import run_child

    work.mkdir(parents=True, exist_ok=True)
    if quick:
        pool, n_small, n_big, chunks = 20_000, 20_000, 60_000, (4_096, 16_384)
    else:
        pool, n_small, n_big, chunks = 100_000, 1_000_000, large_n or 10_000_000, (16_384, 65_536)
    t0 = time.perf_counter()
    bundle = make_world_bundle(work / f"bundle-{pool}", pool=pool)
    prep = {"bundle_s": time.perf_counter() - t0}
    catalogs = {}
    for n in (n_small, n_big):
        p = work / f"catalog-{n}-rg16k.parquet"
        t0 = time.perf_counter()
        if not p.exists():
            write_catalog(p, n)
        catalogs[n] = p
        prep[f"catalog_{n}_s"] = time.perf_counter() - t0
        prep[f"catalog_{n}_bytes"] = p.stat().st_size
    out_path = work / "qarm_rows.parquet"

    def job(n, chunk, mode, t):
        res = run_child("benchmarks.bench_batch:stream_encode", {
            "bundle": str(bundle), "src": str(catalogs[n]), "dst": str(out_path),
            "chunk": chunk, "mode": mode, "n_threads": t})  # fmt: skip
        out_path.unlink(missing_ok=True)
        return res

    floor = run_child("benchmarks.bench_batch:idle", {"bundle": str(bundle), "n_threads": 1})
    small, big = chunks
    runs = {
        # the headline: the arrays driver at 1 and n_threads BLAS threads (the better counts)
        "head_1t": job(n_small, big, "arrays", 1),
        "head_nt": None if quick else job(n_small, big, "arrays", n_threads),
        # the pandas path the materialization job runs (encode_catalog)
        "frame": job(n_small, big, "frame", 1),
        # RSS evidence: another chunk size, then a larger catalog at that chunk size
        "chunk_small": job(n_small, small, "arrays", 1),
        "n_big": job(n_big, small, "arrays", 1),
    }
    for r in runs.values():
        if r is not None:
            r["rss_over_floor_mib"] = r["peak_rss_mib"] - floor["peak_rss_mib"]
    stages = stage_compare(str(bundle), rows=4_096 if quick else 65_536, repeats=3)
    vq = vq_index_options(str(bundle), queries=20_000) if pool > 50_000 else None
    return {
        "pool": pool, "raw_dim": RAW_DIM, "threads": n_threads, "prep": prep,
        "floor": floor, "runs": runs, "stages": stages, "vq_index_options": vq,
    }  # fmt: skip
