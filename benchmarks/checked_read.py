"""What the checked in-process read costs: ``serving.get_online_features`` next to Feast's
``store.get_online_features`` on the same store, same requests, interleaved in blocks.

One repo (``benchmarks.online_latency.build_repo``: 1,682 items, raw 384-d, aligned 64-d,
3 x 64 RQ, VQ k=25, SQLite online store), threads pinned to 1. Cases: ``warm/1`` and
``warm/32`` (``qarm:rq_code_l1``, ``qarm:vq_codes`` for 1 and 32 ids); ``cold/1`` and
``cold/32`` (``qarm_cold:*`` for float32 numpy embeddings, the fast in-process form).

Figures: medians in ms and ours as a ratio to Feast's in the same run.

Run: ``python -m benchmarks.checked_read [--calls 300]``.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

from benchmarks.online_latency import build_repo
from benchmarks.timing import latencies, ratio, threads


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from qarm_features.bundle.encode import get_bundle
    from qarm_features.feast.serving import get_online_features
    from qarm_features.feast.store import open_store

    with tempfile.TemporaryDirectory() as tmp, threads(1):
        repo, bundle = build_repo(Path(tmp), n_items=1682, raw_dim=384, out_dim=64, n_levels=3,
                                  n_codes=64, vq_k=25)  # fmt: skip
        store = open_store(repo)
        raw = get_bundle(bundle).raw_emb
        cold = ["qarm_cold:rq_code_l1", "qarm_cold:vq_codes", "qarm_cold:qarm_error"]
        warm = ["qarm:rq_code_l1", "qarm:vq_codes"]
        requests = {
            "warm/1": (warm, [{"item_id": 50}]),
            "warm/32": (warm, [{"item_id": i} for i in range(1, 33)]),
            "cold/1": (cold, [{"raw_emb": raw[0]}]),
            "cold/32": (cold, [{"raw_emb": r} for r in raw[:32]]),
        }  # fmt: skip
        cases = {}
        for name, (refs, rows) in requests.items():
            cases[f"feast {name}"] = lambda r=refs, e=rows: store.get_online_features(r, e)
            cases[f"checked {name}"] = lambda r=refs, e=rows: get_online_features(store, r, e)
        stats = latencies(cases, n_calls=args.calls)
    out = {}
    print(f"{'request':10s} {'feast ms':>9s} {'checked ms':>11s} {'ratio':>6s}")
    for name in requests:
        f, c = stats[f"feast {name}"].median * 1e3, stats[f"checked {name}"].median * 1e3
        out[name] = {"feast_ms": f, "checked_ms": c, "ratio": ratio(c, f)}
        print(f"{name:10s} {f:9.3f} {c:11.3f} {ratio(c, f):6.2f}")
    return out


if __name__ == "__main__":
    main()
