"""A large VQ pool's trained ANN index travels in the bundle (``vq_index.npy``): a loaded
bundle searches the stored index instead of training and filling one again, codes stay
bit for bit those of the in-memory coder, tampering is refused, and bundles written
before (no index file) still load and rebuild it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from qarm_features.bundle.artifact import INDEX_FILE, load_bundle, write_bundle
from qarm_features.bundle.encode import align_with_weights, encode_items, encode_rows
from qarm_features.codes.rq import ResidualQuantizer
from qarm_features.codes.vq import VQCoder
from qarm_features.config import BuildConfig, VQConfig
from qarm_features.errors import BundleError

N, RAW, OUT, K = 3000, 24, 16, 5
VQ = VQConfig(k=K, exact_max_pool=500, ann_index="IVF32,Flat", seed=0)


@pytest.fixture(scope="module")
def parts():
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((N, RAW)).astype(np.float32)
    ids = np.arange(10, 10 + N, dtype=np.int64)
    weights = {"proj.weight": (rng.standard_normal((OUT, RAW)) / np.sqrt(RAW)).astype(np.float32)}
    aligned = align_with_weights(weights, raw)
    rq = ResidualQuantizer(n_levels=2, n_codes=8, n_iter=5, seed=0).fit(aligned)
    coder = VQCoder(k=K, exact_max_pool=VQ.exact_max_pool, ann_index=VQ.ann_index).fit(aligned, ids)
    kw = {
        "config": BuildConfig(vq=VQ),
        "aligner_weights": weights,
        "rq_codebooks": rq.codebooks_,
        "vq_pool_emb": aligned,
        "vq_pool_ids": ids,
        "item_ids": ids,
        "raw_emb": raw,
        "vq_k": K,
    }
    return raw, ids, aligned, coder, kw


@pytest.fixture(scope="module")
def bundles(parts, tmp_path_factory):
    _raw, _ids, _aligned, coder, kw = parts
    root = tmp_path_factory.mktemp("indexed")
    with_index = write_bundle(root / "with", vq_index=coder.export_index(), **kw)
    without = write_bundle(root / "without", **kw)  # what bundles written before look like
    return with_index, without


def test_stored_index_is_loaded_not_rebuilt_and_codes_are_bit_identical(
    parts, bundles, monkeypatch
):
    raw, ids, aligned, coder, _ = parts
    assert coder.mode_ == "ann"
    bundle = load_bundle(bundles[0])
    assert INDEX_FILE in bundle.manifest.files and bundle.vq_index.dtype == np.uint8

    def no_build(*_a, **_k):
        raise AssertionError("the stored index must be loaded, not trained again")

    monkeypatch.setattr(VQCoder, "_build_index", no_build)
    want = coder.encode(aligned, exclude_ids=ids)
    batch = encode_items(bundle, raw, ids)
    np.testing.assert_array_equal(batch.vq_codes, want)
    assert bundle.vq.mode_ == "ann" and bundle.vq.ann_recall_ is None
    # request path (row by row, tolerant) == batch path
    rows = [5, 17, 2999, 0]
    enc, errors = encode_rows(bundle, [raw[i] for i in rows], ids[rows])
    assert errors == [None] * len(rows)
    np.testing.assert_array_equal(enc.vq_codes, batch.vq_codes[rows])
    np.testing.assert_array_equal(enc.rq_codes, batch.rq_codes[rows])


def test_old_bundle_without_index_loads_and_rebuilds_the_same_codes(parts, bundles):
    raw, ids, _aligned, _coder, _ = parts
    old, new = load_bundle(bundles[1]), load_bundle(bundles[0])
    assert old.vq_index is None and INDEX_FILE not in old.manifest.files
    assert old.vq.ann_recall_ is not None  # rebuilt (and measured) as before
    np.testing.assert_array_equal(
        encode_items(old, raw, ids).vq_codes, encode_items(new, raw, ids).vq_codes
    )
    assert old.version != new.version  # the version id covers the index file


def test_tampered_index_is_refused(bundles, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundles[0], dst)
    blob = bytearray((dst / INDEX_FILE).read_bytes())
    blob[-100] ^= 0xFF  # same size, other bytes
    (dst / INDEX_FILE).write_bytes(bytes(blob))
    with pytest.raises(BundleError, match=f"{INDEX_FILE} fails its sha256"):
        load_bundle(dst)
    # re-hashing the file in the manifest does not help: the version id covers it
    from qarm_features.bundle.manifest import sha256_file

    m = json.loads((dst / "manifest.json").read_text())
    m["files"][INDEX_FILE]["sha256"] = sha256_file(dst / INDEX_FILE)
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest was edited"):
        load_bundle(dst)


def test_dropping_the_index_from_the_manifest_is_refused(bundles, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundles[0], dst)
    m = json.loads((dst / "manifest.json").read_text())
    del m["files"][INDEX_FILE]
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest was edited"):
        load_bundle(dst)


def test_an_index_of_another_pool_is_refused(parts, tmp_path):
    _raw, ids, aligned, coder, kw = parts
    other = VQCoder(k=K, exact_max_pool=100, ann_index=VQ.ann_index).fit(aligned[:2000], ids[:2000])
    with pytest.raises(BundleError, match="vq_index rejected .*of 2000 x 16.*of 3000 x 16"):
        write_bundle(tmp_path / "x", vq_index=other.export_index(), **kw)
    with pytest.raises(BundleError, match="vq_index rejected .index: not a serialized faiss index"):
        write_bundle(tmp_path / "y", vq_index=np.zeros(64, np.uint8), **kw)
    small = dict(kw, config=BuildConfig(vq=VQ.model_copy(update={"exact_max_pool": 10_000})))
    with pytest.raises(BundleError, match="searched exactly"):
        write_bundle(tmp_path / "z", vq_index=coder.export_index(), **small)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_build_stores_the_index_of_its_ann_pool(tmp_path):
    """`build_bundle` writes the index its pipeline trained; the loaded bundle searches it."""
    from qarm_features.build.bundles import build_bundle
    from qarm_features.config import AlignerConfig, PairsConfig, RQConfig
    from qarm_features.datasets.synthetic import SyntheticWorld

    world = SyntheticWorld(n_items=300, n_users=300, content_dim=16, seed=0)
    cfg = BuildConfig(
        dataset="synthetic",
        pairs=PairsConfig(mf_epochs=2, mf_dim=8),
        aligner=AlignerConfig(out_dim=8, batch_size=64, max_epochs=2),
        rq=RQConfig(n_levels=2, n_codes=8),
        vq=VQConfig(k=4, exact_max_pool=100, ann_index="IVF8,Flat"),
    )
    res = build_bundle(tmp_path / "b", item_ids=world.item_ids, raw_emb=world.content,
                       interactions=world.interactions(n_per_user=20), config=cfg)  # fmt: skip
    bundle = load_bundle(res.path)
    assert INDEX_FILE in bundle.manifest.files
    rebuilt = VQCoder(k=4, exact_max_pool=100, ann_index="IVF8,Flat").fit(
        bundle.vq_pool_emb, bundle.vq_pool_ids
    )
    x = align_with_weights(bundle.aligner_weights, bundle.raw_emb)
    np.testing.assert_array_equal(
        encode_items(bundle, bundle.raw_emb, bundle.item_ids).vq_codes,
        rebuilt.encode(x, exclude_ids=bundle.item_ids),
    )


def test_a_stored_index_of_another_pool_is_refused_at_load(parts, bundles, tmp_path):
    """verify=False skips hashes, not the check that the stored index is this pool's."""
    from qarm_features.bundle.manifest import sha256_file

    _, ids, aligned, _, _ = parts
    other = VQCoder(k=K, exact_max_pool=100, ann_index=VQ.ann_index).fit(aligned[:2000], ids[:2000])
    dst = tmp_path / "b"
    shutil.copytree(bundles[0], dst)
    np.save(dst / INDEX_FILE, other.export_index(), allow_pickle=False)
    m = json.loads((dst / "manifest.json").read_text())
    m["files"][INDEX_FILE].update(
        sha256=sha256_file(dst / INDEX_FILE),
        bytes=(dst / INDEX_FILE).stat().st_size,
        shape=[int(other.export_index().size)],
    )
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest was edited"):
        load_bundle(dst)
    # a version id forged to match is still not this pool's index
    from qarm_features.bundle.manifest import version_id

    m["version"] = version_id(m["files"], m["config"], m["dims"])
    (dst / "manifest.json").write_text(json.dumps(m))
    bundle = load_bundle(dst)
    with pytest.raises(BundleError, match=f"{INDEX_FILE} rejected .*of 2000 x 16"):
        bundle.warm()
