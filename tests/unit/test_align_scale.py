"""align at scale: per-epoch validation scores a bounded, seeded sample of validation pairs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from qarm_features.align import aligner as align_mod
from qarm_features.align.aligner import ItemAligner
from qarm_features.config import AlignerConfig
from qarm_features.metrics import pair_auc, pair_recall_at_k

torch.set_num_threads(1)


def test_validation_scores_a_bounded_seeded_sample(monkeypatch):
    monkeypatch.setattr(align_mod, "_VAL_AUC_PAIRS", 40)
    monkeypatch.setattr(align_mod, "_VAL_RECALL_PAIRS", 10)
    rng = np.random.default_rng(0)
    n = 300
    raw = rng.standard_normal((n, 16)).astype(np.float32)
    ids = np.arange(100, 100 + n, dtype=np.int64)
    a, b = rng.integers(0, n, 3000), rng.integers(0, n, 3000)
    pairs = pd.DataFrame({"trigger_id": ids[a], "target_id": ids[b]})
    pairs = pairs[pairs["trigger_id"] != pairs["target_id"]]
    cfg = AlignerConfig(out_dim=8, max_epochs=1, batch_size=64, seed=3)
    fit = ItemAligner(cfg).fit(raw, ids, pairs)
    h = fit.history_
    assert h["n_val_pairs"] > 40 and h["n_val_pairs_scored"] == 40
    # The raw-space figures are those of the documented sample: a seeded permutation of
    # the validation pairs, its first 40 for pair-AUC and first 10 for recall@10.
    hold = align_mod._hold_out_items(ids, *align_mod.pair_rows(pairs, ids), None, cfg)
    perm = np.random.default_rng(cfg.seed).permutation(len(hold.val_pairs))
    auc_pairs = hold.val_pairs.iloc[np.sort(perm[:40])]
    rec_pairs = hold.val_pairs.iloc[np.sort(perm[:10])]
    pop = np.bincount(np.concatenate(align_mod.pair_rows(pairs, ids)), minlength=n).astype(float)
    assert h["raw_val_pair_auc"] == pytest.approx(pair_auc(raw, ids, auc_pairs, pop, seed=3))
    assert h["raw_val_recall_at_10"] == pytest.approx(pair_recall_at_k(raw, ids, rec_pairs, k=10))
