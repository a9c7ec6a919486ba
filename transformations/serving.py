"""Serving-side helpers: version checks, `feast serve` warm-up, a ranker-style sample read.

- :func:`check_versions` compares a bundle with everything a feature repo holds: the
  registry's ``qarm_version`` tags, the repo pointer, the offline rows and a sample of
  online rows; any disagreement raises :class:`~qarm_features.errors.BundleVersionMismatch`
  with the list of problems.
- :func:`serving_setup` is what ``feature_repo/static_artifacts.py`` runs in every
  ``feast serve`` worker: point the cold-item path at the repo's bundle, pin threads,
  load and warm it.
- :func:`sample_online` reads warm items and encodes cold ones the way a ranker would.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from qarm_features.errors import BundleVersionMismatch
from transformations.bundle_ref import read_manifest_ref, read_pointer, resolve_bundle_ref
from transformations.job import CODES_FILE, open_store


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
        bundle_path: the bundle to check against (default: ``QARM_BUNDLE`` or the pointer).
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
    ref = read_manifest_ref(bundle_path) if bundle_path else resolve_bundle_ref(repo)
    pointer = read_pointer(repo)
    store = open_store(repo, fs_yaml_file)
    registry = {}
    for name in ("qarm", "qarm_batch", "user_history"):
        with contextlib.suppress(Exception):
            fv = store.registry.get_any_feature_view(name, store.project, allow_cache=False)
            registry[name] = fv.tags.get("qarm_version")
    offline = []
    codes_path = repo / CODES_FILE
    if codes_path.exists():
        col = pd.read_parquet(codes_path, columns=["item_id", "qarm_version"])
        offline = sorted(col["qarm_version"].unique().tolist())
        if sample_ids is None:
            sample_ids = col["item_id"].head(32).tolist()
    online: list[str] = []
    if sample_ids and "qarm" in registry:
        resp = store.get_online_features(
            features=["qarm:qarm_version"], entity_rows=[{"item_id": int(i)} for i in sample_ids]
        ).to_dict()
        online = sorted({v for v in resp["qarm_version"] if v})
    problems = []
    want = ref.version
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
        "bundle_source": ref.source,
        "registry": registry,
        "pointer": None if pointer is None else pointer.version,
        "offline": offline,
        "online": online,
        "problems": problems,
    }
    if problems and raise_on_mismatch:
        raise BundleVersionMismatch(
            f"bundle {want} ({ref.source}) disagrees with the feature repo {repo}: "
            + "; ".join(problems)
            + ". Re-run `qarm materialize` (with --promote to roll the bundle out)."
        )
    return report


def serving_setup(repo_path: str | os.PathLike) -> dict:
    """Make this process's cold-item path follow the repo's bundle, and warm it up.

    Called by ``feature_repo/static_artifacts.py`` in every ``feast serve`` worker. Thread
    pools are pinned to ``QARM_SERVING_THREADS`` (default 1). The bundle is
    ``QARM_BUNDLE`` or the repo pointer, re-read when it changes (a rollout needs no
    restart); the version expected is the pointer's (what ``qarm materialize``
    registered), so a ``QARM_BUNDLE`` naming another bundle is reported on every cold row
    instead of serving codes of another version.
    """
    from transformations import on_demand

    repo = Path(repo_path).resolve()
    pointer = read_pointer(repo)
    threads = int(os.environ.get(on_demand.ENV_THREADS) or 1)
    on_demand.configure(repo_path=repo, threads=threads)
    version = on_demand.warm_up()
    return {
        "bundle": os.environ.get("QARM_BUNDLE") or (pointer.path if pointer else None),
        "version": version,
        "expected_version": pointer.version if pointer else None,
        "threads": threads,
    }


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
    from transformations import on_demand

    repo = Path(repo_path).resolve()
    ref = resolve_bundle_ref(repo)
    on_demand.configure(repo_path=repo)
    store = open_store(repo, fs_yaml_file)
    fv = store.get_feature_view("qarm")
    refs = [f"qarm:{f.name}" for f in fv.features]
    ids = [int(i) for i in item_ids]
    warm = []
    if ids:
        resp = store.get_online_features(features=refs, entity_rows=[{"item_id": i} for i in ids])
        warm = _rows_with_status(resp, "item_id")
    cold = []
    rows = [] if cold_raw_emb is None else list(cold_raw_emb)
    if rows and np.isscalar(rows[0]):
        rows = [rows]  # one embedding given as a flat list
    if rows:
        odfv = store.get_on_demand_feature_view("qarm_cold")
        cold_refs = [f"qarm_cold:{f.name}" for f in odfv.features]
        rows = [{"raw_emb": None if r is None else [float(x) for x in r]} for r in rows]
        cold = store.get_online_features(features=cold_refs, entity_rows=rows).to_dict()
        cold.pop("raw_emb", None)
        cold = [dict(zip(cold, vals)) for vals in zip(*cold.values())]
    return {"version": ref.version, "warm": warm, "cold": cold}


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
