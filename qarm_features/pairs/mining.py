"""Mining ``<trigger, target>`` item pairs from collaborative signals (QARM item alignment).

Two sources, as in the paper:

* **U2I** (:func:`mine_u2i_pairs`): for each positive ``(user, target)``, the trigger is the
  item most similar to the target, in a retrieval model's item space, among the user's
  latest ``history`` earlier positives. The retrieval model defaults to a light BPR matrix
  factorisation (:class:`~qarm_features.pairs.retrieval.BPRMF`).
* **Swing I2I** (:func:`mine_swing_pairs`): item pairs co-engaged by many user pairs that
  have little else in common, with production Swing's caps (each user's latest items, a
  seeded sample of each trigger's users).

Both stream over blocks (of events, of triggers) with bounded memory and cost linear in
the log for fixed caps; where no cap bites they equal the pre-issue-9 implementations
(kept as slow references in ``tests/unit/_pairs_reference.py``).

:func:`mine_pairs` runs both from a :class:`~qarm_features.config.PairsConfig`, unions and
deduplicates them and reports how popularity-skewed the result is. Interactions are a
DataFrame ``[user_id, item_id, rating, timestamp]``; a positive is ``rating >= threshold``.
The log order is the stable sort by timestamp (rows with equal timestamps keep their order).
numpy/pandas/scipy only (the default retrieval model imports implicit when it is fitted).

The Ray miner (:mod:`qarm_features.build.ray_pairs`) runs the same kernels on partitions,
so it produces the same pairs: :func:`u2i_rows`, :func:`aggregate_events`,
:func:`u2i_ranked`, :func:`swing_ranked`, :func:`union_pairs`,
:func:`pair_stats_from_counts`, :func:`check_pairs_config` (and
:func:`~qarm_features.pairs.swing.swing_block` / ``swing_blocks``). They are this
module's interface to it: change one and ``tests/integration/test_ray_pairs.py`` says
whether the two miners still agree.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from qarm_features._validate import (
    check_embeddings,
    check_ids,
    check_interactions,
    l2_normalize,
    lookup_rows,
)
from qarm_features.config import PairsConfig
from qarm_features.errors import ConfigError, InputError
from qarm_features.pairs.retrieval import BPRMF
from qarm_features.pairs.swing import swing_top_k

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ["trigger_id", "target_id", "score", "source"]
# U2I blocks of events hold about this many float32 scores and embedding values (64 MiB).
_U2I_BLOCK_FLOATS = 1 << 24


# --------------------------------------------------------------------------- input
def _positives(interactions, positive_threshold: float) -> pd.DataFrame:
    """Positive rows of the sorted log, ``[user_id, item_id, timestamp]`` in log order."""
    pos = check_interactions(interactions, min_rating=positive_threshold)
    if pos.empty:
        raise InputError(
            f"interactions: no positive rows (rating >= {positive_threshold}) among "
            f"{len(interactions)} rows; lower positive_threshold or check the rating column"
        )
    return pos


# --------------------------------------------------------------------------- U2I
def mine_u2i_pairs(
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

    Cost ``O(events x history x d)``, memory bounded by blocks of events: every user at
    once, each shift ``h = 1..history`` one row-wise float32 dot product over the block.

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
    emb = check_embeddings(item_emb, name="item_emb")
    ids = check_ids(item_ids, name="item_ids", n=emb.shape[0])
    return _u2i(_positives(interactions, positive_threshold), ids, emb, int(history))


def _empty_pairs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trigger_id": np.empty(0, np.int64),
            "target_id": np.empty(0, np.int64),
            "score": np.empty(0, np.float64),
            "source": pd.Series([], dtype=object),
        }
    )


def _u2i(pos: pd.DataFrame, ids: np.ndarray, emb: np.ndarray, history: int) -> pd.DataFrame:
    """:func:`mine_u2i_pairs` on validated positives (log order)."""
    return u2i_rows(pos, ids, emb, history)[0]


def u2i_rows(pos, ids, emb, history) -> tuple[pd.DataFrame, np.ndarray]:
    """:func:`_u2i`, and the row of ``pos`` each event targets (a partition kernel of
    :mod:`qarm_features.build.ray_pairs`: a user's events depend on that user's rows only)."""
    event, trig, targ, score = _u2i_events(pos, ids, emb, history)
    if event.size == 0:
        return _empty_pairs(), np.empty(0, np.int64)
    o = np.argsort(event, kind="stable")
    frame = pd.DataFrame(
        {
            "trigger_id": ids[trig[o]],
            "target_id": ids[targ[o]],
            "score": score[o].astype(np.float64),
            "source": "u2i",
        }
    )
    return frame, event[o]


def _u2i_events(pos, ids, emb, history):
    """U2I events of validated positives, in no particular order: ``(event, trigger row,
    target row, cosine)`` (the row of ``pos`` each event targets; item rows of ``ids``;
    float32 cosines). :func:`u2i_rows` puts them in log order; :func:`mine_pairs`
    aggregates them as they are (no frame, no sort)."""
    rows = lookup_rows(pos["item_id"].to_numpy(), ids, name="interactions.item_id")
    e = l2_normalize(emb.astype(np.float64)).astype(np.float32)
    users = pos["user_id"].to_numpy()
    order = np.argsort(users, kind="stable")  # user-major, log order within a user
    users = users[order]
    r = rows[order]  # item row of each event, user-major
    del rows
    n = r.size
    first = np.r_[True, users[1:] != users[:-1]]
    t = np.arange(n) - np.maximum.accumulate(np.where(first, np.arange(n), 0))  # in-user position
    del users, first
    # Events per block: the (events, history) scores and one (events, d) shifted copy.
    chunk = max(256, _U2I_BLOCK_FLOATS // (history + e.shape[1]))
    out_event, out_trig, out_targ, out_score = [], [], [], []
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        tb = t[a:b]
        width = int(min(history, tb.max(initial=0)))
        if width == 0:
            continue
        # Rows [a - width, b) (zero rows before the log's start): row width + k is event
        # a + k, and row width + k - h its candidate h positions back, a contiguous slice.
        er = np.zeros((b - a + width, e.shape[1]), np.float32)
        lo = max(0, a - width)
        er[width - (a - lo) :] = e[r[lo:b]]
        rr = np.full(b - a + width, -1, r.dtype)
        rr[width - (a - lo) :] = r[lo:b]
        q, rq = er[width:], rr[width:]
        sims = np.empty((width, b - a), np.float32)
        for h in range(1, width + 1):  # row h - 1: the candidates h positions back
            s = sims[h - 1]
            np.einsum("ij,ij->i", q, er[width - h : b - a + width - h], out=s)
            # earlier than the user's first positive, or a repeat of the target: no candidate
            s[(tb < h) | (rr[width - h : b - a + width - h] == rq)] = -np.inf
        best = np.argmax(sims, axis=0)  # the first maximum: the most recent candidate
        best_s = sims[best, np.arange(b - a)]
        found = np.flatnonzero(np.isfinite(best_s))
        out_event.append(order[a + found])
        out_trig.append(r[a + found - best[found] - 1])
        out_targ.append(r[a + found])
        out_score.append(best_s[found])
    if not out_event:
        empty = np.empty(0, np.int64)
        return empty, empty, empty, np.empty(0, np.float32)
    del order, r, t
    return tuple(np.concatenate(c) for c in (out_event, out_trig, out_targ, out_score))


# --------------------------------------------------------------------------- Swing
def mine_swing_pairs(
    interactions,
    *,
    alpha: float = 1.0,
    top_k: int = 20,
    positive_threshold: float = 4.0,
    max_user_items: int = 500,
    max_item_users: int | None = None,
    user_weight: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """Swing I2I pairs: items co-engaged by many user pairs with little else in common.

    ``score(i, j) = sum over user pairs u < v in U_i that both have positives with j of
    w_u * w_v / (alpha + |I_u & I_v|)``, where ``I_u`` is the user's positive item set and
    ``U_i`` the users with a positive on ``i``. With ``user_weight`` (default, the common
    production variant) ``w_u = 1/sqrt(|I_u|)`` damps heavy users, who otherwise sit in most
    user pairs; without it ``w_u = 1`` (the plain Swing formula).

    Caps, as production Swing has them: each user keeps only their latest
    ``max_user_items`` positives (``I_u`` is that list), and each trigger ``i`` keeps
    ``max_item_users`` of its users, drawn uniformly without replacement (seeded by
    ``seed``; ``None`` keeps all). Under the item cap the score of ``(i, j)`` sums over the
    user pairs of ``i``'s sample only, so ``score(i, j)`` and ``score(j, i)`` may differ.
    Where no cap bites the scores are the plain formula's.

    Cost: only user pairs that share an item besides the trigger do any work, each once
    per shared item (``O(sum over i of pairs in U_i that overlap beyond i)``, at most
    ``max_item_users^2 * max_user_items`` per trigger); memory is bounded by blocks of
    triggers.

    Args:
        interactions: DataFrame ``[user_id, item_id, rating, timestamp]``.
        alpha: smoothing of the user-pair overlap penalty (> 0).
        top_k: neighbours kept per trigger (highest score; ties by smaller item id).
        positive_threshold: ``rating >= threshold`` is a positive.
        max_user_items: cap on each user's positive list (latest kept).
        max_item_users: cap on each trigger's users (a seeded uniform sample); ``None``:
            no cap.
        user_weight: apply ``1/sqrt(|I_u|)`` user weights.
        seed: seed of the per-item user sample.

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
    if max_item_users is not None and int(max_item_users) < 2:
        raise InputError(f"max_item_users: must be >= 2 or None, got {max_item_users}")
    pos = _positives(interactions, positive_threshold)
    return _swing(
        pos,
        float(alpha),
        int(top_k),
        int(max_user_items),
        None if max_item_users is None else int(max_item_users),
        bool(user_weight),
        int(seed),
    )


def _swing(pos, alpha, top_k, max_user_items, max_item_users, user_weight, seed):
    """:func:`mine_swing_pairs` on validated positives (log order)."""
    trig, targ, score = swing_top_k(
        pos, alpha, top_k, max_user_items, max_item_users, user_weight, seed
    )
    if trig.size == 0:
        return _empty_pairs()
    return pd.DataFrame({"trigger_id": trig, "target_id": targ, "score": score, "source": "swing"})


# --------------------------------------------------------------------------- both
def mine_pairs(
    interactions,
    cfg: PairsConfig | None = None,
    *,
    item_ids=None,
    item_emb=None,
) -> tuple[pd.DataFrame, dict]:
    """Mine U2I and Swing pairs, union and deduplicate them, and describe the result.

    U2I events are aggregated per directed pair (``count`` = events that produced it);
    pairs seen fewer than ``cfg.min_pair_count`` times are dropped. Within each source
    pairs are ranked (U2I by count then cosine, Swing by score); the union keeps each
    unordered pair once, in the orientation and with the score/source of its best-ranked
    occurrence (rank as a fraction of the source's list, so the sources compete fairly;
    U2I wins exact ties). Self-pairs are dropped.

    Args:
        interactions: DataFrame ``[user_id, item_id, rating, timestamp]``.
        cfg: mining settings (defaults when ``None``).
        item_ids: ``(n,)`` ids of ``item_emb`` rows; required with ``item_emb``.
        item_emb: retrieval item embeddings for U2I; a :class:`~qarm_features.pairs.retrieval.BPRMF`
            model is fitted when ``None``.

    Returns:
        ``(pairs, stats)``: pairs ``[trigger_id, target_id, score, source]`` sorted best
        first; stats with ``n_positives``, ``n_u2i_events``, ``n_u2i_pairs``,
        ``n_swing_pairs``, ``n_pairs``, ``n_pairs_by_source`` (after deduplication),
        ``n_items_covered``, ``item_coverage`` (covered / items with positives),
        ``target_pop_share_mean`` / ``target_pop_share_max`` (the target's share of all
        positives, over pairs), ``top_target_pair_share`` (fraction of pairs whose target
        is the most frequent target), ``top10pct_items_pair_share`` (fraction of pairs whose
        target is among the 10% most popular items) next to ``top10pct_items_positive_share``
        (those items' share of positives: the baseline a popularity-neutral miner would hit).
    """
    cfg = cfg if cfg is not None else PairsConfig()
    check_pairs_config(cfg)
    if cfg.engine != "local":
        raise ConfigError(
            f"PairsConfig.engine={cfg.engine!r}: pairs.mine_pairs is the single-process miner; "
            "mine with qarm_features.build.ray_pairs.mine_pairs_by_config (or mine_pairs_ray)"
        )
    if (item_emb is None) != (item_ids is None):
        raise InputError("mine_pairs: pass item_ids and item_emb together (or neither)")
    pos = _positives(interactions, cfg.positive_threshold)
    parts = []  # (trigger ids, target ids, score, source code) best first, per source
    stats: dict = {"n_positives": len(pos)}
    if cfg.use_u2i:
        if item_emb is None:
            item_ids, item_emb = BPRMF.from_config(cfg).fit(interactions).item_embeddings()
        emb = check_embeddings(item_emb, name="item_emb")
        ids = check_ids(item_ids, name="item_ids", n=emb.shape[0])
        _, trig, targ, score = _u2i_events(pos, ids, emb, cfg.history)
        stats["n_u2i_events"] = int(trig.size)
        agg = _aggregate_rows(trig, targ, score, ids)
        del trig, targ, score
        parts.append(u2i_ranked(*agg, cfg.min_pair_count))
        del agg
        stats["n_u2i_pairs"] = int(parts[-1][0].size)
    if cfg.use_swing:
        t, g, score = swing_top_k(
            pos,
            cfg.swing_alpha,
            cfg.swing_top_k,
            cfg.swing_max_user_items,
            cfg.swing_max_item_users,
            True,
            cfg.seed,
        )
        stats["n_swing_pairs"] = int(t.size)
        parts.append(swing_ranked(t, g, score))
    pairs = union_pairs(parts)
    stats.update(_pair_stats(pairs, pos))
    logger.info(
        "mined %d pairs (%s) covering %d items",
        stats["n_pairs"],
        stats["n_pairs_by_source"],
        stats["n_items_covered"],
    )
    return pairs, stats


def aggregate_events(ev: pd.DataFrame):
    """U2I events per directed pair: ``(trigger ids, target ids, max cosine, events)``."""
    t, g = ev["trigger_id"].to_numpy(), ev["target_id"].to_numpy()
    score = ev["score"].to_numpy(np.float64)
    if t.size == 0:
        return t, g, score, np.zeros(0, np.int64)
    code, uniq = pd.factorize(np.r_[t, g])  # hashing: O(events)
    key = code[: t.size] * uniq.size + code[t.size :]
    order = np.argsort(key)
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    count = np.diff(np.r_[starts, key.size])
    best = np.maximum.reduceat(score[order], starts)
    first = order[starts]
    return t[first], g[first], best, count


def _aggregate_rows(trig, targ, score, ids):
    """:func:`aggregate_events` of events given as item rows of ``ids`` (any order):
    ``(trigger ids, target ids, max cosine as float64, events)``, one per directed pair,
    ordered by (trigger row, target row). Packs each pair into one int64 key, no hashing."""
    if trig.size == 0:
        empty = np.empty(0, np.int64)
        return empty, empty, np.empty(0, np.float64), empty
    key = trig.astype(np.int64) * ids.size + targ
    order = np.argsort(key)
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    count = np.diff(np.r_[starts, key.size])
    best = np.maximum.reduceat(score[order], starts).astype(np.float64)
    del order
    pair = key[starts]
    del key
    return ids[pair // ids.size], ids[pair % ids.size], best, count


def check_pairs_config(cfg: PairsConfig) -> None:
    if not isinstance(cfg, PairsConfig):
        raise ConfigError(f"cfg: expected a PairsConfig, got {type(cfg).__name__}")
    if not (cfg.use_u2i or cfg.use_swing):
        raise ConfigError("PairsConfig: use_u2i and use_swing are both False; enable one")


def u2i_ranked(t, g, score, count, min_pair_count: int):
    """U2I pairs seen at least ``min_pair_count`` times, ranked (count, cosine desc; ids asc)."""
    keep = count >= min_pair_count
    t, g, score, count = t[keep], g[keep], score[keep], count[keep]
    order = np.lexsort((g, t, -score, -count))
    return t[order], g[order], score[order], 0


def swing_ranked(t, g, score):
    """Swing pairs ranked (score desc; ids asc)."""
    order = np.lexsort((g, t, -score))
    return t[order], g[order], score[order], 1


def union_pairs(parts) -> pd.DataFrame:
    """Each unordered pair once, from its best-ranked occurrence.

    A pair's rank is its position over its source's list length (so the sources compete
    fairly); ties go to U2I (source code 0), then to smaller trigger and target ids. The
    kept pairs come out in that order. Self-pairs are dropped.
    """
    t = np.concatenate([p[0] for p in parts])
    g = np.concatenate([p[1] for p in parts])
    rank = np.concatenate([np.arange(p[0].size) / max(p[0].size, 1) for p in parts])
    ok = np.flatnonzero(t != g)
    # (rank, source) is unique: each list is in rank order, so this merges two sorted runs
    order = ok[np.argsort(rank[ok], kind="stable")]  # equal ranks: U2I (first) wins
    del rank, ok
    keep = order[~_duplicated_pairs(t[order], g[order])]
    del order
    t, g = t[keep], g[keep]
    score = np.concatenate([p[2] for p in parts])[keep]
    src = np.concatenate([np.full(p[0].size, p[3], np.int8) for p in parts])[keep]
    names = np.array(["u2i", "swing"], dtype=object)
    return pd.DataFrame(
        {
            "trigger_id": t.astype(np.int64, copy=False),
            "target_id": g.astype(np.int64, copy=False),
            "score": score.astype(np.float64, copy=False),
            "source": names[src],
        }
    )


def _duplicated_pairs(t: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``True`` where the unordered pair ``{t, g}`` occurred earlier (first kept). Ids in
    ``[0, 2^31)`` pack into one int64 key (one hash table: ~0.4x the memory of hashing
    two columns); others hash the two columns."""
    lo, hi = np.minimum(t, g), np.maximum(t, g)
    if lo.size and lo.min() >= 0 and hi.max() < 1 << 31:
        key = (lo.astype(np.int64) << 31) | hi
        del lo, hi
        return pd.Series(key, copy=False).duplicated(keep="first").to_numpy()
    return pd.DataFrame({"lo": lo, "hi": hi}).duplicated(keep="first").to_numpy()


def _pair_stats(pairs: pd.DataFrame, pos: pd.DataFrame) -> dict:
    """Coverage and popularity skew of ``pairs`` relative to the positives."""
    return pair_stats_from_counts(pairs, pos["item_id"].value_counts())


def pair_stats_from_counts(pairs: pd.DataFrame, item_pos: pd.Series) -> dict:
    """:func:`_pair_stats` from the positives per item (``value_counts``: descending)."""
    share = item_pos / item_pos.sum()
    n_pairs = len(pairs)
    # items in a pair (hashing: no sort)
    covered = pd.unique(
        np.concatenate([pairs["trigger_id"].to_numpy(), pairs["target_id"].to_numpy()])
    )
    n_top = max(1, int(np.ceil(0.1 * share.size)))
    top_items = share.index.to_numpy()[:n_top]  # value_counts is sorted descending
    out = {
        "n_pairs": int(n_pairs),
        "n_pairs_by_source": {str(k): int(v) for k, v in pairs["source"].value_counts().items()},
        "n_items_covered": int(covered.size),
        "item_coverage": float(covered.size / max(share.size, 1)),
        "top10pct_items_positive_share": float(share.iloc[:n_top].sum()),
    }
    if n_pairs:
        tshare = share.reindex(pairs["target_id"]).fillna(0.0).to_numpy()
        tcounts = pairs["target_id"].value_counts()
        out.update(
            target_pop_share_mean=float(tshare.mean()),
            target_pop_share_max=float(tshare.max()),
            top_target_pair_share=float(tcounts.iloc[0] / n_pairs),
            top10pct_items_pair_share=float(pairs["target_id"].isin(top_items).mean()),
        )
    else:
        out.update(
            target_pop_share_mean=float("nan"),
            target_pop_share_max=float("nan"),
            top_target_pair_share=float("nan"),
            top10pct_items_pair_share=float("nan"),
        )
    return out
