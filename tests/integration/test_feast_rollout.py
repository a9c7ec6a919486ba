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
    from qarm_features.feast.job import materialize

    repo = make_repo("sdk")
    stats = materialize(bundle_path, repo, interactions_df=interactions)
    assert stats["previous_version"] is None and stats["n_items"] == 200
    assert stats["n_history_rows"] > 0
    return repo


def test_sdk_materialize_read_path(sdk_repo, bundle_path):
    from qarm_features.feast.serving import sample_online
    from qarm_features.feast.store import open_store

    check_read_path(open_store(sdk_repo), bundle_path)
    sample = sample_online(sdk_repo, [1, 999_999], [0.1] * 32)  # one flat embedding
    assert [r["status"] for r in sample["warm"]] == ["PRESENT", "NOT_FOUND"]
    assert sample["cold"][0]["qarm_error"] == "" and sample["cold"][0]["rq_code_l1"] >= 0


def test_sdk_push_and_rollout(sdk_repo, bundle_path, other_bundle_path, interactions):
    check_rollout(sdk_repo, None, bundle_path, other_bundle_path, interactions)


def test_cold_path_follows_the_registry(make_repo, bundle_path, other_bundle_path, tmp_path,
                                        monkeypatch):
    """A rollout moves the cold path with the registry: a store opened from another working
    directory serves the old bundle's codes, then the promoted one's, with no restart,
    environment variable or configure() call; a base64 request equals the list request."""
    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.feast.job import materialize, open_store
    from tests.integration.helpers import online, refs
    from transformations.on_demand import encode_b64

    a, b = load_bundle(bundle_path), load_bundle(other_bundle_path)
    repo = make_repo("follow")
    materialize(bundle_path, repo)
    monkeypatch.chdir(tmp_path)

    def cold(view, field, value, levels):
        names = [f"rq_code_l{levels}", "qarm_version", "qarm_error"]
        values, _ = online(open_store(repo), refs(view, names), [{field: value}])
        return values

    got = cold("qarm_cold", "raw_emb", a.raw_emb[0].tolist(), 3)
    assert got["qarm_version"] == [a.version] and got["qarm_error"] == [""]
    as_b64 = cold("qarm_cold_b64", "raw_emb_b64", encode_b64(a.raw_emb[0]), 3)
    assert as_b64 == got

    materialize(other_bundle_path, repo, promote=True)
    got = cold("qarm_cold", "raw_emb", b.raw_emb[0].tolist(), 4)
    assert got["qarm_version"] == [b.version] and got["qarm_error"] == [""]
    assert got["rq_code_l4"][0] >= 0


def test_promotion_does_not_resurrect_the_previous_catalog(make_repo, bundle_path, tmp_path):
    """Promoting a bundle built on 50 items into a repo that served 200 (+1 pushed) serves
    51 items: the pushed one is kept, the 150 others of the old catalog are gone."""
    import numpy as np
    import pandas as pd

    from qarm_features.bundle.testing import make_random_bundle
    from qarm_features.feast.job import materialize, open_store, push_items
    from tests.integration.helpers import online

    repo = make_repo("shrink", batch_view=False)
    materialize(bundle_path, repo)
    pushed = np.random.default_rng(1).standard_normal((1, 32)).astype(np.float32)
    push_items(repo, pd.DataFrame({"item_id": [9_999], "raw_emb": list(pushed)}))
    small = make_random_bundle(tmp_path / "small", n_items=50, seed=3)
    stats = materialize(small, repo, promote=True)
    assert stats["n_items"] == 51 and stats["n_pushed_items_kept"] == 1
    _, statuses = online(open_store(repo), ["qarm:rq_code_l1"],
                         [{"item_id": 10}, {"item_id": 150}, {"item_id": 9_999}])  # fmt: skip
    assert statuses["rq_code_l1"] == ["PRESENT", "NOT_FOUND", "PRESENT"]


def test_a_promotion_killed_before_its_switch_forgets_no_pushed_item(make_repo, bundle_path,
                                                                     tmp_path, monkeypatch):
    """An item pushed (edited) and held by the new bundle's catalog is forgotten from the
    pushed-items file only once the new sources are switched in: a run that dies before
    the switch leaves the old set served, with the push still listed."""
    import numpy as np
    import pandas as pd

    from qarm_features.bundle.testing import make_random_bundle
    from qarm_features.feast import job
    from qarm_features.feast.job import materialize, push_items

    repo = make_repo("forget", batch_view=False)
    materialize(bundle_path, repo)
    edited = np.random.default_rng(2).standard_normal((1, 32)).astype(np.float32)
    push_items(repo, pd.DataFrame({"item_id": [10], "raw_emb": list(edited)}))
    small = make_random_bundle(tmp_path / "small", n_items=50, seed=3)  # holds item 10

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the switch")

    monkeypatch.setattr(job, "switch_current", killed)
    with pytest.raises(KeyboardInterrupt):
        materialize(small, repo, promote=True)
    assert job._pushed(repo, "item_id")["item_id"].tolist() == [10]
    monkeypatch.undo()
    materialize(small, repo, promote=True)
    assert job._pushed(repo, "item_id").empty  # the built catalog holds it now


def test_a_push_waits_for_the_repo_lock(make_repo, bundle_path):
    """`qarm push` beside a promotion: refused at once naming the holder (nothing pushed,
    online or in the pushed-items file), or pushed once the holder is gone."""
    import os
    import subprocess
    import sys

    import numpy as np
    import pandas as pd

    from qarm_features.errors import RepoLocked
    from qarm_features.feast.job import materialize, open_store, push_items
    from qarm_features.feast.layout import PUSHED_FILE
    from tests.integration.helpers import ROOT, online

    repo = make_repo("pushlock", batch_view=False)
    materialize(bundle_path, repo)
    items = pd.DataFrame({"item_id": [9_998],
                          "raw_emb": list(np.ones((1, 32), np.float32))})  # fmt: skip
    script = (
        "import sys, time\nfrom qarm_features.feast.rollout import repo_lock\n"
        "with repo_lock(sys.argv[1], 'qarm materialize (test)'):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(repo)], text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RepoLocked, match=f"pid {holder.pid} .*qarm push"):
            push_items(repo, items)
    finally:
        holder.kill()
        holder.wait()
    assert not (repo / PUSHED_FILE).exists()
    _, statuses = online(open_store(repo), ["qarm:rq_code_l1"], [{"item_id": 9_998}])
    assert statuses["rq_code_l1"] == ["NOT_FOUND"]
    assert push_items(repo, items, lock_timeout=5)["n_items"] == 1
    _, statuses = online(open_store(repo), ["qarm:rq_code_l1"], [{"item_id": 9_998}])
    assert statuses["rq_code_l1"] == ["PRESENT"] and (repo / PUSHED_FILE).exists()


def test_a_view_left_materializing_is_served_and_repaired(make_repo, bundle_path, tmp_path):
    """A killed `qarm materialize` leaves views MATERIALIZING (fault injected here): reads
    go on serving the last rows, `qarm status` says so, `qarm status --repair` fixes it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from feast.feature_view import FeatureViewState

    from qarm_features.feast.job import materialize, open_store
    from tests.integration.helpers import online, subprocess_env

    repo = make_repo("stuck", batch_view=False)
    materialize(bundle_path, repo)
    store = open_store(repo)
    for name in ("qarm", "user_history"):
        fv = store.registry.get_feature_view(name, store.project)
        fv.state = FeatureViewState.MATERIALIZING  # what a kill -9 mid-materialize leaves
        store.registry.apply_feature_view(fv, store.project, commit=True)
    values, statuses = online(open_store(repo), ["qarm:rq_code_l1"], [{"item_id": 3}])
    assert statuses["rq_code_l1"] == ["PRESENT"]  # still served

    qarm = str(Path(sys.executable).parent / "qarm")
    env = subprocess_env(tmp_path)
    proc = subprocess.run([qarm, "status", "--repo", str(repo)], capture_output=True, text=True,
                          env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1 and "view qarm is MATERIALIZING" in proc.stdout
    proc = subprocess.run([qarm, "status", "--repo", str(repo), "--repair"], capture_output=True,
                          text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["views"]["qarm"] == "AVAILABLE_ONLINE" and report["repaired"]


def test_two_versions_served_during_a_switch(make_repo, bundle_path, other_bundle_path):
    """--keep-previous: after promoting B, one request reads B's codes from `qarm` and A's
    from `qarm_prev` for the same item; the next run without it drops `qarm_prev`."""
    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.feast.job import materialize, open_store
    from tests.integration.helpers import catalog_expectations, online

    a, b = load_bundle(bundle_path), load_bundle(other_bundle_path)
    repo = make_repo("two", batch_view=False)
    materialize(bundle_path, repo)
    stats = materialize(other_bundle_path, repo, promote=True, keep_previous=True)
    assert stats["kept_previous"] == a.version
    store = open_store(repo)
    values, statuses = online(
        store,
        ["qarm:qarm_version", "qarm:rq_code_l4", "qarm_prev:qarm_version", "qarm_prev:rq_code_l1"],
        [{"item_id": 7}],
        full_feature_names=True,
    )  # fmt: skip
    assert values["qarm__qarm_version"] == [b.version]
    assert values["qarm_prev__qarm_version"] == [a.version]
    assert values["qarm_prev__rq_code_l1"] == [catalog_expectations(bundle_path)[7]["rq_code_l1"]]
    assert values["qarm__rq_code_l4"] == [catalog_expectations(other_bundle_path)[7]["rq_code_l4"]]

    stats = materialize(other_bundle_path, repo)  # the successor ranker took over
    assert stats["dropped_views"] == ["qarm_prev"]
    assert "qarm_prev" not in {v.name for v in open_store(repo).list_feature_views()}
