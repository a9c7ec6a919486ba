"""Tests for qarm_features.datasets.synthetic: the seeded synthetic world and its ground truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from qarm_features.datasets.synthetic import SyntheticWorld
from qarm_features.errors import InputError


def test_synthetic_world_is_deterministic_and_streams_identically():
    a, b = SyntheticWorld(3000, 50, seed=7), SyntheticWorld(3000, 50, seed=7)
    assert a.content.dtype == np.float32 and a.content.shape == (3000, 64)
    assert a.collab.dtype == np.float32 and a.collab.shape == (3000, 16)
    assert a.item_ids.dtype == np.int64 and a.item_ids.tolist() == list(range(1, 3001))
    np.testing.assert_array_equal(a.collab, b.collab)
    pd.testing.assert_frame_equal(a.interactions(5), b.interactions(5))
    chunks = list(b.iter_content(777))  # b streams before materialising content
    ids = np.concatenate([i for i, _ in chunks])
    np.testing.assert_array_equal(ids, a.item_ids)
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), a.content)
    assert not np.array_equal(SyntheticWorld(3000, 50, seed=8).content, a.content)


def test_synthetic_world_streams_across_generation_blocks(monkeypatch):
    monkeypatch.setattr(SyntheticWorld, "BLOCK", 100)  # many blocks, chunks straddle them
    world = SyntheticWorld(1050, 5, seed=3)
    for chunk in (1, 37, 100, 250, 5000):
        parts = list(SyntheticWorld(1050, 5, seed=3).iter_content(chunk))
        assert all(len(c) == chunk for _, c in parts[:-1])
        np.testing.assert_array_equal(np.concatenate([c for _, c in parts]), world.content)


def test_synthetic_interactions_schema():
    world = SyntheticWorld(500, 200, seed=1)
    df = world.interactions(n_per_user=30)
    assert list(df.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert df.dtypes.tolist() == [np.int64, np.int64, np.float32, np.int64]
    assert len(df) == 200 * 30 and df["timestamp"].is_monotonic_increasing
    assert not df.duplicated(["user_id", "item_id"]).any()
    assert set(df["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 0.2 < (df["rating"] >= 4).mean() < 0.8  # both labels are well represented
    assert df["item_id"].between(1, 500).all() and df["user_id"].between(1, 200).all()
    assert len(SyntheticWorld(10, 3).interactions(50)) == 30  # capped at n_items per user
    with pytest.raises(InputError, match="n_per_user"):
        world.interactions(0)
    with pytest.raises(InputError, match="nuisance"):
        SyntheticWorld(10, 3, nuisance=-1)
    with pytest.raises(InputError, match="n_items"):
        SyntheticWorld(0, 3)


def _coengagement_at_k(emb, co, k=10):
    """Share of each item's k nearest neighbours (cosine) that share a positive user."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argpartition(-sim, k, axis=1)[:, :k]
    return float((np.take_along_axis(co, nn, axis=1) > 0).mean())


def test_synthetic_world_gives_alignment_a_job():
    scores = {}
    for nuisance in (0.0, 3.0):
        world = SyntheticWorld(1000, 800, nuisance=nuisance, seed=0)
        pos = world.interactions(20).query("rating >= 4")
        x = sp.csr_matrix(
            (np.ones(len(pos)), (pos["user_id"] - 1, pos["item_id"] - 1)),
            shape=(world.n_users, world.n_items),
        )
        co = (x.T @ x).toarray()
        np.fill_diagonal(co, 0)
        rand = np.random.default_rng(0).standard_normal((world.n_items, 8))
        scores[nuisance] = {
            "collab": _coengagement_at_k(world.collab, co),
            "content": _coengagement_at_k(world.content, co),
            "random": _coengagement_at_k(rand, co),
        }
    low, high = scores[0.0], scores[3.0]
    # without nuisance, content neighbours are collaborative neighbours
    assert low["content"] > 0.9 * low["collab"]
    # with strong nuisance they are far worse, though still better than chance
    assert high["collab"] > 1.5 * high["content"]
    assert high["content"] > 1.5 * high["random"]
    assert high["collab"] > 3 * high["random"]


def test_quality_is_ground_truth_that_raises_the_positive_rate():
    def positive_rate_by_quality(weight):
        world = SyntheticWorld(600, 400, seed=2, quality_effect=weight)
        df = world.interactions(20)
        q = world.quality[df["item_id"].to_numpy() - 1]
        lo, hi = np.quantile(q, [0.25, 0.75])
        pos = df["rating"].to_numpy() >= 4
        return df, pos[q <= lo].mean(), pos[q >= hi].mean()

    world = SyntheticWorld(600, 400, seed=2)
    assert world.quality.dtype == np.float32 and world.quality.shape == (600,)
    np.testing.assert_array_equal(world.quality, SyntheticWorld(600, 400, seed=2).quality)
    assert 0.3 < np.corrcoef(world.quality, world.popularity)[0, 1] < 0.7  # popular ~ better
    df0, low0, high0 = positive_rate_by_quality(0.0)
    df1, low1, high1 = positive_rate_by_quality(1.0)
    # the weight changes ratings only: the same items are engaged at the same times
    cols = ["user_id", "item_id", "timestamp"]
    pd.testing.assert_frame_equal(df0[cols], df1[cols])
    # with weight, the top quality quartile is positive far more often than the bottom one
    assert high1 - low1 > 0.2
    # without it, quality barely matters (affinity alone sets the label)
    assert abs(high0 - low0) < 0.5 * (high1 - low1)
    with pytest.raises(InputError, match="quality_effect"):
        SyntheticWorld(10, 3, quality_effect=-0.5)
