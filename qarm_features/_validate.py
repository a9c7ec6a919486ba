"""Boundary checks shared by every module: embeddings, ids and tables.

Each check returns a clean value (contiguous float32 / int64 arrays, a sorted interaction
log) or raises
:class:`~qarm_features.errors.InputError` with a message that names the argument,
the offending value and the fix (:func:`check_hyper`, for an estimator's hyperparameters,
raises :class:`~qarm_features.errors.ConfigError`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from qarm_features.errors import ConfigError, InputError

INTERACTION_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


# Rows per block of the finiteness check: its boolean temporary is one block, not the
# catalog (a 10M x 384 matrix would need a 3.8 GB mask).
_FINITE_BLOCK_ROWS = 65_536


def _all_finite(arr: np.ndarray) -> bool:
    """``np.isfinite(arr).all()`` block by block of rows (bounded memory)."""
    return all(
        np.isfinite(arr[i : i + _FINITE_BLOCK_ROWS]).all()
        for i in range(0, arr.shape[0], _FINITE_BLOCK_ROWS)
    )


def check_embeddings(
    x, *, name: str = "embeddings", dim: int | None = None, allow_empty: bool = False
) -> np.ndarray:
    """Validate a 2-d float embedding matrix and return it as C-contiguous float32.

    Args:
        x: array-like of shape ``(n, d)``.
        name: argument name used in error messages.
        dim: expected ``d``; ``None`` accepts any width.
        allow_empty: accept ``n == 0``.

    Raises:
        InputError: not 2-d, wrong width, empty, or holding NaN/inf.
    """
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: cannot convert to a float32 array ({exc})") from None
    if arr.ndim != 2:
        raise InputError(f"{name}: expected a 2-d array (n, d), got shape {arr.shape}")
    if arr.shape[0] == 0 and not allow_empty:
        raise InputError(f"{name}: is empty (0 rows); pass at least one row")
    if dim is not None and arr.shape[1] != dim:
        raise InputError(
            f"{name}: expected width {dim}, got {arr.shape[1]}; was it produced by "
            "another encoder or bundle?"
        )
    if arr.size and not _all_finite(arr):
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        raise InputError(
            f"{name}: {bad.size} row(s) hold NaN or inf (first at row {int(bad[0])}); "
            "drop or repair them first"
        )
    return np.ascontiguousarray(arr)


def check_ids(ids, *, name: str = "ids", n: int | None = None, unique: bool = True) -> np.ndarray:
    """Validate a 1-d integer id vector and return it as int64.

    Raises:
        InputError: not 1-d, non-integer, wrong length, or duplicated (when ``unique``).
    """
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise InputError(f"{name}: expected a 1-d id vector, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if (
            np.issubdtype(arr.dtype, np.floating)
            and np.all(np.isfinite(arr))
            and np.all(arr == np.round(arr))
        ):
            arr = arr.astype(np.int64)
        else:
            raise InputError(f"{name}: ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if n is not None and arr.shape[0] != n:
        raise InputError(f"{name}: expected {n} ids (one per row), got {arr.shape[0]}")
    if unique and arr.size:
        uniq, counts = np.unique(arr, return_counts=True)
        if uniq.size != arr.size:
            dups = uniq[counts > 1][:5].tolist()
            raise InputError(f"{name}: duplicate ids {dups}; each id must appear once")
    return np.ascontiguousarray(arr)


def check_columns(df, required: Iterable[str], *, name: str = "table") -> None:
    """Raise InputError naming every required column that ``df`` lacks."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{name}: missing column(s) {missing}; it has {list(df.columns)}")


def lookup_rows(ids, known: np.ndarray, *, name: str = "ids") -> np.ndarray:
    """Map ids to row positions in ``known`` (unique int64). Unknown ids raise InputError."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(known, kind="stable")
    sorted_known = known[order]
    pos = np.searchsorted(sorted_known, ids)
    pos = np.clip(pos, 0, max(len(known) - 1, 0))
    ok = (sorted_known[pos] == ids) if len(known) else np.zeros(ids.shape, bool)
    if not np.all(ok):
        unknown = np.unique(ids[~ok])[:5].tolist()
        raise InputError(f"{name}: unknown id(s) {unknown} (not in the catalog)")
    return order[pos]


def check_hyper(name: str, value, minimum: int) -> int:
    """Validate an integer hyperparameter at fit time (sklearn style) and return it as int.

    Raises:
        ConfigError: not an integer (``bool`` included) or below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_interactions(interactions, *, min_rating: float | None = None) -> pd.DataFrame:
    """Validate an interaction log; return a copy stably sorted by timestamp.

    The copy holds ``user_id`` / ``item_id`` int64, ``rating`` float64 and ``timestamp``
    as given (numeric or datetime; sorted on the original values, so int64 ns stay exact).
    Rows with equal timestamps keep their order. With ``min_rating``, every row is still
    validated but the copy holds only the rows with ``rating >= min_rating`` (and no
    ``rating`` column): the positives, without a copy of the whole log.

    Raises:
        InputError: not a DataFrame, a missing column, non-integer ids, a non-numeric
            rating or timestamp, or NaN/NaT/inf in either.
    """
    if not isinstance(interactions, pd.DataFrame):
        raise InputError(
            f"interactions: expected a pandas DataFrame {INTERACTION_COLUMNS}, "
            f"got {type(interactions).__name__}"
        )
    check_columns(interactions, INTERACTION_COLUMNS, name="interactions")
    users = check_ids(interactions["user_id"].to_numpy(), name="interactions.user_id", unique=False)
    items = check_ids(interactions["item_id"].to_numpy(), name="interactions.item_id", unique=False)
    ts_col = interactions["timestamp"]
    try:
        rating = interactions["rating"].to_numpy(dtype=np.float64)
        if pd.api.types.is_datetime64_any_dtype(ts_col):
            ts_bad = ts_col.isna().to_numpy()
        else:
            ts_bad = ~np.isfinite(ts_col.to_numpy(dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"interactions: rating must be numeric and timestamp numeric or datetime ({exc})"
        ) from None
    for name, bad in (("rating", ~np.isfinite(rating)), ("timestamp", ts_bad)):
        if bad.any():
            raise InputError(
                f"interactions.{name}: {int(bad.sum())} row(s) hold NaN/NaT or inf; drop them"
            )
    ts = ts_col.to_numpy()
    order = np.argsort(ts, kind="stable")  # on the original values: int64 ns stay exact
    if min_rating is not None:
        order = order[rating[order] >= min_rating]  # a subsequence: still stably sorted
        return pd.DataFrame(
            {"user_id": users[order], "item_id": items[order], "timestamp": ts[order]}
        )
    return pd.DataFrame(
        {
            "user_id": users[order],
            "item_id": items[order],
            "rating": rating[order],
            "timestamp": ts[order],
        }
    )


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by ``max(||row||, 1e-12)``, in ``x``'s dtype (float32 in, float32 out):
    the one L2 normalisation of the package (an all-zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def draw_items(candidates: np.ndarray, fraction: float, seed: int, *, at_least: int = 0):
    """The one held-out draw: ``max(at_least, round(fraction * n))`` of the ``n`` unique
    ``candidates`` (ids or rows), drawn without replacement with ``default_rng(seed)``,
    sorted. The build's held-out items, the aligner's validation items and the
    evaluation's all come from it, so a seed names the same items everywhere."""
    pool = np.unique(np.asarray(candidates))
    size = min(pool.size, max(int(at_least), round(fraction * pool.size)))
    return np.sort(np.random.default_rng(seed).choice(pool, size=size, replace=False))
