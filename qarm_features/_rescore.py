"""Row-independent float64 re-scoring, shared by the RQ and VQ coders.

Both coders promise that a row's codes depend on that row only, bit for bit, whatever else
is in the batch. Float32 GEMM/faiss scores move at the ulp level with the batch shape, so a
coder's fast float32 pass only *proposes*: it keeps its choice where the float32 gap to the
runner-up exceeds ``GUARD`` times a rigorous rounding-error bound (built from ``U``), and
re-scores the rows it cannot vouch for with :func:`dot64`, whose summation order is fixed
per row. The canonical choices built on it are stated in :mod:`qarm_features.quantize`
(RQ) and :mod:`qarm_features.vq` (VQ).

Serving-path module: imports numpy only.
"""

from __future__ import annotations

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
