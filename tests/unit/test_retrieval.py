"""retrieval: the BPR-MF estimator is seeded, learns taste clusters (as well as the dense-Adam
reference it replaced) and refuses bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from _logs import cluster_log as _cluster_log  # noqa: E402  (tests/unit on sys.path)
from _retrieval_reference import ReferenceBPRMF  # noqa: E402  (tests/unit on sys.path)

from qarm_features.config import PairsConfig
from qarm_features.errors import InputError, NotFittedError
from qarm_features.pairs.retrieval import BPRMF

torch.set_num_threads(1)


def test_bprmf_seeded_and_learns_taste_clusters():
    log, cluster = _cluster_log()
    mf = BPRMF(dim=8, epochs=15, seed=0).fit(log)
    ids, emb = mf.item_ids_, mf.item_emb_
    assert ids.dtype == np.int64 and emb.dtype == np.float32 and emb.shape == (60, 8)
    np.testing.assert_array_equal(ids, np.arange(1, 61))
    emb2 = BPRMF(dim=8, epochs=15, seed=0).fit(log).item_emb_
    np.testing.assert_array_equal(emb, emb2)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = e @ e.T
    same = cluster[:, None] == cluster[None, :]
    np.fill_diagonal(same, False)
    diff = cluster[:, None] != cluster[None, :]
    assert sims[same].mean() > sims[diff].mean() + 0.3
    # training raises the sampled train AUC from chance; another seed gives other vectors
    assert len(mf.train_auc_) == 15 and mf.train_auc_[0] < 0.6 < 0.9 < mf.train_auc_[-1]
    other = BPRMF(dim=8, epochs=15, seed=1).fit(log).item_emb_
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
    with pytest.raises(InputError, match="n_threads"):
        BPRMF(n_threads=0).fit(log)
    with pytest.raises(InputError, match="no positive"):
        BPRMF(epochs=1).fit(log.assign(rating=1.0))
    with pytest.raises(InputError, match="DataFrame"):
        BPRMF(epochs=1).fit(log.to_numpy())
    with pytest.raises(InputError, match="NaN"):
        BPRMF(epochs=1).fit(log.assign(rating=np.nan))
    with pytest.raises(InputError, match="missing column"):
        BPRMF(epochs=1).fit(pd.DataFrame({"user_id": [1]}))


def _cluster_separation(emb, cluster):
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = e @ e.T
    same = cluster[:, None] == cluster[None, :]
    np.fill_diagonal(same, False)
    return sims[same].mean() - sims[cluster[:, None] != cluster[None, :]].mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bprmf_separates_clusters_at_least_as_well_as_the_dense_reference(seed):
    # Same log, same dim and epochs: the sparse-SGD model against the dense-Adam trainer it
    # replaced (tests/unit/_retrieval_reference.py), both with their defaults otherwise.
    log, cluster = _cluster_log(seed=seed)
    new = BPRMF(dim=8, epochs=30, seed=seed).fit(log)
    ref = ReferenceBPRMF(dim=8, epochs=30, seed=seed, batch_size=128).fit(log)
    np.testing.assert_array_equal(new.item_ids_, ref.item_ids_)
    np.testing.assert_array_equal(new.user_ids_, ref.user_ids_)
    assert _cluster_separation(new.item_emb_, cluster) >= _cluster_separation(
        ref.item_emb_, cluster
    ) - 0.05
