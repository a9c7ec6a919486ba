"""The feature repo on Feast's Ray offline store and Ray compute engine (feature_store.ray.yaml).

A local Ray cluster of two nodes (``ray_cluster``, tests/integration/conftest.py: the one
the Ray pair miners' test joins in the same run) runs ``materialize`` of every view, the
``qarm_batch`` UDF included, and ``get_historical_features``. The online rows must be bit
for bit those of the same bundle materialized by the default local engine, every row
present: Feast 0.67's Ray engine swallows a worker's errors (a worker that cannot import
``transformations`` writes nothing and the run "succeeds"), so a missing row is a failure
here, never a skip.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.integration.helpers import (
    NOT_FOUND,
    PRESENT,
    ROOT,
    assert_row_equal,
    catalog_expectations,
    check_history_point_in_time,
    online,
    qarm_names,
    refs,
    row,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*experimental.*:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

NAMES = qarm_names(3)
RAY_YAML = "feature_store.ray.yaml"
UNKNOWN = 123_456


@pytest.fixture(scope="module")
def local_store(make_repo, bundle_path, interactions):
    """The reference: the same bundle materialized by the default config (local engine)."""
    from qarm_features.feast.job import materialize
    from qarm_features.feast.store import open_store

    repo = make_repo("local")
    materialize(bundle_path, repo, interactions_df=interactions)
    return open_store(repo)


@pytest.fixture(scope="module")
def ray_store(ray_cluster, make_repo, bundle_path, interactions):
    from qarm_features.feast.job import materialize
    from qarm_features.feast.store import open_store

    repo = make_repo("ray")
    stats = materialize(bundle_path, repo, interactions_df=interactions, fs_yaml_file=RAY_YAML)
    assert "qarm_batch" in stats["materialized_views"]
    store = open_store(repo, RAY_YAML)
    assert type(store.config.batch_engine).__name__ == "RayComputeEngineConfig"
    assert store.config.offline_store.type == "ray"
    return store


def _read(store, view: str, names: list[str], key: str, ids: list[int]):
    return online(store, refs(view, names), [{key: i} for i in ids])


@pytest.mark.parametrize("view", ["qarm", "qarm_batch"])
def test_ray_online_codes_equal_the_local_engine(ray_store, local_store, bundle_path, view):
    expected = catalog_expectations(bundle_path)
    ids = sorted(expected) + [UNKNOWN]
    got, got_status = _read(ray_store, view, NAMES, "item_id", ids)
    want, _ = _read(local_store, view, NAMES, "item_id", ids)
    for name in NAMES:
        missing = [i for i, s in zip(ids[:-1], got_status[name][:-1]) if s != PRESENT]
        assert not missing, (
            f"{view}:{name}: the Ray engine wrote no row for {len(missing)} of {len(ids) - 1} "
            f"items (first: {missing[:5]}); its workers swallow errors: can they import "
            "transformations and qarm_features?"
        )
        assert got_status[name][-1] == NOT_FOUND
        assert got[name] == want[name], f"{view}:{name}: Ray and local engines differ"
    for i, item in enumerate(ids[:-1]):
        assert_row_equal(row(got, i, NAMES), expected[item], NAMES, f"ray {view} {item}")


def test_ray_online_content_and_history_equal_the_local_engine(
    ray_store, local_store, interactions
):
    items = sorted(interactions["item_id"].unique().tolist())
    got, status = _read(ray_store, "item_content", ["raw_emb"], "item_id", items)
    want, _ = _read(local_store, "item_content", ["raw_emb"], "item_id", items)
    assert set(status["raw_emb"]) == {PRESENT} and got["raw_emb"] == want["raw_emb"]

    users = sorted(interactions["user_id"].unique().tolist())
    names = ["hist_item_ids", "hist_rq_code_l1"]
    got, status = _read(ray_store, "user_history", names, "user_id", users)
    want, want_status = _read(local_store, "user_history", names, "user_id", users)
    assert status == want_status and PRESENT in status["hist_item_ids"]
    for name in names:
        assert got[name] == want[name], f"user_history:{name}: Ray and local engines differ"


def test_ray_offline_store_returns_every_entity_row(ray_store, bundle_path, interactions):
    expected = catalog_expectations(bundle_path)
    ids = sorted(expected)
    # every item at an old and a future time, plus an unknown item: one output row each
    times = pd.to_datetime(["1995-01-01", "2030-01-01"], utc=True)
    entity_df = pd.DataFrame(
        [(i, t) for t in times for i in [*ids, UNKNOWN]], columns=["item_id", "event_timestamp"]
    )
    hist = ray_store.get_historical_features(
        entity_df=entity_df, features=refs("qarm", NAMES)
    ).to_df()
    assert len(hist) == len(entity_df), f"{len(hist)} rows for {len(entity_df)} entity rows"
    pairs = set(zip(hist["item_id"], pd.to_datetime(hist["event_timestamp"], utc=True)))
    assert pairs == set(zip(entity_df["item_id"], entity_df["event_timestamp"]))
    for rec in hist.to_dict("records"):
        if rec["item_id"] == UNKNOWN:
            assert pd.isna(rec["rq_code_l1"])
            continue
        want = expected[rec["item_id"]]
        assert rec["qarm_version"] == want["qarm_version"]
        assert [int(rec[f"rq_code_l{i}"]) for i in (1, 2, 3)] == [
            want[f"rq_code_l{i}"] for i in (1, 2, 3)
        ]
        assert [int(x) for x in rec["vq_codes"]] == want["vq_codes"]
        got = np.asarray(rec["aligned_emb"], np.float32)
        assert np.array_equal(got.view(np.uint32), want["aligned_emb"].view(np.uint32))

    # user history, point in time: a row at an event's own time sees only earlier positives
    check_history_point_in_time(ray_store, interactions)


def test_check_workers_turns_the_silent_drop_into_an_error(ray_store):
    from qarm_features.build.distributed import check_workers
    from qarm_features.errors import DependencyError

    found = check_workers()
    assert found and all(
        mods["transformations.batch"].startswith(str(ROOT)) for mods in found.values()
    ), found
    with pytest.raises(DependencyError, match=r"cannot import .*no_such_module_here"):
        check_workers(("qarm_features", "no_such_module_here"))
