"""The batch transformation, streamed: catalog chunks -> codes -> parquet row groups.

:func:`write_item_sources` is what ``qarm materialize`` / :func:`~qarm_features.feast.job.prepare_sources`
runs over the whole catalog. Memory is bounded by the chunk, not the catalog:

- the catalog is read ``chunk_rows`` rows at a time (:func:`iter_catalog`): the bundle's
  own ``raw_emb.npy`` opened memory-mapped, a team's catalog parquet file read in record
  batches, or an in-memory frame sliced;
- each chunk is checked row by row (a bad row raises :class:`~qarm_features.errors.InputError`
  naming the source, the column, the row and the value), encoded
  (:func:`qarm_features.bundle.encode.encode_items`, whose rows do not depend on the batch) and
  appended as one parquet row group to the codes and the content files, each a temp file
  renamed into place only when every chunk succeeded (all or nothing); one I/O thread
  reads the next chunk and writes the last one while a chunk encodes (one of each in
  flight: a few chunks in memory, whatever the catalog);
- what outlives a chunk: the item ids (duplicates are checked over the whole catalog at
  the end) and the RQ codes of the items a user history names (``keep_ids``).

The files hold exactly the rows and values of the one-shot path (``encode_catalog`` +
``write_parquet``; ``tests/unit/test_stream.py`` compares them); only the row-group
boundaries differ.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qarm_features._atomic import honour_umask
from qarm_features._validate import check_columns
from qarm_features.errors import InputError
from qarm_features.progress import ProgressCallback, stage
from qarm_features.schema import (
    CREATED,
    EVENT_TIMESTAMP,
    HIST_ITEM_IDS,
    ITEM_ID,
    RAW_EMB,
    USER_ID,
)

# Rows per chunk: ~100 MiB of 384-d float32 input, a few hundred MiB in flight while it is
# encoded and written; a row group of that size reads well in DuckDB, pandas and Feast.
DEFAULT_CHUNK_ROWS = 65_536
READ_BUFFER = 4 << 20  # bytes per buffered parquet column read
RAW_FILE = "raw_emb.npy"  # the bundle's catalog embeddings (bundle.py's file name)


@dataclass
class Chunk:
    """``n`` catalog rows: ``keys`` (int64 ids or string keys), ``raw`` ``(n, d)`` float32,
    ``start`` the row of the first one in the catalog."""

    keys: np.ndarray
    raw: np.ndarray
    start: int

    def __len__(self) -> int:
        return int(self.keys.shape[0])


def _keys(values, id_type: str, *, where: str, column: str, start: int) -> np.ndarray:
    """The join key column as int64 (int catalogs) or str objects (string catalogs)."""
    s = pd.Series(values)
    if id_type != "int64":
        return s.astype(str).to_numpy(object)
    try:
        return s.astype(np.int64).to_numpy()
    except (TypeError, ValueError, OverflowError):
        bad = pd.to_numeric(s, errors="coerce")
        row = int(np.flatnonzero(bad.isna().to_numpy() | (bad % 1 != 0).to_numpy())[0])
        raise InputError(
            f"{where}: column {column!r}, row {start + row}: value {s.iloc[row]!r} is not an "
            "integer id, and the bundle's catalog has int64 ids"
        ) from None


def _check_raw(raw: np.ndarray, keys, *, where: str, dim: int, start: int) -> np.ndarray:
    if raw.shape[1] != dim:
        raise InputError(
            f"{where}: column {RAW_EMB!r}: rows hold {raw.shape[1]} values, the bundle "
            f"expects {dim}; was the catalog encoded by another encoder?"
        )
    finite = np.isfinite(raw)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise InputError(
            f"{where}: column {RAW_EMB!r}, row {start + int(row)} (item {_key(keys[row])!r}): "
            f"value {raw[row, col]} at position {int(col)} is not finite; repair or drop the row"
        )
    return np.ascontiguousarray(raw, dtype=np.float32)


def frame_raw(values, keys, *, where: str, dim: int, start: int) -> np.ndarray:
    """Stack a list column of vectors, naming the first row that is not ``dim`` numbers."""
    out = np.empty((len(values), dim), np.float32)
    for i, v in enumerate(values):
        try:
            row = np.asarray(v, dtype=np.float32)
        except (TypeError, ValueError):
            row = None
        if row is None or row.ndim != 1 or row.shape[0] != dim:
            raise InputError(
                f"{where}: column {RAW_EMB!r}, row {start + i} (item {_key(keys[i])!r}): value "
                f"{_show(v)} is not a list of {dim} numbers"
            )
        out[i] = row
    return out


def _key(k):
    """An id as the user wrote it (``5``, not ``np.int64(5)``)."""
    return k.item() if isinstance(k, np.generic) else k


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _arrow_raw(column, keys, *, where: str, dim: int, start: int) -> np.ndarray:
    """``(n, dim)`` float32 from an arrow list column, naming the first bad row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) and not (
        pa.types.is_fixed_size_list(column.type)
    ):
        raise InputError(
            f"{where}: column {RAW_EMB!r} is {column.type}, expected a list of {dim} floats"
        )
    lengths = pc.fill_null(pc.list_value_length(column), -1).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != dim)
    if bad.size:
        i = int(bad[0])
        raise InputError(
            f"{where}: column {RAW_EMB!r}, row {start + i} (item {_key(keys[i])!r}): value "
            f"{_show(column[i].as_py())} is not a list of {dim} numbers"
        )
    values = column.flatten()
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise InputError(f"{where}: column {RAW_EMB!r} holds {values.type} values, expected floats")
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)  # null: NaN
    return flat.reshape(len(keys), dim)


def iter_catalog(
    catalog, bundle, *, join_key: str = ITEM_ID, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Iterator[Chunk]:
    """The catalog in chunks of ``chunk_rows`` rows, checked.

    Args:
        catalog: None (the bundle's own catalog, its ``raw_emb.npy`` memory-mapped), a
            DataFrame, or the path of a parquet file; a frame or file has ``item_id`` (or
            ``join_key``) and ``raw_emb`` (a list of ``d_raw`` floats per row).
        bundle: the loaded bundle (raw width, id type).
        join_key: the repo's item join key.
        chunk_rows: rows per chunk.

    Raises:
        InputError: a missing column, an id of the wrong type, a row that is not
            ``d_raw`` finite numbers (named by source, column, row and value).
    """
    if int(chunk_rows) < 1:
        raise InputError(f"chunk_rows: must be >= 1, got {chunk_rows}")
    dim, id_type = bundle.raw_dim, bundle.id_type
    if catalog is None:
        raw = np.load(Path(bundle.path) / RAW_FILE, mmap_mode="r", allow_pickle=False)
        keys = bundle.keys_of(bundle.item_ids)
        where = f"bundle {bundle.path}: {RAW_FILE}"
        for lo in range(0, raw.shape[0], chunk_rows):
            k = _keys(keys[lo : lo + chunk_rows], id_type, where=where, column=ITEM_ID, start=lo)
            r = np.asarray(raw[lo : lo + chunk_rows], dtype=np.float32)
            yield Chunk(k, _check_raw(r, k, where=where, dim=dim, start=lo), lo)
        return
    if isinstance(catalog, pd.DataFrame):
        yield from _frame_chunks(catalog, join_key, dim, id_type, chunk_rows)
        return
    yield from _parquet_chunks(Path(catalog), join_key, dim, id_type, chunk_rows)


def _id_column(columns, join_key: str, where: str) -> str:
    for name in (join_key, ITEM_ID):
        if name in columns:
            break
    else:
        raise InputError(
            f"{where}: missing column {join_key!r} (the item join key); columns are {list(columns)}"
        )
    if RAW_EMB not in columns:
        raise InputError(f"{where}: missing column {RAW_EMB!r}; columns are {list(columns)}")
    return name


def _frame_chunks(df: pd.DataFrame, join_key, dim, id_type, chunk_rows) -> Iterator[Chunk]:
    where = "catalog_df"
    id_col = _id_column(df.columns, join_key, where)
    for lo in range(0, len(df), chunk_rows):
        part = df.iloc[lo : lo + chunk_rows]
        k = _keys(part[id_col].to_numpy(), id_type, where=where, column=id_col, start=lo)
        r = frame_raw(part[RAW_EMB].to_numpy(), k, where=where, dim=dim, start=lo)
        yield Chunk(k, _check_raw(r, k, where=where, dim=dim, start=lo), lo)


def _parquet_chunks(path: Path, join_key, dim, id_type, chunk_rows) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    where = str(path)
    try:
        # pre_buffer (the default) keeps every row group read so far cached until the
        # iteration ends: +1 row group of memory per batch (pyarrow 26). Buffered stream
        # reads instead hold one batch.
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER)
    except (OSError, ValueError) as exc:
        raise InputError(f"{where}: cannot read it as parquet ({exc})") from None
    id_col = _id_column(pf.schema_arrow.names, join_key, where)
    lo = 0
    for batch in pf.iter_batches(batch_size=chunk_rows, columns=[id_col, RAW_EMB]):
        ids = batch.column(id_col).to_numpy(zero_copy_only=False)
        k = _keys(ids, id_type, where=where, column=id_col, start=lo)
        r = _arrow_raw(batch.column(RAW_EMB), k, where=where, dim=dim, start=lo)
        yield Chunk(k, _check_raw(r, k, where=where, dim=dim, start=lo), lo)
        lo += batch.num_rows


def catalog_rows(bundle, catalog) -> int:
    """Rows of a catalog as :func:`iter_catalog` takes it (a parquet file: from its footer)."""
    if catalog is None:
        return int(bundle.item_ids.shape[0])
    if isinstance(catalog, pd.DataFrame):
        return len(catalog)
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(catalog).metadata.num_rows)
    except (OSError, ValueError) as exc:
        raise InputError(f"{catalog}: cannot read it as parquet ({exc})") from None


def history_items(interactions_df, history_file: Path):
    """``(ids, old_history)``: the item ids a user history will name (their codes are kept
    while streaming) and the existing history rows (re-coded when no interactions)."""
    if interactions_df is not None:
        check_columns(interactions_df, [USER_ID, ITEM_ID, "timestamp"], name="interactions")
        return interactions_df[ITEM_ID].unique(), None
    if history_file.exists():
        old = pd.read_parquet(history_file)
        lists = [np.asarray(v) for v in old[HIST_ITEM_IDS]]
        return (np.unique(np.concatenate(lists)) if lists else np.empty(0, np.int64)), old
    return None, None


class RowGroupWriter:
    """A parquet file written row group by row group into a temp file beside ``path``;
    :meth:`commit` renames it into place, :meth:`abort` deletes it."""

    def __init__(self, path: Path, schema):
        import pyarrow.parquet as pq

        self.path, self.schema = Path(path), schema
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.stem}.", suffix=".parquet.tmp", dir=self.path.parent
        )
        os.close(fd)
        self.tmp = Path(tmp)
        self._writer = pq.ParquetWriter(self.tmp, schema)
        self.rows = 0

    def write(self, table) -> None:
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.rows += table.num_rows

    def commit(self) -> None:
        if self.rows == 0:  # an empty file still carries the schema
            self._writer.write_table(self.schema.empty_table())
        self._writer.close()
        honour_umask(self.tmp)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _lists(values: np.ndarray):
    """``(n, d)`` array -> arrow ``list<item>`` of n rows (the schema's list type)."""
    import pyarrow as pa

    n, d = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values).ravel()))


def _id_array(keys: np.ndarray, schema, id_column: str):
    import pyarrow as pa

    return pa.array(keys, type=schema.field(id_column).type)


def _stamps(n: int, when: pd.Timestamp, schema):
    import pyarrow as pa

    micros = int(pd.Timestamp(when).value // 1000)  # ns -> us, as from_pandas casts it
    return pa.array(np.full(n, micros, np.int64)).cast(schema.field(EVENT_TIMESTAMP).type)


def codes_table(bundle, chunk: Chunk, enc, schema, *, id_column: str, stamp, created):
    """One chunk's rows of the codes source (``schema``: ``bundle.schema.arrow("codes")``)."""
    import pyarrow as pa

    n = len(chunk)
    cols = {
        id_column: _id_array(chunk.keys, schema, id_column),
        EVENT_TIMESTAMP: _stamps(n, stamp, schema),
        CREATED: _stamps(n, created, schema),
    }
    for name, value in enc.columns().items():
        if isinstance(value, str):
            cols[name] = pa.array(np.full(n, value, dtype=object), type=pa.string())
        else:
            cols[name] = _lists(value) if value.ndim == 2 else pa.array(value)
    return pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema)


def content_table(chunk: Chunk, schema, *, id_column: str, stamp, created):
    """One chunk's rows of the content source (``bundle.schema.arrow("content")``)."""
    import pyarrow as pa

    n = len(chunk)
    cols = {
        id_column: _id_array(chunk.keys, schema, id_column),
        EVENT_TIMESTAMP: _stamps(n, stamp, schema),
        CREATED: _stamps(n, created, schema),
        RAW_EMB: _lists(chunk.raw),
    }
    return pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema)


def _check_unique(keys: np.ndarray) -> None:
    """Duplicate ids over the whole catalog, named as ``encode_catalog`` names them."""
    dup = pd.Series(keys).duplicated(keep=False).to_numpy()
    if dup.any():
        rows = np.flatnonzero(dup)[:5].tolist()
        raise InputError(
            f"catalog: duplicate item_id {_key(keys[rows[0]])!r} (rows {rows}); keep one row per item"
        )


@dataclass
class Written:
    """What :func:`write_item_sources` wrote: every key in row order, and the RQ codes of
    the ``keep_ids`` it met (``item_id`` + the RQ columns)."""

    keys: np.ndarray
    kept_codes: pd.DataFrame
    n_catalog: int


def write_item_sources(
    bundle,
    chunks,
    *,
    codes_path: Path,
    content_path: Path,
    id_column: str,
    stamp,
    created,
    total: int | None = None,
    keep_ids=None,
    extra=None,
    progress: ProgressCallback | None = None,
    records: dict | None = None,
) -> Written:
    """Encode catalog chunks and write the codes and content sources, all or nothing.

    Args:
        bundle: the loaded bundle.
        chunks: :class:`Chunk` iterable (:func:`iter_catalog`).
        codes_path, content_path: the files to write (atomically, when every chunk passed).
        id_column: the repo's item join key.
        stamp, created: the rows' ``event_timestamp`` and ``created``.
        total: catalog rows, for the progress bar's ETA (None: unknown).
        keep_ids: ids whose RQ codes are returned (user histories); None keeps none.
        extra: a callable ``keys -> Chunk | None`` run after the catalog with every key
            seen: rows to append (items pushed since their last build).
        progress, records: see :func:`qarm_features.progress.stage` (stage ``encode``).

    Raises:
        InputError: a bad row or a duplicated id (nothing is renamed into place).
    """
    from qarm_features.bundle.encode import encode_items

    keyed = {"id_type": bundle.id_type, "id_column": id_column}
    codes_schema = bundle.schema.arrow("codes", **keyed)
    content_schema = bundle.schema.arrow("content", **keyed)
    levels = list(bundle.schema.rq_columns)
    keep = None if keep_ids is None else np.unique(np.asarray(keep_ids))
    codes_out = RowGroupWriter(codes_path, codes_schema)
    content_out = RowGroupWriter(content_path, content_schema)
    seen: list[np.ndarray] = []
    kept: list[pd.DataFrame] = []
    n_catalog = 0
    # One I/O thread reads the next chunk and writes the last one's row groups while this
    # thread's row-block workers encode: parquet decode and encode run at once instead of
    # in turn (they took ~40 us of the ~150 us of CPU an item cost at 1M items, serial).
    # At most one read ahead and one write in flight: memory stays a few chunks.
    io = ThreadPoolExecutor(1, thread_name_prefix="qarm-io")
    writing = None

    def write(codes, content) -> None:
        codes_out.write(codes)
        content_out.write(content)

    def put(chunk: Chunk) -> None:
        nonlocal writing
        enc = encode_items(bundle, chunk.raw, bundle.ids_of(chunk.keys))
        stamps = {"id_column": id_column, "stamp": stamp, "created": created}
        tables = (
            codes_table(bundle, chunk, enc, codes_schema, **stamps),
            content_table(chunk, content_schema, **stamps),
        )
        if writing is not None:
            writing.result()  # row groups in catalog order; re-raises a failed write
        writing = io.submit(write, *tables)
        seen.append(chunk.keys)
        if keep is not None and keep.size:
            mask = np.isin(chunk.keys, keep)
            if mask.any():
                frame = pd.DataFrame(enc.rq_codes[mask], columns=levels)
                frame.insert(0, ITEM_ID, chunk.keys[mask])
                kept.append(frame)

    try:
        with stage("encode", total=total, progress=progress, records=records) as s:
            it = iter(chunks)
            reading = io.submit(next, it, None)
            while (chunk := reading.result()) is not None:
                reading = io.submit(next, it, None)  # read ahead while this one encodes
                put(chunk)
                s.advance(len(chunk))
            n_catalog = sum(len(k) for k in seen)
            keys = np.concatenate(seen) if seen else np.empty(0, np.int64)
            more = extra(keys) if extra is not None else None
            if more is not None and len(more):
                put(more)
                s.advance(len(more))
            if writing is not None:
                writing.result()
        keys = np.concatenate(seen) if seen else np.empty(0, np.int64)
        _check_unique(keys)
        io.shutdown()
        codes_out.commit()
        content_out.commit()
    except BaseException:
        io.shutdown(cancel_futures=True)  # waits for a read or write in flight
        codes_out.abort()
        content_out.abort()
        raise
    codes = (
        pd.concat(kept, ignore_index=True)
        if kept
        else pd.DataFrame({ITEM_ID: keys[:0], **{name: np.empty(0, np.int64) for name in levels}})
    )
    return Written(keys=keys, kept_codes=codes, n_catalog=n_catalog)
