"""Unit tests for the evaluation (qarm_features.app: protocol, item spaces, variants,
evaluate, report) on tiny hand-made and synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from qarm_features.app.item_spaces import ItemSpaces
from qarm_features.app.protocol import (
    VARIANTS,
    EvalConfig,
    choose_cold_items,
    make_split,
    point_in_time_history,
    sample_negatives,
    temporal_split,
)
from qarm_features.app.report import METRICS, SUBSETS, write_report
from qarm_features.app.variants import score_subsets, subset_masks, train_ranker, variant_items
from qarm_features.errors import InputError


def _events():
    return pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 3],
            "item_id": [11, 12, 13, 14, 11],
            "label": [1, 0, 1, 1, 0],
            "timestamp": [10, 20, 20, 30, 15],
        }
    )


# --------------------------------------------------------------------------- split
def test_point_in_time_history_strictly_earlier_latest_first():
    q = pd.DataFrame({"user_id": [1, 1, 1, 1, 2, 3], "timestamp": [5, 20, 25, 31, 100, 15]})
    items, labels = point_in_time_history(_events(), q, 3)
    assert items.tolist() == [
        [-1, -1, -1],  # nothing before ts 5
        [11, -1, -1],  # ts 20 excludes both events of the same second
        [13, 12, 11],  # ties keep input order; most recent first
        [14, 13, 12],  # truncated to the latest 3
        [-1, -1, -1],  # unknown user
        [-1, -1, -1],  # user 3's only event is at the query second
    ]
    assert labels.tolist()[2] == [1, 0, 1]
    assert labels[items < 0].sum() == 0


def test_point_in_time_history_matches_slow_reference():
    rng = np.random.default_rng(0)
    ev = pd.DataFrame(
        {
            "user_id": rng.integers(0, 7, 300),
            "item_id": rng.integers(0, 50, 300),
            "label": rng.integers(0, 2, 300),
            "timestamp": rng.integers(0, 40, 300),
        }
    )
    q = pd.DataFrame({"user_id": rng.integers(0, 8, 60), "timestamp": rng.integers(0, 45, 60)})
    items, _labels = point_in_time_history(ev, q, 5)
    srt = ev.sort_values(["user_id", "timestamp"], kind="stable")
    for r, (u, t) in enumerate(zip(q["user_id"], q["timestamp"])):
        past = srt[(srt["user_id"] == u) & (srt["timestamp"] < t)]["item_id"].to_numpy()[::-1][:5]
        expect = np.full(5, -1)
        expect[: past.size] = past
        assert items[r].tolist() == expect.tolist()


def test_temporal_split_keeps_seconds_whole():
    df = pd.DataFrame(
        {
            "user_id": [1] * 10,
            "item_id": range(10),
            "rating": [5.0] * 10,
            "timestamp": [1, 2, 3, 4, 5, 6, 7, 8, 8, 9],
        }
    )
    train, test, cut = temporal_split(df, 0.25)  # 80% -> row 8 (ts 8): both ts-8 rows to test
    assert cut == 8 and train["timestamp"].max() < 8 and len(test) == 3
    with pytest.raises(InputError):
        temporal_split(df.iloc[:1], 0.2)


def test_choose_cold_items_fraction_and_seeded():
    ids = np.arange(100, 200)
    a = choose_cold_items(ids, 0.2, 0)
    assert (
        a.size == 20 and np.isin(a, ids).all() and np.array_equal(a, choose_cold_items(ids, 0.2, 0))
    )
    assert not np.array_equal(a, choose_cold_items(ids, 0.2, 1))


def _world(n_items=60, n_users=40, n_rows=1500, seed=0):
    rng = np.random.default_rng(seed)
    item_ids = np.arange(1, n_items + 1, dtype=np.int64)
    quality = rng.normal(size=n_items)
    users = rng.integers(1, n_users + 1, n_rows)
    ts = np.sort(rng.integers(0, 10_000, n_rows))
    items = rng.integers(0, n_items, n_rows)
    late = n_items - max(2, n_items // 10)  # the last 10% of items first appear late
    early = (items >= late) & (ts < 8_500)
    items[early] = rng.integers(0, late, int(early.sum()))
    rating = np.where(quality[items] + 0.5 * rng.normal(size=n_rows) > 0, 5.0, 2.0)
    df = pd.DataFrame(
        {
            "user_id": users,
            "item_id": item_ids[items],
            "rating": rating,
            "timestamp": ts,
        }
    )
    # content that knows item quality: the frozen embedding carries the label signal
    raw = np.c_[quality, rng.normal(size=(n_items, 7))].astype(np.float32)
    return item_ids, raw, df


def test_make_split_protocol_invariants():
    item_ids, _raw, df = _world()
    cfg = EvalConfig(history_len=4)
    sp = make_split(item_ids, df, cfg, seed=0)
    # cold items have no train row; train and test are disjoint in time
    assert not sp.train["item_id"].isin(sp.cold_items).any()
    assert sp.train["timestamp"].max() < sp.test["timestamp"].min()
    # cold items are drawn among the items with train rows (their rows are removed); new
    # items are those of the test period with no earlier row: the two kinds never mix
    train_all, test_all, _ = temporal_split(df, cfg.test_fraction)
    seen = np.unique(train_all["item_id"])
    assert np.isin(sp.cold_items, seen).all() and sp.cold_items.size == round(0.2 * seen.size)
    assert sp.new_items.size > 0 and not np.isin(sp.new_items, seen).any()
    assert np.isin(sp.new_items, test_all["item_id"]).all()
    assert np.array_equal(np.setdiff1d(np.unique(test_all["item_id"]), seen), sp.new_items)
    new_rows = np.flatnonzero(np.isin(item_ids, sp.new_items))
    assert (sp.item_id_index[new_rows] == 0).all()
    # cold items never appear in train-row histories, but may in test-row histories
    cold_rows = np.flatnonzero(np.isin(item_ids, sp.cold_items))
    for rows in (sp.fit, sp.val):
        assert not np.isin(rows.hist, cold_rows).any()
    assert np.isin(sp.test_rows.hist, cold_rows).any()
    # cold items use the OOV id row; warm items have distinct id rows
    assert (sp.item_id_index[cold_rows] == 0).all()
    warm_idx = sp.item_id_index[np.isin(item_ids, sp.warm_items)]
    assert (warm_idx > 0).all() and np.unique(warm_idx).size == warm_idx.size
    assert len(sp.fit) + len(sp.val) == len(sp.train)
    assert sp.val.user.max() < sp.n_users


# --------------------------------------------------------------------------- rankers
def _fake_spaces(item_ids, raw, sp, seed=0):
    rng = np.random.default_rng(seed)
    n = item_ids.size
    codes = lambda: rng.integers(0, 8, (n, 2))
    vq = lambda: rng.choice(sp.warm_items, (n, 3))
    return ItemSpaces(raw, raw[:, :4].copy(), codes(), vq(), codes(), vq(), sp.warm_items, 8, {})


def test_every_variant_builds_and_trains():
    item_ids, raw, df = _world()
    cfg = EvalConfig(history_len=4, dim=4, epochs=1, batch_size=256)
    sp = make_split(item_ids, df, cfg, seed=0)
    spaces = _fake_spaces(item_ids, raw, sp)
    runs = {}
    for v in VARIANTS:
        kw, items, content = variant_items(v, spaces, sp)
        assert content == {}  # content_codes off: plain code tables
        scores, info = train_ranker(kw, items, sp, cfg, seed=0)
        assert scores.shape == (len(sp.test_rows),) and np.isfinite(scores).all()
        assert info["best_epoch"] == 1
        assert len(info["val_auc"]) == 1 and 0.0 <= info["val_auc"][0] <= 1.0
        runs[v] = (kw, items, scores, info)
    # the item tower reads exactly the variant's inputs
    _, items_b, _, _ = runs["B"]
    np.testing.assert_array_equal(items_b.dense.numpy(), raw)
    kw_d, items_d, _, _ = runs["D"]
    np.testing.assert_array_equal(items_d.rq.numpy(), spaces.aligned_rq)
    assert kw_d["rq_levels"] == 2 and kw_d["vq_k"] == 3 and items_d.dense is None
    assert runs["A"][1].rq is None and runs["A"][1].vq is None
    # more inputs, more parameters; a rerun with the seed gives the same scores
    assert runs["B+D"][3]["n_params"] > runs["D"][3]["n_params"] > runs["A"][3]["n_params"]
    again, _ = train_ranker(*runs["A"][:2], sp, cfg, seed=0)
    np.testing.assert_allclose(again, runs["A"][2], rtol=1e-5)  # ulps: threaded reductions
    assert not np.array_equal(runs["A"][2], runs["B"][2])
    with pytest.raises(InputError, match="unknown"):
        variant_items("Z", spaces, sp)


def test_a_trained_ranker_scores_other_codes():
    """score_with: the model trained on one set of codes reads another (a retrain's)."""
    import dataclasses

    item_ids, raw, df = _world()
    cfg = EvalConfig(history_len=4, dim=4, epochs=1, batch_size=256)
    sp = make_split(item_ids, df, cfg, seed=0)
    spaces = _fake_spaces(item_ids, raw, sp)
    kw, items, _ = variant_items("D", spaces, sp)
    moved = dataclasses.replace(spaces, aligned_rq=(spaces.aligned_rq + 1) % 8)
    _, other, _ = variant_items("D", moved, sp)
    scores, info = train_ranker(
        kw, items, sp, cfg, seed=0, score_with={"same": items, "moved": other}
    )
    np.testing.assert_array_equal(info["scores_with"]["same"], scores)
    assert not np.allclose(info["scores_with"]["moved"], scores)


def test_dense_content_helps_cold_items():
    """Relative check: with content that carries item quality, B beats A on cold rows."""
    item_ids, raw, df = _world(n_items=80, n_users=60, n_rows=4000, seed=1)
    cfg = EvalConfig(history_len=4, dim=8, epochs=4, batch_size=256, lr=5e-3)
    sp = make_split(item_ids, df, cfg, seed=0)
    spaces = _fake_spaces(item_ids, raw, sp)
    cold = {}
    for v in ("A", "B"):
        kw, items, _ = variant_items(v, spaces, sp)
        scores, _ = train_ranker(kw, items, sp, cfg, seed=0)
        cold[v] = score_subsets(sp, scores, item_ids)["cold"]["auc"]
    assert cold["B"] > cold["A"] + 0.05


def test_score_subsets_masks():
    item_ids, _raw, df = _world()
    sp = make_split(item_ids, df, EvalConfig(history_len=2), seed=0)
    y = sp.test_rows.y
    out = score_subsets(sp, y.astype(np.float64), item_ids)  # perfect scores
    for s in SUBSETS:
        assert out[s]["auc"] == pytest.approx(1.0)
    tid = item_ids[sp.test_rows.item]
    assert out["cold"]["n_rows"] == int(np.isin(tid, sp.cold_items).sum())
    assert out["new"]["n_rows"] == int(np.isin(tid, sp.new_items).sum()) > 0
    # every test row is warm, cold or new, and only one of them
    parts = ("warm", "cold", "new")
    assert sum(out[p]["n_rows"] for p in parts) == out["all"]["n_rows"]
    masks = subset_masks(sp, item_ids)
    assert (sum(masks[p].astype(int) for p in parts) == 1).all()


def test_sample_negatives_popularity_matched_and_seeded():
    rng = np.random.default_rng(0)
    pop = np.repeat(np.arange(10), np.arange(1, 11) * 20)  # item i has 20 (i + 1) rows
    df = pd.DataFrame(
        {
            "user_id": rng.integers(0, 30, pop.size),
            "item_id": rng.permutation(pop),
            "label": np.int8(1),
            "timestamp": np.arange(pop.size),
        }
    )
    out = sample_negatives(df, 4, seed=3)
    neg = out[out["label"] == 0]
    pos = out[out["label"] == 1]
    assert len(pos) == len(df) and len(neg) == 4 * len(df)  # no row's own item is drawn
    assert out["timestamp"].is_monotonic_increasing
    # a negative copies its row's user and time, never its item
    key = df.set_index("timestamp")
    assert (neg["user_id"].to_numpy() == key.loc[neg["timestamp"], "user_id"].to_numpy()).all()
    assert (neg["item_id"].to_numpy() != key.loc[neg["timestamp"], "item_id"].to_numpy()).all()
    # popularity-matched: an item's share of negatives follows its share of positives
    share_pos = pos["item_id"].value_counts(normalize=True).sort_index()
    share_neg = neg["item_id"].value_counts(normalize=True).sort_index()
    assert np.corrcoef(share_pos, share_neg)[0, 1] > 0.95
    assert share_neg.iloc[-1] > 3 * share_neg.iloc[0]
    pd.testing.assert_frame_equal(out, sample_negatives(df, 4, seed=3))
    assert not out.equals(sample_negatives(df, 4, seed=4))
    assert sample_negatives(df, 0, seed=3) is df


def test_implicit_split_rows_get_sampled_negatives_and_clean_histories():
    item_ids, _raw, df = _world()
    implicit = df.assign(rating=1.0)
    cfg = EvalConfig(history_len=4, positive_threshold=1.0, negatives_per_positive=3)
    sp = make_split(item_ids, implicit, cfg, seed=0)
    for rows in (sp.fit, sp.val, sp.test_rows):
        assert rows.y.sum() > 0
        assert (rows.y == 0).sum() == pytest.approx(3 * rows.y.sum(), rel=0.02)
        # histories hold logged events only: every past label of an implicit log is 1
        assert (rows.hist_label[rows.hist >= 0] == 1).all()
    # cold and new items get negatives too, so their AUC is defined
    out = score_subsets(sp, sp.test_rows.y.astype(np.float64), item_ids)
    for s in SUBSETS:
        assert out[s]["auc"] == pytest.approx(1.0)
    # fit-row negatives never name a cold or new item
    fid = item_ids[sp.fit.item]
    assert not np.isin(fid, np.r_[sp.cold_items, sp.new_items]).any()


def test_weighted_auc_and_paired_bootstrap():
    """The bootstrap's weighted AUC equals scikit-learn's on repeated rows; the paired
    replicates of a variant against itself are 0, and a better variant's interval is > 0."""
    from types import SimpleNamespace

    from qarm_features.app.paired import paired_bootstrap
    from qarm_features.app.paired import weighted_auc as _weighted_auc
    from qarm_features.app.protocol import Rows
    from qarm_features.metrics import auc

    rng = np.random.default_rng(0)
    n = 3000
    y = rng.integers(0, 2, n).astype(np.int8)
    users = rng.integers(0, 200, n)
    s = np.round(rng.normal(size=n) + 0.5 * y, 1)  # ties
    uniq, inv = np.unique(users, return_inverse=True)
    w = rng.poisson(1.0, size=(3, uniq.size)).astype(np.float32)
    got = _weighted_auc(y, s, w, inv)
    for r in range(3):
        rep = np.repeat(np.arange(n), w[r, inv].astype(int))
        assert got[r] == pytest.approx(auc(y[rep], s[rep]), abs=1e-12)
    rows = Rows(user=np.zeros(n, np.int64), user_id=users, item=rng.integers(0, 30, n),
                hist=None, hist_label=None, y=y.astype(np.float32))  # fmt: skip
    split = SimpleNamespace(
        test_rows=rows, item_ids=np.arange(30), warm_items=np.arange(20),
        cold_items=np.arange(20, 25), new_items=np.arange(25, 30),
    )  # fmt: skip
    scores = {"A": s, "B": s.copy(), "D": s + 1.5 * y * rng.random(n)}
    b = paired_bootstrap(split, scores, seed=0, reps=100)
    assert set(b) == {"B - A", "D - A", "D - B"}
    assert set(b["D - A"]) == set(SUBSETS)
    assert (b["B - A"]["all"]["auc"] == 0).all() and (b["B - A"]["warm"]["gauc"] == 0).all()
    assert np.percentile(b["D - A"]["all"]["auc"], 2.5) > 0
    again = paired_bootstrap(split, scores, seed=0, reps=100)
    np.testing.assert_array_equal(again["D - A"]["cold"]["auc"], b["D - A"]["cold"]["auc"])


# --------------------------------------------------------------------------- report
def _fake_out(variants=("A", "B", "C", "D", "E", "D_vq", "D_rq", "B+D")):
    ms = lambda m: {"mean": m, "std": 0.01, "n": 3}
    res = {
        v: {s: {m: ms(0.7 + 0.01 * i) for m in METRICS} for s in SUBSETS}
        for i, v in enumerate(variants)
    }
    space = {"recall@10": ms(0.03), "pair_auc": ms(0.7)}
    q = {
        "utilization": [ms(1.0)] * 3,
        "entropy": [ms(0.9)] * 3,
        "collision_rate": ms(0.05),
        "reconstruction_error": ms(0.1),
        "n_unique_tuples": ms(1000),
        "n_items": ms(1300),
    }
    return {
        "results": res,
        "deltas_vs_A": {
            v: {s: {m: ms(0.01 * i) for m in METRICS} for s in SUBSETS}
            for i, v in enumerate(variants)
        },
        "per_seed": [],
        "seeds": [0, 1, 2],
        "variants": {v: VARIANTS[v][1] for v in variants},
        "alignment": {
            k: {"n_pairs": ms(100), "raw": space, "aligned": space} for k in ("heldout", "unseen")
        },
        "codes": {"raw": q, "aligned": q},
        "rankers": {v: {"best_epoch": [1, 2, 1], "n_params": 1000} for v in variants},
        "counts": {s: ms(100) for s in SUBSETS},
        "config": EvalConfig().model_dump(mode="json"),
        "seconds": {"total": 60.0},
        "aims": {
            "warm_D_minus_A": {"mean": 0.03, "std": 0.01, "target": 0.015, "met": True, "gap": 0.0},
            "cold_D_minus_B": {
                "mean": -0.002,
                "std": 0.01,
                "target": 0.0,
                "met": False,
                "gap": -0.002,
            },
        },
    }


def _fake_data():
    return {"name": "shop", "repo": "shop", "n_items": 10, "id_kind": "string", "n_events": 90,
            "n_users": 5, "label": "every logged event is a positive", "content": "`{title}`"}  # fmt: skip


def test_write_report_files_and_json_layout(tmp_path):
    paths = write_report(_fake_out(), tmp_path)
    data = json.loads(paths["json"].read_text())
    for v in ("A", "B", "C", "D", "E", "D_vq", "D_rq"):
        for s in SUBSETS:
            for m in METRICS:
                leaf = data["results"][v][s][m]
                assert set(leaf) >= {"mean", "std"}
    assert data["command"] == "qarm evaluate"
    md = paths["md"].read_text()
    assert "`qarm evaluate`" in md and "| D |" in md and "**met**" in md
    assert "**not met** (short by 0.0020)" in md
    assert "## History" in md and "docs/evaluation-history.md" in md  # the demo's report only
    other = write_report({**_fake_out(), "data": _fake_data()}, tmp_path, name="shop")
    md = other["md"].read_text()
    assert "# QARM on shop" in md and "## History" not in md and "| warm | cold | new |" not in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp file


def test_selection_adopts_only_when_the_summed_cold_interval_excludes_zero():
    """The rule reads the per-seed sums of D's and B+D's cold deltas: a positive mean inside
    its noise (the 3-seed ``mlp_aligner`` case) is not adopted; a clear gain is; a warm
    loss or a single seed (no interval) vetoes."""
    from qarm_features.app.evaluate import _summed_delta, adopt

    def seeds(cold_d, cold_bd, warm=0.0):
        return [
            {v: {"cold": {"auc": c}, "warm": {"auc": warm}} for v, c in (("D", d), ("B+D", b))}
            for d, b in zip(cold_d, cold_bd)
        ]

    noisy = {"summed_delta": _summed_delta(seeds([0.004, -0.003, 0.001], [0.002, -0.004, 0.001]))}
    assert noisy["summed_delta"]["cold"]["mean"] > 0 and not adopt(noisy)
    clear = {"summed_delta": _summed_delta(seeds([0.010, 0.012, 0.011], [0.008, 0.009, 0.010]))}
    assert clear["summed_delta"]["cold"]["ci"][0] > 0 and adopt(clear)
    warm_loss = _summed_delta(seeds([0.010, 0.012, 0.011], [0.008, 0.009, 0.010], warm=-0.002))
    assert not adopt({"summed_delta": warm_loss})
    assert not adopt({"summed_delta": _summed_delta(seeds([0.01], [0.01]))})


def test_run_protocol_end_to_end_tiny(tmp_path):
    """The whole protocol (pairs, aligner, codes, rankers, ablation, report) on tiny data."""
    from qarm_features.app.evaluate import CONTRASTS, run_protocol
    from qarm_features.app.protocol import Ablation
    from qarm_features.config import AlignerConfig, PairsConfig, RQConfig, VQConfig

    item_ids, raw, df = _world(n_items=80, n_users=60, n_rows=3000, seed=2)
    cfg = EvalConfig(
        history_len=3,
        dim=4,
        epochs=1,
        batch_size=512,
        pairs=PairsConfig(mf_dim=4, mf_epochs=2),
        aligner=AlignerConfig(out_dim=4, hidden=0, max_epochs=2, patience=1, batch_size=64),
        rq=RQConfig(n_levels=2, n_codes=4, n_iter=5),
        vq=VQConfig(k=3),
        variants=("A", "B", "D", "B+D"),
        ablations={
            "mlp": Ablation(description="mlp", aligner={"hidden": 8}, variants=("D",)),
            "levels": Ablation(description="levels", ranker={"rq_mode": "level"}, variants=("D",)),
        },
        selection_seeds=(0,),
        candidates={
            "content": Ablation(description="content codes", ranker={"content_codes": True}),
            "mlp": Ablation(description="mlp aligner", aligner={"hidden": 8}),
        },
    )
    out = run_protocol(item_ids, raw, df, cfg, seeds=(0, 1))
    # paired differences with 95% intervals, on every subset, AUC and GAUC
    per = [p["results"] for p in out["per_seed"]]
    cell = out["paired"]["D - A"]["cold"]["auc"]
    diffs = [r["D"]["cold"]["auc"] - r["A"]["cold"]["auc"] for r in per]
    assert cell["mean"] == pytest.approx(np.mean(diffs))
    assert cell["ci_method"] == "t over seeds" and cell["ci"] == cell["t_ci"]
    assert cell["ci"][0] <= cell["mean"] <= cell["ci"][1] and cell["boot_ci"] is not None
    assert set(out["paired"]) == {"B - A", "D - A", "B+D - A", "D - B", "B+D - B"}
    for name in out["paired"]:
        assert set(out["paired"][name]) == set(SUBSETS)
    assert out["aims"]["cold_D_minus_B"]["ci"] == out["paired"]["D - B"]["cold"]["auc"]["ci"]
    # candidates are measured on the validation split only, paired with the main run there
    sel = out["selection"]
    assert sel["seeds"] == [0] and set(sel["candidates"]) == {"content", "mlp"}
    assert sel["candidates"]["content"]["alignment"] is None  # ranker-only
    assert sel["candidates"]["mlp"]["alignment"] is not None  # refits the aligner
    for c in sel["candidates"].values():
        assert set(c["delta_vs_main"]) == {"D", "B+D"}
        assert c["summed_delta"]["cold"]["ci"] is None and c["adopt"] is False  # one seed
        assert set(c["contrasts"]) == set(CONTRASTS)
    assert set(sel["main"]["results"]) == {"A", "B", "D", "B+D"}
    for v in ("A", "D"):
        for s in SUBSETS:
            assert out["results"][v][s]["auc"]["n"] == 2
    assert set(out["ablations"]) == {"mlp", "levels"}
    assert out["ablations"]["mlp"]["alignment"] is not None
    assert out["ablations"]["levels"]["alignment"] is None  # ranker-only: same spaces
    assert "D" in out["ablations"]["levels"]["delta_vs_main"]
    assert 0 <= out["codes"]["aligned"]["collision_rate"]["mean"] <= 1
    # aggregates are the per-seed values' mean and paired differences
    per = [p["results"] for p in out["per_seed"]]
    d_auc = [r["D"]["cold"]["auc"] - r["A"]["cold"]["auc"] for r in per]
    assert out["deltas_vs_A"]["D"]["cold"]["auc"]["mean"] == pytest.approx(np.mean(d_auc))
    assert out["deltas_vs_A"]["A"]["all"]["auc"]["mean"] == 0.0
    mean_d = np.mean([r["D"]["warm"]["gauc"] for r in per])
    assert out["results"]["D"]["warm"]["gauc"]["mean"] == pytest.approx(mean_d)
    # aims: paired per-seed contrasts, with target, status and gap
    assert out["aims"]["warm_D_minus_A"]["mean"] == pytest.approx(
        out["results"]["D"]["warm"]["auc"]["mean"] - out["results"]["A"]["warm"]["auc"]["mean"]
    )
    bd = [r["B+D"]["cold"]["auc"] - r["B"]["cold"]["auc"] for r in per]
    assert out["aims"]["cold_BD_minus_B"]["std"] == pytest.approx(np.std(bd, ddof=1))
    assert out["aims"]["cold_BD_minus_B"]["target"] == 0.005
    assert out["aims"]["unseen_pair_auc"]["target"] == 0.70
    for a in out["aims"].values():
        assert a["met"] == (a["gap"] == 0.0)
    paths = write_report(out, tmp_path)
    md = paths["md"].read_text()
    assert "## Test-split ablations" in md and "## Candidates (validation split" in md
    assert "Seeds that chose nothing at all (neither split): [1]" in md
    # the second ranker (deepctr-torch's DeepFM): every variant, paired, aims, its section;
    # selection ran on our ranker only
    fm = out["other_rankers"]["deepfm"]
    assert set(fm["results"]) == {"A", "B", "D", "B+D"} and set(fm["paired"]) == set(out["paired"])
    assert fm["results"]["D"]["cold"]["auc"]["n"] == 2 and fm["results"] != out["results"]
    assert fm["paired"]["D - B"]["cold"]["auc"]["ci"] == fm["aims"]["cold_D_minus_B"]["ci"]
    assert "unseen_pair_auc" not in fm["aims"]  # the alignment's aim is the main section's
    assert "rq_prefix1" in fm["training"]["D"]["inputs"] and "vq" in fm["training"]["D"]["inputs"]
    assert "dense" in fm["training"]["B+D"]["inputs"]
    assert md.count("## DeepFM (deepctr-torch ") == 1 and md.count("**cold rows**") == 2
    assert md.count("### Paired differences") == 1 and md.count("### Aims") == 1
    assert set(sel["main"]["results"]) == {"A", "B", "D", "B+D"} and "other_rankers" not in sel
    assert "## Paired differences" in md and "**new rows**" in md and "| D − B |" in md
    with pytest.raises(InputError, match="baseline"):
        run_protocol(item_ids, raw, df, cfg.model_copy(update={"variants": ("D",)}), seeds=(0,))


def test_repo_config_takes_the_label_and_sections_from_qarm_yaml(tmp_path):
    """The protocol of a repo: qarm.yaml's item-space sections and label; sampled
    negatives only for an implicit log; the report named after `dataset` or the folder."""
    from types import SimpleNamespace

    from qarm_features.app.evaluate import report_name
    from qarm_features.app.protocol import IMPLICIT_NEGATIVES, QUICK, repo_config
    from qarm_features.project import parse_project

    base = {"catalog": {"path": "items.parquet", "text": "{title}"}}
    events = {"path": "clicks.parquet", "rating": {"column": "stars", "threshold": 3}}
    build = {"aligner": {"out_dim": 16}, "rq": {"n_levels": 2, "n_codes": 8}}
    explicit = parse_project({**base, "events": events, "build": build}, tmp_path / "shop")
    data = SimpleNamespace(project=explicit, config=explicit.build, threshold=3.0)
    cfg = repo_config(data)
    assert cfg.positive_threshold == 3.0 and cfg.negatives_per_positive == 0
    assert cfg.aligner.out_dim == 16 and cfg.rq.n_levels == 2
    assert report_name(explicit) == "shop"
    implicit = parse_project({**base, "events": {"path": "c.parquet"}}, tmp_path / "x")
    data = SimpleNamespace(project=implicit, config=implicit.build, threshold=1.0)
    quick = repo_config(data, quick=True)
    assert quick.negatives_per_positive == IMPLICIT_NEGATIVES
    assert quick.variants == QUICK["variants"] and quick.selection_seeds == ()
    named = parse_project({**base, "events": events, "dataset": "movielens-100k"}, tmp_path)
    assert report_name(named) == "movielens-100k"
