"""Online read latency of QARM features next to the same reads of plain features.

A temporary copy of ``feature_repo/`` gets a realistic random bundle (1,682 items as in
MovieLens-100k, 384-d raw embeddings as MiniLM gives, 64-d aligned, 3 x 64 RQ codes, VQ
k=25) and one extra *plain* view, ``item_plain`` (four scalar features per item: the
baseline any ranker already reads). ``qarm_features.feast.job.materialize`` fills the SQLite
online store. Then, for 1 and 32 items per request, interleaved (``benchmarks.timing``):

- ``plain``: ``item_plain:*``;
- ``raw``:   ``item_content:raw_emb`` (the frozen 384-d embedding, the "cascading" input);
- ``qarm``:  ``qarm:*`` (aligned 64-d, 3 RQ codes, 25 VQ codes, version);
- ``codes``: ``qarm:*`` without ``aligned_emb`` (what a ranker that learns code embeddings
  reads);
- ``cold``:  ``qarm_cold:*``, the on-demand view encoding 384-d request embeddings;

in process (``store.get_online_features``) and over HTTP against ``feast serve``
(one worker, ``--max-requests 0``, keep-alive connection, threads pinned to 1). Figures
are per-call medians and p99 in ms, and each case's median as a ratio to ``plain``.

Run: ``python -m benchmarks.online_latency [--calls 300] [--no-http] [--out file.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.timing import latencies, machine, ratio

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]

PLAIN_VIEW = '''
# Benchmark only: a plain item view (scalar features) to compare QARM reads against.
from datetime import timedelta

from feast import FeatureView, Field, FileSource
from feast.types import Float32, Int64

from feature_definitions import item

item_plain = FeatureView(
    name="item_plain",
    entities=[item],
    ttl=timedelta(0),
    schema=[
        Field(name="popularity", dtype=Int64),
        Field(name="avg_rating", dtype=Float32),
        Field(name="year", dtype=Int64),
        Field(name="n_ratings", dtype=Int64),
    ],
    source=FileSource(
        name="item_plain_source", path="data/item_plain.parquet", timestamp_field="event_timestamp"
    ),
    online=True,
)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEXT_VIEW = """\
# Benchmark only: the content-in cold view (codes from an item's text at request time).
from pathlib import Path

from feature_definitions import item
from qarm_features.feast.views import qarm_views

_views = qarm_views(item=item, repo=Path(__file__).resolve().parent, text_view=True)
qarm_cold_text_request = _views["qarm_cold_text_request"]
qarm_cold_text = _views["qarm_cold_text"]
"""


def build_repo(workdir: Path, *, n_items: int, raw_dim: int, out_dim: int, n_levels: int,
               n_codes: int, vq_k: int) -> tuple[Path, Path]:
    """A materialized temp repo (with ``item_plain``) and its bundle."""
    from qarm_features.bundle.testing import make_random_bundle
    from qarm_features.feast.job import materialize

    bundle = make_random_bundle(
        workdir / "bundle", n_items=n_items, raw_dim=raw_dim, out_dim=out_dim,
        hidden=0, n_levels=n_levels, n_codes=n_codes, vq_k=vq_k, seed=0,
    )
    repo = workdir / "repo"
    shutil.copytree(ROOT / "feature_repo", repo,
                    ignore=shutil.ignore_patterns("data", "__pycache__"))
    (repo / "bench_plain_view.py").write_text(PLAIN_VIEW)
    from qarm_features.feast.views import BATCH_VIEW_FILE

    batch = BATCH_VIEW_FILE.format(definitions="feature_definitions", item="item")
    (repo / "qarm_batch_view.py").write_text(batch)  # materialization bench times qarm_batch
    (repo / "qarm_text_view.py").write_text(TEXT_VIEW)  # the content-in cold view
    rng = np.random.default_rng(0)
    ids = np.arange(1, n_items + 1, dtype=np.int64)
    (repo / "data").mkdir(exist_ok=True)
    pd.DataFrame({
        "item_id": ids,
        "event_timestamp": pd.Timestamp("2020-01-01", tz="UTC"),
        "popularity": rng.integers(0, 1000, n_items),
        "avg_rating": rng.random(n_items).astype(np.float32) * 5,
        "year": rng.integers(1930, 1999, n_items),
        "n_ratings": rng.integers(0, 500, n_items),
    }).to_parquet(repo / "data" / "item_plain.parquet")
    # the plain file imports `feature_definitions` by name: feast apply puts the repo on
    # sys.path; qarm_features.feast.job.load_definitions does not, so add it here
    sys.path.insert(0, str(repo))
    try:
        materialize(bundle, repo)
    finally:
        sys.path.remove(str(repo))
    return repo, bundle


def _cases_inprocess(store, refs: dict, ids: np.ndarray, cold: np.ndarray, n: int) -> dict:
    rows = [{"item_id": int(i)} for i in ids[:n]]
    cold_rows = [{"raw_emb": r.tolist()} for r in cold[:n]]
    out = {}
    for name in ("plain", "raw", "qarm", "codes"):
        out[f"{name}/{n}"] = (lambda f=refs[name], r=rows: store.get_online_features(f, r))
    out[f"cold/{n}"] = lambda f=refs["cold"], r=cold_rows: store.get_online_features(f, r)
    return out


class _Http:
    """One keep-alive connection to the feature server."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, body: bytes) -> bytes:
        self.conn.request("POST", "/get-online-features", body,
                          {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:500]!r}")
        return data


def _cases_http(client: _Http, refs: dict, ids: np.ndarray, cold: np.ndarray, n: int) -> dict:
    out = {}
    for name in ("plain", "raw", "qarm", "codes"):
        body = json.dumps({"features": refs[name],
                           "entities": {"item_id": [int(i) for i in ids[:n]]}}).encode()
        out[f"{name}/{n}"] = lambda b=body: client.post(b)
    body = json.dumps({"features": refs["cold"],
                       "entities": {"raw_emb": [r.tolist() for r in cold[:n]]}}).encode()
    out[f"cold/{n}"] = lambda b=body: client.post(b)
    return out


@contextlib.contextmanager
def serve_process(command: list[str], *, cwd: Path, home: Path, log_name: str, port: int,
                  pythonpath_first: bool = False):  # fmt: skip
    """Run a serving command (its own process group, threads pinned, its own HOME) and
    yield ``port`` once ``/health`` answers 200; stop the group afterwards."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths] if pythonpath_first else [*paths, str(ROOT)])
    env.update(HOME=str(home), QARM_SERVING_THREADS="1", PYTHONWARNINGS="ignore")
    logf = open(home / log_name, "w")
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except urllib.error.HTTPError as exc:
                raise RuntimeError(f"/health answered {exc.code}: {exc.read()!r}") from None
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((home / log_name).read_text()[-3000:]) from None
                time.sleep(0.5)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        logf.close()


@contextlib.contextmanager
def _server(repo: Path, home: Path):
    """``feast serve`` (1 worker, never recycled) on a free port of the repo."""
    port = _free_port()
    command = [str(Path(sys.executable).parent / "feast"), "serve", "-h", "127.0.0.1", "-p",
               str(port), "--workers", "1", "--max-requests", "0", "--no-access-log"]  # fmt: skip
    with serve_process(command, cwd=repo, home=home, log_name="serve.log", port=port) as p:
        yield p


def _summarize(stats: dict) -> dict:
    out = {}
    for case, st in stats.items():
        name, n = case.split("/")
        base = stats[f"plain/{n}"].median
        out[case] = {
            "median_ms": round(st.median * 1e3, 3),
            "p99_ms": round(st.pct(99) * 1e3, 3),
            "ratio_to_plain": round(ratio(st.median, base), 2),
            "calls": len(st.times),
        }
    return out


def run(*, n_calls: int = 300, http: bool = True, n_items: int = 1682, raw_dim: int = 384,
        out_dim: int = 64, n_levels: int = 3, n_codes: int = 64, vq_k: int = 25,
        budget_s: float = 120.0) -> dict:
    """Build the repo, time every case in process and (optionally) over HTTP."""
    from feast import FeatureStore

    from qarm_features.feast.context import ServingContext, set_serving_threads

    workdir = Path(tempfile.mkdtemp(prefix="qarm-bench-online-"))
    try:
        repo, bundle = build_repo(workdir, n_items=n_items, raw_dim=raw_dim, out_dim=out_dim,
                                  n_levels=n_levels, n_codes=n_codes, vq_k=vq_k)
        store = FeatureStore(repo_path=str(repo))
        qarm_names = [f.name for f in store.get_feature_view("qarm").features]
        refs = {
            "plain": [f"item_plain:{n}" for n in ("popularity", "avg_rating", "year", "n_ratings")],
            "raw": ["item_content:raw_emb"],
            "qarm": [f"qarm:{n}" for n in qarm_names],
            "codes": [f"qarm:{n}" for n in qarm_names if n != "aligned_emb"],
            "cold": [f"qarm_cold:{n}" for n in qarm_names + ["qarm_error"]],
        }
        rng = np.random.default_rng(1)
        ids = rng.choice(np.arange(1, n_items + 1), size=32, replace=False)
        cold = rng.standard_normal((32, raw_dim)).astype(np.float32)
        set_serving_threads(1)  # pin like a server
        ServingContext.of_bundle(bundle).load()  # load the bundle before timing

        result: dict = {
            "setup": {"n_items": n_items, "raw_dim": raw_dim, "aligned_dim": out_dim,
                      "n_levels": n_levels, "n_codes": n_codes, "vq_k": vq_k,
                      "online_store": "sqlite", "threads": 1},
            "machine": machine(),
        }
        cases = {}
        for n in (1, 32):
            cases.update(_cases_inprocess(store, refs, ids, cold, n))
        stats = latencies(cases, n_calls=n_calls, block=10, warmup=5, budget_s=budget_s)
        result["in_process"] = _summarize(stats)
        if http:
            with _server(repo, workdir) as port:
                client = _Http(port)
                cases = {}
                for n in (1, 32):
                    cases.update(_cases_http(client, refs, ids, cold, n))
                stats = latencies(cases, n_calls=n_calls, block=10, warmup=5, budget_s=budget_s)
                result["http"] = _summarize(stats)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _table(title: str, rows: dict) -> str:
    lines = [title, f"{'case':<10}{'median ms':>11}{'p99 ms':>10}{'x plain':>9}"]
    for case, r in rows.items():
        lines.append(f"{case:<10}{r['median_ms']:>11.3f}{r['p99_ms']:>10.3f}"
                     f"{r['ratio_to_plain']:>9.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per case")
    parser.add_argument("--no-http", action="store_true", help="skip the feast serve part")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds per section")
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run(n_calls=args.calls, http=not args.no_http, budget_s=args.budget)
    print(_table("in process (store.get_online_features)", result["in_process"]))
    if "http" in result:
        print(_table("HTTP (feast serve, 1 worker, keep-alive)", result["http"]))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
