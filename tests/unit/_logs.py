"""Hand-made interaction logs shared by the pair-mining and retrieval tests."""

from __future__ import annotations

import numpy as np
import pandas as pd


def log_frame(rows):
    """rows: (user, item, rating, timestamp) -> the pipeline's interaction frame."""
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    dtypes = {"user_id": "int64", "item_id": "int64", "rating": "float32", "timestamp": "int64"}
    return df.astype(dtypes)


def cluster_log(seed=0, n_users=120, n_items=60, n_clusters=3, per_user=15):
    """Users engage items of their own taste cluster (rating 5) and a few others (rating 2).

    Returns ``(log, item_cluster)``; item ``i + 1`` is in cluster ``item_cluster[i]``.
    """
    rng = np.random.default_rng(seed)
    item_cluster = np.arange(n_items) % n_clusters
    rows, t = [], 0
    for u in range(n_users):
        c = u % n_clusters
        own = rng.choice(np.flatnonzero(item_cluster == c), per_user, replace=False)
        other = rng.choice(np.flatnonzero(item_cluster != c), 4, replace=False)
        for i in rng.permutation(np.r_[own, other]):
            rows.append((u, int(i) + 1, 5 if item_cluster[i] == c else 2, t))
            t += 1
    return log_frame(rows), item_cluster
