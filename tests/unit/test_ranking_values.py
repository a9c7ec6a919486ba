"""Code-embedding modules of qarm_features.ranking, checked on values, not shapes.

Row ids are derived by hand from the documented table layout; forward passes use tables
whose row ``r`` holds the value ``r`` (or a one-hot), so every pooled output has an exact
expected value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qarm_features.ranking import (
    CodeVocab,
    QarmEmbedding,
    RQCodeEmbedding,
    TargetAttention,
    VQCodeEmbedding,
)

torch.set_num_threads(1)


def _rows_hold_their_index(table: torch.nn.Embedding) -> None:
    """Row ``r`` of ``table`` becomes ``[r, r, ..., r]``."""
    with torch.no_grad():
        n, dim = table.weight.shape
        table.weight.copy_(torch.arange(n, dtype=torch.float32)[:, None].expand(n, dim))


# --------------------------------------------------------------------------- CodeVocab


def test_code_vocab_maps_every_id_to_its_position_and_keeps_the_shape():
    ids = np.array([900, 5, 77, 12], dtype=np.int64)
    vocab = CodeVocab(ids)
    assert len(vocab) == 4
    np.testing.assert_array_equal(vocab.map(ids), [0, 1, 2, 3])
    out = vocab.map(np.array([[[12, 900]], [[-1, 6]]]))
    assert out.shape == (2, 1, 2) and out.dtype == np.int64
    assert out.tolist() == [[[3, 0]], [[-1, -1]]]
    assert CodeVocab(np.empty(0, np.int64)).map([1, 2]).tolist() == [-1, -1]


# --------------------------------------------------------------------------- RQ


def test_rq_slot_ids_follow_the_documented_layout_exactly():
    codes = torch.tensor([[1, 2, 3]])  # L = 3, K = 4
    # level: level l's unigram lives at l * K + c_l
    assert RQCodeEmbedding(3, 4, 8, mode="level").slot_ids(codes).tolist() == [[1, 6, 11]]
    # prefix: lengths 1, 2, 3 at offsets 0, 4, 4 + 16; (1, 2) = 1*4 + 2 = 6,
    # (1, 2, 3) = 1*16 + 2*4 + 3 = 27
    assert RQCodeEmbedding(3, 4, 8, mode="prefix").slot_ids(codes).tolist() == [[1, 10, 47]]
    # both: 3 unigram blocks (12 rows), then prefixes of length 2 (offset 12) and 3 (28)
    both = RQCodeEmbedding(3, 4, 8)
    assert both.slot_ids(codes).tolist() == [[1, 6, 11, 18, 55]]
    assert both.n_rows == 12 + 16 + 64


def test_rq_hashed_prefixes_are_the_mixed_radix_value_modulo_the_prime():
    emb = RQCodeEmbedding(3, 4, 8, mode="prefix", prefix_buckets=10)
    assert emb.prefix_modulus == 7  # the largest prime <= 10
    # sizes: length 1 min(4, 7) = 4, length 2 min(16, 7) = 7, length 3 min(64, 7) = 7
    assert [(s[2], s[3]) for s in emb.slots] == [(0, 4), (4, 7), (11, 7)]
    # (3) = 3; (3, 2) = 14 % 7 = 0; (3, 2, 1) = 57 % 7 = 1
    assert emb.slot_ids(torch.tensor([3, 2, 1])).tolist() == [3, 4 + 0, 11 + 1]


def test_rq_forward_sums_or_averages_exactly_the_slot_rows():
    codes = torch.tensor([[1, 2, 3], [0, 0, 0]])
    rows = [[1, 6, 11, 18, 55], [0, 4, 8, 12, 28]]  # as in the layout test
    for pooling in ("sum", "mean", "none"):
        emb = RQCodeEmbedding(3, 4, 2, pooling=pooling)
        _rows_hold_their_index(emb.table)
        got = emb(codes)
        r = torch.tensor(rows, dtype=torch.float32)
        want = {"sum": r.sum(1), "mean": r.mean(1), "none": r}[pooling]
        want = want.unsqueeze(-1).expand(*want.shape, 2)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_rq_zero_initialised_table_gives_exact_zeros_in_every_mode():
    codes = torch.tensor([[3, 0, 2], [1, 1, 1]])
    for mode in ("level", "prefix", "both"):
        for pooling in ("sum", "mean", "none"):
            out = RQCodeEmbedding(3, 4, 8, mode=mode, pooling=pooling)(codes)
            assert torch.count_nonzero(out) == 0, (mode, pooling)


# --------------------------------------------------------------------------- VQ


def test_vq_pooled_rank_weights_are_the_renormalised_softmax_over_valid_positions():
    emb = VQCodeEmbedding(10, 11, k=4)
    with torch.no_grad():
        emb.table.weight.copy_(torch.eye(11))  # code c reads row c + 1 = e_{c+1}
        emb.table.weight[0].zero_()  # padding
        emb.rank_logits.copy_(torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])))  # w ~ 1:2:3:4
    out = emb(torch.tensor([[0, 5, -1, 8], [7, 7, 7, 7]]))
    want0 = torch.zeros(11)
    want0[[1, 6, 9]] = torch.tensor([1.0, 2.0, 4.0]) / 7.0  # position 3 is padding
    want1 = torch.zeros(11)
    want1[8] = 1.0  # every position reads the same row: the weights sum to one
    torch.testing.assert_close(out, torch.stack([want0, want1]))


def test_vq_default_weights_are_a_plain_mean_and_zero_tables_give_zeros():
    emb = VQCodeEmbedding(6, 3, k=3)  # rank logits start at zero: uniform weights
    codes = torch.tensor([[0, 2, 4], [5, -1, -1]])
    assert torch.count_nonzero(emb(codes)) == 0  # zero init: nothing to say yet
    _rows_hold_their_index(emb.table)
    with torch.no_grad():
        emb.table.weight[0].zero_()  # the padding row stays zero, as the module keeps it
    got = emb(codes)
    # rows 1, 3, 5 -> mean 3; row 6 alone -> 6
    torch.testing.assert_close(got, torch.tensor([[3.0] * 3, [6.0] * 3]))


def test_vq_padding_row_is_zero_even_with_random_init():
    emb = VQCodeEmbedding(6, 3, k=2, init_std=1.0)
    assert torch.count_nonzero(emb.table.weight[0]) == 0
    assert torch.count_nonzero(emb.table.weight[1:]) > 0


# --------------------------------------------------------------------------- QarmEmbedding


def test_qarm_embedding_is_rq_then_vq_exactly():
    m = QarmEmbedding(2, rq_levels=2, rq_codes=3, vq_vocab=4, vq_k=2, rq_mode="level")
    rq, vq = torch.tensor([[2, 1]]), torch.tensor([[3, -1]])
    assert torch.count_nonzero(m(rq, vq)) == 0  # both tables start at zero
    _rows_hold_their_index(m.rq.table)
    _rows_hold_their_index(m.vq.table)
    with torch.no_grad():
        m.vq.table.weight[0].zero_()
    # RQ level mode: rows 2 and 3 + 1 = 4 -> 6; VQ: code 3 alone -> row 4
    torch.testing.assert_close(m(rq, vq), torch.tensor([[6.0, 6.0, 4.0, 4.0]]))
    rq_only = QarmEmbedding(2, rq_levels=2, rq_codes=3, rq_mode="level")
    rq_only.rq.table.load_state_dict(m.rq.table.state_dict())
    assert rq_only.out_dim == 2 and rq_only.vq is None
    torch.testing.assert_close(rq_only(rq), torch.tensor([[6.0, 6.0]]))


def test_qarm_embedding_passes_its_settings_through():
    shared = torch.nn.Embedding(5, 4, padding_idx=0)
    m = QarmEmbedding(
        4, rq_levels=3, rq_codes=4, vq_vocab=4, vq_k=2, rq_mode="prefix",
        prefix_buckets=10, vq_table=shared,
    )
    assert m.rq.mode == "prefix" and m.rq.prefix_modulus == 7
    assert m.vq.table is shared and m.out_dim == 8


# --------------------------------------------------------------------------- attention


def _score_is_first_key_coordinate(att: TargetAttention) -> None:
    """Set ``a(q, k) = relu(k[0])``: w_q = 0, w_k = e_0, w_x = 0, one unit, output 1."""
    with torch.no_grad():
        for p in att.parameters():
            p.zero_()
        att.w_k.weight[0, 0] = 1.0
        att.mlp[-1].weight.fill_(1.0)


def test_target_attention_weights_are_the_softmax_of_the_scores():
    att = TargetAttention(2, hidden=(1,))
    _score_is_first_key_coordinate(att)
    q = torch.randn(1, 2)
    keys = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 0.0]]])
    values = torch.tensor([[[4.0], [8.0], [1000.0]]])
    mask = torch.tensor([[True, True, False]])  # the third, highest-scoring key is padding
    # scores 0 and ln 3 -> weights 1/4, 3/4 -> 4/4 + 3*8/4 = 7
    torch.testing.assert_close(att(q, keys, mask, values), torch.tensor([[7.0]]))


def test_target_attention_query_key_interaction_term():
    # a(q, k) = relu(sum_d q_d k_d): only the W_x (q * k) part of the first layer is on.
    att = TargetAttention(2, hidden=(1,))
    with torch.no_grad():
        for p in att.parameters():
            p.zero_()
        att.w_x.weight.fill_(1.0)
        att.mlp[-1].weight.fill_(1.0)
    keys = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]]).expand(2, 2, 2)
    values = torch.tensor([[4.0], [8.0]]).expand(2, 2, 1)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # scores (ln 3, 0), then (0, 0)
    out = att(q, keys, torch.ones(2, 2, dtype=torch.bool), values)
    torch.testing.assert_close(out, torch.tensor([[3 * 4 / 4 + 8 / 4], [6.0]]))


def test_target_attention_one_valid_item_returns_its_value():
    torch.manual_seed(0)
    att = TargetAttention(4, hidden=(8, 4))
    q, keys, values = torch.randn(3, 4), torch.randn(3, 5, 4), torch.randn(3, 5, 7)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[torch.arange(3), torch.tensor([0, 2, 4])] = True
    out = att(q, keys, mask, values)
    torch.testing.assert_close(out, values[torch.arange(3), torch.tensor([0, 2, 4])])


def test_target_attention_equal_scores_average_the_valid_values():
    torch.manual_seed(1)
    att = TargetAttention(3, hidden=(6,))
    keys = torch.randn(1, 1, 3).expand(2, 4, 3)  # identical keys: identical scores
    values = torch.arange(8, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[True, True, True, True], [False, True, False, True]])
    out = att(torch.randn(2, 3), keys, mask, values)
    torch.testing.assert_close(out, torch.tensor([[1.5], [6.0]]))  # (0+1+2+3)/4, (5+7)/2


@pytest.mark.parametrize("hidden", [(1,), (8, 4)])
def test_target_attention_all_padding_is_exactly_zero(hidden):
    att = TargetAttention(2, hidden=hidden)
    out = att(torch.randn(2, 2), torch.randn(2, 3, 2), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.count_nonzero(out) == 0
