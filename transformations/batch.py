"""The batch transformations: catalog rows -> ``qarm`` rows, interactions -> user history.

:func:`encode_catalog` is the one batch function. Two callers share it:

- the materialization job (:mod:`transformations.job`, ``qarm materialize``), which writes
  its output to the offline source of the ``qarm`` view and then runs Feast's
  materialization, so training (``get_historical_features``) and serving read the same
  rows;
- :func:`qarm_batch_udf`, the body of the ``qarm_batch`` BatchFeatureView, which Feast's
  compute engine (local, Ray or Spark) runs over the raw content source during
  ``feast materialize``. Its UDF imports this module inside its body: Feast re-executes
  UDF source text in a namespace that holds only ``pd``/``np``.

Both end in :func:`qarm_features.encode.encode_frame`, so the two paths store identical
rows. :func:`build_user_history` turns interactions into the user-side view: the user's
latest positive items and their RQ codes, point in time.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd

from qarm_features._validate import check_columns
from qarm_features.errors import InputError, QarmError
from transformations.bundle_ref import resolve_bundle_ref

log = logging.getLogger(__name__)

DEFAULT_HISTORY = 20  # latest positives per user in the user-side view (paper mines 50)
POSITIVE_THRESHOLD = 4.0  # rating >= 4 is a positive (PairsConfig.positive_threshold)


def encode_catalog(bundle, catalog: pd.DataFrame) -> pd.DataFrame:
    """Encode catalog rows into ``qarm`` feature rows.

    Args:
        bundle: a loaded :class:`~qarm_features.bundle.Bundle`.
        catalog: ``item_id`` (int), ``raw_emb`` (d_raw floats per row); other columns
            (``event_timestamp``, ``created``) pass through.

    Returns:
        The passthrough columns plus ``aligned_emb`` (list of float32), ``rq_code_l1`` …
        ``rq_code_l{L}`` (int64), ``vq_codes`` (list of int64), ``qarm_version`` (str).

    Raises:
        InputError: a missing column, a duplicated item id or any bad row (the batch path
            is strict: repair the catalog rather than store partial rows).
    """
    from qarm_features.encode import encode_frame

    check_columns(catalog, ["item_id", "raw_emb"], name="catalog")
    ids = catalog["item_id"].to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise InputError("catalog: duplicate item_id rows; keep one row per item")
    out = encode_frame(bundle, catalog)
    out["item_id"] = out["item_id"].astype(np.int64)
    return out


def qarm_batch_udf(df: pd.DataFrame, bundle_path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Body of the ``qarm_batch`` BatchFeatureView: raw content rows -> ``qarm`` rows.

    The bundle comes from ``bundle_path``, else ``QARM_BUNDLE``, else the repo pointer
    (``data/qarm_bundle.json`` under ``$FEATURE_REPO_DIR_ENV_VAR`` or the working
    directory: run ``feast materialize`` from the repo directory).

    Raises:
        QarmError: no bundle can be found, or :func:`encode_catalog` rejects the rows.
    """
    from qarm_features.encode import get_bundle

    path = bundle_path or resolve_bundle_ref().path
    if not path:
        raise QarmError(
            "qarm_batch: no bundle configured; set QARM_BUNDLE or run `feast materialize` "
            "from a feature repo that `qarm materialize` has written"
        )
    bundle = get_bundle(path)
    if len(df) == 0:
        return encode_catalog(bundle, df)
    # One row per item: the latest content wins (a pushed update supersedes the catalog).
    order = [c for c in ("event_timestamp", "created") if c in df.columns]
    if order:
        df = df.sort_values(order, kind="stable")
    df = df.drop_duplicates("item_id", keep="last").reset_index(drop=True)
    return encode_catalog(bundle, df)


def build_user_history(
    interactions: pd.DataFrame,
    codes: pd.DataFrame,
    n_levels: int,
    *,
    history: int = DEFAULT_HISTORY,
    positive_threshold: float = POSITIVE_THRESHOLD,
    version: str = "",
) -> pd.DataFrame:
    """Point-in-time user histories: the latest positive items and their RQ codes.

    One row per (user, distinct interaction time ``t``) holding the user's latest
    ``history`` positives with time <= ``t``, most recent first, stamped ``t + 1 s``: a
    training row at the event's own time sees only earlier events (no label leak), and a
    row at any later time sees the event.

    Args:
        interactions: ``user_id``, ``item_id``, ``timestamp`` (unix s or datetime), and
            ``rating`` (rows with ``rating >= positive_threshold`` are positives; without
            a ``rating`` column every row is one).
        codes: ``item_id`` and ``rq_code_l1`` … ``rq_code_l{n_levels}`` (the ``qarm`` rows);
            history items without codes get ``-1``.
        n_levels: RQ levels L.
        history: items kept per row.
        positive_threshold: the positive label threshold on ``rating``.
        version: the bundle version of ``codes``, stored as ``hist_qarm_version``.

    Returns:
        DataFrame ``user_id``, ``event_timestamp`` (UTC), ``hist_item_ids`` and
        ``hist_rq_code_l1`` … (lists of int64, most recent first), ``hist_len`` (int64),
        ``hist_qarm_version``.
    """
    check_columns(interactions, ["user_id", "item_id", "timestamp"], name="interactions")
    levels = [f"rq_code_l{i + 1}" for i in range(n_levels)]
    check_columns(codes, ["item_id", *levels], name="codes")
    df = interactions
    if "rating" in df.columns:
        df = df[df["rating"].astype(float) >= positive_threshold]
    ts = df["timestamp"]
    if np.issubdtype(ts.dtype, np.number):
        ts = pd.to_datetime(ts.astype(np.int64), unit="s", utc=True)
    else:
        ts = pd.to_datetime(ts, utc=True)
    df = pd.DataFrame(
        {
            "user_id": df["user_id"].to_numpy(np.int64),
            "item_id": df["item_id"].to_numpy(np.int64),
            "ts": ts.to_numpy(),
        }
    ).sort_values(["user_id", "ts"], kind="stable")

    code_table = codes.set_index("item_id")[levels].astype(np.int64)
    item_codes = code_table.reindex(df["item_id"].to_numpy()).fillna(-1).to_numpy(np.int64)

    users = df["user_id"].to_numpy()
    items = df["item_id"].to_numpy()
    times = df["ts"].to_numpy()
    rows: dict[str, list] = {"user_id": [], "event_timestamp": [], "hist_item_ids": []}
    hist_codes: list[list] = [[] for _ in levels]
    start = 0
    n = len(df)
    while start < n:
        end = start
        while end < n and users[end] == users[start]:
            end += 1
        # within one user: emit a row after the last event of each distinct time
        for i in range(start, end):
            if i + 1 < end and times[i + 1] == times[i]:
                continue
            lo = max(start, i + 1 - history)
            sl = slice(i, lo - 1 if lo > 0 else None, -1)  # most recent first
            rows["user_id"].append(users[i])
            rows["event_timestamp"].append(times[i])
            rows["hist_item_ids"].append(items[sl].copy())
            for lvl in range(n_levels):
                hist_codes[lvl].append(item_codes[sl, lvl].copy())
        start = end
    out = pd.DataFrame(
        {
            "user_id": np.asarray(rows["user_id"], np.int64),
            "event_timestamp": pd.to_datetime(np.asarray(rows["event_timestamp"]), utc=True)
            + pd.Timedelta(seconds=1),
            "hist_item_ids": rows["hist_item_ids"],
        }
    )
    for lvl in range(n_levels):
        out[f"hist_rq_code_l{lvl + 1}"] = hist_codes[lvl]
    out["hist_len"] = out["hist_item_ids"].map(len).astype(np.int64)
    out["hist_qarm_version"] = version
    return out
