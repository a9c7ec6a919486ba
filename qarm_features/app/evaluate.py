"""``qarm evaluate``: the MovieLens-100k evaluation, from data to report.

:func:`run_evaluation` regenerates ``reports/movielens-100k.{md,json,png}``;
:func:`run_protocol` runs the protocol on any catalog and interactions (no I/O). Per seed:

1. the protocol's splits and point-in-time histories (:mod:`qarm_features.app.protocol`);
2. item spaces fitted on train rows by the offline pipeline ``qarm build`` runs
   (:mod:`qarm_features.app.item_spaces` over :func:`qarm_features.build.pipeline.fit_item_space`);
3. one ranker per variant, same architecture and budget (:mod:`qarm_features.app.variants`);
4. AUC / UAUC / GAUC on all, warm-item and cold-item test rows, then mean ± std over
   seeds, paired deltas against variant A, the ablations and the issue's aims
   (:func:`check_aims`); the report is rendered by :mod:`qarm_features.app.report`.
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from qarm_features._validate import check_embeddings, check_ids
from qarm_features.app.item_spaces import ItemSpaces, build_item_spaces
from qarm_features.app.protocol import (
    QUICK,
    VARIANTS,
    EvalConfig,
    Split,
    make_split,
    make_validation_split,
)
from qarm_features.app.report import (
    METRICS,
    SUBSETS,
    development_notes,
    render_markdown,
    write_report,
)
from qarm_features.app.variants import (
    ranker_options,
    score_subsets,
    train_ranker,
    variant_items,
)
from qarm_features.errors import InputError

logger = logging.getLogger(__name__)


def _mean_std(values) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "n": int(v.size),
    }


def _aggregate(tree_list: list):
    """Mean ± std, leaf by leaf, of equally shaped nested dicts/lists of numbers."""
    first = tree_list[0]
    if isinstance(first, dict):
        return {k: _aggregate([t[k] for t in tree_list if k in t]) for k in first}
    if isinstance(first, (list, tuple)):
        return [_aggregate([t[i] for t in tree_list]) for i in range(len(first))]
    if isinstance(first, (int, float, np.floating, np.integer)) and not isinstance(first, bool):
        return _mean_std(tree_list)
    return first


def _run_variant(v: str, spaces: ItemSpaces, split: Split, cfg: EvalConfig, seed: int):
    """Train and score one variant; returns (per-subset metrics, training info)."""
    t0 = time.perf_counter()
    kw, items, content = variant_items(
        v, spaces, split, vq_tied=cfg.vq_tied, content_codes=cfg.content_codes
    )
    kw.update(ranker_options(cfg))
    scores, info = train_ranker(kw, items, split, cfg, seed, content)
    info["seconds"] = time.perf_counter() - t0
    return score_subsets(split, scores, split.item_ids), info


def _summary(per_seed_results: list[dict]) -> dict:
    """results[variant][subset][metric] = mean ± std over seeds."""
    first = per_seed_results[0]
    return {
        v: {
            s: {m: _mean_std([r[v][s][m] for r in per_seed_results]) for m in METRICS}
            for s in SUBSETS
        }
        for v in first
    }


# The paired contrasts every choice is judged on (and the aims): name ->
# (subset, variant, reference variant).
CONTRASTS = {
    "cold_D_minus_B": ("cold", "D", "B"),
    "cold_BD_minus_B": ("cold", "B+D", "B"),
    "warm_D_minus_A": ("warm", "D", "A"),
    "warm_BD_minus_B": ("warm", "B+D", "B"),
}


def _contrasts(res: dict, ref: dict | None = None) -> dict:
    """Per-seed AUC contrasts of :data:`CONTRASTS`; reference variants read from ``ref``
    (default ``res``). Contrasts whose variants are missing are skipped."""
    ref = res if ref is None else ref
    out = {}
    for name, (subset, v, w) in CONTRASTS.items():
        if v in res and w in ref:
            out[name] = res[v][subset]["auc"] - ref[w][subset]["auc"]
    return out


def adopt(candidate: dict) -> bool:
    """The selection rule, on validation paired means: a candidate beats the main
    configuration when its summed cold deltas (D and B+D) are positive and its summed warm
    deltas are not below -0.002."""
    d = candidate["delta_vs_main"]
    cold = sum(d[v]["cold"]["auc"]["mean"] for v in ("D", "B+D") if v in d)
    warm = sum(d[v]["warm"]["auc"]["mean"] for v in ("D", "B+D") if v in d)
    return bool(cold > 0 and warm >= -0.002)


def run_selection(item_ids, raw_emb, interactions, cfg: EvalConfig, *, bar=None) -> dict:
    """The main configuration and every candidate on the *validation* split.

    Per seed of ``cfg.selection_seeds``: :func:`make_validation_split` (inside the test
    split's train rows), item spaces fitted on its train rows, ``cfg.selection_variants``
    for the main configuration and each candidate's variants with its overrides. Test rows
    are never read.

    Returns:
        ``main`` (results, contrasts, alignment on validation), ``candidates`` (results,
        contrasts against the main A/B, ``delta_vs_main`` paired, alignment, ``adopt``),
        ``seeds``.
    """
    bar = bar or _NoBar()
    main_res, main_con, main_align = [], [], []
    cand_res: dict = {n: [] for n in cfg.candidates}
    cand_align: dict = {n: [] for n in cfg.candidates}
    for seed in cfg.selection_seeds:
        bar.set_description(f"validation seed {seed}: split + item spaces")
        split = make_split(item_ids, interactions, cfg, seed)
        vsplit = make_validation_split(item_ids, split, cfg, seed)
        spaces = build_item_spaces(item_ids, raw_emb, vsplit, cfg, seed)
        main_align.append(spaces.report["alignment"])
        res = {}
        for v in cfg.selection_variants:
            bar.set_description(f"validation seed {seed}: ranker {v}")
            res[v], _ = _run_variant(v, spaces, vsplit, cfg, seed)
        main_res.append(res)
        main_con.append(_contrasts(res))
        for name, cand in cfg.candidates.items():
            ccfg = cfg.with_candidate(cand)
            cspaces = spaces
            if cand.refits_space:
                bar.set_description(f"validation seed {seed}: candidate {name}: item spaces")
                cspaces = build_item_spaces(item_ids, raw_emb, vsplit, ccfg, seed)
                cand_align[name].append(cspaces.report["alignment"])
            cres = {}
            for v in cand.variants:
                bar.set_description(f"validation seed {seed}: candidate {name}: ranker {v}")
                cres[v], _ = _run_variant(v, cspaces, vsplit, ccfg, seed)
            cand_res[name].append(cres)
        bar.update(1)
    candidates = {}
    for name, cand in cfg.candidates.items():
        rs = cand_res[name]
        diffs = [
            {v: {s: {"auc": r[v][s]["auc"] - m[v][s]["auc"]} for s in SUBSETS} for v in r if v in m}
            for r, m in zip(rs, main_res)
        ]
        entry = {
            "description": cand.description,
            "aligner": cand.aligner,
            "rq": cand.rq,
            "ranker": cand.ranker,
            "results": _summary(rs) if rs else {},
            "contrasts": _aggregate([_contrasts(r, {**m, **r}) for r, m in zip(rs, main_res)])
            if rs
            else {},
            "delta_vs_main": _aggregate(diffs) if diffs else {},
            "alignment": _aggregate(cand_align[name]) if cand_align[name] else None,
        }
        entry["adopt"] = adopt(entry) if diffs else False
        candidates[name] = entry
    return {
        "seeds": list(cfg.selection_seeds),
        "main": {
            "results": _summary(main_res) if main_res else {},
            "contrasts": _aggregate(main_con) if main_con else {},
            "alignment": _aggregate(main_align) if main_align else None,
        },
        "candidates": candidates,
    }


def run_protocol(
    item_ids,
    raw_emb,
    interactions,
    cfg: EvalConfig | None = None,
    *,
    seeds=(0, 1, 2),
    progress: bool = False,
) -> dict:
    """Run the protocol on any catalog + interactions; return the results tree (no I/O).

    Returns:
        dict with ``results[variant][subset][metric] = {"mean", "std", "n"}``,
        ``deltas_vs_A`` (paired per-seed differences), ``per_seed``, ``alignment``,
        ``codes``, ``rankers`` (best epochs, params), ``ablations``, ``counts``, ``aims``,
        ``seconds``.
    """
    import torch

    cfg = cfg or EvalConfig()
    wanted = set(cfg.variants) | {v for a in cfg.ablations.values() for v in a.variants}
    for v in sorted(wanted):
        if v not in VARIANTS:
            raise InputError(f"variants: unknown {v!r}; choose from {list(VARIANTS)}")
    if "A" not in cfg.variants:
        raise InputError("variants: the baseline 'A' is required (deltas are taken against it)")
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise InputError("seeds: pass at least one seed")
    item_ids = check_ids(item_ids, name="item_ids")
    raw_emb = check_embeddings(raw_emb, name="raw_emb")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    selection = None
    if cfg.selection_seeds:
        selection = run_selection(
            item_ids, raw_emb, interactions, cfg, bar=_progress(len(cfg.selection_seeds), progress)
        )
    per_seed, deltas, align, codes, rankers, counts, spaces_s = [], [], [], [], {}, [], []
    ab_res: dict = {name: [] for name in cfg.ablations}
    ab_align: dict = {name: [] for name in cfg.ablations}
    n_steps = (
        len(cfg.variants)
        + 1
        + sum(len(a.variants) + bool(a.aligner) for a in cfg.ablations.values())
    )
    bar = _progress(len(seeds) * n_steps, progress)
    try:
        for seed in seeds:
            bar.set_description(f"seed {seed}: split + item spaces")
            split = make_split(item_ids, interactions, cfg, seed)
            t0 = time.perf_counter()
            spaces = build_item_spaces(item_ids, raw_emb, split, cfg, seed)
            spaces_s.append(time.perf_counter() - t0)
            align.append(spaces.report["alignment"])
            codes.append(spaces.report["codes"])
            bar.update(1)
            res = {}
            for v in cfg.variants:
                bar.set_description(f"seed {seed}: ranker {v}")
                res[v], info = _run_variant(v, spaces, split, cfg, seed)
                rankers.setdefault(v, []).append(info)
                bar.update(1)
            for name, ab in cfg.ablations.items():
                acfg = cfg.model_copy(
                    update={**ab.ranker, "aligner": cfg.aligner.model_copy(update=ab.aligner)}
                )
                ab_spaces = spaces
                if ab.aligner:
                    bar.set_description(f"seed {seed}: ablation {name}: aligner")
                    ab_spaces = build_item_spaces(item_ids, raw_emb, split, acfg, seed)
                    ab_align[name].append(ab_spaces.report["alignment"])
                    bar.update(1)
                ab_res[name].append({})
                for v in ab.variants:
                    bar.set_description(f"seed {seed}: ablation {name}: ranker {v}")
                    ab_res[name][-1][v], _ = _run_variant(v, ab_spaces, split, acfg, seed)
                    bar.update(1)
            per_seed.append(
                {
                    "seed": seed,
                    "results": res,
                    "aligner": spaces.report["aligner"],
                    "pairs": spaces.report["pairs"],
                }
            )
            per_seed[-1]["contrasts"] = _contrasts(res)
            deltas.append(
                {
                    v: {s: {m: res[v][s][m] - res["A"][s][m] for m in METRICS} for s in SUBSETS}
                    for v in cfg.variants
                }
            )
            counts.append(
                {
                    **{s: res["A"][s]["n_rows"] for s in SUBSETS},
                    "new_user_rows": int((split.test_rows.user == 0).sum()),
                }
            )
            logger.info("seed %d done: %s", seed, {v: round(res[v]["all"]["auc"], 4) for v in res})
    finally:
        bar.close()
        torch.set_num_threads(prev_threads)
    ablations = {}
    for name, ab in cfg.ablations.items():
        diffs = [
            {
                v: {s: {m: r[v][s][m] - p["results"][v][s][m] for m in METRICS} for s in SUBSETS}
                for v in r
                if v in p["results"]
            }
            for r, p in zip(ab_res[name], per_seed)
        ]
        ablations[name] = {
            "description": ab.description,
            "aligner": ab.aligner,
            "ranker": ab.ranker,
            "results": _summary(ab_res[name]),
            "delta_vs_main": _aggregate(diffs),
            "alignment": _aggregate(ab_align[name]) if ab_align[name] else None,
        }
    out = {
        "selection": selection,
        "contrasts": _aggregate([p["contrasts"] for p in per_seed]),
        "results": _summary([p["results"] for p in per_seed]),
        "deltas_vs_A": _aggregate(deltas),
        "per_seed": per_seed,
        "alignment": _aggregate(align),
        "codes": _aggregate(codes),
        "ablations": ablations,
        "rankers": {
            v: {
                "best_epoch": [i["best_epoch"] for i in infos],
                "n_params": infos[0]["n_params"],
                "seconds": _mean_std([i["seconds"] for i in infos]),
            }
            for v, infos in rankers.items()
        },
        "counts": _aggregate(counts),
        "seeds": list(seeds),
        "variants": {v: VARIANTS[v][1] for v in cfg.variants},
        "notes": development_notes(),
        "config": cfg.model_dump(mode="json"),
        "seconds": {
            "total": time.perf_counter() - t_start,
            "item_spaces_per_seed": _mean_std(spaces_s),
        },
    }
    out["aims"] = check_aims(out)
    return out


# Issue 11's targets: paired mean AUC contrast (CONTRASTS) -> threshold; and the
# unseen-item pair-AUC of the aligned space.
AIMS = {
    "cold_D_minus_B": 0.0,
    "cold_BD_minus_B": 0.005,
    "warm_D_minus_A": 0.015,
    "warm_BD_minus_B": 0.010,
}
AIM_UNSEEN_PAIR_AUC = 0.70


def _aim(m: dict, target: float) -> dict:
    return {
        "mean": m["mean"],
        "std": m["std"],
        "target": target,
        "met": bool(m["mean"] >= target),
        "gap": float(min(m["mean"] - target, 0.0)),
    }


def check_aims(out: dict) -> dict:
    """The issue's aims on the test split: paired per-seed contrasts (mean ± std), each
    with its target, whether it is met and by how much it is missed (``gap`` <= 0)."""
    con = out.get("contrasts") or {}
    aims = {name: _aim(con[name], t) for name, t in AIMS.items() if name in con}
    unseen = (out.get("alignment") or {}).get("unseen", {}).get("aligned", {}).get("pair_auc")
    if unseen is not None:
        aims["unseen_pair_auc"] = _aim(unseen, AIM_UNSEEN_PAIR_AUC)
    return aims


class _NoBar:
    def update(self, n=1):
        pass

    def set_description(self, s):
        logger.info(s)

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step")


def _catalog_embeddings(texts: list[str], cache_dir) -> np.ndarray:
    """Frozen MiniLM embeddings of the catalog texts, cached by a hash of the texts."""
    from qarm_features.build.bundles import encode_catalog_text
    from qarm_features.config import BuildConfig

    return encode_catalog_text(texts, BuildConfig(), cache_dir=cache_dir)


def run_evaluation(
    out_dir="reports",
    seeds=(0, 1, 2),
    quick: bool = False,
    cache_dir=None,
    progress: bool = True,
    config: EvalConfig | None = None,
) -> dict:
    """The ``qarm evaluate`` command: the protocol on MovieLens-100k, report on disk.

    Args:
        out_dir: report directory.
        seeds: one ranker/aligner/cold-split seed each (>= 3 for the report).
        quick: tiny budget (one seed, one epoch) for smoke tests.
        cache_dir: data and embedding cache (default ``$QARM_CACHE`` or ``~/.cache/qarm``).
        progress: show a progress bar.
        config: override the protocol/budget (:class:`EvalConfig`).

    Returns:
        The results tree (see :func:`run_protocol`) plus ``paths`` and ``markdown``.
    """
    from qarm_features.datasets.movielens import fetch_movielens_100k, load_movielens_100k

    t0 = time.perf_counter()
    cfg = config or EvalConfig()
    if quick:
        cfg = cfg.model_copy(update=QUICK)
        seeds = tuple(seeds)[:1]
    ml = load_movielens_100k(fetch_movielens_100k(cache_dir))
    texts = ml.items["text"].tolist()
    raw = _catalog_embeddings(texts, cache_dir)
    out = run_protocol(
        ml.items["item_id"].to_numpy(), raw, ml.interactions, cfg, seeds=seeds, progress=progress
    )
    out["seconds"]["total"] = time.perf_counter() - t0
    out["catalog_sha256"] = hashlib.sha256("\x1f".join(texts).encode()).hexdigest()[:16]
    paths = write_report(out, out_dir)
    return {**out, "paths": {k: str(v) for k, v in paths.items()}, "markdown": render_markdown(out)}
