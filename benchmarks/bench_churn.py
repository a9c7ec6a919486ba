"""Code churn across retrains on MovieLens-100k: a rebuild with another seed, cold vs
warm-started (``qarm build --warm-start``); fractions of items whose codes changed.

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

    from qarm_features.build import build_movielens
    from qarm_features.bundle import load_bundle
    from qarm_features.config import BuildConfig
    from qarm_features.stable import churn

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="qarm-churn-"))
    t0 = time.perf_counter()
    base = build_movielens(work / "seed0", config=BuildConfig().with_seed(0))
    other = BuildConfig().with_seed(1)
    cold = build_movielens(work / "seed1-cold", config=other)
    warm = build_movielens(work / "seed1-warm", config=other, warm_start=base.path)
    old = load_bundle(base.path)
    result = {
        "data": "movielens-100k",
        "rebuild": "same data, another seed (BuildConfig().with_seed(1))",
        "cold": churn(load_bundle(cold.path), old),
        "warm_start": churn(load_bundle(warm.path), old),
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
