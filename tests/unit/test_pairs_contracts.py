"""pairs: today's contracts, pinned before the miners are replaced (issue 9 item 0).

Each test pins one behaviour a mutation audit found unguarded: which trigger wins a U2I
similarity tie between distinct items, which source wins a U2I/Swing deduplication tie,
that deduplication compares ranks as fractions of each source's list, and the exact value
of every statistic :func:`mine_pairs` reports. Hand-made logs with explicit item
embeddings (no BPR training); every expected value is derived in the comments.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _logs import log_frame as _log  # noqa: E402  (tests/unit on sys.path)

from qarm_features.config import PairsConfig
from qarm_features.pairs.mining import mine_pairs, mine_swing_pairs, mine_u2i_pairs


def _rows(pairs: pd.DataFrame) -> list[tuple]:
    return list(zip(pairs["trigger_id"], pairs["target_id"], pairs["source"]))


# ----------------------------------------------------------------- U2I similarity ties


def test_u2i_tie_between_distinct_items_goes_to_the_most_recent():
    # Items 1 and 2 point the same way (their normalised rows are bit-identical), so they
    # are exactly as similar to target 3. User 10 sees 1 then 2, user 20 sees 2 then 1:
    # the most recent candidate wins, whichever id it has.
    ids = np.array([1, 2, 3], dtype=np.int64)
    emb = np.array([[1, 0], [2, 0], [1, 1]], dtype=np.float32)
    log = _log([(10, 1, 5, 1), (10, 2, 5, 2), (10, 3, 5, 3),
                (20, 2, 5, 4), (20, 1, 5, 5), (20, 3, 5, 6)])
    got = mine_u2i_pairs(log, ids, emb, history=5)
    assert list(zip(got["trigger_id"], got["target_id"])) == [(1, 2), (2, 3), (2, 1), (1, 3)]
    np.testing.assert_allclose(got["score"], [1.0, 0.5**0.5, 1.0, 0.5**0.5], rtol=1e-6)


# ----------------------------------------------------------------- deduplication


# A=1 and B=2; users 1 and 2 engage B, then A (both positives, nothing else).
_TIE_LOG = _log([(1, 2, 5, 1), (1, 1, 5, 2), (2, 2, 5, 3), (2, 1, 5, 4)])
_AB_IDS = np.array([1, 2], dtype=np.int64)
_AB_EMB = np.array([[0, 1, 0], [0, 1, 1]], dtype=np.float32)  # cos(A, B) = 1/sqrt(2)


def test_u2i_wins_an_exact_rank_tie_with_swing_keeping_its_orientation_and_score():
    # U2I: one pair, B -> A (count 2, cosine 1/sqrt 2): rank_pct 0 of a 1-pair list.
    # Swing: A -> B and B -> A, both 0.5 / (1 + 2) = 1/6 (w = 1/sqrt 2 per user, overlap
    # 2), ties by trigger id: A -> B rank_pct 0, B -> A rank_pct 0.5.
    # {A, B} at rank 0 in both lists: U2I wins, in its own orientation and with its score.
    sw = mine_swing_pairs(_TIE_LOG)
    assert _rows(sw) == [(1, 2, "swing"), (2, 1, "swing")]
    np.testing.assert_allclose(sw["score"], [1 / 6, 1 / 6])
    pairs, stats = mine_pairs(_TIE_LOG, PairsConfig(), item_ids=_AB_IDS, item_emb=_AB_EMB)
    assert _rows(pairs) == [(2, 1, "u2i")]
    assert pairs["score"].tolist() == pytest.approx([0.5**0.5], rel=1e-6)
    assert stats["n_u2i_pairs"] == 1 and stats["n_swing_pairs"] == 2
    assert stats["n_pairs_by_source"] == {"u2i": 1}


# Ids: A=1, B=2, C=3, D=4, and items 5..11 engaged by one user each.
#   user 1: 5, C, D        user 2: 6, C, D        users 4, 5: B, A
#   users 6, 7, 14: D only user 13: C only        users 8..12: one of 7..11 only
# (all positives; a user with one positive gives no U2I event and no Swing pair).
_MIX_LOG = _log([
    (1, 5, 5, 1), (1, 3, 5, 2), (1, 4, 5, 3),
    (2, 6, 4, 4), (2, 3, 5, 5), (2, 4, 4, 6),
    (4, 2, 5, 7), (4, 1, 5, 8),
    (5, 2, 5, 9), (5, 1, 5, 10),
    (6, 4, 5, 11), (7, 4, 5, 12), (14, 4, 4, 12), (13, 3, 5, 13),
    (8, 7, 5, 16), (9, 8, 5, 17), (10, 9, 4, 18), (11, 10, 5, 19), (12, 11, 5, 20),
    (1, 7, 2, 14), (3, 1, 3, 15),  # negatives: never candidates, targets or counts
])
_MIX_IDS = np.arange(1, 12, dtype=np.int64)
_MIX_EMB = np.array(
    [[0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0.1, 0], [2, 0, 1], [1, 0, 2]] + [[0, 0, 1]] * 5,
    dtype=np.float32,
)
_COS_CD, _COS_AB = 1 / np.sqrt(1.01), 1 / np.sqrt(2)
_COS_5C, _COS_6C = 2 / np.sqrt(5), 1 / np.sqrt(5)


def test_dedup_compares_rank_fractions_not_sources_or_raw_scores():
    # U2I events: C<-5, D<-C (user 1; D's candidates 5 and C, C is nearer), C<-6, D<-C
    # (user 2), A<-B (users 4 and 5). Per pair, count desc then cosine desc:
    #   C->D (2, .995) 0,  B->A (2, .707) .25,  5->C (1, .894) .5,  6->C (1, .447) .75
    # Swing: {A, B} 1/6 (as above); {C, D} (1/sqrt 3)^2 / (1 + 2) = 1/9 (users 6, 7, 13
    # and 14 share only D or C with users 1 and 2, so add nothing); 5..11 have one user:
    #   A->B 0,  B->A .25,  C->D .5,  D->C .75
    # {A, B}: Swing rank 0 beats U2I rank .25 -> A->B, 1/6, swing (U2I's raw cosine .707
    # is larger than 1/6, and U2I comes first at equal rank, yet Swing wins on rank).
    # {C, D}: U2I rank 0 beats Swing rank .5 -> C->D, cosine, u2i. Best first; U2I first
    # at equal rank.
    pairs, _ = mine_pairs(_MIX_LOG, PairsConfig(), item_ids=_MIX_IDS, item_emb=_MIX_EMB)
    assert _rows(pairs) == [(3, 4, "u2i"), (1, 2, "swing"), (5, 3, "u2i"), (6, 3, "u2i")]
    assert pairs["score"].tolist() == pytest.approx(
        [_COS_CD, 1 / 6, _COS_5C, _COS_6C], rel=1e-6
    )
    assert pairs.dtypes.tolist() == [np.int64, np.int64, np.float64, object]


def test_mine_pairs_stats_exact_values():
    # Positives per item: D 5 (users 1, 2, 6, 7, 14), C 3 (users 1, 2, 13), A 2, B 2, and
    # 1 each for 5..11 -> 19 rows, 11 items. Pairs (above): targets D, B, C, C (shares
    # 5, 2, 3, 3 / 19: mean and median differ); items covered 1..6. Top 10% of 11 items
    # = ceil(1.1) = 2 items: D and C, share 8/19.
    _, stats = mine_pairs(_MIX_LOG, PairsConfig(), item_ids=_MIX_IDS, item_emb=_MIX_EMB)
    expected = {
        "n_positives": 19,
        "n_u2i_events": 6,  # C<-5, D<-C, C<-6, D<-C, A<-B, A<-B
        "n_u2i_pairs": 4,  # C->D, B->A, 5->C, 6->C
        "n_swing_pairs": 4,  # A->B, B->A, C->D, D->C
        "n_pairs": 4,
        "n_pairs_by_source": {"u2i": 3, "swing": 1},
        "n_items_covered": 6,
        "item_coverage": 6 / 11,
        "top10pct_items_positive_share": (5 + 3) / 19,
        "target_pop_share_mean": (5 + 2 + 3 + 3) / 19 / 4,  # D, B, C, C
        "target_pop_share_max": 5 / 19,
        "top_target_pair_share": 2 / 4,  # C is the target of two pairs
        "top10pct_items_pair_share": 3 / 4,  # D, C, C are top items, B is not
    }
    assert set(stats) == set(expected)
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-12), key
        assert type(stats[key]) is type(value), key  # plain int/float/dict: JSON-ready


def test_u2i_only_stats_count_events_before_min_pair_count():
    # min_pair_count=2 keeps C->D and B->A; n_u2i_events still counts all 6 events.
    cfg = PairsConfig(use_swing=False, min_pair_count=2)
    pairs, stats = mine_pairs(_MIX_LOG, cfg, item_ids=_MIX_IDS, item_emb=_MIX_EMB)
    assert _rows(pairs) == [(3, 4, "u2i"), (2, 1, "u2i")]
    assert "n_swing_pairs" not in stats
    assert (stats["n_u2i_events"], stats["n_u2i_pairs"], stats["n_pairs"]) == (6, 2, 2)
    assert stats["n_items_covered"] == 4 and stats["item_coverage"] == pytest.approx(4 / 11)
    assert stats["target_pop_share_mean"] == pytest.approx((5 + 2) / 19 / 2)  # D, A
    assert stats["top_target_pair_share"] == pytest.approx(1 / 2)
    assert stats["top10pct_items_pair_share"] == pytest.approx(1 / 2)  # D is, A is not


def test_u2i_wins_every_exact_rank_tie_in_long_lists():
    """Two lists of 600 pairs, the same unordered pairs at the same ranks (Swing in the other
    orientation): every pair is kept once, from U2I, in rank order. (A sort that is not
    stable keeps some from Swing: 3-row lists cannot show it.)"""
    from qarm_features.pairs.mining import union_pairs

    n = 600
    a = np.arange(n, dtype=np.int64)
    b = a + 10_000
    u2i = (a, b, np.linspace(1, 0, n), 0)
    swing = (b, a, np.linspace(2, 1, n), 1)
    pairs = union_pairs([u2i, swing])
    assert len(pairs) == n and (pairs["source"] == "u2i").all()
    assert pairs["trigger_id"].tolist() == a.tolist() and pairs["target_id"].tolist() == b.tolist()
    np.testing.assert_allclose(pairs["score"], np.linspace(1, 0, n))
