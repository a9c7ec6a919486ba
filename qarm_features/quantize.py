"""Quantitative codes: residual k-means (RQ) and top-K pool neighbours (VQ).

:class:`ResidualQuantizer` learns ``L`` codebooks of ``K`` centroids with faiss k-means,
level ``l`` clustering the residual left by levels ``< l``, and encodes greedily level by
level. :class:`VQCoder` codes an item by the ids of its top-``k`` pool items by inner
product, itself excluded. Both follow the faiss contrib vocabulary (``fit``/train,
``encode``, ``decode``) and keep one contract: a row's codes depend on that row only, bit
for bit, whatever else is in the batch (the on-demand path encodes one row, the batch path
millions). Float32 GEMM/faiss results move at the ulp level with the batch shape, so the
fast float32 pass only *proposes*: it keeps its choice where a rigorous rounding-error
bound proves the choice cannot differ from the canonical one, and the few rows it cannot
vouch for are re-scored in float64 with a fixed-order per-row reduction. Canonical
choices, for reference implementations:

* RQ, level ``l``: ``argmax_k  sum_t r[t] * C[l, k, t]  -  0.5 * ||C[l, k]||^2`` in float64
  (products summed in ``t`` order; i.e. the nearest centroid), ties to the lowest ``k``;
  the residual ``r <- r - C[l, code]`` is carried in float32.
* VQ (exact mode): the ``k`` non-excluded pool items with the largest float64 inner
  product (summed in ``t`` order), ties to the lowest pool id.

Serving-path module: imports numpy and faiss only, never torch.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from qarm_features._validate import check_embeddings, check_ids
from qarm_features.errors import ConfigError, InputError, NotFittedError

__all__ = ["ResidualQuantizer", "VQCoder"]

logger = logging.getLogger(__name__)

# Unit roundoff of float32. A float32 dot product of length n, in any summation order
# (BLAS kernels, faiss SIMD, FMA or not), is within n * _U * sum|a_i * b_i| of the truth.
_U = 2.0**-24
# The fast pass keeps its choice when the float32 gap to the runner-up exceeds
# _GUARD * (that bound); 2 is the least that is sound, 4 leaves room for the float64
# re-scoring error and for the bound's own rounding.
_GUARD = 4.0
# Rows per fast-path block, as a (rows, K) float32 score block of ~4 MiB: small enough
# for the argmax passes to read it from cache, large enough that each multi-threaded BLAS
# call amortises its thread hand-off (1 MiB blocks are ~3% faster on one idle core but
# several times slower with 2 BLAS threads on a contended machine).
_BLOCK_BYTES = 4 << 20
# Doubtful rows re-encoded in float64 per batch (bounds the (rows, K) float64 scores).
_EXACT_ROWS = 4096
# VQ: candidates fetched beyond k + 1 (the query itself may be among them).
_VQ_MARGIN = 16
# VQ: queries per block: bounds the (d, rows, candidates) re-scoring gathers, and is
# large enough for faiss to take its BLAS path (small batches scan row by row, ~4x slower).
_VQ_CHUNK = 4096
# ANN recall is measured on this many pool items (at most) at fit time.
_RECALL_SAMPLE = 1000
# Rows per k-means centroid (faiss' default cap); larger inputs are subsampled for fitting.
_MAX_POINTS_PER_CENTROID = 256


def _dot64(x64: np.ndarray, cand_t: np.ndarray) -> np.ndarray:
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
    acc = np.multiply(xt[0], cand_t[0], dtype=np.float64)
    tmp = np.empty_like(acc)
    for t in range(1, cand_t.shape[0]):
        acc += np.multiply(xt[t], cand_t[t], out=tmp, dtype=np.float64)
    return acc


def _check_hyper(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------
# RQ
# --------------------------------------------------------------------------------------


class _Level:
    """Precomputed tables for one codebook ``C`` of shape ``(K, d)``."""

    def __init__(self, c: np.ndarray):
        k, d = c.shape
        c64 = c.astype(np.float64)
        half_sq = 0.5 * _dot64(c64, c64.T[:, :, None])[:, 0]  # fixed order, like the scores
        self.c64t = np.ascontiguousarray(c64.T)  # (d, K) for the float64 re-scoring
        self.half_sq = half_sq  # (K,) float64
        # Augmented weights: [r, 1] @ w = r . c - 0.5 ||c||^2, the bias folded in the GEMM.
        self.w = np.empty((d + 1, k), np.float32)
        self.w[:d] = c.T
        self.w[d] = -half_sq.astype(np.float32)
        # Centroids padded to the residual buffer's row width (zeros keep the 1 column).
        self.cpad = np.zeros((k, _padded_width(d)), np.float32)
        self.cpad[:, :d] = c
        # Error bound of one float32 score: (d + 1)-term dot (incl. the bias) plus the
        # bias' own rounding, relative to ||r|| * max||c|| + max(0.5 ||c||^2).
        self.cmax = float(np.sqrt(half_sq.max() * 2.0))
        self.hmax = float(half_sq.max())
        self.tol_scale = _GUARD * (d + 3) * _U


def _padded_width(d: int) -> int:
    # Room for the residual (d), the constant 1 (bias column), then a 64-byte multiple.
    return (d + 1 + 15) // 16 * 16


def _block_rows(k: int) -> int:
    return int(min(16384, max(256, _BLOCK_BYTES // (4 * k))))


class ResidualQuantizer:
    """Residual k-means: ``n_levels`` codebooks of ``n_codes`` centroids.

    Args:
        n_levels: ``L``, number of levels (codes per item).
        n_codes: ``K``, centroids per level.
        n_iter: faiss k-means iterations per level.
        seed: k-means seed (level ``l`` uses ``seed + l``) and fitting-subsample seed.

    Fitted attributes:
        codebooks_: ``(L, K, d)`` float32.
        dim_: ``d``.
    """

    def __init__(self, n_levels: int = 3, n_codes: int = 64, n_iter: int = 25, seed: int = 0):
        self.n_levels = n_levels
        self.n_codes = n_codes
        self.n_iter = n_iter
        self.seed = seed

    # ---- fitting ---------------------------------------------------------------------

    def fit(self, x) -> ResidualQuantizer:
        """Fit the codebooks on ``x`` ``(n, d)``; returns ``self``.

        Needs ``n >= n_codes`` rows (k-means cannot place more centroids than points):
        fewer raise :class:`InputError`. Fewer than 39 rows per centroid is allowed but
        logged, as centroids then get noisy. Inputs larger than 256 rows per centroid are
        subsampled (seeded) for fitting, once, for all levels.
        """
        n_levels = _check_hyper("n_levels", self.n_levels, 1)
        k = _check_hyper("n_codes", self.n_codes, 2)
        n_iter = _check_hyper("n_iter", self.n_iter, 1)
        seed = int(self.seed)
        x = check_embeddings(x, name="x")
        n, d = x.shape
        if n < k:
            raise InputError(
                f"x: {n} rows cannot fit {k} centroids per level; pass at least {k} rows "
                f"(ideally >= {39 * k}) or lower n_codes"
            )
        if n < 39 * k:
            logger.info("RQ fit: %d rows for %d centroids (< 39 per centroid)", n, k)
        cap = _MAX_POINTS_PER_CENTROID * k
        if n > cap:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))
            x = x[rows]
        residual = x.copy()
        codebooks = np.empty((n_levels, k, d), np.float32)
        for level in range(n_levels):
            km = faiss.Kmeans(
                d, k, niter=n_iter, seed=seed + level, verbose=False, spherical=False,
                min_points_per_centroid=1,  # we log the few-points case ourselves
                max_points_per_centroid=_MAX_POINTS_PER_CENTROID,
            )
            km.train(residual)
            codebooks[level] = km.centroids
            if level + 1 < n_levels:
                lv = _Level(codebooks[level])
                codes = _encode_levels(residual, [lv])
                residual -= codebooks[level][codes[:, 0]]
        self._set_codebooks(codebooks)
        return self

    @classmethod
    def from_codebooks(cls, codebooks) -> ResidualQuantizer:
        """Rebuild a fitted quantizer from saved ``(L, K, d)`` codebooks."""
        try:
            cb = np.asarray(codebooks, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InputError(f"codebooks: cannot convert to a float32 array ({exc})") from None
        if cb.ndim != 3 or 0 in cb.shape:
            raise InputError(f"codebooks: expected a non-empty (L, K, d) array, got {cb.shape}")
        if not np.isfinite(cb).all():
            raise InputError("codebooks: hold NaN or inf; the file is corrupt")
        rq = cls(n_levels=cb.shape[0], n_codes=cb.shape[1])
        rq._set_codebooks(np.array(cb, dtype=np.float32, order="C"))
        return rq

    def _set_codebooks(self, codebooks: np.ndarray) -> None:
        self.codebooks_ = codebooks
        self.dim_ = int(codebooks.shape[2])
        self._levels = [_Level(c) for c in codebooks]

    def _check_fitted(self) -> None:
        if not hasattr(self, "codebooks_"):
            raise NotFittedError(
                "ResidualQuantizer is not fitted; call fit(x) or from_codebooks(codebooks)"
            )

    # ---- encode / decode -------------------------------------------------------------

    def encode(self, x) -> np.ndarray:
        """Greedy residual codes of ``x`` ``(n, d)`` -> ``(n, L)`` int64.

        Row-independent: ``encode(x)[i] == encode(x[i:i+1])[0]`` bit for bit.
        """
        self._check_fitted()
        x = check_embeddings(x, name="x", dim=self.dim_)
        return _encode_levels(x, self._levels)

    def decode(self, codes) -> np.ndarray:
        """Sum of the coded centroids, ``(n, L)`` codes -> ``(n, d)`` float32.

        Summed in level order in float32: ``C[0][c0] + C[1][c1] + ...``.
        """
        self._check_fitted()
        codes = self._check_codes(codes)
        cb = self.codebooks_
        out = cb[0][codes[:, 0]]
        for level in range(1, cb.shape[0]):
            out += cb[level][codes[:, level]]
        return out

    def _check_codes(self, codes) -> np.ndarray:
        n_levels, k = self.codebooks_.shape[:2]
        arr = np.asarray(codes)
        if arr.ndim != 2 or arr.shape[1] != n_levels:
            raise InputError(f"codes: expected shape (n, {n_levels}), got {arr.shape}")
        if arr.shape[0] == 0:
            raise InputError("codes: is empty (0 rows); pass at least one row")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"codes: must be integers, got dtype {arr.dtype}")
        bad = (arr < 0) | (arr >= k)
        if bad.any():
            row, level = (int(v[0]) for v in np.nonzero(bad))
            raise InputError(
                f"codes: {int(bad.sum())} value(s) outside [0, {k}) (first: {int(arr[row, level])} "
                f"at row {row}, level {level}); were they made by another codebook?"
            )
        return arr.astype(np.int64, copy=False)

    # ---- quality ---------------------------------------------------------------------

    def reconstruction_error(self, x) -> float:
        """``sum ||x - decode(encode(x))||^2 / sum ||x||^2`` (float64 accumulation)."""
        self._check_fitted()
        x = check_embeddings(x, name="x", dim=self.dim_)
        energy = _energy(x)
        if energy == 0.0:
            raise InputError("x: all rows are zero; the relative error is undefined")
        diff = x.astype(np.float64) - self.decode(self.encode(x))
        return _energy(diff) / energy

    def residual_energy_per_level(self, x) -> list[float]:
        """Relative residual energy after each level: ``[E_1, ..., E_L]``.

        ``E_l = sum ||r_l||^2 / sum ||x||^2`` with ``r_l`` the float32 residual the encoder
        carries after ``l`` levels (``E_L`` equals :meth:`reconstruction_error` up to the
        float32 order of subtraction).
        """
        self._check_fitted()
        x = check_embeddings(x, name="x", dim=self.dim_)
        energy = _energy(x)
        if energy == 0.0:
            raise InputError("x: all rows are zero; the relative error is undefined")
        codes = _encode_levels(x, self._levels)
        r = x.copy()
        out = []
        for level, cb in enumerate(self.codebooks_):
            r -= cb[codes[:, level]]
            out.append(_energy(r) / energy)
        return out


def _energy(a: np.ndarray) -> float:
    a64 = a.astype(np.float64, copy=False)
    return float(np.einsum("ij,ij->", a64, a64))


def _encode_levels(x: np.ndarray, levels: list[_Level]) -> np.ndarray:
    """Greedy codes of float32 ``x`` ``(n, d)`` over ``levels`` -> ``(n, L)`` int64.

    Fast path: cache-sized blocks of rows run all levels (per level one GEMM and two
    argmax passes). A row whose float32 winner the guard cannot vouch for at any level is
    recomputed at the end, every level, by the float64 canonical path (~0.1% of rows).
    """
    n, d = x.shape
    k = levels[0].w.shape[1]
    n_levels = len(levels)
    block = min(_block_rows(k), n)
    codes = np.empty((n, n_levels), np.int64)
    # Residual rows [r, 1, 0...]: column d folds the -0.5||c||^2 bias into the GEMM.
    r = np.zeros((block, _padded_width(d)), np.float32)
    r[:, d] = 1.0
    s = np.empty((block, k), np.float32)
    row_start = np.arange(0, block * k, k)  # flat offset of each score row
    best = np.empty(block, np.int64)
    top = np.empty(block, np.float32)
    second = np.empty(block, np.float32)
    doubtful = []
    with np.errstate(invalid="ignore", over="ignore"):  # overflowing rows are doubtful
        for lo in range(0, n, block):
            hi = min(lo + block, n)
            m = hi - lo
            rb, sb, xb = r[:m], s[:m], x[lo:hi]
            rb[:, :d] = xb
            # An upper bound on ||r||^2 (a float32 sum of squares, in whatever order).
            nrm2 = np.einsum("ij,ij->i", xb, xb).astype(np.float64) * (1.0 + 2 * (d + 1) * _U)
            doubt = np.zeros(m, bool)
            for li, lv in enumerate(levels):
                np.matmul(rb[:, : d + 1], lv.w, out=sb)  # the hot path: one float32 GEMM
                _top2(sb, row_start[:m], best[:m], top[:m], second[:m])
                codes[lo:hi, li] = best[:m]
                # Keep the float32 winner only where it leads the runner-up by more than
                # twice the worst rounding error: no rounding can change the canonical
                # argmax there. `not >` also flags NaN (overflow).
                tol = lv.tol_scale * (np.sqrt(nrm2) * lv.cmax + lv.hmax)
                doubt |= ~(np.subtract(top[:m], second[:m], dtype=np.float64) > tol)
                if li + 1 < n_levels:
                    np.subtract(rb, np.take(lv.cpad, best[:m], axis=0), out=rb)
                    # ||r - c||^2 = ||r||^2 - 2 (r.c - 0.5||c||^2); top is within tol / 2
                    # of r.c - 0.5||c||^2; the float32 subtraction rounds each component.
                    nrm2 = np.maximum(nrm2 - 2.0 * top[:m] + 2.0 * tol, 0.0) * (1.0 + 4 * _U)
            if doubt.any():
                doubtful.append(lo + np.flatnonzero(doubt))
    if doubtful:
        rows = np.concatenate(doubtful)
        for i in range(0, rows.size, _EXACT_ROWS):
            sel = rows[i : i + _EXACT_ROWS]
            codes[sel] = _encode_exact(x[sel], levels)
    return codes


def _encode_exact(x: np.ndarray, levels: list[_Level]) -> np.ndarray:
    """The canonical greedy codes, float64 scores at every level (slow; few rows)."""
    d = x.shape[1]
    r = x.copy()
    codes = np.empty((x.shape[0], len(levels)), np.int64)
    for li, lv in enumerate(levels):
        codes[:, li] = b = _nearest64(r, lv)
        r -= lv.cpad[b, :d]
    return codes


def _top2(s: np.ndarray, row_start: np.ndarray, best, top, second) -> None:
    """Per row of ``s`` ``(m, K)``: argmax into ``best``, max into ``top``, runner-up value
    into ``second`` (``s`` is clobbered)."""
    flat = s.reshape(-1)
    b = s.argmax(axis=1)
    best[:] = b
    lin = row_start + b
    flat.take(lin, out=top)
    flat.put(lin, -np.inf)
    flat.take(row_start + s.argmax(axis=1), out=second)


def _nearest64(r: np.ndarray, lv: _Level) -> np.ndarray:
    """Canonical nearest centroid of float32 residual rows ``r`` ``(n, d)`` (float64 scores)."""
    n, d = r.shape
    k = lv.half_sq.shape[0]
    s64 = _dot64(r.astype(np.float64), np.broadcast_to(lv.c64t[:, None, :], (d, n, k)))
    s64 -= lv.half_sq
    return s64.argmax(axis=1)  # the first maximum: exact ties go to the lowest code


# --------------------------------------------------------------------------------------
# VQ
# --------------------------------------------------------------------------------------


class VQCoder:
    """Top-``k`` nearest pool items (inner product) as codes, the item itself excluded.

    Args:
        k: codes per item (paper: 25).
        exact_max_pool: pools up to this size use exact search (row-independent, bit
            exact); larger pools use the faiss ANN index ``ann_index``.
        ann_index: faiss ``index_factory`` string for large pools (inner-product metric).
        ann_ef_search: HNSW ``efSearch`` (ignored by index types without it).
        seed: seed of the recall-measurement sample.

    Fitted attributes:
        pool_emb_: ``(N, d)`` float32. pool_ids_: ``(N,)`` int64. dim_: ``d``.
        mode_: ``"exact"`` or ``"ann"``. index_: the faiss index searched for candidates.
        ann_recall_: recall@k of the ANN index against exact search on a sample of up to
            1000 pool items (self excluded), measured at fit; ``None`` in exact mode.
    """

    def __init__(
        self,
        k: int = 25,
        exact_max_pool: int = 50_000,
        ann_index: str = "HNSW32",
        ann_ef_search: int = 128,
        seed: int = 0,
    ):
        self.k = k
        self.exact_max_pool = exact_max_pool
        self.ann_index = ann_index
        self.ann_ef_search = ann_ef_search
        self.seed = seed

    def fit(self, pool_emb, pool_ids) -> VQCoder:
        """Index the pool ``(N, d)`` with unique int64 ids ``(N,)``; returns ``self``."""
        k = _check_hyper("k", self.k, 1)
        exact_max = _check_hyper("exact_max_pool", self.exact_max_pool, 1)
        ef = _check_hyper("ann_ef_search", self.ann_ef_search, 1)
        pool = check_embeddings(pool_emb, name="pool_emb")
        ids = check_ids(pool_ids, name="pool_ids", n=pool.shape[0])
        n, d = pool.shape
        if n < k + 1:
            raise InputError(
                f"pool_emb: {n} pool items cannot give {k} codes with the item itself "
                f"excluded; pass at least {k + 1} items or lower k"
            )
        self.pool_emb_, self.pool_ids_, self.dim_ = pool, ids, d
        self._pool_t = np.ascontiguousarray(pool.T)  # (d, N): coordinate-first gathers
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        pool64 = pool.astype(np.float64)
        self._pool_norm_max = float(np.sqrt(np.einsum("ij,ij->i", pool64, pool64).max()))
        flat = faiss.IndexFlatIP(d)
        flat.add(pool)
        if n <= exact_max:
            self.mode_, self.index_, self.ann_recall_ = "exact", flat, None
            return self
        try:
            index = faiss.index_factory(d, self.ann_index, faiss.METRIC_INNER_PRODUCT)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"ann_index: faiss cannot build {self.ann_index!r} ({exc})") from None
        # One thread while building: a multi-threaded HNSW insert order is not deterministic,
        # and every process (batch job, feature server) rebuilds this index from the saved
        # pool; single-threaded builds give the same graph, hence the same codes, everywhere.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            if not index.is_trained:
                index.train(pool)
            index.add(pool)
        finally:
            faiss.omp_set_num_threads(threads)
        if "HNSW" in self.ann_index.upper():
            faiss.ParameterSpace().set_index_parameter(index, "efSearch", ef)
        self.mode_, self.index_ = "ann", index
        # Recall@k of the ANN path against the exact path on a seeded sample of the pool.
        rng = np.random.default_rng(int(self.seed))
        sample = np.sort(rng.choice(n, size=min(_RECALL_SAMPLE, n), replace=False))
        got = self._encode_block(pool[sample], ids[sample], index, guarded=False)
        want = self._encode_block(pool[sample], ids[sample], flat, guarded=True)
        hits = [np.intersect1d(g[g >= 0], w).size for g, w in zip(got, want)]
        self.ann_recall_ = float(np.mean(hits) / k)
        logger.info("VQ ANN %s: recall@%d = %.4f on %d pool items", self.ann_index, k,
                    self.ann_recall_, sample.size)
        return self

    @classmethod
    def from_pool(cls, pool_emb, pool_ids, **kw) -> VQCoder:
        """Build and fit a coder on a saved pool: ``VQCoder(**kw).fit(pool_emb, pool_ids)``."""
        return cls(**kw).fit(pool_emb, pool_ids)

    def encode(self, x, exclude_ids=None) -> np.ndarray:
        """Top-``k`` pool ids of ``x`` ``(n, d)`` by descending inner product -> ``(n, k)`` int64.

        Args:
            x: query embeddings ``(n, d)``.
            exclude_ids: ``(n,)`` id to leave out per row (the query item's own id);
                ``-1`` or an id not in the pool excludes nothing. ``None``: nothing.

        Ties order by the lowest pool id. Exact mode is row-independent bit for bit; ANN
        (HNSW) mode is row-independent too, as HNSW searches each query on its own, but
        may miss true neighbours (see ``ann_recall_``). Rows an ANN index returns fewer
        than ``k`` candidates for are padded with ``-1``.
        """
        if not hasattr(self, "index_"):
            raise NotFittedError("VQCoder is not fitted; call fit(pool_emb, pool_ids) or from_pool")
        x = check_embeddings(x, name="x", dim=self.dim_)
        if exclude_ids is None:
            ex = np.full(x.shape[0], -1, np.int64)
        else:
            ex = check_ids(exclude_ids, name="exclude_ids", n=x.shape[0], unique=False)
        out = np.empty((x.shape[0], int(self.k)), np.int64)
        for start in range(0, x.shape[0], _VQ_CHUNK):
            stop = min(start + _VQ_CHUNK, x.shape[0])
            out[start:stop] = self._encode_block(
                x[start:stop], ex[start:stop], self.index_, guarded=self.mode_ == "exact"
            )
        return out

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """Pool row of each id to exclude; ``-1`` for ``-1`` and for ids not in the pool."""
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.minimum(pos, self._sorted_ids.size - 1)
        found = (self._sorted_ids[pos] == ids) & (ids != -1)
        return np.where(found, self._order[pos], -1)

    def _encode_block(self, x, exclude_ids, index, *, guarded: bool) -> np.ndarray:
        k, n_pool = int(self.k), self.pool_emb_.shape[0]
        ex = self._positions(exclude_ids)
        c = min(n_pool, k + 1 + _VQ_MARGIN)
        dist, cand = index.search(x, c)  # float32 candidates, descending
        x64 = x.astype(np.float64)
        doubtful = np.empty(0, np.int64)
        if guarded and c < n_pool:
            # t: the k-th largest float32 score among non-excluded candidates; every item
            # outside the list scores <= dist[:, -1]. If that is below t by more than the
            # tolerance, no outside item can reach the float64 top-k.
            excluded_early = (cand[:, :k] == ex[:, None]).any(axis=1)
            t = np.where(excluded_early, dist[:, k], dist[:, k - 1]).astype(np.float64)
            tol = self._tol(x64)
            doubtful = np.flatnonzero(~(dist[:, -1] < t - tol))
        valid = (cand >= 0) & (cand != ex[:, None])
        safe = np.where(cand >= 0, cand, 0)
        s64 = _dot64(x64, np.take(self._pool_t, safe, axis=1))
        out = self._top_k(s64, safe, valid)
        for i in doubtful:
            out[i] = self._top_k_full(x[i], x64[i], ex[i])
        return out

    def _tol(self, x64: np.ndarray) -> np.ndarray:
        d = self.dim_
        return _GUARD * (d + 2) * _U * np.sqrt(np.einsum("ij,ij->i", x64, x64)) * (
            self._pool_norm_max
        )

    def _top_k(self, s64: np.ndarray, rows: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """First ``k`` of each row's candidates by (score desc, pool id asc); -1 pads."""
        k = int(self.k)
        ids = self.pool_ids_[rows]
        neg = np.where(valid, -s64, np.inf)
        order = np.lexsort((ids, neg), axis=-1)[:, :k]
        out = np.take_along_axis(ids, order, axis=1)
        out[~np.take_along_axis(valid, order, axis=1)] = -1
        return out

    def _top_k_full(self, x32: np.ndarray, x64: np.ndarray, ex: int) -> np.ndarray:
        """One row against the whole pool (the rare rows the guard could not vouch for)."""
        k = int(self.k)
        s32 = (x32 @ self._pool_t).astype(np.float64)  # any float32 order: within tol / 2
        if ex >= 0:
            s32[ex] = -np.inf
        t = np.partition(s32, s32.size - k)[s32.size - k]
        tol = self._tol(x64[None])[0]
        rows = np.flatnonzero(s32 >= t - tol)
        s64 = _dot64(x64[None], self._pool_t[:, None, rows])
        return self._top_k(s64, rows[None], np.ones_like(s64, dtype=bool))[0]
