"""Swing I2I scores at scale: the kernel behind :func:`qarm_features.pairs.mining.mine_swing_pairs`.

``score(i, j) = sum over user pairs u < v in U_i that both have j of w_u * w_v /
(alpha + |I_u & I_v|)`` (the formula, caps and ties: :func:`~qarm_features.pairs.mining.mine_swing_pairs`).
Blocks of triggers expand each (trigger, user) row to the user's items; rows of one
trigger that share an item form co-occurrence triples ``(row, row', j)``, and only those
do any work. Groups come from scipy's compiled CSR -> CSC transpose of the block's rows;
user-pair overlaps from one ``np.sort`` of packed int64 keys (no argsort, no ``np.unique``,
no ``searchsorted``): a block costs a few linear passes over its rows and triples and one
sort. Memory is bounded by the block caps below. Training only: numpy,
pandas and scipy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from qarm_features.errors import InputError

# Swing blocks of triggers expand to about this many (trigger, user, item) rows; the
# co-occurrence triples of a block are a small multiple of it on real logs.
_SWING_BLOCK_ROWS = 1 << 21
# A block whose co-occurrence triples exceed this is split in two (by triggers), so memory
# stays bounded on dense logs (a single trigger holds at most cap^2 x max_user_items).
_SWING_MAX_TRIPLES = 1 << 22
# A block's user pairs are counted in dense bins (one per pair of rows of a trigger)
# when they number at most this (8 MiB of counts: cache-sized), else by sorting packed keys; larger
# blocks are first cut into runs of triggers of at most this many bins.
_SWING_MAX_PAIR_BINS = 1 << 20


def swing_top_k(pos, alpha, top_k, max_user_items, max_item_users, user_weight, seed):
    """Swing top-k of validated positives ``[user_id, item_id, ...]`` in log order.

    Returns:
        ``(trigger_ids, target_ids, scores)``: int64, int64, float64 arrays sorted by
        trigger, then descending score, then target.
    """
    # One row per (user, item) (latest kept), then each user's latest max_user_items.
    pos = pos[["user_id", "item_id"]].drop_duplicates(keep="last")
    rank_from_end = pos.groupby("user_id", sort=False).cumcount(ascending=False)
    pos = pos[rank_from_end.to_numpy() < max_user_items]
    # sorted ids and each row's index into them (np.unique's, by hashing: no argsort)
    u, user_ids = pd.factorize(pos["user_id"].to_numpy(), sort=True)
    i, item_ids = pd.factorize(pos["item_id"].to_numpy(), sort=True)
    del pos, rank_from_end
    n_u, n_i = user_ids.size, item_ids.size
    # Each user's items, sorted (CSR by user).
    R = sp.csr_matrix((np.ones(u.size, np.int8), (u, i)), shape=(n_u, n_i))
    R.sort_indices()
    deg = np.diff(R.indptr)
    w = 1.0 / np.sqrt(deg) if user_weight else np.ones(n_u)
    # Each trigger's users (by item, then user: the CSC transpose), sampled down to
    # max_item_users.
    by_item = R.tocsc()
    counts = np.diff(by_item.indptr)
    e_item = np.repeat(np.arange(n_i), counts)
    e_user = by_item.indices.astype(np.int64)
    del u, i, by_item
    if max_item_users is not None and counts.max(initial=0) > max_item_users:
        key = np.random.default_rng(seed).random(e_item.size)  # canonical (item, user) order
        # Only capped items are sampled: each keeps its max_item_users smallest keys.
        capped = np.flatnonzero(counts[e_item] > max_item_users)
        o = capped[np.lexsort((key[capped], e_item[capped]))]
        cc = np.where(counts > max_item_users, counts, 0)  # capped items' entries in o
        rank = np.arange(o.size) - (np.cumsum(cc) - cc)[e_item[o]]
        drop = o[rank >= max_item_users]
        keep = np.ones(e_item.size, bool)
        keep[drop] = False
        e_item, e_user = e_item[keep], e_user[keep]
        counts = np.minimum(counts, max_item_users)
    keep = counts[e_item] >= 2  # a trigger needs a user pair
    e_item, e_user = e_item[keep], e_user[keep]
    trig_out, targ_out, score_out = [], [], []
    for ea, eb in swing_blocks(e_item, deg[e_user]):
        for res in swing_block(e_item[ea:eb], e_user[ea:eb], R, w, alpha, top_k, n_i):
            trig_out.append(res[0])
            targ_out.append(res[1])
            score_out.append(res[2])
    if not trig_out:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
    return (
        item_ids[np.concatenate(trig_out)].astype(np.int64),
        item_ids[np.concatenate(targ_out)].astype(np.int64),
        np.concatenate(score_out).astype(np.float64),
    )


def swing_blocks(e_item: np.ndarray, e_len: np.ndarray, limit: int | None = None):
    """``(start, stop)`` row ranges of whole triggers, each expanding to at most ``limit``
    (default ``_SWING_BLOCK_ROWS``) (trigger, user, item) rows, row ``k`` to ``e_len[k]``
    (a single trigger may exceed it)."""
    limit = _SWING_BLOCK_ROWS if limit is None else limit
    bounds = np.r_[np.flatnonzero(np.r_[True, e_item[1:] != e_item[:-1]]), e_item.size]
    if e_item.size == 0:
        return
    cb = np.r_[0, np.cumsum(e_len)][bounds]  # expanded rows before each trigger
    k = 0
    while k < bounds.size - 1:
        k2 = int(np.searchsorted(cb, cb[k] + limit, side="right")) - 1
        k2 = min(max(k2, k + 1), bounds.size - 1)
        yield int(bounds[k]), int(bounds[k2])
        k = k2


def swing_block(trig, users, R, w, alpha, top_k, n_i):
    """Yield Swing top-k of the triggers in a block of (trigger, user) rows (sorted by
    trigger), halving the block while its triples exceed ``_SWING_MAX_TRIPLES``.

    Every row expands to its user's items ``j != trigger``; rows of one trigger that share
    an item form co-occurrence triples ``(row, row', j)``. A user pair's overlap is 1 (the
    trigger) plus its number of triples, so pairs sharing only the trigger cost nothing.
    Grouping is a compiled CSR -> CSC transpose; overlaps are counted with ``np.bincount``
    in dense bins, one per pair of a trigger's rows (the block is first cut into
    runs of triggers of at most ``_SWING_MAX_PAIR_BINS`` bins), or, for a trigger with
    more, by sorting one packed int64 key per triple (``np.sort``, no argsort): a block
    costs a few linear passes (and that sort).
    """
    m = trig.size
    tb, mt = _trigger_rows(trig)
    n_bins = int((mt * (mt - 1) // 2).sum())  # one per pair of a trigger's rows
    if mt.size > 1 and n_bins > _SWING_MAX_PAIR_BINS:
        # a trigger's m (m - 1) / 2 bins as m rows of (m - 1) / 2 (doubled: integers)
        for a, b in swing_blocks(trig, np.repeat(mt - 1, mt), 2 * _SWING_MAX_PAIR_BINS):
            yield from swing_block(trig[a:b], users[a:b], R, w, alpha, top_k, n_i)
        return
    # The block's rows of R, transposed (scipy's compiled CSR -> CSC, a counting sort):
    # per item, its rows ascending, so each (trigger, item) group is a run (rows are
    # sorted by trigger). The trigger's own column is dropped.
    cols = R[users].tocsc()
    item = np.repeat(np.arange(n_i), np.diff(cols.indptr))
    row = cols.indices.astype(np.int64)
    del cols
    keep = item != trig[row]
    item, row = item[keep], row[keep]
    del keep
    t = trig[row]
    new = np.r_[True, (item[1:] != item[:-1]) | (t[1:] != t[:-1])]
    starts = np.flatnonzero(new)
    size = np.diff(np.r_[starts, row.size])
    multi = size >= 2
    starts, size = starts[multi], size[multi]
    if starts.size == 0:
        return
    n_triples = int((size * (size - 1) // 2).sum())
    cut = np.flatnonzero(trig[1:] != trig[:-1])  # trigger boundaries
    # packed (r1, r2, group) keys must fit an int64 (bits of m, of m, of groups)
    too_wide = 2 * int(m - 1).bit_length() + int(starts.size).bit_length() > 62
    if too_wide and not cut.size:  # one trigger with ~2^20 users and more: needs a cap
        raise InputError(
            f"Swing: a trigger with {m} users is too large to score in one block; "
            "set PairsConfig.swing_max_item_users (max_item_users)"
        )
    if (n_triples > _SWING_MAX_TRIPLES or too_wide) and cut.size:
        del row, item, t, starts, size, multi
        mid = int(cut[cut.size // 2]) + 1  # halve the block at a trigger boundary
        yield from swing_block(trig[:mid], users[:mid], R, w, alpha, top_k, n_i)
        yield from swing_block(trig[mid:], users[mid:], R, w, alpha, top_k, n_i)
        return
    g_trig, g_targ = t[starts], item[starts]
    del t, item
    n_g = starts.size
    # The entries of groups of two or more (row ascending in each), their group, and how
    # many later entries of their group each pairs with.
    member = np.repeat(np.arange(n_g), size)
    offset = np.arange(member.size) - np.repeat(np.cumsum(size) - size, size)
    rows_g = row[np.repeat(starts, size) + offset]
    n_after = size[member] - 1 - offset
    del row, offset, size, starts
    # Triples: entry p pairs with entries p + 1 .. p + n_after[p] of its group.
    first_of = np.cumsum(n_after) - n_after  # where entry p's triples start
    second = np.arange(n_triples) + np.repeat(np.arange(member.size) + 1 - first_of, n_after)
    del first_of
    r2 = rows_g[second]
    del second
    wu = w[users]
    bins = (tb, mt) if _bins_pay(n_bins, n_triples) else None
    del tb, mt
    if bins is not None:
        pw, member = _pair_weights_binned(bins, rows_g, r2, member, n_after, wu, alpha)
    else:
        pw, member = _pair_weights_sorted(rows_g, r2, member, n_after, wu, alpha, m, n_g)
    # Each group's sum runs over its pairs in (r1, r2) order either way (bincount adds in
    # array order), so the two ways give the same floats.
    score = np.bincount(member, weights=pw, minlength=n_g)
    del pw, member
    order = np.lexsort((g_targ, -score, g_trig))
    g_trig, g_targ, score = g_trig[order], g_targ[order], score[order]
    tstart = np.flatnonzero(np.r_[True, g_trig[1:] != g_trig[:-1]])
    rank = np.arange(g_trig.size) - np.repeat(tstart, np.diff(np.r_[tstart, g_trig.size]))
    top = rank < top_k
    yield g_trig[top], g_targ[top], score[top]


def _trigger_rows(trig):
    """First row and number of rows of each trigger of a block (rows sorted by trigger)."""
    tb = np.r_[0, np.flatnonzero(trig[1:] != trig[:-1]) + 1]
    return tb, np.diff(np.r_[tb, trig.size])


def _bins_pay(n_bins, n_triples) -> bool:
    """Count a block's user pairs in dense bins (``n_bins``: one per pair of rows of a
    trigger) when they are at most ``_SWING_MAX_PAIR_BINS`` and not much more than the
    triples; else by sorting."""
    return n_bins <= _SWING_MAX_PAIR_BINS and n_bins <= 64 * n_triples + (1 << 16)


def _pair_weights_binned(bins, r1, r2, member, n_after, wu, alpha):
    """Per triple (entry ``p``'s ``n_after[p]`` partners ``r2 > r1``, in generation order:
    group, then r1, then r2), the user pair's weight ``wu[r1] wu[r2] / (alpha + 1 +
    overlap)`` and its group. The overlap beyond the trigger is the pair's number of
    triples, counted by ``np.bincount`` over a triangle of bins per trigger (linear: no sort)."""
    tb, mt = bins
    tix = np.repeat(np.arange(tb.size), mt)  # each row's trigger (rows sorted by trigger)
    i = np.arange(tix.size) - tb[tix]  # the row's position among its trigger's rows
    tri = mt * (mt - 1) // 2
    # pair (i, j), i < j, of a trigger with m rows: bin i m - i (i + 1) / 2 + j - i - 1 of
    # its triangle, i.e. pbase[r1] + i[r2]
    pbase = (np.cumsum(tri) - tri)[tix] + i * mt[tix] - i * (i + 1) // 2 - i - 1
    del tix, tri
    idx = np.repeat(pbase[r1], n_after)
    idx += i[r2]
    del pbase, i
    shared = np.bincount(idx)[idx]
    del idx
    pw = np.repeat(wu[r1], n_after) * wu[r2] / (alpha + 1.0 + shared)  # + 1: the trigger
    return pw, np.repeat(member, n_after)


def _pair_weights_sorted(r1, r2, member, n_after, wu, alpha, m, n_g):
    """:func:`_pair_weights_binned` by one ``np.sort`` of packed ``(r1, r2, group)`` keys
    (for triggers too large for dense bins), the triples then in (r1, r2, group) order."""
    # (r1, r2, group) packed in one int64 (fits: swing_block's split rule), sorted: runs
    # of one user pair give its overlap; each triple keeps its group. r1 and the group
    # are the entry's own, so they are packed per entry and repeated once.
    rb, gb = max(int(m - 1).bit_length(), 1), max(int(n_g - 1).bit_length(), 1)
    key = np.repeat((r1 << (rb + gb)) | member, n_after)
    key |= r2 << gb
    del r2
    key.sort()
    group = key & ((1 << gb) - 1)
    key >>= gb
    bounds = np.flatnonzero(np.r_[True, key[1:] != key[:-1], True])
    shared = np.diff(bounds)  # triples of each user pair: its overlap beyond the trigger
    pair = key[bounds[:-1]]
    del key
    p1, p2 = pair >> rb, pair & ((1 << rb) - 1)
    del pair
    pw = wu[p1] * wu[p2] / (alpha + 1.0 + shared)  # + 1: the trigger
    return np.repeat(pw, shared), group
