"""``qarm init``: a new QARM feature repo, or QARM added to a team's existing repo.

- :func:`init_repo` writes a working repo: ``feature_store.yaml`` (embedded defaults:
  SQLite online store, DuckDB offline store, local registry), ``qarm.yaml`` (to fill in) and
  ``qarm_definitions.py`` (an item entity and the QARM views).
- :func:`init_into` adds QARM to an *existing* repo: ``qarm.yaml`` and one definitions file
  that imports the repo's own item entity (its join key and value type are reused) and
  declares the QARM views with :func:`qarm_features.feast.views.qarm_views`. None of the
  repo's files is touched; a file that already exists is never overwritten.
- :func:`offline_store_advice` says what to change when that repo's offline store would
  lose training rows (Feast's file store) or cannot read a QARM repo (plain ``duckdb``).
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

from qarm_features.errors import ConfigError

DEFINITIONS_FILE = "qarm_definitions.py"
OFFLINE_STORE = "qarm_features.feast.duckdb_store.QarmDuckDBOfflineStore"
# Feast's names of the file (dask) store and of its DuckDB store (repo_config.py)
_FILE_STORES = ("file", "dask", "feast.infra.offline_stores.dask.DaskOfflineStore")
_PLAIN_DUCKDB = ("duckdb", "feast.infra.offline_stores.duckdb.DuckDBOfflineStore")

FEATURE_STORE_YAML = """\
# Feast repo with QARM features, embedded defaults: one machine, no servers.
#   registry       a local file (data/registry.db)
#   online store   SQLite (data/online_store.db)
#   offline store  DuckDB over the parquet files under data/ (written by `qarm materialize`)
project: {project}
provider: local
registry:
    path: data/registry.db
    cache_ttl_seconds: 60
    # keep serving a view's last rows while `feast materialize` runs (or after a killed run)
    serve_features_while_materializing: true
online_store:
    type: sqlite
    path: data/online_store.db
# Feast's DuckDB store with QARM's fixes: get_historical_features returns every entity row
# (the file store drops rows earlier than an entity's first feature row)
offline_store:
    type: qarm_features.feast.duckdb_store.QarmDuckDBOfflineStore
# Feast writes materialized rows online in batches of this many (default: one batch of the
# whole view); `qarm materialize` streams the per-item views itself (feast/online_write.py)
materialization:
    online_write_batch_size: 10000
entity_key_serialization_version: 3
auth:
    type: no_auth
"""

QARM_YAML = """\
# QARM configuration of this feature repo (`qarm build/materialize/push --repo .`).
# Relative paths are taken from this directory. Every key: qarm_features/project.py.
catalog:                          # the items to encode, one row each
  path: data/items.parquet        # parquet or CSV, a file or a glob
  id: {join_key}                  # int or string ids (the entity's join key values)
  text: "{{title}}. {{description}}"  # a template over catalog columns (frozen text encoder)
  # embedding: emb                # ... or the team's own content embeddings instead
events:                           # the interaction log
  path: data/events.parquet
  user: user_id
  item: {join_key}
  timestamp: ts                   # unix seconds or datetimes
  # label: clicked                # a 0/1 column; or rating: {{column: rating, threshold: 4}};
                                  # neither: every row is a positive (implicit feedback)
  unknown_items: error            # or drop: events naming items not in the catalog
# pairs:                          # optional: signals the retrieval stack already has
#   i2i: data/swing.parquet       # trigger, target[, score]
#   item_embeddings: data/u2i_item_emb.parquet   # id, emb
entity:                           # the repo's item entity the QARM views key on
  name: {entity}
  join_key: {join_key}
build: {{}}                         # BuildConfig sections: encoder, pairs, aligner, rq, vq
bundles: artifacts/bundles        # where `qarm build` writes bundles
"""

NEW_REPO_DEFINITIONS = """\
# QARM features (written by `qarm init`). Declarations only: `feast apply` imports this
# file; the bundle it serves comes from data/current/qarm_bundle.json (`qarm materialize`).
from pathlib import Path

from feast import Entity, ValueType

from qarm_features.feast.views import qarm_views

# An item of the catalog: the join key every item view uses.
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.{value_type})

# qarm (codes rankers read), item_content (frozen embedding), qarm_cold / qarm_cold_b64
# (codes at request time for items with no row yet) and their sources.
globals().update(qarm_views(item=item, repo=Path(__file__).resolve().parent))
"""

INTO_DEFINITIONS = """\
# QARM features for this repo (written by `qarm init --into`), keyed on its own item
# entity `{entity}` (join key {join_key}, {value_type}). Declarations only; the bundle
# served comes from data/current/qarm_bundle.json (`qarm materialize --repo .`).
from pathlib import Path

from qarm_features.feast.views import qarm_views

# the repo's own item entity (the object `feast apply` loaded from the file declaring it)
{import_line}

# qarm (codes rankers read), item_content (frozen embedding), qarm_cold / qarm_cold_b64
# (codes at request time for items with no row yet) and their sources. A text catalog may
# add text_view=True: qarm_cold_text, codes from an item's text at request time (loads the
# text encoder, torch, into the serving process).
globals().update(qarm_views(item={variable}, repo=Path(__file__).resolve().parent))
"""


_COMMENT_COLUMN = 34  # where qarm.yaml's end-of-line comments start


def _qarm_yaml(*, entity: str, join_key: str) -> str:
    """``QARM_YAML`` filled in, its end-of-line comments aligned again (the filled-in
    values have other lengths than their placeholders)."""
    lines = []
    for line in QARM_YAML.format(entity=entity, join_key=join_key).splitlines():
        code, sep, comment = line.partition(" # ")
        if sep and code.strip() and not code.lstrip().startswith("#"):
            code = code.rstrip()
            line = f"{code.ljust(max(_COMMENT_COLUMN, len(code) + 2))}# {comment}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def offline_store_advice(repo_path: str | os.PathLike) -> str | None:
    """What to change in a repo's ``feature_store.yaml`` for training data, or None.

    Feast's file store (also its default when ``offline_store`` is absent) drops entity
    rows earlier than an entity's first feature row; plain ``duckdb`` reads relative source
    paths from the working directory and gives a BatchFeatureView no input columns
    (:mod:`qarm_features.feast.duckdb_store`). Other stores (a warehouse) are the team's
    choice: docs/feast.md, "The offline store".
    """
    import yaml

    path = Path(repo_path).expanduser().resolve() / "feature_store.yaml"
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None
    store = config.get("offline_store") if isinstance(config, dict) else None
    kind = store.get("type", "dask") if isinstance(store, dict) else (store or "dask")
    block = f"offline_store:\n    type: {OFFLINE_STORE}"
    if kind in _FILE_STORES:
        why = (
            f"its offline store is Feast's file store ({kind!r}), which drops training rows "
            "earlier than an entity's first feature row (a user's first events)"
        )
    elif kind in _PLAIN_DUCKDB:
        why = (
            "its offline store is plain duckdb, which reads relative source paths from the "
            "working directory and gives BatchFeatureView UDFs no input columns"
        )
    else:
        return None
    return f"{path}: {why}; for training data set\n{block}\n(docs/feast.md, 'The offline store')"


def _write_new(path: Path, text: str) -> None:
    """Create ``path``; refuse to overwrite anything."""
    try:
        with open(path, "x") as f:
            f.write(text)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; qarm init never overwrites a file") from None


def init_repo(directory: str | os.PathLike, *, id_type: str = "int64") -> list[Path]:
    """Write a new feature repo with QARM views; returns the files written.

    Args:
        directory: created if missing; must not hold a feature_store.yaml yet.
        id_type: ``"int64"`` or ``"string"``: the catalog's item ids.
    """
    if id_type not in ("int64", "string"):
        raise ConfigError(f"id_type {id_type!r}: expected int64 or string")
    repo = Path(directory).expanduser().resolve()
    if (repo / "feature_store.yaml").exists():
        raise ConfigError(
            f"{repo} already holds a feature repo; add QARM to it with "
            f"`qarm init --into {repo} --item-entity NAME`"
        )
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "data").mkdir(exist_ok=True)
    project = re.sub(r"[^a-zA-Z0-9_]", "_", repo.name) or "qarm"
    files = {
        "feature_store.yaml": FEATURE_STORE_YAML.format(project=project),
        "qarm.yaml": _qarm_yaml(entity="item", join_key="item_id"),
        DEFINITIONS_FILE: NEW_REPO_DEFINITIONS.format(
            value_type="INT64" if id_type == "int64" else "STRING"
        ),
    }
    for name in files:  # check everything first: all or nothing
        if (repo / name).exists():
            raise ConfigError(f"{repo / name} already exists; qarm init never overwrites a file")
    for name, text in files.items():
        _write_new(repo / name, text)
    return [repo / name for name in files]


def _find_entity(repo: Path, name: str) -> tuple[str, str, object]:
    """(module name, variable name, Entity) of the repo's entity called ``name``."""
    from feast import Entity
    from feast.repo_operations import get_repo_files

    from qarm_features.feast.store import load_definitions

    found = [o for o in load_definitions(repo) if isinstance(o, Entity) and o.name == name]
    if not found:
        names = sorted(o.name for o in load_definitions(repo) if isinstance(o, Entity))
        raise ConfigError(f"{repo} declares no entity named {name!r}; its entities: {names}")
    entity = found[0]
    # the file and variable that declare it: `var = Entity(name="<name>", ...)` at top level
    for path in get_repo_files(repo):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
                continue
            call = node.value
            if getattr(call.func, "id", getattr(call.func, "attr", None)) != "Entity":
                continue
            kw = {k.arg: k.value for k in call.keywords}
            if isinstance(kw.get("name"), ast.Constant) and kw["name"].value == name:
                target = node.targets[0]
                if isinstance(target, ast.Name):
                    return _module_name(repo, path), target.id, entity
    raise ConfigError(
        f"{repo}: entity {name!r} is not assigned to a module-level variable "
        "(`item = Entity(name=...)`), so it cannot be imported; import it by hand in "
        f"{DEFINITIONS_FILE} (see qarm_features.feast.views.qarm_views)"
    )


def _module_name(repo: Path, path: Path) -> str:
    """The module name ``feast apply`` imports a repo file under (the repo root on
    sys.path, the file's path relative to it with dots): ``entities/product.py`` ->
    ``entities.product``, as Feast's ``py_path_to_module`` names it."""
    return ".".join(path.resolve().relative_to(repo).with_suffix("").parts)


def import_line(module: str, variable: str) -> str:
    """The line that imports ``variable`` from the repo module ``module`` in a definitions
    file: ``from entities.product import product``; or, when a part of the module's name is
    not a Python identifier (``my-defs.py``, which Feast imports by name all the same),
    ``product = importlib.import_module("my-defs").product``. Either way the module is
    the one ``feast apply`` imported, so the entity is the same object."""
    import keyword

    if all(part.isidentifier() and not keyword.iskeyword(part) for part in module.split(".")):
        return f"from {module} import {variable}"
    return (
        f"import importlib  # {module!r} is not an identifier: imported by name, as Feast does\n"
        f"{variable} = importlib.import_module({module!r}).{variable}"
    )


def init_into(repo_path: str | os.PathLike, *, item_entity: str) -> list[Path]:
    """Add QARM to an existing feature repo, reusing its item entity; returns the files.

    Raises:
        ConfigError: no feature repo there, no such entity, an unsupported join key type,
            or a QARM file already present.
    """
    from feast import ValueType

    repo = Path(repo_path).expanduser().resolve()
    if not (repo / "feature_store.yaml").exists():
        raise ConfigError(f"{repo} is not a feature repo (no feature_store.yaml)")
    for name in ("qarm.yaml", DEFINITIONS_FILE):
        if (repo / name).exists():
            raise ConfigError(f"{repo / name} already exists; qarm init never overwrites a file")
    module, variable, entity = _find_entity(repo, item_entity)
    if entity.value_type not in (ValueType.INT64, ValueType.STRING):
        raise ConfigError(
            f"entity {item_entity!r} is {entity.value_type.name}; QARM keys items by INT64 "
            "or STRING ids"
        )
    join_key = entity.join_key
    (repo / "data").mkdir(exist_ok=True)
    files = {
        "qarm.yaml": _qarm_yaml(entity=item_entity, join_key=join_key),
        DEFINITIONS_FILE: INTO_DEFINITIONS.format(
            entity=item_entity,
            join_key=join_key,
            value_type=entity.value_type.name,
            import_line=import_line(module, variable),
            variable=variable,
        ),
    }
    for name, text in files.items():
        _write_new(repo / name, text)
    return [repo / name for name in files]
