"""Small, valid bundles for tests and examples, built in well under a second.

The aligner weights are random (seeded) and the codebooks are fitted on the resulting
aligned embeddings, so every code path (aligner forward, RQ, VQ, bundle I/O, Feast
transformations) is exercised without training anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_random_bundle(
    path: str | Path,
    *,
    n_items: int = 200,
    raw_dim: int = 32,
    out_dim: int = 16,
    hidden: int = 32,
    n_levels: int = 3,
    n_codes: int = 16,
    vq_k: int = 5,
    seed: int = 0,
    first_item_id: int = 1,
    raw_emb: np.ndarray | None = None,
    dataset: str = "random",
    overwrite: bool = True,
    string_ids: bool = False,
) -> Path:
    """Write a seeded random bundle over items ``first_item_id .. first_item_id + n - 1``.

    Args:
        raw_emb: the catalog's raw embeddings (e.g. a SyntheticWorld's content); ``None``
            draws Gaussian ones of ``(n_items, raw_dim)``. When given, it sets both sizes.
        string_ids: a string catalog: ids ``"SKU-<first_item_id + i>"`` (a team's SKUs);
            the bundle's int ids are then its row indices ``0 .. n-1``.

    Returns the bundle path. Same arguments, same bytes, same version id.
    """
    from qarm_features.bundle.artifact import write_bundle
    from qarm_features.bundle.encode import align_with_weights
    from qarm_features.codes.rq import ResidualQuantizer
    from qarm_features.config import AlignerConfig, BuildConfig, RQConfig, VQConfig

    rng = np.random.default_rng(seed)
    if raw_emb is None:
        raw = rng.standard_normal((n_items, raw_dim)).astype(np.float32)
    else:
        raw = np.ascontiguousarray(raw_emb, dtype=np.float32)
        n_items, raw_dim = raw.shape
    item_ids = np.arange(first_item_id, first_item_id + n_items, dtype=np.int64)
    item_keys = None
    if string_ids:
        item_keys = np.array([f"SKU-{i}" for i in item_ids], dtype=object)
        item_ids = np.arange(n_items, dtype=np.int64)
    weights = {
        "proj.weight": (rng.standard_normal((out_dim, raw_dim)) / np.sqrt(raw_dim)).astype(
            np.float32
        )
    }
    if hidden:
        weights.update(
            {
                "mlp.0.weight": (rng.standard_normal((hidden, raw_dim)) / np.sqrt(raw_dim)).astype(
                    np.float32
                ),
                "mlp.0.bias": (0.1 * rng.standard_normal(hidden)).astype(np.float32),
                "mlp.2.weight": (rng.standard_normal((out_dim, hidden)) / np.sqrt(hidden)).astype(
                    np.float32
                ),
                "mlp.2.bias": (0.1 * rng.standard_normal(out_dim)).astype(np.float32),
            }
        )
    aligned = align_with_weights(weights, raw)
    rq = ResidualQuantizer(n_levels=n_levels, n_codes=n_codes, n_iter=10, seed=seed).fit(aligned)
    cfg = BuildConfig(
        dataset=dataset,
        aligner=AlignerConfig(out_dim=out_dim, hidden=hidden),
        rq=RQConfig(n_levels=n_levels, n_codes=n_codes, n_iter=10, seed=seed),
        vq=VQConfig(k=vq_k, seed=seed),
        seed=seed,
    )
    return write_bundle(
        path,
        config=cfg.model_dump(mode="json"),
        aligner_weights=weights,
        rq_codebooks=rq.codebooks_,
        vq_pool_emb=aligned,
        vq_pool_ids=item_ids,
        item_ids=item_ids,
        item_keys=item_keys,
        raw_emb=raw,
        vq_k=vq_k,
        metrics={"note": f"random {dataset} bundle"},
        overwrite=overwrite,
    )
