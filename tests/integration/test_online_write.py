"""The per-item views written in record batches (``qarm materialize``'s route) equal what
Feast's own ``materialize`` writes, bit for bit, and the registry records the interval."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from tests.integration.helpers import online, qarm_names, refs

pytestmark = pytest.mark.slow


def _read_all(store, item_ids, names):
    values, statuses = online(
        store,
        refs("qarm", names) + ["item_content:raw_emb"],
        [{"item_id": int(i)} for i in item_ids],
    )
    return values, statuses


def test_streamed_rows_equal_feast_materialize(make_repo, bundle_path, interactions):
    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.feast.job import materialize
    from qarm_features.feast.online_write import write_view
    from qarm_features.feast.sources import EPOCH
    from qarm_features.feast.store import clear_online, open_store

    repo = make_repo("streamed", batch_view=False)
    stats = materialize(bundle_path, repo, interactions_df=interactions)
    assert set(stats["streamed_views"]) == {"qarm", "item_content"}
    assert "user_history" in stats["materialized_views"]  # several rows per user: Feast's
    b = load_bundle(bundle_path)
    names = qarm_names(b.n_levels)
    store = open_store(repo)
    ours, ours_status = _read_all(store, b.item_ids, names)
    assert all(s == "PRESENT" for col in ours_status.values() for s in col)
    fv = store.registry.get_feature_view("qarm", store.project, allow_cache=False)
    assert fv.materialization_intervals, "the streamed write recorded no interval"

    # the same rows by Feast's materialization
    end = datetime.now(timezone.utc) + timedelta(seconds=1)
    clear_online(store, ["qarm", "item_content"])
    cleared, _ = _read_all(store, b.item_ids[:3], names)
    assert cleared["rq_code_l1"] == [None] * 3
    store.materialize(start_date=EPOCH, end_date=end, feature_views=["qarm", "item_content"])
    feast_rows, _ = _read_all(store, b.item_ids, names)
    for name in [*names, "raw_emb"]:
        if name in ("aligned_emb", "raw_emb"):
            got = np.asarray(ours[name], np.float32)
            want = np.asarray(feast_rows[name], np.float32)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name
        else:
            assert ours[name] == feast_rows[name], name

    # several small batches write the same rows again
    clear_online(store, ["qarm"])
    n = write_view(store, repo, "qarm", start=EPOCH, end=end, batch_rows=37)
    assert n == len(b.item_ids)
    again, _ = _read_all(store, b.item_ids, names)
    assert again["rq_code_l1"] == ours["rq_code_l1"] and again["vq_codes"] == ours["vq_codes"]


def test_a_view_with_several_rows_per_entity_is_refused(make_repo, bundle_path):
    from qarm_features.feast.online_write import write_view
    from qarm_features.feast.sources import EPOCH

    with pytest.raises(ValueError, match="store.materialize"):
        write_view(None, make_repo("refused"), "user_history", start=EPOCH, end=EPOCH)


def test_an_empty_source_is_skipped(make_repo, bundle_path):
    """No interactions: user_history's source has no row; nothing to materialize (Feast's
    Ray offline store fails on an empty source), the item views are still written."""
    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.feast.job import materialize
    from qarm_features.feast.store import open_store

    repo = make_repo("no-history", batch_view=False)
    stats = materialize(bundle_path, repo)
    assert stats["empty_views"] == ["user_history"] and stats["n_history_rows"] == 0
    b = load_bundle(bundle_path)
    values, statuses = online(open_store(repo), ["qarm:rq_code_l1"],
                              [{"item_id": int(i)} for i in b.item_ids[:5]])  # fmt: skip
    assert statuses["rq_code_l1"] == ["PRESENT"] * 5
