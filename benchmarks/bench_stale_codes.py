"""A ranker trained on the old codes, scored with a retrain's codes (MovieLens-100k).

The weekly retrain of issue 12: the served bundle was built on the first 90% of the train
period (by time); the retrain sees all of it. A ranker (variant D of the evaluation
protocol: item id + QARM RQ/VQ codes, content-initialised code tables) is trained on the
protocol's train rows with the *old* codes, then scores the test rows with:

- ``old``: the codes it was trained on (the reference);
- ``warm_start``: the retrain's codes, warm-started from the old bundle and relabelled to
  its ids (``qarm build --warm-start``);
- ``cold``: the retrain's codes as a plain rebuild draws them (today's default without
  ``--warm-start``);
- ``cold_matched``: a plain rebuild whose ids are relabelled only (no warm initialisation).

The AUC loss of each is ``AUC(old) - AUC(new)`` on all, warm-item and cold-item test rows,
paired per seed. VQ codes are pool item ids: the ranker's VQ vocabulary is the old pool, so
a new pool item it never saw reads nothing. Everything else follows the protocol
(:mod:`qarm_features.app.protocol`, ``EvalConfig()`` defaults).

    python -m benchmarks.bench_stale_codes [--seeds 0 1 2] [--out benchmarks/results/stale_codes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

CONTENDERS = ("warm_start", "cold", "cold_matched")


def _spaces(space, rq_codes, old, raw, n_codes):
    """The protocol's ItemSpaces of ``space``'s codes, read through ``old``'s vocabulary."""
    from qarm_features._validate import lookup_rows
    from qarm_features.app.item_spaces import ItemSpaces

    vq = space.vq_codes()
    pool_rows = lookup_rows(old.pool_ids, old.item_ids, name="VQ pool")
    return ItemSpaces(
        raw=raw,
        aligned=space.aligned,
        raw_rq=rq_codes,
        raw_vq=vq,
        aligned_rq=rq_codes,
        aligned_vq=vq,
        vq_pool_ids=old.pool_ids,  # the ranker's VQ vocabulary: the pool it was trained on
        n_codes=n_codes,
        report={},
        aligned_codebooks=old.rq.codebooks_,
        aligned_pool_emb=old.aligned[pool_rows],
    )


def run_seed(ids, raw, interactions, seed: int) -> dict:
    from qarm_features.app.item_spaces import VAL_SEED_OFFSET
    from qarm_features.app.protocol import EvalConfig, make_split
    from qarm_features.app.variants import (
        ranker_options,
        score_subsets,
        train_ranker,
        variant_items,
    )
    from qarm_features.build.pipeline import fit_item_space
    from qarm_features.build.stable import churn_codes, match_codebooks
    from qarm_features.codes.rq import ResidualQuantizer

    cfg = EvalConfig()
    split = make_split(ids, interactions, cfg, seed)
    bcfg = cfg.build_config(seed)
    train = split.train.sort_values("timestamp", kind="stable")
    first = train.iloc[: int(0.9 * len(train))]
    kw = dict(heldout_fraction=0.0, val_seed=seed + VAL_SEED_OFFSET)
    t0 = time.perf_counter()
    old = fit_item_space(raw, ids, first, bcfg, pool_items=np.unique(first["item_id"]), **kw)
    spaces = {
        "cold": fit_item_space(raw, ids, train, bcfg, pool_items=split.warm_items, **kw),
        "warm_start": fit_item_space(
            raw,
            ids,
            train,
            bcfg,
            pool_items=split.warm_items,
            warm=(old.aligner.weights_, old.rq.codebooks_),
            **kw,
        ),  # fmt: skip
    }
    spaces["cold_matched"] = spaces["cold"]

    def codes(name):
        space = spaces[name]
        if name == "cold":  # today: k-means ids as drawn
            return space.rq_codes
        books, _ = match_codebooks(space.rq.codebooks_, space.aligned, old.aligned,
                                   old.rq.codebooks_)  # fmt: skip
        return ResidualQuantizer.from_codebooks(books).encode(space.aligned)

    n_codes = bcfg.rq.n_codes
    flags = dict(vq_tied=cfg.vq_tied, content_codes=cfg.content_codes)
    ranker_kw, items, content = variant_items(
        "D", _spaces(old, old.rq_codes, old, raw, n_codes), split, **flags
    )
    ranker_kw.update(ranker_options(cfg))
    new_codes = {name: codes(name) for name in CONTENDERS}
    others = {
        name: variant_items("D", _spaces(spaces[name], c, old, raw, n_codes), split, **flags)[1]
        for name, c in new_codes.items()
    }
    t_spaces = time.perf_counter() - t0
    scores, info = train_ranker(ranker_kw, items, split, cfg, seed, content, score_with=others)
    result = {"old": score_subsets(split, scores, split.item_ids)}
    for name, s in info["scores_with"].items():
        result[name] = score_subsets(split, s, split.item_ids)
    loss = {
        name: {sub: result["old"][sub]["auc"] - result[name][sub]["auc"] for sub in result["old"]}
        for name in CONTENDERS
    }
    old_vq = old.vq_codes()
    churn = {
        name: churn_codes(c, spaces[name].vq_codes(), old.rq_codes, old_vq)
        for name, c in new_codes.items()
    }
    return {
        "seed": seed,
        "auc": {k: {sub: v[sub]["auc"] for sub in v} for k, v in result.items()},
        "auc_loss": loss,
        "churn": churn,
        "ranker_best_epoch": info["best_epoch"],
        "seconds": {"item_spaces": round(t_spaces, 1)},
    }


def run(out: Path, seeds=(0, 1, 2)) -> dict:
    import torch

    from qarm_features._validate import l2_normalize
    from qarm_features.app.evaluate import _mean_std
    from qarm_features.build.bundles import encode_catalog_text
    from qarm_features.config import BuildConfig
    from qarm_features.datasets.movielens import fetch_movielens_100k, load_movielens_100k

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ml = load_movielens_100k(fetch_movielens_100k())
    raw = l2_normalize(encode_catalog_text(ml.items["text"].tolist(), BuildConfig()))
    ids = ml.items["item_id"].to_numpy()
    per_seed = [run_seed(ids, raw, ml.interactions, s) for s in seeds]
    subsets = per_seed[0]["auc_loss"]["cold"].keys()
    summary = {
        name: {sub: _mean_std([r["auc_loss"][name][sub] for r in per_seed]) for sub in subsets}
        for name in CONTENDERS
    }
    result = {
        "data": "movielens-100k",
        "scenario": "served bundle built on the first 90% of the train period; the retrain "
        "on all of it; a variant-D ranker trained on the old codes scores the test rows",
        "auc_loss_mean_std": summary,
        "per_seed": per_seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python -m benchmarks.bench_stale_codes --seeds " + " ".join(map(str, seeds)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="benchmarks/results/stale_codes.json")
    a = p.parse_args()
    print(json.dumps(run(Path(a.out), tuple(a.seeds))["auc_loss_mean_std"], indent=2))
