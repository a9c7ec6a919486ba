"""distributed: the Ray Data encodes on a local 2-CPU cluster against the single-process path.

The batch transformation gives bit for bit the single-process rows; the catalog encoding
gives the single-process TextEncoder's embeddings within TEXT_ATOL (batch composition).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import ray  # a test dependency (pyproject [test]): CI runs this test, never skips it


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for this module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_map_batches_codes_equal_the_single_process_path(ray_cluster, random_bundle, tmp_path):
    from qarm_features.build.distributed import encode_parquet
    from qarm_features.bundle.encode import encode_frame, get_bundle

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
    encode_parquet(random_bundle, src, tmp_path / "out", batch_rows=64, num_blocks=4)
    got = pd.read_parquet(tmp_path / "out").sort_values("item_id").reset_index(drop=True)
    frame = pd.DataFrame({"item_id": ids, "raw_emb": list(raw)})
    want = encode_frame(bundle, frame).sort_values("item_id").reset_index(drop=True)
    assert list(got.columns) == list(want.columns) and len(got) == n
    for col in want.columns:
        if want[col].dtype == object and not isinstance(want[col].iloc[0], str):
            np.testing.assert_array_equal(np.stack(got[col]), np.stack(want[col]), err_msg=col)
        else:
            np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)


def _catalog_texts(n: int) -> list[str]:
    """Titles of very different lengths (padding differs from batch to batch)."""
    rng = np.random.default_rng(1)
    words = ["the", "of", "love", "war", "space", "night", "city", "story", "man", "woman",
             "comedy", "drama", "action", "horror"]  # fmt: skip
    return [
        " ".join(rng.choice(words, int(rng.integers(1, 40)))) + f" ({1950 + i % 70})"
        for i in range(n)
    ]


def test_ray_catalog_encoding_equals_the_text_encoder(ray_cluster, tmp_path):
    from qarm_features.build.distributed import TEXT_ATOL, encode_text_parquet
    from qarm_features.content.encoders import TextEncoder

    n = 300
    texts = _catalog_texts(n)
    src = tmp_path / "catalog"
    src.mkdir()
    for part in range(3):
        rows = slice(part * n // 3, (part + 1) * n // 3)
        pd.DataFrame(
            {"item_id": np.arange(n, dtype=np.int64)[rows], "title": texts[rows], "year": 1990}
        ).to_parquet(src / f"part-{part}.parquet")
    # Ray: batches of 64 texts in 4 blocks, forward passes of 16; reference: one process,
    # every text in one call (sorted by length, forward passes of 128)
    encode_text_parquet(src, tmp_path / "out", text_column="title", batch_rows=64,
                        encoder_batch_size=16, num_blocks=4)  # fmt: skip
    got = pd.read_parquet(tmp_path / "out").sort_values("item_id").reset_index(drop=True)
    want = TextEncoder().encode(texts)
    assert got["item_id"].tolist() == list(range(n)) and got["title"].tolist() == texts
    assert (got["year"] == 1990).all()
    emb = np.stack(got["raw_emb"])
    assert emb.dtype == np.float32 and emb.shape == want.shape
    diff = np.abs(emb - want).max()
    assert diff <= TEXT_ATOL, f"Ray vs single process: max |diff| {diff:.2e} > {TEXT_ATOL}"


def test_ray_catalog_encoding_names_the_bad_row(ray_cluster, tmp_path):
    from qarm_features.build.distributed import encode_text_parquet

    pd.DataFrame({"item_id": [7, 8, 9], "text": ["a film", None, "another"]}).to_parquet(
        tmp_path / "catalog.parquet"
    )
    with pytest.raises(Exception, match=r"column 'text' at item_id=8: expected str"):
        encode_text_parquet(tmp_path / "catalog.parquet", tmp_path / "out")
    with pytest.raises(Exception, match=r"column 'title' not in the catalog"):
        encode_text_parquet(tmp_path / "catalog.parquet", tmp_path / "out2", text_column="title")
