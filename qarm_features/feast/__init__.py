"""The Feast layer of qarm-features: everything that talks to a feature repo.

    context      which bundle a repo serves (pointer, serving context, thread policy)
    views        Feast fields and the cold/batch views, derived from the code schema
    sources      the offline sources: encode the catalog, user histories, atomic parquet
    job          ``qarm materialize``: sources -> apply -> materialize; push; SDK apply
    store        the repo's Feast objects: store, definitions, registry facts
    server       ``qarm serve``: Feast's app behind request checks, limits, health
    serving      version checks, ``qarm status``, the checked in-process read, warm-up
    rollout      one run at a time per repo: lock, journal, finish or roll back
    redis_store  Feast's Redis online store, unknown entities read as NOT_FOUND
    duckdb_store Feast's DuckDB offline store (the default): BatchFeatureView input,
                 repo-relative paths, atomic push appends

The CLI and applications import this layer; the UDF bodies (``transformations/``) sit
above it and the core (bundle, encode, schema) below. Names are imported lazily, so
``import qarm_features.feast.context`` does not load Feast's SDK.
"""

from __future__ import annotations

import importlib
import logging


class _FileRegistryFlagNote(logging.Filter):
    """Drop Feast 0.67's warning that ``serve_features_while_materializing`` "typically has
    no effect" on a file registry: it does (reads of a view left MATERIALIZING by a killed
    run are served), and every QARM repo sets it (docs/upstream-feast-issues.md)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`serve_features_while_materializing` is enabled but" not in str(record.msg)


logging.getLogger("feast.repo_config").addFilter(_FileRegistryFlagNote())

_API = {
    "ServingContext": "qarm_features.feast.context",
    "read_pointer": "qarm_features.feast.context",
    "materialize": "qarm_features.feast.job",
    "prepare_sources": "qarm_features.feast.job",
    "apply": "qarm_features.feast.job",
    "push_items": "qarm_features.feast.job",
    "open_store": "qarm_features.feast.job",
    "check_versions": "qarm_features.feast.serving",
    "get_online_features": "qarm_features.feast.serving",
    "sample_online": "qarm_features.feast.serving",
    "serving_setup": "qarm_features.feast.serving",
    "feast_fields": "qarm_features.feast.views",
    "cold_view": "qarm_features.feast.views",
    "batch_view": "qarm_features.feast.views",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'qarm_features.feast' has no attribute {name!r}")
