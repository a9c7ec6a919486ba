"""Unit tests for qarm_features.ranking: shapes, gradients, id layout, attention masking.

The example DIN ranker built from these modules is tested in test_app_ranker.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from qarm_features.errors import InputError
from qarm_features.ranking import (
    CodeVocab,
    QarmEmbedding,
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


# --------------------------------------------------------------------------- content codes
def test_rq_content_slots_are_decoded_vectors_and_unseen_codes_score():
    """Content-initialised RQ rows: level slot = its centroid, prefix slot = the RQ
    reconstruction at that depth, each through its own map; zero tables still score."""
    rng = np.random.default_rng(0)
    L, K, d, dim = 3, 5, 4, 6
    cb = rng.normal(size=(L, K, d)).astype(np.float32)
    m = RQCodeEmbedding(L, K, dim, mode="both", codebooks=cb, pooling="none").eval()
    codes = torch.as_tensor(rng.integers(0, K, (7, L)))
    content = m.slot_content(codes).numpy()
    c = codes.numpy()
    for s, (kind, pos, _o, _n) in enumerate(m.slots):
        if kind == "level":
            ref = cb[pos, c[:, pos]]
        else:
            ref = sum(cb[j, c[:, j]] for j in range(pos))
        np.testing.assert_allclose(content[:, s], ref, rtol=1e-6, atol=1e-6)
    out = m(codes).detach().numpy()  # tables are zero: the output is the content path alone
    ref = np.einsum("nsd,sde->nse", content, m.content_proj.detach().numpy())
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert np.abs(out).sum() > 0
    with pytest.raises(InputError, match="codebooks"):
        RQCodeEmbedding(L, K, dim, codebooks=cb[:, :3])


def test_rq_level_dropout_training_only_and_truncates_deep_slots():
    L, K = 3, 4
    m = RQCodeEmbedding(L, K, 2, mode="both", pooling="none", level_dropout=0.99)
    with torch.no_grad():
        m.table.weight.fill_(1.0)
    codes = torch.zeros((2000, L), dtype=torch.long)
    torch.manual_seed(0)
    m.train()
    out = m(codes)[..., 0]  # (n, n_slots): 1 kept, 0 dropped
    depth = m.slot_depth
    assert (out[:, depth == 1] == 1).all()  # the first level is never dropped
    assert (out[:, depth == L] == 0).float().mean() > 0.95  # deepest: dropped ~always
    kept2 = out[:, depth == 2][:, 0]
    assert 0.3 < kept2.float().mean() < 0.7  # depth 2 kept when the draw keeps 2 levels
    m.eval()
    assert (m(codes) == 1).all()
    with pytest.raises(InputError, match="level_dropout"):
        RQCodeEmbedding(L, K, 2, level_dropout=1.0)


def test_vq_content_is_pooled_pool_embedding_through_a_map():
    rng = np.random.default_rng(1)
    vocab, k, d, dim = 6, 3, 5, 4
    pe = rng.normal(size=(vocab, d)).astype(np.float32)
    m = VQCodeEmbedding(vocab, dim, k=k, pool_emb=pe).eval()
    codes = torch.tensor([[0, 2, -1], [5, 5, 1]])
    out = m(codes).detach().numpy()
    w = torch.softmax(m.rank_logits, 0).detach().numpy()
    W = m.content_proj.weight.detach().numpy()
    for i, row in enumerate(codes.numpy()):
        valid = row >= 0
        ww = w * valid / (w * valid).sum()
        pooled = (pe[np.maximum(row, 0)] * ww[:, None]).sum(0)
        np.testing.assert_allclose(out[i], W @ pooled, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="pool_emb"):
        VQCodeEmbedding(vocab, dim, k=k, pool_emb=pe[:2])


def test_qarm_embedding_with_content_reads_shapes_from_bundle_arrays():
    rng = np.random.default_rng(2)
    cb = rng.normal(size=(2, 4, 3)).astype(np.float32)
    pe = rng.normal(size=(9, 3)).astype(np.float32)
    m = QarmEmbedding.with_content(5, rq_codebooks=cb, vq_pool_emb=pe, vq_k=2, rq_mode="prefix")
    assert m.rq.n_levels == 2 and m.rq.n_codes == 4 and m.vq.vocab_size == 9 and m.out_dim == 10
    out = m(torch.tensor([[3, 1]]), torch.tensor([[8, -1]]))
    assert out.shape == (1, 10) and out.abs().sum() > 0  # zero tables, content still scores
    with pytest.raises(InputError, match="vq_k"):
        QarmEmbedding.with_content(5, vq_pool_emb=pe)
