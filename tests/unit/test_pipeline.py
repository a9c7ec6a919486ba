"""pipeline.fit_item_space: served-forward codes, held-out items, pool items, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from qarm_features.build.pipeline import choose_val_items, fit_item_space, split_test_items
from qarm_features.bundle.encode import align_with_weights
from qarm_features.errors import InputError
from tests.unit._small_pipeline import small_config, small_world

CFG = small_config(max_epochs=4)


@pytest.fixture(scope="module")
def world():
    return small_world()


@pytest.fixture(scope="module")
def space(world):
    ids, content, inter = world
    return fit_item_space(content, ids, inter, CFG, heldout_fraction=0.2)


def test_codes_come_from_the_served_forward(space, world):
    ids, content, _ = world
    served = align_with_weights(space.weights, content)
    np.testing.assert_array_equal(space.aligned, served)
    np.testing.assert_array_equal(space.rq_codes, space.rq.encode(served))
    vq = space.vq_codes()
    assert vq.shape == (ids.size, 4) and not (vq == ids[:, None]).any()  # itself excluded


def test_heldout_items_never_reach_the_aligner(space):
    held = space.heldout_items
    assert held.size > 0
    tr = space.train_pairs
    assert not (tr["trigger_id"].isin(held) | tr["target_id"].isin(held)).any()
    assert len(space.train_pairs) + len(space.heldout_pairs) == len(space.pairs)
    m = space.metrics
    assert m["heldout_items"] == held.size
    assert m["heldout"]["aligned"]["n_pairs"] == len(space.heldout_pairs)
    assert m["aligner"]["n_train_pairs"] <= len(space.train_pairs)
    assert set(space.timings) == {"pairs_s", "aligner_s", "codes_s"}


def test_pool_items_fit_the_codebooks_and_seeding(world, space):
    ids, content, inter = world
    pool = ids[::2]
    other = fit_item_space(content, ids, inter, CFG, heldout_fraction=0.2, pool_items=pool)
    np.testing.assert_array_equal(other.pool_ids, pool)
    np.testing.assert_array_equal(other.aligned, space.aligned)  # same seed, same aligner
    assert set(other.vq_codes().ravel()) <= set(pool)
    reseeded = fit_item_space(content, ids, inter, CFG.with_seed(1), heldout_fraction=0.2)
    assert not np.array_equal(reseeded.heldout_items, space.heldout_items)
    assert CFG.with_seed(1).aligner.seed == CFG.with_seed(1).rq.seed == 1


def test_val_seed_draws_the_protocol_items(world):
    ids, content, inter = world
    s = fit_item_space(content, ids, inter, CFG, heldout_fraction=0.0, val_seed=7)
    want = choose_val_items(s.pairs, CFG.aligner.val_fraction, 7)
    assert s.heldout_items.size == 0 and len(s.train_pairs) == len(s.pairs)
    assert s.aligner.history_["n_val_items"] == want.size


def test_split_and_refusals(world, space):
    ids, content, inter = world
    tr, te, items = split_test_items(ids, space.pairs, 0.0, 0)
    assert items.size == 0 and len(te) == 0 and len(tr) == len(space.pairs)
    with pytest.raises(InputError, match="not in the catalog"):
        fit_item_space(content[:-1], ids[:-1], inter, CFG)
    with pytest.raises(InputError, match="rows"):
        fit_item_space(content[:-1], ids, inter, CFG)
