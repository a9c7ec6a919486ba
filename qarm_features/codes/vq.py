"""Top-K pool neighbours (VQ): an item coded by the ids of its nearest pool items.

:class:`VQCoder` codes an item by the ids of its top-``k`` pool items by inner product,
itself excluded (QARM's VQ codes). Small pools are searched exactly, large ones through a
faiss ANN index. Exact mode keeps the coders' contract (:mod:`qarm_features.codes.rescore`): a
row's codes depend on that row only, bit for bit, whatever else is in the batch; float32
faiss candidates are re-scored in float64 with a fixed-order per-row reduction, and a row
whose candidate list a rounding-error bound cannot vouch for is searched against the whole
pool. Canonical choice, for reference implementations:

* VQ (exact mode): the ``k`` non-excluded pool items with the largest float64 inner
  product (summed in ``t`` order), ties to the lowest pool id.
* VQ (IVF mode, large pools): the same choice among the items of the ``nprobe`` inverted
  lists whose centroids have the largest float64 inner product with the row (ties to the
  lowest list id; the float32 pass proposes ``k + 1 + 16`` candidates from those lists
  and they are re-scored in float64), so IVF codes are row-independent too. Two limits:
  they may miss true neighbours outside those lists (``ann_recall_`` measures how often),
  and where more list items than the candidates tie within float32 rounding of the k-th,
  the float32 proposal decides among them (no whole-list float64 guard, unlike exact mode).

Serving-path module: imports numpy and faiss only, never torch.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from qarm_features._validate import check_embeddings, check_hyper, check_ids
from qarm_features.codes.rescore import GUARD, U, dot64, in_worker, map_row_blocks
from qarm_features.config import VQConfig
from qarm_features.errors import ConfigError, InputError, NotFittedError

__all__ = ["VQCoder"]

logger = logging.getLogger(__name__)

# Candidates fetched beyond k + 1 (the query itself may be among them).
_VQ_MARGIN = 16
# Queries per block: bounds the (d, rows, candidates) re-scoring gathers, and is
# large enough for faiss to take its BLAS path (small batches scan row by row, ~4x slower).
_VQ_CHUNK = 4096
# IVF mode: rows are probed this many at a time and searched in the order of their
# lists, so rows that scan the same inverted lists run one after the other while those
# lists are still in cache. The scan is memory-bound (a 100k x 64 pool is 25 MiB; one
# row's 16 lists ~400 KiB): in list order faiss's scan ran ~1.5-1.8x faster than in
# catalog order at 4096-16384 rows. Codes do not change: each row is searched on its own,
# whatever its neighbours.
_VQ_SORT_WINDOW = 16_384
# ANN recall is measured on this many pool items (at most) at fit time.
_RECALL_SAMPLE = 1000


def _norm_max(x: np.ndarray, chunk: int = 65_536) -> float:
    """Largest float64 row norm of ``x``, chunk by chunk (no float64 copy of a large pool)."""
    best = 0.0
    for a in range(0, x.shape[0], chunk):
        x64 = x[a : a + chunk].astype(np.float64)
        best = max(best, float(np.einsum("ij,ij->i", x64, x64).max()))
    return float(np.sqrt(best))


class VQCoder:
    """Top-``k`` nearest pool items (inner product) as codes, the item itself excluded.

    Args:
        k: codes per item (paper: 25).
        exact_max_pool: pools up to this size use exact search (row-independent, bit
            exact); larger pools use the faiss ANN index ``ann_index``.
        ann_index: faiss ``index_factory`` string for large pools (inner-product metric).
            ``"IVF<nlist>,Flat"`` is searched row-independently (see the module docstring);
            IVF1024,Flat at nprobe 16 measured recall@25 0.99998 at 3.5x HNSW32's
            throughput on a 100k pool (benchmarks/bench_batch.py); at nprobe 8, 0.9997
            (``VQConfig.ann_nprobe``).
        ann_ef_search: HNSW ``efSearch`` (ignored by index types without it).
        ann_nprobe: inverted lists searched per row by IVF indexes (the first try).
        ann_min_recall: a freshly built IVF index doubles its ``nprobe`` (up to every list)
            until the recall it measures reaches this floor (``None``: keep
            ``ann_nprobe``). The probe count a pool needs grows with the pool (IVF1024 at
            nprobe 8: recall@25 0.9997 on a 100k pool, 0.959 on a 1M one). The chosen
            ``nprobe`` is stored in the exported index; a loaded index keeps its own.
        seed: seed of the recall-measurement sample.

    Fitted attributes:
        pool_emb_: ``(N, d)`` float32. pool_ids_: ``(N,)`` int64. dim_: ``d``.
        mode_: ``"exact"`` or ``"ann"``. index_: the faiss index searched for candidates.
        ann_recall_: recall@k of the ANN index against exact search on a sample of up to
            1000 pool items (self excluded), measured at fit; ``None`` in exact mode and
            for a loaded index (``fit(..., index=...)``).
        nprobe_: the IVF lists probed per row (after the recall floor; a loaded index's
            own); ``None`` when the index is not IVF.
    """

    def __init__(
        self,
        k: int = 25,
        exact_max_pool: int = 50_000,
        ann_index: str = "IVF1024,Flat",
        ann_ef_search: int = 128,
        seed: int = 0,
        ann_nprobe: int = 8,
        ann_min_recall: float | None = None,
    ):
        self.k = k
        self.exact_max_pool = exact_max_pool
        self.ann_index = ann_index
        self.ann_ef_search = ann_ef_search
        self.seed = seed
        self.ann_nprobe = ann_nprobe
        self.ann_min_recall = ann_min_recall

    def fit(self, pool_emb, pool_ids, *, index: np.ndarray | None = None) -> VQCoder:
        """Index the pool ``(N, d)`` with unique int64 ids ``(N,)``; returns ``self``.

        Args:
            index: an ANN index trained on this very pool, as :meth:`export_index` gave
                it (a bundle stores it): it is loaded instead of trained and filled
                again, and ``ann_recall_`` is not re-measured (``None``; the build
                recorded it). Ignored in exact mode.

        Raises:
            InputError: ``index`` is not a faiss index of this pool (size, width, metric
                or type differ from ``ann_index``).
        """
        k = check_hyper("k", self.k, 1)
        exact_max = check_hyper("exact_max_pool", self.exact_max_pool, 1)
        ef = check_hyper("ann_ef_search", self.ann_ef_search, 1)
        nprobe = check_hyper("ann_nprobe", self.ann_nprobe, 1)
        floor = self.ann_min_recall
        if floor is not None and not 0.0 < float(floor) <= 1.0:
            raise ConfigError(f"ann_min_recall: must be in (0, 1] or None, got {floor}")
        pool = check_embeddings(pool_emb, name="pool_emb")
        ids = check_ids(pool_ids, name="pool_ids", n=pool.shape[0])
        n, d = pool.shape
        if n < k + 1:
            raise InputError(
                f"pool_emb: {n} pool items cannot give {k} codes with the item itself "
                f"excluded; pass at least {k + 1} items or lower k"
            )
        self.pool_emb_, self.pool_ids_, self.dim_ = pool, ids, d
        self._ivf = None  # the IVF index searched by canonical lists (IVF mode only)
        self.nprobe_ = None
        self._pool_t = np.ascontiguousarray(pool.T)  # (d, N): coordinate-first gathers
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        self._pool_norm_max = _norm_max(pool)
        if n <= exact_max:
            flat = faiss.IndexFlatIP(d)
            flat.add(pool)
            self.mode_, self.index_, self.ann_recall_ = "exact", flat, None
            return self
        try:
            empty = faiss.index_factory(d, self.ann_index, faiss.METRIC_INNER_PRODUCT)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"ann_index: faiss cannot build {self.ann_index!r} ({exc})") from None
        loaded = index is not None
        ann = self._load_index(index, empty, n) if loaded else self._build_index(empty, pool)
        if "HNSW" in self.ann_index.upper():
            faiss.ParameterSpace().set_index_parameter(ann, "efSearch", ef)
        if isinstance(faiss.downcast_index(ann), faiss.IndexIVF):
            ivf = faiss.downcast_index(ann)
            if not loaded:  # a stored index keeps the nprobe its codes were made with
                ivf.nprobe = min(nprobe, ivf.nlist)
            coarse = faiss.downcast_index(ivf.quantizer).reconstruct_n(0, ivf.nlist)
            self._ivf = ivf
            self._coarse = np.ascontiguousarray(coarse, dtype=np.float32)  # (nlist, d)
            self._coarse_t = np.ascontiguousarray(self._coarse.T)
            self._coarse_index = faiss.IndexFlatIP(d)  # the float32 proposal of _probe
            self._coarse_index.add(self._coarse)
            c64 = self._coarse.astype(np.float64)
            self._coarse_norm_max = float(np.sqrt(np.einsum("ij,ij->i", c64, c64).max()))
        self.mode_, self.index_, self.ann_recall_ = "ann", ann, None
        if not loaded:
            self.ann_recall_ = self._fit_recall(pool, ids, floor)
        if self._ivf is not None:
            self.nprobe_ = int(self._ivf.nprobe)
        return self

    def _build_index(self, index, pool: np.ndarray):
        """Train and fill ``index`` on the pool with one faiss thread.

        One thread while building: a multi-threaded HNSW insert order is not deterministic;
        single-threaded builds give the same graph, hence the same codes, everywhere.
        """
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            if not index.is_trained:
                index.train(pool)
            index.add(pool)
        finally:
            faiss.omp_set_num_threads(threads)
        return index

    def _load_index(self, blob, empty, n: int):
        """A stored index (``uint8`` serialized faiss index), checked against this pool."""
        blob = np.ascontiguousarray(np.asarray(blob).reshape(-1))
        if blob.dtype != np.uint8:
            raise InputError(f"index: expected uint8 bytes (export_index), got {blob.dtype}")
        try:
            index = faiss.deserialize_index(blob)
        except RuntimeError as exc:
            raise InputError(f"index: not a serialized faiss index ({exc!s:.200})") from None
        want, got = type(faiss.downcast_index(empty)), type(faiss.downcast_index(index))
        found = (got, index.ntotal, index.d, index.metric_type)
        if found != (want, n, self.dim_, faiss.METRIC_INNER_PRODUCT):
            raise InputError(
                f"index: a {got.__name__} of {index.ntotal} x {index.d} (metric "
                f"{index.metric_type}); this pool needs a {want.__name__} ({self.ann_index!r}) "
                f"of {n} x {self.dim_}, inner product: rebuild the bundle"
            )
        return index

    def _fit_recall(self, pool: np.ndarray, ids: np.ndarray, floor: float | None) -> float:
        """Recall@k of the ANN path against the exact path on a seeded sample of the pool;
        an IVF index below ``floor`` doubles its ``nprobe`` (up to every list) and measures
        again. The exact answers are computed once."""
        n, k = pool.shape[0], int(self.k)
        flat = faiss.IndexFlatIP(self.dim_)
        flat.add(pool)
        rng = np.random.default_rng(int(self.seed))
        sample = np.sort(rng.choice(n, size=min(_RECALL_SAMPLE, n), replace=False))
        want = self._encode_block(pool[sample], ids[sample], flat, guarded=True)
        del flat
        while True:
            got = self._encode_block(pool[sample], ids[sample], self.index_, guarded=False)
            hits = [np.intersect1d(g[g >= 0], w).size for g, w in zip(got, want)]
            recall = float(np.mean(hits) / k)
            ivf = self._ivf
            logger.info(
                "VQ ANN %s%s: recall@%d = %.4f on %d pool items", self.ann_index,
                "" if ivf is None else f" (nprobe {ivf.nprobe})", k, recall, sample.size,
            )
            if ivf is None or floor is None or recall >= floor or ivf.nprobe >= ivf.nlist:
                return recall
            ivf.nprobe = min(2 * ivf.nprobe, ivf.nlist)

    def export_index(self) -> np.ndarray | None:
        """The ANN index as ``uint8`` bytes (``faiss.serialize_index``) for :meth:`fit`'s
        ``index``; ``None`` in exact mode (nothing to store: the flat search is the pool)."""
        if not hasattr(self, "index_"):
            raise NotFittedError("VQCoder is not fitted; call fit(pool_emb, pool_ids) or from_pool")
        if self.mode_ != "ann":
            return None
        return np.ascontiguousarray(faiss.serialize_index(self.index_), dtype=np.uint8)

    @classmethod
    def from_config(cls, cfg: VQConfig, *, k: int | None = None) -> VQCoder:
        """An unfitted coder with ``cfg``'s settings (``k``: another top-K, e.g. a
        bundle's own ``vq_k``)."""
        return cls(
            k=cfg.k if k is None else k,
            exact_max_pool=cfg.exact_max_pool,
            ann_index=cfg.ann_index,
            ann_ef_search=cfg.ann_ef_search,
            ann_nprobe=cfg.ann_nprobe,
            ann_min_recall=cfg.ann_min_recall,
            seed=cfg.seed,
        )

    @classmethod
    def from_pool(cls, pool_emb, pool_ids, *, index=None, **kw) -> VQCoder:
        """A coder on a saved pool: ``VQCoder(**kw).fit(pool_emb, pool_ids, index=index)``."""
        return cls(**kw).fit(pool_emb, pool_ids, index=index)

    def encode(self, x, exclude_ids=None, *, n_workers: int | None = None) -> np.ndarray:
        """Top-``k`` pool ids of ``x`` ``(n, d)`` by descending inner product -> ``(n, k)`` int64.

        Args:
            x: query embeddings ``(n, d)``.
            exclude_ids: ``(n,)`` id to leave out per row (the query item's own id);
                ``-1`` or an id not in the pool excludes nothing. ``None``: nothing.

        Ties order by the lowest pool id. Exact mode is row-independent bit for bit; ANN
        (HNSW) mode is row-independent too, as HNSW searches each query on its own, but
        may miss true neighbours (see ``ann_recall_``). Rows an ANN index returns fewer
        than ``k`` candidates for are padded with ``-1``. Large batches run on
        ``n_workers`` row-block threads (default: the BLAS thread budget), one BLAS/OpenMP
        thread each (:func:`~qarm_features.codes.rescore.map_row_blocks`).
        """
        if not hasattr(self, "index_"):
            raise NotFittedError("VQCoder is not fitted; call fit(pool_emb, pool_ids) or from_pool")
        x = check_embeddings(x, name="x", dim=self.dim_)
        if exclude_ids is None:
            ex = np.full(x.shape[0], -1, np.int64)
        else:
            ex = check_ids(exclude_ids, name="exclude_ids", n=x.shape[0], unique=False)
        out = np.empty((x.shape[0], int(self.k)), np.int64)

        def run(lo: int, hi: int) -> None:
            if in_worker():
                faiss.omp_set_num_threads(1)  # per thread; the caller's pool is untouched
            if self._ivf is not None:
                for start in range(lo, hi, _VQ_SORT_WINDOW):
                    self._encode_ivf_window(x, ex, out, start, min(start + _VQ_SORT_WINDOW, hi))
                return
            for start in range(lo, hi, _VQ_CHUNK):
                stop = min(start + _VQ_CHUNK, hi)
                out[start:stop] = self._encode_block(
                    x[start:stop], ex[start:stop], self.index_, guarded=self.mode_ == "exact"
                )

        map_row_blocks(run, x.shape[0], n_workers=n_workers)
        return out

    def _encode_ivf_window(self, x, ex, out, lo: int, hi: int) -> None:
        """IVF mode: rows ``lo:hi`` searched in the order of their probed lists
        (:data:`_VQ_SORT_WINDOW`), ``_VQ_CHUNK`` rows per search, written back in place."""
        xs = x[lo:hi]
        lists = self._probe(xs, xs.astype(np.float64))
        order = np.lexsort(lists.T[::-1])  # by first list, then second, ...
        for a in range(0, order.size, _VQ_CHUNK):
            rows = order[a : a + _VQ_CHUNK]
            out[lo + rows] = self._encode_block(
                xs[rows], ex[lo + rows], self.index_, guarded=False, lists=lists[rows]
            )

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """Pool row of each id to exclude; ``-1`` for ``-1`` and for ids not in the pool."""
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.minimum(pos, self._sorted_ids.size - 1)
        found = (self._sorted_ids[pos] == ids) & (ids != -1)
        return np.where(found, self._order[pos], -1)

    def _encode_block(self, x, exclude_ids, index, *, guarded: bool, lists=None) -> np.ndarray:
        """Top-k of rows ``x`` (one search); ``lists``: their IVF lists when already probed."""
        k, n_pool = int(self.k), self.pool_emb_.shape[0]
        ex = self._positions(exclude_ids)
        c = min(n_pool, k + 1 + _VQ_MARGIN)
        x64 = x.astype(np.float64)
        if index is not self.index_ or self._ivf is None:
            dist, cand = index.search(x, c)  # float32 candidates, descending
        else:  # IVF: the canonical lists of each row, then faiss scans only those
            lists = self._probe(x, x64) if lists is None else lists
            dist, cand = self._ivf.search_preassigned(
                x, c, lists, np.zeros(lists.shape, np.float32)
            )
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
        # Rows whose first k + 1 float32 candidates are all valid and each apart from the
        # next by more than the tolerance: the float64 re-scoring would keep exactly that
        # order (no ties), and every later candidate scores below the (k+1)-th. Their
        # codes are the float32 order; the others are re-scored (same codes either way).
        head = dist[:, : k + 1].astype(np.float64)
        sure = valid[:, : k + 1].all(axis=1)
        sure &= (head[:, :-1] - head[:, 1:] > self._tol(x64)[:, None]).all(axis=1)
        out = np.empty((x.shape[0], k), np.int64)
        out[sure] = self.pool_ids_[cand[sure, :k]]
        rest = np.flatnonzero(~sure)
        if rest.size:
            safe = np.where(cand[rest] >= 0, cand[rest], 0)
            s64 = dot64(x64[rest], np.take(self._pool_t, safe, axis=1))
            out[rest] = self._top_k(s64, safe, valid[rest])
        for i in doubtful:
            out[i] = self._top_k_full(x[i], x64[i], ex[i])
        return out

    def _probe(self, x: np.ndarray, x64: np.ndarray) -> np.ndarray:
        """The ``nprobe`` lists of each row (canonical set, ascending ids), ``(n, nprobe)``."""
        nlist, nprobe = self._coarse.shape[0], int(self._ivf.nprobe)
        if nprobe >= nlist:
            return np.broadcast_to(np.arange(nlist, dtype=np.int64), (x.shape[0], nlist)).copy()
        # float32 proposal: faiss's exact top nprobe + 1 of the float32 scores (one GEMM per
        # chunk and a heap; ~2.4x numpy's GEMM + argpartition over nlist columns).
        s, top = self._coarse_index.search(x, nprobe + 1)
        inside = s[:, nprobe - 1].astype(np.float64)  # the set's lowest score
        outside = s[:, nprobe]  # every list outside scores <= this one
        top = top[:, :nprobe]
        # A gap beyond twice the float32 error bound means the float64 top set is the
        # float32 one (whatever order faiss summed in).
        d = self.dim_
        tol = (
            GUARD * (d + 2) * U * np.sqrt(np.einsum("ij,ij->i", x64, x64)) * (self._coarse_norm_max)
        )
        lists = np.sort(top, axis=1).astype(np.int64)
        for i in np.flatnonzero(~(inside - outside > tol)):
            s64 = dot64(x64[i : i + 1], self._coarse_t[:, None, :])[0]
            best = np.lexsort((np.arange(nlist), -s64))[:nprobe]
            lists[i] = np.sort(best)
        return lists

    def _tol(self, x64: np.ndarray) -> np.ndarray:
        d = self.dim_
        return (
            GUARD * (d + 2) * U * np.sqrt(np.einsum("ij,ij->i", x64, x64)) * (self._pool_norm_max)
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
        s64 = dot64(x64[None], self._pool_t[:, None, rows])
        return self._top_k(s64, rows[None], np.ones_like(s64, dtype=bool))[0]
