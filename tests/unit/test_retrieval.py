"""retrieval: the BPR-MF estimator is seeded, learns taste clusters and refuses bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from qarm_features.config import PairsConfig
from qarm_features.errors import InputError, NotFittedError
from qarm_features.retrieval import BPRMF

torch.set_num_threads(1)


def _cluster_log(seed=0, n_users=120, n_items=60, n_clusters=3, per_user=15):
    """Users engage items of their own taste cluster (rating 5) and a few others (rating 2)."""
    rng = np.random.default_rng(seed)
    item_cluster = np.arange(n_items) % n_clusters
    rows, t = [], 0
    for u in range(n_users):
        c = u % n_clusters
        own = rng.choice(np.flatnonzero(item_cluster == c), per_user, replace=False)
        other = rng.choice(np.flatnonzero(item_cluster != c), 4, replace=False)
        for i in rng.permutation(np.r_[own, other]):
            rows.append((u, int(i) + 1, 5 if item_cluster[i] == c else 2, t))
            t += 1
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    return df.astype({"rating": "float32"}), item_cluster


def test_bprmf_seeded_and_learns_taste_clusters():
    log, cluster = _cluster_log()
    mf = BPRMF(dim=8, epochs=15, seed=0, batch_size=128).fit(log)
    ids, emb = mf.item_ids_, mf.item_emb_
    assert ids.dtype == np.int64 and emb.dtype == np.float32 and emb.shape == (60, 8)
    np.testing.assert_array_equal(ids, np.arange(1, 61))
    emb2 = BPRMF(dim=8, epochs=15, seed=0, batch_size=128).fit(log).item_emb_
    np.testing.assert_array_equal(emb, emb2)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = e @ e.T
    same = cluster[:, None] == cluster[None, :]
    np.fill_diagonal(same, False)
    diff = cluster[:, None] != cluster[None, :]
    assert sims[same].mean() > sims[diff].mean() + 0.3
    # training lowers the BPR loss; another seed gives other vectors
    assert len(mf.loss_) == 15 and mf.loss_[-1] < mf.loss_[0]
    other = BPRMF(dim=8, epochs=15, seed=1, batch_size=128).fit(log).item_emb_
    assert not np.array_equal(emb, other)


def test_bprmf_from_config_and_state():
    log, _ = _cluster_log()
    cfg = PairsConfig(mf_dim=4, mf_epochs=2, seed=3)
    mf = BPRMF.from_config(cfg)
    assert (mf.dim, mf.epochs, mf.seed, mf.positive_threshold) == (4, 2, 3, 4.0)
    with pytest.raises(NotFittedError):
        mf.item_embeddings()
    ids, emb = mf.fit(log).item_embeddings()
    assert emb.shape == (60, 4) and ids is mf.item_ids_
    assert mf.user_emb_.shape == (mf.user_ids_.size, 4) and mf.item_bias_.shape == (60,)


def test_bprmf_refuses_bad_input():
    log, _ = _cluster_log()
    with pytest.raises(InputError, match="dim"):
        BPRMF(dim=0).fit(log)
    with pytest.raises(InputError, match="no positive"):
        BPRMF(epochs=1).fit(log.assign(rating=1.0))
    with pytest.raises(InputError, match="DataFrame"):
        BPRMF(epochs=1).fit(log.to_numpy())
    with pytest.raises(InputError, match="NaN"):
        BPRMF(epochs=1).fit(log.assign(rating=np.nan))
    with pytest.raises(InputError, match="missing column"):
        BPRMF(epochs=1).fit(pd.DataFrame({"user_id": [1]}))
