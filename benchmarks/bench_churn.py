"""Code churn across retrains on MovieLens-100k, cold vs warm-started (``qarm build
--warm-start``): a rebuild with another seed, and a rebuild after the next 10% of the log;
fractions of items whose codes changed, and the VQ top-K overlap.

    python -m benchmarks.bench_churn [--out benchmarks/results/churn.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def run(out: Path) -> dict:
    import torch

    from qarm_features.build.bundles import build_bundle, encode_catalog_text
    from qarm_features.build.stable import churn
    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.config import BuildConfig
    from qarm_features.datasets.movielens import fetch_movielens_100k, load_movielens_100k

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="qarm-churn-"))
    t0 = time.perf_counter()
    ml = load_movielens_100k(fetch_movielens_100k())
    cfg = BuildConfig()
    raw = encode_catalog_text(ml.items["text"].tolist(), cfg)
    ids = ml.items["item_id"].to_numpy()
    log = ml.interactions.sort_values("timestamp", kind="stable")
    kw = dict(item_ids=ids, raw_emb=raw)
    # a rebuild of the same data with another seed, cold and warm-started
    base = build_bundle(work / "seed0", interactions=log, config=cfg.with_seed(0), **kw)
    other = cfg.with_seed(1)
    cold = build_bundle(work / "seed1-cold", interactions=log, config=other, **kw)
    warm = build_bundle(
        work / "seed1-warm", interactions=log, config=other, warm_start=base.path, **kw
    )
    old = load_bundle(base.path)
    # a weekly retrain: the base saw the first 90% of the log (by time), the rebuild all of it
    first = log.iloc[: int(0.9 * len(log))]
    kw["config"] = cfg
    b90 = build_bundle(work / "90", interactions=first, **kw)
    cold_all = build_bundle(work / "100-cold", interactions=log, **kw)
    warm_all = build_bundle(work / "100-warm", interactions=log, warm_start=b90.path, **kw)
    old90 = load_bundle(b90.path)
    result = {
        "data": "movielens-100k",
        "rebuild": "same data, another seed (BuildConfig().with_seed(1))",
        "cold": churn(load_bundle(cold.path), old),
        "warm_start": churn(load_bundle(warm.path), old),
        "next_10pct_of_log": {
            "cold": churn(load_bundle(cold_all.path), old90),
            "warm_start": churn(load_bundle(warm_all.path), old90),
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python -m benchmarks.bench_churn",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/churn.json")
    print(json.dumps(run(Path(p.parse_args().out)), indent=2))
