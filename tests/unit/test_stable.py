"""Stable codes: matching recovers a known relabelling, a bundle has no churn against
itself, and a warm-started rebuild keeps far more code ids than a cold one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qarm_features.build.stable import churn, churn_codes, match_codebooks
from qarm_features.bundle.artifact import load_bundle
from qarm_features.bundle.encode import align


def test_matching_recovers_a_known_permutation(random_bundle):
    b = load_bundle(random_bundle)
    rng = np.random.default_rng(0)
    perms = [rng.permutation(b.n_codes) for _ in range(b.n_levels)]
    shuffled = np.stack([b.rq_codebooks[lvl][p] for lvl, p in enumerate(perms)])
    aligned = align(b, b.raw_emb)
    # a rotated copy of the space, as a retrained aligner would give
    q, _ = np.linalg.qr(rng.standard_normal((b.aligned_dim, b.aligned_dim)))
    matched, _ = match_codebooks(shuffled @ q.T.astype(np.float32), aligned @ q.T, aligned,
                                 b.rq_codebooks)  # fmt: skip
    np.testing.assert_allclose(matched @ q.astype(np.float32), b.rq_codebooks, atol=1e-5)


def test_a_bundle_has_no_churn_against_itself(random_bundle):
    b = load_bundle(random_bundle)
    report = churn(b, b)
    assert report["n_items"] == 200 and report["tuple"] == 0.0 and report["vq_overlap"] == 1.0
    assert all(report[f"level_{i}"] == 0.0 for i in (1, 2, 3))


@pytest.fixture(scope="module")
def world():
    from qarm_features.datasets.synthetic import SyntheticWorld

    return SyntheticWorld(n_items=300, n_users=400, content_dim=32, nuisance=3.0, seed=0)


def test_warm_start_keeps_code_ids_across_a_reseeded_rebuild(world, tmp_path):
    from qarm_features.build.bundles import build_bundle
    from qarm_features.config import AlignerConfig, BuildConfig, PairsConfig, RQConfig, VQConfig

    torch.set_num_threads(1)
    events = world.interactions(n_per_user=30)

    def cfg(seed):
        return BuildConfig(
            pairs=PairsConfig(mf_epochs=5, mf_dim=16, seed=seed),
            aligner=AlignerConfig(out_dim=16, max_epochs=8, batch_size=64, lr=1e-2, seed=seed),
            rq=RQConfig(n_levels=2, n_codes=8, seed=seed),
            vq=VQConfig(k=5),
            seed=seed,
        )

    kw = dict(item_ids=world.item_ids, raw_emb=world.content, interactions=events)
    first = build_bundle(tmp_path / "a", config=cfg(0), **kw)
    cold = build_bundle(tmp_path / "b", config=cfg(1), **kw)
    warm = build_bundle(tmp_path / "c", config=cfg(1), warm_start=first.path, **kw)
    old = load_bundle(first.path)
    cold_churn = churn(load_bundle(cold.path), old)
    warm_churn = churn(load_bundle(warm.path), old)
    assert warm.metrics["churn"]["level_1"] == pytest.approx(warm_churn["level_1"])
    assert warm_churn["level_1"] < 0.5 * cold_churn["level_1"], (warm_churn, cold_churn)
    print("synthetic churn, cold:", cold_churn, "warm:", warm_churn)


# --------------------------------------------------------------------------- append report
def _near(b, n, seed=1):
    """New items whose content is close to catalog items (a new size of a known product)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(b.raw_emb.shape[0], n)
    return b.raw_emb[rows] + 0.01 * rng.standard_normal((n, b.raw_dim)).astype(np.float32)


def test_no_item_added_means_no_rebuild(random_bundle):
    from qarm_features.build.stable import append_report

    report = append_report(load_bundle(random_bundle), np.empty((0, 32), np.float32))
    assert report["n_added"] == 0 and report["share_added"] == 0.0
    assert report["drift"] is None and not report["rebuild_due"] and report["reasons"] == []


def test_a_few_familiar_items_need_no_rebuild(random_bundle):
    from qarm_features.build.stable import append_report

    report = append_report(load_bundle(random_bundle), _near(load_bundle(random_bundle), 10))
    assert report["n_added"] == 10 and report["share_added"] == pytest.approx(0.05)
    assert 0.9 < report["drift"] < 1.1
    assert not report["rebuild_due"]


def test_many_added_items_make_a_rebuild_due(random_bundle):
    from qarm_features.build.stable import append_report

    b = load_bundle(random_bundle)
    report = append_report(b, _near(b, 30))  # 15% of 200 > 10%
    assert report["rebuild_due"] and len(report["reasons"]) == 1
    assert "15.0% of its 200" in report["reasons"][0]


def test_unfamiliar_content_makes_a_rebuild_due(tmp_path):
    """Items far from everything the codebooks were fitted on: the residual error grows;
    judged once enough of them were added (one item's error is noise)."""
    from qarm_features.build.stable import DRIFT_MIN_ITEMS, append_report
    from qarm_features.bundle.testing import make_random_bundle

    b = load_bundle(make_random_bundle(tmp_path / "b", n_items=1000))
    rng = np.random.default_rng(2)
    far = 5 * np.tile(rng.standard_normal((1, b.raw_dim)), (DRIFT_MIN_ITEMS, 1))
    far += 0.1 * rng.standard_normal(far.shape)
    few = append_report(b, far[: DRIFT_MIN_ITEMS - 1])
    assert few["drift"] > 1.25 and not few["rebuild_due"]
    report = append_report(b, far)
    assert report["share_added"] == pytest.approx(0.03) and report["drift"] > 1.25
    assert report["rebuild_due"] and len(report["reasons"]) == 1
    assert "residual error" in report["reasons"][0]


def test_added_items_of_another_width_are_refused(random_bundle):
    from qarm_features.build.stable import append_report
    from qarm_features.errors import InputError

    with pytest.raises(InputError, match="added items' raw_emb: expected width 32"):
        append_report(load_bundle(random_bundle), np.zeros((3, 16), np.float32))


# --------------------------------------------------------------------------- churn, two bundles
def _rewrite(b, path, *, order=None, codebooks=None):
    """``b`` written again, its catalog rows in ``order`` and/or other RQ codebooks."""
    from qarm_features.bundle.artifact import write_bundle

    order = np.arange(len(b.item_ids)) if order is None else order
    string = b.item_keys is not None
    ids = np.arange(len(order), dtype=np.int64) if string else b.item_ids[order]
    pool = align(b, b.raw_emb[order])
    return load_bundle(write_bundle(
        path, config=b.config, aligner_weights=b.aligner_weights,
        rq_codebooks=b.rq_codebooks if codebooks is None else codebooks,
        vq_pool_emb=pool, vq_pool_ids=ids, item_ids=ids, raw_emb=b.raw_emb[order],
        vq_k=b.vq_k, item_keys=b.item_keys[order] if string else None,
    ))  # fmt: skip


def test_churn_codes_counts_an_item_whose_any_level_moved():
    new = np.array([[1, 2], [1, 2], [3, 4], [5, 6]])
    old = np.array([[1, 2], [1, 9], [7, 4], [5, 6]])
    vq = [["a", "b"]] * 4
    report = churn_codes(new, vq, old, vq)
    assert report["level_1"] == 0.25 and report["level_2"] == 0.25
    assert report["tuple"] == 0.5 and report["vq_overlap"] == 1.0


def test_churn_against_a_relabelled_bundle_counts_the_moved_ids(random_bundle, tmp_path):
    """Another bundle, the same space, level 1's ids permuted: level 1 churns by exactly
    the items whose id the permutation moved, level 2 and the VQ lists not at all."""
    from qarm_features.bundle.encode import encode_items

    b = load_bundle(random_bundle)
    perm = np.random.default_rng(3).permutation(b.n_codes)
    books = b.rq_codebooks.copy()
    books[0] = books[0][perm]  # new row i holds old centroid perm[i]
    old = _rewrite(b, tmp_path / "relabelled", codebooks=books)
    codes = encode_items(b, b.raw_emb, b.item_ids).rq_codes[:, 0]
    moved = float((np.argsort(perm)[codes] != codes).mean())
    assert moved > 0.5
    report = churn(b, old)
    assert report["n_items"] == 200 and report["level_1"] == pytest.approx(moved)
    assert report["level_2"] == report["level_3"] == 0.0 and report["tuple"] == report["level_1"]
    assert report["vq_overlap"] == 1.0


def test_two_string_catalogs_are_matched_by_key_not_by_row(tmp_path):
    """The same SKUs in another row order (a re-exported catalog): matched by key, nothing
    churns; matched by row, every code would."""
    from qarm_features.build.stable import common_rows
    from qarm_features.bundle.testing import make_random_bundle

    b = load_bundle(make_random_bundle(tmp_path / "s", string_ids=True))
    order = np.random.default_rng(4).permutation(len(b.item_ids))
    shuffled = _rewrite(b, tmp_path / "shuffled", order=order)
    a, rows = common_rows(shuffled.item_keys, b)
    assert a.tolist() == list(range(200)) and rows.tolist() == order.tolist()
    report = churn(shuffled, b)
    assert report["n_items"] == 200 and report["tuple"] == 0.0 and report["vq_overlap"] == 1.0


def test_a_share_of_exactly_the_threshold_is_not_yet_due(random_bundle):
    from qarm_features.build.stable import REBUILD_SHARE, append_report

    b = load_bundle(random_bundle)
    at = append_report(b, _near(b, int(REBUILD_SHARE * 200)))  # 20 of 200: exactly 10%
    assert at["share_added"] == pytest.approx(REBUILD_SHARE) and not at["rebuild_due"]
    assert append_report(b, _near(b, 21))["rebuild_due"]
