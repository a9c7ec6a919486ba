"""What the serving guard costs per request: our server next to plain ``feast serve``.

One repo (``benchmarks.online_latency.build_repo``: 1,682 items, raw 384-d, aligned 64-d,
3 x 64 RQ, VQ k=25, SQLite online store), two servers on it at once, one worker each,
threads pinned to 1, workers never recycled: ``feast serve`` and
``qarm serve``. The same requests go to both on one keep-alive
connection each, interleaved in blocks (``benchmarks.timing.latencies``):

- ``warm/1``, ``warm/32``: ``qarm:*`` without ``aligned_emb`` for 1 and 32 item ids;
- ``cold_b64/1``, ``cold_b64/32``: ``qarm_cold_b64:*`` for 1 and 32 base64 embeddings;
- ``cold_list/1``, ``cold_list/32``: ``qarm_cold:*`` for JSON lists of 384 floats (float
  literals only: plain Feast fails on an integer literal).

Figures: medians and p99 in ms, our median as a ratio to Feast's in the same run, and
(``x_warm``) each cold case's median over the same server's warm median of as many items
(> 1: the cold read is slower; 1 / x_warm is its throughput relative to warm at c=1).

Run: ``python -m benchmarks.serve_overhead [--calls 300] [--out file.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.online_latency import _free_port, _Http, _server, build_repo, serve_process
from benchmarks.timing import latencies, ratio


@contextlib.contextmanager
def _ours(repo: Path, home: Path):
    """``qarm serve`` (our guarded app, 1 worker) on a free port of the repo."""
    port = _free_port()
    command = [sys.executable, "-m", "qarm_features.app.cli", "serve", "--repo", str(repo),
               "--port", str(port), "--workers", "1"]  # fmt: skip
    with serve_process(command, cwd=None, home=home, log_name="ours.log", port=port,
                       pythonpath_first=True) as p:  # fmt: skip
        yield p


def _bodies(names: list[str], ids: np.ndarray, cold: np.ndarray) -> dict[str, bytes]:
    from transformations.on_demand import encode_b64

    codes = [f"qarm:{n}" for n in names if n != "aligned_emb"]
    cold_refs = [f"qarm_cold:{n}" for n in names + ["qarm_error"]]
    b64_refs = [f"qarm_cold_b64:{n}" for n in names + ["qarm_error"]]

    def body(features, entities):
        return json.dumps({"features": features, "entities": entities}).encode()

    return {
        "warm/1": body(codes, {"item_id": [int(ids[0])]}),
        "warm/32": body(codes, {"item_id": [int(i) for i in ids]}),
        "cold_b64/1": body(b64_refs, {"raw_emb_b64": [encode_b64(cold[0])]}),
        "cold_b64/32": body(b64_refs, {"raw_emb_b64": [encode_b64(r) for r in cold]}),
        "cold_list/1": body(cold_refs, {"raw_emb": [cold[0].tolist()]}),
        "cold_list/32": body(cold_refs, {"raw_emb": [r.tolist() for r in cold]}),
    }


def _by_name(resp: dict) -> dict:
    """Columns by feature name (Feast's column order changes from process to process)."""
    return dict(zip(resp["metadata"]["feature_names"], resp["results"]))


def run(*, n_calls: int = 300, budget_s: float = 150.0) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="qarm-bench-serve-"))
    try:
        repo, _ = build_repo(workdir, n_items=1682, raw_dim=384, out_dim=64, n_levels=3,
                             n_codes=64, vq_k=25)
        from qarm_features.schema import CodeSchema

        names = list(CodeSchema(3).feature_names)
        rng = np.random.default_rng(1)
        ids = rng.choice(np.arange(1, 1683), size=32, replace=False)
        cold = rng.standard_normal((32, 384)).astype(np.float32)
        bodies = _bodies(names, ids, cold)
        (workdir / "h1").mkdir()
        (workdir / "h2").mkdir()
        with _server(repo, workdir / "h1") as feast_port, _ours(repo, workdir / "h2") as port:
            clients = {"feast": _Http(feast_port), "ours": _Http(port)}
            for case, body in bodies.items():  # same answers from both, before timing
                a, b = (_by_name(json.loads(c.post(body))) for c in clients.values())
                assert a == b, case
            cases = {
                f"{who}:{case}": (lambda c=c, b=body: c.post(b))
                for case, body in bodies.items()
                for who, c in clients.items()
            }
            stats = latencies(cases, n_calls=n_calls, block=20, warmup=20, budget_s=budget_s)
        out = {}
        for case in bodies:
            f, o = stats[f"feast:{case}"], stats[f"ours:{case}"]
            out[case] = {
                "feast_median_ms": round(f.median * 1e3, 3),
                "ours_median_ms": round(o.median * 1e3, 3),
                "feast_p99_ms": round(f.pct(99) * 1e3, 3),
                "ours_p99_ms": round(o.pct(99) * 1e3, 3),
                "ratio": round(ratio(o.median, f.median), 3),
                "calls": len(o.times),
            }
        for case, row in out.items():
            warm = out.get(f"warm/{case.split('/')[1]}")
            if case.startswith("cold") and warm:
                row["feast_x_warm"] = round(ratio(row["feast_median_ms"], warm["feast_median_ms"]), 3)
                row["ours_x_warm"] = round(ratio(row["ours_median_ms"], warm["ours_median_ms"]), 3)
        return out
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    result = run(n_calls=a.calls, budget_s=a.budget_s)
    print(f"{'case':<14}{'feast ms':>10}{'ours ms':>10}{'ratio':>8}{'p99 f/o':>18}"
          f"{'x warm f/o':>14}")
    for case, r in result.items():
        p99 = f"{r['feast_p99_ms']:.2f}/{r['ours_p99_ms']:.2f}"
        xw = f"{r['feast_x_warm']:.2f}/{r['ours_x_warm']:.2f}" if "ours_x_warm" in r else "-"
        print(f"{case:<14}{r['feast_median_ms']:>10.3f}{r['ours_median_ms']:>10.3f}"
              f"{r['ratio']:>8.2f}{p99:>18}{xw:>14}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
