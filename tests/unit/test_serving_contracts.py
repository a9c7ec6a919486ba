"""The serving contracts, fast: request path == batch path for every column, VQ
self-exclusion, the compact request forms, the one schema, version refusals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qarm_features.bundle.encode import encode_frame, encode_items, get_bundle
from qarm_features.errors import BundleVersionMismatch
from qarm_features.feast.context import DEFAULT_LEVELS, ServingContext, read_pointer, write_pointer
from qarm_features.feast.sources import encode_catalog
from qarm_features.schema import CodeSchema
from transformations import on_demand


@pytest.fixture(scope="module")
def bundle(random_bundle):
    return get_bundle(random_bundle)


@pytest.fixture(scope="module")
def context(random_bundle):
    return ServingContext.of_bundle(random_bundle)


def _as_batch_value(name, value):
    if name == "aligned_emb":
        return np.asarray(value, np.float32).view(np.uint32).tolist()
    if name == "vq_codes":
        return [int(x) for x in value]
    return value.item() if isinstance(value, np.generic) else value


def test_request_path_equals_batch_path_for_every_column(bundle, context):
    rng = np.random.default_rng(0)
    ids = bundle.item_ids[:6]
    raw = np.concatenate([bundle.raw_emb[:3], rng.standard_normal((3, bundle.raw_dim))])
    raw = raw.astype(np.float32)
    batch = encode_catalog(bundle, pd.DataFrame({"item_id": ids, "raw_emb": list(raw)}))
    got = on_demand.encode_request(context, [r.tolist() for r in raw], ids.tolist())
    assert set(got) == {c.name for c in bundle.schema.cold_features}
    for name in bundle.schema.feature_names:
        want = [_as_batch_value(name, v) for v in batch[name]]
        have = [_as_batch_value(name, v) for v in got[name]]
        assert have == want, name
    assert got["qarm_error"] == [""] * 6


def test_vq_self_exclusion_needs_the_item_id(bundle, context):
    item = int(bundle.item_ids[10])
    row = [bundle.raw_emb[10].tolist()]
    with_id = on_demand.encode_request(context, row, [item])
    without = on_demand.encode_request(context, row)
    assert item not in with_id["vq_codes"][0]
    assert without["vq_codes"][0][0] == item  # an item is its own nearest pool neighbour
    assert with_id["vq_codes"][0] == without["vq_codes"][0][1:] + with_id["vq_codes"][0][-1:]
    via_python = on_demand.qarm_cold_python(
        {"raw_emb": row, "item_id": [item]}, context.to_json()
    )
    assert via_python["vq_codes"] == with_id["vq_codes"]


def test_encode_frame_puts_each_level_in_its_own_column(bundle):
    df = pd.DataFrame({"item_id": bundle.item_ids[:50], "raw_emb": list(bundle.raw_emb[:50])})
    out = encode_frame(bundle, df)
    ref = encode_items(bundle, bundle.raw_emb[:50], bundle.item_ids[:50])
    assert len(set(map(tuple, ref.rq_codes.T.tolist()))) == bundle.n_levels  # levels differ
    for level, name in enumerate(bundle.schema.rq_columns):
        np.testing.assert_array_equal(out[name].to_numpy(), ref.rq_codes[:, level])
    np.testing.assert_array_equal(np.stack(out["vq_codes"]), ref.vq_codes)


def test_array_and_base64_forms_equal_the_list_form(bundle, context):
    raw = np.random.default_rng(1).standard_normal((3, bundle.raw_dim)).astype(np.float32)
    as_list = on_demand.qarm_cold_python({"raw_emb": [r.tolist() for r in raw]}, context.to_json())
    as_array = on_demand.qarm_cold_python({"raw_emb": list(raw)}, context.to_json())
    as_b64 = on_demand.qarm_cold_b64_python(
        {"raw_emb_b64": [on_demand.encode_b64(r) for r in raw]}, context.to_json()
    )
    assert as_array == as_list and as_b64 == as_list


def test_bad_base64_rows_get_their_own_error(bundle, context):
    good = on_demand.encode_b64(bundle.raw_emb[0])
    rows = [good, "not base64!", on_demand.encode_b64(bundle.raw_emb[0][:5]), None, 7, good]
    out = on_demand.qarm_cold_b64_python({"raw_emb_b64": rows}, context.to_json())
    errors = out["qarm_error"]
    assert errors[0] == errors[5] == ""
    assert "not valid base64" in errors[1]
    assert "20 bytes" in errors[2] and f"{4 * bundle.raw_dim}" in errors[2]
    assert "missing" in errors[3]
    assert "base64 string" in errors[4]
    for i in (1, 2, 3, 4):
        assert out["rq_code_l1"][i] == -1 and out["qarm_version"][i] == ""
    assert out["rq_code_l1"][0] == out["rq_code_l1"][5] >= 0


def test_unset_context_answers_every_row_with_an_error():
    out = on_demand.encode_request(ServingContext.unset(), [[1.0], None])
    assert [e.startswith("QarmError: no QARM bundle") for e in out["qarm_error"]] == [True] * 2
    assert set(out) == {c.name for c in CodeSchema(DEFAULT_LEVELS).cold_features}


def test_mismatched_bundle_directory_is_refused_per_row(random_bundle, tmp_path, context):
    from qarm_features.bundle.testing import make_random_bundle

    other = make_random_bundle(tmp_path / "other", seed=3)
    swapped = ServingContext(**{**context.to_json(), "bundle": str(other)})
    out = on_demand.encode_request(swapped, [[0.0] * context.raw_dim])
    assert "BundleVersionMismatch" in out["qarm_error"][0]


def test_the_udf_source_carries_the_context(random_bundle, context, tmp_path, monkeypatch):
    from qarm_features.feast.views import udf_source

    src = udf_source("qarm_cold", "transformations.on_demand:qarm_cold_python", context)
    namespace = {"pd": pd, "np": np}
    exec(src, namespace)  # what Feast does with the registry's source text
    monkeypatch.chdir(tmp_path)  # any working directory
    monkeypatch.setenv("QARM_BUNDLE", "/nonexistent")  # no environment variable matters
    out = namespace["qarm_cold"]({"raw_emb": [get_bundle(random_bundle).raw_emb[0].tolist()]})
    assert out["qarm_version"] == [context.version] and out["qarm_error"] == [""]


def test_schema_is_the_one_source_of_names_and_types(bundle, context):
    from qarm_features.feast.views import cold_view, feast_fields

    schema = bundle.schema
    names = list(schema.feature_names)
    assert names == ["aligned_emb", "rq_code_l1", "rq_code_l2", "rq_code_l3", "vq_codes",
                     "qarm_version"]  # fmt: skip
    assert [f.name for f in feast_fields(schema.features)] == names
    assert schema.arrow("codes").names == ["item_id", "event_timestamp", "created", *names]
    hist = schema.arrow("history").names
    assert hist[2:] == ["hist_item_ids", "hist_rq_code_l1", "hist_rq_code_l2",
                        "hist_rq_code_l3", "hist_len", "hist_qarm_version"]  # fmt: skip
    from feast import Field, RequestSource
    from feast.types import String

    req = RequestSource(name="r", schema=[Field(name="raw_emb_b64", dtype=String)])
    view = cold_view(context, name="qarm_cold_b64", request_source=req)
    assert [f.name for f in view.features] == names + ["qarm_error"]
    assert "qarm_cold_b64_python" in view.feature_transformation.udf_string
    assert context.version in view.feature_transformation.udf_string


def test_pointer_round_trip(random_bundle, tmp_path):
    ctx = ServingContext.of_bundle(random_bundle)
    assert read_pointer(tmp_path) is None
    write_pointer(tmp_path, ctx)
    assert read_pointer(tmp_path) == ctx == ServingContext.of_repo(tmp_path)
    assert ServingContext.of_repo(tmp_path / "elsewhere").version == "unset"


def test_an_explicit_bundle_wins_over_the_repo_pointer(random_bundle, tmp_path):
    """Resolution order: an explicit bundle (a CLI option, an SDK argument) before the
    repo's pointer, which names another version here."""
    from qarm_features.bundle.testing import make_random_bundle

    other = make_random_bundle(tmp_path / "other", seed=11)
    repo = tmp_path / "repo"
    write_pointer(repo, ServingContext.of_bundle(random_bundle))
    got = ServingContext.of_repo(repo, other)
    assert got == ServingContext.of_bundle(other) != read_pointer(repo)
    assert got.version == get_bundle(other).version
    assert ServingContext.of_repo(repo) == read_pointer(repo)  # no argument: the pointer


# ------------------------------------------------------------------ version refusals
class _View:
    def __init__(self, version):
        self.tags = {"qarm_version": version}


class _Registry:
    def __init__(self, version):
        self.version = version

    def get_feature_view(self, name, project, allow_cache=True):
        return _View(self.version)


class _Store:
    project = "qarm"

    def __init__(self, version):
        self.registry = _Registry(version)

    def apply(self, objects):  # pragma: no cover - must never be reached
        raise AssertionError("a refused call applied definitions")


@pytest.fixture
def serving_other_version(monkeypatch, tmp_path):
    """A repo whose registry serves another bundle version; nothing may be written to it."""
    from qarm_features.feast import job

    store = _Store("qarm-aaaaaaaaaaaa")
    monkeypatch.setattr(job, "open_store", lambda repo, fs_yaml_file=None: store)
    repo = tmp_path / "repo"
    repo.mkdir()
    return repo


def test_materialize_push_and_apply_refuse_another_version(serving_other_version, random_bundle):
    from qarm_features.feast.job import apply, materialize, push_items

    repo = serving_other_version
    b = get_bundle(random_bundle)
    with pytest.raises(BundleVersionMismatch, match="promote"):
        materialize(random_bundle, repo)
    with pytest.raises(BundleVersionMismatch, match="serves qarm-aaaaaaaaaaaa"):
        push_items(repo, pd.DataFrame({"item_id": [1], "raw_emb": [b.raw_emb[0]]}),
                   bundle_path=random_bundle)  # fmt: skip
    with pytest.raises(BundleVersionMismatch, match="relabel"):
        apply(repo, random_bundle)
    assert list(repo.iterdir()) == [], "a refused call wrote files"


def test_text_view_encodes_the_text_with_the_bundles_encoder(tmp_path):
    """Content in: the frozen text encoder runs at request time, then the usual encode."""
    from qarm_features.bundle.testing import make_random_bundle
    from qarm_features.content.encoders import TextEncoder

    path = make_random_bundle(tmp_path / "b384", n_items=64, raw_dim=384, out_dim=16, n_codes=8)
    ctx = ServingContext.of_bundle(path)
    texts = ["Toy Story (1995)", "", "GoldenEye (1995)"]
    out = on_demand.qarm_cold_text_python({"text": texts}, ctx.to_json())
    emb = TextEncoder().encode([texts[0], texts[2]])
    want = on_demand.encode_request(ctx, list(emb))
    assert out["qarm_error"] == ["", "text is missing or empty", ""]
    assert [out["rq_code_l1"][0], out["rq_code_l1"][2]] == want["rq_code_l1"]
    assert [out["vq_codes"][0], out["vq_codes"][2]] == want["vq_codes"]
    assert out["rq_code_l1"][1] == -1
