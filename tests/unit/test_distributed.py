"""distributed: the Ray Data batch transformation gives bit for bit the single-process rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import ray  # a test dependency (pyproject [test]): CI runs this test, never skips it


def test_ray_map_batches_codes_equal_the_single_process_path(random_bundle, tmp_path):
    from qarm_features.distributed import encode_parquet
    from qarm_features.encode import encode_frame, get_bundle

    bundle = get_bundle(random_bundle)
    rng = np.random.default_rng(0)
    n = 700  # 150 catalog items and new (cold) ids, several batches per worker
    ids = np.r_[bundle.item_ids[:150], np.arange(10**6, 10**6 + n - 150)].astype(np.int64)
    raw = rng.standard_normal((n, bundle.raw_dim)).astype(np.float32)
    src = tmp_path / "catalog"
    src.mkdir()
    for part in range(3):  # several input files
        rows = slice(part * n // 3, (part + 1) * n // 3)
        pd.DataFrame({"item_id": ids[rows], "raw_emb": list(raw[rows])}).to_parquet(
            src / f"part-{part}.parquet"
        )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        encode_parquet(random_bundle, src, tmp_path / "out", batch_rows=64, num_blocks=4)
    finally:
        ray.shutdown()
    got = pd.read_parquet(tmp_path / "out").sort_values("item_id").reset_index(drop=True)
    frame = pd.DataFrame({"item_id": ids, "raw_emb": list(raw)})
    want = encode_frame(bundle, frame).sort_values("item_id").reset_index(drop=True)
    assert list(got.columns) == list(want.columns) and len(got) == n
    for col in want.columns:
        if want[col].dtype == object and not isinstance(want[col].iloc[0], str):
            np.testing.assert_array_equal(np.stack(got[col]), np.stack(want[col]), err_msg=col)
        else:
            np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)
