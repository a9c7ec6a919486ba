"""Feast: online reads in process, HTTP under bounded load, materialization rows/s.

The repo is the Feast engineer's harness (:func:`benchmarks.online_latency.build_repo`: a
temporary copy of ``feature_repo/`` with a random 384-d bundle, materialized into SQLite).
This module adds the baseline the figures are divided by: ``item_plain_int``, a plain view
with as many Int64 features as the ``qarm`` view has features (``L + 3``), same items.

- in process: ``get_online_features`` of all ``qarm`` features vs all ``item_plain_int``
  features, 1 and 32 items; the cold path (on-demand views) vs the plain read in its three
  request forms: ``qarm_cold`` with 384 floats per item as a list (``cold``) or as a float32
  array (``cold_array``, in-process callers), and ``qarm_cold_b64`` with base64 float32
  bytes (``cold_b64``, what an HTTP client sends); the same view's UDF called without
  Feast's typing (``cold_direct``: ``read_path.FastReader.cold_columns``, float32 arrays);
  and our share of the cold path (:func:`transformations.on_demand.encode_request` alone).
  Thread pools pinned to 1.
- HTTP: ``feast serve`` (1 worker, ``--max-requests 0``, threads pinned) and ``qarm serve``
  (the same, on the same repo, interleaved; cases ``serve:*``), closed-loop load at a few
  concurrencies (:mod:`benchmarks.loadgen`, its own process), plain / warm qarm / cold
  qarm (JSON list) / cold qarm_cold_b64 (base64 string), 1 and 32 items; requests/s and
  p99 at each concurrency.
A second baseline, ``item_plain_arrays``, has exactly the ``qarm`` view's payload (a 64-float
array, L Int64, a 25-int array, a string) with no QARM machinery: what Feast itself costs
for features of that size.

- materialization: ``store.materialize`` of ``item_plain_int``, ``item_plain_arrays``,
  ``qarm`` (precomputed rows
  with array features) and ``qarm_batch`` (our encode running inside Feast's compute engine)
  into SQLite, and into Redis when ``redis-server`` is on PATH; rows/s, interleaved.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.timing import env_vars as _env
from benchmarks.timing import interleave, latencies, ratio

log = logging.getLogger(__name__)

PLAIN_INT_VIEW = '''
# Benchmark only: {n} plain Int64 features per item, the baseline of the QARM reads.
from datetime import timedelta

from feast import FeatureView, Field, FileSource
from feast.types import Int64

from feature_definitions import item

item_plain_int = FeatureView(
    name="item_plain_int",
    entities=[item],
    ttl=timedelta(0),
    schema=[Field(name=f"f{{i}}", dtype=Int64) for i in range(1, {n} + 1)],
    source=FileSource(
        name="item_plain_int_source", path="data/item_plain_int.parquet",
        timestamp_field="event_timestamp",
    ),
    online=True,
)
'''
PLAIN_ARRAYS_VIEW = '''
# Benchmark only: plain features with the qarm view's payload (same types and sizes).
from datetime import timedelta

from feast import FeatureView, Field, FileSource
from feast.types import Array, Float32, Int64, String

from feature_definitions import item

item_plain_arrays = FeatureView(
    name="item_plain_arrays",
    entities=[item],
    ttl=timedelta(0),
    schema=[Field(name="emb", dtype=Array(Float32))]
    + [Field(name=f"code{{i}}", dtype=Int64) for i in range(1, {levels} + 1)]
    + [Field(name="ids", dtype=Array(Int64)), Field(name="tag", dtype=String)],
    source=FileSource(
        name="item_plain_arrays_source", path="data/item_plain_arrays.parquet",
        timestamp_field="event_timestamp",
    ),
    online=True,
)
'''
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
SLO_P99_MS = 5.0


@contextlib.contextmanager
def _quiet():
    """Feast prints materialization progress to stdout/stderr; keep the bench output clean."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def _on_path(path: Path):
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(path))


def setup(work: Path, *, n_items: int) -> dict:
    """The harness repo plus ``item_plain_int``; returns paths, refs and ids."""
    from feast import FeatureStore

    from benchmarks.online_latency import build_repo
    from qarm_features.feast.job import apply

    with _quiet():
        repo, bundle = build_repo(work, n_items=n_items, raw_dim=384, out_dim=64, n_levels=3,
                                  n_codes=64, vq_k=25)  # fmt: skip
    store = FeatureStore(repo_path=str(repo))
    qarm_names = [f.name for f in store.get_feature_view("qarm").features]
    n_plain = len(qarm_names)
    rng = np.random.default_rng(0)
    ids = np.arange(1, n_items + 1, dtype=np.int64)
    data = {"item_id": ids, "event_timestamp": pd.Timestamp("2020-01-01", tz="UTC")}
    for i in range(1, n_plain + 1):
        data[f"f{i}"] = rng.integers(0, 1 << 40, n_items)
    pd.DataFrame(data).to_parquet(repo / "data" / "item_plain_int.parquet")
    (repo / "bench_plain_int_view.py").write_text(PLAIN_INT_VIEW.format(n=n_plain))
    levels = n_plain - 3
    arrays = {"item_id": ids, "event_timestamp": pd.Timestamp("2020-01-01", tz="UTC"),
              "emb": list(rng.standard_normal((n_items, 64)).astype(np.float32))}  # fmt: skip
    for i in range(1, levels + 1):
        arrays[f"code{i}"] = rng.integers(0, 64, n_items)
    arrays["ids"] = list(rng.integers(1, n_items + 1, (n_items, 25)))
    arrays["tag"] = "qarm-0123456789abcdef"
    pd.DataFrame(arrays).to_parquet(repo / "data" / "item_plain_arrays.parquet")
    (repo / "bench_plain_arrays_view.py").write_text(PLAIN_ARRAYS_VIEW.format(levels=levels))
    with _on_path(repo), _quiet():
        apply(repo, bundle)
        store = FeatureStore(repo_path=str(repo))
        store.materialize(EPOCH, datetime.now(timezone.utc) + timedelta(seconds=1),
                          feature_views=["item_plain_int", "item_plain_arrays"])  # fmt: skip
    refs = {
        "plain": [f"item_plain_int:f{i}" for i in range(1, n_plain + 1)],
        "plain_arrays": [f"item_plain_arrays:{n}" for n in
                         ["emb", *[f"code{i}" for i in range(1, levels + 1)], "ids", "tag"]],
        "qarm": [f"qarm:{n}" for n in qarm_names],
        "cold": [f"qarm_cold:{n}" for n in qarm_names + ["qarm_error"]],
        "cold_b64": [f"qarm_cold_b64:{n}" for n in qarm_names + ["qarm_error"]],
        "cold_text": [f"qarm_cold_text:{n}" for n in qarm_names + ["qarm_error"]],
    }
    return {"repo": repo, "bundle": bundle, "refs": refs, "ids": ids, "n_features": n_plain}


# ----------------------------------------------------------------------------- in process
def bench_online(env: dict, *, n_calls: int, budget_s: float) -> dict:
    """p50/p99 of in-process reads, interleaved in blocks; ratios to the plain read."""
    from feast import FeatureStore

    from qarm_features.bundle.encode import pin_threads
    from qarm_features.feast.context import ServingContext, set_serving_threads
    from qarm_features.feast.read_path import FastReader
    from transformations import on_demand

    pin_threads(1)
    set_serving_threads(1)
    context = ServingContext.of_bundle(env["bundle"])
    context.load()  # warm, like a server's start-up
    store = FeatureStore(repo_path=str(env["repo"]))
    reader = FastReader(store)
    refs = env["refs"]
    rng = np.random.default_rng(1)
    ids = rng.choice(env["ids"], size=32, replace=False)
    cold = rng.standard_normal((32, 384)).astype(np.float32)
    cases = {}
    for n in (1, 32):
        rows = [{"item_id": int(i)} for i in ids[:n]]
        cold_rows = [{"raw_emb": r.tolist()} for r in cold[:n]]
        array_rows = [{"raw_emb": r} for r in cold[:n]]
        b64_rows = [{"raw_emb_b64": on_demand.encode_b64(r)} for r in cold[:n]]
        text_rows = [{"text": f"A brand-new film number {i} (1998)"} for i in range(n)]
        cases[f"plain/{n}"] = lambda r=rows: store.get_online_features(refs["plain"], r)
        cases[f"qarm/{n}"] = lambda r=rows: store.get_online_features(refs["qarm"], r)
        cases[f"plain_arrays/{n}"] = lambda r=rows: store.get_online_features(refs["plain_arrays"], r)
        cases[f"cold/{n}"] = lambda r=cold_rows: store.get_online_features(refs["cold"], r)
        cases[f"cold_array/{n}"] = lambda r=array_rows: store.get_online_features(refs["cold"], r)
        cases[f"cold_b64/{n}"] = lambda r=b64_rows: store.get_online_features(refs["cold_b64"], r)
        cases[f"cold_text/{n}"] = lambda r=text_rows: store.get_online_features(refs["cold_text"], r)
        arrays = {"raw_emb": list(cold[:n])}
        cases[f"cold_direct/{n}"] = lambda e=arrays: reader.cold_columns("qarm_cold", e)
        raw_lists = [r.tolist() for r in cold[:n]]
        cases[f"cold_encode_only/{n}"] = lambda r=raw_lists: on_demand.encode_request(context, r)
    stats = latencies(cases, n_calls=n_calls, block=10, warmup=10, budget_s=budget_s)
    out = {}
    for case, st in stats.items():
        n = case.split("/")[1]
        base = stats[f"plain/{n}"]
        same_payload = stats[f"plain_arrays/{n}"]
        out[case] = {
            "p50_ratio_to_plain_arrays": ratio(st.pct(50), same_payload.pct(50)),
            "p50_ms": st.pct(50) * 1e3,
            "p99_ms": st.pct(99) * 1e3,
            "calls": len(st.times),
            "p50_ratio_to_plain": ratio(st.pct(50), base.pct(50)),
            "p99_ratio_to_plain": ratio(st.pct(99), base.pct(99)),
            "p50_delta_ms_vs_plain": (st.pct(50) - base.pct(50)) * 1e3,
        }
    return {"n_features": env["n_features"], "threads": 1, "cases": out}


# ----------------------------------------------------------------------------- HTTP
def bench_http(env: dict, work: Path, *, concurrencies: tuple[int, ...], duration: float,
               repeats: int, sizes: tuple[int, ...] = (1, 32),
               server_env: dict | None = None,
               kinds: tuple[str, ...] = ("plain", "qarm", "cold", "cold_b64"),
               with_qarm: bool = False,
               ) -> dict:  # fmt: skip
    """Closed-loop load on ``feast serve`` at each concurrency; plain vs warm vs cold.

    ``server_env``: extra environment of the server process (e.g. ``OMP_NUM_THREADS=1``).
    ``with_qarm``: ``qarm serve`` on the same repo at the same time (one worker, never
    recycled, registry ttl 60 s, as ``feast serve``), the same bodies interleaved with
    ``feast serve``'s; its cases are named ``serve:<case>``.
    """
    from benchmarks.online_latency import _server
    from benchmarks.serve_overhead import _ours
    from transformations import on_demand

    refs = env["refs"]
    rng = np.random.default_rng(2)
    ids = rng.choice(env["ids"], size=max(sizes), replace=False)
    cold = rng.standard_normal((max(sizes), 384)).astype(np.float32)
    bodies = {}
    for n in sizes:
        ent = {"item_id": [int(i) for i in ids[:n]]}
        bodies[f"plain/{n}"] = {"features": refs["plain"], "entities": ent}
        bodies[f"qarm/{n}"] = {"features": refs["qarm"], "entities": ent}
        bodies[f"cold/{n}"] = {"features": refs["cold"],
                               "entities": {"raw_emb": [r.tolist() for r in cold[:n]]}}  # fmt: skip
        bodies[f"cold_b64/{n}"] = {"features": refs["cold_b64"],
                                   "entities": {"raw_emb_b64": [on_demand.encode_b64(r)
                                                                for r in cold[:n]]}}  # fmt: skip
    bodies = {k: v for k, v in bodies.items() if k.split("/")[0] in kinds}
    files = {}
    for name, body in bodies.items():
        p = work / f"body-{name.replace('/', '-')}.json"
        p.write_bytes(json.dumps(body).encode())
        files[name] = p
    env_vars = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env_vars["PYTHONPATH"] = root + (os.pathsep + env_vars["PYTHONPATH"] if env_vars.get("PYTHONPATH") else "")
    who = {"": None, "serve:": None} if with_qarm else {"": None}
    cases = [(prefix, name) for name in bodies for prefix in who]
    raw: dict[str, dict[int, list[dict]]] = {p + n: {c: [] for c in concurrencies} for p, n in cases}
    home = work / "serve-home"
    (home / "qarm").mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_env(**(server_env or {})))
        who[""] = stack.enter_context(_server(env["repo"], home))
        if with_qarm:
            who["serve:"] = stack.enter_context(_ours(env["repo"], home / "qarm"))
        for prefix, name in cases:  # warm every path (cold: bundle already warm at start-up)
            _load(who[prefix], files[name], 1, 0.3, env_vars)
        for c in concurrencies:
            for r in range(repeats):
                for prefix, name in cases if r % 2 == 0 else cases[::-1]:
                    run = _load(who[prefix], files[name], c, duration, env_vars)
                    raw[prefix + name][c].append(run)
    out = {}
    for name, by_c in raw.items():
        levels = {}
        for c, runs in by_c.items():
            levels[c] = {
                "rps": float(np.median([x["rps"] for x in runs])),
                "p50_ms": float(np.median([x["p50_ms"] for x in runs if x["p50_ms"] is not None] or [np.nan])),
                "p99_ms": float(np.median([x["p99_ms"] for x in runs if x["p99_ms"] is not None] or [np.nan])),
                "errors": int(sum(x["errors"] for x in runs)),
            }
        ok = [lv for lv in levels.values() if lv["p99_ms"] < SLO_P99_MS and lv["errors"] == 0]
        out[name] = {
            "levels": levels,
            "rps_at_p99_slo": max((lv["rps"] for lv in ok), default=0.0),
            "max_rps": max(lv["rps"] for lv in levels.values()),
        }
    for name, row in out.items():
        prefix = "serve:" if name.startswith("serve:") else ""
        base = out.get(f"{prefix}plain/{name.split('/')[1]}")
        row["max_rps_ratio_to_plain"] = ratio(row["max_rps"], base["max_rps"]) if base else None
    return {"slo_p99_ms": SLO_P99_MS, "workers": 1, "duration_s": duration, "repeats": repeats,
            "server_env": server_env or {}, "cases": out}  # fmt: skip


def serve_rows(http: dict, fmt, met) -> list[tuple]:
    """Summary rows of ``qarm serve`` (issue 21's table): max req/s (p99 ms at it) of ours
    against ``feast serve`` and against our own warm read, from one :func:`bench_http` run."""

    def best(row: dict) -> str:
        lv = max(row["levels"].values(), key=lambda x: x["rps"])
        return f"{fmt(lv['rps'])} ({fmt(lv['p99_ms'], 1)})"

    rows = []
    specs = [  # (case, label, baseline case, baseline label, target)
        ("qarm/1", "warm (qarm)", "qarm/1", "feast serve warm", None),
        ("qarm/32", "warm (qarm)", "qarm/32", "feast serve warm", 1.3),
        ("cold_b64/1", "cold (qarm_cold_b64)", "serve:qarm/1", "qarm serve warm", 0.9),
        ("cold_b64/32", "cold (qarm_cold_b64)", "serve:qarm/32", "qarm serve warm", 0.9),
        ("cold/1", "cold (qarm_cold, JSON list)", "serve:qarm/1", "qarm serve warm", None),
        ("cold/32", "cold (qarm_cold, JSON list)", "serve:qarm/32", "qarm serve warm", None),
        ("cold_b64/1", "cold (qarm_cold_b64)", "cold_b64/1", "feast serve cold", None),
    ]
    for case, label, base_case, base_label, target in specs:
        ours, base = http.get(f"serve:{case}"), http.get(base_case)
        if ours is None or base is None:
            continue
        r = ratio(ours["max_rps"], base["max_rps"])
        n = case.split("/")[1]
        rows.append((f"HTTP qarm serve, {label}, {n} item(s): max req/s (p99 ms at it)",
                     best(ours), f"{base_label} {best(base)}", f"{fmt(r)}x",
                     f">= {target}x" if target else "–",
                     met(r >= target) if target else "–"))  # fmt: skip
    return rows


def _load(port: int, body_file: Path, concurrency: int, duration: float, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.loadgen", str(port), str(body_file), str(concurrency),
         str(duration)],
        check=False, capture_output=True, text=True, env=env, timeout=duration + 120,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- materialize
def bench_materialize(env: dict, *, repeats: int, redis: bool = True) -> dict:
    """rows/s of ``store.materialize`` per view, interleaved; SQLite, and Redis if present."""
    from feast import FeatureStore

    from qarm_features.feast.job import apply, open_store

    repo, n = env["repo"], len(env["ids"])
    views = ["item_plain_int", "item_plain_arrays", "qarm", "qarm_batch"]
    out = {"rows": n}

    def cases_for(store):
        def mat(view):
            def run():
                with _quiet():
                    store.materialize(EPOCH, datetime.now(timezone.utc) + timedelta(seconds=1),
                                      feature_views=[view])  # fmt: skip

            return run

        return {v: mat(v) for v in views}

    # the qarm_batch UDF's source carries its bundle (the repo's serving context)
    with _on_path(repo):
        stats = interleave(cases_for(FeatureStore(repo_path=str(repo))), repeats=repeats, warmup=0)
    out["sqlite"] = _mat_rows(stats, n)
    server = shutil.which("redis-server")
    if not redis:
        out["redis"] = {"skipped": "disabled"}
    elif server is None:
        out["redis"] = {"skipped": "redis-server not on PATH"}
    else:
        with _redis(server) as conn, _on_path(repo), _env(QARM_REDIS=conn):
            try:
                with _quiet():
                    apply(repo, env["bundle"], fs_yaml_file="feature_store.redis.yaml")
                store = open_store(repo, "feature_store.redis.yaml")
                stats = interleave(cases_for(store), repeats=repeats, warmup=0)
                out["redis"] = _mat_rows(stats, n)
            except Exception as exc:
                out["redis"] = {"skipped": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def _mat_rows(stats: dict, n: int) -> dict:
    base = n / stats["item_plain_int"].median
    same_payload = n / stats["item_plain_arrays"].median
    return {
        view: {"median_s": st.median, "rows_per_s": n / st.median,
               "ratio_to_plain": ratio(n / st.median, base),
               "ratio_to_plain_arrays": ratio(n / st.median, same_payload)}  # fmt: skip
        for view, st in stats.items()
    }


@contextlib.contextmanager
def _redis(server: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="qarm-bench-redis-")
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", tmp],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- section
def run(quick: bool, work: Path) -> dict:
    """All Feast figures at the quick or full size."""
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = setup(work, n_items=3_000 if quick else 50_000)
    result = {"setup_s": time.perf_counter() - t0, "n_items": len(env["ids"]),
              "n_features": env["n_features"]}  # fmt: skip
    result["online"] = bench_online(env, n_calls=200 if quick else 2000,
                                    budget_s=12 if quick else 180)  # fmt: skip
    # feast serve and qarm serve side by side, the same bodies interleaved
    result["http"] = bench_http(
        env, work, concurrencies=(1, 4) if quick else (1, 2, 4, 8),
        duration=1.0 if quick else 5.0, repeats=1 if quick else 2, sizes=(1, 32),
        with_qarm=True,
    )  # fmt: skip
    # The same server with OMP_NUM_THREADS=1: faiss.omp_set_num_threads (what pin_threads
    # calls) sets the OpenMP thread count of the calling thread only, and feast serve runs
    # requests on other threads, so the cold path's faiss search runs on 2 OpenMP threads
    # unless the environment sets the default for every thread.
    result["http_omp1"] = bench_http(
        env, work, concurrencies=(1, 4) if quick else (1, 2, 4), duration=1.0 if quick else 5.0,
        repeats=1 if quick else 2, sizes=(1,), server_env={"OMP_NUM_THREADS": "1"},
        kinds=("qarm", "cold", "cold_b64"),
    )  # fmt: skip
    result["materialize"] = bench_materialize(env, repeats=1 if quick else 3)
    return result
