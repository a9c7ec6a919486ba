"""The offline sources of a QARM feature repo: what is written, and how.

- :func:`encode_catalog`: catalog rows -> ``qarm`` rows (the one batch function: ``qarm
  materialize`` writes its output, the ``qarm_batch`` UDF returns it to Feast).
- :func:`build_user_history`: interactions -> the user-side view (latest positives and
  their RQ codes, point in time); :func:`recode_history` re-codes existing rows with
  another bundle.
- :func:`write_parquet`: an atomic parquet write (temp file in the same directory, rename).
- :func:`row_stamp`: the event timestamp of item rows ("backfill" semantics below).

Timestamps: a bundle's codes are a function of item content, not of time, so item rows
are stamped ``1970-01-01 + (wall-clock ms) µs`` — before any real log, so
``get_historical_features`` gives every training row, however old, the live bundle's
codes — and still increasing from one write to the next, so an online store that keeps
the newest row (Redis) takes every rollout and push.

Every column name and dtype comes from :class:`qarm_features.schema.CodeSchema`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from qarm_features._atomic import atomic_file, honour_umask
from qarm_features._validate import check_columns
from qarm_features.errors import InputError
from qarm_features.schema import (
    EVENT_TIMESTAMP,
    HIST_ITEM_IDS,
    HIST_LEN,
    HISTORY_PREFIX,
    ITEM_ID,
    MISSING_CODE,
    RAW_EMB,
    USER_ID,
    VERSION,
    CodeSchema,
)

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
DATA = Path("data")
# The offline sources of one bundle version live together in data/versions/<run>/, and
# data/current is a symlink to the served one: a run writes its files beside the served
# ones and switches all of them (with the repo pointer) in one atomic rename. A crash
# before the switch leaves the previous set served, whole.
CURRENT = DATA / "current"
VERSIONS = DATA / "versions"
KEEP_VERSIONS = 2  # the served set and the one before it; older sets are deleted
CODES_FILE = CURRENT / "qarm_codes.parquet"
CONTENT_FILE = CURRENT / "item_content.parquet"
HISTORY_FILE = CURRENT / "user_history.parquet"
# During a switch (`qarm materialize --promote --keep-previous`): the previous version's
# rows and context, served by the `qarm_prev` view beside `qarm` until the next run.
PREV_CODES_FILE = CURRENT / "qarm_prev_codes.parquet"
# Items pushed since they were last part of a built catalog: item_id (or the repo's join
# key), raw_emb, pushed_at. `qarm materialize` keeps them (they are in no bundle's catalog
# yet) and forgets each one once a bundle's catalog holds it.
PUSHED_FILE = DATA / "qarm_pushed.parquet"
DEFAULT_HISTORY = 20  # latest positives per user in the user-side view (paper mines 50)

_last_stamp: list[pd.Timestamp] = []  # last stamp this process wrote (kept increasing)


def encode_catalog(bundle, catalog: pd.DataFrame) -> pd.DataFrame:
    """Encode catalog rows into ``qarm`` feature rows.

    Args:
        bundle: a loaded :class:`~qarm_features.bundle.artifact.Bundle`.
        catalog: ``item_id``, ``raw_emb`` (d_raw floats per row); other columns
            (``event_timestamp``, ``created``) pass through.

    Returns:
        The passthrough columns plus ``bundle.schema.features``.

    Raises:
        InputError: a missing column, a duplicated item id or any bad row (the batch path
            is strict: repair the catalog rather than store partial rows).
    """
    from qarm_features.bundle.encode import encode_frame

    check_columns(catalog, [ITEM_ID, RAW_EMB], name="catalog")
    ids = catalog[ITEM_ID]
    dup = ids.duplicated(keep=False)
    if dup.any():
        rows = np.flatnonzero(dup.to_numpy())[:5].tolist()
        raise InputError(
            f"catalog: duplicate item_id {ids.iloc[rows[0]]!r} (rows {rows}); keep one row per item"
        )
    out = encode_frame(bundle, catalog)
    if len(out):
        out[ITEM_ID] = out[ITEM_ID].astype(np.int64 if bundle.id_type == "int64" else str)
    return out


def row_stamp(now: datetime | None = None) -> pd.Timestamp:
    """The event timestamp of item rows written at ``now``: ``1970-01-01 + (ms since epoch) µs``.

    Earlier than any real log (2025 maps to about 1970-01-21), increasing with ``now``
    (and strictly increasing within a process).
    """
    now = now or datetime.now(timezone.utc)
    ms = int(now.timestamp() * 1000)
    stamp = pd.Timestamp(EPOCH + timedelta(microseconds=ms))
    if _last_stamp and stamp <= _last_stamp[0]:  # two writes within one millisecond
        stamp = _last_stamp[0] + pd.Timedelta(microseconds=1)
    _last_stamp[:] = [stamp]
    return stamp


def new_version_dir(repo: Path, label: str) -> Path:
    """A fresh directory for one run's offline sources, beside the served ones."""
    root = repo / VERSIONS
    root.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=root))
    honour_umask(out)
    return out


def switch_current(repo: Path, version_dir: Path) -> None:
    """Serve ``version_dir``: atomically repoint ``data/current`` at it, then prune."""
    current = repo / CURRENT
    if current.exists() and not current.is_symlink():
        raise InputError(
            f"{current} is a directory, not the symlink qarm maintains; move it away "
            "(an older layout) and re-run `qarm materialize`"
        )
    tmp = current.parent / f".current.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(Path("versions") / version_dir.name, tmp)  # relative: the repo can move
    os.replace(tmp, current)
    sets = sorted((repo / VERSIONS).iterdir(), key=lambda p: p.stat().st_mtime)
    for old in sets[: max(0, len(sets) - KEEP_VERSIONS)]:
        if old.resolve() != version_dir.resolve():
            shutil.rmtree(old, ignore_errors=True)


def keep_previous_rows(repo: Path, out: Path, version: str) -> str | None:
    """Copy the served version's rows into ``out`` as the ``qarm_prev`` source; returns
    the version kept (None: none)."""
    from qarm_features.feast.context import PREVIOUS, read_pointer, read_previous

    served = read_pointer(repo)
    if served is None:
        return None
    if served.version != version:  # a switch: the served version becomes the previous one
        src, prev = repo / CODES_FILE, served
    else:  # the same version again: carry the previous one already kept, if any
        prev = read_previous(repo)
        src = repo / PREV_CODES_FILE
        if prev is None or not src.exists():
            return None
    shutil.copyfile(src, out / PREV_CODES_FILE.name)
    (out / PREVIOUS.name).write_text(json.dumps(prev.to_json(), indent=2, sort_keys=True))
    honour_umask(out)
    return prev.version


def write_parquet(df: pd.DataFrame, path: Path, schema=None) -> None:
    """Write a parquet file atomically: temp file in the same directory, then rename."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    if len(df) == 0 and schema is not None:
        table = schema.empty_table()
    else:
        cols = schema.names if schema is not None else list(df.columns)
        table = pa.Table.from_pandas(df[cols], schema=schema, preserve_index=False)
    write_table(table, path)


def write_table(table, path: Path) -> None:
    """Write an arrow table as parquet atomically: temp file beside ``path``, then rename
    (a reader sees the old file or the new one, never a torn one)."""
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def _positives(interactions: pd.DataFrame, positive_threshold: float | None) -> pd.DataFrame:
    if positive_threshold is not None and "rating" in interactions.columns:
        return interactions[interactions["rating"].astype(float) >= positive_threshold]
    return interactions


def build_user_history(
    interactions: pd.DataFrame,
    codes: pd.DataFrame,
    schema: CodeSchema,
    *,
    history: int = DEFAULT_HISTORY,
    positive_threshold: float | None = None,
    version: str = "",
) -> pd.DataFrame:
    """Point-in-time user histories: the latest positive items and their RQ codes.

    One row per (user, distinct interaction time ``t``) holding the user's latest
    ``history`` positives with time <= ``t``, most recent first, stamped ``t + 1 s``: a
    training row at the event's own time sees only earlier events (no label leak), and a
    row at any later time sees the event.

    Args:
        interactions: ``user_id``, ``item_id``, ``timestamp`` (unix s or datetime), and
            optionally ``rating`` (rows with ``rating >= positive_threshold`` are
            positives; without a threshold or a ``rating`` column every row is one).
        codes: ``item_id`` and the RQ columns of ``schema`` (the ``qarm`` rows); history
            items without codes get ``-1``.
        schema: the bundle's code schema.
        history: items kept per row.
        positive_threshold: the positive label threshold on ``rating`` (the bundle's
            ``config.pairs.positive_threshold``).
        version: the bundle version of ``codes``, stored as ``hist_qarm_version``.

    Returns:
        DataFrame with ``schema.table("history")``'s columns.
    """
    check_columns(interactions, [USER_ID, ITEM_ID, "timestamp"], name="interactions")
    levels = list(schema.rq_columns)
    check_columns(codes, [ITEM_ID, *levels], name="codes")
    df = _positives(interactions, positive_threshold)
    ts = df["timestamp"]
    if np.issubdtype(ts.dtype, np.number):
        ts = pd.to_datetime(ts.astype(np.int64), unit="s", utc=True)
    else:
        ts = pd.to_datetime(ts, utc=True)
    df = pd.DataFrame(
        {
            USER_ID: df[USER_ID].to_numpy(np.int64),
            ITEM_ID: df[ITEM_ID].to_numpy(np.int64),
            "ts": ts.to_numpy(),
        }
    ).sort_values([USER_ID, "ts"], kind="stable")

    code_table = codes.set_index(ITEM_ID)[levels].astype(np.int64)
    item_codes = code_table.reindex(df[ITEM_ID].to_numpy()).fillna(MISSING_CODE).to_numpy(np.int64)

    users = df[USER_ID].to_numpy()
    items = df[ITEM_ID].to_numpy()
    times = df["ts"].to_numpy()
    rows: dict[str, list] = {"user": [], "ts": [], "items": []}
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
            rows["user"].append(users[i])
            rows["ts"].append(times[i])
            rows["items"].append(items[sl].copy())
            for lvl in range(len(levels)):
                hist_codes[lvl].append(item_codes[sl, lvl].copy())
        start = end
    out = pd.DataFrame(
        {
            USER_ID: np.asarray(rows["user"], np.int64),
            EVENT_TIMESTAMP: pd.to_datetime(np.asarray(rows["ts"]), utc=True)
            + pd.Timedelta(seconds=1),
            HIST_ITEM_IDS: rows["items"],
        }
    )
    for lvl, name in enumerate(schema.history_rq_columns):
        out[name] = hist_codes[lvl]
    out[HIST_LEN] = out[HIST_ITEM_IDS].map(len).astype(np.int64)
    out[HISTORY_PREFIX + VERSION] = version
    return out


def recode_history(history: pd.DataFrame, codes: pd.DataFrame, schema: CodeSchema, version: str):
    """Replace the codes of existing user-history rows with another bundle's codes."""
    table = codes.set_index(ITEM_ID)[list(schema.rq_columns)]
    out = history[[USER_ID, EVENT_TIMESTAMP, HIST_ITEM_IDS]].copy()
    lists = [np.asarray(v, np.int64) for v in out[HIST_ITEM_IDS]]
    flat = np.concatenate(lists) if lists else np.empty(0, np.int64)
    lens = out[HIST_ITEM_IDS].map(len).to_numpy()
    bounds = np.cumsum(lens)[:-1]
    mapped = table.reindex(flat).fillna(MISSING_CODE).to_numpy(np.int64)
    for lvl, name in enumerate(schema.history_rq_columns):
        out[name] = np.split(mapped[:, lvl], bounds) if len(out) else []
    out[HIST_LEN] = lens.astype(np.int64)
    out[HISTORY_PREFIX + VERSION] = version
    return out
