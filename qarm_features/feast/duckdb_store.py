"""Feast's DuckDB offline store, with three fixes the QARM repo needs.

Feast 0.67's file (dask) offline store drops every entity row that precedes the first
row of a joined view (a user's first events: no ``user_history`` row yet) and takes
~1.7 ms a row; its DuckDB store (``offline_store: {type: duckdb}``) returns every row,
nulls where no feature row precedes it, ~40x faster. Three things in it break a QARM repo:

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

Everything else (the point-in-time join, ``staging_location``, Delta/Iceberg sources) is
Feast's. Use it in ``feature_store.yaml``::

    offline_store:
        type: qarm_features.feast.duckdb_store.QarmDuckDBOfflineStore
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from feast.infra.offline_stores import duckdb as _feast_duckdb
from feast.infra.offline_stores.duckdb import DuckDBOfflineStore, DuckDBOfflineStoreConfig
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.ibis import (
    get_historical_features_ibis,
    offline_write_batch_ibis,
    pull_all_from_table_or_query_ibis,
    pull_latest_from_table_or_query_ibis,
)

from qarm_features._atomic import honour_umask

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


def _read(source, repo_path: str):
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
    merged = pa.concat_tables([old, new])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".parquet.tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(merged, tmp)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _all_columns(config, data_source, join_keys, timestamp_field, created) -> list[str]:
    """Every column of the source but the keys and timestamps (an empty feature list)."""
    skip = set(join_keys) | {timestamp_field, created}
    names = _read(data_source, str(config.repo_path)).columns
    return [c for c in names if c not in skip]


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
        if not feature_name_columns:
            feature_name_columns = _all_columns(
                config, data_source, join_key_columns, timestamp_field, created_timestamp_column
            )
        return pull_latest_from_table_or_query_ibis(
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
        if not feature_name_columns:
            feature_name_columns = _all_columns(
                config, data_source, join_key_columns, timestamp_field, created_timestamp_column
            )
        return pull_all_from_table_or_query_ibis(
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
