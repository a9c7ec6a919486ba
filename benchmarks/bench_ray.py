"""The batch transformation on Ray vs one process, on the same cores: items/s, codes equal.

Same bundle (:func:`benchmarks.bench_batch.make_world_bundle`: 384-d raw, 64-d aligned,
RQ 3 x 256, VQ top-25 over the pool), same parquet catalog split into files, same rows per
batch. Contenders, each in a fresh child process (:func:`benchmarks.timing.run_child`), run
in ABCCBA order:

- ``single@2t`` / ``single@1t``: one process, BLAS/faiss at the library's 2 threads or at
  one, parquet -> :func:`~qarm_features.bundle.encode.encode_frame` -> parquet, batch by batch
  (the ratio is taken against the faster of the two);
- ``ray``: :func:`qarm_features.build.distributed.encode_parquet` on a local Ray cluster of
  ``num_cpus`` CPUs started in the child (one task per CPU, 1 thread each). ``job_s``
  excludes the cluster start (``init_s``, a fixed cost paid once per cluster) and includes
  the workers' start and bundle loads. Workers run at nice 0 (Ray's default is 15, which on
  a shared machine hands their CPU to everyone else's jobs; ``--niceness -1`` keeps it).

The outputs are compared column by column (bit for bit) after every Ray run. Not in the
suite (a Ray cluster start alone is ~5 s, and a meaningful catalog takes minutes):

    python -m benchmarks.bench_ray [--n 120000] [--out benchmarks/results/ray.json]

``--mining-events N`` adds (``--mining-only``: only) pair mining, one process vs Ray on the
same cores: the bench_scale world of N events over N / 20 items, written as parquet files;
``single`` reads them and runs :func:`~qarm_features.pairs.mining.mine_pairs`, ``ray`` runs
:func:`~qarm_features.build.ray_pairs.mine_pairs_ray` on them (the workers read them) on a local
cluster of 2 CPUs. Both get the same BPR retrieval embeddings (fitted once beforehand: the
fit is single process in both routes) and the default PairsConfig; their pairs and stats
must be equal. Section ``mining`` of the results.
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
        from qarm_features.bundle.encode import encode_frame, get_bundle

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

    from qarm_features.build.distributed import encode_parquet

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


def feast_materialize(
    bundle: str, repo: str, yaml: str | None, num_cpus: int = 2, niceness: int | None = 0
) -> dict:
    """``qarm materialize`` (the job: sources, apply, every view incl. ``qarm_batch``) on
    ``repo``, with the default config (local engine) or ``yaml`` (Ray, on a local cluster of
    ``num_cpus`` started here first: ``init_s``)."""
    import pandas as pd

    init_s = 0.0
    if yaml is not None:
        if niceness is not None:
            os.environ["RAY_worker_niceness"] = str(int(niceness))
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t0
    from qarm_features.feast.job import materialize

    # a user history to materialize too (the Ray offline store fails on an empty source)
    ids = get_bundle_ids(bundle)
    rng = np.random.default_rng(0)
    n_events = 5 * len(ids)
    log = pd.DataFrame({"user_id": rng.integers(1, 1 + len(ids) // 10, n_events),
                        "item_id": rng.choice(ids, n_events),
                        "rating": rng.integers(1, 6, n_events).astype(float),
                        "timestamp": 883_000_000 + np.arange(n_events)})  # fmt: skip
    stats = materialize(bundle, repo, interactions_df=log, fs_yaml_file=yaml)
    return {"materialize_s": stats["materialize_seconds"], "init_s": init_s, "yaml": yaml}


def get_bundle_ids(bundle: str) -> np.ndarray:
    from qarm_features.bundle.encode import get_bundle

    return get_bundle(bundle).item_ids


def online_rows(repo: str, yaml: str | None, ids: list[int]) -> dict:
    """Online ``qarm`` and ``qarm_batch`` rows of ``ids`` (a row missing: None)."""
    from qarm_features.feast.store import open_store
    from qarm_features.schema import CodeSchema

    store = open_store(repo, yaml)
    names = ["aligned_emb", *CodeSchema(3).rq_columns, "vq_codes", "qarm_version"]
    out = {}
    for view in ("qarm", "qarm_batch"):
        got = store.get_online_features(
            features=[f"{view}:{n}" for n in names], entity_rows=[{"item_id": i} for i in ids]
        ).to_dict()
        out[view] = {n: got[n] for n in names}
    return out


def compare_feast(work: Path, bundle: str, rounds: int, num_cpus: int, niceness) -> dict:
    """Local engine vs Ray engine materializing the same bundle into fresh repo copies."""
    from benchmarks.timing import ratio, run_child
    from qarm_features.bundle.encode import get_bundle
    from qarm_features.feast.views import BATCH_VIEW_FILE

    root = Path(__file__).resolve().parents[1]
    order = (["local", "ray", "ray", "local"] * rounds)[: 2 * rounds]
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    repos = {}
    for i, who in enumerate(order):
        repo = work / f"repo-{i}-{who}"
        shutil.copytree(
            root / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__")
        )
        text = BATCH_VIEW_FILE.format(definitions="feature_definitions", item="item")
        (repo / "qarm_batch_view.py").write_text(text)
        yaml = "feature_store.ray.yaml" if who == "ray" else None
        args = {"bundle": bundle, "repo": str(repo), "yaml": yaml, "num_cpus": num_cpus,
                "niceness": niceness}  # fmt: skip
        runs[who].append(run_child("benchmarks.bench_ray:feast_materialize", args))
        repos.setdefault(who, (str(repo), yaml))
    ids = [int(i) for i in get_bundle(bundle).item_ids]
    local, ray_ = (online_rows(*repos[w], ids) for w in ("local", "ray"))
    missing = sum(v is None for v in ray_["qarm_batch"]["rq_code_l1"])
    med = {w: statistics.median(r["materialize_s"] for r in runs[w]) for w in runs}
    return {
        "what": "qarm materialize (item_content, qarm, qarm_batch UDF, user_history) into SQLite",
        "n_items": len(ids), "order": order, "seconds": med,
        "ray_over_local": ratio(med["local"], med["ray"]),
        "ray_rows_missing": missing,
        "online_rows_equal": local == ray_ and missing == 0,
        "runs": runs,
    }  # fmt: skip


def mine_single(src: str, emb: str, dst: str) -> dict:
    """One process: read the parquet log, mine_pairs with the given retrieval embeddings."""
    import pandas as pd

    from benchmarks.timing import threads
    from qarm_features.pairs.mining import mine_pairs

    t0 = time.perf_counter()
    with threads(2):
        log = pd.read_parquet(src)
        z = np.load(emb)
        pairs, stats = mine_pairs(log, item_ids=z["ids"], item_emb=z["emb"])
    seconds = time.perf_counter() - t0
    pairs.to_parquet(dst)
    return {"job_s": seconds, "n_events": len(log), "stats": stats}


def mine_on_ray(src: str, emb: str, dst: str, num_cpus: int = 2, niceness: int | None = 0) -> dict:
    """A local Ray cluster of ``num_cpus`` CPUs, then mine_pairs_ray on the parquet log."""
    if niceness is not None:
        os.environ["RAY_worker_niceness"] = str(int(niceness))
    import ray

    from qarm_features.build.ray_pairs import mine_pairs_ray
    from qarm_features.config import PairsConfig

    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    t1 = time.perf_counter()
    try:
        z = np.load(emb)
        pairs, stats = mine_pairs_ray(
            src, PairsConfig(engine="ray"), item_ids=z["ids"], item_emb=z["emb"]
        )
    finally:
        t2 = time.perf_counter()
        ray.shutdown()
    pairs.to_parquet(dst)
    return {"init_s": t1 - t0, "job_s": t2 - t1, "stats": stats, "num_cpus": num_cpus}


def fit_retrieval(src: str, emb: str) -> dict:
    import pandas as pd

    from qarm_features.config import PairsConfig
    from qarm_features.pairs.retrieval import BPRMF

    t0 = time.perf_counter()
    ids, vecs = BPRMF.from_config(PairsConfig()).fit(pd.read_parquet(src)).item_embeddings()
    np.savez(emb, ids=ids, emb=vecs)
    return {"fit_s": time.perf_counter() - t0}


def compare_mining(work: Path, n_events: int, rounds: int, num_cpus: int, niceness) -> dict:
    """Pair mining, one process vs Ray, on the same parquet log and retrieval embeddings."""
    import pandas as pd

    from benchmarks.bench_scale import scale_world
    from benchmarks.timing import ratio, run_child

    _, _, log = scale_world(max(n_events // 20, 100), n_events, content_dim=8)
    src = work / "log"
    src.mkdir()
    for k, rows in enumerate(np.array_split(np.arange(len(log)), FILES)):
        log.iloc[rows].to_parquet(src / f"part-{k:03d}.parquet", row_group_size=BATCH_ROWS * 4)
    n_pos = int((log["rating"] >= 4.0).sum())
    del log
    emb = str(work / "retrieval.npz")
    fit = run_child("benchmarks.bench_ray:fit_retrieval", {"src": str(src), "emb": emb})
    order = (["single", "ray", "ray", "single"] * rounds)[: 2 * rounds]
    runs: dict[str, list[dict]] = {"single": [], "ray": []}
    outs: dict[str, list[Path]] = {"single": [], "ray": []}
    for i, who in enumerate(order):
        dst = work / f"pairs-{i}-{who}.parquet"
        args = {"src": str(src), "emb": emb, "dst": str(dst)}
        if who == "ray":
            args.update(num_cpus=num_cpus, niceness=niceness)
        runs[who].append(
            run_child(f"benchmarks.bench_ray:mine_{'on_ray' if who == 'ray' else who}", args)
        )
        outs[who].append(dst)
    ref = pd.read_parquet(outs["single"][0])
    equal = all(pd.read_parquet(p).equals(ref) for p in outs["ray"] + outs["single"][1:])
    stats_equal = all(r["stats"] == runs["single"][0]["stats"] for r in runs["ray"])
    med = {w: statistics.median(r["job_s"] for r in runs[w]) for w in runs}
    init_s = statistics.median(r["init_s"] for r in runs["ray"])
    return {
        "what": "mine_pairs (U2I + Swing + union + stats) from parquet, given BPR embeddings",
        "n_events": n_events, "n_positives": n_pos, "n_pairs": len(ref), "files": FILES,
        "retrieval_fit_s": fit["fit_s"], "order": order, "seconds": med,
        "events_per_s": {w: n_events / med[w] for w in med},
        "ray_over_single": ratio(med["single"], med["ray"]),
        "ray_over_single_incl_cluster_start": ratio(med["single"], med["ray"] + init_s),
        "pairs_equal": bool(equal), "stats_equal": bool(stats_equal),
        "ray_num_cpus": num_cpus, "ray_worker_niceness": niceness, "runs": runs,
    }  # fmt: skip


def run_mining(out: Path, n_events: int, rounds: int, num_cpus: int, niceness) -> dict:
    """The mining section alone, merged into ``out`` (the other sections kept)."""
    from benchmarks.timing import machine

    host = machine()
    work = Path(tempfile.mkdtemp(prefix="qarm-bench-ray-mining-"))
    try:
        res = compare_mining(work, n_events, rounds, num_cpus, niceness)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["machine"] = host
    res["command"] = (f"python -m benchmarks.bench_ray --mining-only --mining-events {n_events}"
                      f" --rounds {rounds}")  # fmt: skip
    data = json.loads(out.read_text()) if out.exists() else {}
    data["mining"] = res  # the other sections kept
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, out)
    return res


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
    out: Path,
    *,
    n: int = 120_000,
    rounds: int = 2,
    num_cpus: int = 2,
    niceness: int | None = 0,
    feast_items: int = 0,
    mining_events: int = 0,
) -> dict:
    from benchmarks.bench_batch import make_world_bundle
    from benchmarks.timing import machine, ratio, run_child

    host = machine()  # load average before the runs
    work = Path(tempfile.mkdtemp(prefix="qarm-bench-ray-"))
    try:
        bundle = str(make_world_bundle(work / "bundle", pool=POOL))
        src = str(write_parts(work / "catalog", n, FILES))
        # single@2t / @1t (the library's threads, or one: on a loaded machine one thread
        # can win) and ray, in ABCCBA order per two rounds
        names = ["single@2t", "single@1t", "ray"]
        order = (names + names[::-1]) * ((rounds + 1) // 2)
        order = order[: len(names) * rounds]
        runs: dict[str, list[dict]] = {name: [] for name in names}
        checks = []
        for i, who in enumerate(order):
            dst = work / f"out-{i}-{who}"
            args = {"bundle": bundle, "src": src, "dst": str(dst), "batch_rows": BATCH_ROWS}
            if who == "ray":
                args.update(num_cpus=num_cpus, niceness=niceness)
                res = run_child("benchmarks.bench_ray:on_ray", args)
            else:
                args["n_threads"] = int(who[-2])
                res = run_child("benchmarks.bench_ray:single", args)
            runs[who].append(res)
            ref = next(work.glob("out-*-single@2t"), None)
            if ref is not None and ref != dst:
                checks.append({"contender": who, **equal_outputs(ref, dst)})
                shutil.rmtree(dst)
        med = {who: statistics.median(r["job_s"] for r in runs[who]) for who in names}
        best = min(("single@2t", "single@1t"), key=med.get)
        ray_init_s = statistics.median(r["init_s"] for r in runs["ray"])
        result = {
            "what": "batch transformation (parquet -> aligned + RQ + VQ -> parquet)",
            "n_items": n, "files": FILES, "batch_rows": BATCH_ROWS, "vq_pool": POOL,
            "cores": os.cpu_count(), "ray_num_cpus": num_cpus, "ray_worker_niceness": niceness,
            "order": order,
            "items_per_s": {who: n / med[who] for who in names},
            "single_best": best,
            "ray_over_single": ratio(med[best], med["ray"]),
            "ray_over_single_incl_cluster_start": ratio(med[best], med["ray"] + ray_init_s),
            "target": ">= 0.7",
            "codes_equal": bool(checks) and all(c["all"] for c in checks),
            "checks": checks,
            "runs": runs,
            "machine": host,
            "feast": None,
            "command": f"python -m benchmarks.bench_ray --n {n} --rounds {rounds}"
            + (f" --feast-items {feast_items}" if feast_items else "")
            + ("" if niceness == 0 else f" --niceness {-1 if niceness is None else niceness}"),
        }  # fmt: skip
        if feast_items:
            small = str(make_world_bundle(work / "bundle-feast", pool=feast_items))
            result["feast"] = compare_feast(work, small, rounds, num_cpus, niceness)
        if mining_events:
            result["command"] += f" --mining-events {mining_events}"
            result["mining"] = compare_mining(work, mining_events, rounds, num_cpus, niceness)
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
    p.add_argument("--n", type=int, default=120_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--niceness",
        type=int,
        default=0,
        help="Ray workers' nice value (Ray's default: 15; -1: leave Ray's default)",
    )
    p.add_argument(
        "--feast-items",
        type=int,
        default=0,
        help="also time qarm materialize, local vs Ray engine, on this many items",
    )
    p.add_argument(
        "--mining-events",
        type=int,
        default=0,
        help="also time pair mining, one process vs Ray, on a log of this many events",
    )
    p.add_argument(
        "--mining-only", action="store_true", help="only the mining section (merged into --out)"
    )
    p.add_argument("--out", default="benchmarks/results/ray.json")
    args = p.parse_args()
    nice = None if args.niceness < 0 else args.niceness
    if args.mining_only:
        res = run_mining(Path(args.out), args.mining_events or 1_000_000, args.rounds, 2, nice)
        print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=2))
        raise SystemExit(0 if res["pairs_equal"] and res["stats_equal"] else 1)
    res = run(Path(args.out), n=args.n, rounds=args.rounds, niceness=nice,
              feast_items=args.feast_items, mining_events=args.mining_events)  # fmt: skip
    print(json.dumps({k: v for k, v in res.items() if k not in ("runs", "machine")}, indent=2))
