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

import json
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


# ----------------------------------------------------------------------------- sample vs full
def aligned_stand_in(
    n_items: int,
    *,
    content_dim: int = 384,
    out_dim: int = 64,
    seed: int = 0,
    pca_rows: int = 100_000,
) -> np.ndarray:
    """The aligned space of :func:`benchmarks.bench_scale.scale_world`'s catalog, stand-in.

    The world's ``content_dim``-d content (as ``scale_world``) through the pipeline's own
    forward (``build.pipeline.align_catalog``: L2 norm, linear map, L2 norm) with the map a
    PCA instead of a trained aligner: the top ``out_dim`` principal directions (uncentred
    second moment) of ``pca_rows`` seeded L2-normalised rows. Training an aligner on the
    1M world's pairs costs minutes to hours; the codebook question needs only the geometry.
    """
    from qarm_features.build.pipeline import align_catalog
    from qarm_features.datasets.synthetic import SyntheticWorld

    content = SyntheticWorld(n_items, 1, content_dim=content_dim, seed=seed).content
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n_items, size=min(n_items, pca_rows), replace=False))
    s = content[rows].astype(np.float64)
    s /= np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    _, vecs = np.linalg.eigh(s.T @ s)  # ascending eigenvalues
    proj = vecs[:, ::-1][:, :out_dim].T  # (out_dim, content_dim)
    return align_catalog({"proj.weight": proj.astype(np.float32)}, content)


def _rss_mib() -> float:
    from benchmarks._child import status_mib

    return status_mib("VmRSS")


def sample_vs_full(
    n_items: int = 1_000_000,
    *,
    n_threads: int = 1,
    seed: int = 0,
    rq_cfg=None,
    x: np.ndarray | None = None,
) -> dict:
    """RQ codebooks fitted on the shipped sample vs on every item, both encoding every item.

    Both fits use ``rq_cfg`` (default: the shipped :class:`~qarm_features.config.RQConfig`:
    its levels, codes, k-means iterations and seeds); they differ only in the rows k-means
    sees: ``sample`` is the shipped rule (at most 256 rows per centroid, a seeded sample),
    ``full`` is every item (``max_points_per_centroid=None``). Each then encodes all
    ``n_items``; per fit: relative reconstruction error (and after each level), per-level
    utilization and entropy, collision rate (:func:`qarm_features.metrics.code_quality`),
    wall and CPU seconds of the fit, and its peak RSS (``VmHWM`` reset before the fit; the
    data itself is resident, so ``fit_extra_mib`` = peak minus RSS before). Agreement of the
    two fits' level-1 cells over all items: adjusted mutual information and adjusted Rand
    index (the pair-counting one: share of item pairs placed alike, chance-corrected),
    beside the same between two sample fits one seed apart (``sample_next_seed``: another
    sample and another k-means start), the agreement any refit has anyway.

    ``x``: the vectors to use instead of :func:`aligned_stand_in` (the unit test's tiny run).
    """
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

    from benchmarks.bench_scale import _peak_mib, _reset_peak
    from qarm_features.codes.rq import ResidualQuantizer
    from qarm_features.config import RQConfig
    from qarm_features.metrics import code_quality

    cfg = rq_cfg or RQConfig()
    t0 = time.perf_counter()
    if x is None:
        x = aligned_stand_in(n_items, seed=seed)
    gen_s = time.perf_counter() - t0
    n = len(x)
    fits: dict = {}
    level1 = {}
    runs = (("sample", "shipped", cfg.seed), ("full", None, cfg.seed),
            ("sample_next_seed", "shipped", cfg.seed + 1))  # fmt: skip
    for name, per_centroid, fit_seed in runs:
        kw = {} if per_centroid == "shipped" else {"max_points_per_centroid": per_centroid}
        rq = ResidualQuantizer(n_levels=cfg.n_levels, n_codes=cfg.n_codes, n_iter=cfg.n_iter,
                               seed=fit_seed, **kw)  # fmt: skip
        rss0 = _rss_mib()
        _reset_peak()
        w0, c0 = time.perf_counter(), time.process_time()
        with threads(n_threads):
            rq.fit(x)
        fit_s, fit_cpu = time.perf_counter() - w0, time.process_time() - c0
        peak = _peak_mib()
        with threads(n_threads):
            codes = rq.encode(x)
            per_level = rq.residual_energy_per_level(x)
        q = code_quality(codes, cfg.n_codes)
        fits[name] = {
            "seed": fit_seed,
            "fit_rows": int(rq.n_fit_rows_),
            "fit_seconds": fit_s,
            "fit_cpu_seconds": fit_cpu,
            "peak_rss_mib": peak,
            "rss_before_fit_mib": rss0,
            "fit_extra_mib": peak - rss0,
            "reconstruction_error": float(rq.reconstruction_error(x)),
            "residual_energy_per_level": per_level,
            "utilization": q["utilization"],
            "entropy": q["entropy"],
            "collision_rate": q["collision_rate"],
            "n_unique_tuples": q["n_unique_tuples"],
        }
        level1[name] = codes[:, 0]
        log.info("sample_vs_full %s: %s", name, fits[name])
    s, f = fits["sample"], fits["full"]
    return {
        "n_items": n,
        "dim": int(x.shape[1]),
        "rq": cfg.model_dump(),
        "threads": n_threads,
        "data_generation_s": gen_s,
        "aligned_space": "scale_world content (384-d) -> pipeline.align_catalog with a PCA "
        "projection to 64-d (top principal directions of 100k L2-normalised rows), unit norm",
        "fits": fits,
        "level1_ami": float(adjusted_mutual_info_score(level1["full"], level1["sample"])),
        "level1_ari": float(adjusted_rand_score(level1["full"], level1["sample"])),
        # The noise floor: two shipped sample fits one seed apart (other sample, other init).
        "level1_ami_sample_vs_next_seed": float(
            adjusted_mutual_info_score(level1["sample"], level1["sample_next_seed"])
        ),
        "level1_ari_sample_vs_next_seed": float(
            adjusted_rand_score(level1["sample"], level1["sample_next_seed"])
        ),
        "reconstruction_error_ratio_sample_over_full": ratio(
            s["reconstruction_error"], f["reconstruction_error"]
        ),
        "fit_seconds_ratio_full_over_sample": ratio(f["fit_seconds"], s["fit_seconds"]),
        "fit_cpu_ratio_full_over_sample": ratio(f["fit_cpu_seconds"], s["fit_cpu_seconds"]),
        "load_avg": [round(v, 2) for v in os.getloadavg()],
    }


def main(argv=None) -> None:
    """``python -m benchmarks.bench_rq --sample-vs-full [--n-items N] [--out PATH]``."""
    import argparse

    from benchmarks.timing import merge_results

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_rq")
    parser.add_argument(
        "--sample-vs-full",
        action="store_true",
        required=True,
        help="RQ codebooks on the shipped sample vs every item (1M by default)",
    )
    parser.add_argument("--n-items", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out",
        default="benchmarks/results/rq.json",
        help="results file; the figures go under its 'sample_vs_full' key",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = sample_vs_full(args.n_items, n_threads=args.threads)
    merge_results(args.out, {"sample_vs_full": res}, indent=2)  # as the suite writes rq.json
    print(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
