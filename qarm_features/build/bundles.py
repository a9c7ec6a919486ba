"""``qarm build``: the offline pipeline written out as a bundle.

    catalog -> frozen content encoder (optionally fine-tuned) -> raw_emb
    raw_emb + interactions -> pipeline.fit_item_space: pairs (U2I + Swing), held-out items,
        aligner, RQ codebooks + VQ pool (all catalog items), metrics
    -> bundle (manifest with config, dims, metrics; verified on load)

Held-out evaluation: a fraction of items (``test_item_fraction``) is removed from pair
mining's output before the aligner sees any pair, and the build reports pair recall@10
and popularity-matched pair-AUC on the pairs that touch them, for the raw and the aligned
space. These are items the aligner never trained on, so the numbers say whether
alignment generalises beyond warm items.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from qarm_features._atomic import atomic_file
from qarm_features.build.pipeline import StepCallback
from qarm_features.config import BuildConfig
from qarm_features.errors import InputError
from qarm_features.progress import ProgressCallback, stage

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """What :func:`build_bundle` produced: the bundle path and a metrics summary."""

    path: Path
    version: str
    metrics: dict
    timings: dict = field(default_factory=dict)


def build_bundle(
    out: str | Path,
    *,
    item_ids,
    raw_emb,
    interactions: pd.DataFrame,
    config: BuildConfig | None = None,
    test_item_fraction: float = 0.1,
    overwrite: bool = False,
    on_step: StepCallback | None = None,
    progress: bool = False,
    extra_metrics: dict | None = None,
    mined: tuple[pd.DataFrame, dict] | None = None,
    item_keys=None,
    warm_start: str | Path | None = None,
    on_progress: ProgressCallback | None = None,
    encoder_dir: str | Path | None = None,
) -> BuildResult:
    """Run pair mining, aligner training and code fitting, and write a bundle.

    Args:
        out: bundle directory to write (atomically). An existing ``out`` is refused,
            before any training, unless ``overwrite=True`` (then it is replaced, and
            whatever it held is deleted).
        item_ids: ``(n,)`` catalog ids; raw_emb ``(n, d_raw)`` their frozen content
            embeddings.
        interactions: ``user_id, item_id, rating, timestamp`` rows.
        config: the build configuration (defaults: :class:`BuildConfig`).
        test_item_fraction: items held out of aligner training for the reported metrics.
        on_step: called with a short label as each stage starts (for CLI progress).
        extra_metrics: merged into the manifest's metrics (e.g. the fine-tuned encoder).
        mined: pairs already mined (see :func:`qarm_features.build.pipeline.fit_item_space`).
        item_keys: a string catalog's ids in ``item_ids`` order (``item_ids`` are then
            ``0 .. n-1``); stored in the bundle.
        warm_start: the previous bundle: the new RQ code ids are matched to its ids
            (:func:`qarm_features.build.stable.match_codebooks`) and the churn against it is
            recorded in the metrics (``churn``).
        on_progress: ``on_progress(stage, total, advance)`` for the pipeline's stages
            (:func:`qarm_features.build.pipeline.fit_item_space`); each is logged with its
            seconds and peak RSS.
        encoder_dir: the fine-tuned text encoder ``raw_emb`` came from: the bundle
            carries it (``encoder/``, hashed) so every later encode uses it.

    Raises:
        InputError: malformed catalog or interactions, or interactions naming items that
            are not in the catalog.
        BundleError: ``out`` exists and ``overwrite`` is false.
    """
    from qarm_features._validate import l2_normalize
    from qarm_features.build.pipeline import code_report, fit_item_space
    from qarm_features.bundle.artifact import write_bundle
    from qarm_features.codes.rq import ResidualQuantizer
    from qarm_features.errors import BundleError

    if Path(out).exists() and not overwrite:  # refuse before the training, not after
        raise BundleError(
            f"{out} already exists; build_bundle does not replace it unless overwrite=True "
            "(which deletes what it holds); or build into a directory of versioned bundles "
            "with build_versioned / qarm build --out DIR"
        )

    cfg = config or BuildConfig()
    step = on_step or (lambda _label: None)
    check_catalog_size(item_ids, cfg)
    warm = _warm_init(warm_start, raw_emb, cfg) if warm_start is not None else None
    space = fit_item_space(
        raw_emb,
        item_ids,
        interactions,
        cfg,
        heldout_fraction=test_item_fraction,
        mined=mined,
        warm=warm,
        on_step=step,
        progress=progress,
        on_progress=on_progress,
    )
    ids, raw, aligned, metrics = space.item_ids, space.raw, space.aligned, space.metrics
    check_alignment(metrics, len(ids), cfg)
    rq = space.rq
    if warm_start is not None:
        step("matching code ids to the previous bundle")
        rq, metrics["churn"] = _match_previous(warm_start, space, item_keys)
    try:  # raw-space codes at the same L x K, the "cascading" baseline for code quality
        raw_norm = l2_normalize(raw)
        metrics["codes"]["raw"] = code_report(
            ResidualQuantizer.from_config(cfg.rq).fit(raw_norm), raw_norm
        )
    except InputError as exc:  # too few items for K codes
        log.warning("skipping raw-space code report: %s", exc)

    metrics.update(extra_metrics or {})
    step("writing bundle")
    path = write_bundle(
        out,
        config=cfg.model_dump(mode="json"),
        aligner_weights=space.weights,
        rq_codebooks=rq.codebooks_,
        vq_pool_emb=aligned,
        vq_pool_ids=ids,
        item_ids=ids,
        raw_emb=raw,
        vq_k=cfg.vq.k,
        item_keys=item_keys,
        vq_index=space.vq.export_index(),  # the trained ANN index: workers load, not rebuild
        metrics=metrics,
        overwrite=overwrite,
        encoder_dir=encoder_dir,
    )
    from qarm_features.bundle.artifact import load_bundle

    version = load_bundle(path).version
    return BuildResult(path=Path(path), version=version, metrics=metrics, timings=space.timings)


LATEST = "LATEST"  # names the newest bundle of a bundles directory


# Below this many training pairs per catalog item the aligner rarely learns what carries
# to unseen items (the likely cause the warning names first).
FEW_PAIRS_PER_ITEM = 5.0
# Below this many held-out pairs the check itself is noisy (said in the warning).
FEW_HELDOUT_PAIRS = 500


def alignment_warning(metrics: dict, n_items: int) -> str | None:
    """What a build whose aligned space is not better than the raw one should say: the
    comparison, its likely causes and what to do; None when the check says ``better``
    (or could not measure).

    ``metrics``: :attr:`~qarm_features.build.pipeline.ItemSpace.metrics` (``alignment_check``,
    ``pairs``, ``aligner``).
    """
    check = metrics.get("alignment_check") or {}
    verdict = check.get("verdict")
    if verdict not in ("not_better", "inconclusive"):
        return None
    lo, hi = check["ci"]
    head = (
        "alignment did not make the space better"
        if verdict == "not_better"
        else "alignment could not be shown to make the space better"
    )
    lines = [
        (
            f"{head}: held-out pair-AUC raw {check['raw']:.3f} -> aligned "
            f"{check['aligned']:.3f} (delta {check['delta']:+.4f}, 95% interval "
            f"[{lo:+.4f}, {hi:+.4f}], {check['n_pairs']:,} pairs of {check['n_items']:,} "
            "items the aligner never saw)."
        )
    ]
    causes = []
    n_pairs = int((metrics.get("pairs") or {}).get("n_pairs", 0) or 0)
    n_train = int((metrics.get("aligner") or {}).get("n_train_pairs", 0) or 0) or n_pairs
    per_item = n_train / max(n_items, 1)
    if per_item < FEW_PAIRS_PER_ITEM:
        causes.append(
            f"too few pairs for the catalog: {n_train:,} training pairs for {n_items:,} items "
            f"({per_item:.1f} per item; below {FEW_PAIRS_PER_ITEM:g} the aligner rarely learns "
            "what carries to unseen items)"
        )
    if check["n_pairs"] < FEW_HELDOUT_PAIRS:
        causes.append(f"only {check['n_pairs']} held-out pairs: the check itself is noisy")
    if check["raw"] is not None and check["raw"] >= 0.8:
        causes.append("the frozen embedding already matches the pairs (raw pair-AUC >= 0.8)")
    if not causes:
        causes.append(
            "the content (catalog.text / embedding) may not carry what the pairs say users "
            "choose together"
        )
    lines.append("Likely cause: " + "; ".join(causes) + ".")
    lines.append(
        "What to do: more events (a longer log window) or the retrieval stack's own pairs "
        "(qarm.yaml pairs.i2i, pairs.item_embeddings); richer content (catalog.text); a "
        "larger build.aligner.raw_consistency keeps the aligned space closer to the frozen "
        "one; `qarm evaluate --repo R` says whether the codes still lift your ranker. "
        "build.on_alignment_failure: error refuses such a build."
    )
    return " ".join(lines)


def check_alignment(metrics: dict, n_items: int, cfg: BuildConfig) -> None:
    """Say so when the aligned space is not better than the raw one (``alignment_check``):
    a WARNING with the likely cause and what to do; with
    ``build.on_alignment_failure: error`` a ``not_better`` verdict stops the build before
    anything is written.

    Raises:
        AlignmentFailed: ``not_better`` under ``on_alignment_failure: error``.
    """
    from qarm_features.errors import AlignmentFailed

    message = alignment_warning(metrics, n_items)
    if message is None:
        return
    verdict = metrics["alignment_check"]["verdict"]
    if verdict == "not_better" and cfg.on_alignment_failure == "error":
        raise AlignmentFailed(f"build refused (build.on_alignment_failure: error): {message}")
    log.warning("%s", message)


def check_catalog_size(item_ids, cfg: BuildConfig) -> None:
    """Refuse, before any training, a catalog the configured codes cannot fit.

    Raises:
        InputError: negative ids (a code of -1 means "missing"), fewer items than RQ codes
            per level, or a VQ top-K not smaller than the catalog.
    """
    ids = np.asarray(item_ids)
    n = int(ids.shape[0])
    if ids.dtype.kind in "iu" and n and int(ids.min()) < 0:
        raise InputError(
            f"item ids must be >= 0: {int(ids.min())} would be confused with the code -1 "
            "that marks a missing code; shift or re-key the catalog"
        )
    if cfg.rq.n_codes > n:
        raise InputError(
            f"rq.n_codes={cfg.rq.n_codes} codes per level need at least as many items; the "
            f"catalog has {n}: lower rq.n_codes"
        )
    if cfg.vq.k >= n:
        raise InputError(
            f"vq.k={cfg.vq.k} nearest items need a catalog larger than k; it has {n}: lower vq.k"
        )


def build_versioned(root: str | Path, build: Callable[[Path], BuildResult]) -> BuildResult:
    """Build into ``root/<version>/``: immutable, version-named, nothing ever deleted.

    ``build(out)`` writes a bundle at ``out``, a temporary directory under ``root``; it is
    then renamed to ``root/<version>`` (a rebuild with identical content keeps the existing
    directory: same version, same bytes) and ``root/LATEST`` is pointed at it, atomically.
    A crash at any point leaves every existing bundle as it was (at worst a ``.building-*``
    directory to remove).
    """
    import os
    import shutil
    import tempfile

    root = Path(root)
    if root.exists() and not root.is_dir():
        raise InputError(f"bundles directory {root} is a file; give a directory")
    if (root / "manifest.json").exists():
        raise InputError(
            f"{root} is a bundle, not a directory of bundles; bundles are written to "
            "<dir>/<version>/, e.g. --out artifacts/bundles"
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        result = build(tmp / "bundle")
        final = root / result.version
        if not final.exists():
            os.replace(tmp / "bundle", final)
        with atomic_file(root / LATEST) as marker:
            marker.write_text(result.version + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.path = final
    return result


def latest_bundle(root: str | Path) -> Path:
    """The bundle ``root/LATEST`` names (the newest :func:`build_versioned` build).

    Confined to ``root``: ``LATEST`` holds one directory name of ``root`` (a version id
    written by :func:`build_versioned`), and that directory is a real directory, not a
    symlink (``build_versioned`` never writes one). A name with a path separator or
    ``..``, or a symlinked bundle directory, is refused: a bundle elsewhere is served by
    naming it (``--bundle PATH``, ``bundle_path=``), which is taken as given. ``root``
    itself may be a symlink (a bundles directory mounted elsewhere).

    Raises:
        InputError: no build in ``root`` yet, or a ``LATEST`` that leaves ``root``.
    """
    root = Path(root)
    marker = root / LATEST
    try:
        version = marker.read_text().strip()
    except FileNotFoundError:
        raise InputError(f"no bundle built in {root} yet: run `qarm build`") from None
    path = root / version
    if not version or version in (".", "..") or Path(version).name != version or "\\" in version:
        raise InputError(
            f"{marker} holds {version[:80]!r}, not the name of a bundle directory in {root}: "
            "LATEST names one version (qarm-...) of that directory; rebuild with `qarm "
            "build`, or serve a bundle elsewhere by its path (--bundle PATH)"
        )
    if path.is_symlink():
        raise InputError(
            f"{path} (named by {marker}) is a symlink to {os.readlink(path)}: bundles "
            f"resolved through LATEST must be directories of {root} (`qarm build` never "
            "links); serve a bundle elsewhere by its path (--bundle PATH)"
        )
    return path


def _warm_init(previous: str | Path, raw_emb, cfg: BuildConfig):
    """The previous bundle's aligner weights and codebooks, if this config can start from
    them (same raw and aligned dims, same aligner shape); else None (matching still runs)."""
    from qarm_features.align.aligner import weight_shapes
    from qarm_features.bundle.encode import get_bundle

    prev = get_bundle(previous)
    in_dim = np.asarray(raw_emb).shape[1]
    shapes = weight_shapes(in_dim, cfg.aligner)
    weights = prev.aligner_weights
    if set(weights) != set(shapes) or any(weights[k].shape != s for k, s in shapes.items()):
        log.warning("warm start: %s's aligner has another shape; training from scratch", prev.path)
        return None
    return dict(weights), prev.rq_codebooks


def _match_previous(previous: str | Path, space, item_keys):
    """Relabel the new RQ codebooks to the previous bundle's ids; measure the churn."""
    from qarm_features.build.stable import churn_codes, common_rows, match_codebooks
    from qarm_features.bundle.encode import align, encode_items, get_bundle
    from qarm_features.codes.rq import ResidualQuantizer

    prev = get_bundle(previous)
    keys = space.item_ids if item_keys is None else np.asarray(item_keys)
    a, b = common_rows(keys, prev)
    old_aligned = align(prev, prev.raw_emb[b])
    codebooks, _ = match_codebooks(
        space.rq.codebooks_, space.aligned[a], old_aligned, prev.rq_codebooks
    )
    rq = ResidualQuantizer.from_codebooks(codebooks)
    new_vq = space.vq.encode(space.aligned[a], exclude_ids=space.item_ids[a])
    new_vq_keys = new_vq if item_keys is None else keys[new_vq.clip(min=0)]
    old = encode_items(prev, prev.raw_emb[b], prev.item_ids[b])
    report = churn_codes(
        rq.encode(space.aligned[a]),
        new_vq_keys,
        old.rq_codes,
        prev.keys_of(old.vq_codes.clip(min=0)),
    )
    report["against"] = prev.version
    return rq, report


def finetune_encoder(
    texts: list[str],
    item_ids: np.ndarray,
    pairs: pd.DataFrame,
    cfg: BuildConfig,
    out: Path,
    *,
    test_item_fraction: float = 0.1,
    progress: bool = False,
) -> tuple[Path, dict]:
    """Fine-tune the text encoder's top layers on the train pairs; save it at ``out``.

    The held-out items are chosen exactly as :func:`build_bundle` chooses them (same pairs,
    fraction and seed), so the encoder never trains on a pair the build reports on.

    Returns:
        ``(path, info)``: the saved sentence-transformers folder (safetensors) and what the
        manifest records of it (layers, losses, steps; the bundle adds the file hashes).
    """
    from qarm_features.build.pipeline import split_test_items
    from qarm_features.content.finetune import EncoderFineTuner

    train_pairs, _, _ = split_test_items(item_ids, pairs, test_item_fraction, cfg.seed)
    tuner = EncoderFineTuner(cfg.encoder, seed=cfg.seed)
    history = tuner.fit(texts, item_ids, train_pairs, progress=progress).history_
    path = tuner.save(out, overwrite=True)
    info = {
        "finetuned_layers": cfg.encoder.finetune_layers,
        "train_loss_before": history.get("train_loss_before"),
        "train_loss_after": history.get("train_loss_after"),
        "steps": history.get("steps"),
    }
    return Path(path), info


_FINETUNE_KEYS = {"finetune_layers", "finetune_epochs", "finetune_max_pairs", "finetune_lr"}

# Texts per cached block of the catalog encoding: a crash or an interrupt loses at most
# one block (the rest load from the cache on the next run), and a changed item re-encodes
# its block only. A catalog of up to this many texts is one block, cached under the key
# the whole catalog always had.
ENCODE_BLOCK = 16_384


def encode_catalog_text(
    texts: list[str],
    cfg: BuildConfig,
    *,
    cache_dir=None,
    progress: bool = False,
    on_progress: ProgressCallback | None = None,
    block: int = ENCODE_BLOCK,
    encoder_path: str | Path | None = None,
) -> np.ndarray:
    """Encode item texts with the configured frozen encoder (or the fine-tuned one saved
    at ``encoder_path``, e.g. a bundle's ``encoder/``): batched, cached by content hash,
    resumable.

    The catalog is encoded ``block`` texts at a time; each block is cached on disk under
    a key covering the encoder config and its texts (an ``.npy``, no pickle, written
    atomically), so a changed model or text re-encodes only its block and an interrupted
    run resumes from the blocks already written. ``on_progress`` sees the texts done
    (stage ``encode text``), cached blocks included.
    """
    import hashlib
    import os

    root = Path(cache_dir or os.environ.get("QARM_CACHE", Path.home() / ".cache" / "qarm"))
    # the key covers what decides the vectors: the frozen encoder's settings, or a
    # fine-tuned encoder's weights; never the fine-tuning settings themselves
    head = cfg.encoder.model_dump_json(exclude=_FINETUNE_KEYS) + "\x00"
    if encoder_path is not None:  # the weights decide the vectors, not the folder's name
        from qarm_features.bundle.manifest import sha256_file

        weights = sorted(Path(encoder_path).rglob("*.safetensors"))
        head += "".join(sha256_file(w) for w in weights) + "\x00"
    encoder = None
    parts = []
    with stage("encode text", total=len(texts), progress=on_progress) as s:
        for lo in range(0, max(len(texts), 1), block):
            part = texts[lo : lo + block]
            key = hashlib.sha256((head + "\x1f".join(part)).encode()).hexdigest()[:16]
            cache = root / "embeddings" / f"{cfg.encoder.kind}-{key}.npy"
            arr = _read_cached(cache, len(part))
            if arr is None:
                encoder = encoder or _text_encoder(cfg, encoder_path)
                arr = np.asarray(encoder.encode(part, show_progress=progress), dtype=np.float32)
                with atomic_file(cache) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, arr, allow_pickle=False)
            parts.append(arr)
            s.advance(len(part))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _text_encoder(cfg: BuildConfig, encoder_path):
    if encoder_path is None:
        from qarm_features.content.encoders import make_encoder

        return make_encoder(cfg.encoder)
    from qarm_features.content.finetune import load_encoder

    return load_encoder(encoder_path)


def _read_cached(cache: Path, n: int) -> np.ndarray | None:
    if not cache.is_file():
        return None
    try:
        arr = np.load(cache, allow_pickle=False)
    except (ValueError, OSError):
        log.warning("ignoring unreadable embedding cache %s", cache)
        return None
    return arr if arr.shape[0] == n and arr.dtype == np.float32 else None
