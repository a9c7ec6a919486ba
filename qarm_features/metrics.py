"""Quality measures: alignment of item pairs, code quality, and ranking AUCs.

Bottom floor: numpy, pandas and scikit-learn only. Three families:

* **pair alignment** without a ranker: :func:`pair_recall_at_k` (is the target among the
  trigger's nearest items?) and :func:`pair_auc` (is the target closer to the trigger than
  popularity-matched random items?). Cosine similarity throughout.
* **code quality** of quantised ids: :func:`code_quality`.
* **ranking**: :func:`auc`, :func:`uauc`, :func:`gauc` as defined in DESIGN.md.

Undefined values (one class only, no usable pair) come back as ``nan``, never an
exception; malformed input raises :class:`~qarm_features.errors.InputError`.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from qarm_features._validate import (
    check_columns,
    check_embeddings,
    check_ids,
    l2_normalize,
    lookup_rows,
)
from qarm_features.errors import InputError

logger = logging.getLogger(__name__)

# Similarity rows computed at once are bounded to about this many floats (64 MiB).
_MAX_BLOCK = 1 << 24


# --------------------------------------------------------------------------- helpers
def _normalize(x: np.ndarray) -> np.ndarray:
    return l2_normalize(x).astype(np.float32, copy=False)


def _pair_rows(item_ids: np.ndarray, pairs) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of (trigger, target) in ``item_ids``; self-pairs are dropped."""
    check_columns(pairs, ["trigger_id", "target_id"], name="pairs")
    trig = check_ids(pairs["trigger_id"].to_numpy(), name="pairs.trigger_id", unique=False)
    targ = check_ids(pairs["target_id"].to_numpy(), name="pairs.target_id", unique=False)
    keep = trig != targ
    if not keep.all():
        logger.debug("ignoring %d self-pair(s)", int((~keep).sum()))
    ti = lookup_rows(trig[keep], item_ids, name="pairs.trigger_id")
    gi = lookup_rows(targ[keep], item_ids, name="pairs.target_id")
    return ti, gi


def _prepare(emb, item_ids, pairs):
    emb = check_embeddings(emb, name="emb")
    item_ids = check_ids(item_ids, name="item_ids", n=emb.shape[0])
    ti, gi = _pair_rows(item_ids, pairs)
    return _normalize(emb), item_ids, ti, gi


def _popularity_vector(popularity, item_ids: np.ndarray) -> np.ndarray:
    """Popularity per row of ``item_ids`` from a Series/dict keyed by id or an aligned array."""
    if isinstance(popularity, dict):
        popularity = pd.Series(popularity, dtype="float64")
    if isinstance(popularity, pd.Series):
        pop = popularity.reindex(item_ids).fillna(0.0).to_numpy(dtype=np.float64)
    else:
        pop = np.asarray(popularity, dtype=np.float64)
        if pop.shape != item_ids.shape:
            raise InputError(
                f"popularity: expected {item_ids.shape[0]} values (one per item row) or a "
                f"Series indexed by item_id, got shape {pop.shape}"
            )
    if not np.isfinite(pop).all():
        raise InputError("popularity: holds NaN or inf; use interaction counts (>= 0)")
    return pop


def popularity_buckets(popularity: np.ndarray, n_buckets: int = 10) -> np.ndarray:
    """Bucket id per item: equal-size quantile buckets of ``popularity`` (deciles by default).

    Items are ordered by popularity (ties by row order) and cut into ``n_buckets`` groups
    of (nearly) equal size, so every bucket has members even when many items share a count.
    """
    pop = np.asarray(popularity, dtype=np.float64)
    n = pop.shape[0]
    n_buckets = max(1, min(int(n_buckets), n))
    order = np.argsort(pop, kind="stable")
    buckets = np.empty(n, dtype=np.int64)
    buckets[order] = np.arange(n) * n_buckets // max(n, 1)
    return buckets


# --------------------------------------------------------------------------- pair alignment
def pair_recall_at_k(emb, item_ids, pairs, k: int = 10) -> float:
    """Fraction of pairs whose target is among the trigger's ``k`` nearest items.

    Neighbours are ranked by cosine similarity over every row of ``emb``, the trigger
    itself excluded. A target ranks ``r`` = number of other items strictly more similar to
    the trigger than it; it is a hit when ``r < k`` (ties count in the target's favour).

    Args:
        emb: ``(n, d)`` item embeddings.
        item_ids: ``(n,)`` int64 ids of the rows of ``emb``.
        pairs: DataFrame with ``trigger_id`` and ``target_id`` (self-pairs are ignored).
        k: neighbourhood size.

    Returns:
        Recall in ``[0, 1]``, ``nan`` when there is no pair.
    """
    if int(k) < 1:
        raise InputError(f"k: must be >= 1, got {k}")
    e, _, ti, gi = _prepare(emb, item_ids, pairs)
    if ti.size == 0:
        return float("nan")
    n = e.shape[0]
    # Group pairs by trigger so each trigger's similarity row is computed once.
    uniq, inv = np.unique(ti, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    inv_sorted = inv[order]
    chunk = max(1, _MAX_BLOCK // max(n, 1))
    hits = np.zeros(ti.shape[0], dtype=bool)
    for a in range(0, uniq.size, chunk):
        b = min(a + chunk, uniq.size)
        sims = e[uniq[a:b]] @ e.T  # (c, n)
        sims[np.arange(b - a), uniq[a:b]] = -np.inf  # the trigger is not its own neighbour
        lo, hi = np.searchsorted(inv_sorted, [a, b])
        sel = order[lo:hi]
        rows = inv[sel] - a
        s_t = sims[rows, gi[sel]]
        rank = (sims[rows] > s_t[:, None]).sum(axis=1)
        hits[sel] = rank < k
    return float(hits.mean())


def pair_auc(
    emb,
    item_ids,
    pairs,
    popularity,
    *,
    n_neg: int = 5,
    seed: int = 0,
    n_buckets: int = 10,
) -> float:
    """AUC of sim(trigger, target) against sim(trigger, popularity-matched negatives).

    The fraction of (positive, negative) comparisons won, ties counting one half, over
    every pair's negatives (:func:`pair_auc_outcomes`); ``nan`` when no pair has a valid
    negative.
    """
    won, valid = pair_auc_outcomes(
        emb, item_ids, pairs, popularity, n_neg=n_neg, seed=seed, n_buckets=n_buckets
    )
    n = float(valid.sum())
    return float(won.sum()) / n if n else float("nan")


def pair_auc_outcomes(
    emb,
    item_ids,
    pairs,
    popularity,
    *,
    n_neg: int = 5,
    seed: int = 0,
    n_buckets: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: comparisons won against popularity-matched negatives, and their number.

    For each pair, ``n_neg`` negatives are drawn uniformly from the items in the same
    popularity bucket as the target (``n_buckets`` equal-size quantile buckets; deciles by
    default), excluding the trigger and the target. Matching popularity stops a model from
    scoring well by merely knowing which items are popular. The AUC is the fraction of
    (positive, negative) comparisons won, ties counting one half. Negatives depend only on
    ``pairs``, ``popularity`` and ``seed``, never on ``emb``: two spaces evaluated with the
    same arguments face the same negatives.

    Args:
        emb: ``(n, d)`` item embeddings (cosine similarity is used).
        item_ids: ``(n,)`` int64 ids of the rows of ``emb``; negatives are drawn from them.
        pairs: DataFrame with ``trigger_id`` and ``target_id``.
        popularity: interaction counts, as a Series/dict keyed by item id (missing ids
            count 0) or an array aligned with ``item_ids``.
        n_neg: negatives per pair.
        seed: seed of the negative sampler.
        n_buckets: number of popularity buckets.

    Returns:
        ``(won, n_valid)``, both ``(m,)`` float64, one entry per row of ``pairs`` (self
        pairs, trigger == target, are dropped first), in order: the
        comparisons won (ties count one half) and the valid negatives faced (0 for a pair
        whose bucket held no other item). ``won.sum() / n_valid.sum()`` is the pair-AUC;
        resampling pairs (or their items) bootstraps it.
    """
    if int(n_neg) < 1:
        raise InputError(f"n_neg: must be >= 1, got {n_neg}")
    e, item_ids, ti, gi = _prepare(emb, item_ids, pairs)
    pop = _popularity_vector(popularity, item_ids)
    if ti.size == 0:
        return np.zeros(0), np.zeros(0)
    rng = np.random.default_rng(seed)
    buckets = popularity_buckets(pop, n_buckets)
    # Members of each bucket, contiguous: members[start[b] : start[b] + size[b]].
    members = np.argsort(buckets, kind="stable")
    size = np.bincount(buckets, minlength=buckets.max() + 1)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    tb = buckets[gi]
    m = ti.shape[0]
    neg = np.empty((m, n_neg), dtype=np.int64)
    valid = np.zeros((m, n_neg), dtype=bool)
    todo = np.ones((m, n_neg), dtype=bool)
    # Rejection sampling of trigger/target; a few rounds settle all but degenerate buckets.
    for _ in range(20):
        if not todo.any():
            break
        r, c = np.nonzero(todo)
        draw = members[start[tb[r]] + rng.integers(0, size[tb[r]])]
        ok = (draw != ti[r]) & (draw != gi[r])
        neg[r[ok], c[ok]] = draw[ok]
        valid[r[ok], c[ok]] = True
        todo[r[ok], c[ok]] = False
    neg = np.where(valid, neg, 0)
    won = np.zeros(m)
    step = max(1, _MAX_BLOCK // (e.shape[1] * (n_neg + 2)))  # bounded memory
    for a in range(0, m, step):
        sl = slice(a, min(a + step, m))
        q = e[ti[sl]]
        pos_s = np.einsum("ij,ij->i", q, e[gi[sl]])
        neg_s = np.einsum("ikj,ij->ik", e[neg[sl]], q)
        wins = (pos_s[:, None] > neg_s) + 0.5 * (pos_s[:, None] == neg_s)
        won[sl] = (wins * valid[sl]).sum(axis=1)
    return won, valid.sum(axis=1).astype(np.float64)


# Bootstrap replicates of pair_auc_difference (Poisson weights per cluster): 1,000 puts
# the 2.5% / 97.5% percentiles within ~0.05 standard error of their limit; a replicate is
# three weighted sums over the clusters, seconds even at 100k clusters.
PAIR_AUC_DIFF_REPS = 1000
_DIFF_CHUNK = 50  # replicates at once: bounds the (reps, clusters) weight matrix


def pair_auc_difference(
    emb_a,
    emb_b,
    item_ids,
    pairs,
    popularity,
    *,
    clusters=None,
    seed: int = 0,
    reps: int = PAIR_AUC_DIFF_REPS,
) -> dict:
    """Pair-AUC of two spaces on the same pairs and negatives, and a 95% bootstrap interval
    of their difference (``b - a``).

    Args:
        clusters: one label per pair (e.g. the held-out item it touches): pairs of a
            cluster are resampled together (Poisson(1) weights per cluster, seeded), as
            they are not independent. None: every pair is its own cluster.

    Returns:
        ``a``, ``b`` (pair-AUCs), ``delta``, ``ci`` ([low, high]), ``n_pairs``,
        ``n_items`` (clusters); ``delta`` and ``ci`` None when no pair has a negative.
    """
    won_a, valid = pair_auc_outcomes(emb_a, item_ids, pairs, popularity, seed=seed)
    won_b, _ = pair_auc_outcomes(emb_b, item_ids, pairs, popularity, seed=seed)
    out = {"a": None, "b": None, "delta": None, "ci": None, "n_pairs": int(won_a.size)}
    if valid.sum() == 0:
        return {**out, "n_items": 0}
    labels = np.arange(won_a.size) if clusters is None else np.asarray(clusters)
    _, cluster = np.unique(labels, return_inverse=True)
    k = int(cluster.max()) + 1
    wa, wb, nv = (np.bincount(cluster, weights=x, minlength=k) for x in (won_a, won_b, valid))
    a, b = float(wa.sum() / nv.sum()), float(wb.sum() / nv.sum())
    rng = np.random.default_rng([int(seed), 17])
    deltas = []
    for lo in range(0, reps, _DIFF_CHUNK):
        w = rng.poisson(1.0, size=(min(_DIFF_CHUNK, reps - lo), k)).astype(np.float64)
        den = w @ nv
        ok = den > 0
        deltas.append((w @ wb - w @ wa)[ok] / den[ok])
    ci = [float(x) for x in np.percentile(np.concatenate(deltas), [2.5, 97.5])]
    return {**out, "a": a, "b": b, "delta": b - a, "ci": ci, "n_items": k}


# --------------------------------------------------------------------------- codes
def code_quality(codes, n_codes: int) -> dict:
    """Usage and distinctiveness of quantised ids.

    Args:
        codes: ``(n, L)`` int64 code ids in ``[0, n_codes)`` (one column per level).
        n_codes: codebook size ``K`` per level.

    Returns:
        dict with ``utilization`` (list of L: fraction of the K codes used at each level),
        ``entropy`` (list of L: entropy of the code distribution divided by ``log K``;
        1 = uniform use), ``collision_rate`` (fraction of items sharing their full L-tuple
        with at least one other item), ``n_unique_tuples`` and ``n_items``.
    """
    arr = np.asarray(codes)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise InputError(f"codes: expected a non-empty 2-d (n, L) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"codes: must be integers, got dtype {arr.dtype}")
    k = int(n_codes)
    if k < 1:
        raise InputError(f"n_codes: must be >= 1, got {n_codes}")
    arr = arr.astype(np.int64, copy=False)
    if arr.min() < 0 or arr.max() >= k:
        raise InputError(
            f"codes: ids must lie in [0, {k}), got range [{arr.min()}, {arr.max()}]; "
            "is n_codes right?"
        )
    n, n_levels = arr.shape
    util, ent = [], []
    for lvl in range(n_levels):
        counts = np.bincount(arr[:, lvl], minlength=k)
        util.append(float((counts > 0).sum() / k))
        p = counts[counts > 0] / n
        h = float(-(p * np.log(p)).sum())
        ent.append(h / np.log(k) if k > 1 else 0.0)
    _, inverse, tuple_counts = np.unique(arr, axis=0, return_inverse=True, return_counts=True)
    collided = tuple_counts[inverse.reshape(-1)] > 1
    return {
        "utilization": util,
        "entropy": ent,
        "collision_rate": float(collided.mean()),
        "n_unique_tuples": int(tuple_counts.size),
        "n_items": int(n),
    }


# --------------------------------------------------------------------------- ranking AUCs
def _labels_scores(y, s, users=None):
    y = np.asarray(y)
    s = np.asarray(s, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise InputError(f"y, s: expected two 1-d arrays of equal length, got {y.shape}, {s.shape}")
    try:
        yf = y.astype(np.float64)
    except (TypeError, ValueError):
        raise InputError(f"y: labels must be 0/1, got dtype {y.dtype}") from None
    if not np.isin(yf, (0.0, 1.0)).all():
        bad = np.unique(yf[~np.isin(yf, (0.0, 1.0))])[:5].tolist()
        raise InputError(f"y: labels must be 0/1 (binarise ratings first), found {bad}")
    if not np.isfinite(s).all():
        raise InputError("s: scores hold NaN or inf")
    if users is not None:
        users = np.asarray(users)
        if users.shape != y.shape:
            raise InputError(f"users: expected shape {y.shape}, got {users.shape}")
    return yf.astype(np.int8), s, users


def auc(y, s) -> float:
    """ROC AUC of scores ``s`` for 0/1 labels ``y``; ``nan`` if only one class is present."""
    y, s, _ = _labels_scores(y, s)
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, s))


def per_user_auc(users, y, s) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(user ids, AUC, row count)`` of every user holding both labels, users sorted.

    The users kept depend on ``users`` and ``y`` only: two score vectors of the same rows
    give AUCs of the same users, in the same order (paired comparisons, bootstraps).
    Vectorised (one sort by user and score; ties count one half, as ``roc_auc_score``).
    """
    y, s, users = _labels_scores(y, s, users)
    if y.size == 0:
        return np.empty(0, users.dtype), np.empty(0), np.empty(0)
    order = np.lexsort((s, users))
    u_o, s_o, y_o = users[order], s[order], y[order].astype(np.float64)
    new_user = np.r_[True, u_o[1:] != u_o[:-1]]
    new_group = new_user | np.r_[True, s_o[1:] != s_o[:-1]]  # ties: same user, same score
    gid = np.cumsum(new_group) - 1
    gpos = np.bincount(gid, weights=y_o)
    gneg = np.bincount(gid, weights=1.0 - y_o)
    g_user = np.cumsum(new_user[new_group]) - 1  # user index of each tie group
    cumneg = np.cumsum(gneg)
    first_group = np.flatnonzero(new_user[new_group])
    base = (cumneg - gneg)[first_group]  # negatives of earlier users
    below = cumneg - gneg - base[g_user]  # the user's negatives scored strictly lower
    n_users = first_group.size
    won = np.bincount(g_user, weights=gpos * (below + 0.5 * gneg), minlength=n_users)
    pos = np.bincount(g_user, weights=gpos, minlength=n_users)
    neg = np.bincount(g_user, weights=gneg, minlength=n_users)
    both = (pos > 0) & (neg > 0)
    uniq = u_o[new_user]
    return uniq[both], won[both] / (pos[both] * neg[both]), (pos + neg)[both]


def _per_user_auc(users, y, s) -> tuple[np.ndarray, np.ndarray]:
    """(AUC, row count) for every user holding both labels."""
    _, aucs, weights = per_user_auc(users, y, s)
    return aucs, weights


def uauc(users, y, s) -> float:
    """Mean per-user AUC over users with both labels; ``nan`` if there is none."""
    aucs, _ = _per_user_auc(users, y, s)
    return float(aucs.mean()) if aucs.size else float("nan")


def gauc(users, y, s) -> float:
    """Per-user AUC weighted by the user's row count, over users with both labels."""
    aucs, w = _per_user_auc(users, y, s)
    return float((aucs * w).sum() / w.sum()) if aucs.size else float("nan")
