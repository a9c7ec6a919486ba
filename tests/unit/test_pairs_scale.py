"""pairs at scale: the vectorised miners against the pre-issue-9 references (equal where no
cap bites), and the Swing per-item user cap against the formula over its documented sample."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from _pairs_reference import reference_swing_pairs, reference_u2i_pairs

from qarm_features.errors import InputError
from qarm_features.pairs import mining as pairs_mod
from qarm_features.pairs import swing as swing_mod
from qarm_features.pairs.mining import mine_swing_pairs, mine_u2i_pairs


def _random_log(seed, n=600, n_users=30, n_items=50, n_ts=200):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "user_id": rng.integers(0, n_users, n),
            "item_id": rng.integers(0, n_items, n) * 3 + 7,  # sparse, non-contiguous ids
            "rating": rng.integers(1, 6, n).astype(np.float32),
            "timestamp": rng.integers(0, n_ts, n),  # many equal timestamps
        }
    )
    return df


def _same_pairs(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    np.testing.assert_array_equal(got["trigger_id"], want["trigger_id"])
    np.testing.assert_array_equal(got["target_id"], want["target_id"])
    # float32 cosines: a few ulp apart (BLAS GEMM vs row-wise dot); float64 Swing sums: 1e-12
    np.testing.assert_allclose(got["score"], want["score"], rtol=1e-6, atol=1e-6)
    assert got.dtypes.tolist() == want.dtypes.tolist()
    assert (got["source"] == want["source"]).all()


@pytest.mark.parametrize("seed, history", [(0, 1), (1, 3), (2, 50), (3, 7)])
def test_u2i_equals_reference(seed, history):
    log = _random_log(seed)
    ids = np.arange(7, 7 + 3 * 50, 3, dtype=np.int64)
    emb = np.random.default_rng(seed).standard_normal((50, 8)).astype(np.float32)
    emb[5] = 2 * emb[3]  # a bit-identical direction: ties between distinct items
    got = mine_u2i_pairs(log, ids, emb, history=history)
    _same_pairs(got, reference_u2i_pairs(log, ids, emb, history=history))


def test_u2i_equals_reference_across_blocks(monkeypatch):
    # Blocks of 256 events (the floor) cut through users: halos must carry the history.
    monkeypatch.setattr(pairs_mod, "_U2I_BLOCK_FLOATS", 1)
    log = _random_log(4, n=3000, n_users=12)
    ids = np.arange(7, 7 + 3 * 50, 3, dtype=np.int64)
    emb = np.random.default_rng(4).standard_normal((50, 6)).astype(np.float32)
    got = mine_u2i_pairs(log, ids, emb, history=40)
    _same_pairs(got, reference_u2i_pairs(log, ids, emb, history=40))


@pytest.mark.parametrize(
    "seed, alpha, top_k, max_user_items, user_weight",
    [
        (0, 1.0, 20, 500, True),
        (1, 0.5, 3, 6, True),
        (2, 2.0, 1000, 10, False),
        (3, 1.0, 1, 4, True),
    ],
)
def test_swing_equals_reference_when_no_cap_bites(seed, alpha, top_k, max_user_items, user_weight):
    log = _random_log(seed)
    kw = dict(alpha=alpha, top_k=top_k, max_user_items=max_user_items, user_weight=user_weight)
    want = reference_swing_pairs(log, **kw)
    assert len(want) > 0
    _same_pairs(mine_swing_pairs(log, **kw), want)  # max_item_users=None: no item cap
    # a cap at the largest item degree does not bite either
    _same_pairs(mine_swing_pairs(log, max_item_users=40, **kw), want)


def test_swing_equals_reference_across_blocks(monkeypatch):
    monkeypatch.setattr(swing_mod, "_SWING_BLOCK_ROWS", 5)  # about one trigger per block
    log = _random_log(5)
    _same_pairs(mine_swing_pairs(log, top_k=7), reference_swing_pairs(log, top_k=7))


def _documented_sample(log, max_user_items, max_item_users, seed, thr=4.0):
    """The sample mine_swing_pairs documents: per (item, user) pair, in (item, user) order,
    one uniform key from default_rng(seed); each item keeps its max_item_users smallest."""
    log = log.iloc[np.argsort(log["timestamp"].to_numpy(), kind="stable")]
    log = log[log["rating"] >= thr].drop_duplicates(["user_id", "item_id"], keep="last")
    items_of = {
        u: list(g["item_id"])[-max_user_items:] for u, g in log.groupby("user_id", sort=False)
    }
    rows = sorted((i, u) for u, its in items_of.items() for i in its)
    keys = np.random.default_rng(seed).random(len(rows))
    users_of: dict = {}
    for (i, u), k in zip(rows, keys):
        users_of.setdefault(i, []).append((k, u))
    sample = {i: {u for _, u in sorted(v)[:max_item_users]} for i, v in users_of.items()}
    return {u: set(v) for u, v in items_of.items()}, sample


def test_swing_item_cap_is_the_formula_over_the_documented_sample():
    log = _random_log(6, n=1500, n_users=60, n_items=30)
    cap, alpha = 5, 1.0
    sets, sample = _documented_sample(log, 500, cap, seed=3)
    assert max(len(v) for v in sample.values()) == cap  # the cap bites
    want = {}
    for i, users in sample.items():
        for u, v in itertools.combinations(sorted(users), 2):
            common = sets[u] & sets[v]
            w = 1 / np.sqrt(len(sets[u]) * len(sets[v])) / (alpha + len(common))
            for j in common - {i}:
                want[(i, j)] = want.get((i, j), 0.0) + w
    got = mine_swing_pairs(log, top_k=1000, max_item_users=cap, seed=3)
    table = {(a, b): s for a, b, s in zip(got["trigger_id"], got["target_id"], got["score"])}
    assert table.keys() == want.keys()
    for k, v in want.items():
        assert table[k] == pytest.approx(v, rel=1e-9)
    # the sampled scores never exceed the uncapped ones, and the seed moves the sample
    full = reference_swing_pairs(log, top_k=1000)
    ref = {(a, b): s for a, b, s in zip(full["trigger_id"], full["target_id"], full["score"])}
    assert all(s <= ref[k] * (1 + 1e-12) for k, s in table.items())
    other = mine_swing_pairs(log, top_k=1000, max_item_users=cap, seed=4)
    assert not other.equals(got)
    pd.testing.assert_frame_equal(
        got, mine_swing_pairs(log, top_k=1000, max_item_users=cap, seed=3)
    )


def test_swing_item_cap_validation():
    with pytest.raises(InputError, match="max_item_users"):
        mine_swing_pairs(_random_log(0), max_item_users=1)


def test_swing_equals_reference_when_blocks_split_on_triples(monkeypatch):
    monkeypatch.setattr(swing_mod, "_SWING_MAX_TRIPLES", 3)  # halve down to single triggers
    log = _random_log(7)
    _same_pairs(mine_swing_pairs(log, top_k=9), reference_swing_pairs(log, top_k=9))


@pytest.mark.parametrize("seed, min_count", [(0, 1), (1, 2), (2, 1), (3, 3)])
def test_mine_pairs_union_equals_the_pandas_reference(seed, min_count):
    """The numpy aggregation / ranking / dedup of mine_pairs equals the pandas formulation
    it replaced (groupby, stable sort_values, drop_duplicates), row for row."""
    from _pairs_reference import reference_union

    from qarm_features.config import PairsConfig
    from qarm_features.pairs.mining import mine_pairs

    log = _random_log(seed, n=900, n_users=25, n_items=30)  # dense: many ties and repeats
    ids = np.unique(log["item_id"])
    emb = np.random.default_rng(seed).standard_normal((ids.size, 4)).astype(np.float32)
    emb = np.round(emb, 1)  # equal cosines: ties decided by count, then ids
    cfg = PairsConfig(min_pair_count=min_count, swing_max_item_users=None)
    got, _ = mine_pairs(log, cfg, item_ids=ids, item_emb=emb)
    ev = mine_u2i_pairs(log, ids, emb, history=cfg.history)
    sw = mine_swing_pairs(log, top_k=cfg.swing_top_k, max_item_users=None)
    want = reference_union(ev, sw, min_count)
    assert len(got) > 20 and set(got["source"]) == {"u2i", "swing"}
    pd.testing.assert_frame_equal(got, want)


@pytest.mark.parametrize("offset", [2**40, -(2**40)])
def test_mine_pairs_union_equals_the_reference_for_ids_outside_int31(offset):
    """Item ids the union cannot pack into one int64 key (>= 2^31, negative) take the
    two-column dedup and give the pandas reference's pairs too."""
    from _pairs_reference import reference_union

    from qarm_features.config import PairsConfig
    from qarm_features.pairs.mining import mine_pairs

    log = _random_log(5, n=900, n_users=25, n_items=30)
    log["item_id"] = log["item_id"] + offset
    ids = np.unique(log["item_id"])
    emb = np.round(np.random.default_rng(5).standard_normal((ids.size, 4)), 1).astype(np.float32)
    cfg = PairsConfig(swing_max_item_users=None)
    got, _ = mine_pairs(log, cfg, item_ids=ids, item_emb=emb)
    ev = mine_u2i_pairs(log, ids, emb, history=cfg.history)
    sw = mine_swing_pairs(log, top_k=cfg.swing_top_k, max_item_users=None)
    assert len(got) > 20 and got["trigger_id"].abs().min() >= 2**39
    pd.testing.assert_frame_equal(got, reference_union(ev, sw, 1))


def _force_sorted_overlaps(monkeypatch):
    monkeypatch.setattr(swing_mod, "_SWING_MAX_PAIR_BINS", -1)  # no block fits dense bins


def _count_calls(monkeypatch, name):
    calls = []
    real = getattr(swing_mod, name)
    monkeypatch.setattr(swing_mod, name, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize(
    "seed, kw, block_rows, max_bins",
    [
        (0, {"top_k": 20}, None, None),
        (1, {"top_k": 3, "max_user_items": 6, "alpha": 0.5}, None, None),
        (2, {"top_k": 1000, "user_weight": False}, 5, None),  # about one trigger per block
        (3, {"top_k": 50, "max_item_users": 4, "seed": 2}, None, None),  # the item cap bites
        # blocks cut into runs of triggers by bins; triggers over 40 bins are sorted
        (4, {"top_k": 1000}, None, 40),
    ],
)
def test_swing_dense_bins_give_the_sorted_counts_floats_bit_for_bit(
    monkeypatch, seed, kw, block_rows, max_bins
):
    """User-pair overlaps counted in dense per-trigger bins (the default) and by sorting
    packed keys (triggers too large for bins) sum each group's pairs in the same order:
    the same scores to the last bit, not just within a tolerance."""
    if block_rows is not None:
        monkeypatch.setattr(swing_mod, "_SWING_BLOCK_ROWS", block_rows)
    if max_bins is not None:
        monkeypatch.setattr(swing_mod, "_SWING_MAX_PAIR_BINS", max_bins)
    log = _random_log(seed, n=1500, n_users=40, n_items=40)
    binned = _count_calls(monkeypatch, "_pair_weights_binned")
    by_sort = _count_calls(monkeypatch, "_pair_weights_sorted")
    got = mine_swing_pairs(log, **kw)
    assert binned and bool(by_sort) == (max_bins is not None)  # the dense bins (and sorts)
    _force_sorted_overlaps(monkeypatch)
    n_binned = len(binned)
    want = mine_swing_pairs(log, **kw)
    assert by_sort and len(binned) == n_binned
    assert len(got) > 20
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_swing_sorted_overlaps_equal_the_reference(monkeypatch):
    _force_sorted_overlaps(monkeypatch)
    sorted_calls = _count_calls(monkeypatch, "_pair_weights_sorted")
    log = _random_log(8)
    _same_pairs(mine_swing_pairs(log, top_k=9), reference_swing_pairs(log, top_k=9))
    assert sorted_calls
