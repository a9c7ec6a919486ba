"""Unit tests for qarm_features.app.ranker: the example DIN ranker over QARM features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qarm_features.app.ranker import DINRanker, RankerConfig
from qarm_features.errors import InputError
from qarm_features.ranking import ItemFeatures

torch.set_num_threads(1)


# --------------------------------------------------------------------------- ranker
def _tiny_ranker(**kw):
    n = 12
    cfg = RankerConfig(n_users=5, n_item_ids=n + 1, dim=8, mlp_hidden=(16,), **kw)
    rng = np.random.default_rng(0)
    items = ItemFeatures.from_numpy(
        id_index=np.r_[np.arange(1, n - 1), [0, 0]],  # two cold items -> OOV id row
        rq=rng.integers(0, 4, (n, 2)) if kw.get("rq_levels") else None,
        vq=rng.integers(-1, kw.get("vq_vocab", 9), (n, 3)) if kw.get("vq_vocab") else None,
        dense=rng.normal(size=(n, 5)).astype(np.float32) if kw.get("dense_dim") else None,
    )
    return DINRanker(cfg), items


def _batch():
    user = torch.tensor([1, 2, 0, 4])
    target = torch.tensor([0, 3, 10, 11])
    hist = torch.tensor([[1, 2, -1], [4, 5, 6], [-1, -1, -1], [10, 7, -1]])
    label = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 0]])
    return user, target, hist, label


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"dense_dim": 5},
        {"rq_levels": 2, "rq_codes": 4},
        {"vq_vocab": 9, "vq_k": 3},
        {"rq_levels": 2, "rq_codes": 4, "vq_vocab": 9, "vq_k": 3, "dense_dim": 5},
    ],
)
def test_ranker_shapes_and_finite(kw):
    model, items = _tiny_ranker(**kw)
    logits = model(items, *_batch())
    assert logits.shape == (4,) and torch.isfinite(logits).all()


def test_ranker_gradient_reaches_code_embeddings():
    model, items = _tiny_ranker(rq_levels=2, rq_codes=4, vq_vocab=9, vq_k=3)
    # Zero-init heads would block gradients; check the real init lets them through.
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        model(items, *_batch()), torch.tensor([1.0, 0.0, 1.0, 0.0])
    )
    loss.backward()
    assert model.qarm.rq.table.weight.grad.abs().sum() > 0
    assert model.qarm.vq.table.weight.grad.abs().sum() > 0
    assert model.qarm.vq.table.weight.grad[0].abs().sum() == 0  # padding row frozen
    # the cold target (row 10, OOV id) still gets a code gradient: that is the point
    rows = model.qarm.rq.slot_ids(items.rq[10:11])[0]
    assert model.qarm.rq.table.weight.grad[rows].abs().sum() > 0


def test_ranker_history_padding_is_ignored():
    model, items = _tiny_ranker(rq_levels=2, rq_codes=4)
    model.eval()
    torch.nn.init.normal_(model.label_emb.weight)  # zero at init; make labels matter
    user, target, hist, label = _batch()
    out = model(items, user, target, hist, label)
    label2 = label.clone()
    label2[hist < 0] = 1  # labels under padding must not matter
    torch.testing.assert_close(model(items, user, target, hist, label2), out)
    hist2 = hist.clone()
    hist2[hist < 0] = -5  # any negative row is padding
    torch.testing.assert_close(model(items, user, target, hist2, label2), out)
    label3 = label.clone()
    label3[0, 0] = 1 - label3[0, 0]  # a real label does matter
    assert not torch.allclose(model(items, user, target, hist, label3)[0], out[0])


def test_ranker_vq_tied_shares_item_table():
    model, items = _tiny_ranker(vq_vocab=12, vq_k=3, vq_tied=True)
    assert model.qarm.vq.table is model.item_emb
    n_params = sum(p.numel() for p in model.parameters())
    untied, _ = _tiny_ranker(vq_vocab=12, vq_k=3)
    assert n_params < sum(p.numel() for p in untied.parameters())
    assert torch.isfinite(model(items, *_batch())).all()
    with pytest.raises(InputError, match="vq_tied"):
        _tiny_ranker(vq_vocab=9, vq_k=3, vq_tied=True)


def test_ranker_rejects_mismatched_history():
    model, items = _tiny_ranker()
    user, target, hist, label = _batch()
    with pytest.raises(InputError, match="hist"):
        model(items, user, target, hist, label[:, :2])
