"""The protocol's item spaces: the QARM pipeline on one seed's train rows, plus raw codes.

Per seed, on train-visible rows only: the pairs (a repo's miner, :class:`Route`: the team's
I2I table and retrieval embeddings as ``qarm build --repo`` uses them), the content
(frozen, or the text encoder fine-tuned on those train pairs), then
:func:`qarm_features.build.pipeline.fit_item_space` (the pipeline ``qarm build`` runs) trains the
aligner (early stopping on the pairs
of ``aligner.val_fraction`` of the paired items, drawn with seed ``seed + 1000``) and fits
RQ codebooks and the VQ pool on *warm* items (items with a train row). The raw baseline
(variant C) gets codes at the same L x K: RQ on a PCA of the L2-normalised raw space to
the aligned width (re-normalised), VQ on the full raw space, same warm pool.
Alignment quality is measured on pairs mined from the *test* period
(:func:`alignment_metrics`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qarm_features._validate import check_embeddings, check_ids, l2_normalize, lookup_rows
from qarm_features.app.protocol import EvalConfig, Split
from qarm_features.build.pipeline import (
    code_report,
    fit_item_space,
    fit_quantizers,
    space_metrics,
)

# Offset of the aligner's validation-item draw from the run's seed, so that it is
# independent of the cold-item draw, which uses the seed itself.
VAL_SEED_OFFSET = 1000


@dataclass
class Route:
    """How a catalog's item spaces are made from a split's train rows (the build route).

    Attributes:
        mine: ``mine(train_interactions, build_config) -> (pairs, stats)``; None: the
            pipeline's own miner (:func:`qarm_features.build.ray_pairs.mine_pairs_by_config`).
        content: ``content(train_pairs) -> (n, d) raw embeddings``; None: the ``raw_emb``
            given to :func:`build_item_spaces` (a frozen space, the same every seed).
    """

    mine: Callable | None = None
    content: Callable | None = None


@dataclass
class ItemSpaces:
    """Per-seed item representations for every catalog row."""

    raw: np.ndarray  # (n, d_raw) L2-normalised frozen embedding
    aligned: np.ndarray  # (n, d_out)
    raw_rq: np.ndarray
    raw_vq: np.ndarray
    aligned_rq: np.ndarray
    aligned_vq: np.ndarray
    vq_pool_ids: np.ndarray
    n_codes: int
    report: dict
    # Content of the codes (ranking.QarmEmbedding's content initialisation): RQ codebooks
    # (L, K, d) and VQ pool embeddings (rows in vq_pool_ids order) of each space.
    raw_codebooks: np.ndarray | None = None
    aligned_codebooks: np.ndarray | None = None
    raw_pool_emb: np.ndarray | None = None
    aligned_pool_emb: np.ndarray | None = None


def build_item_spaces(
    item_ids, raw_emb, split: Split, cfg: EvalConfig, seed: int, route: Route | None = None
) -> ItemSpaces:
    """Mine pairs on train, train the aligner, fit codes (warm items only), measure them.

    ``route``: the repo's miner and content (:class:`Route`); ``raw_emb`` may then be None
    when ``route.content`` makes it from the train pairs.
    """
    from sklearn.decomposition import PCA

    from qarm_features.build.ray_pairs import mine_pairs_by_config

    route = route or Route()
    item_ids = check_ids(item_ids, name="item_ids")
    bcfg = cfg.build_config(seed)
    mined, mine_s = None, 0.0
    if route.mine is not None or route.content is not None:
        mine = route.mine or (lambda df, c: mine_pairs_by_config(df, c.pairs))
        t0 = time.perf_counter()
        mined = mine(split.train, bcfg)
        mine_s = time.perf_counter() - t0  # the pipeline times only what it mines itself
    if route.content is not None:
        raw_emb = route.content(mined[0])
    raw = l2_normalize(check_embeddings(raw_emb, name="raw_emb", dim=None))
    space = fit_item_space(
        raw,
        item_ids,
        split.train,
        bcfg,
        heldout_fraction=0.0,  # held-out pairs come from the test period instead
        val_seed=seed + VAL_SEED_OFFSET,
        pool_items=split.warm_items,
        mined=mined,
    )
    aligned = space.aligned
    warm_rows = lookup_rows(split.warm_items, item_ids, name="warm items")
    pca = PCA(n_components=aligned.shape[1], random_state=seed).fit(raw[warm_rows])
    raw_low = l2_normalize(pca.transform(raw).astype(np.float32))
    rq_r, vq_r = fit_quantizers(raw_low, item_ids, bcfg.rq, bcfg.vq, pool_rows=warm_rows, vq_x=raw)
    raw_rq = rq_r.encode(raw_low)
    raw_vq = vq_r.encode(raw, exclude_ids=item_ids)
    history = space.aligner.history_
    report = {
        "pairs": {k: v for k, v in space.pair_stats.items() if not isinstance(v, dict)},
        "aligner": {k: v for k, v in history.items() if np.isscalar(v)},
        "alignment": alignment_metrics(
            item_ids, raw, aligned, space.pairs, split, bcfg.pairs, seed
        ),
        "codes": {
            "raw": code_report(rq_r, raw_low, codes=raw_rq, pool_rows=warm_rows),
            "aligned": space.metrics["codes"]["aligned"],
        },
        "seconds": {
            "pairs_aligner": space.timings.get("pairs_s", mine_s) + space.timings["aligner_s"]
        },
    }
    return ItemSpaces(
        raw=raw,
        aligned=aligned,
        raw_rq=raw_rq,
        raw_vq=raw_vq,
        aligned_rq=space.rq_codes,
        aligned_vq=space.vq_codes(),
        vq_pool_ids=space.pool_ids,
        n_codes=bcfg.rq.n_codes,
        report=report,
        raw_codebooks=rq_r.codebooks_,
        aligned_codebooks=space.rq.codebooks_,
        raw_pool_emb=raw[lookup_rows(space.pool_ids, item_ids, name="VQ pool")],
        aligned_pool_emb=aligned[lookup_rows(space.pool_ids, item_ids, name="VQ pool")],
    )


def alignment_metrics(item_ids, raw, aligned, train_pairs, split: Split, pcfg, seed) -> dict:
    """Held-out pair recall@10 / pair-AUC, raw vs aligned.

    Held-out pairs are mined from the *test* period with the same miner, minus any
    unordered pair also mined from train. ``unseen`` keeps the pairs touching an item that
    appears in no train pair (cold items mostly): the aligner never saw it.
    """
    from qarm_features.build.ray_pairs import mine_pairs_by_config

    test_pairs, _ = mine_pairs_by_config(split.test, pcfg)
    key = lambda a, b: np.minimum(a, b) * (1 << 32) + np.maximum(a, b)
    tr_key = key(train_pairs["trigger_id"].to_numpy(), train_pairs["target_id"].to_numpy())
    te_key = key(test_pairs["trigger_id"].to_numpy(), test_pairs["target_id"].to_numpy())
    held = test_pairs[~np.isin(te_key, tr_key)]
    seen = np.union1d(train_pairs["trigger_id"], train_pairs["target_id"])
    unseen = held[~(held["trigger_id"].isin(seen) & held["target_id"].isin(seen))]
    pop = pd.concat([split.train, split.test])["item_id"].value_counts()
    out: dict = {}
    for name, pairs in (("heldout", held), ("unseen", unseen)):
        out[name] = {"n_pairs": len(pairs)}
        for space, emb in (("raw", raw), ("aligned", aligned)):
            m = space_metrics(emb, item_ids, pairs, pop, seed=seed)
            out[name][space] = {"recall@10": m["recall@10"], "pair_auc": m["pair_auc"]}
    return out


def repo_route(data, *, cache_dir=None) -> Route:
    """The build route's pair miner and content for ``data`` (:func:`read_repo`'s):
    ``mine`` with the team's I2I table and retrieval embeddings, ``repo_content`` on the
    train pairs (the frozen encoder's embeddings are computed once and reused)."""
    import shutil
    import tempfile

    from qarm_features.build.repo import mine, repo_content

    frozen: dict = {}

    def content(pairs):
        if data.config.encoder.finetune_layers == 0:
            if "raw" not in frozen:
                frozen["raw"] = repo_content(data, cache_dir=cache_dir)[0]
            return frozen["raw"]
        tmp = Path(tempfile.mkdtemp(prefix="qarm-eval-encoder-"))
        try:  # a fine-tuned encoder per split: its train pairs only
            return repo_content(
                data, pairs=pairs, encoder_dir=tmp / "encoder", cache_dir=cache_dir
            )[0]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return Route(
        mine=lambda interactions, cfg: mine(data.project, interactions, data.keys, cfg),
        content=content,
    )
