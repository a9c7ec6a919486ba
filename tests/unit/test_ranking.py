"""Unit tests for qarm_features.ranking: shapes, gradients, id layout, attention masking."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from qarm_features.errors import InputError
from qarm_features.ranking import (
    CodeVocab,
    DINRanker,
    ItemFeatures,
    QarmEmbedding,
    RankerConfig,
    RQCodeEmbedding,
    TargetAttention,
    VQCodeEmbedding,
)

torch.set_num_threads(1)


def _all_codes(n_levels, n_codes):
    return torch.tensor(list(itertools.product(range(n_codes), repeat=n_levels)))


# --------------------------------------------------------------------------- RQ codes
def test_rq_shapes_any_leading_dims():
    emb = RQCodeEmbedding(3, 8, 16)
    codes = torch.randint(0, 8, (4, 5, 3))
    assert emb(codes).shape == (4, 5, 16)
    assert emb(codes[0, 0]).shape == (16,)
    slots = RQCodeEmbedding(3, 8, 16, pooling="none")(codes)
    assert slots.shape == (4, 5, 3 + 2, 16)  # 3 level unigrams + prefixes of length 2, 3


def test_rq_level_offsets_do_not_collide():
    emb = RQCodeEmbedding(4, 6, 8, mode="level")
    same_value = torch.full((1, 4), 2)  # code 2 at every level
    ids = emb.slot_ids(same_value)[0]
    assert len(set(ids.tolist())) == 4  # equal values at different levels: different rows
    ranges = []
    all_ids = emb.slot_ids(_all_codes(4, 6))
    for level in range(4):
        col = all_ids[:, level]
        ranges.append(set(col.tolist()))
        assert len(ranges[-1]) == 6  # every code value of a level has its own row
    for a, b in itertools.combinations(ranges, 2):
        assert not a & b
    assert max(max(r) for r in ranges) < emb.n_rows


def test_prefix_ids_distinct_across_prefixes_and_lengths():
    emb = RQCodeEmbedding(3, 5, 8, mode="prefix")  # K**3 = 125 <= budget: exact
    codes = _all_codes(3, 5)
    ids = emb.slot_ids(codes)  # (125, 3): prefix lengths 1, 2, 3
    for length in range(1, 4):
        prefixes = {tuple(c[:length].tolist()) for c in codes}
        col = ids[:, length - 1]
        # a row per distinct prefix, and the same prefix always gets the same row
        assert len(set(col.tolist())) == len(prefixes) == 5**length
        for p in prefixes:
            rows = [i for i, c in enumerate(codes) if tuple(c[:length].tolist()) == p]
            assert len(set(col[rows].tolist())) == 1
    per_length = [set(ids[:, j].tolist()) for j in range(3)]
    for a, b in itertools.combinations(per_length, 2):
        assert not a & b  # (c1) never shares a row with (c1, c2) or (c1, c2, c3)


def test_both_mode_layout_disjoint_and_in_range():
    emb = RQCodeEmbedding(3, 4, 8, mode="both")
    ids = emb.slot_ids(_all_codes(3, 4))
    blocks = [set(ids[:, j].tolist()) for j in range(emb.n_slots)]
    for a, b in itertools.combinations(blocks, 2):
        assert not a & b
    assert ids.min() >= 0 and ids.max() < emb.n_rows == 3 * 4 + 16 + 64


def test_prefix_hashing_beyond_budget_stays_in_range_and_no_overflow():
    emb = RQCodeEmbedding(12, 256, 4, mode="prefix", prefix_buckets=1000)  # 256**12 >> 2**63
    codes = torch.randint(0, 256, (500, 12), generator=torch.Generator().manual_seed(0))
    ids = emb.slot_ids(codes)
    for kind, length, offset, size in emb.slots:
        col = ids[:, length - 1]
        assert col.min() >= offset and col.max() < offset + size
    # hashed long prefixes still spread: 500 random prefixes take many distinct rows
    assert len(set(ids[:, -1].tolist())) > 350


def test_rq_rejects_out_of_range_and_wrong_width():
    emb = RQCodeEmbedding(2, 4, 8)
    with pytest.raises(InputError, match="lie in"):
        emb(torch.tensor([[0, 4]]))
    with pytest.raises(InputError, match="RQ levels"):
        emb(torch.tensor([[0, 1, 2]]))


def test_gradient_reaches_rq_code_rows():
    emb = RQCodeEmbedding(2, 4, 8)
    codes = torch.tensor([[1, 2]])
    emb(codes).sum().backward()
    used = emb.slot_ids(codes)[0]
    grad_rows = torch.nonzero(emb.table.weight.grad.abs().sum(1)).flatten()
    assert set(grad_rows.tolist()) == set(used.tolist())


# --------------------------------------------------------------------------- VQ codes
def test_vq_pooling_ignores_padding_and_gradients_flow():
    emb = VQCodeEmbedding(10, 8, k=3, rank_weights=False, init_std=0.1)
    a = emb(torch.tensor([[4, -1, -1]]))
    torch.testing.assert_close(a[0], emb.table.weight[5])  # mean over the one valid code
    assert torch.all(emb(torch.tensor([[-1, -1, -1]])) == 0)  # all padding -> zeros
    emb.zero_grad()
    emb(torch.tensor([[1, 2, -1]])).sum().backward()
    rows = torch.nonzero(emb.table.weight.grad.abs().sum(1)).flatten().tolist()
    assert rows == [2, 3]  # codes 1, 2 shifted past the padding row


def test_vq_rank_weights_shapes_and_learnable():
    emb = VQCodeEmbedding(10, 8, k=4)
    out = emb(torch.randint(0, 10, (2, 7, 4)))
    assert out.shape == (2, 7, 8)
    out.sum().backward()
    assert emb.rank_logits.grad is not None
    with pytest.raises(InputError, match="CodeVocab"):
        emb(torch.tensor([[0, 1, 2, 10]]))


def test_vq_shared_table_reads_item_rows():
    items = torch.nn.Embedding(6, 4, padding_idx=0)
    emb = VQCodeEmbedding(5, 4, k=2, rank_weights=False, table=items)
    out = emb(torch.tensor([[0, 3], [2, -1]]))
    torch.testing.assert_close(out[0], (items.weight[1] + items.weight[4]) / 2)
    torch.testing.assert_close(out[1], items.weight[3])
    out.sum().backward()
    assert items.weight.grad[[1, 3, 4]].abs().sum() > 0 and items.weight.grad[0].abs().sum() == 0
    with pytest.raises(InputError, match="padding_idx"):
        VQCodeEmbedding(5, 4, k=2, table=torch.nn.Embedding(6, 4))


def test_unseen_codes_contribute_nothing_by_default():
    emb = RQCodeEmbedding(2, 4, 8)
    assert torch.all(emb(torch.tensor([[1, 2]])) == 0)  # zero init: no noise for cold codes
    assert RQCodeEmbedding(2, 4, 8, init_std=0.1)(torch.tensor([[1, 2]])).abs().sum() > 0


def test_code_vocab_maps_unknown_to_padding():
    vocab = CodeVocab([100, 7, 42])
    out = vocab.map([[7, 42, 5], [-1, 100, 7]])
    assert out.tolist() == [[1, 2, -1], [-1, 0, 1]]
    with pytest.raises(InputError):
        CodeVocab([1, 1])


def test_qarm_embedding_concatenates_parts():
    m = QarmEmbedding(8, rq_levels=2, rq_codes=4, vq_vocab=10, vq_k=3)
    out = m(torch.randint(0, 4, (5, 2)), torch.randint(0, 10, (5, 3)))
    assert out.shape == (5, 16) and m.out_dim == 16
    with pytest.raises(InputError, match="required"):
        m(torch.randint(0, 4, (5, 2)))
    with pytest.raises(InputError):
        QarmEmbedding(8)


# --------------------------------------------------------------------------- attention
def test_target_attention_masks_padding():
    torch.manual_seed(0)
    att = TargetAttention(6, hidden=(8,))
    q = torch.randn(3, 6)
    keys = torch.randn(3, 5, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = att(q, keys, mask)
    assert out.shape == (3, 6)
    noisy = keys.clone()
    noisy[~mask] = 1e3 * torch.randn(int((~mask).sum()), 6)  # garbage in padded slots
    torch.testing.assert_close(att(q, noisy, mask), out)
    assert torch.all(out[2] == 0) and torch.isfinite(out).all()  # empty history -> zeros
    # one valid key: the output is that key
    torch.testing.assert_close(
        att(q[:1], keys[:1], torch.tensor([[0, 0, 1, 0, 0]]).bool())[0], keys[0, 2]
    )


def test_target_attention_depends_on_query():
    torch.manual_seed(1)
    att = TargetAttention(4, hidden=(8,))
    keys = torch.randn(1, 6, 4).expand(2, 6, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    out = att(torch.randn(2, 4), keys, mask)
    assert not torch.allclose(out[0], out[1])


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


def test_id_dropout_only_in_training():
    model, items = _tiny_ranker(id_dropout=0.5)
    model.eval()
    a = model.item_tower(items)
    torch.testing.assert_close(model.item_tower(items), a)  # eval: deterministic, ids kept
    model.train()
    torch.manual_seed(0)
    b = model.item_tower(items)
    dropped = (b.abs().sum(1) == 0) & (a.abs().sum(1) > 0)
    assert 0 < int(dropped.sum()) < len(items)


def test_ranker_rejects_mismatched_history():
    model, items = _tiny_ranker()
    user, target, hist, label = _batch()
    with pytest.raises(InputError, match="hist"):
        model(items, user, target, hist, label[:, :2])
