"""qarm-features: QARM aligned embeddings and trainable code ids, served through Feast.

The public API at a glance (imported lazily: ``import qarm_features`` loads nothing heavy)::

    # a team's repo, from its qarm.yaml
    build_from_repo(repo)                          -> BuildResult (bundle under <bundles>/<version>/)
    load_project(repo)                             -> Project (the parsed qarm.yaml)
    content_embeddings(repo, items_df)             -> (n, d_raw) raw_emb of cold items, for qarm_cold
    # the offline pipeline on arrays
    build_bundle(out, item_ids=, raw_emb=, interactions=, config=)   -> BuildResult
    fit_item_space(raw_emb, item_ids, interactions, config)          -> ItemSpace
    BuildConfig, AlignerConfig, PairsConfig, RQConfig, VQConfig, EncoderConfig
    ItemAligner, BPRMF, EncoderFineTuner, ResidualQuantizer, VQCoder  (estimators)
    mine_pairs(interactions, cfg)                  -> (pairs, stats)
    # the bundle and its encoder (batch and request paths alike)
    load_bundle(path) -> Bundle;  get_bundle(path) (cached per process)
    encode_items(bundle, raw_emb, item_ids)        -> EncodedItems (aligned, rq/vq codes)
    CodeSchema                                     THE row schema (column names and dtypes)
    # Feast (qarm_features.feast): materialize, push_items, apply, sample_online,
    # check_versions, qarm_views (the views a repo declares), ServingContext
    QarmError and its family (qarm_features.errors)
"""

from __future__ import annotations

import importlib

from qarm_features._version import __version__
from qarm_features.threads import passive_wait_default

passive_wait_default()  # before torch / faiss load libgomp (qarm_features.threads)

_API = {
    "build_from_repo": "qarm_features.build.repo",
    "content_embeddings": "qarm_features.build.repo",
    "load_project": "qarm_features.project",
    "build_bundle": "qarm_features.build.bundles",
    "BuildResult": "qarm_features.build.bundles",
    "fit_item_space": "qarm_features.build.pipeline",
    "ItemSpace": "qarm_features.build.pipeline",
    "BuildConfig": "qarm_features.config",
    "AlignerConfig": "qarm_features.config",
    "PairsConfig": "qarm_features.config",
    "RQConfig": "qarm_features.config",
    "VQConfig": "qarm_features.config",
    "EncoderConfig": "qarm_features.config",
    "ItemAligner": "qarm_features.align.aligner",
    "BPRMF": "qarm_features.pairs.retrieval",
    "EncoderFineTuner": "qarm_features.content.finetune",
    "ResidualQuantizer": "qarm_features.codes.rq",
    "VQCoder": "qarm_features.codes.vq",
    "mine_pairs": "qarm_features.pairs.mining",
    "Bundle": "qarm_features.bundle.artifact",
    "load_bundle": "qarm_features.bundle.artifact",
    "get_bundle": "qarm_features.bundle.encode",
    "encode_items": "qarm_features.bundle.encode",
    "EncodedItems": "qarm_features.bundle.encode",
    "CodeSchema": "qarm_features.schema",
    "QarmError": "qarm_features.errors",
    "InputError": "qarm_features.errors",
    "ConfigError": "qarm_features.errors",
    "BundleError": "qarm_features.errors",
    "BundleVersionMismatch": "qarm_features.errors",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'qarm_features' has no attribute {name!r}")
