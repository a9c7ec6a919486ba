"""The batch transformation on Ray vs one process, on the same cores: items/s, codes equal.

Same bundle (:func:`benchmarks.bench_batch.make_world_bundle`: 384-d raw, 64-d aligned,
RQ 3 x 256, VQ top-25 over the pool), same parquet catalog split into files, same rows per
batch. Contenders, each in a fresh child process (:func:`benchmarks.timing.run_child`), run
in ABBA order:

- ``single``: one process, BLAS/faiss at the library's 2 threads (its best setting here),
  parquet -> :func:`~qarm_features.encode.encode_frame` -> parquet, batch by batch;
- ``ray``: :func:`qarm_features.distributed.encode_parquet` on a local Ray cluster of
  ``num_cpus`` CPUs started in the child (one task per CPU, 1 thread each). ``job_s``
  excludes the cluster start (``init_s``, a fixed cost paid once per cluster) and includes
  the workers' start and bundle loads. Workers run at nice 0 (Ray's default is 15, which on
  a shared machine hands their CPU to everyone else's jobs; ``--niceness -1`` keeps it).

The outputs are compared column by column (bit for bit) after every Ray run. Not in the
suite (a Ray cluster start alone is ~5 s, and a meaningful catalog takes minutes):

    python -m benchmarks.bench_ray [--n 200000] [--out benchmarks/results/ray.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

POOL = 20_000  # VQ pool (exact search: the quick batch section's setting)
FILES = 8  # catalog files: Ray reads one task per file (blocks of one file are not split)
BATCH_ROWS = 16_384  # rows per batch in both contenders (distributed.BATCH_ROWS)


def single(bundle: str, src: str, dst: str, batch_rows: int, n_threads: int = 2) -> dict:
    """One process: every catalog file, batch by batch, into one parquet file per input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.timing import threads

    t0 = time.perf_counter()
    n = 0
    with threads(n_threads):
        from qarm_features.encode import encode_frame, get_bundle

        b = get_bundle(bundle)
        Path(dst).mkdir(parents=True, exist_ok=True)
        for path in sorted(Path(src).glob("*.parquet")):
            pf = pq.ParquetFile(path, pre_buffer=False)
            writer = None
            for batch in pf.iter_batches(batch_size=batch_rows):
                out = encode_frame(b, batch.to_pandas(), chunk_size=batch_rows)
                table = pa.Table.from_pandas(out, preserve_index=False)
                writer = writer or pq.ParquetWriter(Path(dst) / path.name, table.schema)
                writer.write_table(table)
                n += batch.num_rows
            if writer is not None:
                writer.close()
    seconds = time.perf_counter() - t0
    return {"n": n, "job_s": seconds, "items_per_s": n / seconds, "threads": n_threads}


def on_ray(
    bundle: str, src: str, dst: str, batch_rows: int, num_cpus: int = 2, niceness: int | None = None
) -> dict:
    """A local Ray cluster of ``num_cpus`` CPUs, then encode_parquet.

    ``niceness``: the workers' nice value (Ray's default is 15, so on a machine shared with
    other jobs its workers yield the CPU to them while ``single`` runs at 0; 0 compares the
    two on equal terms, as on a dedicated cluster node). ``None``: Ray's default.
    """
    if niceness is not None:
        os.environ["RAY_worker_niceness"] = str(int(niceness))
    import ray

    from qarm_features.distributed import encode_parquet

    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    t1 = time.perf_counter()
    try:
        encode_parquet(bundle, src, dst, batch_rows=batch_rows)
    finally:
        t2 = time.perf_counter()
        ray.shutdown()
    n = sum(pq_rows(p) for p in Path(dst).glob("*.parquet"))
    return {"n": n, "init_s": t1 - t0, "job_s": t2 - t1, "items_per_s": n / (t2 - t1),
            "items_per_s_incl_init": n / (t2 - t0), "num_cpus": num_cpus,
            "worker_niceness": niceness}  # fmt: skip


def pq_rows(path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def write_parts(path: Path, n: int, files: int) -> Path:
    """The bench_batch world catalog (``item_id``, ``raw_emb``, ``event_timestamp``) in files."""
    import pyarrow.parquet as pq

    from benchmarks.bench_batch import write_catalog

    one = write_catalog(path.with_suffix(".parquet"), n)
    table = pq.read_table(one)
    path.mkdir(parents=True, exist_ok=True)
    step = -(-n // files)
    for i in range(files):
        pq.write_table(table.slice(i * step, step), path / f"part-{i:03d}.parquet",
                       compression="none", row_group_size=BATCH_ROWS)  # fmt: skip
    one.unlink()
    return path


def equal_outputs(a: Path, b: Path) -> dict:
    """Column-by-column bit equality of two encoded catalogs (rows matched on item_id)."""
    import pandas as pd

    x = pd.read_parquet(a).sort_values("item_id").reset_index(drop=True)
    y = pd.read_parquet(b).sort_values("item_id").reset_index(drop=True)
    out = {"rows": [len(x), len(y)]}
    for col in x.columns:
        if x[col].dtype == object and not isinstance(x[col].iloc[0], str):
            u, v = np.stack(x[col]), np.stack(y[col])
            out[col] = bool(
                u.shape == v.shape and np.array_equal(u.view(np.uint8), v.view(np.uint8))
            )
        else:
            out[col] = bool(x[col].equals(y[col]))
    out["all"] = len(x) == len(y) and all(v for k, v in out.items() if k != "rows")
    return out


def run(
    out: Path, *, n: int = 200_000, rounds: int = 2, num_cpus: int = 2, niceness: int | None = 0
) -> dict:
    from benchmarks.bench_batch import make_world_bundle
    from benchmarks.timing import machine, ratio, run_child

    work = Path(tempfile.mkdtemp(prefix="qarm-bench-ray-"))
    try:
        bundle = str(make_world_bundle(work / "bundle", pool=POOL))
        src = str(write_parts(work / "catalog", n, FILES))
        runs: dict[str, list[dict]] = {"single": [], "ray": []}
        checks = []
        order = ["single", "ray", "ray", "single"] * ((rounds + 1) // 2)
        for i, who in enumerate(order[: 2 * rounds]):
            dst = work / f"out-{who}-{i}"
            if who == "single":
                res = run_child("benchmarks.bench_ray:single",
                                {"bundle": bundle, "src": src, "dst": str(dst), "batch_rows": BATCH_ROWS})  # fmt: skip
            else:
                res = run_child("benchmarks.bench_ray:on_ray",
                                {"bundle": bundle, "src": src, "dst": str(dst),
                                 "batch_rows": BATCH_ROWS, "num_cpus": num_cpus,
                                 "niceness": niceness})  # fmt: skip
            runs[who].append(res)
            if who == "ray":
                ref = next(work.glob("out-single-*"), None)
                if ref is not None:
                    checks.append(equal_outputs(ref, dst))
            if who == "single" and len(runs["single"]) > 1:
                shutil.rmtree(dst)  # keep one reference output
        single_s = statistics.median(r["job_s"] for r in runs["single"])
        ray_s = statistics.median(r["job_s"] for r in runs["ray"])
        ray_init_s = statistics.median(r["init_s"] for r in runs["ray"])
        result = {
            "what": "batch transformation (parquet -> aligned + RQ + VQ -> parquet)",
            "n_items": n, "files": FILES, "batch_rows": BATCH_ROWS, "vq_pool": POOL,
            "cores": os.cpu_count(), "ray_num_cpus": num_cpus, "ray_worker_niceness": niceness,
            "order": order[: 2 * rounds],
            "single_items_per_s": n / single_s,
            "ray_items_per_s": n / ray_s,
            "ray_over_single": ratio(single_s, ray_s),
            "ray_over_single_incl_cluster_start": ratio(single_s, ray_s + ray_init_s),
            "target": ">= 0.7",
            "codes_equal": bool(checks) and all(c["all"] for c in checks),
            "checks": checks,
            "runs": runs,
            "machine": machine(),
            "command": f"python -m benchmarks.bench_ray --n {n} --rounds {rounds}"
            + ("" if niceness == 0 else f" --niceness {niceness}"),
        }  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--niceness",
        type=int,
        default=0,
        help="Ray workers' nice value (Ray's default: 15; -1: leave Ray's default)",
    )
    p.add_argument("--out", default="benchmarks/results/ray.json")
    args = p.parse_args()
    nice = None if args.niceness < 0 else args.niceness
    res = run(Path(args.out), n=args.n, rounds=args.rounds, niceness=nice)
    print(json.dumps({k: v for k, v in res.items() if k not in ("runs", "machine")}, indent=2))
