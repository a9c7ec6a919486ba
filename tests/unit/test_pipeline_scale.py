"""pipeline at scale: the catalog forward runs in row blocks and the held-out metrics on a
bounded, seeded sample; on a small catalog (one block, a sample holding every pair) the
results are those of the unbounded pipeline. Each stage is logged and reported."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from qarm_features.build.pipeline import align_catalog, fit_item_space, sample_pairs, space_metrics
from qarm_features.bundle.encode import align_with_weights
from tests.unit._small_pipeline import small_config, small_world

CFG = small_config(max_epochs=3)


@pytest.fixture(scope="module")
def world():
    return small_world()


def test_the_blocked_forward_is_the_whole_forward():
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((1000, 24)).astype(np.float32)
    w = {"proj.weight": rng.standard_normal((8, 24)).astype(np.float32),
         "mlp.0.weight": rng.standard_normal((16, 24)).astype(np.float32),
         "mlp.0.bias": rng.standard_normal(16).astype(np.float32),
         "mlp.2.weight": rng.standard_normal((8, 16)).astype(np.float32),
         "mlp.2.bias": rng.standard_normal(8).astype(np.float32)}  # fmt: skip
    whole = align_with_weights(w, raw)
    rows: list[int] = []
    blocked = align_catalog(w, raw, chunk=128, advance=rows.append)
    np.testing.assert_array_equal(blocked, whole)
    assert rows == [128] * 7 + [104]
    assert align_catalog(w, raw) is not None and np.array_equal(align_catalog(w, raw), whole)


def test_small_catalogs_measure_every_pair(world):
    ids, content, inter = world
    bounded = fit_item_space(content, ids, inter, CFG, heldout_fraction=0.2)
    unbounded_cfg = CFG.model_copy(
        update={"heldout_max_pairs": None, "heldout_recall_budget": None}
    )
    unbounded = fit_item_space(content, ids, inter, unbounded_cfg, heldout_fraction=0.2)
    assert bounded.metrics["heldout"] == unbounded.metrics["heldout"]
    assert "n_pairs_auc" not in bounded.metrics["heldout"]["aligned"]
    np.testing.assert_array_equal(bounded.aligned, unbounded.aligned)
    np.testing.assert_array_equal(bounded.rq_codes, unbounded.rq_codes)


def test_large_pair_sets_are_sampled_with_a_seed(world):
    ids, content, _ = world
    rng = np.random.default_rng(1)
    pairs = pd.DataFrame({"trigger_id": rng.choice(ids, 600), "target_id": rng.choice(ids, 600)})
    pop = np.ones(ids.size)
    # recall budget 100 pairs x 150 items: 100 pairs ranked; pair-AUC on 300
    kw = {"seed": 3, "max_pairs": 300, "recall_budget": 100 * ids.size}
    a = space_metrics(content, ids, pairs, pop, **kw)
    assert a == space_metrics(content, ids, pairs, pop, **kw)
    assert (a["n_pairs"], a["n_pairs_auc"], a["n_pairs_recall"]) == (600, 300, 100)
    other = space_metrics(content, ids, pairs, pop, **{**kw, "seed": 4})
    assert other["pair_auc"] != a["pair_auc"]
    sample = sample_pairs(pairs, 300, seed=3)
    assert len(sample) == 300 and sample.merge(pairs).shape[0] >= 300  # rows of pairs
    assert sample_pairs(pairs, 600, seed=3) is pairs


def test_build_stages_are_logged_and_reported(world, caplog):
    ids, content, inter = world
    seen: list[tuple] = []
    with caplog.at_level(logging.INFO, logger="qarm_features.build.pipeline"):
        space = fit_item_space(content, ids, inter, CFG, on_progress=lambda *e: seen.append(e))
    names = ["pairs", "aligner", "forward", "codes", "evaluate"]
    assert list(space.stages) == names
    assert all(space.stages[n]["peak_rss_mib"] > 0 for n in names)
    logged = [r.getMessage() for r in caplog.records if r.name == "qarm_features.build.pipeline"]
    for n in names:
        assert any(m.startswith(f"stage {n}: ") and "peak RSS" in m for m in logged), n
    epochs = [adv for name, total, adv in seen if name == "aligner"]
    assert epochs[0] == 0 and sum(epochs) == space.aligner.history_["epochs_run"] >= 1
    assert sum(adv for name, _, adv in seen if name == "forward") == ids.size
    # epoch records reached the counter, not the handlers (the logger was at WARNING)
    assert not any("aligner epoch" in r.getMessage() for r in caplog.records)
