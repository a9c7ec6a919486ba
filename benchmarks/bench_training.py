"""Training data: ``get_historical_features(qarm_ranker)`` rows/s, and rows returned/asked.

A ranker's training set is its event log joined point in time with ``qarm`` (codes),
``item_content`` (the frozen embedding) and ``user_history`` (the user's latest positives
and their codes): the ``qarm_ranker`` feature service. The repo is a temporary copy of
``feature_repo/`` with a random bundle (384-d raw, 64-d aligned, 3 x 64 RQ, VQ k = 25, the
MovieLens shapes) and a synthetic event log written through the real job
(:func:`qarm_features.feast.job.prepare_sources`: codes, content and point-in-time user
histories). The entity rows are the events themselves (user, item, time, label), as a
training set is: a user's first events precede any history row of that user.

Each case runs in its own child process (peak RSS is its own): the repo's default offline
store (DuckDB, ``qarm_features.feast.duckdb_store``) at up to 1M entity rows, and Feast's
file (dask) store on a smaller n, in the same run. Timed: ``get_historical_features(...)
.to_arrow()`` (what a trainer streaming into torch reads) and, up to ``DF_MAX_ROWS``,
``.to_df()`` too (the pandas frame ``examples/feast_ranker.py`` uses). Reported: seconds,
rows/s, rows returned / rows asked, the fraction of rows with no history yet (nulls).
Target (DESIGN.md, issue 9): >= 50k rows/s at 1M rows on 2 cores, every row returned.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.timing import fmt, run_child

ROOT = Path(__file__).resolve().parents[1]
DUCKDB = "qarm_features.feast.duckdb_store.QarmDuckDBOfflineStore"
TARGET_ROWS_PER_S = 50_000
DF_MAX_ROWS = 200_000  # to_df() of 1M rows with 384-d embeddings: ~3 GiB of Python objects


def setup(work: Path, *, n_items: int, n_users: int, per_user: int, seed: int = 0) -> dict:
    """The repo (sources written, definitions applied) and the entity rows' parquet."""
    from qarm_features.bundle.testing import make_random_bundle
    from qarm_features.feast.job import apply, prepare_sources

    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    bundle = make_random_bundle(
        work / "bundle", n_items=n_items, raw_dim=384, out_dim=64, hidden=0, n_levels=3,
        n_codes=64, vq_k=25, seed=seed,
    )  # fmt: skip
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(
        ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__")
    )
    rng = np.random.default_rng(seed)
    n = n_users * per_user
    users = np.repeat(np.arange(1, n_users + 1, dtype=np.int64), per_user)
    base = 883_000_000  # 1997-12-25, MovieLens' time span
    events = pd.DataFrame(
        {
            "user_id": users,
            "item_id": rng.integers(1, n_items + 1, n, dtype=np.int64),
            "rating": rng.integers(1, 6, n).astype(np.float32),
            "timestamp": base + rng.integers(0, 200 * 86_400, n),
        }
    )
    t1 = time.perf_counter()
    stats = prepare_sources(bundle, repo, interactions_df=events, positive_threshold=4.0)
    t_sources = time.perf_counter() - t1
    sys.path.insert(0, str(repo))
    try:
        apply(repo)
    finally:
        sys.path.remove(str(repo))
    entities = pd.DataFrame(
        {
            "user_id": events["user_id"],
            "item_id": events["item_id"],
            "event_timestamp": pd.to_datetime(events["timestamp"], unit="s", utc=True),
            "label": (events["rating"] >= 4).astype(np.float32),
        }
    ).sample(frac=1.0, random_state=seed)  # any prefix is a random sample of the log
    entities.to_parquet(work / "entities.parquet", index=False)
    return {
        "repo": str(repo),
        "entities": str(work / "entities.parquet"),
        "n_items": n_items,
        "n_users": n_users,
        "n_events": n,
        "n_history_rows": stats["n_history_rows"],
        "prepare_sources_s": round(t_sources, 2),
        "setup_s": round(time.perf_counter() - t0, 2),
    }


def retrieve(repo: str, entities: str, n: int, offline_store: str, to_df: bool) -> dict:
    """One timed ``get_historical_features(qarm_ranker)`` (run in a child process)."""
    import warnings

    from feast import FeatureStore

    warnings.simplefilter("ignore")
    repo_path = Path(repo)
    yaml = repo_path / "feature_store.yaml"
    if offline_store != DUCKDB:
        other = repo_path / f"feature_store.{offline_store}.yaml"
        other.write_text(yaml.read_text().replace(f"type: {DUCKDB}", f"type: {offline_store}"))
        yaml = other
    store = FeatureStore(repo_path=repo, fs_yaml_file=yaml)
    service = store.get_feature_service("qarm_ranker")
    entity_df = pd.read_parquet(entities).iloc[:n].reset_index(drop=True)
    t0 = time.perf_counter()  # the first call pays imports, registry and source reads
    store.get_historical_features(entity_df=entity_df.iloc[:100], features=service).to_arrow()
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = store.get_historical_features(entity_df=entity_df, features=service).to_arrow()
    t_arrow = time.perf_counter() - t0
    out = {
        "offline_store": offline_store,
        "rows_asked": int(n),
        "rows_returned": int(table.num_rows),
        "first_call_100_rows_s": round(t_first, 3),
        "arrow_s": round(t_arrow, 3),
        "arrow_rows_per_s": round(n / t_arrow, 1),
        "no_history_fraction": round(table.column("hist_len").null_count / max(n, 1), 4),
    }
    del table
    if to_df:
        t0 = time.perf_counter()
        df = store.get_historical_features(entity_df=entity_df, features=service).to_df()
        t_df = time.perf_counter() - t0
        out.update({"df_s": round(t_df, 3), "df_rows_per_s": round(n / t_df, 1),
                    "df_rows_returned": int(len(df))})  # fmt: skip
    return out


def run(quick: bool, work: Path) -> dict:
    """DuckDB at growing n up to 1M (20k quick), the file store at 20k (2k quick)."""
    if quick:
        size = {"n_items": 2_000, "n_users": 1_000, "per_user": 20}
        duck_ns, file_ns, file_cap_s = (1_000, 20_000), (1_000,), 120
    else:
        size = {"n_items": 20_000, "n_users": 50_000, "per_user": 20}
        duck_ns, file_ns, file_cap_s = (20_000, 200_000, 1_000_000), (20_000,), 300
    env = setup(work / "training", **size)
    cases = {}
    for n in file_ns:  # the file store first, capped: its cost grows with the history table
        try:
            cases[f"file/{n}"] = run_child(
                "benchmarks.bench_training:retrieve",
                {"repo": env["repo"], "entities": env["entities"], "n": n,
                 "offline_store": "file", "to_df": False},
                timeout=file_cap_s,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            cases[f"file/{n}"] = {"offline_store": "file", "rows_asked": n, "rows_returned": None,
                                  "timed_out_s": file_cap_s,
                                  "arrow_rows_per_s_below": round(n / file_cap_s, 1)}  # fmt: skip
    for n in duck_ns:
        cases[f"duckdb/{n}"] = run_child(
            "benchmarks.bench_training:retrieve",
            {"repo": env["repo"], "entities": env["entities"], "n": n,
             "offline_store": DUCKDB, "to_df": n <= DF_MAX_ROWS},
        )  # fmt: skip
    for case in cases.values():
        if case["rows_returned"] is not None:
            case["returned_fraction"] = round(case["rows_returned"] / case["rows_asked"], 4)
    speedup = {}
    for n in file_ns:
        duck, file = cases.get(f"duckdb/{n}"), cases[f"file/{n}"]
        if duck and "arrow_rows_per_s" in file:
            speedup[n] = round(duck["arrow_rows_per_s"] / file["arrow_rows_per_s"], 1)
    largest = cases[f"duckdb/{max(duck_ns)}"]
    return {
        "setup": env,
        "cases": cases,
        "duckdb_vs_file_rows_per_s": speedup,
        "target_rows_per_s": TARGET_ROWS_PER_S,
        "target_met": bool(
            max(duck_ns) >= 1_000_000
            and largest["arrow_rows_per_s"] >= TARGET_ROWS_PER_S
            and largest["rows_returned"] == largest["rows_asked"]
        )
        if not quick
        else None,
    }


def markdown(training: dict) -> list[str]:
    """The training-rows table of the suite's summary: one row per case."""

    lines = []
    s = training["setup"]
    lines.append(f"Training rows, `get_historical_features(qarm_ranker)` ({s['n_items']:,} items, "
                 f"{s['n_users']:,} users, {s['n_history_rows']:,} user-history rows; each case "
                 "a child process; arrow = `.to_arrow()`, df = `.to_df()`):")  # fmt: skip
    lines.append("")
    lines.append("| case | returned / asked | no history yet | first call (100 rows) s | "
                 "arrow s | arrow rows/s | df rows/s | peak RSS MiB |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, r in training["cases"].items():
        if r.get("timed_out_s"):
            lines.append(f"| {name} | no answer in {r['timed_out_s']} s | – | – | – | "
                         f"< {fmt(r['arrow_rows_per_s_below'])} | – | – |")  # fmt: skip
            continue
        lines.append(f"| {name} | {r['rows_returned']:,} / {r['rows_asked']:,} | "
                     f"{fmt(r['no_history_fraction'] * 100, 1)}% | {fmt(r['first_call_100_rows_s'])} | "
                     f"{fmt(r['arrow_s'])} | {fmt(r['arrow_rows_per_s'])} | "
                     f"{fmt(r.get('df_rows_per_s'))} | {fmt(r['peak_rss_mib'], 0)} |")  # fmt: skip
    lines.append("")
    return lines
