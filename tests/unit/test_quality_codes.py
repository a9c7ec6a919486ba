"""Issue 11 on the synthetic world, where the answer is known: do QARM codes keep the
item quality a cold item's content carries?

The world's content holds ground-truth ``quality`` along one weak direction
(``content_quality``); ratings depend on it, co-engagement does not. A ridge probe fitted
on warm items and scored on cold items (no interaction, never seen by the aligner, codes
fitted without them) reads quality from what a ranker's code embedding can express:

* plain code tables (code / prefix ids): a cold item whose prefix no warm item shares
  gets the zero row, and k-means cells average quality out;
* content-initialised code embeddings (the evaluation's default, ``content_codes``): each
  slot is a learned map of the code's decoded vector, so unseen codes still score.
"""

from __future__ import annotations

import numpy as np
import pytest

from qarm_features.build.pipeline import fit_item_space
from qarm_features.config import AlignerConfig, BuildConfig, PairsConfig, RQConfig
from qarm_features.datasets.synthetic import SyntheticWorld

torch = pytest.importorskip("torch")


def _probe(x, quality, warm):
    from sklearn.linear_model import Ridge

    model = Ridge(alpha=1.0).fit(x[warm], quality[warm])
    return float(np.corrcoef(model.predict(x[~warm]), quality[~warm])[0, 1])


def _prefix_one_hot(codes, n_codes, warm):
    """What plain code tables can express: one indicator per prefix seen on warm items."""
    cols = []
    key = np.zeros(len(codes), np.int64)
    for level in range(codes.shape[1]):
        key = key * n_codes + codes[:, level]
        seen = np.unique(key[warm])
        pos = np.clip(np.searchsorted(seen, key), 0, seen.size - 1)
        hit = seen[pos] == key
        m = np.zeros((len(codes), seen.size), np.float32)
        m[np.flatnonzero(hit), pos[hit]] = 1.0
        cols.append(m)
    return np.concatenate(cols, axis=1)


def _decoded_slots(codebooks, codes):
    """The content of every RQ slot (ranking.RQCodeEmbedding.slot_content, mode 'both')."""
    per_level = np.stack([codebooks[l][codes[:, l]] for l in range(codes.shape[1])], axis=1)
    n = len(codes)
    return np.concatenate([per_level.reshape(n, -1), per_level.cumsum(1).reshape(n, -1)], 1)


def test_content_codes_keep_cold_item_quality_that_code_ids_lose():
    torch.set_num_threads(1)
    world = SyntheticWorld(
        800, 600, collab_dim=8, content_dim=32, n_clusters=8, seed=0, content_quality=0.3
    )
    interactions = world.interactions(n_per_user=15)
    ids, quality = world.item_ids, world.quality
    cold = np.random.default_rng(0).choice(ids, 160, replace=False)
    warm = ~np.isin(ids, cold)
    cfg = BuildConfig(
        pairs=PairsConfig(mf_epochs=5),
        aligner=AlignerConfig(out_dim=16, max_epochs=8, patience=3),
        rq=RQConfig(n_levels=3, n_codes=16, n_iter=10),
    )
    space = fit_item_space(
        world.content,
        ids,
        interactions[~interactions["item_id"].isin(cold)],
        cfg,
        heldout_fraction=0.0,
        val_seed=1,
        pool_items=ids[warm],
    )
    content = _probe(world.content, quality, warm)
    code_ids = _probe(_prefix_one_hot(space.rq_codes, 16, warm), quality, warm)
    content_codes = _probe(_decoded_slots(space.rq.codebooks_, space.rq_codes), quality, warm)
    assert content > 0.9  # the content does know quality (the setting is as intended)
    assert content_codes > code_ids + 0.05  # the shipped code embeddings keep more of it
