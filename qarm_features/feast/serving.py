"""Serving-side helpers: version checks, ``feast serve`` warm-up, a ranker-style sample read.

- :func:`check_versions` compares a bundle with everything a feature repo holds: the
  registry's ``qarm_version`` tags, the repo pointer, the offline rows and a sample of
  online rows; any disagreement raises :class:`~qarm_features.errors.BundleVersionMismatch`
  with the list of problems.
- :func:`serving_setup` is what ``feature_repo/static_artifacts.py`` runs in every
  ``feast serve`` worker: pin threads and load the repo's bundle before the first request.
- :func:`sample_online` reads warm items and encodes cold ones the way a ranker would.
- :func:`appended` counts the items pushed since a bundle's build and says whether a
  rebuild is due (:func:`qarm_features.build.stable.append_report`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from qarm_features.errors import BundleVersionMismatch, QarmError
from qarm_features.feast.context import (
    ENV_THREADS,
    ServingContext,
    pin_request_thread,
    read_pointer,
    set_serving_threads,
)
from qarm_features.feast.sources import CODES_FILE, PUSHED_FILE
from qarm_features.feast.store import open_store
from qarm_features.schema import ITEM_ID, RAW_EMB, VERSION


def check_versions(
    repo_path: str | os.PathLike,
    bundle_path: str | os.PathLike | None = None,
    *,
    fs_yaml_file: str | os.PathLike | None = None,
    sample_ids: list[int] | None = None,
    raise_on_mismatch: bool = True,
) -> dict:
    """Compare the bundle's version with the registry, the pointer, offline and online rows.

    Args:
        repo_path: the feature repo.
        bundle_path: the bundle to check against (default: the repo pointer's).
        fs_yaml_file: another config of the repo.
        sample_ids: item ids whose online ``qarm_version`` is read (default: up to 32
            items of the offline source).
        raise_on_mismatch: raise instead of returning a report with ``ok=False``.

    Returns:
        ``{"ok", "bundle", "registry", "pointer", "offline", "online", "problems"}``.

    Raises:
        BundleVersionMismatch: any disagreement (when ``raise_on_mismatch``).
    """
    repo = Path(repo_path).resolve()
    context = ServingContext.of_repo(repo, bundle_path)
    pointer = read_pointer(repo)
    store = open_store(repo, fs_yaml_file)
    registry = {}
    for name in ("qarm", "qarm_batch", "user_history"):
        with contextlib.suppress(Exception):
            fv = store.registry.get_any_feature_view(name, store.project, allow_cache=False)
            registry[name] = fv.tags.get(VERSION)
    offline = []
    codes_path = repo / CODES_FILE
    if codes_path.exists():
        col = pd.read_parquet(codes_path, columns=[ITEM_ID, VERSION])
        offline = sorted(col[VERSION].unique().tolist())
        if sample_ids is None:
            sample_ids = col[ITEM_ID].head(32).tolist()
    online: list[str] = []
    if sample_ids and "qarm" in registry:
        resp = store.get_online_features(
            features=[f"qarm:{VERSION}"], entity_rows=[{ITEM_ID: int(i)} for i in sample_ids]
        ).to_dict()
        online = sorted({v for v in resp[VERSION] if v})
    problems = []
    want = context.version
    for name, v in registry.items():
        if v != want:
            problems.append(f"registry view {name} is tagged {v}")
    if pointer is not None and pointer.version != want:
        problems.append(f"repo pointer names {pointer.version}")
    if offline and offline != [want]:
        problems.append(f"offline qarm rows hold {offline}")
    if online and online != [want]:
        problems.append(f"online qarm rows hold {online}")
    report = {
        "ok": not problems,
        "bundle": want,
        "bundle_source": "argument" if bundle_path is not None else "pointer",
        "registry": registry,
        "pointer": None if pointer is None else pointer.version,
        "offline": offline,
        "online": online,
        "problems": problems,
    }
    if problems and raise_on_mismatch:
        raise BundleVersionMismatch(
            f"bundle {want} disagrees with the feature repo {repo}: "
            + "; ".join(problems)
            + ". Re-run `qarm materialize` (with --promote to roll the bundle out)."
        )
    return report


def serving_setup(repo_path: str | os.PathLike) -> dict:
    """Pin this server process's thread pools and load the repo's bundle now.

    Called by ``feature_repo/static_artifacts.py`` in every ``feast serve`` worker. Thread
    pools are pinned to ``QARM_SERVING_THREADS`` (default 1) on every request thread. The
    bundle is the one the repo's pointer names (the one its registered views carry); a
    rollout re-applies the views, and the worker loads the new bundle at its first cold
    request after its registry refresh.
    """
    repo = Path(repo_path).resolve()
    threads = int(os.environ.get(ENV_THREADS) or 1)
    set_serving_threads(threads)
    pin_request_thread()
    context = ServingContext.of_repo(repo)
    version = context.load().version if context.is_set else None
    return {"bundle": context.bundle, "version": version, "threads": threads}


def sample_online(
    repo_path: str | os.PathLike,
    item_ids,
    cold_raw_emb=None,
    *,
    fs_yaml_file: str | os.PathLike | None = None,
) -> dict:
    """Read ``qarm`` features of ``item_ids`` and encode cold embeddings, as a ranker would.

    Args:
        repo_path: a materialized feature repo.
        item_ids: ids to read from the ``qarm`` view (unknown ids come back NOT_FOUND).
        cold_raw_emb: optional raw embeddings of cold items, ``(m, d_raw)`` or one flat
            embedding, encoded by the ``qarm_cold`` on-demand view (a bad row gets its
            ``qarm_error``).

    Returns:
        ``{"warm": [{"item_id", "status", <features>}], "cold": [{<features>}], "version"}``
        with JSON-friendly values.
    """
    repo = Path(repo_path).resolve()
    context = ServingContext.of_repo(repo)
    store = open_store(repo, fs_yaml_file)
    fv = store.get_feature_view("qarm")
    refs = [f"qarm:{f.name}" for f in fv.features]
    ids = [int(i) for i in item_ids]
    warm = []
    if ids:
        resp = store.get_online_features(features=refs, entity_rows=[{ITEM_ID: i} for i in ids])
        warm = _rows_with_status(resp, ITEM_ID)
    cold = []
    rows = [] if cold_raw_emb is None else list(cold_raw_emb)
    if rows and np.isscalar(rows[0]):
        rows = [rows]  # one embedding given as a flat list
    if rows:
        odfv = store.get_on_demand_feature_view("qarm_cold")
        cold_refs = [f"qarm_cold:{f.name}" for f in odfv.features]
        rows = [{RAW_EMB: None if r is None else [float(x) for x in r]} for r in rows]
        cold = store.get_online_features(features=cold_refs, entity_rows=rows).to_dict()
        cold.pop(RAW_EMB, None)
        cold = [dict(zip(cold, vals)) for vals in zip(*cold.values())]
    return {"version": context.version, "warm": warm, "cold": cold}


def _rows_with_status(resp, key: str) -> list[dict]:
    """OnlineResponse -> one dict per entity row with a ``status`` (PRESENT / NOT_FOUND)."""
    from feast.protos.feast.serving.ServingService_pb2 import FieldStatus

    data = resp.to_dict()
    names = list(resp.proto.metadata.feature_names.val)
    status_col = {}
    for j, name in enumerate(names):
        if name != key:
            status_col = [FieldStatus.Name(s) for s in resp.proto.results[j].statuses]
            break
    n = len(data[key])
    rows = []
    for i in range(n):
        row = {k: data[k][i] for k in data}
        row["status"] = status_col[i] if status_col else "PRESENT"
        rows.append(row)
    return rows


def appended(repo_path: str | os.PathLike, bundle_path: str | os.PathLike | None = None) -> dict:
    """Items pushed to the repo since ``bundle_path``'s build (default: the served bundle).

    A bundle is immutable (content-addressed), so the record of what was added since its
    build is the repo's pushed-items file (``data/qarm_pushed.parquet``, written by
    ``qarm push``): the items there that the bundle's catalog does not hold, latest content
    of each. Returns :func:`~qarm_features.build.stable.append_report` plus ``version``.

    Raises:
        QarmError: no bundle given and the repo serves none.
    """
    from qarm_features.build.stable import append_report
    from qarm_features.bundle.encode import get_bundle

    repo = Path(repo_path).resolve()
    context = ServingContext.of_repo(repo, bundle_path)
    if not context.is_set:
        raise QarmError(f"no bundle for {repo}: run `qarm materialize` first or name a bundle")
    bundle = get_bundle(context.bundle)
    added = np.empty((0, bundle.raw_emb.shape[1]), np.float32)
    if (repo / PUSHED_FILE).exists():
        pushed = pd.read_parquet(repo / PUSHED_FILE)
        key = next(c for c in pushed.columns if c not in (RAW_EMB, "pushed_at"))
        pushed = pushed.sort_values("pushed_at", kind="stable").drop_duplicates(key, keep="last")
        built = set(map(str, bundle.keys_of(bundle.item_ids)))
        new = pushed[~pushed[key].astype(str).isin(built)]
        if len(new):
            added = np.stack([np.asarray(v, np.float32) for v in new[RAW_EMB]])
    return {"version": bundle.version, **append_report(bundle, added)}


def status(
    repo_path: str | os.PathLike,
    *,
    fs_yaml_file: str | os.PathLike | None = None,
    repair: bool = False,
) -> dict:
    """What a repo serves, and anything a crash left half-done; with ``repair``, fix it.

    Reports the bundle the pointer names, the registry's version tags, every QARM view's
    lifecycle state, the offline/online versions (:func:`check_versions`) and leftovers
    (temporary files of an interrupted write). Repairs: views left ``MATERIALIZING`` (or
    any non-servable state) by a killed run are materialized again; registry tags that
    disagree with the pointer are re-applied from the definitions; leftovers are removed.

    Returns:
        ``{"ok", "version", "views": {name: state}, "versions": check_versions report,
        "leftovers", "problems", "repaired", "appended"}``; ``appended`` is
        :func:`appended` for the served bundle (None when none is served). A rebuild due
        is reported there, not as a problem: serving is still correct.
    """
    from datetime import datetime, timedelta, timezone

    from feast.feature_view import FeatureViewState

    from qarm_features.feast.job import apply
    from qarm_features.feast.sources import DATA, EPOCH

    repo = Path(repo_path).resolve()
    store = open_store(repo, fs_yaml_file)
    servable = {FeatureViewState.STATE_UNSPECIFIED, FeatureViewState.AVAILABLE_ONLINE}
    views, stuck = {}, []
    for fv in store.registry.list_feature_views(store.project, allow_cache=False):
        state = getattr(fv, "state", FeatureViewState.STATE_UNSPECIFIED)
        views[fv.name] = state.name
        if state not in servable:
            stuck.append(fv.name)
    versions = check_versions(repo, fs_yaml_file=fs_yaml_file, raise_on_mismatch=False)
    leftovers = sorted(str(p) for p in (repo / DATA).glob(".*.tmp")) + sorted(
        str(p) for p in (repo / DATA).glob(".qarm_bundle.*.json")
    )
    problems = [f"view {n} is {views[n]} (reads refused unless serve_features_while_"
                "materializing; a killed materialize leaves it so)" for n in stuck]  # fmt: skip
    problems += versions["problems"] + [f"leftover {p}" for p in leftovers]
    repaired = []
    if repair and problems:
        if any(p.startswith("registry view") for p in versions["problems"]):
            apply(repo, fs_yaml_file=fs_yaml_file)
            repaired.append("re-applied the definitions (registry tags = pointer)")
        if stuck:
            end = datetime.now(timezone.utc) + timedelta(seconds=1)
            store.materialize(start_date=EPOCH, end_date=end, feature_views=stuck)
            repaired.append(f"materialized {stuck} again")
        for p in leftovers:
            Path(p).unlink(missing_ok=True)
        if leftovers:
            repaired.append(f"removed {len(leftovers)} leftover file(s)")
        report = status(repo, fs_yaml_file=fs_yaml_file)
        report["repaired"] = repaired
        return report
    added = None
    if (served := read_pointer(repo)) is not None and served.is_set:
        try:
            added = appended(repo)
        except QarmError as exc:  # a bad bundle is already among the problems
            added = {"error": str(exc)}
    return {
        "ok": not problems,
        "version": versions["pointer"],
        "views": views,
        "versions": versions,
        "leftovers": leftovers,
        "problems": problems,
        "repaired": repaired,
        "appended": added,
    }
