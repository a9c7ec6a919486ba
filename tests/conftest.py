"""Shared fixtures: seeded tiny bundles and one thread for torch/BLAS in unit tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Tests that can never run on a machine without a GPU (CI's) say so here, once."""
    if not any("cuda" in item.keywords for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine; CI has none)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory):
    """A small valid bundle (200 items, raw 32-d, aligned 16-d, 3x16 RQ, VQ k=5)."""
    from qarm_features.bundle.testing import make_random_bundle

    return make_random_bundle(tmp_path_factory.mktemp("bundles") / "b0")
