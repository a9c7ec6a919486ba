"""One offline pipeline from a catalog and its interactions to a fitted QARM item space.

:func:`fit_item_space` is what ``qarm build`` (:mod:`qarm_features.build.bundles`) and
``qarm evaluate`` (:mod:`qarm_features.app.evaluate`) both run::

    interactions -> <trigger, target> pairs (U2I + Swing)             pairs.mine_pairs
    pairs -> held-out items (every pair touching one leaves training)  split_test_items
    raw_emb + train pairs -> aligner (InfoNCE, early stopping)        align.ItemAligner
    weights -> aligned embeddings, numpy float64 forward               encode.align_with_weights
    aligned (pool items) -> RQ codebooks + VQ pool                    quantize
    -> metrics: pair stats, held-out pair recall@10 / pair-AUC (raw vs aligned), aligner
       history, code quality, and the alignment check: aligned vs raw held-out pair-AUC,
       paired, with a bootstrap interval over held-out items (alignment_check; what a
       build then says or refuses: build.check_alignment)

The aligned embeddings come from :func:`qarm_features.bundle.encode.align_with_weights`, the
forward the serving path runs, so codes computed here are bit-identical with served ones.
Everything is seeded by the :class:`~qarm_features.config.BuildConfig` sections
(:meth:`~qarm_features.config.BuildConfig.with_seed` sets them all at once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from qarm_features._validate import (
    check_columns,
    check_embeddings,
    check_ids,
    draw_items,
    l2_normalize,
    lookup_rows,
)
from qarm_features.codes.rq import ResidualQuantizer
from qarm_features.codes.vq import VQCoder
from qarm_features.config import BuildConfig, RQConfig, VQConfig
from qarm_features.errors import InputError
from qarm_features.progress import ProgressCallback, count_records, stage

logger = logging.getLogger(__name__)

StepCallback = Callable[[str], None]


@dataclass
class ItemSpace:
    """A fitted item space: what :func:`fit_item_space` returns.

    Attributes:
        item_ids: ``(n,)`` int64 catalog ids; rows of every array below.
        raw: ``(n, d_raw)`` float32 raw embeddings, as given.
        aligned: ``(n, d_out)`` float32 aligned embeddings (the served forward).
        aligner: the fitted :class:`~qarm_features.align.aligner.ItemAligner` (``weights_``,
            ``history_``).
        rq: fitted :class:`~qarm_features.codes.rq.ResidualQuantizer` (pool items).
        vq: fitted :class:`~qarm_features.codes.rq.VQCoder` (pool: the pool items).
        rq_codes: ``(n, L)`` int64 RQ codes of every catalog item.
        pool_ids: ``(m,)`` int64 ids the codebooks and the VQ pool were fitted on.
        pairs: every mined pair ``[trigger_id, target_id, score, source]``.
        train_pairs: the pairs the aligner saw.
        heldout_pairs: pairs touching a held-out item (never seen by the aligner).
        heldout_items: ``(h,)`` int64 held-out item ids.
        pair_stats: :func:`~qarm_features.pairs.mining.mine_pairs` stats.
        metrics: ``pairs``, ``heldout_items``, ``heldout`` (``raw``/``aligned``:
            ``recall@10``, ``pair_auc``, ``n_pairs``), ``aligner`` (scalar history),
            ``codes`` (``aligned``: :func:`code_report`), ``vq_ann_recall``,
            ``alignment_check`` (:func:`alignment_check`; only with held-out pairs).
        timings: seconds per stage (``pairs_s``, ``aligner_s``, ``codes_s``).
        stages: per stage (``pairs``, ``aligner``, ``forward``, ``codes``, ``evaluate``)
            ``seconds`` and ``peak_rss_mib`` (:func:`qarm_features.progress.stage`).
    """

    item_ids: np.ndarray
    raw: np.ndarray
    aligned: np.ndarray
    aligner: object
    rq: object
    vq: object
    rq_codes: np.ndarray
    pool_ids: np.ndarray
    pairs: pd.DataFrame
    train_pairs: pd.DataFrame
    heldout_pairs: pd.DataFrame
    heldout_items: np.ndarray
    pair_stats: dict
    metrics: dict
    timings: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)

    @property
    def weights(self) -> dict[str, np.ndarray]:
        """The aligner's exported weights (the bundle's ``aligner.safetensors``)."""
        return self.aligner.weights_

    def vq_codes(self, x: np.ndarray | None = None) -> np.ndarray:
        """``(n, K)`` int64 VQ codes of ``x`` (default: every catalog item, itself excluded)."""
        if x is None:
            return self.vq.encode(self.aligned, exclude_ids=self.item_ids)
        return self.vq.encode(x)


# --------------------------------------------------------------------------- pieces
def split_test_items(item_ids: np.ndarray, pairs: pd.DataFrame, fraction: float, seed: int):
    """Pick ``fraction`` of the items that appear in pairs as held-out test items.

    Returns ``(train_pairs, test_pairs, test_items)``: every pair touching a test item is
    a test pair, so the aligner never sees a test item in training.
    """
    in_pairs = np.concatenate([pairs["trigger_id"], pairs["target_id"]])
    test_items = draw_items(in_pairs, fraction, seed)
    touches = pairs["trigger_id"].isin(test_items) | pairs["target_id"].isin(test_items)
    return pairs[~touches].reset_index(drop=True), pairs[touches].reset_index(drop=True), test_items


def choose_val_items(pairs: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """``round(fraction * n)`` of the ``n`` items in ``pairs``, drawn with ``default_rng(seed)``."""
    return draw_items(
        np.r_[pairs["trigger_id"].to_numpy(), pairs["target_id"].to_numpy()], fraction, seed
    )


def item_popularity(interactions: pd.DataFrame, item_ids: np.ndarray) -> np.ndarray:
    """Interaction count per item, aligned with ``item_ids``."""
    counts = interactions["item_id"].value_counts()
    return counts.reindex(item_ids, fill_value=0).to_numpy(np.int64)


def sample_pairs(pairs: pd.DataFrame, max_pairs: int | None, seed: int) -> pd.DataFrame:
    """At most ``max_pairs`` of ``pairs`` (a seeded draw, original order kept); all of
    them when there are no more than that, or ``max_pairs`` is None."""
    if max_pairs is None or len(pairs) <= max_pairs:
        return pairs
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(pairs), size=int(max_pairs), replace=False))
    return pairs.iloc[rows].reset_index(drop=True)


def space_metrics(
    emb,
    item_ids,
    pairs,
    popularity,
    *,
    seed: int = 0,
    max_pairs: int | None = None,
    recall_budget: int | None = None,
) -> dict:
    """Pair recall@10 and popularity-matched pair-AUC of ``pairs`` in an embedding space.

    Args:
        max_pairs: measure on a seeded sample of at most this many pairs (None: all).
        recall_budget: recall@10 scores each sampled pair's trigger against every item:
            it samples at most ``recall_budget // n_items`` of them (None: no cap).

    Returns:
        ``recall@10``, ``pair_auc``, ``n_pairs`` (all the pairs given) and, when a sample
        was drawn, ``n_pairs_auc`` / ``n_pairs_recall`` (the pairs each was measured on).
    """
    from qarm_features.metrics import pair_auc, pair_recall_at_k

    if len(pairs) == 0:
        return {"recall@10": float("nan"), "pair_auc": float("nan"), "n_pairs": 0}
    auc_pairs = sample_pairs(pairs, max_pairs, seed)
    cap = None if recall_budget is None else max(1, recall_budget // max(len(item_ids), 1))
    recall_pairs = sample_pairs(auc_pairs, cap, seed)
    out = {
        "recall@10": float(pair_recall_at_k(emb, item_ids, recall_pairs, k=10)),
        "pair_auc": float(pair_auc(emb, item_ids, auc_pairs, popularity, seed=seed)),
        "n_pairs": len(pairs),
    }
    if len(auc_pairs) < len(pairs) or len(recall_pairs) < len(pairs):
        out.update(n_pairs_auc=len(auc_pairs), n_pairs_recall=len(recall_pairs))
    return out


def alignment_check(
    raw_norm: np.ndarray,
    aligned: np.ndarray,
    item_ids: np.ndarray,
    heldout_pairs: pd.DataFrame,
    heldout_items: np.ndarray,
    popularity,
    *,
    seed: int = 0,
    max_pairs: int | None = None,
) -> dict:
    """Is the aligned space better than the raw one on pairs of items the aligner never saw?

    Both spaces face the same held-out pairs (the seeded ``max_pairs`` sample the held-out
    metrics use) and negatives; the difference of their pair-AUCs gets a 95% interval from
    a bootstrap over held-out items (:func:`qarm_features.metrics.pair_auc_difference`).

    Returns:
        ``raw``, ``aligned`` (pair-AUC), ``delta`` (aligned - raw), ``ci`` ([low, high]),
        ``n_pairs``, ``n_items`` (held-out items the pairs touch), ``verdict``:
        ``better`` (the interval is above 0), ``inconclusive`` (delta > 0, the interval
        reaches 0), ``not_better`` (delta <= 0) or ``unmeasured`` (no held-out pair).
    """
    from qarm_features.metrics import pair_auc_difference

    pairs = sample_pairs(heldout_pairs, max_pairs, seed)
    pairs = pairs[pairs["trigger_id"].to_numpy() != pairs["target_id"].to_numpy()]
    trig = pairs["trigger_id"].to_numpy(np.int64)
    owner = np.where(np.isin(trig, heldout_items), trig, pairs["target_id"].to_numpy(np.int64))
    out = pair_auc_difference(
        raw_norm, aligned, item_ids, pairs, popularity, clusters=owner, seed=seed
    )
    out = {"raw": out.pop("a"), "aligned": out.pop("b"), **out}
    if out["delta"] is None:
        return {**out, "verdict": "unmeasured"}
    better = out["ci"][0] > 0
    out["verdict"] = "better" if better else ("inconclusive" if out["delta"] > 0 else "not_better")
    return out


# Rows per block of the catalog-wide aligner forward: the float64 temporaries of a block
# (~200 MiB at 384-d) bound its memory; a catalog up to this size is one block (the
# result is the forward of the whole matrix, bit for bit).
FORWARD_CHUNK = 65_536


def align_catalog(weights: dict, raw: np.ndarray, *, chunk: int = FORWARD_CHUNK, advance=None):
    """:func:`qarm_features.bundle.encode.align_with_weights` over ``raw`` in row blocks:
    ``(n, d_raw)`` float32 -> ``(n, d_out)`` float32 with float64 temporaries of one block
    only. ``advance(rows)`` is called after each block."""
    from qarm_features.bundle.encode import align_with_weights

    n = raw.shape[0]
    out = None
    for lo in range(0, n, chunk):
        block = align_with_weights(weights, raw[lo : lo + chunk])
        if out is None:
            if block.shape[0] == n:
                out = block
            else:
                out = np.empty((n, block.shape[1]), np.float32)
        if out is not block:
            out[lo : lo + block.shape[0]] = block
        if advance is not None:
            advance(block.shape[0])
    return out if out is not None else align_with_weights(weights, raw)


def fit_quantizers(
    x: np.ndarray,
    item_ids: np.ndarray,
    rq_cfg: RQConfig,
    vq_cfg: VQConfig,
    *,
    pool_rows: np.ndarray | None = None,
    vq_x: np.ndarray | None = None,
    init_codebooks: np.ndarray | None = None,
):
    """RQ codebooks on ``x[pool_rows]`` and a VQ pool of ``vq_x[pool_rows]`` (default ``x``).

    Returns:
        ``(rq, vq)``: a fitted :class:`~qarm_features.codes.rq.ResidualQuantizer` and
        :class:`~qarm_features.codes.rq.VQCoder`.
    """
    rows = slice(None) if pool_rows is None else pool_rows
    rq = ResidualQuantizer.from_config(rq_cfg).fit(x[rows], init_codebooks=init_codebooks)
    vx = x if vq_x is None else vq_x
    vq = VQCoder.from_config(vq_cfg).fit(vx[rows], item_ids[rows])
    return rq, vq


def _init(warm, rq_cfg: RQConfig):
    """The previous codebooks as k-means starts, when their shape fits this config."""
    if warm is None:
        return None
    cb = np.asarray(warm[1])
    return cb[: rq_cfg.n_levels] if cb.shape[1] == rq_cfg.n_codes else None


def code_report(rq, x: np.ndarray, *, codes=None, pool_rows=None) -> dict:
    """Code quality of an RQ coder: utilization, entropy, collisions of the codes of every
    row of ``x`` (``codes`` when already computed), residual energy on the pool rows."""
    from qarm_features.metrics import code_quality

    codes = rq.encode(x) if codes is None else codes
    out = dict(code_quality(codes, rq.n_codes))
    pool = x if pool_rows is None else x[pool_rows]
    out["reconstruction_error"] = float(rq.reconstruction_error(pool))
    return out


def _check_inputs(item_ids, raw_emb, interactions):
    ids = check_ids(item_ids, name="item_ids")
    raw = check_embeddings(raw_emb, name="raw_emb")
    if raw.shape[0] != ids.shape[0]:
        raise InputError(f"raw_emb has {raw.shape[0]} rows but item_ids has {ids.shape[0]}")
    check_columns(interactions, ["user_id", "item_id", "rating", "timestamp"], name="interactions")
    unknown = ~interactions["item_id"].isin(ids)
    if unknown.any():
        bad = interactions.loc[unknown, "item_id"].unique()[:5].tolist()
        raise InputError(f"interactions name item ids {bad} that are not in the catalog")
    return ids, raw


# --------------------------------------------------------------------------- pipeline
def fit_item_space(
    raw_emb,
    item_ids,
    interactions: pd.DataFrame,
    config: BuildConfig | None = None,
    *,
    heldout_fraction: float = 0.1,
    val_seed: int | None = None,
    pool_items=None,
    mined: tuple[pd.DataFrame, dict] | None = None,
    warm: tuple[dict, np.ndarray] | None = None,
    on_step: StepCallback | None = None,
    progress: bool = False,
    on_progress: ProgressCallback | None = None,
) -> ItemSpace:
    """Mine pairs, hold items out, train the aligner, fit RQ/VQ codes and measure them.

    Args:
        raw_emb: ``(n, d_raw)`` frozen content embeddings of the catalog.
        item_ids: ``(n,)`` catalog ids.
        interactions: ``user_id, item_id, rating, timestamp`` rows (items in the catalog);
            the only behaviour the pipeline sees.
        config: the build configuration (defaults: :class:`BuildConfig`); ``config.seed``
            seeds the held-out item draw, each section seeds its own stage.
        heldout_fraction: items (among those in pairs) whose pairs the aligner never sees;
            the ``heldout`` metrics are measured on their pairs. 0 holds nothing out.
        val_seed: ``None``: the aligner draws its early-stopping items itself
            (``config.aligner.val_fraction``, ``config.aligner.seed``); an int: they are
            drawn by :func:`choose_val_items` with this seed (the evaluation protocol's draw).
        pool_items: ids whose aligned embeddings fit the RQ codebooks and form the VQ pool
            (default: the whole catalog; the evaluation passes its warm items).
        mined: ``(pairs, stats)`` already mined (e.g. with a team's own I2I table and
            retrieval embeddings, :func:`qarm_features.pairs.mining.mine_pairs`), whose
            time the caller reports; None mines them from ``interactions`` with
            ``config.pairs`` (step "mining pairs", stage ``pairs``, ``pairs_s``).
        warm: ``(aligner weights, RQ codebooks)`` of the previous bundle: the aligner and
            each level's k-means start from them (a warm start keeps codes stable).
        on_step: called with a short label as each stage starts (CLI progress).
        progress: log each aligner epoch at INFO level.
        on_progress: ``on_progress(stage, total, advance)`` for the stages ``pairs``,
            ``aligner`` (epochs), ``forward`` (rows), ``codes``, ``evaluate``; each stage
            also logs its seconds and peak RSS (:mod:`qarm_features.progress`).

    Returns:
        The fitted :class:`ItemSpace` (``timings["stages"]``: per stage ``seconds`` and
        ``peak_rss_mib``).

    Raises:
        InputError: malformed catalog or interactions, interactions naming items that are
            not in the catalog, or no pair mined.
    """
    from qarm_features.align.aligner import ItemAligner
    from qarm_features.build.ray_pairs import mine_pairs_by_config

    cfg = config or BuildConfig()
    step = on_step or (lambda _label: None)
    ids, raw = _check_inputs(item_ids, raw_emb, interactions)

    timings: dict[str, float] = {}
    stages: dict[str, dict] = {}
    run = {"progress": on_progress, "records": stages, "logger": logger}
    if mined is not None:  # mined, shown and timed by the caller (build_from_repo)
        pairs, pair_stats = mined
    else:
        step("mining pairs")
        with stage("pairs", **run):
            pairs, pair_stats = mine_pairs_by_config(interactions, cfg.pairs)  # engine: config
        timings["pairs_s"] = stages["pairs"]["seconds"]
    if len(pairs) == 0:
        raise InputError("pair mining found no pairs; are there positives (rating >= threshold)?")
    train_pairs, test_pairs, test_items = split_test_items(ids, pairs, heldout_fraction, cfg.seed)
    val_items = None
    if val_seed is not None:
        val_items = choose_val_items(train_pairs, cfg.aligner.val_fraction, val_seed)

    step("training aligner")
    epochs = stage("aligner", total=cfg.aligner.max_epochs, **run)
    with epochs as s, count_records("qarm_features.align.aligner", "aligner epoch", s.advance):
        aligner = ItemAligner(cfg.aligner).fit(
            raw,
            ids,
            train_pairs,
            val_items=val_items,
            init_weights=None if warm is None else warm[0],
            progress=progress,
        )
    timings["aligner_s"] = stages["aligner"]["seconds"]
    # The aligned space served later is the numpy forward of the exported weights.
    with stage("forward", total=len(ids), **run) as s:
        aligned = align_catalog(aligner.weights_, raw, advance=s.advance)

    step("fitting codes")
    with stage("codes", **run):
        pool_rows = None
        if pool_items is not None:
            pool_rows = lookup_rows(
                check_ids(pool_items, name="pool_items"), ids, name="pool_items"
            )
        rq, vq = fit_quantizers(
            aligned, ids, cfg.rq, cfg.vq, pool_rows=pool_rows, init_codebooks=_init(warm, cfg.rq)
        )
        rq_codes = rq.encode(aligned)
    timings["codes_s"] = stages["codes"]["seconds"]

    step("evaluating")
    with stage("evaluate", **run):
        pop = item_popularity(interactions, ids)
        raw_norm = l2_normalize(raw)
        history = aligner.history_
        metrics = {
            "pairs": pair_stats,
            "heldout_items": int(test_items.size),
            "heldout": {
                name: space_metrics(
                    emb,
                    ids,
                    test_pairs,
                    pop,
                    seed=cfg.seed,
                    max_pairs=cfg.heldout_max_pairs,
                    recall_budget=cfg.heldout_recall_budget,
                )
                for name, emb in (("raw", raw_norm), ("aligned", aligned))
            },
            "aligner": {k: v for k, v in history.items() if not isinstance(v, (list, np.ndarray))},
            "codes": {"aligned": code_report(rq, aligned, codes=rq_codes, pool_rows=pool_rows)},
            "vq_ann_recall": getattr(vq, "ann_recall_", None),
        }
        if len(test_pairs):  # the evaluation holds nothing out: it measures on test periods
            metrics["alignment_check"] = alignment_check(
                raw_norm,
                aligned,
                ids,
                test_pairs,
                test_items,
                pop,
                seed=cfg.seed,
                max_pairs=cfg.heldout_max_pairs,
            )
    return ItemSpace(
        item_ids=ids,
        raw=raw,
        aligned=aligned,
        aligner=aligner,
        rq=rq,
        vq=vq,
        rq_codes=rq_codes,
        pool_ids=ids if pool_rows is None else ids[pool_rows],
        pairs=pairs,
        train_pairs=train_pairs,
        heldout_pairs=test_pairs,
        heldout_items=test_items,
        pair_stats=pair_stats,
        metrics=metrics,
        timings=timings,
        stages=stages,
    )
