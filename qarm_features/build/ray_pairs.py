"""Pair mining past one process: Swing and U2I as Ray Data jobs, pairs equal to one process.

:func:`~qarm_features.pairs.mining.mine_pairs` (and ``mine_u2i_pairs``, ``swing_top_k``) hold the
whole log in one process. Here the log stays on the cluster, partitioned:

* **Input.** A DataFrame (sent in blocks) or parquet file(s) read by the workers, one task
  per row group (a directory's files in sorted path order). Each row carries its input
  position ``_seq``, so the log order (stable by timestamp) is ``(timestamp, _seq)`` on any
  worker. The reading tasks validate rows and keep the positives.
* **U2I, by user** (a hash of ``user_id``): a partition holds whole users and runs the
  single-process kernel on them (a trigger is one of the same user's earlier positives).
  The retrieval item embeddings (the caller's, or BPR fitted in ONE Ray task: the fit stays
  single process) are put in the object store once and read by every U2I worker. Ray's
  ``groupby`` then adds each directed pair's counts and keeps its best cosine.
* **Swing, by trigger item.** User partitions keep each user's latest distinct items and
  send the list to every trigger partition (a hash of ``item_id``) holding one of them, so
  a trigger partition sees each of its triggers' users with the user's whole list and runs
  the single-process kernel (:mod:`qarm_features.pairs.swing`). A capped trigger's seeded user
  sample draws one process's numbers: that process draws one stream over all ``(item,
  user)`` entries in item order, so the worker jumps the generator (``PCG64.advance``) past
  the entries of the items before it (per-item counts, a catalog-sized table).

The driver gets per-item counts and the mined pairs (Swing: ``top_k`` per trigger; U2I: one
row per directed pair), which :func:`mine_pairs_ray` ranks, unions and describes as
``mine_pairs`` does; never the event log. Pairs, scores and ties equal one process's bit
for bit (``tests/integration/test_ray_pairs.py``, a two-node local cluster). Offline only;
``ray`` is imported when a function here runs, on the cluster initialised in the process,
else ``ray.init(address=ray_address)``, else a local one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from qarm_features._validate import check_columns, check_embeddings, check_ids, check_interactions
from qarm_features.build.distributed import _ray
from qarm_features.config import PairsConfig
from qarm_features.errors import InputError
from qarm_features.pairs.mining import (
    aggregate_events,
    check_pairs_config,
    mine_pairs,
    pair_stats_from_counts,
    swing_ranked,
    u2i_ranked,
    u2i_rows,
    union_pairs,
)
from qarm_features.pairs.retrieval import BPRMF
from qarm_features.pairs.swing import swing_block, swing_blocks

log = logging.getLogger(__name__)

COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
# Positive events per partition (a partition is one task's memory): about 1M events is
# ~100 MB of pandas rows in the Swing fan-out and the U2I kernel's 64 MiB blocks.
PARTITION_EVENTS = 1 << 20
BLOCK_ROWS = 1 << 18  # DataFrame input: rows per block sent to the cluster
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: ids spread over partitions


def _part(ids: np.ndarray, n_parts: int) -> np.ndarray:
    """Partition of each int64 id (a fixed hash, the same on every worker)."""
    h = ids.astype(np.int64).view(np.uint64) * _MIX
    return ((h >> np.uint64(32)) % np.uint64(n_parts)).astype(np.int64)


def _cluster(address: str | None):
    """The cluster initialised in this process, else ``address``'s, else a local one."""
    if address is not None:
        with contextlib.suppress(ImportError):  # _ray() raises the DependencyError
            import ray

            if not ray.is_initialized():
                ray.init(address=address)
    return _ray()


def _materialized_positives(interactions, threshold: float):
    """The positives, materialized in the object store, and how many there are."""
    pos = positives_dataset(interactions, threshold).materialize()
    n_pos = pos.count()
    if n_pos == 0:
        raise InputError(
            f"interactions: no positive rows (rating >= {threshold}); lower "
            "positive_threshold or check the rating column"
        )
    return pos, n_pos


def _positives_batch(batch: pd.DataFrame, threshold: float, where: str = "") -> pd.DataFrame:
    """Validated positives of a block of the log (``_seq``: the rows' input positions)."""
    seq = batch["_seq"].to_numpy(np.int64)
    try:
        logb = check_interactions(batch[COLUMNS] if set(COLUMNS) <= set(batch) else batch)
    except InputError as exc:
        rows = f"rows {seq.min()}..{seq.max()}" if seq.size else "no rows"
        raise InputError(f"{where or 'interactions'} ({rows}): {exc}") from None
    # check_interactions sorts stably by timestamp; its row k is input row order[k]
    order = np.argsort(batch["timestamp"].to_numpy(), kind="stable")
    keep = logb["rating"].to_numpy() >= threshold
    pos = logb.loc[keep, ["user_id", "item_id", "timestamp"]].reset_index(drop=True)
    return pos.assign(_seq=seq[order][keep])


def _read_row_group(batch: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """One task per parquet row group: its rows with their input positions, positives kept."""
    import pyarrow.parquet as pq

    out = []
    for path, rg, start in zip(batch["path"], batch["row_group"], batch["start"]):
        pf = pq.ParquetFile(path)
        missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise InputError(
                f"{path}: interactions need columns {COLUMNS}; missing {missing} "
                f"(columns: {pf.schema_arrow.names})"
            )
        frame = pf.read_row_group(int(rg), columns=COLUMNS).to_pandas()
        frame["_seq"] = np.arange(int(start), int(start) + len(frame), dtype=np.int64)
        out.append(_positives_batch(frame, threshold, where=f"{path} row group {rg}"))
    return pd.concat(out, ignore_index=True)


def _parquet_files(source) -> list[str]:
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += [str(f) for f in sorted(p.rglob("*.parquet"))]
        elif p.is_file():
            files.append(str(p))
        else:
            raise InputError(f"interactions: {p} is neither a parquet file nor a directory")
    if not files:
        raise InputError(f"interactions: no parquet file under {paths}")
    return files


def positives_dataset(interactions, positive_threshold: float = 4.0):
    """The log's positives as a Ray Dataset ``[user_id, item_id, timestamp, _seq]``.

    Args:
        interactions: a DataFrame ``[user_id, item_id, rating, timestamp]``, or parquet
            file(s)/directories with those columns (read on the workers, one task per row
            group; a directory's files in sorted path order).
        positive_threshold: ``rating >= threshold`` is a positive.
    """
    ray = _ray()
    thr = float(positive_threshold)
    if isinstance(interactions, pd.DataFrame):
        check_columns(interactions, COLUMNS, name="interactions")
        frame = interactions[COLUMNS].reset_index(drop=True)
        frame["_seq"] = np.arange(len(frame), dtype=np.int64)
        blocks = [frame.iloc[a : a + BLOCK_ROWS] for a in range(0, max(len(frame), 1), BLOCK_ROWS)]
        ds = ray.data.from_pandas(blocks)
        return ds.map_batches(
            _positives_batch, fn_kwargs={"threshold": thr}, batch_format="pandas", batch_size=None
        )
    import pyarrow.parquet as pq

    groups, start = [], 0
    for f in _parquet_files(interactions):  # metadata only: row counts per row group
        md = pq.ParquetFile(f).metadata
        for rg in range(md.num_row_groups):
            groups.append({"path": f, "row_group": rg, "start": start})
            start += md.row_group(rg).num_rows
    ds = ray.data.from_items(groups, override_num_blocks=max(len(groups), 1))
    return ds.map_batches(
        _read_row_group, fn_kwargs={"threshold": thr}, batch_format="pandas", batch_size=1
    )


def _log_order(df: pd.DataFrame) -> pd.DataFrame:
    """A partition's rows in log order (stable by timestamp = by timestamp, then position)."""
    order = np.lexsort((df["_seq"].to_numpy(), df["timestamp"].to_numpy()))
    return df.iloc[order].reset_index(drop=True)


@contextlib.contextmanager
def _sort_shuffle():
    """Ray Data's sort shuffle (its hash shuffle's actors: 15x slower here), tasks' errors."""
    from ray.data.context import DataContext, ShuffleStrategy

    ctx = DataContext.get_current()
    before = ctx.shuffle_strategy, ctx.raise_original_map_exception
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ctx.raise_original_map_exception = True  # a task's InputError reaches the caller as is
    try:
        yield
    finally:
        ctx.shuffle_strategy, ctx.raise_original_map_exception = before


def _n_parts(n_parts: int | None, n_events: int) -> int:
    import ray

    if n_parts is not None and int(n_parts) < 1:
        raise InputError(f"num_partitions: must be >= 1, got {n_parts}")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return int(n_parts) if n_parts else max(cpus, -(-n_events // PARTITION_EVENTS))


def _by_part(ds, n_parts: int, fn, key: str | None = None, **kwargs):
    """``fn(partition, **kwargs)`` on each partition of ``ds``: its rows of one ``_p`` (a
    pandas frame), ``_p`` being a hash of column ``key`` (``None``: ``ds`` has ``_p``)."""
    if key is not None:
        part = lambda b: b.assign(_p=_part(b[key].to_numpy(), n_parts))
        ds = ds.map_batches(part, batch_format="pandas", batch_size=None)
    grouped = ds.groupby("_p", num_partitions=n_parts)
    return grouped.map_groups(fn, fn_kwargs=kwargs, batch_format="pandas")


# --------------------------------------------------------------------------- U2I
def _u2i_partition(df, ids_ref, emb_ref, history: int, aggregate: bool) -> pd.DataFrame:
    """Whole users in log order -> their U2I events (or events per directed pair)."""
    import ray

    ids, emb = ray.get(ids_ref), ray.get(emb_ref)  # the broadcast embeddings (zero-copy)
    pos = _log_order(df)
    ev, rows = u2i_rows(pos[["user_id", "item_id", "timestamp"]], ids, emb, history)
    if aggregate:
        t, g, score, count = aggregate_events(ev)
        return pd.DataFrame({"trigger_id": t, "target_id": g, "score": score, "count": count})
    return ev.assign(timestamp=pos["timestamp"].to_numpy()[rows], _seq=pos["_seq"].to_numpy()[rows])


def _fit_retrieval(log, cfg: PairsConfig):
    """The BPR retrieval model of ``mine_pairs``, in one Ray task (a single-process fit)."""
    if not isinstance(log, pd.DataFrame):  # parquet files: this one task reads the log
        log = pd.concat([pd.read_parquet(f, columns=COLUMNS) for f in log], ignore_index=True)
    return BPRMF.from_config(cfg).fit(log).item_embeddings()


def _retrieval(ray, interactions, cfg: PairsConfig, item_ids, item_emb):
    """Object refs of the retrieval item ids and embeddings, put once for every U2I worker."""
    if item_emb is not None:
        emb = check_embeddings(item_emb, name="item_emb")
        return ray.put(check_ids(item_ids, name="item_ids", n=emb.shape[0])), ray.put(emb)
    src = interactions if isinstance(interactions, pd.DataFrame) else _parquet_files(interactions)
    fit = ray.remote(num_cpus=1, num_returns=2)(_fit_retrieval)
    return fit.remote(src, cfg)


def _u2i_dataset(pos, n_parts, refs, history, aggregate):
    return _by_part(
        pos,
        n_parts,
        _u2i_partition,
        "user_id",
        ids_ref=refs[0],
        emb_ref=refs[1],
        history=int(history),
        aggregate=aggregate,
    )


@_sort_shuffle()
def u2i_events(
    interactions,
    item_ids,
    item_emb,
    *,
    history: int = 50,
    positive_threshold: float = 4.0,
    num_partitions: int | None = None,
    ray_address: str | None = None,
):
    """:func:`~qarm_features.pairs.mining.mine_u2i_pairs` on Ray, partitioned by user.

    ``interactions``: a DataFrame or parquet file(s) (:func:`positives_dataset`);
    ``item_ids``/``item_emb`` are put in the object store once; ``num_partitions``: user
    partitions (None: :data:`PARTITION_EVENTS` events each, at least the cluster's CPUs).

    Returns:
        A materialized Ray Dataset ``[trigger_id, target_id, score, source, timestamp,
        _seq]``: the rows of ``mine_u2i_pairs`` with their target event's timestamp and
        input position (sorted by ``(timestamp, _seq)``: that function's rows and order).
    """
    ray = _cluster(ray_address)
    if int(history) < 1:
        raise InputError(f"history: must be >= 1, got {history}")
    refs = _retrieval(ray, interactions, PairsConfig(), item_ids, item_emb)
    pos, n_pos = _materialized_positives(interactions, positive_threshold)
    return _u2i_dataset(pos, _n_parts(num_partitions, n_pos), refs, history, False).materialize()


# --------------------------------------------------------------------------- Swing
def _swing_users(df, max_user_items: int, trigger_parts: int) -> pd.DataFrame:
    """Whole users -> each user's latest ``max_user_items`` distinct items, sent to every
    trigger partition ``_p`` holding one of them (``_home``: the item's own partition)."""
    pos = _log_order(df)[["user_id", "item_id"]].drop_duplicates(keep="last")
    rank_from_end = pos.groupby("user_id", sort=False).cumcount(ascending=False)
    pos = pos[rank_from_end.to_numpy() < max_user_items]
    home = _part(pos["item_id"].to_numpy(), trigger_parts)
    dest = pd.DataFrame({"user_id": pos["user_id"].to_numpy(), "_p": home}).drop_duplicates()
    out = dest.merge(pos, on="user_id", how="inner", sort=False)
    out["_home"] = _part(out["item_id"].to_numpy(), trigger_parts) == out["_p"].to_numpy()
    return out


def _swing_partition(df, alpha, top_k, max_item_users, user_weight, seed, capped_ref):
    """One trigger partition: the users of its triggers with their whole (capped) lists ->
    the Swing top-k of its triggers, exactly as :func:`~qarm_features.pairs.swing.swing_top_k`."""
    import ray

    user_ids, u = np.unique(df["user_id"].to_numpy(), return_inverse=True)
    item_ids, i = np.unique(df["item_id"].to_numpy(), return_inverse=True)
    n_u, n_i = user_ids.size, item_ids.size
    R = sp.csr_matrix((np.ones(u.size, np.int8), (u, i)), shape=(n_u, n_i))
    R.sort_indices()
    deg = np.diff(R.indptr)
    w = 1.0 / np.sqrt(deg) if user_weight else np.ones(n_u)
    triggers = np.zeros(n_i, bool)
    triggers[i[df["_home"].to_numpy()]] = True  # this partition's own items
    by_item = R.tocsc()
    counts = np.diff(by_item.indptr)
    e_item = np.repeat(np.arange(n_i), counts)  # (item, user) in item, then user order
    e_user = by_item.indices.astype(np.int64)
    keep = triggers[e_item]
    if max_item_users is not None:
        cap_ids, cap_off = ray.get(capped_ref)  # capped items, their first draw's index
        starts = np.cumsum(counts) - counts
        for k in np.flatnonzero(triggers & (counts > max_item_users)):
            bg = np.random.PCG64(seed)  # = default_rng(seed)'s stream ...
            bg.advance(int(cap_off[np.searchsorted(cap_ids, item_ids[k])]))  # ... from here
            key = np.random.Generator(bg).random(int(counts[k]))
            drop = np.argsort(key, kind="stable")[max_item_users:]
            keep[starts[k] + drop] = False
        counts = np.minimum(counts, max_item_users)
    keep &= counts[e_item] >= 2  # a trigger needs a user pair
    e_item, e_user = e_item[keep], e_user[keep]
    out_t, out_g, out_s = [], [], []
    for ea, eb in swing_blocks(e_item, deg[e_user]):
        for t, g, s in swing_block(e_item[ea:eb], e_user[ea:eb], R, w, alpha, top_k, n_i):
            out_t.append(item_ids[t])
            out_g.append(item_ids[g])
            out_s.append(s)
    cols = zip(
        ("trigger_id", "target_id", "score"), (out_t, out_g, out_s), (np.int64,) * 2 + (np.float64,)
    )
    return pd.DataFrame(
        {c: np.concatenate(x).astype(dt) if x else np.empty(0, dt) for c, x, dt in cols}
    )


def _swing_ray(pos, n_parts, alpha, top_k, max_user_items, max_item_users, user_weight, seed):
    """The Swing top-k of a positives dataset, partitioned by user then by trigger."""
    import ray

    sent = _by_part(
        pos,
        n_parts,
        _swing_users,
        "user_id",
        max_user_items=int(max_user_items),
        trigger_parts=n_parts,
    ).materialize()
    capped = (np.empty(0, np.int64), np.empty(0, np.int64))
    if max_item_users is not None:
        # one process draws one stream over every (item, user) entry in item order: a
        # capped trigger's draws start at the entries of the items before it
        home = sent.filter(expr="_home")  # each (user, item) once, in its item's partition
        counts = _by_part(home, n_parts, _users_per_item).to_pandas().sort_values("item_id")
        c = counts["n"].to_numpy(np.int64)
        big = c > max_item_users
        capped = (counts["item_id"].to_numpy(np.int64)[big], (np.cumsum(c) - c)[big])
    part = _by_part(
        sent,
        n_parts,
        _swing_partition,
        alpha=float(alpha),
        top_k=int(top_k),
        user_weight=bool(user_weight),
        seed=int(seed),
        capped_ref=ray.put(capped),
        max_item_users=None if max_item_users is None else int(max_item_users),
    ).to_pandas()  # the mined pairs: at most top_k per trigger
    cols = zip(("trigger_id", "target_id", "score"), (np.int64, np.int64, np.float64))
    t, g, s = (part[c].to_numpy(dt) for c, dt in cols)
    order = np.lexsort((g, -s, t))  # swing_top_k's order: trigger, score desc, target
    return t[order], g[order], s[order]


def _users_per_item(df: pd.DataFrame) -> pd.DataFrame:
    return df.groupby("item_id").size().rename("n").reset_index()


@_sort_shuffle()
def swing_top_k_ray(
    interactions,
    *,
    alpha: float = 1.0,
    top_k: int = 20,
    positive_threshold: float = 4.0,
    max_user_items: int = 500,
    max_item_users: int | None = None,
    user_weight: bool = True,
    seed: int = 0,
    num_partitions: int | None = None,
    ray_address: str | None = None,
):
    """:func:`~qarm_features.pairs.swing.swing_top_k` of a log, on Ray (arguments: as
    :func:`~qarm_features.pairs.mining.mine_swing_pairs`; ``num_partitions``/``ray_address``: as
    :func:`u2i_events`).

    Returns:
        ``(trigger_ids, target_ids, scores)`` sorted by trigger, then descending score,
        then target: those of one process, bit for bit.
    """
    _cluster(ray_address)
    if (
        not alpha > 0
        or int(top_k) < 1
        or int(max_user_items) < 2
        or (max_item_users is not None and max_item_users < 2)
    ):
        raise InputError(
            "alpha must be > 0, top_k >= 1, max_user_items and max_item_users >= 2 (or None), "
            f"got {alpha}, {top_k}, {max_user_items}, {max_item_users}"
        )
    pos, n_pos = _materialized_positives(interactions, positive_threshold)
    return _swing_ray(
        pos,
        _n_parts(num_partitions, n_pos),
        alpha,
        top_k,
        max_user_items,
        max_item_users,
        user_weight,
        seed,
    )


# --------------------------------------------------------------------------- both
def _first_and_count(df: pd.DataFrame) -> pd.DataFrame:
    """Per item: positives (sum of ``n``) and its first one's log position ``(timestamp, _seq)``."""
    b = _log_order(df)
    first = b.drop_duplicates("item_id", keep="first")[["item_id", "timestamp", "_seq"]]
    return first.assign(n=b.groupby("item_id")["n"].sum().reindex(first["item_id"]).to_numpy())


def _item_positives(pos, n_parts: int) -> pd.Series:
    """The positives' ``item_id.value_counts()`` (ties in log order of first occurrence, as
    pandas counts them), partial per block, then combined per item partition."""
    part = pos.map_batches(lambda b: _first_and_count(b.assign(n=1)), batch_format="pandas")
    per = _log_order(_by_part(part, n_parts, _first_and_count, "item_id").to_pandas())
    counts = pd.Series(per["n"].to_numpy(np.int64), index=per["item_id"].to_numpy(np.int64))
    return counts.sort_values(ascending=False)


@_sort_shuffle()
def mine_pairs_ray(
    interactions, cfg: PairsConfig | None = None, *, item_ids=None, item_emb=None
) -> tuple[pd.DataFrame, dict]:
    """:func:`~qarm_features.pairs.mining.mine_pairs` on Ray: the same ``(pairs, stats)``.

    ``interactions``: a DataFrame or parquet file(s) (:func:`positives_dataset`). U2I runs
    partitioned by user, Swing by trigger item, with ``cfg.ray_partitions`` partitions;
    the cluster is ``cfg.ray_address`` (or the one initialised, or a local one). Without
    ``item_emb`` the BPR retrieval model is fitted in one Ray task (single process, as in
    ``mine_pairs``) and its embeddings go to the U2I workers through the object store.
    """
    cfg = cfg if cfg is not None else PairsConfig()
    check_pairs_config(cfg)
    if (item_emb is None) != (item_ids is None):
        raise InputError("mine_pairs_ray: pass item_ids and item_emb together (or neither)")
    ray = _cluster(cfg.ray_address)
    refs = _retrieval(ray, interactions, cfg, item_ids, item_emb) if cfg.use_u2i else None
    pos, n_pos = _materialized_positives(interactions, cfg.positive_threshold)
    n_parts = _n_parts(cfg.ray_partitions, n_pos)
    parts, stats = [], {"n_positives": n_pos}
    if cfg.use_u2i:
        agg = _u2i_dataset(pos, n_parts, refs, cfg.history, True)
        # not Ray's groupby().aggregate(): it loops over the groups in Python (50x slower)
        per_pair = _by_part(agg, n_parts, _combine_pairs, "trigger_id").to_pandas()
        t, g, s, count = (
            per_pair[c].to_numpy() for c in ("trigger_id", "target_id", "score", "count")
        )
        stats["n_u2i_events"] = int(count.sum())
        parts.append(
            u2i_ranked(
                t.astype(np.int64),
                g.astype(np.int64),
                s.astype(np.float64),
                count.astype(np.int64),
                cfg.min_pair_count,
            )
        )
        stats["n_u2i_pairs"] = int(parts[-1][0].size)
    if cfg.use_swing:
        t, g, s = _swing_ray(
            pos,
            n_parts,
            cfg.swing_alpha,
            cfg.swing_top_k,
            cfg.swing_max_user_items,
            cfg.swing_max_item_users,
            True,
            cfg.seed,
        )
        stats["n_swing_pairs"] = int(t.size)
        parts.append(swing_ranked(t, g, s))
    pairs = union_pairs(parts)
    stats.update(pair_stats_from_counts(pairs, _item_positives(pos, n_parts)))
    log.info("mined %d pairs on Ray (%d partitions)", stats["n_pairs"], n_parts)
    return pairs, stats


def _combine_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Per directed pair of a partition: events summed, best cosine."""
    by = df.groupby(["trigger_id", "target_id"], sort=False)
    return by.agg(count=("count", "sum"), score=("score", "max")).reset_index()


def mine_pairs_by_config(
    interactions, cfg: PairsConfig | None = None, *, item_ids=None, item_emb=None
) -> tuple[pd.DataFrame, dict]:
    """Mine with the engine ``cfg.engine`` names: ``"local"`` (one process:
    :func:`~qarm_features.pairs.mining.mine_pairs`) or ``"ray"`` (:func:`mine_pairs_ray`)."""
    cfg = cfg if cfg is not None else PairsConfig()
    check_pairs_config(cfg)
    if cfg.engine == "ray":
        return mine_pairs_ray(interactions, cfg, item_ids=item_ids, item_emb=item_emb)
    return mine_pairs(interactions, cfg, item_ids=item_ids, item_emb=item_emb)
