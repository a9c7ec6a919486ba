"""Feast-facing transformations of QARM features, thin wrappers over ``qarm_features.encode``.

    batch        catalog -> ``qarm`` rows (the one batch function) and user histories
    on_demand    request-time codes of cold items (the ``qarm_cold`` on-demand view)
    job          ``qarm materialize``: sources -> apply -> materialize; push; SDK apply
    serving      version checks, ``feast serve`` warm-up, a ranker-style sample read
    bundle_ref   which bundle a feature repo serves, without loading it
    redis_store  Feast's Redis online store, unknown entities read as NOT_FOUND

The names below are imported lazily: a UDF that imports ``transformations.on_demand``
loads only what the request path needs.
"""

from __future__ import annotations

import importlib

_API = {
    "materialize": "transformations.job",
    "prepare_sources": "transformations.job",
    "apply": "transformations.job",
    "push_items": "transformations.job",
    "check_versions": "transformations.serving",
    "sample_online": "transformations.serving",
    "serving_setup": "transformations.serving",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'transformations' has no attribute {name!r}")
