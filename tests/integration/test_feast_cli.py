"""The feature repo through the real, unmodified `feast` CLI on the embedded defaults.

One temporary copy of feature_repo/ per module: sources written by the job's batch
transformation, then `feast apply` and `feast materialize` as subprocesses, then online
and historical reads, `feast serve` over HTTP, the cold-item on-demand view, the push
path and version-mismatch detection.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from tests.integration.helpers import (
    NOT_FOUND,
    PRESENT,
    assert_row_equal,
    catalog_expectations,
    check_history_point_in_time,
    expected_rows,
    feast_server,
    http_json,
    online,
    qarm_names,
    refs,
    row,
    run_feast,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*experimental.*:RuntimeWarning"),
]

NAMES = qarm_names(3)
COLD_NAMES = NAMES + ["qarm_error"]


@pytest.fixture(scope="module")
def cli_repo(make_repo, bundle_path, interactions):
    from qarm_features.feast.job import prepare_sources

    repo = make_repo("cli")
    prepare_sources(bundle_path, repo, interactions_df=interactions)
    run_feast(["apply"], repo)
    end = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    run_feast(["materialize", "1970-01-01T00:00:00", end], repo)
    return repo


@pytest.fixture(scope="module")
def store(cli_repo):
    from feast import FeatureStore

    return FeatureStore(repo_path=str(cli_repo))


@pytest.fixture(scope="module")
def expected(bundle_path):
    return catalog_expectations(bundle_path)


def test_apply_registers_the_contract(store, bundle_path):
    from feast import BatchFeatureView
    from feast.types import Array, Float32, Int64, String

    from qarm_features.bundle.artifact import load_bundle

    version = load_bundle(bundle_path).version
    assert store.get_entity("item").join_key == "item_id"
    assert store.get_entity("user").join_key == "user_id"
    qarm = store.get_feature_view("qarm")
    types = {f.name: f.dtype for f in qarm.features}
    assert list(types) == NAMES
    assert types["aligned_emb"] == Array(Float32) and types["vq_codes"] == Array(Int64)
    assert all(types[f"rq_code_l{i}"] == Int64 for i in (1, 2, 3))
    assert types["qarm_version"] == String
    assert qarm.tags["qarm_version"] == version
    assert {f.name for f in store.get_feature_view("item_content").features} == {"raw_emb"}
    hist = {f.name for f in store.get_feature_view("user_history").features}
    assert {"hist_item_ids", "hist_rq_code_l1", "hist_rq_code_l3", "hist_len"} <= hist
    bfv = store.registry.get_any_feature_view("qarm_batch", store.project)
    assert isinstance(bfv, BatchFeatureView)
    cold = store.get_on_demand_feature_view("qarm_cold")
    assert [f.name for f in cold.features] == COLD_NAMES
    (request,) = cold.source_request_sources.values()
    assert [(f.name, f.dtype) for f in request.schema] == [("raw_emb", Array(Float32))]
    service = store.get_feature_service("qarm_ranker")
    assert {p.name for p in service.feature_view_projections} == {
        "qarm", "item_content", "user_history"
    }


def test_online_codes_and_unknown_ids(store, expected):
    ids = [1, 2, 77, 200, 10_000, -3]
    values, statuses = online(store, refs("qarm", NAMES), [{"item_id": i} for i in ids])
    for i, item in enumerate(ids):
        if item in expected:
            assert_row_equal(row(values, i, NAMES), expected[item], NAMES, f"item {item}")
            assert all(statuses[n][i] == PRESENT for n in NAMES)
        else:
            assert all(values[n][i] is None for n in NAMES), f"unknown {item} got values"
            assert all(statuses[n][i] == NOT_FOUND for n in NAMES)


def test_batch_feature_view_equals_the_job(store, expected):
    """The BatchFeatureView UDF (run by Feast's compute engine) stores the job's rows."""
    ids = sorted(expected)
    values, _ = online(store, refs("qarm_batch", NAMES), [{"item_id": i} for i in ids])
    for i, item in enumerate(ids):
        assert_row_equal(row(values, i, NAMES), expected[item], NAMES, f"qarm_batch {item}")


def test_historical_codes_cover_old_logs_and_history_is_point_in_time(
    store, expected, interactions
):
    # codes: any training row, however old, gets the live bundle's codes
    entity_df = pd.DataFrame(
        {
            "item_id": [1, 5, 150, 123_456],
            "event_timestamp": pd.to_datetime(
                ["1995-01-01", "1998-03-01", "2030-01-01", "1998-03-01"], utc=True
            ),
        }
    )
    hist = store.get_historical_features(entity_df=entity_df, features=refs("qarm", NAMES)).to_df()
    for rec in hist.to_dict("records"):
        if rec["item_id"] in expected:
            want = expected[rec["item_id"]]
            assert rec["qarm_version"] == want["qarm_version"]
            assert [int(rec[f"rq_code_l{i}"]) for i in (1, 2, 3)] == [
                want[f"rq_code_l{i}"] for i in (1, 2, 3)
            ]
            assert np.array_equal(np.asarray(rec["aligned_emb"], np.float32), want["aligned_emb"])
        else:
            assert pd.isna(rec["rq_code_l1"])

    # user history: a row at an event's own time sees only earlier positives
    check_history_point_in_time(store, interactions, expected)


def test_cold_items_on_demand_equal_the_batch_path(
    store, cli_repo, bundle_path, monkeypatch, tmp_path
):
    from qarm_features.bundle.artifact import load_bundle

    # from another working directory, with no environment variable and no configure():
    # the view's UDF carries the repo's bundle (its serving context)
    monkeypatch.chdir(tmp_path)
    b = load_bundle(bundle_path)
    rng = np.random.default_rng(42)
    new = rng.standard_normal((3, b.raw_dim)).astype(np.float32)
    want = expected_rows(bundle_path, [5001, 5002, 5003], new)
    rows = [
        {"raw_emb": new[0].tolist()},
        {"raw_emb": [1.0, 2.0]},  # wrong size
        {"raw_emb": new[1].tolist()},
        {"raw_emb": [float("nan")] * b.raw_dim},  # non-finite
        {"raw_emb": new[2].tolist()},
    ]
    values, _ = online(store, refs("qarm_cold", COLD_NAMES), rows)
    for i, item in ((0, 5001), (2, 5002), (4, 5003)):
        assert_row_equal(row(values, i, NAMES), want[item], NAMES, f"cold row {i}")
        assert values["qarm_error"][i] == ""
    assert "expects 32" in values["qarm_error"][1]
    assert "NaN" in values["qarm_error"][3]
    for i in (1, 3):
        assert values["rq_code_l1"][i] == -1 and values["qarm_version"][i] == ""

    # a catalog item sent with its id excludes itself from its VQ codes, as the batch does
    expected = catalog_expectations(bundle_path)
    values, _ = online(
        store, refs("qarm_cold", COLD_NAMES), [{"item_id": 7, "raw_emb": b.raw_emb[6].tolist()}]
    )
    assert_row_equal(row(values, 0, NAMES), expected[7], NAMES, "cold item 7")


def test_feast_serve_http(cli_repo, bundle_path):
    from qarm_features.bundle.artifact import load_bundle

    b = load_bundle(bundle_path)
    expected = catalog_expectations(bundle_path)
    new = np.random.default_rng(3).standard_normal((1, b.raw_dim)).astype(np.float32)
    want_cold = expected_rows(bundle_path, [6001], new)[6001]
    with feast_server(cli_repo) as url:
        warm = http_json(
            url + "/get-online-features",
            {"features": refs("qarm", NAMES), "entities": {"item_id": [3, 4, 999_999]}},
        )
        cold = http_json(
            url + "/get-online-features",
            {
                "features": refs("qarm_cold", COLD_NAMES),
                "entities": {"raw_emb": [new[0].tolist(), [0.5]]},
            },
        )
    log = "".join(p.read_text() for p in cli_repo.parent.glob("feast-serve-*.log"))
    assert "QARM cold-item path ready" in log and "'threads': 1" in log, log[-3000:]

    names = warm["metadata"]["feature_names"]
    cols = {n: warm["results"][j] for j, n in enumerate(names)}
    for i, item in enumerate([3, 4]):
        got = {n: cols[n]["values"][i] for n in NAMES}
        assert_row_equal(got, expected[item], NAMES, f"http item {item}")
    assert all(cols[n]["statuses"][2] == NOT_FOUND for n in NAMES)
    assert all(cols[n]["values"][2] is None for n in NAMES)

    names = cold["metadata"]["feature_names"]
    cols = {n: cold["results"][j] for j, n in enumerate(names)}
    assert_row_equal({n: cols[n]["values"][0] for n in NAMES}, want_cold, NAMES, "http cold")
    assert cols["qarm_error"]["values"] == ["", "raw_emb has 1 values, the bundle expects 32"]


def test_push_gives_new_items_codes_online(store, cli_repo, bundle_path):
    from qarm_features.feast.job import push_items

    b_dim = 32
    new = np.random.default_rng(11).standard_normal((2, b_dim)).astype(np.float32)
    ids = [9001, 9002]
    before, statuses = online(store, refs("qarm", NAMES), [{"item_id": i} for i in ids])
    assert statuses["rq_code_l1"] == [NOT_FOUND, NOT_FOUND]

    stats = push_items(cli_repo, pd.DataFrame({"item_id": ids, "raw_emb": list(new)}))
    assert stats["n_items"] == 2
    values, statuses = online(store, refs("qarm", NAMES), [{"item_id": i} for i in ids])
    assert statuses["rq_code_l1"] == [PRESENT, PRESENT]
    want = expected_rows(bundle_path, ids, new)
    cold, _ = online(store, refs("qarm_cold", COLD_NAMES), [{"raw_emb": r.tolist()} for r in new])
    for i, item in enumerate(ids):
        assert_row_equal(row(values, i, NAMES), want[item], NAMES, f"pushed {item}")
        assert_row_equal(row(cold, i, NAMES), want[item], NAMES, f"cold == pushed {item}")
    content, _ = online(store, ["item_content:raw_emb"], [{"item_id": ids[0]}])
    assert np.array_equal(np.asarray(content["raw_emb"][0], np.float32), new[0])

    # pushed rows reach the offline store too: training sees the new item
    hist = store.get_historical_features(
        entity_df=pd.DataFrame(
            {"item_id": [9001], "event_timestamp": pd.to_datetime(["2030-01-01"], utc=True)}
        ),
        features=["qarm:rq_code_l1"],
    ).to_df()
    assert int(hist["rq_code_l1"].iloc[0]) == want[9001]["rq_code_l1"]


def test_version_mismatch_is_detected(store, cli_repo, bundle_path, other_bundle_path):
    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.errors import BundleVersionMismatch
    from qarm_features.feast.context import ServingContext
    from qarm_features.feast.job import apply, materialize, push_items
    from qarm_features.feast.serving import check_versions
    from transformations import on_demand

    registered = load_bundle(bundle_path).version
    other = load_bundle(other_bundle_path)
    report = check_versions(cli_repo)
    assert report["ok"] and report["registry"]["qarm"] == registered

    with pytest.raises(BundleVersionMismatch, match="promote"):
        materialize(other_bundle_path, cli_repo)
    with pytest.raises(BundleVersionMismatch):
        push_items(cli_repo, pd.DataFrame({"item_id": [1], "raw_emb": [other.raw_emb[0]]}),
                   bundle_path=other_bundle_path)
    with pytest.raises(BundleVersionMismatch):
        apply(cli_repo, other_bundle_path)
    with pytest.raises(BundleVersionMismatch, match="registry view qarm"):
        check_versions(cli_repo, other_bundle_path)
    # nothing was changed by the refused calls
    assert check_versions(cli_repo)["ok"]

    # a bundle directory that now holds another version than the registry's is reported
    # on every cold row (an operator copied another bundle over the served one)
    stale = ServingContext.of_repo(cli_repo)
    swapped = ServingContext(**{**stale.to_json(), "bundle": str(other_bundle_path)})
    values = on_demand.encode_request(swapped, [[0.0] * 32])
    assert "BundleVersionMismatch" in values["qarm_error"][0]
    assert values["rq_code_l1"][0] == -1 and values["qarm_version"] == [""]


def test_sdk_reapply_after_materialize(cli_repo):
    """`feast apply` twice crashes once the BatchFeatureView is materialized (Feast 0.67);
    the SDK path (`qarm_features.feast.job.apply`, what `qarm materialize` uses) works."""
    from qarm_features.feast.job import apply

    names = apply(cli_repo)
    assert {"qarm", "qarm_batch", "qarm_cold", "qarm_ranker"} <= set(names)


def test_default_repo_survives_feast_apply_twice(make_repo, bundle_path, interactions):
    """`cd feature_repo && feast apply` is the first command a Feast user types: the default
    declarations (no BatchFeatureView) pass it twice in a row, then `feast materialize`,
    and the cold view serves the repo's bundle with `feast` run from the repo."""
    from qarm_features.feast.job import prepare_sources

    repo = make_repo("default", batch_view=False)
    prepare_sources(bundle_path, repo, interactions_df=interactions)
    run_feast(["apply"], repo)
    run_feast(["apply"], repo)
    end = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    run_feast(["materialize", "1970-01-01T00:00:00", end], repo)
    run_feast(["apply"], repo)  # and again after materializing
    listed = run_feast(["feature-views", "list"], repo).stdout
    assert "qarm" in listed and "qarm_batch" not in listed
