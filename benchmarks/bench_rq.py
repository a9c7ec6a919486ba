"""RQ encode throughput and codebook fitting time, side by side with baselines.

Data: the synthetic world's 64-d content embeddings, L2-normalised (the aligned space the
bundle quantizes is unit-norm). Encoders under test, all on the same codebooks (fitted
once by :class:`qarm_features.codes.rq.ResidualQuantizer`) and the same threads:

- ``qarm``: ``ResidualQuantizer.encode`` (float32 candidates, float64 per-row re-score);
- ``numpy GEMM+argmin``: the textbook implementation, ``-2 r C^T + |C|^2``, argmin;
- ``torch cdist+argmin``;
- ``faiss flat``: ``IndexFlatL2`` nearest-centroid search, one level at a time;
- ``semantic-id``: the PyPI package's ``RQKMeans.encode`` (sklearn ``euclidean_distances``);
  only when the package is importable (``QARM_BENCH_SEMID`` or ``/tmp/semid`` is added to
  ``sys.path``), never a dependency of this project;
- ``numpy broadcast``: ``((r[:, None] - C) ** 2).sum(-1)``, the naive form, on a slice.

The machine's practical limit is a float32 GEMM measured in the same interleaving: a
square 2048 GEMM (``gemm_square``, the peak; the best of 1 thread, BLAS threads, and
worker threads) and a GEMM with exactly the RQ distance shape
``(n, d) @ (d, K)``, L times (``2 n d K L`` FLOP, the work an RQ encode cannot avoid).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np

from benchmarks.timing import interleave, ratio, sgemm_case, threads

log = logging.getLogger(__name__)

SEMID_PATHS = [os.environ.get("QARM_BENCH_SEMID", ""), "/tmp/semid"]


def load_semantic_id():
    """The ``semantic_id`` module, or ``(None, reason)`` when it is not installed."""
    try:
        import semantic_id
    except ImportError:
        for path in SEMID_PATHS:
            if path and os.path.isdir(os.path.join(path, "semantic_id")) and path not in sys.path:
                sys.path.append(path)
        try:
            import semantic_id
        except Exception as exc:
            return None, (
                f"semantic-id not importable ({exc}); install it outside the project, e.g. "
                "`pip install --no-deps --target /tmp/semid semantic-id`"
            )
    import semantic_id

    return semantic_id, f"semantic-id {getattr(semantic_id, '__version__', '?')}"


def world_vectors(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """``n`` unit-norm float32 rows from the synthetic world's content space."""
    from qarm_features.datasets.synthetic import SyntheticWorld

    world = SyntheticWorld(n_items=n, n_users=1, content_dim=dim, seed=seed)
    out = np.empty((n, dim), np.float32)
    for lo, (_, chunk) in _offsets(world.iter_content(65_536)):
        out[lo : lo + len(chunk)] = chunk
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def _offsets(it):
    lo = 0
    for ids, chunk in it:
        yield lo, (ids, chunk)
        lo += len(ids)


# ----------------------------------------------------------------------------- baselines
def encode_numpy(x: np.ndarray, codebooks: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """Textbook RQ encode: per level, squared distances by GEMM, argmin, subtract."""
    n, levels = x.shape[0], codebooks.shape[0]
    codes = np.empty((n, levels), np.int64)
    norms = (codebooks**2).sum(axis=2)  # (L, K)
    for lo in range(0, n, chunk):
        r = x[lo : lo + chunk].copy()
        for lvl in range(levels):
            c = codebooks[lvl]
            d = r @ c.T
            d *= -2.0
            d += norms[lvl]
            idx = d.argmin(axis=1)
            codes[lo : lo + chunk, lvl] = idx
            r -= c[idx]
    return codes


def encode_numpy_broadcast(x: np.ndarray, codebooks: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """The naive form: explicit ``(n, K, d)`` differences (memory-bound), on small chunks."""
    n, levels = x.shape[0], codebooks.shape[0]
    codes = np.empty((n, levels), np.int64)
    for lo in range(0, n, chunk):
        r = x[lo : lo + chunk].copy()
        for lvl in range(levels):
            c = codebooks[lvl]
            idx = ((r[:, None, :] - c[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
            codes[lo : lo + chunk, lvl] = idx
            r -= c[idx]
    return codes


def encode_torch(x: np.ndarray, codebooks: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """``torch.cdist`` + argmin per level."""
    import torch

    n, levels = x.shape[0], codebooks.shape[0]
    cb = torch.from_numpy(np.ascontiguousarray(codebooks))
    codes = torch.empty((n, levels), dtype=torch.int64)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        for lo in range(0, n, chunk):
            r = xt[lo : lo + chunk].clone()
            for lvl in range(levels):
                idx = torch.cdist(r, cb[lvl]).argmin(dim=1)
                codes[lo : lo + chunk, lvl] = idx
                r -= cb[lvl][idx]
    return codes.numpy()


class FaissFlatRQ:
    """Nearest-centroid assignment with one ``faiss.IndexFlatL2`` per level."""

    def __init__(self, codebooks: np.ndarray):
        import faiss

        self.codebooks = np.ascontiguousarray(codebooks, dtype=np.float32)
        self.indexes = []
        for c in self.codebooks:
            index = faiss.IndexFlatL2(c.shape[1])
            index.add(c)
            self.indexes.append(index)

    def encode(self, x: np.ndarray, chunk: int = 65_536) -> np.ndarray:
        n, levels = x.shape[0], len(self.indexes)
        codes = np.empty((n, levels), np.int64)
        for lo in range(0, n, chunk):
            r = x[lo : lo + chunk].copy()
            for lvl, index in enumerate(self.indexes):
                _, idx = index.search(r, 1)
                idx = idx[:, 0]
                codes[lo : lo + chunk, lvl] = idx
                r -= self.codebooks[lvl][idx]
        return codes


def semid_encoder(semantic_id, codebooks: np.ndarray):
    """A semantic-id ``RQKMeans`` holding our codebooks (encode only; no refit)."""
    levels, k, d = codebooks.shape
    model = semantic_id.RQKMeans(n_levels=levels, n_clusters=k, random_state=0)
    model.codebooks_ = [np.ascontiguousarray(c) for c in codebooks]
    model.D_ = d
    return model


# ----------------------------------------------------------------------------- sections
def _with_threads(n: int, fn):
    def run():
        with threads(n):
            return fn()

    return run


def blocks_in_parallel(fn, x: np.ndarray, pool, rows: int = 16_384) -> np.ndarray:
    """``fn`` over row blocks of ``x`` on a thread pool (BLAS pinned to 1 by the caller).

    Valid for any row-independent encoder: the concatenated codes equal ``fn(x)``.
    """
    parts = list(pool.map(lambda lo: fn(x[lo : lo + rows]), range(0, len(x), rows)))
    return np.concatenate(parts)


def bench_encode(
    x: np.ndarray,
    codebooks: np.ndarray,
    *,
    repeats: int,
    n_threads: int = 2,
    baseline_threads: tuple[int, ...] | None = None,
    broadcast_rows: int = 4096,
    gemm_size: int = 2048,
) -> dict:
    """RQ encode throughput of every contender, interleaved, on the same data and codebooks.

    Each contender runs with BLAS/OpenMP at 1 thread and at ``n_threads`` threads; its
    figure is its better configuration (on a shared machine multi-threaded BLAS can lose
    10x to contention, and a baseline must not be penalised for that). ``qarm`` runs as
    shipped at both settings, and as row blocks on ``n_threads`` worker threads with BLAS
    at 1 thread (``qarm_blocks``; valid because encode is row-independent).
    ``baseline_threads`` (default: 1 and ``n_threads``) are the settings the other
    contenders get (the quick mode gives them 1 only, their best on this machine).
    """
    from concurrent.futures import ThreadPoolExecutor

    from qarm_features.codes.rq import ResidualQuantizer

    n, d = x.shape
    levels, k, _ = codebooks.shape
    rq = ResidualQuantizer.from_codebooks(codebooks)
    faiss_rq = FaissFlatRQ(codebooks)
    semantic_id, semid_note = load_semantic_id()
    flops_per_item = 2.0 * d * k * levels
    pool = ThreadPoolExecutor(n_threads)
    g = gemm_size
    gemm_a, peak_flops = sgemm_case(g, g, g, seed=0)
    gemm_b, _ = sgemm_case(g, g, g, seed=1)
    # The RQ distance GEMM in L2-sized blocks, as qarm runs it: (2048, d + 1) @ (d + 1, K).
    block = 2048
    shape_case, shape_flops = sgemm_case(block, k, d + 1)
    shape_reps = max(1, int(round(levels * n / block)))

    out_codes: dict[str, np.ndarray] = {}

    def keep(name, fn):
        def run():
            out_codes[name] = np.asarray(fn())

        return run

    encoders = {
        "qarm": lambda: rq.encode(x),
        "faiss_flat": lambda: faiss_rq.encode(x),
        "numpy_gemm_argmin": lambda: encode_numpy(x, codebooks),
        "torch_cdist_argmin": lambda: encode_torch(x, codebooks),
    }
    if semantic_id is not None:
        sm = semid_encoder(semantic_id, codebooks)
        encoders["semantic_id"] = lambda: sm.encode(x, batch_size=65_536)
    cases: dict = {}
    both = tuple(sorted({1, n_threads}))
    for name, fn in encoders.items():
        for t in both if name == "qarm" else (baseline_threads or both):
            cases[f"{name}@{t}t"] = _with_threads(t, keep(f"{name}@{t}t", fn))
    cases[f"qarm_blocks@{n_threads}w"] = _with_threads(
        1, keep(f"qarm_blocks@{n_threads}w", lambda: blocks_in_parallel(rq.encode, x, pool))
    )
    xb = x[:broadcast_rows]
    cases["numpy_broadcast@1t"] = _with_threads(
        1, keep("numpy_broadcast@1t", lambda: encode_numpy_broadcast(xb, codebooks))
    )

    def gemm_workers():
        futures = [pool.submit(lambda g=g: [g() for _ in range(2)]) for g in (gemm_a, gemm_b)]
        for f in futures:
            f.result()

    def shape_workers():
        per = (shape_reps + n_threads - 1) // n_threads
        futures = [pool.submit(lambda: [shape_case() for _ in range(per)]) for _ in range(n_threads)]
        for f in futures:
            f.result()

    gemm_flops = {
        "gemm_square@1t": 2 * peak_flops,
        f"gemm_square@{n_threads}t": 2 * n_threads * peak_flops,
        f"gemm_square@{n_threads}w": 2 * n_threads * peak_flops,
        f"gemm_rq_shape@{n_threads}w": n_threads * ((shape_reps + n_threads - 1) // n_threads)
        * shape_flops,
    }
    cases["gemm_square@1t"] = _with_threads(1, lambda: [gemm_a() for _ in range(2)])
    cases[f"gemm_square@{n_threads}t"] = _with_threads(
        n_threads, lambda: [gemm_a() for _ in range(2 * n_threads)]
    )
    cases[f"gemm_square@{n_threads}w"] = _with_threads(1, gemm_workers)
    cases[f"gemm_rq_shape@{n_threads}w"] = _with_threads(1, shape_workers)

    try:
        stats = interleave(cases, repeats=repeats, warmup=1)
    finally:
        pool.shutdown()

    configs = {}
    for name, st in stats.items():
        row = {"median_s": st.median, "min_s": st.best, "times_s": st.times}
        if name in gemm_flops:
            row["gflops"] = gemm_flops[name] / st.median / 1e9
        else:
            items = broadcast_rows if name.startswith("numpy_broadcast") else n
            row["items_per_s"] = items / st.median
            row["gflops"] = items * flops_per_item / st.median / 1e9
        configs[name] = row
    ref = out_codes["qarm@1t"]
    for name, codes in out_codes.items():
        m = min(len(codes), len(ref))
        configs[name]["code_agreement"] = float((codes[:m] == ref[:m]).all(axis=1).mean())

    def best(prefix: str) -> tuple[str, dict]:
        names = [c for c in configs if c.split("@")[0] == prefix]
        name = max(names, key=lambda c: configs[c]["gflops"])
        return name, configs[name]

    contenders = {}
    for prefix in ["qarm", "qarm_blocks", *[e for e in encoders if e != "qarm"],
                   "numpy_broadcast"]:  # fmt: skip
        name, row = best(prefix)
        contenders[prefix] = {"config": name, "items_per_s": row["items_per_s"],
                              "gflops": row["gflops"]}  # fmt: skip
    peak_name, peak = best("gemm_square")
    ours_name = max(("qarm", "qarm_blocks"), key=lambda c: contenders[c]["items_per_s"])
    ours = contenders[ours_name]
    for row in contenders.values():
        row["qarm_speedup"] = ratio(ours["items_per_s"], row["items_per_s"])
    return {
        "n": n,
        "dim": d,
        "levels": levels,
        "codes": k,
        "threads": n_threads,
        "gemm_square_size": gemm_size,
        "flop_per_item": flops_per_item,
        "configs": configs,
        "contenders": contenders,
        "qarm_best": ours_name,
        "gemm_peak": {"config": peak_name, "gflops": peak["gflops"]},
        "gemm_rq_shape_gflops": configs[f"gemm_rq_shape@{n_threads}w"]["gflops"],
        "qarm_fraction_of_gemm_peak": ratio(ours["gflops"], peak["gflops"]),
        "qarm_as_shipped_fraction_of_gemm_peak": ratio(
            contenders["qarm"]["gflops"], peak["gflops"]
        ),
        "qarm_fraction_of_gemm_rq_shape": ratio(
            ours["gflops"], configs[f"gemm_rq_shape@{n_threads}w"]["gflops"]
        ),
        "semantic_id": semid_note,
        "note": (
            "FLOP = the distance GEMM only, 2*d*K*L per item. '@Nt': BLAS/OpenMP at N "
            "threads; '@Nw': N worker threads over row blocks, BLAS at 1 thread. Each "
            "contender's figure is its best configuration. numpy_broadcast runs on the "
            f"first {broadcast_rows} rows."
        ),
    }


def bench_fit(
    x: np.ndarray,
    *,
    levels: int,
    k: int,
    n_iter: int,
    repeats: int,
    thread_counts: tuple[int, ...] = (1, 2),
    semid_rows: int | None = None,
) -> dict:
    """Codebook fitting time: ours vs a bare faiss k-means loop vs semantic-id (sklearn).

    Ours and the faiss loop cap k-means at 256 points per centroid (faiss' default, a
    seeded subsample); semantic-id's sklearn k-means (``n_init=1``, same iterations) uses
    every row, so it runs on ``semid_rows`` rows and its time is scaled linearly to ``n``.
    """
    import faiss

    from qarm_features.codes.rq import ResidualQuantizer

    def faiss_loop():
        r = x.copy()
        for lvl in range(levels):
            km = faiss.Kmeans(x.shape[1], k, niter=n_iter, seed=lvl, verbose=False)
            km.train(r)
            _, idx = km.index.search(r, 1)
            r -= km.centroids[idx[:, 0]]

    fitted = {}

    def ours():
        fitted["rq"] = ResidualQuantizer(n_levels=levels, n_codes=k, n_iter=n_iter, seed=0).fit(x)

    fns = {"qarm": ours, "faiss_kmeans_loop": faiss_loop}
    semantic_id, semid_note = load_semantic_id()
    sx = x if semid_rows is None else x[:semid_rows]
    if semantic_id is not None:

        def semid():
            semantic_id.RQKMeans(
                n_levels=levels, n_clusters=k, max_iter=n_iter, n_init=1, random_state=0
            ).fit(sx)

        fns["semantic_id"] = semid
    cases = {f"{name}@{t}t": _with_threads(t, fn) for name, fn in fns.items() for t in thread_counts}
    stats = interleave(cases, repeats=repeats, warmup=0)
    configs = {name: {"median_s": st.median, "min_s": st.best, "times_s": st.times}
               for name, st in stats.items()}  # fmt: skip
    contenders = {}
    for name in fns:
        cfg = min((c for c in configs if c.split("@")[0] == name), key=lambda c: configs[c]["median_s"])
        seconds = configs[cfg]["median_s"]
        row = {"config": cfg, "seconds": seconds, "rows": len(x)}
        if name == "semantic_id":
            row["rows"] = len(sx)
            row["seconds_measured"] = seconds
            row["seconds"] = seconds / len(sx) * len(x)  # sklearn Lloyd is linear in rows
        contenders[name] = row
    for row in contenders.values():
        row["qarm_speedup"] = ratio(row["seconds"], contenders["qarm"]["seconds"])
    out = {
        "n": len(x),
        "levels": levels,
        "codes": k,
        "n_iter": n_iter,
        "configs": configs,
        "contenders": contenders,
        "semantic_id": semid_note,
        "fit_rows_qarm": min(len(x), 256 * k),
    }
    if "rq" in fitted:
        out["qarm_reconstruction_error"] = float(fitted["rq"].reconstruction_error(x[:100_000]))
    return out


def run(quick: bool, n_threads: int = 2) -> dict:
    """Both RQ sections at the quick or full size."""
    from qarm_features.codes.rq import ResidualQuantizer

    n = 50_000 if quick else 1_000_000
    levels, k, n_iter = 3, 256, 25
    t0 = time.perf_counter()
    x = world_vectors(n)
    gen_s = time.perf_counter() - t0
    with threads(1):
        codebooks = ResidualQuantizer(n_levels=levels, n_codes=k, n_iter=n_iter, seed=0).fit(x).codebooks_
    encode = bench_encode(x, codebooks, repeats=3 if quick else 5, n_threads=n_threads,
                          baseline_threads=(1,) if quick else None)  # fmt: skip
    fit = bench_fit(
        x, levels=levels, k=k, n_iter=n_iter, repeats=1 if quick else 3,
        thread_counts=(1,) if quick else (1, n_threads),
        semid_rows=20_000 if quick else 100_000,
    )  # fmt: skip
    return {"data_generation_s": gen_s, "encode": encode, "fit": fit}
