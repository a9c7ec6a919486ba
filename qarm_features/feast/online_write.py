"""Online rows of the per-item views written in record batches: memory bounded by a batch.

Feast 0.67's local materialization pulls a view's whole offline table through the offline
store before writing it (measured: ~5 KiB a row for ``qarm`` and ~11 KiB for
``item_content`` with ``online_write_batch_size`` set, twice that without; a 1M-item
catalog would need over 10 GiB). The views whose source holds exactly one row per item —
``qarm``, ``item_content`` and ``qarm_prev``, written by :mod:`qarm_features.feast.stream`
with every id checked unique — need no point-in-time reduction, so ``qarm materialize``
writes them itself: it reads the source parquet in record batches and hands each to
Feast's own online write (``FeatureStore.write_to_online_store``: the same row
conversion and ``online_write_batch`` as materialization), then records the
materialization interval in the registry as ``feast materialize`` would. Views with
several rows per entity (``user_history``) and transformed views (``qarm_batch``) still go
through ``store.materialize``; so does every view under another compute engine (Ray).
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

# Views whose source has one row per item (the only ones written here).
ONE_ROW_PER_ITEM = ("qarm", "item_content", "qarm_prev")
WRITE_BATCH_ROWS = 10_000  # rows per online write (and per parquet read)
READ_BUFFER = 4 << 20  # bytes per buffered parquet column read (no pre-buffering)


def local_engine(store) -> bool:
    """Whether the repo materializes with Feast's local compute engine (the default)."""
    engine = store.config.batch_engine_config or "local"
    if isinstance(engine, str):
        kind = engine
    elif isinstance(engine, dict):
        kind = engine.get("type", "local")
    else:  # a parsed engine config
        kind = getattr(engine, "type", "local")
    return kind == "local"


def streamable(store, views) -> list[str]:
    """The views of ``views`` that :func:`write_view` writes (the others: materialize)."""
    return [v for v in views if v in ONE_ROW_PER_ITEM] if local_engine(store) else []


def source_rows(store, repo: Path, view_name: str) -> int | None:
    """Rows of a view's parquet source (footer only); None if it has no local file."""
    import pyarrow.parquet as pq

    src = getattr(store.get_feature_view(view_name), "batch_source", None)
    path = Path(getattr(src, "path", None) or "")
    path = path if path.is_absolute() else repo / path
    if not path.is_file():
        return None
    return pq.ParquetFile(path).metadata.num_rows


def write_view(
    store,
    repo: Path,
    view_name: str,
    *,
    start: datetime,
    end: datetime,
    batch_rows: int = WRITE_BATCH_ROWS,
    advance=None,
) -> int:
    """Write a one-row-per-item view's source to the online store, batch by batch.

    Args:
        store: the repo's FeatureStore (definitions applied).
        repo: the repo (relative source paths are taken there).
        view_name: one of :data:`ONE_ROW_PER_ITEM`.
        start, end: the materialization interval recorded in the registry.
        batch_rows: rows per read and online write.
        advance: called with the rows of each batch written (progress).

    Returns:
        The number of rows written.
    """
    import pyarrow.parquet as pq

    if view_name not in ONE_ROW_PER_ITEM:
        raise ValueError(f"{view_name} has no one-row-per-item source; use store.materialize")
    fv = store.get_feature_view(view_name, allow_registry_cache=False)
    src = fv.batch_source
    path = Path(src.path)
    path = path if path.is_absolute() else repo / path
    columns = [c.name for c in fv.entity_columns] + [f.name for f in fv.features]
    columns += [src.timestamp_field] + [c for c in (src.created_timestamp_column,) if c]
    n = 0
    pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        store.write_to_online_store(
            view_name, batch.to_pandas(), allow_registry_cache=True, transform_on_write=False
        )
        n += batch.num_rows
        if advance is not None:
            advance(batch.num_rows)
    store.registry.apply_materialization(fv, store.project, start, end)
    log.info("wrote %d online rows of %s from %s in batches of %d", n, view_name, path, batch_rows)
    return n
