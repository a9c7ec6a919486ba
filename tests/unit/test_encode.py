"""encode: batch and request-time paths agree bit for bit; bad rows fail alone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qarm_features.bundle.artifact import load_bundle
from qarm_features.bundle.encode import encode_frame, encode_items, encode_rows, get_bundle
from qarm_features.errors import InputError


@pytest.fixture(scope="module")
def bundle(random_bundle):
    return load_bundle(random_bundle)


def test_shapes_dtypes_and_self_exclusion(bundle):
    enc = encode_items(bundle, bundle.raw_emb, bundle.item_ids)
    n = len(bundle.item_ids)
    assert enc.aligned.shape == (n, 16) and enc.aligned.dtype == np.float32
    assert enc.rq_codes.shape == (n, 3) and enc.rq_codes.dtype == np.int64
    assert enc.vq_codes.shape == (n, 5) and enc.vq_codes.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(enc.aligned, axis=1), 1.0, rtol=1e-5)
    assert (enc.rq_codes >= 0).all() and (enc.rq_codes < 16).all()
    assert not (enc.vq_codes == bundle.item_ids[:, None]).any(), "item is its own VQ code"
    assert np.isin(enc.vq_codes, bundle.vq_pool_ids).all()
    # without ids (cold path) an item in the pool finds itself first
    cold = encode_items(bundle, bundle.raw_emb[:10])
    np.testing.assert_array_equal(cold.vq_codes[:, 0], bundle.item_ids[:10])
    assert enc.version == bundle.version


def test_one_row_equals_batch_bit_for_bit(bundle):
    """The on-demand (1 row) path must store exactly what the batch path stores."""
    rng = np.random.default_rng(7)
    raw = np.concatenate([bundle.raw_emb, rng.standard_normal((300, 32)).astype(np.float32)])
    ids = np.concatenate([bundle.item_ids, np.full(300, -1)])
    batch = encode_items(bundle, raw, ids)
    for chunk in (1, 7, 64):
        again = encode_items(bundle, raw, ids, chunk_size=chunk)
        assert again.aligned.tobytes() == batch.aligned.tobytes()
        np.testing.assert_array_equal(again.rq_codes, batch.rq_codes)
        np.testing.assert_array_equal(again.vq_codes, batch.vq_codes)
    for i in range(0, len(raw), 11):
        one = encode_items(bundle, raw[i : i + 1], ids[i : i + 1])
        assert one.aligned.tobytes() == batch.aligned[i : i + 1].tobytes()
        np.testing.assert_array_equal(one.rq_codes[0], batch.rq_codes[i])
        np.testing.assert_array_equal(one.vq_codes[0], batch.vq_codes[i])


def test_encode_rows_isolates_bad_rows(bundle):
    good = bundle.raw_emb[:3]
    rows = [good[0], [1.0] * 5, None, [float("nan")] * 32, good[1], "text", good[2]]
    enc, errors = encode_rows(bundle, rows)
    assert errors[0] is None and errors[4] is None and errors[6] is None
    assert "expects 32" in errors[1]
    assert "missing" in errors[2]
    assert "NaN" in errors[3]
    assert errors[5] is not None
    ref = encode_items(bundle, good)
    np.testing.assert_array_equal(enc.rq_codes[[0, 4, 6]], ref.rq_codes)
    assert enc.aligned[[0, 4, 6]].tobytes() == ref.aligned.tobytes()
    assert (enc.rq_codes[[1, 2, 3, 5]] == -1).all()


@pytest.mark.parametrize(
    "raw, match",
    [
        (np.zeros((2, 31), np.float32), "expected width 32"),
        (np.full((2, 32), np.nan, np.float32), "NaN"),
        (np.zeros((0, 32), np.float32), "empty"),
        (np.zeros(32, np.float32), "2-d"),
    ],
)
def test_bad_batch_input_is_refused(bundle, raw, match):
    with pytest.raises(InputError, match=match):
        encode_items(bundle, raw)


def test_encode_frame_schema(bundle):
    df = pd.DataFrame({"item_id": bundle.item_ids[:4], "raw_emb": list(bundle.raw_emb[:4])})
    out = encode_frame(bundle, df)
    assert list(out.columns) == [
        "item_id", "aligned_emb", "rq_code_l1", "rq_code_l2", "rq_code_l3", "vq_codes",
        "qarm_version",
    ]
    assert out["rq_code_l1"].dtype == np.int64
    assert (out["qarm_version"] == bundle.version).all()
    with pytest.raises(InputError, match="missing column"):
        encode_frame(bundle, df.drop(columns=["raw_emb"]))
    ragged = df.copy()
    ragged.at[1, "raw_emb"] = [0.0] * 3
    with pytest.raises(InputError, match="raw_emb"):
        encode_frame(bundle, ragged)


def test_get_bundle_caches_per_process(random_bundle, monkeypatch):
    a = get_bundle(random_bundle)
    b = get_bundle(str(random_bundle))
    assert a is b
    # the bundle is named by its caller (a serving context), never by the environment
    monkeypatch.setenv("QARM_BUNDLE", "/nonexistent")
    assert get_bundle(random_bundle) is a
    with pytest.raises(TypeError):
        get_bundle()
