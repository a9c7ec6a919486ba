"""Feast's DuckDB offline store, with three fixes the QARM repo needs.

Feast 0.67's file (dask) offline store drops every entity row that precedes the first
row of a joined view (a user's first events: no ``user_history`` row yet) and takes
~1.7 ms a row; its DuckDB store (``offline_store: {type: duckdb}``) returns every row,
nulls where no feature row precedes it, ~40x faster. Three things in it break a QARM repo,
and one makes it slow:

- **A BatchFeatureView gets no input columns.** The compute engine asks for "all
  columns" of a transformed view's source with an empty feature list (the dask store reads
  everything); the ibis code behind the DuckDB store selects just the join keys and
  timestamps, so ``qarm_batch``'s UDF sees no ``raw_emb``. Here an empty list means every
  column of the source.
- **Relative source paths follow the working directory.** A ``FileSource`` path such as
  ``data/current/qarm_codes.parquet`` is read (and pushed to) relative to the process's
  working directory instead of the repo: ``FeatureStore(repo_path=...)`` from anywhere else
  finds no file. Here relative paths are taken from the repo, as the file store does.
- **A push rewrites the source in place.** ``store.push(..., to=ONLINE_AND_OFFLINE)``
  appends by rewriting the whole parquet where it lies; a crash mid-write leaves a torn file
  that training and the next rollout read. Here the new file is written beside it and
  renamed over it.

- **The point-in-time join is a join, then a sort.** Feast's ibis code joins every
  entity row with every earlier feature row of its key, then keeps the latest per entity
  row with a window over a string row id: cost grows with rows x history per key, list
  columns carried through the sort. Here each view is one ``ASOF LEFT JOIN`` (DuckDB's
  point-in-time join: the latest row at or before the entity row's time), after keeping
  the newest ``created`` row per (key, time): same rows, same values (Feast's join is the
  fallback with ``filter_by_created_timestamp`` or a SQL entity frame).

Everything else (``staging_location``, Delta/Iceberg sources, on-demand views on the
result) is Feast's. Use it in ``feature_store.yaml``::

    offline_store:
        type: qarm_features.feast.duckdb_store.QarmDuckDBOfflineStore
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Literal

import ibis
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from feast.infra.offline_stores import duckdb as _feast_duckdb
from feast.infra.offline_stores.duckdb import DuckDBOfflineStore, DuckDBOfflineStoreConfig
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.ibis import (
    IbisRetrievalJob,
    _get_entity_df_event_timestamp_range,
    _to_utc,
    deduplicate,
    get_historical_features_ibis,
    offline_write_batch_ibis,
    pull_all_from_table_or_query_ibis,
    pull_latest_from_table_or_query_ibis,
)
from ibis.expr import datatypes as dt

from qarm_features.feast.sources import write_table

TYPE = "qarm_features.feast.duckdb_store.QarmDuckDBOfflineStore"


class QarmDuckDBOfflineStoreConfig(DuckDBOfflineStoreConfig):
    """``DuckDBOfflineStoreConfig`` under this store's type name (same keys)."""

    type: Literal["qarm_features.feast.duckdb_store.QarmDuckDBOfflineStore"] = TYPE  # type: ignore[assignment]


def _local_parquet(source) -> bool:
    """A FileSource on a local parquet file (the kind the fixes apply to)."""
    if not isinstance(source, FileSource):
        return False
    fmt = source.file_format
    uri = source.path
    local = "://" not in uri
    parquet = fmt is None and uri.endswith(".parquet") or type(fmt).__name__ == "ParquetFormat"
    return local and parquet


def _in_repo(source, repo_path: str | None):
    """``source`` with a relative local path made absolute against the repo."""
    if not isinstance(source, FileSource) or repo_path is None:
        return source
    uri = source.path
    if "://" in uri or Path(uri).is_absolute():
        return source
    resolved = copy.copy(source)
    resolved.file_options = copy.copy(source.file_options)
    resolved.file_options.uri = str(Path(repo_path) / uri)
    return resolved


# ibis 12 reads a duckdb table's schema with ``fetch_arrow_table()``, which duckdb 2
# deprecates: one DeprecationWarning per source read, nothing for a user to act on.
_IBIS_ARROW_DEPRECATION = r"fetch_arrow_table\(\) is deprecated"


def _read(source, repo_path: str):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _IBIS_ARROW_DEPRECATION, DeprecationWarning)
        return _feast_duckdb._read_data_source(_in_repo(source, repo_path), repo_path)


def _write(table, source, repo_path: str, mode: str = "append", allow_overwrite: bool = False):
    source = _in_repo(source, repo_path)
    if mode != "append" or not _local_parquet(source) or not Path(source.path).is_file():
        return _feast_duckdb._write_data_source(table, source, repo_path, mode, allow_overwrite)
    # append to a local parquet file: old rows + new rows, written beside it, renamed over it
    path = Path(source.path)
    old = pq.read_table(path)
    new = table.to_pyarrow()
    if new.schema != old.schema:
        new = new.cast(old.schema)
    write_table(pa.concat_tables([old, new]), path)


def _all_columns(config, data_source, join_keys, timestamp_field, created) -> list[str]:
    """Every column of the source but the keys and timestamps (an empty feature list)."""
    skip = set(join_keys) | {timestamp_field, created}
    names = _read(data_source, str(config.repo_path)).columns
    return [c for c in names if c not in skip]


def _view_table(config, view, refs: list[str], full_feature_names: bool, i: int):
    """One view's source as ``(table, key map, ts column, feature columns, ttl)``: keys and
    time renamed apart from the entity frame's, the newest ``created`` row per (key, time)."""
    source = view.batch_source
    table = _read(source, str(config.repo_path))
    for old, new in source.field_mapping.items():
        if old in table.columns:
            table = table.rename({new: old})
    ts, created = source.timestamp_field, source.created_timestamp_column
    prefix = view.projection.name_to_use()
    names = [r.split(":", 1)[1] for r in refs if r.startswith(f"{prefix}:")]
    outs = names
    if full_feature_names:
        base = view.projection.name_alias or view.name
        outs = [f"{base}__{n}" for n in names]
    join_keys = view.projection.join_key_map or {e.name: e.name for e in view.entity_columns}
    keys = {k: f"__qarm_k{i}_{j}" for j, k in enumerate(join_keys)}
    t_col = f"__qarm_ts{i}"
    cols = {keys[k]: table[k] for k in join_keys}
    cols[t_col] = table[ts].cast(dt.Timestamp(timezone="UTC"))
    if created:
        cols["__qarm_created"] = table[created].cast(dt.Timestamp(timezone="UTC"))
    cols.update({o: table[n] for n, o in zip(names, outs)})
    table = table.select(**cols)
    if created:  # Feast's tie-break: the newest created row of a (key, time)
        table = deduplicate(table, [*keys.values(), t_col], t_col, "__qarm_created")
        table = table.drop("__qarm_created")
    entity_keys = {keys[k]: v for k, v in join_keys.items()}
    return table, entity_keys, t_col, outs, view.ttl


def _asof_historical(
    config, feature_views, feature_refs, entity_df, registry, project, full_feature_names
):
    """``get_historical_features_ibis`` with one ASOF LEFT JOIN per view."""
    from feast.infra.offline_stores import offline_utils
    from feast.infra.offline_stores.offline_store import RetrievalMetadata
    from feast.on_demand_feature_view import OnDemandFeatureView

    schema = dict(zip(entity_df.columns, entity_df.dtypes))
    ts_col = offline_utils.infer_event_timestamp_from_entity_df(entity_schema=schema)
    time_range = _get_entity_df_event_timestamp_range(entity_df, ts_col)
    entity_df = _to_utc(entity_df, ts_col)
    acc = ibis.memtable(entity_df)
    entity_columns = list(acc.columns)
    added: list[str] = []
    for i, view in enumerate(feature_views):
        table, keys, t_col, outs, ttl = _view_table(
            config, view, feature_refs, full_feature_names, i
        )
        joined = acc.asof_join(
            table,
            on=acc[ts_col] >= table[t_col],
            predicates=[acc[e] == table[k] for k, e in keys.items()],
            rname="{name}__qarm_right",
        )
        features = {o: joined[o] for o in outs}
        if ttl:  # the latest row is too old: Feast's join finds no row (all are older)
            fresh = joined[t_col] >= joined[ts_col] - ibis.interval(
                seconds=int(ttl.total_seconds())
            )
            features = {o: ibis.ifelse(fresh, c, ibis.null(c.type())) for o, c in features.items()}
        acc = joined.select(*[joined[c] for c in entity_columns + added], **features)
        added += outs
    odfvs = OnDemandFeatureView.get_requested_odfvs(feature_refs, project, registry)
    for odfv in [v for v in odfvs if v.mode == "substrait"]:
        acc = odfv.transform_ibis(acc, full_feature_names)
    return IbisRetrievalJob(
        acc,
        [v for v in odfvs if v.mode != "substrait"],
        full_feature_names,
        metadata=RetrievalMetadata(
            features=feature_refs,
            keys=list(set(entity_df.columns) - {ts_col}),
            min_event_timestamp=time_range[0],
            max_event_timestamp=time_range[1],
        ),
        data_source_writer=_write,
        staging_location=config.offline_store.staging_location,
        staging_location_endpoint_override=config.offline_store.staging_location_endpoint_override,
        repo_path=str(config.repo_path),
    )


def _pull(
    pull,
    config,
    data_source,
    join_key_columns,
    feature_name_columns,
    timestamp_field,
    created_timestamp_column,
    start_date,
    end_date,
):
    """Feast's ibis ``pull`` (latest or all) through this store's reader and writer; an
    empty feature list means every column of the source (a BatchFeatureView's input)."""
    if not feature_name_columns:
        feature_name_columns = _all_columns(
            config, data_source, join_key_columns, timestamp_field, created_timestamp_column
        )
    return pull(
        config=config,
        data_source=data_source,
        join_key_columns=join_key_columns,
        feature_name_columns=feature_name_columns,
        timestamp_field=timestamp_field,
        created_timestamp_column=created_timestamp_column,
        start_date=start_date,
        end_date=end_date,
        data_source_reader=_read,
        data_source_writer=_write,
        staging_location=config.offline_store.staging_location,
        staging_location_endpoint_override=config.offline_store.staging_location_endpoint_override,
    )


class QarmDuckDBOfflineStore(DuckDBOfflineStore):
    """``DuckDBOfflineStore`` reading the columns a BatchFeatureView needs, paths from the
    repo, and appending pushed rows atomically."""

    @staticmethod
    def pull_latest_from_table_or_query(
        config,
        data_source,
        join_key_columns,
        feature_name_columns,
        timestamp_field,
        created_timestamp_column,
        start_date,
        end_date,
    ):
        return _pull(
            pull_latest_from_table_or_query_ibis,
            config,
            data_source,
            join_key_columns,
            feature_name_columns,
            timestamp_field,
            created_timestamp_column,
            start_date,
            end_date,
        )

    @staticmethod
    def pull_all_from_table_or_query(
        config,
        data_source,
        join_key_columns,
        feature_name_columns,
        timestamp_field,
        created_timestamp_column=None,
        start_date=None,
        end_date=None,
    ):
        return _pull(
            pull_all_from_table_or_query_ibis,
            config,
            data_source,
            join_key_columns,
            feature_name_columns,
            timestamp_field,
            created_timestamp_column,
            start_date,
            end_date,
        )

    @staticmethod
    def get_historical_features(
        config,
        feature_views,
        feature_refs,
        entity_df,
        registry,
        project,
        full_feature_names=False,
        filter_by_created_timestamp=False,
    ):
        _feast_duckdb._validate_lance_feature_views(feature_views)
        if isinstance(entity_df, pd.DataFrame) and not filter_by_created_timestamp:
            return _asof_historical(
                config,
                feature_views,
                feature_refs,
                entity_df,
                registry,
                project,
                full_feature_names,
            )
        return get_historical_features_ibis(
            config=config,
            feature_views=feature_views,
            feature_refs=feature_refs,
            entity_df=entity_df,
            registry=registry,
            project=project,
            full_feature_names=full_feature_names,
            data_source_reader=_read,
            data_source_writer=_write,
            staging_location=config.offline_store.staging_location,
            staging_location_endpoint_override=config.offline_store.staging_location_endpoint_override,
            filter_by_created_timestamp=filter_by_created_timestamp,
        )

    @staticmethod
    def offline_write_batch(config, feature_view, table, progress):
        offline_write_batch_ibis(
            config=config,
            feature_view=feature_view,
            table=table,
            progress=progress,
            data_source_writer=_write,
        )
