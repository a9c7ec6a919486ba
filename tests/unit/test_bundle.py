"""Bundle round trip, atomic writes, and refusal of tampered or inconsistent bundles."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from qarm_features.bundle.artifact import load_bundle, write_bundle
from qarm_features.bundle.testing import make_random_bundle
from qarm_features.errors import BundleError


@pytest.fixture
def bundle_copy(random_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(random_bundle, dst)
    return dst


def test_round_trip_and_content_addressed_version(random_bundle, tmp_path):
    b = load_bundle(random_bundle)
    assert b.version.startswith("qarm-") and len(b.version) == 17
    assert b.raw_dim == 32 and b.aligned_dim == 16 and b.n_levels == 3 and b.vq_k == 5
    assert b.rq_codebooks.shape == (3, 16, 16) and b.rq_codebooks.dtype == np.float32
    assert b.item_ids.dtype == np.int64 and b.raw_emb.shape == (200, 32)
    with pytest.raises(ValueError):  # arrays are read-only
        b.raw_emb[0, 0] = 1.0
    # same inputs -> same bytes -> same version; another seed -> another version
    again = load_bundle(make_random_bundle(tmp_path / "again"))
    other = load_bundle(make_random_bundle(tmp_path / "other", seed=1))
    assert again.version == b.version
    assert other.version != b.version


def test_pickled_npy_is_refused_even_when_everything_else_checks_out(bundle_copy):
    """A pickle is refused for being a pickle: the planted file is the real ``item_ids``,
    pickled under an object-dtype header (unpickling yields the original int64 array),
    with its sha256, size and the version id resealed; only ``allow_pickle=False`` in the
    loader stands between it and a successful load."""
    import hashlib
    import pickle

    p = bundle_copy / "item_ids.npy"
    ids = np.load(p)
    with open(p, "wb") as fh:  # what np.save(..., allow_pickle=True) writes for dtype=object
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "|O", "fortran_order": False, "shape": ids.shape}
        )
        pickle.dump(ids, fh, protocol=3)
    planted = np.load(p, allow_pickle=True)  # the payload is harmless and well-formed
    assert planted.dtype == np.int64 and np.array_equal(planted, ids)
    m = json.loads((bundle_copy / "manifest.json").read_text())
    meta = m["files"]["item_ids.npy"]
    assert (meta["dtype"], meta["shape"]) == ("int64", list(ids.shape))  # still true
    meta["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    meta["bytes"] = p.stat().st_size
    version = hashlib.sha256()  # the content-addressed id: every (name, sha256), sorted
    for name in sorted(m["files"]):
        version.update(name.encode() + m["files"][name]["sha256"].encode())
    m["version"] = "qarm-" + version.hexdigest()[:12]
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"cannot read item_ids\.npy .*allow_pickle"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("fname", ["rq_codebooks.npy", "aligner.safetensors", "raw_emb.npy"])
def test_tampered_file_is_refused(bundle_copy, fname):
    p = bundle_copy / fname
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF  # same size, different bytes
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(bundle_copy)


def test_truncated_file_is_refused(bundle_copy):
    p = bundle_copy / "vq_pool_emb.npy"
    p.write_bytes(p.read_bytes()[:-16])
    with pytest.raises(BundleError, match="truncated"):
        load_bundle(bundle_copy)


def test_missing_file_and_missing_manifest(bundle_copy):
    (bundle_copy / "item_ids.npy").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(bundle_copy)
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="not a qarm bundle"):
        load_bundle(bundle_copy)


def test_edited_manifest_is_refused(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["dims"]["n_levels"] = 4
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="disagree"):
        load_bundle(bundle_copy)
    m["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format 99"):
        load_bundle(bundle_copy)
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)


def test_replaced_file_with_updated_hash_changes_version(bundle_copy):
    """Re-hashing a swapped file is not enough: the version id covers every hash."""
    import hashlib

    p = bundle_copy / "raw_emb.npy"
    arr = np.load(p)
    arr[0, 0] += 1.0
    np.save(p, arr)
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["files"]["raw_emb.npy"]["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest was edited"):
        load_bundle(bundle_copy)


def test_not_a_directory(tmp_path):
    with pytest.raises(BundleError, match="not a directory"):
        load_bundle(tmp_path / "nope")


def test_write_refuses_inconsistent_arrays_and_leaves_nothing(random_bundle, tmp_path):
    b = load_bundle(random_bundle)
    kw = dict(
        config=b.config,
        aligner_weights=dict(b.aligner_weights),
        rq_codebooks=b.rq_codebooks,
        vq_pool_emb=b.vq_pool_emb,
        vq_pool_ids=b.vq_pool_ids,
        item_ids=b.item_ids,
        raw_emb=b.raw_emb,
        vq_k=b.vq_k,
    )
    bad = dict(kw, rq_codebooks=b.rq_codebooks[:, :, :8])
    with pytest.raises(BundleError, match="rq_codebooks"):
        write_bundle(tmp_path / "bad", **bad)
    bad = dict(kw, vq_pool_ids=np.zeros_like(b.vq_pool_ids))
    with pytest.raises(BundleError, match="duplicate"):
        write_bundle(tmp_path / "bad", **bad)
    assert not any(tmp_path.iterdir()), "a failed write must leave no directory behind"
    # overwrite=False protects an existing bundle
    write_bundle(tmp_path / "good", **kw)
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(tmp_path / "good", **kw)
    write_bundle(tmp_path / "good", **kw, overwrite=True)
    assert load_bundle(tmp_path / "good").version == b.version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]


@pytest.mark.parametrize(
    ("kw", "space", "vocab"),
    [
        ({"first_item_id": 1}, "item_id", 201),  # ids 1..200: table rows 0..200
        ({"first_item_id": 1000}, "item_id", 1200),  # the id space, gaps included
        ({"first_item_id": 1000, "string_ids": True}, "catalog_row", 200),  # SKU-1000..1199
    ],
)
def test_vq_codes_live_in_the_vocabulary_the_bundle_states(tmp_path, kw, space, vocab):
    """A ranker sizes its VQ embedding table from the bundle: every code is in
    0 .. vq_vocab_size - 1, item ids for int catalogs, catalog rows for string ones."""
    from qarm_features.bundle.encode import encode_items
    from qarm_features.bundle.testing import make_random_bundle

    b = load_bundle(make_random_bundle(tmp_path / "b", **kw))
    assert b.vq_code_space == space and b.vq_vocab_size == vocab
    codes = encode_items(b, b.raw_emb, b.item_ids).vq_codes
    assert codes.min() >= 0 and codes.max() < vocab and codes.max() >= vocab - 10
    assert set(np.unique(codes)) <= set(b.vq_pool_ids.tolist())
    if space == "catalog_row":
        assert str(b.keys_of(codes[:1, :1])[0, 0]).startswith("SKU-1")
    else:
        assert set(np.unique(codes)) <= set(range(kw["first_item_id"], vocab))
