"""The pair miners as they were before issue 9 (main at 901e8f1), kept as slow references.

:mod:`qarm_features.pairs.mining` now mines with bounded memory and linear cost (vectorised U2I
over users, Swing on co-occurrence triples with per-item user sampling); these copies are
what its equality tests compare against on small inputs, where the caps do not bite.
Verbatim except for the names.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from qarm_features._validate import check_embeddings, check_ids, l2_normalize, lookup_rows
from qarm_features.errors import InputError
from qarm_features.pairs.mining import _positives

_U2I_CHUNK = 1024


# --------------------------------------------------------------------------- U2I
def reference_u2i_pairs(
    interactions,
    item_ids,
    item_emb,
    *,
    history: int = 50,
    positive_threshold: float = 4.0,
) -> pd.DataFrame:
    """U2I pairs: each positive's most similar item among the user's latest earlier positives.

    Walking each user's positives in log order, the target at position ``t`` gets as
    trigger the item with the highest cosine similarity (in ``item_emb``) among positions
    ``t - history .. t - 1`` (earlier in the stably time-sorted log). Candidates that are
    the target item itself (a repeated positive) are skipped; among equally similar
    candidates the most recent wins. The first positive of a user has no trigger.

    Args:
        interactions: DataFrame ``[user_id, item_id, rating, timestamp]``.
        item_ids: ``(n,)`` int64 ids of the rows of ``item_emb``; must cover every positive item.
        item_emb: ``(n, d)`` retrieval-model item embeddings.
        history: how many latest earlier positives are candidates (paper: 50).
        positive_threshold: ``rating >= threshold`` is a positive.

    Returns:
        DataFrame ``[trigger_id, target_id, score, source]``, one row per positive event
        that found a trigger, in log order; ``score`` is the cosine similarity, ``source``
        is ``"u2i"``. The same pair may appear once per event that produced it.
    """
    if int(history) < 1:
        raise InputError(f"history: must be >= 1, got {history}")
    history = int(history)
    emb = check_embeddings(item_emb, name="item_emb")
    ids = check_ids(item_ids, name="item_ids", n=emb.shape[0])
    pos = _positives(interactions, positive_threshold)
    rows = lookup_rows(pos["item_id"].to_numpy(), ids, name="interactions.item_id")
    e = l2_normalize(emb.astype(np.float64)).astype(np.float32)
    users = pos["user_id"].to_numpy()
    order = np.argsort(users, kind="stable")  # per user, in log order
    _, starts, counts = np.unique(users[order], return_index=True, return_counts=True)
    out_event, out_trig, out_score = [], [], []
    for s0, m in zip(starts, counts):
        if m < 2:
            continue
        ev = order[s0 : s0 + m]  # event positions (in the log) of this user's positives
        r = rows[ev]
        for a in range(1, m, _U2I_CHUNK):
            b = min(a + _U2I_CHUNK, m)
            c0 = max(0, a - history)
            sims = e[r[a:b]] @ e[r[c0 : b - 1]].T  # (targets, candidate columns)
            t = np.arange(a, b)[:, None]
            j = np.arange(c0, b - 1)[None, :]
            ok = (j < t) & (j >= t - history) & (r[c0 : b - 1][None, :] != r[a:b][:, None])
            sims = np.where(ok, sims, -np.inf)
            # argmax over reversed columns: the most recent candidate wins ties
            best = sims.shape[1] - 1 - np.argmax(sims[:, ::-1], axis=1)
            best_s = sims[np.arange(b - a), best]
            found = np.isfinite(best_s)
            out_event.append(ev[a:b][found])
            out_trig.append(r[c0 + best[found]])
            out_score.append(best_s[found])
    if not out_event:
        return pd.DataFrame(
            {
                "trigger_id": np.empty(0, np.int64),
                "target_id": np.empty(0, np.int64),
                "score": np.empty(0, np.float64),
                "source": pd.Series([], dtype=object),
            }
        )
    event = np.concatenate(out_event)
    trig = np.concatenate(out_trig)
    score = np.concatenate(out_score).astype(np.float64)
    o = np.argsort(event, kind="stable")
    return pd.DataFrame(
        {
            "trigger_id": ids[trig[o]],
            "target_id": pos["item_id"].to_numpy()[event[o]],
            "score": score[o],
            "source": "u2i",
        }
    )


# --------------------------------------------------------------------------- Swing
def reference_swing_pairs(
    interactions,
    *,
    alpha: float = 1.0,
    top_k: int = 20,
    positive_threshold: float = 4.0,
    max_user_items: int = 500,
    user_weight: bool = True,
) -> pd.DataFrame:
    """Swing I2I pairs: items co-engaged by many user pairs with little else in common.

    ``score(i, j) = sum over user pairs u < v that both have positives with i and j of
    w_u * w_v / (alpha + |I_u & I_v|)``, where ``I_u`` is the user's positive item set.
    With ``user_weight`` (default, the common production variant) ``w_u = 1/sqrt(|I_u|)``
    damps heavy users, who otherwise sit in most user pairs; without it ``w_u = 1`` (the
    plain Swing formula). Each user keeps only their latest ``max_user_items`` positives.
    Computed per trigger item with sparse user-item / user-user matrices.

    Args:
        interactions: DataFrame ``[user_id, item_id, rating, timestamp]``.
        alpha: smoothing of the user-pair overlap penalty (> 0).
        top_k: neighbours kept per trigger (highest score; ties by smaller item id).
        positive_threshold: ``rating >= threshold`` is a positive.
        max_user_items: cap on each user's positive list (latest kept).
        user_weight: apply ``1/sqrt(|I_u|)`` user weights.

    Returns:
        DataFrame ``[trigger_id, target_id, score, source="swing"]`` sorted by trigger, then
        descending score; both ``(i, j)`` and ``(j, i)`` appear when each is in the other's top-k.
    """
    if not alpha > 0:
        raise InputError(f"alpha: must be > 0, got {alpha}")
    if int(top_k) < 1 or int(max_user_items) < 2:
        raise InputError(
            f"top_k must be >= 1 and max_user_items >= 2, got {top_k}, {max_user_items}"
        )
    pos = _positives(interactions, positive_threshold)
    # One row per (user, item) (latest kept), then each user's latest max_user_items.
    pos = pos.drop_duplicates(["user_id", "item_id"], keep="last")
    rank_from_end = pos.groupby("user_id", sort=False).cumcount(ascending=False)
    pos = pos[rank_from_end.to_numpy() < int(max_user_items)]
    user_ids, u = np.unique(pos["user_id"].to_numpy(), return_inverse=True)
    item_ids, i = np.unique(pos["item_id"].to_numpy(), return_inverse=True)
    n_u, n_i = user_ids.size, item_ids.size
    R = sp.csr_matrix((np.ones(u.size), (u, i)), shape=(n_u, n_i))
    deg = np.asarray(R.sum(axis=1)).ravel()
    w = 1.0 / np.sqrt(deg) if user_weight else np.ones(n_u)
    overlap = (R @ R.T).tocsr()  # |I_u & I_v|
    Rc = R.tocsc()
    trig_out, targ_out, score_out = [], [], []
    for item in range(n_i):
        users_i = Rc.indices[Rc.indptr[item] : Rc.indptr[item + 1]]
        if users_i.size < 2:
            continue
        sub = R[users_i]  # (m, n_i) rows of the users who engaged item
        cols = np.unique(sub.indices)
        sub = sub[:, cols].tocsr()
        ov = overlap[users_i][:, users_i].toarray()
        W = np.outer(w[users_i], w[users_i]) / (alpha + ov)
        np.fill_diagonal(W, 0.0)
        # score[j] = 1/2 sum_{u != v} R_uj W_uv R_vj  (= sum over u < v)
        t = sub.T @ W  # (c, m) dense
        score = 0.5 * np.asarray(sub.T.multiply(t).sum(axis=1)).ravel()
        keep = (cols != item) & (score > 0)
        cols, score = cols[keep], score[keep]
        if cols.size == 0:
            continue
        top = np.lexsort((cols, -score))[: int(top_k)]
        trig_out.append(np.full(top.size, item))
        targ_out.append(cols[top])
        score_out.append(score[top])
    if not trig_out:
        return pd.DataFrame(
            {
                "trigger_id": np.empty(0, np.int64),
                "target_id": np.empty(0, np.int64),
                "score": np.empty(0, np.float64),
                "source": pd.Series([], dtype=object),
            }
        )
    return pd.DataFrame(
        {
            "trigger_id": item_ids[np.concatenate(trig_out)],
            "target_id": item_ids[np.concatenate(targ_out)],
            "score": np.concatenate(score_out),
            "source": "swing",
        }
    )


def reference_union(ev: pd.DataFrame, sw: pd.DataFrame, min_pair_count: int = 1) -> pd.DataFrame:
    """The pandas union of ``mine_pairs`` before issue 9 (groupby, sort_values,
    drop_duplicates) on U2I events ``ev`` and Swing pairs ``sw``."""

    def ranked(df, keys, ascending):
        df = df.sort_values(keys, ascending=ascending, kind="stable").reset_index(drop=True)
        df["rank_pct"] = np.arange(len(df)) / max(len(df), 1)
        return df

    agg = (
        ev.groupby(["trigger_id", "target_id"], sort=True)
        .agg(score=("score", "max"), count=("score", "size"))
        .reset_index()
    )
    agg = agg[agg["count"] >= min_pair_count]
    agg["source"] = "u2i"
    frames = [
        ranked(agg, ["count", "score", "trigger_id", "target_id"], [False, False, True, True])
        .drop(columns="count"),
        ranked(sw, ["score", "trigger_id", "target_id"], [False, True, True]),
    ]
    allp = pd.concat(frames, ignore_index=True)
    allp = allp[allp["trigger_id"] != allp["target_id"]]
    a, b = allp["trigger_id"].to_numpy(), allp["target_id"].to_numpy()
    allp = allp.assign(
        _lo=np.minimum(a, b), _hi=np.maximum(a, b), _src=(allp["source"] != "u2i").astype(np.int8)
    )
    allp = allp.sort_values(
        ["rank_pct", "_src", "trigger_id", "target_id"], kind="stable"
    ).drop_duplicates(["_lo", "_hi"], keep="first")
    pairs = allp[["trigger_id", "target_id", "score", "source"]].reset_index(drop=True)
    return pairs.astype({"trigger_id": np.int64, "target_id": np.int64, "score": np.float64})
