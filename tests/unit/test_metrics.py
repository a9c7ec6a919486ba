"""metrics: hand-computed values on tiny arrays, and fast paths against slow references."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from qarm_features.errors import InputError
from qarm_features.metrics import (
    auc,
    code_quality,
    gauc,
    pair_auc,
    pair_auc_outcomes,
    pair_recall_at_k,
    per_user_auc,
    popularity_buckets,
    uauc,
)


# --------------------------------------------------------------------------- AUCs
def test_auc_hand_computed():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 comparisons won
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    assert auc([True, False], [0.1, 0.9]) == pytest.approx(0.0)


def test_auc_undefined_is_nan():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([], []))


def test_uauc_gauc_hand_computed():
    # user 1: y=[0,1,1], s=[.2,.1,.9] -> 0.5; user 2: all positives above negatives -> 1.0;
    # user 3 has positives only -> excluded. Rows are interleaved on purpose.
    rows = [
        (1, 0, 0.2), (2, 1, 0.9), (3, 1, 0.3), (1, 1, 0.1), (2, 0, 0.3),
        (2, 0, 0.5), (1, 1, 0.9), (3, 1, 0.7), (2, 1, 0.8),
    ]
    users, y, s = (np.array(c) for c in zip(*rows))
    assert uauc(users, y, s) == pytest.approx(0.75)
    assert gauc(users, y, s) == pytest.approx((0.5 * 3 + 1.0 * 4) / 7)


def test_per_user_auc_matches_sklearn_per_user_with_ties():
    """The vectorised per-user AUC against scikit-learn user by user (ties half)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    users = rng.integers(0, 60, 2000)
    y = rng.integers(0, 2, 2000)
    s = rng.integers(0, 5, 2000).astype(float)  # many ties within a user
    ids, aucs, counts = per_user_auc(users, y, s)
    want = [
        (u, roc_auc_score(y[users == u], s[users == u]), (users == u).sum())
        for u in np.unique(users)
        if 0 < y[users == u].sum() < (users == u).sum()
    ]
    assert ids.tolist() == [w[0] for w in want]
    np.testing.assert_allclose(aucs, [w[1] for w in want], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(counts, [w[2] for w in want])


def test_pair_auc_outcomes_sum_to_pair_auc():
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((40, 4)).astype(np.float32)
    ids = np.arange(40)
    pairs = pd.DataFrame({"trigger_id": ids[:20], "target_id": ids[20:]})
    won, valid = pair_auc_outcomes(emb, ids, pairs, np.ones(40), seed=4)
    assert won.shape == valid.shape == (20,) and (won <= valid).all()
    assert won.sum() / valid.sum() == pytest.approx(pair_auc(emb, ids, pairs, np.ones(40), seed=4))


def test_uauc_gauc_nan_when_no_user_has_both_labels():
    assert math.isnan(uauc([1, 1, 2], [1, 1, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(gauc([1, 1, 2], [1, 1, 0], [0.1, 0.2, 0.3]))


def test_auc_bad_input():
    with pytest.raises(InputError, match="0/1"):
        auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="NaN"):
        auc([0, 1], [0.1, np.nan])
    with pytest.raises(InputError, match="equal length"):
        auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(InputError, match="users"):
        uauc([1, 2], [0, 1, 1], [0.1, 0.2, 0.3])


# --------------------------------------------------------------------------- code quality
def test_code_quality_hand_computed():
    codes = np.array([[0, 1], [0, 1], [1, 2], [3, 0]], dtype=np.int64)
    q = code_quality(codes, 4)
    # level 0 counts [2,1,0,1], level 1 counts [1,2,1,0]: 3 of 4 codes used, entropy
    # H(.5,.25,.25) = 1.5 ln 2 = 0.75 ln 4
    assert q["utilization"] == pytest.approx([0.75, 0.75])
    assert q["entropy"] == pytest.approx([0.75, 0.75])
    assert q["collision_rate"] == pytest.approx(0.5)  # (0,1) is shared by two items
    assert q["n_unique_tuples"] == 3
    assert q["n_items"] == 4


def test_code_quality_uniform_codes_have_full_entropy():
    codes = np.arange(8, dtype=np.int64).reshape(-1, 1)
    q = code_quality(codes, 8)
    assert q["utilization"] == [1.0] and q["entropy"][0] == pytest.approx(1.0)
    assert q["collision_rate"] == 0.0


def test_code_quality_bad_input():
    with pytest.raises(InputError, match="n_codes"):
        code_quality(np.array([[0, 4]]), 4)
    with pytest.raises(InputError, match="2-d"):
        code_quality(np.array([0, 1]), 4)
    with pytest.raises(InputError, match="integers"):
        code_quality(np.array([[0.5]]), 4)


# --------------------------------------------------------------------------- pair metrics
def _circle(angles_deg):
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def test_pair_recall_at_k_known_ranks():
    # ids 10..15 at angles 0, 10, 20 | 180, 190, 200 (scaled rows: cosine ignores norms)
    emb = _circle([0, 10, 20, 180, 190, 200]) * np.array([[1], [2], [3], [1], [1], [5]])
    ids = np.arange(10, 16)
    pairs = pd.DataFrame({"trigger_id": [10, 10, 10], "target_id": [11, 12, 14]})
    # neighbours of 10 (itself excluded): 11 (10 deg), 12 (20), 15 (200), 14 (190), 13 (180)
    assert pair_recall_at_k(emb, ids, pairs, k=1) == pytest.approx(1 / 3)
    assert pair_recall_at_k(emb, ids, pairs, k=2) == pytest.approx(2 / 3)
    assert pair_recall_at_k(emb, ids, pairs, k=3) == pytest.approx(2 / 3)
    assert pair_recall_at_k(emb, ids, pairs, k=4) == pytest.approx(1.0)


def test_pair_recall_matches_slow_reference():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((60, 8)).astype(np.float32)
    ids = rng.permutation(1000)[:60].astype(np.int64)
    pairs = pd.DataFrame(
        {"trigger_id": ids[rng.integers(0, 60, 200)], "target_id": ids[rng.integers(0, 60, 200)]}
    )
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    row = {int(i): r for r, i in enumerate(ids)}
    hits = []
    for t, g in zip(pairs["trigger_id"], pairs["target_id"]):
        if t == g:
            continue  # self-pairs are ignored
        sims = e @ e[row[t]]
        sims[row[t]] = -np.inf
        nbrs = set(np.argsort(-sims, kind="stable")[:5].tolist())
        hits.append(row[g] in nbrs)
    assert pair_recall_at_k(emb, ids, pairs, k=5) == pytest.approx(np.mean(hits))


def test_pair_auc_uses_popularity_matched_negatives():
    # 20 items, popularity = index, 2 buckets: items 0..9 and 10..19. The trigger (0) is at
    # angle 0, the target (15) at 30 deg, the other popular items at 90+ deg, the other
    # unpopular items at 5 deg (closer than the target, but never sampled as negatives).
    angles = [0] + [5] * 9 + [95 + i for i in range(10)]
    angles[15] = 30
    emb = _circle(angles)
    ids = np.arange(20)
    pairs = pd.DataFrame({"trigger_id": [0], "target_id": [15]})
    pop = np.arange(20, dtype=float)
    assert pair_auc(emb, ids, pairs, pop, n_neg=20, n_buckets=2) == pytest.approx(1.0)
    # one bucket: the close unpopular items become negatives and win
    assert pair_auc(emb, ids, pairs, pop, n_neg=50, n_buckets=1) < 0.8
    # reversed geometry: the target is the farthest popular item
    far = _circle([0] + [5] * 9 + [10 + i for i in range(10)])
    far[15] = _circle([170])[0]
    assert pair_auc(far, ids, pairs, pop, n_neg=20, n_buckets=2) == pytest.approx(0.0)


def test_pair_auc_popularity_series_and_determinism():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((50, 4)).astype(np.float32)
    ids = np.arange(100, 150)
    pairs = pd.DataFrame({"trigger_id": ids[:25], "target_id": ids[25:]})
    counts = rng.integers(1, 100, 50)
    series = pd.Series(counts, index=ids)
    a = pair_auc(emb, ids, pairs, counts, seed=3)
    assert a == pair_auc(emb, ids, pairs, series, seed=3)
    assert a == pair_auc(emb, ids, pairs, series.sample(frac=1.0, random_state=0), seed=3)
    assert 0.0 <= a <= 1.0
    # the same negatives whatever the space: a space equal to emb scores the same
    assert a == pair_auc(emb * 3.0, ids, pairs, counts, seed=3)


def test_pair_metrics_bad_input():
    emb = np.eye(3, dtype=np.float32)
    ids = np.array([1, 2, 3])
    with pytest.raises(InputError, match="unknown id"):
        pair_recall_at_k(emb, ids, pd.DataFrame({"trigger_id": [1], "target_id": [9]}))
    with pytest.raises(InputError, match="missing column"):
        pair_auc(emb, ids, pd.DataFrame({"trigger_id": [1]}), np.ones(3))
    with pytest.raises(InputError, match="popularity"):
        pair_auc(emb, ids, pd.DataFrame({"trigger_id": [1], "target_id": [2]}), np.ones(2))
    self_pair = pd.DataFrame({"trigger_id": [1], "target_id": [1]})
    assert math.isnan(pair_recall_at_k(emb, ids, self_pair))


def test_popularity_buckets_equal_size_with_ties():
    b = popularity_buckets(np.zeros(10), n_buckets=5)
    assert np.bincount(b).tolist() == [2, 2, 2, 2, 2]
    b = popularity_buckets(np.array([5, 1, 3, 2]), n_buckets=2)
    assert b.tolist() == [1, 0, 1, 0]
