"""Swing and U2I mining on a two-node local Ray cluster equal the single-process miners.

The cluster is ``ray_cluster`` (tests/integration/conftest.py: two nodes of 1 CPU, the one
Feast's Ray engine test joins in the same run). The log is built to trip every order the
Ray jobs must reproduce: rows out of time order, equal timestamps within a user (the log
order is the stable sort), repeated positives (Swing keeps the latest), users past
``max_user_items``, triggers past ``max_item_users`` (the seeded sample), int64 ids far from
0 and negative user ids. Pairs, scores and ties must be equal bit for bit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import ray  # a test dependency (pyproject [test]): CI runs this test, never skips it

from qarm_features.build.ray_pairs import (
    mine_pairs_by_config,
    mine_pairs_ray,
    swing_top_k_ray,
    u2i_events,
)
from qarm_features.config import PairsConfig
from qarm_features.errors import ConfigError, InputError
from qarm_features.pairs.mining import _positives, mine_pairs, mine_u2i_pairs
from qarm_features.pairs.swing import swing_top_k

pytestmark = [pytest.mark.slow]

PARTS = 3  # partitions per shuffle: more than the nodes, so each node holds several
SWING = {"alpha": 1.0, "top_k": 8, "max_user_items": 25, "user_weight": True, "seed": 5}
CAP = 12  # max_item_users: below the head items' user counts (asserted)


@pytest.fixture(scope="module")
def log() -> pd.DataFrame:
    from qarm_features.datasets.synthetic import SyntheticWorld

    world = SyntheticWorld(250, 160, seed=3)
    df = world.interactions(n_per_user=30)
    df = df.assign(
        item_id=df["item_id"] + 10**12,  # int64 ids far from 0
        user_id=df["user_id"] - 80,  # negative ids too
        timestamp=df["timestamp"] // 50_000,  # coarse: many equal timestamps per user
    )
    rng = np.random.default_rng(0)
    again = df.sample(600, random_state=1)  # repeated positives, later
    again = again.assign(timestamp=again["timestamp"] + rng.integers(0, 3, len(again)))
    df = pd.concat([df, again], ignore_index=True)
    return df.iloc[rng.permutation(len(df))].reset_index(drop=True)  # not in time order


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2, nodes
    return ray_cluster


@pytest.mark.parametrize("cap", [None, CAP])
def test_ray_swing_equals_one_process(cluster, log, cap):
    pos = _positives(log, 4.0)
    if cap is not None:  # the sample must bite, or the test could not fail on it
        assert pos.drop_duplicates(["user_id", "item_id"])["item_id"].value_counts().max() > cap
    want = swing_top_k(pos, max_item_users=cap, **_swing_args())
    got = swing_top_k_ray(log, max_item_users=cap, num_partitions=PARTS, **SWING)
    assert want[0].size > 500
    for name, w, g in zip(("trigger", "target", "score"), want, got):
        assert g.dtype == w.dtype and np.array_equal(g, w), f"Swing {name} differs (cap {cap})"


def _swing_args():
    return {k: SWING[k] for k in ("alpha", "top_k", "max_user_items", "user_weight", "seed")}


def test_ray_u2i_events_equal_one_process(cluster, log):
    from qarm_features.datasets.synthetic import SyntheticWorld

    world = SyntheticWorld(250, 160, seed=3)
    ids, emb = world.item_ids + 10**12, world.collab.astype(np.float32)
    want = mine_u2i_pairs(log, ids, emb, history=6)
    got = u2i_events(log, ids, emb, history=6, num_partitions=PARTS).to_pandas()
    got = got.iloc[np.lexsort((got["_seq"].to_numpy(), got["timestamp"].to_numpy()))]
    assert len(want) > 1000 and len(got) == len(want)
    for col in ("trigger_id", "target_id", "score"):
        g = got[col].to_numpy(want[col].dtype)
        assert np.array_equal(g, want[col].to_numpy()), f"U2I {col} differs"


def test_ray_mine_pairs_equals_one_process_from_parquet_by_config(cluster, log, tmp_path):
    """The whole miner (U2I with BPR fitted in one Ray task, Swing capped, union, stats),
    reading parquet files on the workers, chosen by PairsConfig.engine."""
    cfg = PairsConfig(
        history=6,
        mf_epochs=3,
        swing_top_k=8,
        swing_max_user_items=25,
        swing_max_item_users=CAP,
        seed=5,
    )
    want, want_stats = mine_pairs(log, cfg)
    src = tmp_path / "log"
    src.mkdir()
    for k, rows in enumerate(np.array_split(np.arange(len(log)), 3)):  # read in path order
        log.iloc[rows].to_parquet(src / f"part-{k}.parquet", row_group_size=1000)
    ray_cfg = cfg.model_copy(update={"engine": "ray", "ray_partitions": PARTS})
    got, got_stats = mine_pairs_by_config(src, ray_cfg)
    assert set(want["source"]) == {"u2i", "swing"}
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert got_stats == want_stats
    with pytest.raises(ConfigError, match="ray_pairs"):  # the single-process miner says where
        mine_pairs(log, ray_cfg)


def test_ray_bad_rows_name_the_file_and_column(cluster, log, tmp_path):
    bad = log.head(50).astype({"rating": float})
    bad.loc[7, "rating"] = np.nan
    path = tmp_path / "bad.parquet"
    bad.to_parquet(path)
    with pytest.raises(InputError, match=r"bad\.parquet row group 0 .*rating"):
        mine_pairs_ray(path, PairsConfig(use_u2i=False, ray_partitions=PARTS))
