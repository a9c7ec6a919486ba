"""A feature repo's Feast objects: the store, its definitions, registry facts, online rows.

Shared by the job (:mod:`qarm_features.feast.job`), the serving helpers and the server.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import sys
from pathlib import Path

from qarm_features.errors import InputError
from qarm_features.feast.context import UNSET

_module_counter = itertools.count()


def open_store(repo_path: str | os.PathLike, fs_yaml_file: str | os.PathLike | None = None):
    """A FeatureStore on ``repo_path``; ``fs_yaml_file`` relative paths are taken in the repo."""
    from feast import FeatureStore

    repo = Path(repo_path).resolve()
    if not repo.is_dir():
        raise InputError(f"feature repo {repo} is not a directory")
    if fs_yaml_file is None:
        return FeatureStore(repo_path=str(repo))
    yaml = Path(fs_yaml_file)
    if not yaml.is_absolute():
        yaml = repo / yaml
    if not yaml.is_file():
        raise InputError(f"fs_yaml_file: {yaml} does not exist")
    return FeatureStore(repo_path=str(repo), fs_yaml_file=yaml)


def load_definitions(repo_path: str | os.PathLike) -> list:
    """Import the repo's definition files afresh and return their Feast objects.

    Each file is loaded under a new module name, so a process can apply a repo twice
    (e.g. after a bundle with another number of RQ levels) without stale imports; the
    definitions read the repo's pointer as it is now.
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

    # as `feast apply` does: the repo's files import each other by module name
    sys.path.insert(0, str(repo))
    try:
        modules = []
        for path in get_repo_files(repo):
            if path.name == "static_artifacts.py":
                continue
            name = f"_qarm_feature_repo_{next(_module_counter)}_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            modules.append(module)
    finally:
        sys.path.remove(str(repo))
        for stem in {p.stem for p in get_repo_files(repo)}:
            loaded = sys.modules.get(stem)
            if loaded is not None and str(getattr(loaded, "__file__", "")).startswith(str(repo)):
                del sys.modules[stem]  # a later load re-imports the repo's files afresh
    for module in modules:
        for attr in dir(module):
            obj = getattr(module, attr)
            if isinstance(obj, kinds):
                add(obj)
                if isinstance(obj, PushSource) and obj.batch_source is not None:
                    add(obj.batch_source)
    return list(found.values())


def declared_item_entity(repo_path: str | os.PathLike) -> tuple[str, str] | None:
    """``(entity name, join key)`` of the entity the repo's ``qarm`` view is declared on
    (``qarm_views(item=...)``), from its definition files; None when no ``qarm`` view is
    declared there yet."""
    from feast import Entity
    from feast.feature_view import FeatureView

    objects = load_definitions(repo_path)
    qarm = [o for o in objects if isinstance(o, FeatureView) and o.name == "qarm"]
    if not qarm or not qarm[0].entities:
        return None
    name = qarm[0].entities[0]
    entity = next((o for o in objects if isinstance(o, Entity) and o.name == name), None)
    if entity is None:
        return None
    return entity.name, entity.join_key


def registered_version(store) -> str | None:
    """The ``qarm_version`` tag of the registry's ``qarm`` view (None: not applied yet)."""
    from feast.errors import FeatureViewNotFoundException

    try:
        fv = store.registry.get_feature_view("qarm", store.project, allow_cache=False)
    except FeatureViewNotFoundException:
        return None
    version = fv.tags.get("qarm_version")
    return None if version in (None, "", UNSET) else version


def clear_online(store, names) -> list[str]:
    """Delete the online rows of the named views.

    On SQLite the rows are deleted in one transaction and the table stays: a concurrent
    reader sees all the old rows or none, never a missing table (dropping and re-creating
    it, as Feast's ``update_infra`` does, answered reads in between with "no such table":
    HTTP 500s in the rollout soak). Other stores (Redis: keys, no tables) go through
    ``update_infra``.
    """
    from feast.errors import FeatureViewNotFoundException

    views = []
    for name in names:
        with contextlib.suppress(FeatureViewNotFoundException):
            views.append(
                store.registry.get_any_feature_view(name, store.project, allow_cache=False)
            )
    if not views:
        return []
    if store.config.online_store.type == "sqlite":
        import sqlite3

        from feast.infra.online_stores.sqlite import SqliteOnlineStore, _table_id

        path = SqliteOnlineStore._get_db_path(store.config)
        versioned = bool(
            getattr(store.config.registry, "enable_online_feature_view_versioning", False)
        )
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn, conn:
            known = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            for view in views:
                table = _table_id(store.project, view, versioned)
                if table in known:
                    conn.execute(f'DELETE FROM "{table}"')
        return [v.name for v in views]
    provider = store._get_provider()
    args = dict(entities_to_delete=[], entities_to_keep=[], partial=True)
    provider.update_infra(store.project, tables_to_delete=views, tables_to_keep=[], **args)
    provider.update_infra(store.project, tables_to_delete=[], tables_to_keep=views, **args)
    return [v.name for v in views]
