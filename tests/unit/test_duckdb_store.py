"""The DuckDB offline store's fixes (qarm_features/feast/duckdb_store.py), one by one:
relative source paths are the repo's, a push appends atomically, an empty feature list
reads every column (what a BatchFeatureView's UDF needs)."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import ibis
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feast import FileSource

from qarm_features.feast import duckdb_store


def _source() -> FileSource:
    return FileSource(name="s", path="data/rows.parquet", timestamp_field="event_timestamp")


def _frame(ids, raw) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": pd.Series(ids, dtype="int64"),
            "raw_emb": [[float(v), 0.0] for v in raw],
            "event_timestamp": pd.Timestamp("2020-01-01", tz="UTC"),
        }
    )


@pytest.fixture
def repo(tmp_path, monkeypatch):
    (tmp_path / "repo" / "data").mkdir(parents=True)
    _frame([1, 2], [0.5, 1.5]).to_parquet(tmp_path / "repo" / "data" / "rows.parquet")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no data/ here
    return tmp_path / "repo"


def _config(repo):
    return SimpleNamespace(
        repo_path=repo,
        offline_store=duckdb_store.QarmDuckDBOfflineStoreConfig(),
    )


@pytest.mark.filterwarnings("error::DeprecationWarning")  # ibis' fetch_arrow_table: silenced
def test_relative_paths_are_read_from_the_repo(repo):
    table = duckdb_store._read(_source(), str(repo)).to_pyarrow()
    assert table.column("item_id").to_pylist() == [1, 2]
    assert _source().path == "data/rows.parquet"  # the registered source is unchanged


def test_push_appends_beside_and_renames(repo):
    new = ibis.memtable(pa.Table.from_pandas(_frame([3], [2.5]), preserve_index=False))
    duckdb_store._write(new, _source(), str(repo))
    got = pq.read_table(repo / "data" / "rows.parquet").to_pandas()
    assert got["item_id"].tolist() == [1, 2, 3]
    assert [list(v) for v in got["raw_emb"]] == [[0.5, 0.0], [1.5, 0.0], [2.5, 0.0]]
    assert sorted(p.name for p in (repo / "data").iterdir()) == ["rows.parquet"]
    assert not (repo.parent / "elsewhere" / "data").exists()


def test_a_failed_push_leaves_the_source_whole(repo, monkeypatch):
    before = (repo / "data" / "rows.parquet").read_bytes()

    def disk_full(table, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1 torn")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(duckdb_store.pq, "write_table", disk_full)
    new = ibis.memtable(pa.Table.from_pandas(_frame([3], [2.5]), preserve_index=False))
    with pytest.raises(OSError, match="No space"):
        duckdb_store._write(new, _source(), str(repo))
    assert (repo / "data" / "rows.parquet").read_bytes() == before
    assert sorted(p.name for p in (repo / "data").iterdir()) == ["rows.parquet"]


def test_an_empty_feature_list_reads_every_column(repo):
    """The compute engine's "all columns" request (a BatchFeatureView's input)."""
    store = duckdb_store.QarmDuckDBOfflineStore
    kw = dict(
        config=_config(repo),
        data_source=_source(),
        join_key_columns=["item_id"],
        timestamp_field="event_timestamp",
        created_timestamp_column=None,
        start_date=datetime(1970, 1, 1, tzinfo=timezone.utc),
        end_date=datetime(2030, 1, 1, tzinfo=timezone.utc),
    )
    latest = store.pull_latest_from_table_or_query(feature_name_columns=[], **kw).to_df()
    every = store.pull_all_from_table_or_query(feature_name_columns=[], **kw).to_df()
    for df in (latest, every):
        assert set(df.columns) == {"item_id", "raw_emb", "event_timestamp"}
        assert sorted(df["item_id"]) == [1, 2]
    named = store.pull_all_from_table_or_query(feature_name_columns=["raw_emb"], **kw).to_df()
    assert set(named.columns) == {"item_id", "raw_emb", "event_timestamp"}


def test_the_asof_join_equals_feasts_point_in_time_join(tmp_path, monkeypatch):
    """The fast path (one ASOF LEFT JOIN per view) against Feast's join-then-window code on
    seeded data with ties on (key, time) broken by ``created``, a ttl, unknown keys,
    duplicate entity rows and full feature names; from another working directory."""
    import numpy as np
    from feast import Entity, FeatureStore, FeatureView, Field, ValueType
    from feast.infra.offline_stores.ibis import get_historical_features_ibis
    from feast.types import Array, Float32, Int64

    rng = np.random.default_rng(0)
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "feature_store.yaml").write_text(
        "project: asof\nprovider: local\nregistry: data/registry.db\n"
        "online_store: {type: sqlite, path: data/online.db}\n"
        f"offline_store: {{type: {duckdb_store.TYPE}}}\nentity_key_serialization_version: 3\n"
    )
    day = pd.Timestamp("2024-01-01", tz="UTC")
    n = 400
    rows = pd.DataFrame(
        {
            "item_id": rng.integers(0, 40, n),
            "event_timestamp": day + pd.to_timedelta(rng.integers(0, 20, n), unit="D"),
            "created": day + pd.to_timedelta(rng.permutation(n), unit="s"),
            "score": rng.standard_normal(n).astype(np.float32),
            "ids": [rng.integers(0, 9, rng.integers(0, 4)) for _ in range(n)],
        }
    )
    # item 50: one row, read exactly ttl (3 days) after it and one second later: Feast's
    # bound is inclusive (the first finds the row, the second nothing)
    only = {"item_id": [50], "event_timestamp": [day + pd.Timedelta(days=5)],
            "created": [day], "score": [np.float32(0.5)], "ids": [np.array([1, 2])]}  # fmt: skip
    pd.concat([rows, pd.DataFrame(only)], ignore_index=True).to_parquet(repo / "data" / "f.parquet")
    monkeypatch.chdir(tmp_path)
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64)
    src = FileSource(name="f", path="data/f.parquet", timestamp_field="event_timestamp",
                     created_timestamp_column="created")  # fmt: skip
    schema = [Field(name="score", dtype=Float32), Field(name="ids", dtype=Array(Int64))]
    views = [
        FeatureView(name="plain", entities=[item], schema=schema, source=src, ttl=None),
        FeatureView(name="fresh", entities=[item], schema=schema, source=src,
                    ttl=pd.Timedelta(days=3).to_pytimedelta()),
    ]  # fmt: skip
    store = FeatureStore(repo_path=str(repo))
    store.apply([item, *views])
    m = 300
    entity_df = pd.DataFrame(
        {
            "item_id": rng.integers(0, 45, m),  # 40..44: unknown
            "event_timestamp": day + pd.to_timedelta(rng.integers(-2 * 24, 24 * 24, m), unit="h"),
        }
    )
    at_ttl = day + pd.Timedelta(days=8)
    edge = pd.DataFrame(
        {"item_id": [50, 50], "event_timestamp": [at_ttl, at_ttl + pd.Timedelta(seconds=1)]}
    )
    entity_df = pd.concat([entity_df, entity_df.iloc[:20], edge], ignore_index=True)
    entity_df["row"] = np.arange(len(entity_df))
    refs = ["plain:score", "plain:ids", "fresh:score", "fresh:ids"]
    fast = store.get_historical_features(
        entity_df=entity_df.copy(), features=refs, full_feature_names=True
    ).to_df()
    slow = get_historical_features_ibis(
        config=store.config,
        feature_views=[store.get_feature_view(v.name) for v in views],
        feature_refs=refs,
        entity_df=entity_df.copy(),
        registry=store.registry,
        project=store.project,
        full_feature_names=True,
        data_source_reader=duckdb_store._read,
        data_source_writer=duckdb_store._write,
    ).to_df()
    assert len(fast) == len(slow) == len(entity_df)
    fast, slow = (f.set_index("row").sort_index() for f in (fast, slow))
    cols = ["plain__score", "plain__ids", "fresh__score", "fresh__ids"]
    assert fast["plain__score"].notna().sum() > fast["fresh__score"].notna().sum() > 0
    at, after = fast.loc[[len(fast) - 2, len(fast) - 1], "fresh__score"].tolist()
    assert at == 0.5 and pd.isna(after)
    for c in cols:
        for i, (a, b) in enumerate(zip(fast[c], slow[c])):
            if isinstance(b, float) and np.isnan(b) or b is None:
                assert a is None or (isinstance(a, float) and np.isnan(a)), (c, i, a, b)
            else:
                assert np.array_equal(np.asarray(a), np.asarray(b)), (c, i, a, b)
