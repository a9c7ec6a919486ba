"""``qarm evaluate --repo R``: does QARM lift a ranker on this repo's own data?

:func:`evaluate_repo` runs the offline A/B on the catalog and events a repo's ``qarm.yaml``
names, through the build route (:func:`qarm_features.build.repo.read_repo`, ``mine``,
``repo_content``) and writes ``reports/<name>.{md,json,png}`` (the demo repo
``feature_repo`` gives ``reports/movielens-100k.*``). :func:`run_protocol` is its core
(arrays or a :class:`~qarm_features.app.item_spaces.Route` in, no I/O). Per seed:

1. the protocol's splits and point-in-time histories (:mod:`qarm_features.app.protocol`):
   temporal split, cold items (train rows removed) and new items (first seen in the test
   period), sampled negatives for implicit logs;
2. item spaces fitted on train rows by the offline pipeline ``qarm build`` runs
   (:mod:`qarm_features.app.item_spaces` over :func:`qarm_features.build.pipeline.fit_item_space`),
   pairs and content from the repo's route, mined on train rows only;
3. one ranker per variant, same architecture and budget (:mod:`qarm_features.app.variants`),
   then the same variants again with each other ranker of ``cfg.rankers``
   (:mod:`qarm_features.app.deepfm`: deepctr-torch's DeepFM, a ranker the project did not
   write), on the same rows and seed;
4. AUC / UAUC / GAUC on all, warm, cold and new-item test rows, then mean ± std over seeds,
   paired differences with 95% intervals (:mod:`qarm_features.app.paired`), the
   candidates on the validation split and the aims (:func:`check_aims`); the report is
   rendered by :mod:`qarm_features.app.report`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np

from qarm_features._validate import check_embeddings, check_ids
from qarm_features.app.item_spaces import ItemSpaces, Route, build_item_spaces, repo_route
from qarm_features.app.paired import (
    CONTRASTS,
    _mean_std,
    check_aims,
    paired_bootstrap,
    paired_summary,
    t_interval,
)
from qarm_features.app.protocol import (
    VARIANTS,
    EvalConfig,
    Split,
    make_split,
    make_validation_split,
    repo_config,
)
from qarm_features.app.report import (
    METRICS,
    SUBSETS,
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


def _run_variant(
    v: str, spaces: ItemSpaces, split: Split, cfg: EvalConfig, seed: int, ranker: str = "din"
):
    """Train and score one variant with one ranker (``"din"``: ours; ``"deepfm"``:
    :func:`~qarm_features.app.deepfm.train_deepfm`); returns (per-subset metrics, training
    info, scores)."""
    t0 = time.perf_counter()
    kw, items, content = variant_items(
        v, spaces, split, vq_tied=cfg.vq_tied, content_codes=cfg.content_codes
    )
    if ranker == "deepfm":
        from qarm_features.app.deepfm import train_deepfm

        scores, info = train_deepfm(kw, items, split, cfg, seed)
    else:
        kw.update(ranker_options(cfg))
        scores, info = train_ranker(kw, items, split, cfg, seed, content)
    info["seconds"] = time.perf_counter() - t0
    return score_subsets(split, scores, split.item_ids), info, scores


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
    """The selection rule, on validation paired deltas: a candidate beats the main
    configuration when the 95% t-interval of its per-seed summed cold deltas (D and B+D)
    lies above 0 and its mean summed warm delta is not below -0.002.

    A mean alone adopted candidates inside their noise (``mlp_aligner``: cold +0.0003 ±
    0.0035 over 3 seeds); with fewer than two seeds there is no interval and nothing is
    adopted.
    """
    cold_ci = candidate["summed_delta"]["cold"]["ci"]
    warm = candidate["summed_delta"]["warm"]["mean"]
    return bool(cold_ci is not None and cold_ci[0] > 0 and warm >= -0.002)


def _summed_delta(diffs: list[dict]) -> dict:
    """Per subset (warm, cold): mean ± std and t-interval over seeds of the summed AUC
    deltas of D and B+D (the variants :func:`adopt` reads)."""
    out = {}
    for s in ("warm", "cold"):
        per_seed = [sum(d[v][s]["auc"] for v in ("D", "B+D") if v in d) for d in diffs]
        out[s] = {**_mean_std(per_seed), "ci": t_interval(per_seed)}
    return out


def run_selection(
    item_ids, raw_emb, interactions, cfg: EvalConfig, *, bar=None, route: Route | None = None
) -> dict:
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
    bar = bar or NoBar()
    n_steps = len(cfg.selection_variants) + 1
    n_steps += sum(len(c.variants) + c.refits_space for c in cfg.candidates.values())
    bar.start(len(cfg.selection_seeds) * n_steps, "validation split")
    main_res, main_con, main_align = [], [], []
    cand_res: dict = {n: [] for n in cfg.candidates}
    cand_align: dict = {n: [] for n in cfg.candidates}
    for seed in cfg.selection_seeds:
        bar.set_description(f"validation seed {seed}: split + item spaces")
        split = make_split(item_ids, interactions, cfg, seed)
        vsplit = make_validation_split(item_ids, split, cfg, seed)
        spaces = build_item_spaces(item_ids, raw_emb, vsplit, cfg, seed, route)
        main_align.append(spaces.report["alignment"])
        bar.update(1)
        res = {}
        for v in cfg.selection_variants:
            bar.set_description(f"validation seed {seed}: ranker {v}")
            res[v], _, _ = _run_variant(v, spaces, vsplit, cfg, seed)
            bar.update(1)
        main_res.append(res)
        main_con.append(_contrasts(res))
        for name, cand in cfg.candidates.items():
            ccfg = cfg.with_candidate(cand)
            cspaces = spaces
            if cand.refits_space:
                bar.set_description(f"validation seed {seed}: candidate {name}: item spaces")
                cspaces = build_item_spaces(item_ids, raw_emb, vsplit, ccfg, seed, route)
                cand_align[name].append(cspaces.report["alignment"])
                bar.update(1)
            cres = {}
            for v in cand.variants:
                bar.set_description(f"validation seed {seed}: candidate {name}: ranker {v}")
                cres[v], _, _ = _run_variant(v, cspaces, vsplit, ccfg, seed)
                bar.update(1)
            cand_res[name].append(cres)
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
        entry["summed_delta"] = _summed_delta(diffs) if diffs else None
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
    bar=None,
    route: Route | None = None,
) -> dict:
    """Run the protocol on any catalog + interactions; return the results tree (no I/O).

    Args:
        raw_emb: ``(n, d)`` frozen content embeddings; None when ``route.content`` makes
            them from each split's train pairs.
        bar: progress (:class:`NoBar`'s methods: ``start``, ``set_description``,
            ``update``); steps are one seed's item spaces or one ranker.
        route: the repo's pair miner and content (:class:`Route`; default: the
            pipeline's miner over ``raw_emb``).

    Returns:
        dict with ``results[variant][subset][metric] = {"mean", "std", "n"}``,
        ``deltas_vs_A`` (paired per-seed differences), ``paired`` (the :data:`PAIRED`
        differences with 95% intervals, :func:`~qarm_features.app.paired.paired_summary`),
        ``per_seed``, ``alignment``,
        ``codes``, ``rankers`` (best epochs, params), ``ablations``, ``counts``, ``aims``,
        ``seconds``; ``other_rankers[name]`` (each ranker of ``cfg.rankers`` but ``din``):
        ``title``, ``results``, ``paired``, ``contrasts``, ``aims``, ``training``.
    """
    import torch

    cfg = cfg or EvalConfig()
    wanted = set(cfg.variants) | {v for a in cfg.ablations.values() for v in a.variants}
    for v in sorted(wanted):
        if v not in VARIANTS:
            raise InputError(f"variants: unknown {v!r}; choose from {list(VARIANTS)}")
    if "A" not in cfg.variants:
        raise InputError("variants: the baseline 'A' is required (deltas are taken against it)")
    if "din" not in cfg.rankers:
        raise InputError(
            f"rankers: {list(cfg.rankers)} lacks 'din', the report's main ranker (selection "
            "and the headline run on it); add it"
        )
    others = [r for r in dict.fromkeys(cfg.rankers) if r != "din"]
    if "deepfm" in others:  # a missing library fails here, not after a seed of training
        from qarm_features.app.deepfm import library_title

        library_title()
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise InputError("seeds: pass at least one seed")
    item_ids = check_ids(item_ids, name="item_ids")
    route = route or Route()
    if raw_emb is not None:
        raw_emb = check_embeddings(raw_emb, name="raw_emb")
    elif route.content is None:
        raise InputError("raw_emb: give the content embeddings, or a route that makes them")
    bar = bar or NoBar()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    selection = None
    if cfg.selection_seeds:
        selection = run_selection(item_ids, raw_emb, interactions, cfg, bar=bar, route=route)
    per_seed, deltas, align, codes, rankers, counts, spaces_s = [], [], [], [], {}, [], []
    boots = []
    other_res: dict = {r: [] for r in others}  # per seed: variant -> subset metrics
    other_boots: dict = {r: [] for r in others}
    other_info: dict = {r: {} for r in others}
    ab_res: dict = {name: [] for name in cfg.ablations}
    ab_align: dict = {name: [] for name in cfg.ablations}
    n_steps = (
        len(cfg.variants) * (1 + len(others))
        + 1
        + sum(len(a.variants) + bool(a.aligner) for a in cfg.ablations.values())
    )
    bar.start(len(seeds) * n_steps, "test split")
    try:
        for seed in seeds:
            bar.set_description(f"seed {seed}: split + item spaces")
            split = make_split(item_ids, interactions, cfg, seed)
            t0 = time.perf_counter()
            spaces = build_item_spaces(item_ids, raw_emb, split, cfg, seed, route)
            spaces_s.append(time.perf_counter() - t0)
            align.append(spaces.report["alignment"])
            codes.append(spaces.report["codes"])
            bar.update(1)
            res, scores = {}, {}
            for v in cfg.variants:
                bar.set_description(f"seed {seed}: ranker {v}")
                res[v], info, scores[v] = _run_variant(v, spaces, split, cfg, seed)
                rankers.setdefault(v, []).append(info)
                bar.update(1)
            boots.append(paired_bootstrap(split, scores, seed))
            for r in others:
                ores, oscores = {}, {}
                for v in cfg.variants:
                    bar.set_description(f"seed {seed}: {r} {v}")
                    ores[v], info, oscores[v] = _run_variant(v, spaces, split, cfg, seed, r)
                    other_info[r].setdefault(v, []).append(info)
                    bar.update(1)
                other_res[r].append(ores)
                other_boots[r].append(paired_bootstrap(split, oscores, seed))
            for name, ab in cfg.ablations.items():
                acfg = cfg.model_copy(
                    update={**ab.ranker, "aligner": cfg.aligner.model_copy(update=ab.aligner)}
                )
                ab_spaces = spaces
                if ab.aligner:
                    bar.set_description(f"seed {seed}: ablation {name}: aligner")
                    ab_spaces = build_item_spaces(item_ids, raw_emb, split, acfg, seed, route)
                    ab_align[name].append(ab_spaces.report["alignment"])
                    bar.update(1)
                ab_res[name].append({})
                for v in ab.variants:
                    bar.set_description(f"seed {seed}: ablation {name}: ranker {v}")
                    ab_res[name][-1][v], _, _ = _run_variant(v, ab_spaces, split, acfg, seed)
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
                    "cold_items": int(split.cold_items.size),
                    "new_items": int(split.new_items.size),
                    "warm_items": int(split.warm_items.size),
                    "positive_rate": float(split.test_rows.y.mean()),
                }
            )
            logger.info("seed %d done: %s", seed, {v: round(res[v]["all"]["auc"], 4) for v in res})
    finally:
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
        "other_rankers": {
            r: _other_ranker(r, other_res[r], other_boots[r], other_info[r]) for r in others
        },
        "contrasts": _aggregate([p["contrasts"] for p in per_seed]),
        "results": _summary([p["results"] for p in per_seed]),
        "deltas_vs_A": _aggregate(deltas),
        "paired": paired_summary([p["results"] for p in per_seed], boots),
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
        "config": cfg.model_dump(mode="json"),
        "seconds": {
            "total": time.perf_counter() - t_start,
            "item_spaces_per_seed": _mean_std(spaces_s),
        },
    }
    out["aims"] = check_aims(out)
    return out


def _other_ranker(name: str, per_seed: list[dict], boots: list[dict], infos: dict) -> dict:
    """One more ranker's section of the results tree: its results, paired differences,
    contrasts and aims, as the main ranker's (same keys)."""
    from qarm_features.app.deepfm import library_title

    out = {
        "title": library_title() if name == "deepfm" else name,
        "results": _summary(per_seed),
        "paired": paired_summary(per_seed, boots),
        "contrasts": _aggregate([_contrasts(r) for r in per_seed]),
        "training": {
            v: {
                "best_epoch": [i["best_epoch"] for i in vi],
                "n_params": vi[0]["n_params"],
                "inputs": vi[0]["inputs"],
                "seconds": _mean_std([i["seconds"] for i in vi]),
            }
            for v, vi in infos.items()
        },
    }
    out["aims"] = check_aims(out)
    return out


class NoBar:
    """Progress that logs each step at INFO level (the library's default)."""

    def start(self, total: int, phase: str) -> None:
        logger.info("%s: %d steps", phase, total)

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, s: str) -> None:
        logger.info(s)


def report_name(project) -> str:
    """The report's file stem: ``qarm.yaml``'s ``dataset`` when set, else the repo folder."""
    return project.dataset or Path(project.repo).name


def evaluate_repo(
    repo: str | os.PathLike = "feature_repo",
    *,
    out_dir="reports",
    seeds=(0, 1, 2, 3, 4),
    quick: bool = False,
    cache_dir=None,
    bar=None,
    config: EvalConfig | None = None,
) -> dict:
    """The ``qarm evaluate --repo R`` command: the protocol on a repo's data, report on disk.

    Args:
        repo: a feature repo with a ``qarm.yaml`` (default: the demo repo, MovieLens-100k).
        out_dir: report directory; the report is ``<name>.{md,json,png}``
            (:func:`report_name`).
        seeds: one aligner/ranker/cold-item seed each (>= 3 for intervals over seeds).
        quick: a small budget (:data:`~qarm_features.app.protocol.QUICK`: one seed, one
            epoch, variants A, B, D, B+D, no candidates) for smoke tests.
        cache_dir: data and embedding cache (default ``$QARM_CACHE`` or ``~/.cache/qarm``).
        bar: progress (see :func:`run_protocol`).
        config: the protocol's ranker budget and candidates (:class:`EvalConfig`); the
            item-space sections and the label always come from ``qarm.yaml``.

    Returns:
        The results tree (see :func:`run_protocol`) plus ``paths`` and ``markdown``.

    Raises:
        ConfigError: a bad ``qarm.yaml``. InputError: a bad table, or data too small to
            split (named).
    """
    from qarm_features.build.repo import read_repo
    from qarm_features.build.tables import render_texts

    t0 = time.perf_counter()
    data = read_repo(repo)
    cfg = repo_config(data, config, quick=quick)
    seeds = tuple(seeds)[:1] if quick else tuple(seeds)
    out = run_protocol(
        data.keys.ids,
        None,
        data.interactions,
        cfg,
        seeds=seeds,
        bar=bar,
        route=repo_route(data, cache_dir=cache_dir),
    )
    out["seconds"]["total"] = time.perf_counter() - t0
    project = data.project
    name = report_name(project)
    spec = project.events
    if spec.rating is not None:
        label = f"{spec.rating.column} ≥ {spec.rating.threshold:g}"
    elif spec.label is not None:
        label = f"{spec.label} = 1"
    else:
        label = "every logged event is a positive (implicit)"
    if cfg.negatives_per_positive:
        label += (
            f"; every positive ranker row gets {cfg.negatives_per_positive} sampled "
            "negatives (label 0): items drawn from the same period's rows (fit, validation "
            "or test) in proportion to their rows there, never the row's own item, seeded "
            "(popularity-matched: popularity alone scores AUC 0.5). Histories hold logged "
            "events only."
        )
    content = f"`{project.catalog.embedding or project.catalog.image or project.catalog.text}`"
    layers = data.config.encoder.finetune_layers
    content += (
        f", text encoder fine-tuned (top {layers} layers) on each split's train pairs"
        if layers
        else " (frozen encoder)"
    )
    own = [k for k in ("i2i", "item_embeddings") if getattr(project.pairs, k)]
    content += (
        f"; the team's own {', '.join(own)} join the mined pairs (read whole, not split in "
        "time: tables computed on events after the split flatter D)."
        if own
        else "."
    )
    out["data"] = {
        "name": name,
        "repo": project.repo.name,
        "n_items": int(data.keys.ids.size),
        "id_kind": data.keys.kind,
        "n_events": len(data.interactions),
        "n_users": int(data.interactions["user_id"].nunique()),
        "label": label,
        "negatives_per_positive": cfg.negatives_per_positive,
        "content": content,
        "finetune_layers": layers,
        "own_pairs": {"i2i": project.pairs.i2i, "item_embeddings": project.pairs.item_embeddings},
    }
    if project.catalog.text:
        texts = render_texts(data.catalog.frame, project.catalog.text, name=data.catalog.name)
        out["catalog_sha256"] = hashlib.sha256("\x1f".join(texts).encode()).hexdigest()[:16]
    out["command"] = f"qarm evaluate --repo {Path(repo).name}" + (" --quick" if quick else "")
    paths = write_report(out, out_dir, name=name)
    return {**out, "paths": {k: str(v) for k, v in paths.items()}, "markdown": render_markdown(out)}
