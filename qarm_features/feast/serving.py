"""Serving-side helpers: version checks, ``feast serve`` warm-up, a ranker-style sample read.

- :func:`check_versions` compares a bundle with everything a feature repo holds: the
  registry's ``qarm_version`` tags, the repo pointer, the offline rows and a sample of
  online rows; any disagreement raises :class:`~qarm_features.errors.BundleVersionMismatch`
  with the list of problems.
- :func:`serving_setup` is what ``feature_repo/static_artifacts.py`` runs in every
  ``feast serve`` worker: pin threads and load the repo's bundle before the first request.
- :func:`get_online_features` is Feast's in-process read with the id and request-row
  checks ``qarm serve`` applies over HTTP (Feast's own typing reads ``50.7`` as item 50).
- :func:`sample_online` reads warm items and encodes cold ones the way a ranker would.
- :func:`appended` counts the items pushed since a bundle's build and says whether a
  rebuild is due (:func:`qarm_features.build.stable.append_report`).
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from pathlib import Path

import numpy as np
import pandas as pd

from qarm_features.errors import BundleVersionMismatch, InputError, QarmError
from qarm_features.feast.context import (
    ENV_THREADS,
    ServingContext,
    pin_request_thread,
    read_pointer,
    set_serving_threads,
)
from qarm_features.feast.layout import CODES_FILE, PUSHED_FILE
from qarm_features.feast.store import open_store
from qarm_features.schema import ERROR, ITEM_ID, RAW_EMB, VERSION


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
        sample_ids: item ids (of the repo's join key and id type) whose online
            ``qarm_version`` is read (default: up to 32 items of the offline source).
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
    registry, key = {}, None
    for name in ("qarm", "qarm_batch", "user_history"):
        with contextlib.suppress(Exception):
            fv = store.registry.get_any_feature_view(name, store.project, allow_cache=False)
            registry[name] = fv.tags.get(VERSION)
            if name == "qarm" and fv.entity_columns:
                key = fv.entity_columns[0].name  # the repo's item join key (sku, item_id ...)
    offline = []
    codes_path = repo / CODES_FILE
    if codes_path.exists():
        import pyarrow.parquet as pq

        id_column = key or pq.read_schema(codes_path).names[0]  # the codes' first column
        col = pd.read_parquet(codes_path, columns=[id_column, VERSION])
        offline = sorted(col[VERSION].unique().tolist())
        if sample_ids is None:
            sample_ids = col[id_column].head(32).tolist()  # the ids' own type (int or str)
    online: list[str] = []
    problems = []
    if sample_ids and key is not None:
        try:
            resp = store.get_online_features(
                features=[f"qarm:{VERSION}"], entity_rows=[{key: i} for i in sample_ids]
            ).to_dict()
            online = sorted({v for v in resp[VERSION] if v})
        except Exception as exc:  # noqa: BLE001 - e.g. a view left MATERIALIZING refuses reads
            problems.append(f"online qarm rows cannot be read: {exc}")
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


def get_online_features(store, features, entity_rows, *, full_feature_names: bool = False):
    """``store.get_online_features`` with the checks ``qarm serve`` applies over HTTP.

    Feast types entity values itself: for an ``INT64`` join key ``50.7`` reads item 50 and
    ``True`` item 1, and a ``None`` id or one request row that is not a list of numbers
    fails the whole call. This entry point checks each row first against the types the
    registry declares (:mod:`qarm_features.feast.request_check`, shared with the server):

    - a bad id (a float, a boolean, ``None``, a string for an int key, a number for a
      string key) raises :class:`~qarm_features.errors.InputError` naming the key, the
      row and the value; nothing is read. numpy integer ids are taken as ints.
    - a float-list request field (``raw_emb``) takes lists of numbers (integers become
      floats) and 1-d float numpy arrays, passed through untouched (the fast in-process
      form); any other row is sent as missing and its reason is written into that row's
      ``qarm_error``, while the other rows are answered.

    Args:
        store: a ``FeatureStore``.
        features: feature references, or a ``FeatureService``, as for Feast.
        entity_rows: a list of dicts (join keys and request fields).
        full_feature_names: as for Feast.

    Returns:
        Feast's ``OnlineResponse``.

    Raises:
        InputError: an entity row that is not a dict, a key missing from some rows, or a
            bad id (up to five listed).
    """
    from qarm_features.feast.request_check import (
        FLOAT_LIST,
        RequestRejected,
        check_online_request,
        field_kinds,
    )

    rows = list(entity_rows)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"entity_rows[{i}] is a {type(row).__name__}, not a dict")
    names = list(dict.fromkeys(k for row in rows for k in row))
    kinds = _declared_kinds(store, field_kinds)
    arrays: dict[tuple[str, int], np.ndarray] = {}  # float32 rows kept as they are
    columns: dict[str, list] = {}
    for name in names:
        kind = kinds.get(name, (None, None))[0]
        column = columns[name] = []
        for i, row in enumerate(rows):
            if name not in row:
                raise InputError(f"entity_rows[{i}] has no {name!r}; give every row every key")
            value = row[name]
            if isinstance(value, np.generic) and not isinstance(value, np.bool_):
                value = value.item()  # numpy scalars as the Python values they hold
            elif isinstance(value, np.ndarray):
                if (
                    kind == FLOAT_LIST
                    and value.ndim == 1
                    and value.size
                    and value.dtype.kind == "f"
                ):
                    arrays[name, i] = value
                    value = [0.0]  # checked as a valid row; the array itself is sent
                else:
                    value = value.tolist()
            column.append(value)
    try:
        checked = check_online_request({"entities": columns}, kinds, max_rows=max(1, len(rows)))
    except RequestRejected as exc:
        raise InputError(f"get_online_features: {exc}") from None
    sent = [
        {name: arrays.get((name, i), columns[name][i]) for name in names} for i in range(len(rows))
    ]
    resp = store.get_online_features(
        features=features, entity_rows=sent, full_feature_names=full_feature_names
    )
    if checked.row_errors:
        for j, name in enumerate(resp.proto.metadata.feature_names.val):
            if name == ERROR or name.endswith(f"__{ERROR}"):
                values = resp.proto.results[j].values
                for i, why in checked.row_errors.items():
                    values[i].string_val = why
    return resp


_kinds_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # store -> (t, kinds)


def _declared_kinds(store, read) -> dict:
    """The registry's declared key/request types, re-read once per registry cache period
    (``cache_ttl_seconds``, 0 = never, as Feast's own registry cache: as fresh as Feast's
    reads; reading them costs ~0.3 ms a call)."""
    ttl = getattr(store.config.registry, "cache_ttl_seconds", 0) or float("inf")
    at, kinds = _kinds_cache.get(store, (None, None))
    if at is None or time.monotonic() - at > ttl:
        kinds = read(store)
        _kinds_cache[store] = (time.monotonic(), kinds)
    return kinds


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
        item_ids: ids (the repo's join key's type) to read from the ``qarm`` view (unknown
            ids come back NOT_FOUND).
        cold_raw_emb: optional raw embeddings of cold items, ``(m, d_raw)`` or one flat
            embedding, encoded by the ``qarm_cold`` on-demand view (a bad row gets its
            ``qarm_error``).

    Returns:
        ``{"warm": [{<join key>, "status", <features>}], "cold": [{<features>}], "version"}``
        with JSON-friendly values.
    """
    repo = Path(repo_path).resolve()
    context = ServingContext.of_repo(repo)
    store = open_store(repo, fs_yaml_file)
    fv = store.get_feature_view("qarm")
    refs = [f"qarm:{f.name}" for f in fv.features]
    key = fv.entity_columns[0].name if fv.entity_columns else ITEM_ID  # the repo's join key
    ids = [i.item() if isinstance(i, np.generic) else i for i in item_ids]
    warm = []
    if ids:
        resp = store.get_online_features(features=refs, entity_rows=[{key: i} for i in ids])
        warm = _rows_with_status(resp, key)
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
    lifecycle state, the offline/online versions (:func:`check_versions`), a run in
    progress or killed (its journal: the step it was at, :mod:`qarm_features.feast.rollout`)
    and leftovers (temporary files of an interrupted write). Repairs, under the repo's
    lock: a killed run is rolled back (before its switch) or finished (after it,
    :func:`qarm_features.feast.rollout.recover`); views left ``MATERIALIZING`` (or any
    non-servable state) are materialized again; registry tags that disagree with the
    pointer are re-applied from the definitions; leftovers are removed.

    Returns:
        ``{"ok", "version", "views": {name: state}, "versions": check_versions report,
        "run", "leftovers", "problems", "repaired", "appended"}``; ``run`` is the journal
        of a run in progress (``running``: true) or killed (false), else None;
        ``appended`` is :func:`appended` for the served bundle (None when none is
        served). A rebuild due is reported there, not as a problem: serving is still
        correct.

    Raises:
        RepoLocked: ``repair`` while a run holds the repo's lock.
    """
    from datetime import datetime, timedelta, timezone

    from feast.feature_view import FeatureViewState

    from qarm_features.feast.job import apply
    from qarm_features.feast.layout import CURRENT, DATA
    from qarm_features.feast.rollout import describe, lock_holder, read_journal, recover, repo_lock
    from qarm_features.feast.sources import EPOCH

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
    leftovers = sorted(
        str(p) for d in (repo / DATA, repo / CURRENT) for p in d.glob(".*.tmp") if p.is_file()
    )
    run, problems = read_journal(repo), []
    if run is not None:
        holder = lock_holder(repo)
        run["running"] = holder is not None and holder.get("pid") == run.get("pid")
        problems.append(
            describe(run).replace("was interrupted at", "is running: now at")
            if run["running"]
            else describe(run) + "; `qarm status --repair` finishes or rolls it back"
        )
    problems += [
        f"view {n} is {views[n]} (reads refused unless serve_features_while_"
        "materializing; a killed materialize leaves it so)"
        for n in stuck
    ]
    problems += versions["problems"] + [f"leftover {p}" for p in leftovers]
    repaired = []
    if repair and problems:
        with repo_lock(repo, "qarm status --repair"):  # refused while a run holds it
            if run is not None:  # finish or roll back the killed run, then look again
                done = recover(repo, fs_yaml_file=fs_yaml_file)
                report = status(repo, fs_yaml_file=fs_yaml_file, repair=True)
                report["repaired"] = [done, *report["repaired"]]
                return report
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
        "run": run,
        "leftovers": leftovers,
        "problems": problems,
        "repaired": repaired,
        "appended": added,
    }
