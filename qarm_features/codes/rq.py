"""Residual k-means (RQ): semantic ids as ``L`` levels of ``K`` centroids.

:class:`ResidualQuantizer` learns ``L`` codebooks of ``K`` centroids with faiss k-means,
level ``l`` clustering the residual left by levels ``< l``, and encodes greedily level by
level. It follows the faiss contrib vocabulary (``fit``/train, ``encode``, ``decode``) and
keeps the coders' contract (:mod:`qarm_features.codes.rescore`): a row's codes depend on that
row only, bit for bit, whatever else is in the batch (the on-demand path encodes one row,
the batch path millions). The fast float32 pass only *proposes*: it keeps its choice where
a rigorous rounding-error bound proves the choice cannot differ from the canonical one, and
the few rows it cannot vouch for are re-scored in float64 with a fixed-order per-row
reduction. Canonical choice, for reference implementations:

* RQ, level ``l``: ``argmax_k  sum_t r[t] * C[l, k, t]  -  0.5 * ||C[l, k]||^2`` in float64
  (products summed in ``t`` order; i.e. the nearest centroid), ties to the lowest ``k``;
  the residual ``r <- r - C[l, code]`` is carried in float32.

The VQ coder (top-K pool neighbours) lives in :mod:`qarm_features.codes.vq`.

Serving-path module: imports numpy and faiss only, never torch.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from qarm_features._validate import check_embeddings, check_hyper
from qarm_features.codes.rescore import GUARD, U, dot64, map_row_blocks
from qarm_features.config import RQConfig
from qarm_features.errors import InputError, NotFittedError

__all__ = ["ResidualQuantizer"]

logger = logging.getLogger(__name__)

# Rows per fast-path block, as a (rows, K) float32 score block of ~4 MiB: small enough
# for the argmax passes to read it from cache, large enough that each multi-threaded BLAS
# call amortises its thread hand-off (1 MiB blocks are ~3% faster on one idle core but
# several times slower with 2 BLAS threads on a contended machine).
_BLOCK_BYTES = 4 << 20
# Doubtful rows re-encoded in float64 per batch (bounds the (rows, K) float64 scores).
_EXACT_ROWS = 4096
# Rows per k-means centroid (faiss' default cap); larger inputs are subsampled for fitting.
_MAX_POINTS_PER_CENTROID = 256


class _Level:
    """Precomputed tables for one codebook ``C`` of shape ``(K, d)``."""

    def __init__(self, c: np.ndarray):
        k, d = c.shape
        c64 = c.astype(np.float64)
        half_sq = 0.5 * dot64(c64, c64.T[:, :, None])[:, 0]  # fixed order, like the scores
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
        self.tol_scale = GUARD * (d + 3) * U


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
        max_points_per_centroid: k-means fits on a seeded sample of at most this many rows
            per centroid (faiss' default, 256: 16,384 rows at ``K = 64``); ``None`` fits on
            every row (what ``benchmarks.bench_rq --sample-vs-full`` compares against).

    Fitted attributes:
        codebooks_: ``(L, K, d)`` float32.
        dim_: ``d``.
        n_fit_rows_: rows k-means saw (``fit`` only; the subsample's size when capped).
    """

    def __init__(
        self,
        n_levels: int = 3,
        n_codes: int = 64,
        n_iter: int = 25,
        seed: int = 0,
        *,
        max_points_per_centroid: int | None = _MAX_POINTS_PER_CENTROID,
    ):
        self.n_levels = n_levels
        self.n_codes = n_codes
        self.n_iter = n_iter
        self.seed = seed
        self.max_points_per_centroid = max_points_per_centroid

    # ---- fitting ---------------------------------------------------------------------

    def fit(self, x, *, init_codebooks=None) -> ResidualQuantizer:
        """Fit the codebooks on ``x`` ``(n, d)``; returns ``self``.

        ``init_codebooks``: ``(L, K, d)`` centroids to start each level's k-means from (a
        warm start from the previous bundle's codebooks keeps codes stable across
        retrains); levels beyond its ``L`` start from k-means++ as usual.

        Needs ``n >= n_codes`` rows (k-means cannot place more centroids than points):
        fewer raise :class:`InputError`. Fewer than 39 rows per centroid is allowed but
        logged, as centroids then get noisy. Inputs larger than ``max_points_per_centroid``
        (256) rows per centroid are subsampled (seeded) for fitting, once, for all levels.
        """
        n_levels = check_hyper("n_levels", self.n_levels, 1)
        k = check_hyper("n_codes", self.n_codes, 2)
        n_iter = check_hyper("n_iter", self.n_iter, 1)
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
        per_centroid = self.max_points_per_centroid
        if per_centroid is None:
            per_centroid = -(-n // k)  # every row
        per_centroid = check_hyper("max_points_per_centroid", per_centroid, 1)
        cap = per_centroid * k
        if n > cap:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))
            x = x[rows]
        residual = x.copy()
        n_fit_rows = residual.shape[0]
        codebooks = np.empty((n_levels, k, d), np.float32)
        for level in range(n_levels):
            km = faiss.Kmeans(
                d,
                k,
                niter=n_iter,
                seed=seed + level,
                verbose=False,
                spherical=False,
                min_points_per_centroid=1,  # we log the few-points case ourselves
                max_points_per_centroid=per_centroid,  # faiss must not subsample again
            )
            init = None
            if init_codebooks is not None and level < len(init_codebooks):
                init = np.ascontiguousarray(init_codebooks[level], dtype=np.float32)
                if init.shape != (k, d):
                    raise InputError(
                        f"init_codebooks[{level}]: expected ({k}, {d}), got {init.shape}"
                    )
            km.train(residual, init_centroids=init)
            codebooks[level] = km.centroids
            if level + 1 < n_levels:
                lv = _Level(codebooks[level])
                codes = _encode_levels(residual, [lv])
                residual -= codebooks[level][codes[:, 0]]
        self._set_codebooks(codebooks)
        self.n_fit_rows_ = n_fit_rows
        return self

    @classmethod
    def from_config(cls, cfg: RQConfig) -> ResidualQuantizer:
        """An unfitted quantizer with ``cfg``'s settings."""
        return cls(n_levels=cfg.n_levels, n_codes=cfg.n_codes, n_iter=cfg.n_iter, seed=cfg.seed)

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

    def encode(self, x, *, n_workers: int | None = None) -> np.ndarray:
        """Greedy residual codes of ``x`` ``(n, d)`` -> ``(n, L)`` int64.

        Row-independent: ``encode(x)[i] == encode(x[i:i+1])[0]`` bit for bit. Large
        batches run on ``n_workers`` row-block threads (default: the BLAS thread budget)
        with BLAS at one thread (:func:`~qarm_features.codes.rescore.map_row_blocks`).
        """
        self._check_fitted()
        x = check_embeddings(x, name="x", dim=self.dim_)
        out = np.empty((x.shape[0], len(self._levels)), np.int64)

        def run(lo: int, hi: int) -> None:
            out[lo:hi] = _encode_levels(x[lo:hi], self._levels)

        map_row_blocks(run, x.shape[0], n_workers=n_workers)
        return out

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
            nrm2 = np.einsum("ij,ij->i", xb, xb).astype(np.float64) * (1.0 + 2 * (d + 1) * U)
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
                    nrm2 = np.maximum(nrm2 - 2.0 * top[:m] + 2.0 * tol, 0.0) * (1.0 + 4 * U)
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
    s64 = dot64(r.astype(np.float64), np.broadcast_to(lv.c64t[:, None, :], (d, n, k)))
    s64 -= lv.half_sq
    return s64.argmax(axis=1)  # the first maximum: exact ties go to the lowest code
