"""`qarm materialize` (SDK: store.apply + store.materialize) on the embedded defaults:
push, version mismatch, rollout of a bundle with another number of RQ levels."""

from __future__ import annotations

import pytest

from tests.integration.helpers import check_read_path, check_rollout

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*experimental.*:RuntimeWarning"),
]


@pytest.fixture(scope="module")
def sdk_repo(make_repo, bundle_path, interactions):
    from transformations.job import materialize

    repo = make_repo("sdk")
    stats = materialize(bundle_path, repo, interactions_df=interactions)
    assert stats["previous_version"] is None and stats["n_items"] == 200
    assert stats["n_history_rows"] > 0
    return repo


def test_sdk_materialize_read_path(sdk_repo, bundle_path, monkeypatch):
    from transformations.job import open_store
    from transformations.serving import sample_online

    monkeypatch.setenv("QARM_BUNDLE", str(bundle_path))  # in-process cold path
    check_read_path(open_store(sdk_repo), bundle_path)
    sample = sample_online(sdk_repo, [1, 999_999], [0.1] * 32)  # one flat embedding
    assert [r["status"] for r in sample["warm"]] == ["PRESENT", "NOT_FOUND"]
    assert sample["cold"][0]["qarm_error"] == "" and sample["cold"][0]["rq_code_l1"] >= 0


def test_sdk_push_and_rollout(sdk_repo, bundle_path, other_bundle_path, interactions):
    check_rollout(sdk_repo, None, bundle_path, other_bundle_path, interactions)


def test_cold_path_follows_the_repo_pointer(tmp_path, bundle_path, other_bundle_path):
    """A server follows its repo: a rollout moves the cold path without a restart, and a
    QARM_BUNDLE naming another bundle than the pointer is reported on every row."""
    from qarm_features.bundle import load_bundle
    from transformations import on_demand
    from transformations.bundle_ref import read_manifest_ref, write_pointer

    a, b = load_bundle(bundle_path), load_bundle(other_bundle_path)
    write_pointer(tmp_path, read_manifest_ref(bundle_path))
    on_demand.configure(repo_path=tmp_path)
    out = on_demand.encode_request([a.raw_emb[0].tolist()])
    assert out["qarm_version"] == [a.version] and out["qarm_error"] == [""]

    write_pointer(tmp_path, read_manifest_ref(other_bundle_path))  # what a rollout does
    out = on_demand.encode_request([b.raw_emb[0].tolist()])
    assert out["qarm_version"] == [b.version] and "rq_code_l4" in out

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QARM_BUNDLE", str(bundle_path))  # an operator pinned the old bundle
        on_demand.configure(repo_path=tmp_path)
        out = on_demand.encode_request([a.raw_emb[0].tolist()])
    assert out["rq_code_l1"] == [-1] and "BundleVersionMismatch" in out["qarm_error"][0]
