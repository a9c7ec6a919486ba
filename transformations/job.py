"""The materialization job behind ``qarm materialize``, and the push path.

:func:`materialize` takes a bundle and a catalog, encodes every item with the batch
transformation, writes the offline sources of the feature repo atomically, registers the
definitions (SDK ``store.apply``) and runs Feast's materialization into the online store;
a bundle other than the registered one raises
:class:`~qarm_features.errors.BundleVersionMismatch` unless ``promote=True``.
:func:`prepare_sources` is its first half (no Feast call), for ``feast apply`` /
``feast materialize`` users; :func:`apply` is the SDK apply (the CLI's re-apply crashes on
the BatchFeatureView in Feast 0.67); :func:`push_items` gives new items their codes online
without a batch rerun. Version checks and serving helpers: :mod:`transformations.serving`.

Timestamps ("backfill" semantics, docs/feast.md): a bundle's codes are a function of item
content, not of time, so item rows are stamped ``1970-01-01 + (wall-clock ms) µs`` — before
any real log, so ``get_historical_features`` gives every training row, however old, the
live bundle's codes — and still increasing from one write to the next, so an online store
that keeps the newest row (Redis) takes every rollout and push. The offline sources hold
one bundle version at a time; a version change (``promote=True``) clears the online rows
of the code-bearing views before materializing, so the store never mixes two versions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import logging
import os
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from qarm_features._validate import check_columns
from qarm_features.errors import BundleVersionMismatch, InputError, QarmError
from transformations.batch import (
    DEFAULT_HISTORY,
    POSITIVE_THRESHOLD,
    build_user_history,
    encode_catalog,
)
from transformations.bundle_ref import (
    ENV_BUNDLE,
    UNSET,
    read_manifest_ref,
    resolve_bundle_ref,
    write_pointer,
)

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
DATA = Path("data")
CODES_FILE = DATA / "qarm_codes.parquet"
CONTENT_FILE = DATA / "item_content.parquet"
HISTORY_FILE = DATA / "user_history.parquet"
# Views whose rows carry codes of one bundle (cleared online on a version change).
CODE_VIEWS = ("qarm", "qarm_batch", "user_history")
_module_counter = itertools.count()
_last_stamp: list[pd.Timestamp] = []  # last stamp this process wrote (kept increasing)


# --------------------------------------------------------------------------- helpers


def open_store(repo_path: str | os.PathLike, fs_yaml_file: str | os.PathLike | None = None):
    """A FeatureStore on ``repo_path``; ``fs_yaml_file`` relative paths are taken in the repo."""
    from feast import FeatureStore

    repo = Path(repo_path).resolve()
    if fs_yaml_file is None:
        return FeatureStore(repo_path=str(repo))
    yaml = Path(fs_yaml_file)
    if not yaml.is_absolute():
        yaml = repo / yaml
    if not yaml.is_file():
        raise InputError(f"fs_yaml_file: {yaml} does not exist")
    return FeatureStore(repo_path=str(repo), fs_yaml_file=yaml)


def row_stamp(now: datetime | None = None) -> pd.Timestamp:
    """The event timestamp of item rows written at ``now``: ``1970-01-01 + (ms since epoch) µs``.

    Earlier than any real log (2025 maps to about 1970-01-21), increasing with ``now``
    (and strictly increasing within a process).
    """
    now = now or datetime.now(timezone.utc)
    ms = int(now.timestamp() * 1000)
    stamp = pd.Timestamp(EPOCH + timedelta(microseconds=ms))
    if _last_stamp and stamp <= _last_stamp[0]:  # two writes within one millisecond
        stamp = _last_stamp[0] + pd.Timedelta(microseconds=1)
    _last_stamp[:] = [stamp]
    return stamp


@contextlib.contextmanager
def _env(**values: str | None):
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_definitions(repo_path: str | os.PathLike, bundle_path: str | os.PathLike | None = None):
    """Import the repo's definition files afresh and return their Feast objects.

    Each file is loaded under a new module name, so a process can apply a repo twice
    (e.g. after a bundle with another number of RQ levels) without stale imports.
    ``bundle_path`` overrides ``QARM_BUNDLE`` while the files are imported.
    """
    from feast import Entity, FeatureService
    from feast.data_source import DataSource, PushSource
    from feast.feature_view import FeatureView
    from feast.on_demand_feature_view import OnDemandFeatureView
    from feast.repo_operations import get_repo_files

    repo = Path(repo_path).resolve()
    kinds = (DataSource, Entity, FeatureView, OnDemandFeatureView, FeatureService)
    found: dict[tuple[str, str], object] = {}

    def add(obj) -> None:
        # one object per (kind, name): a file that imports another's objects adds nothing
        kind = next(k.__name__ for k in kinds if isinstance(obj, k))
        found.setdefault((kind, obj.name), obj)

    override = {ENV_BUNDLE: str(bundle_path)} if bundle_path is not None else {}
    with _env(**override):
        for path in get_repo_files(repo):
            if path.name == "static_artifacts.py":
                continue
            name = f"_qarm_feature_repo_{next(_module_counter)}_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            for attr in dir(module):
                obj = getattr(module, attr)
                if isinstance(obj, kinds):
                    add(obj)
                    if isinstance(obj, PushSource) and obj.batch_source is not None:
                        add(obj.batch_source)
    return list(found.values())


def _write_parquet(df: pd.DataFrame, path: Path, schema=None) -> None:
    """Write a parquet file atomically: temp file in the same directory, then rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    if len(df) == 0 and schema is not None:
        table = schema.empty_table()
    else:
        table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".parquet.tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _schemas(n_levels: int):
    import pyarrow as pa

    ts = pa.timestamp("us", tz="UTC")
    codes = pa.schema(
        [("item_id", pa.int64()), ("event_timestamp", ts), ("created", ts),
         ("aligned_emb", pa.list_(pa.float32()))]
        + [(f"rq_code_l{i + 1}", pa.int64()) for i in range(n_levels)]
        + [("vq_codes", pa.list_(pa.int64())), ("qarm_version", pa.string())]
    )
    content = pa.schema(
        [("item_id", pa.int64()), ("event_timestamp", ts), ("created", ts),
         ("raw_emb", pa.list_(pa.float32()))]
    )
    history = pa.schema(
        [("user_id", pa.int64()), ("event_timestamp", ts), ("hist_item_ids", pa.list_(pa.int64()))]
        + [(f"hist_rq_code_l{i + 1}", pa.list_(pa.int64())) for i in range(n_levels)]
        + [("hist_len", pa.int64()), ("hist_qarm_version", pa.string())]
    )
    return codes, content, history


def _registered_version(store) -> str | None:
    """The ``qarm_version`` tag of the registry's ``qarm`` view (None: not applied yet)."""
    from feast.errors import FeatureViewNotFoundException

    try:
        fv = store.registry.get_feature_view("qarm", store.project, allow_cache=False)
    except FeatureViewNotFoundException:
        return None
    version = fv.tags.get("qarm_version")
    return None if version in (None, "", UNSET) else version


def _catalog_frame(bundle, catalog_df, repo: Path) -> tuple[pd.DataFrame, int]:
    """The items to encode: ``catalog_df`` (or the bundle's catalog) plus pushed items."""
    if catalog_df is None:
        catalog = pd.DataFrame({"item_id": bundle.item_ids, "raw_emb": list(bundle.raw_emb)})
    else:
        check_columns(catalog_df, ["item_id", "raw_emb"], name="catalog_df")
        catalog = catalog_df[["item_id", "raw_emb"]].copy()
    catalog["item_id"] = catalog["item_id"].astype(np.int64)
    n_pushed = 0
    content_path = repo / CONTENT_FILE
    if content_path.exists():
        # Items pushed since the last run are part of the catalog: keep their latest content.
        old = pd.read_parquet(content_path, columns=["item_id", "raw_emb", "event_timestamp"])
        old = old.sort_values("event_timestamp", kind="stable")
        old = old.drop_duplicates("item_id", keep="last")
        extra = old[~old["item_id"].isin(catalog["item_id"])]
        if len(extra):
            n_pushed = len(extra)
            catalog = pd.concat([catalog, extra[["item_id", "raw_emb"]]], ignore_index=True)
    return catalog.reset_index(drop=True), n_pushed


def _recode_history(history: pd.DataFrame, codes: pd.DataFrame, n_levels: int, version: str):
    """Replace the codes of existing user-history rows with another bundle's codes."""
    table = codes.set_index("item_id")[[f"rq_code_l{i + 1}" for i in range(n_levels)]]
    out = history[["user_id", "event_timestamp", "hist_item_ids"]].copy()
    lists = [np.asarray(v, np.int64) for v in out["hist_item_ids"]]
    flat = np.concatenate(lists) if lists else np.empty(0, np.int64)
    lens = out["hist_item_ids"].map(len).to_numpy()
    bounds = np.cumsum(lens)[:-1]
    mapped = table.reindex(flat).fillna(-1).to_numpy(np.int64)
    for lvl in range(n_levels):
        out[f"hist_rq_code_l{lvl + 1}"] = np.split(mapped[:, lvl], bounds) if len(out) else []
    out["hist_len"] = lens.astype(np.int64)
    out["hist_qarm_version"] = version
    return out


# --------------------------------------------------------------------------- the job


def prepare_sources(
    bundle_path: str | os.PathLike,
    repo_path: str | os.PathLike,
    catalog_df: pd.DataFrame | None = None,
    interactions_df: pd.DataFrame | None = None,
    *,
    history: int = DEFAULT_HISTORY,
    positive_threshold: float = POSITIVE_THRESHOLD,
    now: datetime | None = None,
) -> dict:
    """Encode the catalog and write the repo's offline sources and bundle pointer.

    No Feast call: after this, ``feast apply`` and ``feast materialize`` (the CLI) or
    :func:`materialize` (the SDK) take over. Every file is written atomically.

    Args:
        bundle_path: the bundle directory (verified on load).
        repo_path: the feature repo; files go to ``<repo>/data/``.
        catalog_df: ``item_id``, ``raw_emb``; None = the bundle's own catalog. Items
            pushed since the last run (in ``data/item_content.parquet``) are kept.
        interactions_df: ``user_id``, ``item_id``, ``timestamp`` (+ ``rating``) for the
            user-side view; None re-codes the existing history with this bundle (or
            writes an empty one).
        history: items per user-history row.
        positive_threshold: ``rating`` threshold of a positive.
        now: wall-clock time of the write (tests); defaults to now.

    Returns:
        Stats: ``version``, ``n_items``, ``n_pushed_items_kept``, ``n_history_rows``,
        ``stamp``, ``seconds``.

    Raises:
        BundleError: the bundle fails verification. InputError: a bad catalog row.
    """
    from qarm_features.encode import get_bundle

    t0 = time.perf_counter()
    repo = Path(repo_path).resolve()
    bundle = get_bundle(bundle_path)
    now = now or datetime.now(timezone.utc)
    stamp = row_stamp(now)
    created = pd.Timestamp(now)
    catalog, n_pushed = _catalog_frame(bundle, catalog_df, repo)
    catalog["event_timestamp"] = stamp
    catalog["created"] = created
    codes_schema, content_schema, history_schema = _schemas(bundle.n_levels)

    codes = encode_catalog(bundle, catalog)
    t_encode = time.perf_counter() - t0
    _write_parquet(codes[codes_schema.names], repo / CODES_FILE, codes_schema)
    _write_parquet(catalog[content_schema.names], repo / CONTENT_FILE, content_schema)

    if interactions_df is not None:
        hist = build_user_history(
            interactions_df,
            codes,
            bundle.n_levels,
            history=history,
            positive_threshold=positive_threshold,
            version=bundle.version,
        )
    elif (repo / HISTORY_FILE).exists():
        hist = _recode_history(
            pd.read_parquet(repo / HISTORY_FILE), codes, bundle.n_levels, bundle.version
        )
    else:
        hist = pd.DataFrame({name: [] for name in history_schema.names})
    _write_parquet(hist[history_schema.names], repo / HISTORY_FILE, history_schema)

    ref = read_manifest_ref(bundle.path, source="pointer")
    write_pointer(repo, ref)
    stats = {
        "version": bundle.version,
        "bundle": str(bundle.path),
        "n_levels": bundle.n_levels,
        "n_items": int(len(codes)),
        "n_pushed_items_kept": int(n_pushed),
        "n_history_rows": int(len(hist)),
        "stamp": stamp.isoformat(),
        "encode_seconds": round(t_encode, 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info("prepared offline sources in %s: %s", repo / DATA, stats)
    return stats


def _clear_online(store, names) -> list[str]:
    """Delete the online rows of the named views (their tables are re-created empty)."""
    from feast.errors import FeatureViewNotFoundException

    views = []
    for name in names:
        with contextlib.suppress(FeatureViewNotFoundException):
            views.append(
                store.registry.get_any_feature_view(name, store.project, allow_cache=False)
            )
    if not views:
        return []
    provider = store._get_provider()
    args = dict(entities_to_delete=[], entities_to_keep=[], partial=True)
    provider.update_infra(store.project, tables_to_delete=views, tables_to_keep=[], **args)
    provider.update_infra(store.project, tables_to_delete=[], tables_to_keep=views, **args)
    return [v.name for v in views]


def apply(
    repo_path: str | os.PathLike,
    bundle_path: str | os.PathLike | None = None,
    *,
    fs_yaml_file: str | os.PathLike | None = None,
) -> list[str]:
    """Register the repo's definitions with the SDK (``store.apply``); returns their names.

    The workaround for Feast 0.67's CLI: once the ``qarm_batch`` BatchFeatureView has been
    materialized, a second ``feast apply`` crashes in the registry diff
    (``FeatureViewSpec has no "user_defined_function" field``); the SDK path does not diff.
    """
    from transformations import on_demand

    repo = Path(repo_path).resolve()
    ref = read_manifest_ref(bundle_path) if bundle_path else resolve_bundle_ref(repo)
    store = open_store(repo, fs_yaml_file)
    registered = _registered_version(store)
    if registered is not None and ref.version != UNSET and registered != ref.version:
        raise BundleVersionMismatch(
            f"the registry of {repo} serves {registered}, the bundle is {ref.version}: "
            "applying would relabel rows of one bundle as another; use "
            "materialize(..., promote=True) to roll the bundle out"
        )
    if ref.path:
        on_demand.configure(repo_path=repo)
    with _env(**({ENV_BUNDLE: ref.path} if ref.path else {})):
        objects = load_definitions(repo)
        store.apply(objects)
    return [o.name for o in objects]


def materialize(
    bundle_path: str | os.PathLike,
    repo_path: str | os.PathLike,
    catalog_df: pd.DataFrame | None = None,
    interactions_df: pd.DataFrame | None = None,
    *,
    promote: bool = False,
    fs_yaml_file: str | os.PathLike | None = None,
    history: int = DEFAULT_HISTORY,
    positive_threshold: float = POSITIVE_THRESHOLD,
) -> dict:
    """Encode the catalog with a bundle, write the offline sources, apply, materialize.

    Args:
        bundle_path: the bundle directory.
        repo_path: the feature repo (``feature_repo/`` or a copy).
        catalog_df, interactions_df: see :func:`prepare_sources`.
        promote: allow a bundle version other than the one the registry serves. The
            online rows of ``qarm``, ``qarm_batch`` and ``user_history`` are cleared first,
            so between the clear and the end of the run a read finds no row (NOT_FOUND,
            the cold path) rather than a row of the other version.
        fs_yaml_file: another config of the repo (``feature_store.redis.yaml`` ...).

    Returns:
        Stats of :func:`prepare_sources` plus ``previous_version``, ``promoted``,
        ``cleared_views``, ``materialized_views``, ``apply_seconds``,
        ``materialize_seconds``.

    Raises:
        BundleVersionMismatch: the registry serves another bundle version and
            ``promote`` is false (nothing is written).
    """
    from qarm_features.encode import get_bundle

    repo = Path(repo_path).resolve()
    bundle = get_bundle(bundle_path)
    store = open_store(repo, fs_yaml_file)
    previous = _registered_version(store)
    changed = previous is not None and previous != bundle.version
    if changed and not promote:
        raise BundleVersionMismatch(
            f"the registry of {repo} serves bundle {previous}, the bundle given is "
            f"{bundle.version} ({bundle.path}). Rolling it out replaces every code online "
            "and offline: pass promote=True (`qarm materialize --promote`) to do so, or "
            "give the registered bundle."
        )
    stats = prepare_sources(
        bundle.path,
        repo,
        catalog_df,
        interactions_df,
        history=history,
        positive_threshold=positive_threshold,
    )

    from transformations import on_demand

    # This process now serves the new bundle: `store.apply` calls the qarm_cold UDF
    # (dummy input) and `store.materialize` the qarm_batch UDF, both in-process.
    on_demand.configure(repo_path=repo)
    t0 = time.perf_counter()
    with _env(**{ENV_BUNDLE: str(bundle.path)}):
        objects = load_definitions(repo)
        store.apply(objects)
        stats["apply_seconds"] = round(time.perf_counter() - t0, 3)
        cleared = _clear_online(store, CODE_VIEWS) if changed else []

        t0 = time.perf_counter()
        kinds = ("FeatureView", "BatchFeatureView")
        views = [o.name for o in objects if type(o).__name__ in kinds]
        end = datetime.now(timezone.utc) + timedelta(seconds=1)
        last = pd.read_parquet(repo / HISTORY_FILE, columns=["event_timestamp"])
        last = last["event_timestamp"].max()
        if pd.notna(last):  # user histories carry real times, possibly in the future
            end = max(end, last.to_pydatetime() + timedelta(seconds=1))
        store.materialize(start_date=EPOCH, end_date=end, feature_views=views)
    stats.update(
        previous_version=previous,
        promoted=changed,
        cleared_views=cleared,
        materialized_views=views,
        materialize_seconds=round(time.perf_counter() - t0, 3),
        repo=str(repo),
        fs_yaml_file=None if fs_yaml_file is None else str(fs_yaml_file),
    )
    log.info("materialized %s into %s: %s", bundle.version, repo, stats)
    return stats


def push_items(
    repo_path: str | os.PathLike,
    items_df: pd.DataFrame,
    *,
    bundle_path: str | os.PathLike | None = None,
    fs_yaml_file: str | os.PathLike | None = None,
    offline: bool = True,
) -> dict:
    """Give new (or edited) items their codes online now, without a batch rerun.

    The items' content is encoded with the batch function and pushed to ``qarm_push``
    (codes) and ``item_content_push`` (raw embedding), online and, with ``offline``, into
    the offline sources too (so training and the next rollout see them).

    Args:
        repo_path: the feature repo.
        items_df: ``item_id``, ``raw_emb``.
        bundle_path: defaults to the repo's bundle (``QARM_BUNDLE`` or the pointer).
        fs_yaml_file: another config of the repo.
        offline: also append the rows to the offline parquet sources.

    Raises:
        BundleVersionMismatch: the bundle is not the version the registry serves.
        InputError: a bad row (the push is all or nothing).
    """
    from feast.data_source import PushMode

    from qarm_features.encode import get_bundle

    t0 = time.perf_counter()
    repo = Path(repo_path).resolve()
    path = bundle_path or resolve_bundle_ref(repo).path
    if not path:
        raise QarmError(f"no bundle for {repo}: run materialize first or pass bundle_path")
    bundle = get_bundle(path)
    store = open_store(repo, fs_yaml_file)
    registered = _registered_version(store)
    if registered != bundle.version:
        raise BundleVersionMismatch(
            f"cannot push codes of {bundle.version}: the registry of {repo} serves "
            f"{registered}; push with the registered bundle (or materialize --promote first)"
        )
    check_columns(items_df, ["item_id", "raw_emb"], name="items_df")
    now = datetime.now(timezone.utc)
    items = items_df[["item_id", "raw_emb"]].copy()
    items["item_id"] = items["item_id"].astype(np.int64)
    items["raw_emb"] = [np.asarray(v, np.float32) for v in items["raw_emb"]]
    items["event_timestamp"] = row_stamp(now)
    items["created"] = pd.Timestamp(now)
    codes = encode_catalog(bundle, items)
    codes_schema, content_schema, _ = _schemas(bundle.n_levels)
    to = PushMode.ONLINE_AND_OFFLINE if offline else PushMode.ONLINE
    store.push("item_content_push", items[content_schema.names], to=to)
    store.push("qarm_push", codes[codes_schema.names], to=to)
    return {
        "version": bundle.version,
        "n_items": int(len(codes)),
        "item_ids": codes["item_id"].tolist(),
        "offline": offline,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def __getattr__(name: str):
    # the serving helpers moved to transformations.serving; keep `from transformations.job
    # import sample_online` working (lazy: serving imports this module)
    if name in ("sample_online", "check_versions", "serving_setup"):
        from transformations import serving

        return getattr(serving, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
