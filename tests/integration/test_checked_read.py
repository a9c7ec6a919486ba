"""The checked in-process read (`qarm_features.feast.serving.get_online_features`): the
id and request-row checks `qarm serve` applies over HTTP, for a ranker that calls Feast
in its own process. Feast's own typing reads `50.7` as item 50 and `True` as item 1, and
a `None` id or one bad cold row fails the whole call."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*experimental.*:RuntimeWarning"),
]


@pytest.fixture(scope="module")
def repo(make_repo, bundle_path):
    from qarm_features.feast.job import materialize

    repo = make_repo("checked", batch_view=False)
    materialize(bundle_path, repo)
    return repo


@pytest.fixture
def store(repo, tmp_path, monkeypatch):
    from qarm_features.feast.store import open_store

    monkeypatch.chdir(tmp_path)  # from another working directory
    return open_store(repo)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (50.7, "item_id row 1: 50.7 is a number with a fraction"),
        (50.0, "item_id row 1: 50.0 is a number with a fraction"),
        (True, "item_id row 1: True is a boolean, not an id"),
        (None, "item_id row 1: None is null; every row needs an id"),
        ("fifty", "item_id row 1: 'fifty' is a string that is not an integer id"),
    ],
)
def test_a_bad_id_is_refused_naming_key_row_and_value(store, value, why):
    from qarm_features.errors import InputError
    from qarm_features.feast.serving import get_online_features

    with pytest.raises(InputError, match=why.replace("(", r"\(").replace(".", r"\.")):
        get_online_features(store, ["qarm:rq_code_l1"], [{"item_id": 3}, {"item_id": value}])


def test_good_ids_read_what_feast_reads(store):
    from qarm_features.feast.serving import get_online_features

    want = store.get_online_features(["qarm:rq_code_l1"], [{"item_id": 50}]).to_dict()
    for value in (50, np.int64(50), "50"):  # JavaScript sends 64-bit ids as strings
        got = get_online_features(store, ["qarm:rq_code_l1"], [{"item_id": value}]).to_dict()
        assert got["rq_code_l1"] == want["rq_code_l1"] != [None], value


def test_one_bad_cold_row_gets_its_own_error(store, bundle_path):
    from qarm_features.bundle.encode import get_bundle
    from qarm_features.feast.serving import get_online_features

    raw = get_bundle(bundle_path).raw_emb
    refs = ["qarm_cold:rq_code_l1", "qarm_cold:qarm_error"]
    alone = store.get_online_features(refs, [{"raw_emb": raw[0]}]).to_dict()
    rows = [
        {"raw_emb": raw[0]},  # a float32 array: passed through untouched
        {"raw_emb": ["x", 1.0]},  # Feast alone fails the whole call on this row
        {"raw_emb": [int(round(x)) for x in raw[1]]},  # integers: read as floats
        {"raw_emb": raw[1].tolist()},
    ]
    got = get_online_features(store, refs, rows).to_dict()
    assert got["qarm_error"][0] == "" and got["rq_code_l1"][0] == alone["rq_code_l1"][0]
    assert got["qarm_error"][1] == "raw_emb[0] is a string, not a number"
    assert got["rq_code_l1"][1] is None or got["rq_code_l1"][1] < 0
    assert got["qarm_error"][2] == got["qarm_error"][3] == ""
    with pytest.raises(Exception):  # noqa: B017 - what the checked read exists for
        store.get_online_features(refs, rows)
