"""``qarm build --repo R``: a bundle from a team's own tables, as its ``qarm.yaml`` says.

catalog -> content embeddings (the frozen text encoder over a template, a CLIP encoder
over images, or the team's own embedding column) -> events -> pairs (mined from the
events, or the team's own I2I table and retrieval embeddings) -> :func:`build_bundle`.
Every table is read and checked before anything is trained (:mod:`qarm_features.build.tables`).

Bundles are immutable and version-named (:func:`qarm_features.build.bundles.build_versioned`):
``<repo>/<bundles>/<version>/``, with ``<bundles>/LATEST`` naming the newest build, which
``qarm materialize --repo R`` serves unless told another.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qarm_features.build.bundles import (
    BuildResult,
    build_bundle,
    build_versioned,
    encode_catalog_text,
)
from qarm_features.build.tables import (
    Keys,
    Table,
    catalog_keys,
    check_images,
    embedding_column,
    events_frame,
    read_table,
    render_texts,
    require_columns,
)
from qarm_features.errors import ConfigError, InputError
from qarm_features.progress import stage
from qarm_features.project import EntitySpec, Project, load_project

log = logging.getLogger(__name__)


def _table(project: Project, spec, *, what: str) -> Table:
    """The section's table: its file(s), or the Feast data source of the repo it names."""
    if spec.path is not None:
        return read_table(data_path(project, spec.path), what=what, csv=spec.csv)
    from feast import FileSource

    from qarm_features.feast.store import open_store

    store = open_store(project.repo)
    try:
        source = store.get_data_source(spec.source)
    except Exception as exc:  # noqa: BLE001 - Feast raises several kinds
        raise ConfigError(
            f"{what}.source: {spec.source!r} is not a data source of the repo ({exc})"
        ) from None
    if not isinstance(source, FileSource):
        raise ConfigError(
            f"{what}.source: {spec.source!r} is a {type(source).__name__}; qarm reads "
            "FileSources (give the table's path instead)"
        )
    return read_table(project.resolve(source.path), what=what)


def data_path(project: Project, path: str) -> Path:
    """A catalog/events path of ``qarm.yaml``: relative to the data set's tables when it
    names a ``dataset``, else to the repo."""
    if project.dataset is None:
        return project.resolve(path)
    from qarm_features.datasets.movielens import dataset_tables

    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else dataset_tables(project.dataset) / p


def catalog_content(
    project: Project,
    table: Table,
    keys: Keys,
    *,
    cache_dir=None,
    progress=False,
    on_progress=None,
    encoder_path: str | os.PathLike | None = None,
):
    """``(n, d)`` float32 content embeddings of the catalog rows, per the config.

    ``encoder_path``: a fine-tuned text encoder (a bundle's ``encoder/``) to encode the
    text with instead of the configured frozen one.
    """
    spec, cfg, frame = project.catalog, project.build, table.frame
    if spec.embedding:
        require_columns(table, [spec.embedding], what="catalog")
        return embedding_column(frame, spec.embedding, name=table.name, what="catalog")
    if spec.image:
        require_columns(table, [spec.image], what="catalog")
        base = Path(table.name).parent if Path(table.name).exists() else project.repo
        images = check_images(frame, spec.image, base, name=table.name)
        if cfg.encoder.kind != "clip":
            raise ConfigError(
                "catalog.image: images need a CLIP encoder; set build.encoder.kind: clip and "
                "build.encoder.model_path to a local CLIP folder"
            )
        from qarm_features.content.encoders import make_encoder

        texts = render_texts(frame, spec.text, name=table.name) if spec.text else None
        encoder = make_encoder(cfg.encoder)
        return np.asarray(encoder.encode(texts, images=images, show_progress=progress), np.float32)
    texts = render_texts(frame, spec.text, name=table.name)
    return encode_catalog_text(
        texts,
        cfg,
        cache_dir=cache_dir,
        progress=progress,
        on_progress=on_progress,
        encoder_path=encoder_path,
    )


def _item_embeddings(project: Project, keys: Keys) -> tuple[np.ndarray, np.ndarray] | None:
    spec = project.pairs
    if not spec.item_embeddings:
        return None
    table = read_table(project.resolve(spec.item_embeddings), what="pairs.item_embeddings")
    id_col, emb_col = spec.item_embeddings_columns
    require_columns(table, [id_col, emb_col], what="pairs.item_embeddings")
    ids, known = keys.lookup(
        table.frame[id_col], what=f"item embeddings {table.name}", column=id_col
    )
    if not known.all():
        log.warning(
            "%s: ignoring %d rows of items not in the catalog", table.name, int((~known).sum())
        )
    emb = embedding_column(table.frame[known], emb_col, name=table.name, what="item embeddings")
    return ids[known], emb


def _i2i_pairs(project: Project, keys: Keys) -> pd.DataFrame | None:
    spec = project.pairs
    if not spec.i2i:
        return None
    table = read_table(project.resolve(spec.i2i), what="pairs.i2i")
    trig, targ = spec.i2i_columns
    require_columns(table, [trig, targ], what="pairs.i2i")
    what = f"i2i pairs {table.name}"
    t_ids, t_ok = keys.lookup(table.frame[trig], what=what, column=trig)
    g_ids, g_ok = keys.lookup(table.frame[targ], what=what, column=targ)
    ok = t_ok & g_ok & (t_ids != g_ids)
    if not ok.any():
        raise InputError(f"{what}: no pair of two distinct catalog items")
    score = (
        table.frame["score"].to_numpy(np.float64) if "score" in table.frame else np.ones(len(ok))
    )
    return pd.DataFrame(
        {"trigger_id": t_ids[ok], "target_id": g_ids[ok], "score": score[ok], "source": "i2i"}
    )


def mine(project: Project, interactions: pd.DataFrame, keys: Keys, cfg):
    """``(pairs, stats)``: mined from the events, with the team's I2I pairs and retrieval
    embeddings where ``qarm.yaml`` gives them (the team's I2I replaces Swing)."""
    from qarm_features.build.ray_pairs import mine_pairs_by_config
    from qarm_features.pairs.mining import PAIR_COLUMNS

    i2i = _i2i_pairs(project, keys)
    emb = _item_embeddings(project, keys)
    pcfg = cfg.pairs.model_copy(update={"use_swing": cfg.pairs.use_swing and i2i is None})
    if not (pcfg.use_u2i or pcfg.use_swing):
        pairs, stats = pd.DataFrame(columns=PAIR_COLUMNS), {}
    else:
        kw = {} if emb is None else {"item_ids": emb[0], "item_emb": emb[1]}
        pairs, stats = mine_pairs_by_config(interactions, pcfg, **kw)  # local or Ray
    if i2i is not None:
        lo = np.minimum(i2i["trigger_id"], i2i["target_id"])
        hi = np.maximum(i2i["trigger_id"], i2i["target_id"])
        i2i = i2i.assign(_a=lo, _b=hi).drop_duplicates(["_a", "_b"]).drop(columns=["_a", "_b"])
        both = pd.concat([pairs, i2i], ignore_index=True)
        lo = np.minimum(both["trigger_id"], both["target_id"])
        hi = np.maximum(both["trigger_id"], both["target_id"])
        keep = ~pd.DataFrame({"a": lo, "b": hi}).duplicated().to_numpy()  # mined pairs first
        pairs = both[keep].reset_index(drop=True)
        stats = {**stats, "n_i2i_pairs": int(len(i2i)), "n_pairs": int(len(pairs))}
    return pairs, stats


@dataclass
class RepoData:
    """A repo's tables, read and checked: what every route (build, evaluate) starts from.

    Attributes:
        project: the parsed ``qarm.yaml``.
        catalog: the catalog table; ``keys`` its ids (``keys.ids``: the pipeline's int64).
        interactions: ``user_id, item_id, rating, timestamp`` rows (``events_frame``),
            sorted by time; ``threshold``: ``rating >= threshold`` is a positive.
        event_stats: counts of the events read (recorded in the manifest).
    """

    project: Project
    catalog: Table
    keys: Keys
    interactions: pd.DataFrame
    threshold: float
    event_stats: dict
    int_users: bool = True  # the log's user ids are ints (not factorised strings)

    @property
    def history_interactions(self) -> pd.DataFrame | None:
        """The rows the ``user_history`` view is built from: the events when both the
        item and the user ids are the team's ints (the view is keyed on ``user_id`` int64
        and lists int item ids); None otherwise (no user-side view is written)."""
        return self.interactions if self.keys.kind == "int64" and self.int_users else None

    @property
    def config(self):
        """``qarm.yaml``'s build config, with the events' positive threshold."""
        build = self.project.build
        pairs = build.pairs.model_copy(update={"positive_threshold": self.threshold})
        return build.model_copy(update={"pairs": pairs})

    @property
    def item_keys(self):
        """A string catalog's keys (stored in the bundle); None for int ids."""
        return None if self.keys.kind == "int64" else self.keys.keys


def read_repo(repo_path: str | os.PathLike | Project, *, on_step=None) -> RepoData:
    """Read and check the catalog and events ``qarm.yaml`` names (nothing is trained).

    Raises:
        ConfigError: a bad ``qarm.yaml``. InputError: a bad table (file, column, row named).
    """
    project = repo_path if isinstance(repo_path, Project) else load_project(repo_path)
    step = on_step or (lambda _label: None)
    step("reading the catalog")
    table = _table(project, project.catalog, what="catalog")
    require_columns(table, [project.catalog.id], what="catalog")
    keys = catalog_keys(table.frame, project.catalog.id, name=table.name)
    if project.catalog.text:  # a template naming a missing column fails before any work
        render_texts(table.frame.head(0), project.catalog.text, name=table.name)
    step("reading the events")
    events = _table(project, project.events, what="events")
    interactions, threshold, event_stats = events_frame(events, project.events, keys)
    int_users = pd.api.types.is_integer_dtype(events.frame[project.events.user])
    return RepoData(project, table, keys, interactions, threshold, event_stats, int_users)


def repo_content(
    data: RepoData,
    *,
    pairs: pd.DataFrame | None = None,
    encoder_dir: str | os.PathLike | None = None,
    cache_dir=None,
    progress: bool = False,
    on_progress=None,
    on_step=None,
) -> tuple[np.ndarray, str | None, dict | None]:
    """The catalog's raw content embeddings, fine-tuning the text encoder first when
    ``build.encoder.finetune_layers > 0``.

    Args:
        pairs: the mined ``<trigger, target>`` pairs the fine-tuner learns from (the
            ones the aligner gets: the evaluation passes pairs of its train rows only).
            Needed only when fine-tuning.
        encoder_dir: where to save the fine-tuned encoder (default: a temporary
            directory under the repo's bundles directory); the bundle copies it in.

    Returns:
        ``(raw_emb, encoder_path, encoder_info)``: the embeddings, the fine-tuned
        encoder's folder (None when frozen) and what the manifest records of it.
    """
    step = on_step or (lambda _label: None)
    project, cfg = data.project, data.config
    kw = {"cache_dir": cache_dir, "progress": progress, "on_progress": on_progress}
    if cfg.encoder.finetune_layers == 0:
        step("encoding item content")
        return catalog_content(project, data.catalog, data.keys, **kw), None, None
    if not project.catalog.text or project.catalog.image or cfg.encoder.kind != "text":
        raise ConfigError(
            "build.encoder.finetune_layers fine-tunes the text encoder: it needs "
            "catalog.text and build.encoder.kind: text (images and your own embeddings "
            "cannot be fine-tuned here)"
        )
    if pairs is None:
        raise InputError("repo_content: fine-tuning needs the mined pairs (pairs=...)")
    from qarm_features.build.bundles import finetune_encoder

    step(f"fine-tuning the top {cfg.encoder.finetune_layers} encoder layers")
    out = Path(encoder_dir) if encoder_dir is not None else _encoder_dir(project)
    texts = render_texts(data.catalog.frame, project.catalog.text, name=data.catalog.name)
    path, info = finetune_encoder(texts, data.keys.ids, pairs, cfg, out, progress=progress)
    step("encoding item content")  # with the fine-tuned encoder: the frozen pass is not needed
    raw = catalog_content(project, data.catalog, data.keys, encoder_path=path, **kw)
    return raw, str(path), info


def _encoder_dir(project: Project) -> Path:
    import tempfile

    root = project.bundles_dir
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".encoder-", dir=root)) / "encoder"


def item_entity(project: Project) -> EntitySpec:
    """The item entity the repo's QARM views key on, from one place: its declarations.

    ``qarm.yaml``'s ``entity:`` may repeat it; when it disagrees, nothing is written.

    Raises:
        ConfigError: ``qarm.yaml`` names another entity or join key than the repo's
            ``qarm`` view is declared on (both named).
    """
    from qarm_features.feast.store import declared_item_entity

    declared = declared_item_entity(project.repo)
    given = project.entity
    if declared is None:
        return given or EntitySpec()
    found = EntitySpec(name=declared[0], join_key=declared[1])
    if given is not None and given != found:
        raise ConfigError(
            f"{project.repo / 'qarm.yaml'}: entity {{name: {given.name}, join_key: "
            f"{given.join_key}}} but the repo declares the qarm views on entity "
            f"{found.name!r} (join key {found.join_key!r}); fix qarm.yaml's entity: or "
            "remove it (the declarations then decide)"
        )
    return found


def build_from_repo(
    repo_path: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    cache_dir=None,
    on_step=None,
    progress: bool = False,
    warm_start: str | os.PathLike | None = None,
    on_progress=None,
) -> BuildResult:
    """Read the repo's ``qarm.yaml``, check every table, build a version-named bundle.

    The one build route: the MovieLens demo (``feature_repo/qarm.yaml``) and a team's
    repo alike. With ``build.encoder.finetune_layers > 0`` the text encoder is fine-tuned
    on the mined pairs first and the bundle carries it (``encoder/``).

    Args:
        repo_path: the feature repo.
        out: the bundles directory (default: ``qarm.yaml``'s ``bundles``).
        warm_start: the previous bundle whose code ids the new one keeps (see
            :func:`qarm_features.build.bundles.build_bundle`).
        on_progress: ``on_progress(stage, total, advance)`` for every stage
            (:mod:`qarm_features.progress`): text encoding, then the pipeline's.

    Raises:
        ConfigError: a bad ``qarm.yaml``. InputError: a bad table (file, column, row named).
    """
    import shutil

    project = load_project(repo_path)
    item_entity(project)  # a qarm.yaml/declarations mismatch stops before any work
    data = read_repo(project, on_step=on_step)
    cfg = data.config
    step = on_step or (lambda _label: None)
    step("mining pairs")  # here, not in the pipeline: fine-tuning needs the pairs first
    mining: dict = {}
    with stage("pairs", progress=on_progress, records=mining, logger=log):
        mined = mine(data.project, data.interactions, data.keys, cfg)
    raw, encoder_path, encoder_info = repo_content(
        data,
        pairs=mined[0],
        cache_dir=cache_dir,
        progress=progress,
        on_progress=on_progress,
        on_step=on_step,
    )
    try:
        extra = {"events": data.event_stats}
        if encoder_info is not None:
            extra["encoder"] = encoder_info
        result = build_versioned(
            Path(out) if out is not None else data.project.bundles_dir,
            lambda out: build_bundle(
                out,
                item_ids=data.keys.ids,
                raw_emb=raw,
                interactions=data.interactions,
                config=cfg,
                mined=mined,
                item_keys=data.item_keys,
                on_step=on_step,
                progress=progress,
                on_progress=on_progress,
                extra_metrics=extra,
                warm_start=warm_start,
                encoder_dir=encoder_path,
            ),
        )
        result.timings = {"pairs_s": mining["pairs"]["seconds"], **result.timings}
        return result
    finally:
        if encoder_path is not None:  # the bundle holds its own copy
            shutil.rmtree(Path(encoder_path).parent, ignore_errors=True)


def _items_content(project: Project, items) -> tuple[Keys, np.ndarray]:
    """The keys and content embeddings of items in the catalog's format (a frame or a
    file), in the raw space of the bundle the repo serves (its fine-tuned encoder, if any)."""
    from qarm_features.feast.context import ServingContext

    if isinstance(items, pd.DataFrame):
        table = Table(items.reset_index(drop=True), "items")
    else:
        table = read_table(Path(items), what="items")
    require_columns(table, [project.catalog.id], what="items")
    keys = catalog_keys(table.frame, project.catalog.id, name=table.name)
    served = ServingContext.of_repo(project.repo)
    encoder = served.load().encoder_path if served.is_set else None  # the served raw space
    return keys, catalog_content(project, table, keys, encoder_path=encoder)


def content_embeddings(repo_path: str | os.PathLike, items) -> np.ndarray:
    """The content embeddings of items, made as ``qarm build`` made the catalog's.

    What the cold view ``qarm_cold`` takes as ``raw_emb`` for an item that has no row
    yet: its columns rendered with ``qarm.yaml``'s template and encoded with the frozen
    encoder of the bundle the repo serves (its fine-tuned one, if it carries one; text or
    CLIP), or its own ``embedding`` column. Pass each row to ``get_online_features`` as
    it is (a float32 array in-process; Feast types it fast).

    Args:
        repo_path: the feature repo with a ``qarm.yaml``.
        items: a DataFrame or a parquet/CSV file in the catalog's format: its id column
            and its content columns (``catalog.text``'s, ``image``, or ``embedding``).

    Returns:
        ``(n, d_raw)`` float32, in the rows' order.

    Raises:
        InputError: a missing column or a bad row (file, column, row and value named).
    """
    return _items_content(load_project(repo_path), items)[1]


def push_from_file(
    repo_path: str | os.PathLike, items_path: str | os.PathLike, *, lock_timeout: float = 0.0
) -> dict:
    """``qarm push``: new items, in the catalog's format, encoded and pushed online.

    The stats say how many items the served bundle's catalog lacks now and whether a
    rebuild is due (:func:`qarm_features.feast.serving.appended`).

    The table has the catalog's id column and content columns (``qarm.yaml``'s
    ``catalog``); the items' codes come from the bundle the repo serves, so a ranker reads
    them at once (and training sees them: the offline sources get the rows too).

    Raises:
        InputError: a bad table (file, column, row named). BundleVersionMismatch: the repo
            serves no bundle, or another version than its pointer. RepoLocked: a
            promotion holds the repo's lock past ``lock_timeout`` seconds.
    """
    from qarm_features.feast.job import push_items

    project = load_project(repo_path)
    keys, raw = _items_content(project, items_path)
    join_key = item_entity(project).join_key
    items = pd.DataFrame({join_key: keys.keys, "raw_emb": list(raw)})
    stats = push_items(project.repo, items, join_key=join_key, lock_timeout=lock_timeout)
    from qarm_features.feast.serving import appended

    added = appended(project.repo)  # the daily route's check: is a rebuild due?
    stats.update(
        n_added_since_build=added["n_added"],
        rebuild_due=added["rebuild_due"],
        rebuild_reasons=added["reasons"],
    )
    return stats
