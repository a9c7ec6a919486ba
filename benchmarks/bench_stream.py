"""The streamed batch transformation at catalog scale: peak RSS flat in the catalog size.

Per run (each step its own child process, :func:`benchmarks.timing.run_child`, so each
peak RSS is that step's alone):

* ``generate``: the catalog parquet (``item_id``, ``raw_emb`` 384 float32), written row
  group by row group from :meth:`SyntheticWorld.iter_content` (never whole in memory);
* ``prepare``: :func:`qarm_features.feast.job.prepare_sources` on it — read in record
  batches, raw 384-d -> aligned 64-d -> RQ (L=3, K=64) + VQ top-25 over a 100k-item pool
  (IVF, as the bundle's ``config.vq`` picks past 50k), appended as parquet row groups to
  the codes and content sources; per stage ``seconds``, ``peak_rss_mib`` and items/s.

The bundle is :func:`qarm_features.bundle.testing.make_random_bundle` over the first 100k items'
content (random linear aligner 384 -> 64: the forward costs what a trained one costs).
Records go to the ``stream`` key of ``benchmarks/results/scale.json``. Every large file
lives in a temporary directory removed after the run. Sizes: ``python -m
benchmarks.bench_stream 1000000 4000000`` (or ``QARM_STREAM_RUNS``). ``python -m
benchmarks.bench_stream --vq``: :func:`vq_sweep`, recall@25 and items/s of the VQ search per
IVF list count and probes (the ``vq_sweep`` key).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from datetime import UTC
from pathlib import Path

POOL = 100_000  # VQ pool items (the target)
CHUNK = 65_536  # prepare_sources rows per chunk (its default)
DEFAULT_RUNS = (1_000_000,)
QUICK_RUNS = (200_000,)


def generate(path: str, n_items: int, seed: int = 0) -> dict:
    """Child: the synthetic catalog as parquet, one row group per content chunk."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qarm_features.datasets.synthetic import SyntheticWorld

    t0 = time.perf_counter()
    world = SyntheticWorld(n_items, 1, content_dim=384, seed=seed)
    schema = pa.schema([("item_id", pa.int64()), ("raw_emb", pa.list_(pa.float32()))])
    with pq.ParquetWriter(path, schema) as writer:
        for ids, content in world.iter_content(CHUNK):
            n, d = content.shape
            offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
            emb = pa.ListArray.from_arrays(offsets, pa.array(content.ravel()))
            writer.write_table(pa.Table.from_arrays([pa.array(ids), emb], schema=schema))
    return {"seconds": time.perf_counter() - t0, "bytes": os.path.getsize(path)}


def make_bundle(path: str, catalog: str, seed: int = 0) -> dict:
    """Child: a bundle whose pool is the catalog's first :data:`POOL` items."""
    import numpy as np
    import pyarrow.parquet as pq

    from qarm_features.bundle.testing import make_random_bundle

    pf = pq.ParquetFile(catalog)
    rows, raw = 0, []
    for batch in pf.iter_batches(batch_size=CHUNK, columns=["raw_emb"]):
        flat = batch.column(0).flatten().to_numpy()
        raw.append(flat.reshape(batch.num_rows, -1))
        rows += batch.num_rows
        if rows >= POOL:
            break

    content = np.concatenate(raw)[:POOL]
    t0 = time.perf_counter()
    make_random_bundle(path, raw_emb=content, out_dim=64, hidden=0, n_levels=3, n_codes=64,
                       vq_k=25, seed=seed)  # fmt: skip
    return {"seconds": time.perf_counter() - t0}


def prepare(bundle: str, repo: str, catalog: str, chunk_rows: int = CHUNK) -> dict:
    """Child: ``prepare_sources`` over the catalog file; its per-stage records."""
    from qarm_features.feast.job import prepare_sources

    Path(repo).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stats = prepare_sources(bundle, repo, catalog, chunk_rows=chunk_rows)
    out = {"seconds": time.perf_counter() - t0, "stages": stats["stages"]}
    data = Path(repo) / "data" / "current"
    out["codes_bytes"] = (data / "qarm_codes.parquet").stat().st_size
    return out


def run_one(n_items: int, work: Path) -> dict:
    from benchmarks.timing import run_child

    rec: dict = {"n_items": int(n_items), "pool": POOL, "chunk_rows": CHUNK}
    catalog = str(work / "catalog.parquet")
    rec["generate"] = run_child("benchmarks.bench_stream:generate",
                                {"path": catalog, "n_items": int(n_items)}, timeout=7200)
    rec["bundle"] = run_child("benchmarks.bench_stream:make_bundle",
                              {"path": str(work / "bundle"), "catalog": catalog}, timeout=1800)
    p = run_child("benchmarks.bench_stream:prepare",
                  {"bundle": str(work / "bundle"), "repo": str(work / "repo"), "catalog": catalog},
                  timeout=7200)  # fmt: skip
    enc = p["stages"]["encode"]
    rec["encode"] = {"seconds": enc["seconds"], "peak_rss_mib": enc["peak_rss_mib"],
                     "items_per_s": enc["rows_per_s"]}  # fmt: skip
    rec["history"] = p["stages"]["history"]
    rec["prepare"] = {"seconds": p["seconds"], "peak_rss_mib": p["peak_rss_mib"],
                      "rss_after_import_mib": p.get("rss_after_import_mib")}  # fmt: skip
    rec["catalog_gib"] = rec["generate"]["bytes"] / 2**30
    rec["codes_gib"] = p["codes_bytes"] / 2**30
    return rec


def run(quick: bool = False, *, runs=None, out_path="benchmarks/results/scale.json") -> dict:
    """Each size in a fresh temporary directory (deleted after it); records into
    ``out_path``'s ``stream`` key."""
    env = os.environ.get("QARM_STREAM_RUNS")
    if runs is None and env:
        runs = [int(v) for v in env.split(",") if v]
    runs = runs or (QUICK_RUNS if quick else DEFAULT_RUNS)
    records = []
    for n in runs:
        work = Path(tempfile.mkdtemp(prefix="qarm-stream-", dir=os.environ.get("QARM_BENCH_TMP")))
        t0 = time.perf_counter()
        try:
            rec = run_one(n, work)
        except Exception as exc:  # noqa: BLE001 - record and go on with the next size
            rec = {"n_items": n, "error": str(exc)[-800:]}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rec["wall_s"] = time.perf_counter() - t0
        records.append(rec)
        if out_path:
            _write(out_path, records)
    return summary(records)


def summary(records: list[dict]) -> dict:
    ok = [r for r in records if "error" not in r]
    out = {"records": records}
    if len(ok) >= 2:
        small, big = min(ok, key=lambda r: r["n_items"]), max(ok, key=lambda r: r["n_items"])
        out["rss_ratio"] = big["prepare"]["peak_rss_mib"] / small["prepare"]["peak_rss_mib"]
        out["ratio_between"] = [small["n_items"], big["n_items"]]
    return out


def _write(path, records) -> None:
    """Merge into the scale results file (the pipeline sweep keeps its own keys)."""
    from benchmarks.timing import merge_results

    merge_results(path, {"stream": summary(records)})


def markdown(result: dict) -> list[str]:
    lines = [("Streamed batch transformation (prepare_sources on a catalog parquet; "
             "seconds / peak RSS MiB / items/s):"), "",
             "| items | generate | encode | prepare peak RSS | items/s |", "|---|---|---|---|---|"]
    for r in result.get("records", []):
        if "error" in r:
            lines.append(f"| {r['n_items']:,} | failed: {r['error'][-80:]} |")
            continue
        e = r["encode"]
        lines.append(f"| {r['n_items']:,} | {r['generate']['seconds']:.0f} s | {e['seconds']:.0f} s "
                     f"| {r['prepare']['peak_rss_mib']:.0f} | {e['items_per_s']:,.0f} |")
    if "rss_ratio" in result:
        lines += ["", (f"Peak RSS ratio {result['ratio_between'][1]:,} vs "
                      f"{result['ratio_between'][0]:,} items: {result['rss_ratio']:.2f}")]
    return lines + [""]


# ---------------------------------------------------------------- VQ search settings
VQ_GRID = ((256, (2, 4)), (512, (4, 8)), (1024, (4, 8, 12, 16)), (2048, (8, 16, 24)))


def vq_sweep(queries: int = 32_768, recall_rows: int = 2_000, grid=VQ_GRID, repeats: int = 3,
             seed: int = 0) -> dict:  # fmt: skip
    """VQ top-25 on :data:`POOL` aligned items, per IVF list count and probes: recall@25
    against the exact top-25 and items/s of ``VQCoder.encode`` (the default row-block
    workers, as the batch transformation runs it), settings interleaved.

    Pool and queries as :func:`make_bundle` and :func:`prepare` see them: the first
    :data:`POOL` items of the synthetic catalog are the pool, the next ``queries`` items
    (not in the pool, like 90% of a 1M catalog) the queries; the bundle's random linear
    aligner 384 -> 64 maps both. In-process.
    """
    import numpy as np

    from benchmarks.timing import interleave
    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.bundle.encode import align
    from qarm_features.bundle.testing import make_random_bundle
    from qarm_features.codes.vq import VQCoder
    from qarm_features.datasets.synthetic import SyntheticWorld

    world = SyntheticWorld(POOL + queries, 1, content_dim=384, seed=seed)
    raw = np.concatenate([x for _, x in world.iter_content(CHUNK)])
    with tempfile.TemporaryDirectory(dir=os.environ.get("QARM_BENCH_TMP")) as tmp:
        path = make_random_bundle(Path(tmp) / "b", raw_emb=raw[:POOL], out_dim=64, hidden=0,
                                  n_levels=3, n_codes=64, vq_k=25, seed=seed)  # fmt: skip
        b = load_bundle(path)
        pool, ids, k = b.vq_pool_emb, b.vq_pool_ids, b.vq_k
        q = align(b, raw[POOL:])
    truth = VQCoder(k=k, exact_max_pool=POOL).fit(pool, ids).encode(q[:recall_rows])
    coders, rows = {}, {}
    for nlist, probes in grid:
        t0 = time.perf_counter()
        spec = f"IVF{nlist},Flat"
        blob = VQCoder(k=k, exact_max_pool=1, ann_index=spec).fit(pool, ids).export_index()
        build = time.perf_counter() - t0
        for nprobe in probes:
            vq = VQCoder(k=k, exact_max_pool=1, ann_index=spec, ann_nprobe=nprobe)
            vq.fit(pool, ids, index=blob)
            got = vq.encode(q[:recall_rows])
            hits = [np.intersect1d(g, w).size for g, w in zip(got, truth)]
            name = f"nlist {nlist} nprobe {nprobe}"
            coders[name] = vq
            rows[name] = {"nlist": nlist, "nprobe": nprobe, "recall_at_25": float(np.mean(hits)) / k,
                          "build_s": build}  # fmt: skip
    cases = {name: (lambda vq=vq: vq.encode(q)) for name, vq in coders.items()}
    stats = interleave(cases, repeats=repeats, warmup=0)
    for name, st in stats.items():
        rows[name]["items_per_s"] = queries / st.median
    return {"pool": POOL, "queries": queries, "recall_rows": recall_rows, "k": k,
            "settings": list(rows.values())}  # fmt: skip


if __name__ == "__main__":  # python -m benchmarks.bench_stream [n_items ...]
    import sys

    if sys.argv[1:2] == ["--vq"]:  # python -m benchmarks.bench_stream --vq: the VQ settings
        from benchmarks.timing import merge_results

        result = vq_sweep()
        merge_results("benchmarks/results/scale.json", {"vq_sweep": result})
        print(json.dumps(result, indent=1, default=float))
        sys.exit(0)
    sizes = [int(a) for a in sys.argv[1:]] or None
    print(json.dumps(run(False, runs=sizes), indent=1, default=float))


# ------------------------------------------------------------------ Feast's materialization
def _set_write_batch(repo: Path, batch_size: int | None) -> None:
    """Set (or remove) ``materialization.online_write_batch_size`` in the repo's config."""
    import yaml

    path = repo / "feature_store.yaml"
    config = yaml.safe_load(path.read_text())
    config.pop("materialization", None)
    if batch_size is not None:
        config["materialization"] = {"online_write_batch_size": int(batch_size)}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def feast_materialize(repo: str, bundle: str, batch_size: int | str | None = None) -> dict:
    """Child: online rows of ``qarm`` and ``item_content`` of a prepared repo (SQLite online
    store, the repo's offline store, local engine); per view seconds and peak RSS (VmHWM
    reset first). ``batch_size``: ``"streamed"`` = ``qarm materialize``'s route
    (:func:`qarm_features.feast.online_write.write_view`, record batches); else Feast's
    ``store.materialize`` with ``online_write_batch_size`` set to it (None: unset, one
    batch)."""
    from datetime import datetime, timedelta

    from benchmarks.bench_scale import _peak_mib, _reset_peak
    from qarm_features.feast.job import apply
    from qarm_features.feast.online_write import write_view
    from qarm_features.feast.sources import EPOCH
    from qarm_features.feast.store import open_store

    _set_write_batch(Path(repo), None if batch_size == "streamed" else batch_size)
    apply(repo, bundle)
    store = open_store(Path(repo))
    end = datetime.now(UTC) + timedelta(seconds=1)
    out = {}
    for view in ("qarm", "item_content"):
        _reset_peak()
        t0 = time.perf_counter()
        if batch_size == "streamed":
            write_view(store, Path(repo), view, start=EPOCH, end=end)
        else:
            store.materialize(start_date=EPOCH, end_date=end, feature_views=[view])
        out[view] = {"seconds": time.perf_counter() - t0, "peak_rss_mib": _peak_mib()}
    return out


def run_feast(
    sizes=(20_000, 60_000),
    batch_sizes=(None, 10_000, "streamed"),
    out_path="benchmarks/results/scale.json",
    streamed_only_above: int = 100_000,
) -> dict:
    """The online write of the streamed sources, by size: Feast 0.67's local
    materialization for each ``online_write_batch_size`` (None: Feast's default, one batch)
    and ``qarm materialize``'s streamed route (``"streamed"``), on the same repo. Above
    ``streamed_only_above`` items only the streamed route runs (Feast's grows ~11 KiB a
    row: it would not fit)."""
    from benchmarks.timing import merge_results, run_child
    from qarm_features.feast.scaffold import init_repo

    records = []
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix="qarm-feast-", dir=os.environ.get("QARM_BENCH_TMP")))
        try:
            catalog, repo = str(work / "catalog.parquet"), work / "repo"
            run_child("benchmarks.bench_stream:generate", {"path": catalog, "n_items": int(n)})
            run_child("benchmarks.bench_stream:make_bundle",  # pool: min(n, POOL) items
                      {"path": str(work / "bundle"), "catalog": catalog})  # fmt: skip
            init_repo(repo)
            p = run_child("benchmarks.bench_stream:prepare",
                          {"bundle": str(work / "bundle"), "repo": str(repo), "catalog": catalog})  # fmt: skip
            for b in batch_sizes:
                if n > streamed_only_above and b != "streamed":
                    continue
                f = run_child("benchmarks.bench_stream:feast_materialize",
                              {"repo": str(repo), "bundle": str(work / "bundle"),
                               "batch_size": b}, timeout=7200)  # fmt: skip
                records.append({"n_items": int(n), "online_write_batch_size": b,
                                "prepare_peak_rss_mib": p["peak_rss_mib"],
                                **{k: v for k, v in f.items() if k in ("qarm", "item_content")}})  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            records.append({"n_items": int(n), "error": str(exc)[-800:]})
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if out_path:
            merge_results(out_path, {"feast_materialize": {"records": records}})
    return {"records": records}
