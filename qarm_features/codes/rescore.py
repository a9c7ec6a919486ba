"""Row-independent float64 re-scoring, shared by the RQ and VQ coders.

Both coders promise that a row's codes depend on that row only, bit for bit, whatever else
is in the batch. Float32 GEMM/faiss scores move at the ulp level with the batch shape, so a
coder's fast float32 pass only *proposes*: it keeps its choice where the float32 gap to the
runner-up exceeds ``GUARD`` times a rigorous rounding-error bound (built from ``U``), and
re-scores the rows it cannot vouch for with :func:`dot64`, whose summation order is fixed
per row. The canonical choices built on it are stated in :mod:`qarm_features.codes.rq`
(RQ) and :mod:`qarm_features.codes.vq` (VQ).

Also the batch path's row-block workers (:func:`map_row_blocks`), which the same contract
makes safe: a row's codes do not depend on the block it is computed in.

Serving-path module: imports numpy only (threadpoolctl when a batch call starts workers).
"""

from __future__ import annotations

import threading

import numpy as np

# Unit roundoff of float32. A float32 dot product of length n, in any summation order
# (BLAS kernels, faiss SIMD, FMA or not), is within n * U * sum|a_i * b_i| of the truth.
U = 2.0**-24
# The fast pass keeps its choice when the float32 gap to the runner-up exceeds
# GUARD * (that bound); 2 is the least that is sound, 4 leaves room for the float64
# re-scoring error and for the bound's own rounding.
GUARD = 4.0
# dot64 materialises the (d, n, c) products up to this many elements (8 MiB of float64).
_ACCUMULATE_MAX = 1 << 20


def dot64(x64: np.ndarray, cand_t: np.ndarray) -> np.ndarray:
    """Row-independent float64 inner products.

    Args:
        x64: ``(n, d)`` float64 queries.
        cand_t: ``(d, n, c)`` candidates, coordinate first (float32 or float64; float32
            widens exactly).

    Returns:
        ``(n, c)`` float64, ``out[i, j] = sum_t x64[i, t] * cand_t[t, i, j]`` summed in
        ``t`` order with one elementwise multiply and one add per term, so each value
        depends on its own inputs only (no BLAS, no pairwise/SIMD reduction trees).
    """
    xt = np.ascontiguousarray(x64.T)[:, :, None]  # (d, n, 1)
    if cand_t.size <= _ACCUMULATE_MAX:
        # Small inputs (request time: one row): one multiply and one ``add.accumulate``,
        # which is sequential in ``t`` by definition, so the values are bit for bit those
        # of the loop below; two numpy calls instead of 2 d (0.12 -> 0.02 ms per row).
        prod = np.multiply(xt, cand_t, dtype=np.float64)
        return np.add.accumulate(prod, axis=0)[-1]
    acc = np.multiply(xt[0], cand_t[0], dtype=np.float64)
    tmp = np.empty_like(acc)
    for t in range(1, cand_t.shape[0]):
        acc += np.multiply(xt[t], cand_t[t], out=tmp, dtype=np.float64)
    return acc


# ---------------------------------------------------------------------- row-block workers
# Batch calls of at least this many rows per worker are split over worker threads.
PARALLEL_MIN_ROWS = 16_384
_IN_WORKER = threading.local()


def default_workers() -> int:
    """The batch path's worker count: the BLAS thread budget, at most the usable CPUs.

    The process's BLAS thread setting is the budget the caller granted (``pin_threads(1)``
    on a server: 1, so no workers); row-block workers spend it better than BLAS does.
    """
    from threadpoolctl import threadpool_info

    from qarm_features.threads import usable_cpus

    cores = usable_cpus()  # affinity and cgroup quota, not the host's cores
    blas = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(1, min(cores, max(blas, default=cores)))


def in_worker() -> bool:
    """Whether the calling thread is one of :func:`map_row_blocks`' workers."""
    return bool(getattr(_IN_WORKER, "active", False))


def map_row_blocks(fn, n: int, *, block: int | None = None, n_workers: int | None = None):
    """Call ``fn(lo, hi)`` over row blocks of ``[0, n)``, on worker threads when it pays.

    Row-independent coders give the same rows whatever the split, so the batch path runs
    blocks on ``n_workers`` threads (default: :func:`default_workers`) with BLAS pinned to one
    thread inside them: BLAS at 2 threads ran RQ encode at 0.23x of 1 thread on a shared
    2-core machine, row-block workers at 0.96x of the best configuration. Calls smaller
    than two blocks (request time), ``n_workers=1`` and calls from inside a worker run
    ``fn(0, n)`` in the caller's thread, touching no thread setting. The BLAS limit is
    process-wide while workers run (threadpoolctl); ``fn`` sets per-thread OpenMP pools
    (faiss) itself.
    """
    block = PARALLEL_MIN_ROWS if block is None else max(1, int(block))
    if n < 2 * block or in_worker():
        fn(0, n)
        return
    workers = default_workers() if n_workers is None else max(1, int(n_workers))
    if workers == 1:
        fn(0, n)
        return
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    bounds = [(lo, min(lo + block, n)) for lo in range(0, n, block)]

    def run(bound):
        _IN_WORKER.active = True
        try:
            fn(*bound)
        finally:
            _IN_WORKER.active = False

    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(min(workers, len(bounds))) as ex:
        for _ in ex.map(run, bounds):  # re-raises a worker's exception
            pass
