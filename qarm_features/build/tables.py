"""A team's tables, read and checked: catalog, events, existing pairs and item embeddings.

Each reader takes a section of ``qarm.yaml`` (:mod:`qarm_features.project`), reads a
parquet or CSV file (or a glob of them), and returns clean arrays for the pipeline, or
raises :class:`~qarm_features.errors.InputError` naming the file, the column, the row and
the value, before anything is trained or written.

Ids: a catalog's ids are ints or strings (its *keys*). The pipeline works on int64 ids:
int keys are used as they are; string keys get the catalog row index (``0 .. n-1``), so
a VQ code of a string catalog is the pool row index of an item, stable within a bundle
(the bundle stores the keys beside the ids, so rows and codes map back to them).
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qarm_features.errors import InputError

log = logging.getLogger(__name__)

_EXAMPLES = 5  # offending values quoted in an error message


@dataclass(frozen=True)
class Table:
    """A table read from one file or a glob: its frame and a name for messages."""

    frame: pd.DataFrame
    name: str


def read_table(path: str | Path, *, what: str, csv=None) -> Table:
    """Read a parquet or CSV file, or every file a glob matches (concatenated in order).

    ``csv``: a :class:`~qarm_features.project.CsvSpec` for delimited files (any suffix
    other than parquet is read as delimited text when it is given).

    Raises:
        InputError: nothing matches, an unknown suffix, or a file that cannot be read.
    """
    path = str(path)
    files = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
    if not files:
        raise InputError(f"{what}: no file matches {path}")
    frames = []
    for f in files:
        suffix = Path(f).suffix.lower()
        try:
            if suffix in (".parquet", ".pq"):
                frames.append(pd.read_parquet(f))
            elif csv is None and suffix not in (".csv", ".tsv"):
                raise InputError(f"{what}: {f}: unknown file type {suffix!r}; use parquet or CSV")
            else:
                sep = getattr(csv, "sep", ",")
                sep = "\t" if suffix == ".tsv" and sep == "," else sep
                frames.append(
                    pd.read_csv(
                        f,
                        sep=sep,
                        header=0 if getattr(csv, "header", True) else None,
                        names=getattr(csv, "names", None),
                        encoding=getattr(csv, "encoding", "utf-8"),
                    )
                )
        except FileNotFoundError:
            raise InputError(f"{what}: {f} does not exist") from None
        except (OSError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{what}: cannot read {f} ({exc})") from None
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    name = files[0] if len(files) == 1 else f"{path} ({len(files)} files)"
    return Table(frame.reset_index(drop=True), name)


def require_columns(table: Table, columns, *, what: str) -> None:
    missing = [c for c in columns if c not in table.frame.columns]
    if missing:
        raise InputError(
            f"{what} {table.name}: missing column(s) {missing}; it has {list(table.frame.columns)}"
        )


def _show(value) -> str:
    """A value as a user wrote it (numpy scalars as plain Python), for messages."""
    value = value.item() if isinstance(value, np.generic) else value
    return f"{value!r:.80}"


def _rows(mask: np.ndarray) -> list[int]:
    return np.flatnonzero(mask)[:_EXAMPLES].tolist()


@dataclass(frozen=True)
class Keys:
    """A catalog's item keys and the int64 ids the pipeline uses for them.

    Attributes:
        keys: ``(n,)`` the catalog's ids, int64 or str (object array).
        ids: ``(n,)`` int64: the keys themselves, or ``0 .. n-1`` for string keys.
        kind: ``"int64"`` or ``"string"``.
    """

    keys: np.ndarray
    ids: np.ndarray
    kind: str

    def lookup(self, values, *, what: str, column: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, known mask) of ``values``; unknown values get id -1."""
        values = pd.Series(values)
        if self.kind == "string":
            values = values.astype(str)
        else:
            if not pd.api.types.is_integer_dtype(values):
                coerced = pd.to_numeric(values, errors="coerce")
                bad = coerced.isna() | (coerced != coerced.round())
                if bad.any():
                    rows = _rows(bad.to_numpy())
                    raise InputError(
                        f"{what}: column {column!r} row {rows[0]}: {_show(values.iloc[rows[0]])} "
                        "is not an integer id, as the catalog's ids are"
                    )
                values = coerced.astype(np.int64)
        index = pd.Index(self.keys)
        pos = index.get_indexer(values.to_numpy())
        known = pos >= 0
        ids = np.where(known, self.ids[np.maximum(pos, 0)], -1).astype(np.int64)
        return ids, known


def catalog_keys(frame: pd.DataFrame, column: str, *, name: str) -> Keys:
    """Check the id column of a catalog (no nulls, no duplicates, int or str) -> keys."""
    what = f"catalog {name}: column {column!r}"
    col = frame[column]
    if len(col) == 0:
        raise InputError(f"catalog {name} is empty: no items to encode")
    null = col.isna().to_numpy()
    if null.any():
        raise InputError(f"{what} row {_rows(null)[0]}: the id is missing ({int(null.sum())} rows)")
    if pd.api.types.is_integer_dtype(col):
        keys, kind = col.to_numpy(np.int64), "int64"
    elif pd.api.types.is_float_dtype(col):
        frac = (col != col.round()).to_numpy()
        if frac.any():
            r = _rows(frac)[0]
            raise InputError(f"{what} row {r}: {_show(col.iloc[r])} is not an integer or string id")
        keys, kind = col.to_numpy(np.int64), "int64"
    else:
        not_str = ~col.map(lambda v: isinstance(v, str)).to_numpy()
        if not_str.any():
            r = _rows(not_str)[0]
            raise InputError(
                f"{what} row {r}: {_show(col.iloc[r])} ({type(col.iloc[r]).__name__}) mixes with "
                "string ids; give every id as a string"
            )
        keys, kind = col.to_numpy(object), "string"
    if kind == "int64" and (keys < 0).any():
        r = _rows(keys < 0)[0]
        raise InputError(
            f"{what} row {r}: id {int(keys[r])} is negative; int ids must be >= 0 (a code of "
            "-1 marks a missing code): re-key them or give them as strings"
        )
    dup = pd.Series(keys).duplicated(keep=False).to_numpy()
    if dup.any():
        rows = _rows(dup)
        raise InputError(
            f"{what}: duplicate id {_show(keys[rows[0]])} (rows {rows}); keep one row per item"
        )
    ids = keys if kind == "int64" else np.arange(len(keys), dtype=np.int64)
    return Keys(keys=keys, ids=np.asarray(ids, np.int64), kind=kind)


def render_texts(frame: pd.DataFrame, template: str, *, name: str) -> list[str]:
    """``template.format(**row)`` for every row; a missing column is named before any row."""
    import string

    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    missing = sorted(f for f in fields if f not in frame.columns)
    if missing:
        raise InputError(
            f"catalog {name}: the text template {template!r} names column(s) {missing} that "
            f"the catalog does not have (it has {list(frame.columns)})"
        )
    cols = {f: frame[f].fillna("").astype(str).tolist() for f in fields}
    return [template.format(**{f: cols[f][i] for f in fields}) for i in range(len(frame))]


def embedding_column(frame: pd.DataFrame, column: str, *, name: str, what: str) -> np.ndarray:
    """A column of equal-length numeric vectors -> ``(n, d)`` float32 (checked per row)."""
    values = frame[column].tolist()
    dim = None
    for i, v in enumerate(values):
        try:
            arr = np.asarray(v, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(
                f"{what} {name}: column {column!r} row {i}: {_show(v)} is not a list of numbers"
            ) from None
        if arr.ndim != 1 or arr.size == 0:
            raise InputError(
                f"{what} {name}: column {column!r} row {i}: expected a non-empty vector, "
                f"got shape {arr.shape}"
            )
        if dim is None:
            dim = arr.size
        elif arr.size != dim:
            raise InputError(
                f"{what} {name}: column {column!r} row {i}: {arr.size} values, row 0 has {dim}"
            )
        if not np.isfinite(arr).all():
            raise InputError(f"{what} {name}: column {column!r} row {i}: holds NaN or inf")
    return np.asarray(np.stack([np.asarray(v, np.float32) for v in values]), np.float32)


def check_images(frame: pd.DataFrame, column: str, base: Path, *, name: str) -> list[Path]:
    """Image paths of a column, each opened and verified; a bad one names its row."""
    from PIL import Image, UnidentifiedImageError

    paths = []
    for i, v in enumerate(frame[column].tolist()):
        if not isinstance(v, str) or not v:
            raise InputError(f"catalog {name}: column {column!r} row {i}: no image path ({v!r})")
        p = Path(v) if Path(v).is_absolute() else base / v
        try:
            with Image.open(p) as im:
                im.verify()
        except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
            raise InputError(
                f"catalog {name}: column {column!r} row {i}: image {p} does not open ({exc})"
            ) from None
        paths.append(p)
    return paths


def unix_seconds(ts: pd.Series, *, what: str, column: str) -> np.ndarray:
    """A time column -> int64 unix seconds: numbers (unix seconds), datetimes, or text of
    either (a CSV column turns to text when one row is not a number).

    Text is read as unix seconds when most of its values are numbers, else as times
    (ISO 8601 first, any other format row by row); the first value that is neither is
    named with its row, never a good row of a column that one bad row made text.
    """
    if pd.api.types.is_numeric_dtype(ts) and not pd.api.types.is_bool_dtype(ts):
        return ts.to_numpy(np.int64)
    if pd.api.types.is_datetime64_any_dtype(ts):
        parsed = pd.to_datetime(ts, utc=True)
    else:
        numbers = pd.to_numeric(ts, errors="coerce")
        if numbers.notna().sum() * 2 >= len(ts):  # unix seconds written as text
            bad = numbers.isna().to_numpy()
            if bad.any():
                _not_a_time(ts, bad, what=what, column=column, expected="unix seconds")
            return numbers.to_numpy(np.int64)
        parsed = pd.to_datetime(ts, utc=True, errors="coerce", format="ISO8601")
        retry = parsed.isna()
        if retry.any():  # other formats, row by row (what pandas warns it falls back to)
            parsed[retry] = pd.to_datetime(ts[retry], utc=True, errors="coerce", format="mixed")
        bad = parsed.isna().to_numpy()
        if bad.any():
            example = "dates/times, e.g. 2024-01-31T12:00:00Z"
            _not_a_time(ts, bad, what=what, column=column, expected=example)
    return ((parsed - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(
        np.int64
    )


def _not_a_time(ts: pd.Series, bad: np.ndarray, *, what: str, column: str, expected: str):
    r = _rows(bad)[0]
    raise InputError(
        f"{what}: column {column!r} row {r}: {_show(ts.iloc[r])} is not a time (the column "
        f"holds {expected}; {int(bad.sum())} bad row(s))"
    )


def events_frame(table: Table, spec, keys: Keys) -> tuple[pd.DataFrame, float, dict]:
    """The interaction log as the pipeline wants it, and its positive threshold.

    Returns:
        ``(interactions, threshold, stats)``: ``user_id`` (int64; string users are
        factorised), ``item_id`` (the catalog's int64 ids), ``rating`` (float32: the
        rating column, the 0/1 label, or 1.0 for implicit rows), ``timestamp`` (int64
        unix seconds), sorted by time; rows with ``rating >= threshold`` are positives.

    Raises:
        InputError: missing columns, a bad label/rating/timestamp value (row named), or
            events naming items outside the catalog (unless ``unknown_items: drop``).
    """
    what = f"events {table.name}"
    cols = [spec.user, spec.item, spec.timestamp]
    if spec.label:
        cols.append(spec.label)
    if spec.rating:
        cols.append(spec.rating.column)
    require_columns(table, cols, what="events")
    df = table.frame
    if len(df) == 0:
        raise InputError(f"{what} is empty: no interactions to mine pairs from")
    for c in (spec.user, spec.item, spec.timestamp):
        null = df[c].isna().to_numpy()
        if null.any():
            raise InputError(f"{what}: column {c!r} row {_rows(null)[0]}: value is missing")
    item_ids, known = keys.lookup(df[spec.item], what=what, column=spec.item)
    stats = {"n_events": int(len(df)), "n_unknown_item_events": int((~known).sum())}
    if not known.all():
        bad = df[spec.item][~known]
        examples = bad.unique()[:_EXAMPLES].tolist()
        if spec.unknown_items == "error":
            raise InputError(
                f"{what}: column {spec.item!r}: {int((~known).sum())} events name "
                f"{bad.nunique()} item(s) not in the catalog, e.g. {examples} (first at row "
                f"{_rows(~known)[0]}); fix the log or set events.unknown_items: drop"
            )
        log.warning(
            "%s: dropping %d events of %d unknown items, e.g. %s",
            what,
            int((~known).sum()),
            bad.nunique(),
            examples,
        )

    if spec.rating:
        rating = pd.to_numeric(df[spec.rating.column], errors="coerce")
        bad = rating.isna().to_numpy()
        if bad.any():
            r = _rows(bad)[0]
            raise InputError(
                f"{what}: column {spec.rating.column!r} row {r}: "
                f"{_show(df[spec.rating.column].iloc[r])} is not a number"
            )
        threshold = float(spec.rating.threshold)
    elif spec.label:
        label = df[spec.label]
        ok = label.isin([0, 1, True, False]).to_numpy()
        if not ok.all():
            r = _rows(~ok)[0]
            raise InputError(
                f"{what}: column {spec.label!r} row {r}: {_show(label.iloc[r])} is not a 0/1 label"
            )
        rating, threshold = label.astype(np.float32), 1.0
    else:
        rating, threshold = pd.Series(np.ones(len(df), np.float32)), 1.0

    seconds = unix_seconds(df[spec.timestamp], what=what, column=spec.timestamp)
    users = df[spec.user]
    if not pd.api.types.is_integer_dtype(users):
        users = pd.Series(pd.factorize(users.astype(str))[0], index=df.index)
    out = pd.DataFrame(
        {
            "user_id": users.to_numpy(np.int64),
            "item_id": item_ids,
            "rating": np.asarray(rating, np.float32),
            "timestamp": np.asarray(seconds, np.int64),
        }
    )[known]
    out = out.sort_values("timestamp", kind="stable").reset_index(drop=True)
    stats["n_positive_events"] = int((out["rating"] >= threshold).sum())
    return out, threshold, stats
