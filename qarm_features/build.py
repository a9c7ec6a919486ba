"""The offline pipeline that produces a bundle.

    catalog -> frozen content encoder -> raw_emb
    interactions -> <trigger, target> pairs (U2I + Swing)
    raw_emb + pairs -> aligner (in-batch InfoNCE, early stopping on unseen items)
    aligned_emb -> RQ codebooks (residual k-means) + VQ pool (all catalog items)
    -> bundle (manifest with config, dims, metrics; verified on load)

Held-out evaluation: a fraction of items (``test_item_fraction``) is removed from pair
mining's output before the aligner sees any pair, and the build reports pair recall@10
and popularity-matched pair-AUC on the pairs that touch them, for the raw and the aligned
space. These are items the aligner never trained on, so the numbers say whether
alignment generalises beyond warm items.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from qarm_features._validate import check_columns, check_embeddings, check_ids
from qarm_features.config import BuildConfig
from qarm_features.errors import InputError

log = logging.getLogger(__name__)

StepCallback = Callable[[str], None]


@dataclass
class BuildResult:
    """What :func:`build_bundle` produced: the bundle path and a metrics summary."""

    path: Path
    version: str
    metrics: dict
    timings: dict = field(default_factory=dict)


def split_test_items(item_ids: np.ndarray, pairs: pd.DataFrame, fraction: float, seed: int):
    """Pick ``fraction`` of the items that appear in pairs as held-out test items.

    Returns ``(train_pairs, test_pairs, test_items)``: every pair touching a test item is
    a test pair, so the aligner never sees a test item in training.
    """
    rng = np.random.default_rng(seed)
    in_pairs = np.unique(np.concatenate([pairs["trigger_id"], pairs["target_id"]]))
    n_test = int(round(fraction * in_pairs.size))
    test_items = np.sort(rng.choice(in_pairs, size=n_test, replace=False)) if n_test else in_pairs[:0]
    touches = pairs["trigger_id"].isin(test_items) | pairs["target_id"].isin(test_items)
    return pairs[~touches].reset_index(drop=True), pairs[touches].reset_index(drop=True), test_items


def space_metrics(emb, item_ids, pairs, popularity, *, seed: int = 0) -> dict:
    """Pair recall@10 and popularity-matched pair-AUC of ``pairs`` in an embedding space."""
    from qarm_features.metrics import pair_auc, pair_recall_at_k

    if len(pairs) == 0:
        return {"recall@10": float("nan"), "pair_auc": float("nan"), "n_pairs": 0}
    return {
        "recall@10": float(pair_recall_at_k(emb, item_ids, pairs, k=10)),
        "pair_auc": float(pair_auc(emb, item_ids, pairs, popularity, seed=seed)),
        "n_pairs": int(len(pairs)),
    }


def item_popularity(interactions: pd.DataFrame, item_ids: np.ndarray) -> np.ndarray:
    """Interaction count per item, aligned with ``item_ids``."""
    counts = interactions["item_id"].value_counts()
    return counts.reindex(item_ids, fill_value=0).to_numpy(np.int64)


def fit_codes(aligned: np.ndarray, item_ids: np.ndarray, cfg: BuildConfig):
    """Fit the RQ codebooks and the VQ pool on aligned embeddings; return fitted coders."""
    from qarm_features.quantize import ResidualQuantizer, VQCoder

    rq = ResidualQuantizer(
        n_levels=cfg.rq.n_levels, n_codes=cfg.rq.n_codes, n_iter=cfg.rq.n_iter, seed=cfg.rq.seed
    ).fit(aligned)
    vq = VQCoder(
        k=cfg.vq.k,
        exact_max_pool=cfg.vq.exact_max_pool,
        ann_index=cfg.vq.ann_index,
        ann_ef_search=cfg.vq.ann_ef_search,
        seed=cfg.vq.seed,
    ).fit(aligned, item_ids)
    return rq, vq


def code_report(rq, x: np.ndarray, n_codes: int) -> dict:
    """Code quality of an RQ coder on ``x``: utilization, entropy, collisions, residual."""
    from qarm_features.metrics import code_quality

    codes = rq.encode(x)
    out = dict(code_quality(codes, n_codes))
    out["reconstruction_error"] = float(rq.reconstruction_error(x))
    return out


def build_bundle(
    out: str | Path,
    *,
    item_ids,
    raw_emb,
    interactions: pd.DataFrame,
    config: BuildConfig | None = None,
    test_item_fraction: float = 0.1,
    overwrite: bool = True,
    on_step: StepCallback | None = None,
    progress: bool = False,
    extra_metrics: dict | None = None,
) -> BuildResult:
    """Run pair mining, aligner training and code fitting, and write a bundle.

    Args:
        out: bundle directory to write (atomically).
        item_ids: ``(n,)`` catalog ids; raw_emb ``(n, d_raw)`` their frozen content
            embeddings.
        interactions: ``user_id, item_id, rating, timestamp`` rows.
        config: the build configuration (defaults: :class:`BuildConfig`).
        test_item_fraction: items held out of aligner training for the reported metrics.
        on_step: called with a short label as each stage starts (for CLI progress).
        extra_metrics: merged into the manifest's metrics (e.g. the fine-tuned encoder).

    Raises:
        InputError: malformed catalog or interactions, or interactions naming items that
            are not in the catalog.
    """
    from qarm_features.align import ItemAligner
    from qarm_features.bundle import write_bundle
    from qarm_features.pairs import mine_pairs

    cfg = config or BuildConfig()
    step = on_step or (lambda _label: None)
    ids = check_ids(item_ids, name="item_ids")
    raw = check_embeddings(raw_emb, name="raw_emb")
    if raw.shape[0] != ids.shape[0]:
        raise InputError(f"raw_emb has {raw.shape[0]} rows but item_ids has {ids.shape[0]}")
    check_columns(interactions, ["user_id", "item_id", "rating", "timestamp"], name="interactions")
    unknown = ~interactions["item_id"].isin(ids)
    if unknown.any():
        bad = interactions.loc[unknown, "item_id"].unique()[:5].tolist()
        raise InputError(f"interactions name item ids {bad} that are not in the catalog")

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    step("mining pairs")
    pairs, pair_stats = mine_pairs(interactions, cfg.pairs)
    timings["pairs_s"] = time.perf_counter() - t0
    if len(pairs) == 0:
        raise InputError("pair mining found no pairs; are there positives (rating >= threshold)?")
    train_pairs, test_pairs, test_items = split_test_items(
        ids, pairs, test_item_fraction, cfg.seed
    )

    t0 = time.perf_counter()
    step("training aligner")
    aligner = ItemAligner(cfg.aligner).fit(raw, ids, train_pairs, progress=progress)
    timings["aligner_s"] = time.perf_counter() - t0
    weights, history = aligner.weights_, aligner.history_

    # The aligned space served later is the numpy forward of the exported weights.
    from qarm_features.encode import align_with_weights

    aligned = align_with_weights(weights, raw)

    t0 = time.perf_counter()
    step("fitting codes")
    rq, vq = fit_codes(aligned, ids, cfg)
    timings["codes_s"] = time.perf_counter() - t0

    step("evaluating")
    pop = item_popularity(interactions, ids)
    raw_norm = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    metrics = {
        "pairs": pair_stats,
        "heldout_items": int(test_items.size),
        "heldout": {
            "raw": space_metrics(raw_norm, ids, test_pairs, pop, seed=cfg.seed),
            "aligned": space_metrics(aligned, ids, test_pairs, pop, seed=cfg.seed),
        },
        "aligner": {
            k: v for k, v in history.items() if not isinstance(v, (list, np.ndarray))
        },
        "codes": {"aligned": code_report(rq, aligned, cfg.rq.n_codes)},
        "vq_ann_recall": getattr(vq, "ann_recall_", None),
    }
    try:  # raw-space codes at the same L x K, the "cascading" baseline for code quality
        from qarm_features.quantize import ResidualQuantizer

        rq_raw = ResidualQuantizer(
            n_levels=cfg.rq.n_levels, n_codes=cfg.rq.n_codes, n_iter=cfg.rq.n_iter,
            seed=cfg.rq.seed,
        ).fit(raw_norm)
        metrics["codes"]["raw"] = code_report(rq_raw, raw_norm, cfg.rq.n_codes)
    except InputError as exc:  # too few items for K codes
        log.warning("skipping raw-space code report: %s", exc)

    metrics.update(extra_metrics or {})
    step("writing bundle")
    path = write_bundle(
        out,
        config=cfg.model_dump(mode="json"),
        aligner_weights=weights,
        rq_codebooks=rq.codebooks_,
        vq_pool_emb=aligned,
        vq_pool_ids=ids,
        item_ids=ids,
        raw_emb=raw,
        vq_k=cfg.vq.k,
        metrics=metrics,
        overwrite=overwrite,
    )
    from qarm_features.bundle import load_bundle

    version = load_bundle(path).version
    return BuildResult(path=Path(path), version=version, metrics=metrics, timings=timings)


def build_movielens(
    out: str | Path,
    *,
    config: BuildConfig | None = None,
    cache_dir: str | Path | None = None,
    on_step: StepCallback | None = None,
    progress: bool = False,
) -> BuildResult:
    """Fetch MovieLens-100k, encode its titles with the frozen text encoder, build a bundle."""
    from qarm_features.data import fetch_movielens_100k, load_movielens_100k

    cfg = config or BuildConfig()
    step = on_step or (lambda _label: None)
    step("loading MovieLens-100k")
    ml = load_movielens_100k(fetch_movielens_100k(cache_dir))
    t0 = time.perf_counter()
    step("encoding item text")
    texts = ml.items["text"].tolist()
    item_ids = ml.items["item_id"].to_numpy()
    raw = encode_catalog_text(texts, cfg, cache_dir=cache_dir, progress=progress)
    encoder_info = None
    if cfg.encoder.finetune_layers > 0:
        step(f"fine-tuning the top {cfg.encoder.finetune_layers} encoder layers")
        raw, encoder_info = finetune_encoder(
            texts, item_ids, ml.interactions, cfg, Path(str(out) + "-encoder"), progress=progress
        )
    encode_s = time.perf_counter() - t0
    result = build_bundle(
        out,
        item_ids=item_ids,
        raw_emb=raw,
        interactions=ml.interactions,
        config=cfg,
        on_step=on_step,
        progress=progress,
        extra_metrics={"encoder": encoder_info} if encoder_info else None,
    )
    result.timings = {"encode_s": encode_s, **result.timings}
    return result


def finetune_encoder(
    texts: list[str],
    item_ids: np.ndarray,
    interactions: pd.DataFrame,
    cfg: BuildConfig,
    out: Path,
    *,
    test_item_fraction: float = 0.1,
    progress: bool = False,
) -> tuple[np.ndarray, dict]:
    """Fine-tune the text encoder's top layers on train pairs; return new raw_emb and info.

    The held-out items are chosen exactly as :func:`build_bundle` chooses them (same pairs,
    fraction and seed), so the encoder never trains on a pair the build reports on. The
    encoder is saved (safetensors) at ``out``; its path and weight hash go in the manifest.
    """
    import hashlib

    from qarm_features.finetune import EncoderFineTuner, load_encoder
    from qarm_features.pairs import mine_pairs

    pairs, _ = mine_pairs(interactions, cfg.pairs)
    train_pairs, _, _ = split_test_items(item_ids, pairs, test_item_fraction, cfg.seed)
    tuner = EncoderFineTuner(cfg.encoder, seed=cfg.seed)
    history = tuner.fit(texts, item_ids, train_pairs, progress=progress).history_
    path = tuner.save(out, overwrite=True)
    raw = np.asarray(load_encoder(path).encode(texts), dtype=np.float32)
    weights = sorted(path.rglob("*.safetensors"))
    digest = hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest()
    info = {
        "path": str(path),
        "weights_sha256": digest,
        "finetuned_layers": cfg.encoder.finetune_layers,
        "train_loss_before": history.get("train_loss_before"),
        "train_loss_after": history.get("train_loss_after"),
        "steps": history.get("steps"),
    }
    return raw, info


def encode_catalog_text(
    texts: list[str], cfg: BuildConfig, *, cache_dir=None, progress: bool = False
) -> np.ndarray:
    """Encode item texts with the configured frozen encoder, cached on disk by content hash.

    The cache key covers the encoder config and every text, so a changed catalog or model
    is re-encoded. The cache file is an ``.npy`` (no pickle), written atomically.
    """
    import hashlib
    import os

    from qarm_features.encoders import make_encoder

    key = hashlib.sha256(
        (cfg.encoder.model_dump_json() + "\x00" + "\x1f".join(texts)).encode()
    ).hexdigest()[:16]
    root = Path(cache_dir or os.environ.get("QARM_CACHE", Path.home() / ".cache" / "qarm"))
    cache = root / "embeddings" / f"{cfg.encoder.kind}-{key}.npy"
    if cache.is_file():
        try:
            arr = np.load(cache, allow_pickle=False)
            if arr.shape[0] == len(texts) and arr.dtype == np.float32:
                return arr
        except (ValueError, OSError):
            log.warning("ignoring unreadable embedding cache %s", cache)
    encoder = make_encoder(cfg.encoder)
    arr = np.asarray(encoder.encode(texts, show_progress=progress), dtype=np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp-{os.getpid()}.npy")
    np.save(tmp, arr, allow_pickle=False)
    os.replace(tmp, cache)
    return arr
