"""RQ and VQ coders: fast paths against slow float64 references, relative quality, the
row-independence contract (one row alone == the same row in a batch, bit for bit) and
boundary errors. Seeded synthetic data; no magic quality numbers."""

from __future__ import annotations

import numpy as np
import pytest

from qarm_features.codes import rq as quantize
from qarm_features.codes import vq as vq_module
from qarm_features.codes.rq import ResidualQuantizer
from qarm_features.codes.vq import VQCoder
from qarm_features.errors import ConfigError, InputError, NotFittedError


def clustered(n: int, d: int = 16, n_clusters: int = 24, seed: int = 0, spread: float = 0.3):
    """Gaussian mixture, float32 ``(n, d)``."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)) * 2.0
    labels = rng.integers(0, n_clusters, n)
    return (centers[labels] + spread * rng.standard_normal((n, d))).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def fixed_order_dot(a64: np.ndarray, b64: np.ndarray) -> np.ndarray:
    """(n, d) x (m, d) -> (n, m) float64 inner products, summed in d order (the canonical)."""
    acc = a64[:, None, 0] * b64[None, :, 0]
    for t in range(1, a64.shape[1]):
        acc += a64[:, None, t] * b64[None, :, t]
    return acc


def greedy_reference(x: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Slow RQ encode: float64 brute-force squared distances per level, float32 residuals."""
    r = x.astype(np.float32).copy()
    codes = []
    for c in codebooks:
        dist = ((r.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
        best = dist.argmin(axis=1)
        codes.append(best)
        r = r - c[best]
    return np.stack(codes, axis=1)


def vq_reference(x, pool, ids, k, exclude=None):
    """Slow VQ: fixed-order float64 scores against the whole pool, (score desc, id asc)."""
    s = fixed_order_dot(x.astype(np.float64), pool.astype(np.float64))
    if exclude is not None:
        s[ids[None, :] == np.asarray(exclude)[:, None]] = -np.inf
    order = np.lexsort((np.broadcast_to(ids, s.shape), -s), axis=-1)[:, :k]
    return ids[order]


def rowwise(encode, x, *args):
    """``encode`` called on one row at a time (the on-demand path), stacked."""
    rows = [encode(x[i : i + 1], *(a[i : i + 1] for a in args)) for i in range(len(x))]
    return np.concatenate(rows)


# ----------------------------------------------------------------------------------- RQ
@pytest.fixture(scope="module")
def rq_data():
    return clustered(3000, d=16, seed=1)


@pytest.fixture(scope="module")
def rq(rq_data):
    return ResidualQuantizer(n_levels=3, n_codes=16, n_iter=15, seed=0).fit(rq_data)


def test_rq_fit_shapes_and_codes(rq, rq_data):
    assert rq.codebooks_.shape == (3, 16, 16) and rq.codebooks_.dtype == np.float32
    codes = rq.encode(rq_data)
    assert codes.shape == (len(rq_data), 3) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 16
    out = rq.decode(codes)
    assert out.shape == rq_data.shape and out.dtype == np.float32


def test_rq_error_strictly_falls_with_each_level(rq, rq_data):
    per_level = rq.residual_energy_per_level(rq_data)
    assert len(per_level) == 3
    assert all(a > b for a, b in zip([1.0, *per_level], per_level))
    truncated = [
        ResidualQuantizer.from_codebooks(rq.codebooks_[:levels]).reconstruction_error(rq_data)
        for levels in (1, 2, 3)
    ]
    assert truncated[0] > truncated[1] > truncated[2]
    assert truncated[2] == pytest.approx(rq.reconstruction_error(rq_data))
    assert truncated[2] == pytest.approx(per_level[-1], rel=1e-4)


def test_rq_beats_single_level_kmeans_with_same_k(rq, rq_data):
    single = ResidualQuantizer(n_levels=1, n_codes=16, n_iter=15, seed=0).fit(rq_data)
    assert rq.reconstruction_error(rq_data) < single.reconstruction_error(rq_data)


def test_rq_encode_matches_float64_greedy_reference(rq, rq_data):
    held_out = clustered(2000, d=16, seed=2)
    for x in (rq_data, held_out):
        np.testing.assert_array_equal(rq.encode(x), greedy_reference(x, rq.codebooks_))


def test_rq_decode_is_the_sum_of_coded_centroids(rq, rq_data):
    codes = rq.encode(rq_data[:50])
    want = sum(rq.codebooks_[lvl][codes[:, lvl]].astype(np.float64) for lvl in range(3))
    np.testing.assert_allclose(rq.decode(codes), want, rtol=1e-5, atol=1e-6)


def test_rq_fit_is_deterministic(rq, rq_data):
    again = ResidualQuantizer(n_levels=3, n_codes=16, n_iter=15, seed=0).fit(rq_data)
    np.testing.assert_array_equal(again.codebooks_, rq.codebooks_)


def test_rq_from_codebooks_round_trip(rq, rq_data):
    clone = ResidualQuantizer.from_codebooks(rq.codebooks_.copy())
    assert (clone.n_levels, clone.n_codes) == (3, 16)
    np.testing.assert_array_equal(clone.encode(rq_data), rq.encode(rq_data))
    np.testing.assert_array_equal(clone.decode(rq.encode(rq_data)), rq.decode(rq.encode(rq_data)))


def test_rq_subsamples_large_inputs_for_fitting():
    x = clustered(1200, d=8, seed=3)
    rq = ResidualQuantizer(n_levels=2, n_codes=2, n_iter=5, seed=0).fit(x)  # cap 512 rows
    assert rq.codebooks_.shape == (2, 2, 8)
    assert rq.reconstruction_error(x) < 1.0
    assert rq.n_fit_rows_ == 512


def test_rq_max_points_per_centroid_sets_the_rows_kmeans_sees():
    x = clustered(1200, d=8, seed=3)
    common = {"n_levels": 2, "n_codes": 2, "n_iter": 5, "seed": 0}
    capped = ResidualQuantizer(**common, max_points_per_centroid=100).fit(x)
    full = ResidualQuantizer(**common, max_points_per_centroid=None).fit(x)
    assert (capped.n_fit_rows_, full.n_fit_rows_) == (200, 1200)
    # Level 1 of the full fit is faiss k-means over every row (faiss must not subsample).
    import faiss

    km = faiss.Kmeans(8, 2, niter=5, seed=0, spherical=False, min_points_per_centroid=1,
                      max_points_per_centroid=10**6)  # fmt: skip
    km.train(x)
    np.testing.assert_array_equal(full.codebooks_[0], km.centroids)
    assert not np.array_equal(full.codebooks_, capped.codebooks_)
    with pytest.raises(ConfigError, match="max_points_per_centroid"):
        ResidualQuantizer(**common, max_points_per_centroid=0).fit(x)


def near_tie_rows(codebook: np.ndarray, rng, n: int, scale: float) -> np.ndarray:
    """Points on (or within `scale` of) the bisector of random centroid pairs."""
    k, d = codebook.shape
    a, b = rng.integers(0, k, n), rng.integers(0, k, n)
    b = np.where(a == b, (b + 1) % k, b)
    mid = 0.5 * (codebook[a].astype(np.float64) + codebook[b])
    return (mid + scale * rng.standard_normal((n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def rq_ties():
    """A 64-d, K=64 quantizer, a batch holding near-ties, and its batch codes."""
    rng = np.random.default_rng(7)
    cb = unit(rng.standard_normal((2 * 64, 64))).reshape(2, 64, 64) * np.float32(0.8)
    rq = ResidualQuantizer.from_codebooks(cb)
    x = np.concatenate(
        [
            unit(rng.standard_normal((2500, 64))),
            near_tie_rows(cb[0], rng, 300, 1e-7),
            near_tie_rows(cb[0], rng, 100, 0.0),
        ]
    )
    x = x[rng.permutation(len(x))]
    return rq, x, rq.encode(x)


def test_rq_row_independence_bit_for_bit(rq_ties, monkeypatch):
    rq, x, batch = rq_ties
    np.testing.assert_array_equal(rowwise(rq.encode, x), batch)
    for size in (2, 7, 1000):  # other batch shapes
        parts = [rq.encode(x[i : i + size]) for i in range(0, len(x), size)]
        np.testing.assert_array_equal(np.concatenate(parts), batch)
    monkeypatch.setattr(quantize, "_BLOCK_BYTES", 1)  # 256-row blocks, a ragged last one
    monkeypatch.setattr(quantize, "_EXACT_ROWS", 7)  # float64 re-encoding in small batches
    np.testing.assert_array_equal(rq.encode(x), batch)


def test_rq_near_ties_take_the_float64_path_and_match_the_reference(rq_ties, monkeypatch):
    rq, x, batch = rq_ties
    seen = []
    real = quantize.dot64
    monkeypatch.setattr(quantize, "dot64", lambda a, b: seen.append(len(a)) or real(a, b))
    np.testing.assert_array_equal(rq.encode(x), batch)
    assert sum(seen) >= 300  # every crafted tie is re-scored, few others are
    assert sum(seen) < 0.2 * len(x) * 2
    np.testing.assert_array_equal(batch, greedy_reference(x, rq.codebooks_))


def test_rq_fast_path_equals_the_all_float64_path(rq_ties, monkeypatch):
    rq, x, batch = rq_ties
    monkeypatch.setattr(quantize, "GUARD", 1e30)  # every row doubtful at every level
    slow = ResidualQuantizer.from_codebooks(rq.codebooks_)
    np.testing.assert_array_equal(slow.encode(x[:600]), batch[:600])


def test_rq_exact_tie_goes_to_the_lowest_code():
    cb = np.zeros((1, 3, 4), np.float32)
    cb[0, 0, 0] = cb[0, 1, 1] = cb[0, 2, 2] = 1.0
    x = np.array([[0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0], [0.5, 0, 0.5, 0]], np.float32)
    rq = ResidualQuantizer.from_codebooks(cb)
    np.testing.assert_array_equal(rq.encode(x)[:, 0], [0, 1, 0])


def test_rq_errors(rq):
    with pytest.raises(NotFittedError):
        ResidualQuantizer().encode(np.ones((2, 4), np.float32))
    with pytest.raises(NotFittedError):
        ResidualQuantizer().decode(np.zeros((2, 3), np.int64))
    with pytest.raises(InputError, match="width 16"):
        rq.encode(np.ones((2, 8), np.float32))
    bad = np.ones((3, 16), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        rq.encode(bad)
    with pytest.raises(InputError, match="empty"):
        rq.encode(np.empty((0, 16), np.float32))
    with pytest.raises(InputError, match=r"outside \[0, 16\)"):
        rq.decode(np.array([[0, 1, 16]]))
    with pytest.raises(InputError, match=r"outside \[0, 16\)"):
        rq.decode(np.array([[0, -1, 2]]))
    with pytest.raises(InputError, match=r"shape \(n, 3\)"):
        rq.decode(np.array([[0, 1]]))
    with pytest.raises(InputError, match="integers"):
        rq.decode(np.array([[0.5, 1, 2]]))
    with pytest.raises(InputError, match="at least 16 rows"):
        ResidualQuantizer(n_codes=16).fit(np.ones((10, 4), np.float32))
    with pytest.raises(ConfigError):
        ResidualQuantizer(n_levels=0).fit(np.ones((100, 4), np.float32))
    with pytest.raises(InputError):
        ResidualQuantizer.from_codebooks(np.ones((3, 4), np.float32))
    with pytest.raises(InputError, match="all rows are zero"):
        rq.reconstruction_error(np.zeros((2, 16), np.float32))


# ----------------------------------------------------------------------------------- VQ
@pytest.fixture(scope="module")
def vq_pool():
    rng = np.random.default_rng(11)
    pool = unit(clustered(1500, d=16, n_clusters=30, seed=11, spread=0.4))
    pool[100:140] = pool[40]  # exact duplicates: ties broken by pool id
    ids = rng.choice(10**6, size=len(pool), replace=False).astype(np.int64)
    return pool, ids


def test_vq_matches_brute_force_top_k(vq_pool):
    pool, ids = vq_pool
    vq = VQCoder(k=10).fit(pool, ids)
    assert vq.mode_ == "exact" and vq.ann_recall_ is None
    q = np.r_[0:20, 35:45, 95:145]  # includes the duplicate block
    got = vq.encode(pool[q], exclude_ids=ids[q])
    assert got.shape == (len(q), 10) and got.dtype == np.int64
    np.testing.assert_array_equal(got, vq_reference(pool[q], pool, ids, 10, exclude=ids[q]))
    assert not (got == ids[q][:, None]).any()
    fresh = unit(clustered(60, d=16, n_clusters=30, seed=12))
    np.testing.assert_array_equal(vq.encode(fresh), vq_reference(fresh, pool, ids, 10))


def test_vq_self_is_first_without_exclusion_and_absent_with(vq_pool):
    pool, ids = vq_pool
    q = np.r_[0:40, 200:240]  # rows without duplicates in the pool
    vq = VQCoder(k=5).fit(pool, ids)
    plain = vq.encode(pool[q])
    np.testing.assert_array_equal(plain[:, 0], ids[q])
    for nothing in (np.full(len(q), -1), np.full(len(q), 10**7)):  # -1 / not in the pool
        np.testing.assert_array_equal(vq.encode(pool[q], exclude_ids=nothing), plain)
    six = VQCoder(k=6).fit(pool, ids).encode(pool[q])
    np.testing.assert_array_equal(vq.encode(pool[q], exclude_ids=ids[q]), six[:, 1:])


def test_vq_row_independence_bit_for_bit(vq_pool, monkeypatch):
    pool, ids = vq_pool
    vq = VQCoder(k=10).fit(pool, ids)
    rng = np.random.default_rng(5)
    x = np.concatenate([pool, unit(rng.standard_normal((1000, 16)))])
    ex = np.concatenate([ids, np.full(1000, -1)])
    batch = vq.encode(x, exclude_ids=ex)
    np.testing.assert_array_equal(rowwise(vq.encode, x, ex), batch)
    monkeypatch.setattr(vq_module, "_VQ_CHUNK", 300)  # several query blocks, a ragged last one
    np.testing.assert_array_equal(vq.encode(x, exclude_ids=ex), batch)


def test_vq_near_ties_at_the_k_boundary_are_resolved_in_float64(monkeypatch):
    # 40 pool items nearly equidistant to the query: the float32 top-10 is a coin flip.
    rng = np.random.default_rng(3)
    q = unit(rng.standard_normal((1, 32)))[0]
    pool = unit(rng.standard_normal((200, 32)))
    pool[:40] = unit(q + 1e-7 * rng.standard_normal((40, 32)))
    ids = np.arange(1000, 1200, dtype=np.int64)
    vq = VQCoder(k=10).fit(pool, ids)
    calls = []
    full = vq._top_k_full
    monkeypatch.setattr(vq, "_top_k_full", lambda *a: calls.append(1) or full(*a))
    x = np.concatenate([q[None], pool[:40], unit(rng.standard_normal((500, 32)))])
    batch = vq.encode(x)
    assert calls  # the guard sent the near-tie rows to the full float64 path
    np.testing.assert_array_equal(rowwise(vq.encode, x), batch)
    np.testing.assert_array_equal(batch, vq_reference(x, pool, ids, 10))


def test_vq_fast_path_equals_the_full_float64_path(vq_pool, monkeypatch):
    pool, ids = vq_pool
    x, ex = pool[::10], ids[::10]
    fast = VQCoder(k=10).fit(pool, ids).encode(x, exclude_ids=ex)
    monkeypatch.setattr(vq_module, "GUARD", 1e30)  # every row through the whole-pool path
    np.testing.assert_array_equal(VQCoder(k=10).fit(pool, ids).encode(x, exclude_ids=ex), fast)


def test_vq_minus_one_never_excludes(vq_pool):
    pool, ids = vq_pool
    ids = ids.copy()
    ids[3] = -1  # a pool item whose id is -1 is still returned for exclude id -1
    vq = VQCoder(k=5).fit(pool, ids)
    np.testing.assert_array_equal(vq.encode(pool[3:4], exclude_ids=np.array([-1]))[0, 0], -1)


def test_vq_ann_mode_measures_recall():
    pool = unit(clustered(3000, d=16, n_clusters=40, seed=21, spread=0.5))
    ids = np.arange(3000, dtype=np.int64) * 7
    vq = VQCoder(k=10, exact_max_pool=1000, ann_index="HNSW32", ann_ef_search=64, seed=0)
    vq.fit(pool, ids)
    assert vq.mode_ == "ann"
    assert vq.ann_recall_ is not None and 0.9 < vq.ann_recall_ <= 1.0
    x, ex = pool[:300], ids[:300]
    batch = vq.encode(x, exclude_ids=ex)
    assert not (batch == ex[:, None]).any()
    np.testing.assert_array_equal(rowwise(vq.encode, x, ex), batch)  # HNSW: per query


def _ivf_fixture():
    pool = unit(clustered(3000, d=16, n_clusters=40, seed=21, spread=0.5))
    return pool, np.arange(3000, dtype=np.int64) * 7


def test_vq_ivf_mode_is_row_independent_and_measures_recall():
    pool, ids = _ivf_fixture()
    vq = VQCoder(k=10, exact_max_pool=1000, ann_index="IVF32,Flat", ann_nprobe=4).fit(pool, ids)
    assert vq.mode_ == "ann" and 0.9 < vq.ann_recall_ <= 1.0
    x, ex = pool[:300], ids[:300]
    batch = vq.encode(x, exclude_ids=ex)
    assert not (batch == ex[:, None]).any()
    np.testing.assert_array_equal(rowwise(vq.encode, x, ex), batch)  # canonical lists
    # more lists probed: recall does not drop; all lists: the exact codes
    full = VQCoder(k=10, exact_max_pool=1000, ann_index="IVF32,Flat", ann_nprobe=32)
    full.fit(pool, ids)
    assert full.ann_recall_ == 1.0
    exact = VQCoder(k=10).fit(pool, ids)
    np.testing.assert_array_equal(full.encode(x, exclude_ids=ex), exact.encode(x, exclude_ids=ex))


def test_vq_ivf_recall_floor_doubles_nprobe_and_a_loaded_index_keeps_it():
    """Below ``ann_min_recall`` a fresh IVF index doubles nprobe until the floor holds; the
    exported index carries that nprobe, so a coder loading it (whatever its own
    ``ann_nprobe``) makes the same codes."""
    pool, ids = _ivf_fixture()
    kw = {"k": 10, "exact_max_pool": 1000, "ann_index": "IVF32,Flat"}
    low = VQCoder(**kw, ann_nprobe=1).fit(pool, ids)
    assert low.nprobe_ == 1 and low.ann_recall_ < 0.99  # the floor has work to do
    vq = VQCoder(**kw, ann_nprobe=1, ann_min_recall=0.99).fit(pool, ids)
    assert vq.nprobe_ in (2, 4, 8, 16, 32) and vq.ann_recall_ >= 0.99
    half = VQCoder(**kw, ann_nprobe=vq.nprobe_ // 2).fit(pool, ids)
    assert half.ann_recall_ < 0.99  # the first power of two that reaches the floor
    same = VQCoder(**kw, ann_nprobe=vq.nprobe_).fit(pool, ids)
    assert same.ann_recall_ == vq.ann_recall_
    x, ex = pool[:300], ids[:300]
    loaded = VQCoder(**kw, ann_nprobe=1).fit(pool, ids, index=vq.export_index())
    assert loaded.nprobe_ == vq.nprobe_ and loaded.ann_recall_ is None
    np.testing.assert_array_equal(loaded.encode(x, exclude_ids=ex), vq.encode(x, exclude_ids=ex))
    with pytest.raises(ConfigError, match="ann_min_recall"):
        VQCoder(**kw, ann_min_recall=1.5).fit(pool, ids)
    assert VQCoder(k=10, ann_min_recall=0.99).fit(pool, ids).nprobe_ is None  # exact mode


def test_vq_ivf_rows_searched_in_list_order_land_on_their_rows(monkeypatch):
    # IVF rows are searched window by window in the order of their probed lists (cache
    # reuse), chunk by chunk: each row's codes must come back to that row.
    pool, ids = _ivf_fixture()
    vq = VQCoder(k=10, exact_max_pool=1000, ann_index="IVF32,Flat", ann_nprobe=4).fit(pool, ids)
    x, ex = pool[:700], ids[:700]
    want = rowwise(vq.encode, x, ex)
    monkeypatch.setattr(vq_module, "_VQ_SORT_WINDOW", 256)  # windows of 256, 256, 188 rows
    monkeypatch.setattr(vq_module, "_VQ_CHUNK", 100)  # ragged searches inside each
    np.testing.assert_array_equal(vq.encode(x, exclude_ids=ex), want)


def test_vq_ivf_near_ties_are_resolved_in_float64():
    # Rows whose float32 top k+1 are clearly apart keep the float32 order without float64
    # re-scoring; 20 items nearly equidistant to the query must not: float64 decides.
    # (20: all within the k + 1 + 16 float32 candidates; IVF mode has no guard for more
    # near-ties than candidates.)
    rng = np.random.default_rng(3)
    q = unit(rng.standard_normal((1, 32)))[0]
    pool = unit(rng.standard_normal((1000, 32)))
    pool[:20] = unit(q + 1e-7 * rng.standard_normal((20, 32)))
    ids = np.arange(1000, 2000, dtype=np.int64)
    vq = VQCoder(k=10, exact_max_pool=100, ann_index="IVF8,Flat", ann_nprobe=2).fit(pool, ids)
    x = np.concatenate([q[None], pool[:20], unit(rng.standard_normal((500, 32)))])
    batch = vq.encode(x)
    np.testing.assert_array_equal(batch[:21], vq_reference(x[:21], pool, ids, 10))
    np.testing.assert_array_equal(rowwise(vq.encode, x), batch)


def test_vq_ivf_probe_guard_takes_the_float64_lists(monkeypatch):
    # With the guard forced (every row doubtful), the float64 list choice gives the same
    # codes: the float32 proposal only ever keeps what float64 would choose.
    pool, ids = _ivf_fixture()
    kw = dict(k=10, exact_max_pool=1000, ann_index="IVF32,Flat", ann_nprobe=4)
    x, ex = pool[:200], ids[:200]
    fast = VQCoder(**kw).fit(pool, ids).encode(x, exclude_ids=ex)
    monkeypatch.setattr(vq_module, "GUARD", 1e30)
    np.testing.assert_array_equal(VQCoder(**kw).fit(pool, ids).encode(x, exclude_ids=ex), fast)


def test_vq_from_pool_round_trip(vq_pool):
    pool, ids = vq_pool
    a = VQCoder(k=7).fit(pool, ids)
    b = VQCoder.from_pool(pool.copy(), ids.copy(), k=7)
    np.testing.assert_array_equal(b.encode(pool, exclude_ids=ids), a.encode(pool, exclude_ids=ids))


def test_vq_errors(vq_pool):
    pool, ids = vq_pool
    with pytest.raises(InputError, match="at least 11 items"):
        VQCoder(k=10).fit(pool[:10], ids[:10])
    VQCoder(k=10).fit(pool[:11], ids[:11])  # k + 1 is enough
    with pytest.raises(InputError, match="duplicate"):
        VQCoder(k=3).fit(pool[:5], np.array([1, 2, 2, 3, 4]))
    with pytest.raises(NotFittedError):
        VQCoder().encode(pool[:2])
    vq = VQCoder(k=3).fit(pool, ids)
    with pytest.raises(InputError, match="width 16"):
        vq.encode(np.ones((2, 8), np.float32))
    with pytest.raises(InputError, match="NaN"):
        vq.encode(np.full((2, 16), np.nan, np.float32))
    with pytest.raises(InputError, match="empty"):
        vq.encode(np.empty((0, 16), np.float32))
    with pytest.raises(InputError, match="exclude_ids"):
        vq.encode(pool[:3], exclude_ids=ids[:2])
    with pytest.raises(ConfigError):
        VQCoder(k=0).fit(pool, ids)
    with pytest.raises(ConfigError):
        VQCoder(k=3, exact_max_pool=10, ann_index="NotAnIndex").fit(pool, ids)


def test_row_block_workers_give_the_same_codes_and_restore_threads(monkeypatch):
    from threadpoolctl import threadpool_info

    from qarm_features.codes import rescore as _rescore

    monkeypatch.setattr(_rescore, "PARALLEL_MIN_ROWS", 100)  # 1000 rows: 10 blocks
    x = unit(clustered(1000, d=16, n_clusters=20, seed=5, spread=0.3))
    ids = np.arange(1000, dtype=np.int64)
    rq = ResidualQuantizer(n_levels=3, n_codes=16, seed=0).fit(x)
    vq = VQCoder(k=5).fit(x[:400], ids[:400])
    before = [(i["internal_api"], i["num_threads"]) for i in threadpool_info()]
    np.testing.assert_array_equal(rq.encode(x, n_workers=3), rq.encode(x, n_workers=1))
    np.testing.assert_array_equal(
        vq.encode(x, exclude_ids=ids, n_workers=3), vq.encode(x, exclude_ids=ids, n_workers=1)
    )
    assert [(i["internal_api"], i["num_threads"]) for i in threadpool_info()] == before
    with pytest.raises(InputError):  # a worker's error reaches the caller
        vq.encode(x, exclude_ids=ids[:10], n_workers=3)


def test_default_workers_spend_the_blas_thread_budget():
    from threadpoolctl import threadpool_limits

    from qarm_features.codes.rescore import default_workers

    with threadpool_limits(1):  # a server's pin_threads(1): no workers
        assert default_workers() == 1
    with threadpool_limits(2):
        assert 1 <= default_workers() <= 2
