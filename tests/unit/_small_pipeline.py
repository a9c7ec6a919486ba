"""The small synthetic world and build configuration the pipeline tests fit on."""

from __future__ import annotations

from qarm_features.config import AlignerConfig, BuildConfig, PairsConfig, RQConfig, VQConfig


def small_config(max_epochs: int) -> BuildConfig:
    """A build fast enough for a unit test: tiny BPR, linear 8-d aligner, 2 x 8 RQ, k=4."""
    return BuildConfig(
        dataset="synthetic",
        pairs=PairsConfig(mf_epochs=5, mf_dim=8),
        aligner=AlignerConfig(
            out_dim=8, hidden=0, batch_size=64, max_epochs=max_epochs, patience=2
        ),
        rq=RQConfig(n_levels=2, n_codes=8, n_iter=5),
        vq=VQConfig(k=4),
    )


def small_world():
    """``(item_ids, content, interactions)``: 150 items, 200 users, 16-d content (seeded)."""
    import torch

    from qarm_features.datasets.synthetic import SyntheticWorld

    torch.set_num_threads(1)
    w = SyntheticWorld(n_items=150, n_users=200, content_dim=16, nuisance=2.0, seed=0)
    return w.item_ids, w.content, w.interactions(n_per_user=20)
