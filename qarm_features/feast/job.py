"""``qarm materialize`` and the push path: a bundle's codes into a Feast repo.

:func:`materialize` encodes every catalog item with a bundle, writes the repo's offline
sources atomically (:mod:`qarm_features.feast.sources`) and its pointer
(:mod:`qarm_features.feast.context`), registers the definitions (SDK ``store.apply``: the
views then carry the new serving context) and runs Feast's materialization into the online
store. A bundle other than the registered one raises
:class:`~qarm_features.errors.BundleVersionMismatch` unless ``promote=True``; a version
change clears the online rows of the code-bearing views first, so the store never mixes
two versions. :func:`prepare_sources` is its first half (no Feast call), for ``feast
apply`` / ``feast materialize`` users; :func:`apply` is the SDK apply (Feast 0.67's CLI
re-apply crashes on the BatchFeatureView once materialized); :func:`push_items` gives new
items their codes online without a batch rerun.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from qarm_features._validate import check_columns
from qarm_features.errors import BundleVersionMismatch, QarmError
from qarm_features.feast.context import (
    UNSET,
    ServingContext,
    read_pointer,
    write_pointer,
)
from qarm_features.feast.layout import (
    CODES_FILE,
    CONTENT_FILE,
    CURRENT,
    DATA,
    HISTORY_FILE,
    PUSHED_FILE,
)
from qarm_features.feast.rollout import (
    Journal,
    describe,
    locked,
    read_journal,
    repo_lock,
    roll_out,
)
from qarm_features.feast.sources import (
    DEFAULT_HISTORY,
    build_user_history,
    encode_catalog,
    keep_previous_rows,
    new_version_dir,
    recode_history,
    row_stamp,
    switch_current,
    write_parquet,
)
from qarm_features.feast.store import load_definitions, open_store, registered_version
from qarm_features.feast.stream import (
    DEFAULT_CHUNK_ROWS,
    Chunk,
    catalog_rows,
    frame_raw,
    history_items,
    iter_catalog,
    write_item_sources,
)
from qarm_features.progress import ProgressCallback, stage
from qarm_features.schema import CREATED, EVENT_TIMESTAMP, ITEM_ID, RAW_EMB

log = logging.getLogger(__name__)


def _id_dtype(bundle):
    return np.int64 if bundle.id_type == "int64" else str


def _items(df: pd.DataFrame, join_key: str, *, name: str) -> pd.DataFrame:
    """``item_id, raw_emb`` of a frame keyed by ``item_id`` or by the repo's join key."""
    if join_key != ITEM_ID and join_key in df.columns:
        df = df.rename(columns={join_key: ITEM_ID})
    check_columns(df, [ITEM_ID, RAW_EMB], name=name)
    return df[[ITEM_ID, RAW_EMB]].copy()


def _pushed(repo: Path, join_key: str) -> pd.DataFrame:
    """Items pushed and not yet part of a built catalog (the latest content of each)."""
    path = repo / PUSHED_FILE
    if not path.exists():
        return pd.DataFrame({ITEM_ID: [], RAW_EMB: [], "pushed_at": []})
    pushed = pd.read_parquet(path).rename(columns={join_key: ITEM_ID})
    pushed = pushed.sort_values("pushed_at", kind="stable")
    return pushed.drop_duplicates(ITEM_ID, keep="last").reset_index(drop=True)


def _record_pushed(repo: Path, items: pd.DataFrame, join_key: str, *, keep=None) -> None:
    """Rewrite the pushed-items file: ``keep`` of the old rows (all: None) plus ``items``."""
    old = _pushed(repo, join_key)
    if keep is not None:
        old = old[keep(old)]
    new = items[[ITEM_ID, RAW_EMB, "pushed_at"]]
    rows = (
        pd.concat([old, new], ignore_index=True)
        if len(old) and len(new)
        else (new if len(new) else old)
    )
    write_parquet(rows.rename(columns={ITEM_ID: join_key}), repo / PUSHED_FILE)


def _pushed_rows(bundle, repo: Path, join_key: str, pending: list):
    """The ``extra`` of :func:`~qarm_features.feast.stream.write_item_sources`: items pushed
    and not in the catalog just written (never the previous bundle's catalog: a promotion
    serves the new catalog, and items pushed earlier). Pushed items a built catalog now
    holds are forgotten once the sources are written (``pending``)."""
    pushed = _pushed(repo, join_key)
    if not len(pushed):
        return None
    dtype = _id_dtype(bundle)
    pushed[ITEM_ID] = pushed[ITEM_ID].astype(dtype)

    def extra(keys: np.ndarray):
        ids = pushed[ITEM_ID].to_numpy()
        built = np.isin(ids, keys)
        rows = pushed[~built].reset_index(drop=True)
        if built.any():  # a built catalog now holds some: forget them
            held = pd.Index(ids[built])
            pending.append(
                lambda: _record_pushed(
                    repo,
                    rows.iloc[:0],
                    join_key,
                    keep=lambda d: ~d[ITEM_ID].astype(dtype).isin(held),
                )
            )
        if not len(rows):
            return None
        where = str(repo / PUSHED_FILE)
        k = rows[ITEM_ID].to_numpy(np.int64 if dtype is np.int64 else object)
        raw = frame_raw(rows[RAW_EMB].to_numpy(), k, where=where, dim=bundle.raw_dim, start=0)
        return Chunk(k, raw, 0)

    return extra


@locked("qarm prepare_sources")
def prepare_sources(
    bundle_path: str | os.PathLike,
    repo_path: str | os.PathLike,
    catalog_df: pd.DataFrame | str | os.PathLike | None = None,
    interactions_df: pd.DataFrame | None = None,
    *,
    history: int = DEFAULT_HISTORY,
    positive_threshold: float | None = None,
    now: datetime | None = None,
    join_key: str = ITEM_ID,
    keep_previous: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: ProgressCallback | None = None,
    journal: Journal | None = None,
) -> dict:
    """Encode the catalog and write the repo's offline sources and bundle pointer.

    No Feast call: after this, ``feast apply`` and ``feast materialize`` (the CLI) or
    :func:`materialize` (the SDK) take over. The catalog is streamed
    (:mod:`qarm_features.feast.stream`): read, encoded and written as parquet row groups
    ``chunk_rows`` rows at a time, so memory does not grow with the catalog. Every file is
    written atomically and nothing is served until all of them are.

    Args:
        bundle_path: the bundle directory (verified on load).
        repo_path: the feature repo; files go to a new ``<repo>/data/versions/<run>/``,
            then ``data/current`` is switched to it (with the pointer) in one rename.
        catalog_df: ``item_id`` (or ``join_key``), ``raw_emb``: a DataFrame or the path
            of a parquet file (read in record batches); None = the bundle's own catalog
            (its ``raw_emb.npy``, memory-mapped). Items pushed since their last build
            (``data/qarm_pushed.parquet``) are kept.
        interactions_df: ``user_id``, ``item_id``, ``timestamp`` (+ ``rating``) for the
            user-side view; None re-codes the existing history with this bundle (or
            writes an empty one).
        history: items per user-history row.
        positive_threshold: ``rating`` threshold of a positive; None = the bundle's own
            (``config.pairs.positive_threshold``).
        now: wall-clock time of the write (tests); defaults to now.
        join_key: the repo's item join key (the id column of the sources it writes).
        keep_previous: keep the served version's rows as the ``qarm_prev`` source (when
            this bundle is another version; the one already kept, when it is the same).
        chunk_rows: catalog rows per chunk (one parquet row group each).
        progress: ``progress(stage, total, advance)`` (:mod:`qarm_features.progress`).
        journal: the run's journal (:mod:`qarm_features.feast.journal`; :func:`materialize`
            passes its own): steps ``sources`` and ``switch`` are recorded in it.

    Returns:
        Stats: ``version``, ``n_items``, ``n_pushed_items_kept``, ``n_history_rows``,
        ``stamp``, ``seconds``, ``stages`` (per stage ``seconds``, ``peak_rss_mib``).

    Raises:
        BundleError: the bundle fails verification. InputError: a bad catalog row (named
            by file, column, row and value) or a duplicated item id; nothing is switched in.
        RepoLocked: another run holds the repo's lock.
    """
    from qarm_features.bundle.encode import get_bundle

    t0 = time.perf_counter()
    stages: dict = {}
    repo = Path(repo_path).resolve()
    bundle = get_bundle(bundle_path)
    schema = bundle.schema
    if positive_threshold is None:
        positive_threshold = bundle.config.pairs.positive_threshold
    now = now or datetime.now(timezone.utc)
    stamp = row_stamp(now)
    need, old_history = history_items(interactions_df, repo / HISTORY_FILE)
    # Everything is written beside the served set, then switched in at once (sources.py).
    out = new_version_dir(repo, f"{int(now.timestamp() * 1000)}-{bundle.version}")
    if journal is not None:
        journal.step("sources", sources=out.name)
    pending: list = []
    try:
        written = write_item_sources(
            bundle,
            iter_catalog(catalog_df, bundle, join_key=join_key, chunk_rows=chunk_rows),
            codes_path=out / CODES_FILE.name,
            content_path=out / CONTENT_FILE.name,
            id_column=join_key,
            stamp=stamp,
            created=pd.Timestamp(now),
            total=catalog_rows(bundle, catalog_df),
            keep_ids=need,
            extra=_pushed_rows(bundle, repo, join_key, pending),
            progress=progress,
            records=stages,
        )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    t_encode = time.perf_counter() - t0
    codes = written.kept_codes

    history_schema = schema.arrow("history")
    with stage("history", progress=progress, records=stages):
        if interactions_df is not None:
            hist = build_user_history(
                interactions_df,
                codes,
                schema,
                history=history,
                positive_threshold=positive_threshold,
                version=bundle.version,
            )
        elif old_history is not None:
            hist = recode_history(old_history, codes, schema, bundle.version)
        else:
            hist = pd.DataFrame({name: [] for name in history_schema.names})
        write_parquet(hist, out / HISTORY_FILE.name, history_schema)
    kept = keep_previous_rows(repo, out, bundle.version) if keep_previous else None
    write_pointer(repo, ServingContext.of_bundle(bundle.path), into=out)
    if journal is not None:
        journal.step("switch", sources=out.name)
    switch_current(repo, out)  # the one atomic step: sources and pointer together
    # Only now may pushed items the new catalog holds be forgotten: a run killed before the
    # switch leaves the previous set served, and it still needs them (after the switch,
    # a kill here leaves them listed: the next run forgets them).
    for forget in pending:
        forget()
    stats = {
        "version": bundle.version,
        "bundle": str(bundle.path),
        "n_levels": bundle.n_levels,
        "n_items": int(written.keys.shape[0]),
        "n_pushed_items_kept": int(written.keys.shape[0] - written.n_catalog),
        "n_history_rows": len(hist),
        "kept_previous": kept,
        "stamp": stamp.isoformat(),
        "encode_seconds": round(t_encode, 3),
        "seconds": round(time.perf_counter() - t0, 3),
        "stages": stages,
    }
    log.info("prepared offline sources in %s: %s", repo / DATA, stats)
    return stats


def _refuse_other_version(store, repo: Path, version: str, what: str) -> str | None:
    registered = registered_version(store)
    if registered is not None and version != UNSET and registered != version:
        raise BundleVersionMismatch(
            f"the registry of {repo} serves bundle {registered}, the bundle given is "
            f"{version}: {what}. Roll it out with `qarm materialize --promote` "
            "(materialize(..., promote=True)), or give the registered bundle."
        )
    return registered


def apply(
    repo_path: str | os.PathLike,
    bundle_path: str | os.PathLike | None = None,
    *,
    fs_yaml_file: str | os.PathLike | None = None,
) -> list[str]:
    """Register the repo's definitions with the SDK (``store.apply``); returns their names.

    With ``bundle_path``, the repo's pointer is set to that bundle first (same version as
    the registry's only). The workaround for Feast 0.67's CLI: once the ``qarm_batch``
    BatchFeatureView has been materialized, a second ``feast apply`` crashes in the
    registry diff (``FeatureViewSpec has no "user_defined_function" field``); the SDK path
    does not diff.

    Raises:
        BundleVersionMismatch: the registry serves another version (nothing is written).
        RepoLocked: a run (``qarm materialize``) holds the repo's lock.
    """
    repo = Path(repo_path).resolve()
    context = ServingContext.of_repo(repo, bundle_path)
    store = open_store(repo, fs_yaml_file)
    _refuse_other_version(store, repo, context.version, "applying would relabel its rows")
    with repo_lock(repo, "qarm apply"):
        if bundle_path is not None and read_pointer(repo) != context:
            if (repo / CURRENT).is_symlink():
                write_pointer(repo, context)
            else:  # nothing served yet: a sources set holding just the pointer
                out = new_version_dir(repo, f"apply-{context.version}")
                write_pointer(repo, context, into=out)
                switch_current(repo, out)
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
    positive_threshold: float | None = None,
    join_key: str = ITEM_ID,
    keep_previous: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: ProgressCallback | None = None,
    lock_timeout: float = 0.0,
) -> dict:
    """Encode the catalog with a bundle, write the offline sources, apply, materialize.

    One run at a time per repo: the run holds the repo's lock and journals its steps
    (``sources``, ``switch``, ``clear``, ``apply``, ``online write``;
    :mod:`qarm_features.feast.journal`). A run killed at any step is named by ``qarm
    status`` and rolled back (before the switch) or finished (after it) by ``qarm status
    --repair`` (:func:`recover`); a new run after a killed one replaces it (it clears what
    the killed run may have left online).

    Args:
        bundle_path: the bundle directory.
        repo_path: the feature repo (``feature_repo/`` or a copy).
        catalog_df, interactions_df, history, positive_threshold, join_key, chunk_rows,
            progress: see :func:`prepare_sources` (stages ``encode``, ``history``, then
            ``feast materialize``).
        promote: allow a bundle version other than the one the registry serves. The
            online rows of ``qarm``, ``qarm_batch``, ``user_history`` and ``qarm_prev``
            are cleared first (before the new definitions are applied), so between the
            clear and the end of the run a read finds no row (NOT_FOUND, the cold path)
            rather than a row of the other version.
        fs_yaml_file: another config of the repo (``feature_store.redis.yaml`` ...).
        keep_previous: with a switch of version, keep serving the previous version's rows
            in the ``qarm_prev`` view beside ``qarm`` (a ranker trained on the old codes
            reads them until its successor takes over); the next run without it drops
            ``qarm_prev``. No view ever mixes two versions.
        lock_timeout: seconds to wait for another run holding the repo's lock (0: refuse
            at once).

    Returns:
        Stats of :func:`prepare_sources` plus ``previous_version``, ``promoted``,
        ``cleared_views``, ``materialized_views`` (``streamed_views``: those written in
        record batches, :mod:`qarm_features.feast.online_write`; ``empty_views``: sources
        with no row, skipped), ``apply_seconds``,
        ``materialize_seconds``.

    Raises:
        BundleVersionMismatch: the registry serves another bundle version and
            ``promote`` is false (nothing is written).
        RepoLocked: another run holds the repo's lock (named in the message).
    """
    from qarm_features.bundle.encode import get_bundle

    repo = Path(repo_path).resolve()
    bundle = get_bundle(bundle_path)
    store = open_store(repo, fs_yaml_file)
    what = "rolling it out replaces every code online and offline"
    if not promote:  # refused before anything, the lock file included, is written
        _refuse_other_version(store, repo, bundle.version, what)
    with repo_lock(repo, f"qarm materialize {bundle.version}", timeout=lock_timeout):
        # again under the lock: a run that held it may have changed the registry
        previous = registered_version(store)
        if not promote:
            _refuse_other_version(store, repo, bundle.version, what)
        left = read_journal(repo)
        if left is not None:
            log.warning("%s; this run replaces it", describe(left))
        # every version whose rows may be online: the registry's, and a killed run's two
        maybe_online = {previous} | ({left["previous"], left["version"]} if left else set())
        changed = any(v is not None and v != bundle.version for v in maybe_online)
        journal = Journal.begin(repo, bundle, previous=(left or {"previous": previous})["previous"])
        stats = prepare_sources(
            bundle.path,
            repo,
            catalog_df,
            interactions_df,
            history=history,
            positive_threshold=positive_threshold,
            join_key=join_key,
            keep_previous=keep_previous,
            chunk_rows=chunk_rows,
            progress=progress,
            journal=journal,
        )
        stages = stats["stages"]
        stats.update(
            roll_out(store, repo, journal, changed=changed, progress=progress, stages=stages)
        )
        journal.done()
    stats.update(
        previous_version=previous,
        promoted=changed,
        repo=str(repo),
        fs_yaml_file=None if fs_yaml_file is None else str(fs_yaml_file),
    )
    log.info("materialized %s into %s: %s", bundle.version, repo, stats)
    return stats


def _served_bundle(repo: Path, bundle_path, fs_yaml_file):
    """``(bundle, store)``: the bundle a push encodes with, which must be the version the
    repo's registry serves."""
    from qarm_features.bundle.encode import get_bundle

    context = ServingContext.of_repo(repo, bundle_path)
    if not context.is_set:
        raise QarmError(f"no bundle for {repo}: run `qarm materialize` first or pass bundle_path")
    bundle = get_bundle(context.bundle)
    store = open_store(repo, fs_yaml_file)
    registered = registered_version(store)
    if registered != bundle.version:
        raise BundleVersionMismatch(
            f"cannot push codes of {bundle.version}: the registry of {repo} serves "
            f"{registered}; push with the registered bundle (or materialize --promote first)"
        )
    return bundle, store


def push_items(
    repo_path: str | os.PathLike,
    items_df: pd.DataFrame,
    *,
    bundle_path: str | os.PathLike | None = None,
    fs_yaml_file: str | os.PathLike | None = None,
    offline: bool = True,
    join_key: str = ITEM_ID,
    lock_timeout: float = 0.0,
) -> dict:
    """Give new (or edited) items their codes online now, without a batch rerun.

    The items' content is encoded with the batch function and pushed to ``qarm_push``
    (codes) and ``item_content_push`` (raw embedding), online and, with ``offline``, into
    the offline sources too (so training and the next rollout see them).

    Args:
        repo_path: the feature repo.
        items_df: ``item_id`` (or the repo's join key), ``raw_emb``.
        bundle_path: defaults to the repo's bundle (its pointer).
        fs_yaml_file: another config of the repo.
        offline: also append the rows to the offline parquet sources.
        join_key: the repo's item join key.
        lock_timeout: seconds to wait for a run holding the repo's lock (0: refuse at once).

    The push holds the repo's lock (:func:`~qarm_features.feast.rollout.repo_lock`): a
    promotion rewrites the offline sources and the pushed-items file and switches the
    served bundle, so a push beside it could be lost or carry the old version's codes. A
    push that waited reads the served bundle after the promotion, and encodes with it.

    Raises:
        BundleVersionMismatch: the bundle is not the version the registry serves.
        InputError: a bad row (the push is all or nothing).
        RepoLocked: a run (``qarm materialize``) holds the repo's lock.
    """
    from feast.data_source import PushMode

    t0 = time.perf_counter()
    repo = Path(repo_path).resolve()
    items = _items(items_df, join_key, name="items_df")  # bad rows refused before the lock
    _served_bundle(repo, bundle_path, fs_yaml_file)  # a refused push writes nothing, no lock
    with repo_lock(repo, "qarm push", timeout=lock_timeout):
        # again under the lock: a promotion that held it may have switched the bundle
        bundle, store = _served_bundle(repo, bundle_path, fs_yaml_file)
        now = datetime.now(timezone.utc)
        items[ITEM_ID] = items[ITEM_ID].astype(_id_dtype(bundle))
        items[RAW_EMB] = [np.asarray(v, np.float32) for v in items[RAW_EMB]]
        items[EVENT_TIMESTAMP] = row_stamp(now)
        items[CREATED] = pd.Timestamp(now)
        codes = encode_catalog(bundle, items)
        keyed = {"id_type": bundle.id_type, "id_column": join_key}
        codes_schema = bundle.schema.arrow("codes", **keyed)
        content_schema = bundle.schema.arrow("content", **keyed)
        rename = {ITEM_ID: join_key}
        to = PushMode.ONLINE_AND_OFFLINE if offline else PushMode.ONLINE
        store.push("item_content_push", items.rename(columns=rename)[content_schema.names], to=to)
        store.push("qarm_push", codes.rename(columns=rename)[codes_schema.names], to=to)
        if offline:  # the next materialize keeps them until a built catalog holds them
            _record_pushed(repo, items.assign(pushed_at=pd.Timestamp(now)), join_key)
    return {
        "version": bundle.version,
        "n_items": int(len(codes)),
        "item_ids": codes[ITEM_ID].tolist(),
        "offline": offline,
        "seconds": round(time.perf_counter() - t0, 3),
    }
