"""Which views `qarm materialize` writes itself (record batches, the local engine) and
which go through Feast's materialization: a repo on another compute engine (Ray) must
never take the local streamed path (its writes belong to the engine's workers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qarm_features.feast.online_write import ONE_ROW_PER_ITEM, local_engine, streamable
from qarm_features.feast.store import open_store

ROOT = Path(__file__).resolve().parents[2]
VIEWS = ["qarm", "item_content", "qarm_prev", "user_history", "qarm_batch"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The demo repo's configs (local and Ray engines), without data."""
    dest = tmp_path_factory.mktemp("engines")
    for name in ("feature_store.yaml", "feature_store.ray.yaml"):
        shutil.copy(ROOT / "feature_repo" / name, dest / name)
    return dest


def test_the_local_engine_streams_the_one_row_per_item_views(repo):
    store = open_store(repo)
    assert local_engine(store)
    assert streamable(store, VIEWS) == list(ONE_ROW_PER_ITEM)


def test_a_ray_engine_repo_streams_nothing(repo):
    store = open_store(repo, "feature_store.ray.yaml")
    assert not local_engine(store)
    assert streamable(store, VIEWS) == []
