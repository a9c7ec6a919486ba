"""The bundle's one manifest parser: everything that decides a code is in the version id,
and any manifest that fails its schema is a BundleError (never a TypeError)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from qarm_features.bundle.artifact import load_bundle
from qarm_features.bundle.encode import encode_items
from qarm_features.bundle.manifest import read_manifest
from qarm_features.errors import BundleError


@pytest.fixture
def copy(random_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(random_bundle, dst)
    return dst


def _edit(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m["config"]["vq"].update(exact_max_pool=10, ann_index="HNSW4", ann_ef_search=1),
        lambda m: m["config"]["rq"].update(n_iter=3),
        lambda m: m["config"].update(seed=5),
        lambda m: m["dims"].update(vq_k=3),
    ],
    ids=["vq-search", "rq-config", "seed", "vq_k"],
)
def test_edits_that_change_codes_change_nothing_silently(copy, mutate):
    """Format 1 kept the version id when config.vq or dims.vq_k were edited: every VQ code
    then changed under the same id."""
    _edit(copy, mutate)
    with pytest.raises(BundleError, match="manifest was edited"):
        load_bundle(copy)


def test_metrics_are_not_part_of_the_version(random_bundle, copy):
    _edit(copy, lambda m: m["metrics"].update(note="annotated later"))
    assert load_bundle(copy).version == load_bundle(random_bundle).version


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda m: m.update(files=[]), "files"),
        (lambda m: m.update(dims="3"), "dims"),
        (lambda m: m.update(config=[]), "config"),
        (lambda m: m["config"].update(unknown_key=1), "config.unknown_key"),
        (lambda m: m["config"]["vq"].update(k="many"), "config.vq.k"),
        (lambda m: m["dims"].update(n_levels=3.5), "dims.n_levels"),
        (lambda m: m["files"]["raw_emb.npy"].update(bytes="12"), "files.raw_emb.npy.bytes"),
        (lambda m: m["files"]["raw_emb.npy"].pop("sha256"), "files.raw_emb.npy.sha256"),
        (lambda m: m.update(metrics=None), "metrics"),
        (lambda m: m.update(version=None), "version"),
    ],
)
def test_schema_failures_are_bundle_errors_naming_the_field(copy, mutate, where):
    _edit(copy, mutate)
    with pytest.raises(BundleError, match=f"'{where}'"):
        load_bundle(copy)
    with pytest.raises(BundleError):
        read_manifest(copy)


def test_deeply_nested_manifest_is_a_bundle_error(copy):
    (copy / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(copy)


def test_symlinked_file_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.npy"
    shutil.move(copy / "raw_emb.npy", outside)
    (copy / "raw_emb.npy").symlink_to(outside)
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(copy)


def test_the_bundle_hands_out_its_typed_config_schema_and_coders(random_bundle):
    b = load_bundle(random_bundle)
    assert b.config.vq.k == b.vq_k == 5 and b.config.rq.n_levels == b.n_levels
    assert b.schema.rq_columns == ("rq_code_l1", "rq_code_l2", "rq_code_l3")
    assert b.rq is b.rq and b.vq is b.vq  # fitted once per bundle
    codes = b.rq.encode(encode_items(b, b.raw_emb[:10]).aligned)
    np.testing.assert_array_equal(codes, encode_items(b, b.raw_emb[:10]).rq_codes)
