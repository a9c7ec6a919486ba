"""pairs: exact U2I / Swing pairs on hand-made logs, fast paths against slow references,
deduplication, validation, and a seeded sanity check of the BPR retrieval model."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from _logs import cluster_log as _cluster_log  # noqa: E402  (tests/unit on sys.path)
from _logs import log_frame as _log  # noqa: E402

from qarm_features.config import PairsConfig
from qarm_features.errors import InputError
from qarm_features.pairs.mining import mine_pairs, mine_swing_pairs, mine_u2i_pairs

torch.set_num_threads(1)


# Items in 2-d: 1 and 3 point east, 2 and 4 north, 5 west.
EMB_IDS = np.array([1, 2, 3, 4, 5], dtype=np.int64)
EMB = np.array([[1, 0], [0, 1], [1, 0.1], [0.1, 1], [-1, 0]], dtype=np.float32)


def _u2i_log():
    # Rows deliberately out of time order; items 3 and 4 share timestamp 4 (3 comes first
    # in the input, so first in the stably sorted log).
    return _log(
        [
            (10, 5, 5, 5),
            (10, 3, 4, 4),
            (10, 1, 5, 1),
            (20, 1, 5, 2),  # a user with one positive: no pair
            (10, 5, 2, 3),  # a negative: not a candidate
            (10, 4, 5, 4),
            (20, 2, 3, 3),
            (10, 2, 5, 2),
            (30, 2, 5, 1),  # user 30 re-engages item 2: the repeat has no other candidate
            (30, 2, 4, 6),
        ]
    )


def test_u2i_exact_pairs_with_window_and_ties():
    c = 1 / np.sqrt(1.01)
    got = mine_u2i_pairs(_u2i_log(), EMB_IDS, EMB, history=2)
    assert list(got.columns) == ["trigger_id", "target_id", "score", "source"]
    # user 10 positives in log order: 1, 2, 3, 4, 5 (window = 2 latest earlier positives)
    assert list(zip(got["trigger_id"], got["target_id"])) == [(1, 2), (1, 3), (2, 4), (4, 5)]
    np.testing.assert_allclose(got["score"], [0.0, c, c, -0.1 * c], atol=1e-6)
    assert set(got["source"]) == {"u2i"}
    # a window of 3 lets item 2 (cos 0) beat item 4 (cos -0.1) as the trigger of 5
    got3 = mine_u2i_pairs(_u2i_log(), EMB_IDS, EMB, history=3)
    assert list(zip(got3["trigger_id"], got3["target_id"]))[-1] == (2, 5)


def test_datetime_timestamps_give_the_same_pairs():
    log = _u2i_log()
    as_dt = log.assign(timestamp=pd.to_datetime(log["timestamp"], unit="s", utc=True))
    pd.testing.assert_frame_equal(
        mine_u2i_pairs(as_dt, EMB_IDS, EMB, history=2), mine_u2i_pairs(log, EMB_IDS, EMB, history=2)
    )


def test_u2i_matches_slow_reference():
    rng = np.random.default_rng(0)
    n = 300
    log = _log(
        [
            (int(u), int(i), int(r), int(t))
            for u, i, r, t in zip(
                rng.integers(0, 8, n), rng.integers(0, 30, n), rng.integers(1, 6, n),
                rng.integers(0, 40, n),
            )
        ]
    )
    ids = np.arange(30, dtype=np.int64)
    emb = rng.standard_normal((30, 6)).astype(np.float32)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    pos = log.iloc[np.argsort(log["timestamp"].to_numpy(), kind="stable")]
    pos = pos[pos["rating"] >= 4]
    expected = []  # (event position, trigger, target)
    for u in pos["user_id"].unique():
        seq = [
            (k, int(i))
            for k, (uu, i) in enumerate(zip(pos["user_id"], pos["item_id"]))
            if uu == u
        ]
        for t in range(1, len(seq)):
            k, target = seq[t]
            cands = [i for _, i in seq[max(0, t - 4) : t] if i != target]
            if cands:
                sims = [float(e[c] @ e[target]) for c in cands]
                best = max(range(len(cands)), key=lambda j: (sims[j], j))  # latest wins ties
                expected.append((k, cands[best], target))
    expected.sort()
    got = mine_u2i_pairs(log, ids, emb, history=4)
    assert list(zip(got["trigger_id"], got["target_id"])) == [(a, b) for _, a, b in expected]


def _swing_log():
    # A in users 1,2,3; B in 1,2,3; C in 1,3. User 4's rating of A is negative.
    A, B, C = 100, 200, 300
    return _log(
        [
            (1, A, 5, 1), (1, B, 4, 2), (1, C, 5, 3),
            (2, A, 4, 1), (2, B, 5, 2),
            (3, A, 5, 1), (3, B, 5, 2), (3, C, 4, 3),
            (4, A, 2, 1), (4, B, 5, 2),
        ]
    )


def test_swing_exact_scores():
    # overlaps |I1&I2| = 2, |I1&I3| = 3, |I2&I3| = 2 (user 4 shares only B: never co-engages)
    # s(A,B) = 1/3 + 1/4 + 1/3 = 11/12; s(A,C) = s(B,C) = 1/(1+3) (users 1 and 3)
    got = mine_swing_pairs(_swing_log(), alpha=1.0, top_k=5, user_weight=False)
    table = {(a, b): s for a, b, s in zip(got["trigger_id"], got["target_id"], got["score"])}
    expected = {
        (100, 200): 11 / 12, (100, 300): 0.25,
        (200, 100): 11 / 12, (200, 300): 0.25,
        (300, 100): 0.25, (300, 200): 0.25,
    }
    assert table.keys() == expected.keys()
    for k, v in expected.items():
        assert table[k] == pytest.approx(v)
    assert set(got["source"]) == {"swing"}
    # top-1: ties go to the smaller id
    top1 = mine_swing_pairs(_swing_log(), top_k=1, user_weight=False)
    assert list(zip(top1["trigger_id"], top1["target_id"])) == [(100, 200), (200, 100), (300, 100)]


def test_swing_user_weights():
    w1, w2, w3 = 1 / np.sqrt(3), 1 / np.sqrt(2), 1 / np.sqrt(3)
    got = mine_swing_pairs(_swing_log(), top_k=5, user_weight=True)
    s_ab = got[(got["trigger_id"] == 100) & (got["target_id"] == 200)]["score"].item()
    assert s_ab == pytest.approx(w1 * w2 / 3 + w1 * w3 / 4 + w2 * w3 / 3)


def _slow_swing(log, alpha, max_user_items, thr=4.0):
    log = log.iloc[np.argsort(log["timestamp"].to_numpy(), kind="stable")]
    log = log[log["rating"] >= thr].drop_duplicates(["user_id", "item_id"], keep="last")
    items_of = {
        u: list(g["item_id"])[-max_user_items:] for u, g in log.groupby("user_id", sort=False)
    }
    sets = {u: set(v) for u, v in items_of.items()}
    scores = {}
    for u, v in itertools.combinations(sorted(sets), 2):
        common = sets[u] & sets[v]
        w = 1 / np.sqrt(len(sets[u])) / np.sqrt(len(sets[v])) / (alpha + len(common))
        for i, j in itertools.permutations(common, 2):
            scores[(i, j)] = scores.get((i, j), 0.0) + w
    return scores


def test_swing_matches_slow_reference_with_cap():
    rng = np.random.default_rng(1)
    n = 400
    log = _log(
        list(
            zip(
                rng.integers(0, 25, n), rng.integers(0, 40, n), rng.integers(1, 6, n),
                rng.permutation(n),
            )
        )
    )
    ref = _slow_swing(log, alpha=0.5, max_user_items=6)
    got = mine_swing_pairs(log, alpha=0.5, top_k=1000, max_user_items=6)
    table = {(a, b): s for a, b, s in zip(got["trigger_id"], got["target_id"], got["score"])}
    assert table.keys() == ref.keys()
    for k in ref:
        assert table[k] == pytest.approx(ref[k], rel=1e-9)


def test_mine_pairs_union_dedup_and_stats():
    log = pd.concat([_u2i_log(), _swing_log()], ignore_index=True)
    cfg = PairsConfig(history=2, swing_top_k=5)
    ids = np.r_[EMB_IDS, 100, 200, 300]
    emb = np.r_[EMB, np.eye(2, dtype=np.float32), [[1, 1]]].astype(np.float32)
    pairs, stats = mine_pairs(log, cfg, item_ids=ids, item_emb=emb)
    assert list(pairs.columns) == ["trigger_id", "target_id", "score", "source"]
    assert (pairs["trigger_id"] != pairs["target_id"]).all()
    key = set(map(frozenset, zip(pairs["trigger_id"], pairs["target_id"])))
    assert len(key) == len(pairs)  # each unordered pair once
    u2i = mine_u2i_pairs(log, ids, emb, history=2)
    sw = mine_swing_pairs(log, top_k=5)
    expected = set(map(frozenset, zip(u2i["trigger_id"], u2i["target_id"])))
    expected |= set(map(frozenset, zip(sw["trigger_id"], sw["target_id"])))
    assert key == expected
    assert set(pairs["source"]) == {"u2i", "swing"}
    assert stats["n_pairs"] == len(pairs)
    assert sum(stats["n_pairs_by_source"].values()) == len(pairs)
    assert stats["n_items_covered"] == len(set().union(*key))
    for k in ("target_pop_share_mean", "target_pop_share_max", "top_target_pair_share",
              "top10pct_items_pair_share", "n_u2i_events", "n_swing_pairs"):
        assert k in stats


def test_mine_pairs_min_pair_count():
    # two users produce 1 -> 2; one user produces 3 -> 4
    log = _log([(1, 1, 5, 1), (1, 2, 5, 2), (2, 1, 5, 1), (2, 2, 5, 2), (3, 3, 5, 1), (3, 4, 5, 2)])
    cfg = PairsConfig(use_swing=False, min_pair_count=2)
    pairs, stats = mine_pairs(log, cfg, item_ids=EMB_IDS, item_emb=EMB)
    assert list(zip(pairs["trigger_id"], pairs["target_id"])) == [(1, 2)]
    assert stats["n_u2i_events"] == 3


def test_input_errors():
    log = _u2i_log()
    with pytest.raises(InputError, match="missing column"):
        mine_swing_pairs(log.drop(columns="timestamp"))
    with pytest.raises(InputError, match="missing column"):
        mine_pairs(log.drop(columns="rating"), PairsConfig(), item_ids=EMB_IDS, item_emb=EMB)
    with pytest.raises(InputError, match=r"no positive rows \(rating >= 4.0\)"):
        mine_u2i_pairs(log.assign(rating=1.0), EMB_IDS, EMB)
    with pytest.raises(InputError, match="no positive"):
        mine_pairs(log.assign(rating=1.0), PairsConfig(), item_ids=EMB_IDS, item_emb=EMB)
    with pytest.raises(InputError, match="unknown id"):
        mine_u2i_pairs(log, EMB_IDS[:3], EMB[:3])
    with pytest.raises(InputError, match="NaN"):
        mine_swing_pairs(log.assign(rating=np.nan))
    with pytest.raises(InputError, match="DataFrame"):
        mine_swing_pairs(log.to_numpy())
    with pytest.raises(InputError, match="together"):
        mine_pairs(log, PairsConfig(), item_emb=EMB)


# --------------------------------------------------------------------------- with BPR-MF
def test_mine_pairs_default_mf_finds_same_cluster_pairs():
    log, cluster = _cluster_log(seed=1)
    pairs, stats = mine_pairs(log, PairsConfig(mf_dim=8, mf_epochs=10, swing_top_k=5))
    assert stats["n_pairs_by_source"]["u2i"] > 0 and stats["n_pairs_by_source"]["swing"] > 0
    same = cluster[pairs["trigger_id"] - 1] == cluster[pairs["target_id"] - 1]
    assert same.mean() > 0.9  # chance level is 1/3
