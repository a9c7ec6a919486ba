"""``qarm.yaml``: a team's QARM configuration, kept in its feature repo.

The file sits beside ``feature_store.yaml`` and says where the team's data is and how to
read it; the CLI (``qarm build --repo R``, ``qarm materialize --repo R``, ``qarm push``)
reads it, so no Python is written against the pipeline. Every key is typed, unknown keys
are rejected, relative paths are taken from the repo directory. Paths are not confined
to the repo: any may point anywhere the process can read (a shared mount, another team's
export); the file is trusted configuration, as ``feature_store.yaml`` is. Only ``LATEST``
in the bundles directory is confined (:func:`qarm_features.build.bundles.latest_bundle`)::

    catalog:                        # the items to encode
      path: data/items.parquet      # parquet or CSV, a file or a glob
      id: sku                       # int or string ids
      text: "{title}. {description}"  # a template over the catalog's columns, and/or
      embedding: emb                #   a column holding the team's own embeddings
      image: image_path             #   (an image column; needs a CLIP encoder)
    events:                         # the interaction log
      path: data/events.parquet
      user: user_id
      item: sku
      timestamp: ts                 # unix seconds or datetimes
      label: clicked                # a 0/1 column; or rating: {column: r, threshold: 4};
                                    # or neither: every row is a positive (implicit)
      unknown_items: error          # or drop: events naming items not in the catalog
    pairs:                          # optional: what the retrieval stack already has
      i2i: data/swing.parquet       # trigger, target[, score]
      item_embeddings: data/u2i.parquet  # id, emb: the U2I miner's retrieval space
    entity:                         # the repo's item entity the QARM views key on
      name: item
      join_key: item_id
    build: {...}                    # BuildConfig sections (encoder, pairs, aligner, rq, vq)
    bundles: artifacts/bundles      # where `qarm build` writes bundles
    dataset: movielens-100k         # optional: a data set `qarm datasets fetch` knows
                                    # (movielens-100k, movielens-1m); relative
                                    # catalog/events paths are its tables'

Reading the files and checking their rows is :mod:`qarm_features.build.tables`' job.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qarm_features.config import BuildConfig
from qarm_features.errors import ConfigError

FILE_NAME = "qarm.yaml"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CsvSpec(_Spec):
    """How to read a CSV/delimited file (parquet needs none of it)."""

    sep: str = ","  # "\t" for TSV, "|" for MovieLens' u.item
    header: bool = True  # False: columns are named by `names` (or 0, 1, 2 ...)
    names: list[str] | None = None
    encoding: str = "utf-8"  # "latin-1" for MovieLens-100k


class CatalogSpec(_Spec):
    """The items: one row per item, its id and its content."""

    path: str | None = None  # parquet or CSV file, or a glob of them (relative to the repo)
    csv: CsvSpec = CsvSpec()  # reading options of a CSV path
    source: str | None = None  # or: a Feast data source of the repo, read offline
    id: str = "item_id"  # the id column (int or string values)
    text: str | None = None  # a str.format template over columns, e.g. "{title}. {desc}"
    image: str | None = None  # a column of image file paths (relative to the catalog file)
    embedding: str | None = None  # a column of precomputed embeddings (lists of floats)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.path is None) == (self.source is None):
            raise ValueError("give exactly one of 'path' or 'source'")
        if not (self.text or self.image or self.embedding):
            raise ValueError("give at least one of 'text', 'image' or 'embedding'")
        if self.embedding and (self.text or self.image):
            raise ValueError(
                "'embedding' is the team's own content embedding: give it alone, or use "
                "'text'/'image' to encode content with the frozen encoder"
            )
        return self


class RatingSpec(_Spec):
    """Explicit feedback: rows with ``column >= threshold`` are positives."""

    column: str
    threshold: float


class EventsSpec(_Spec):
    """The interaction log."""

    path: str | None = None
    source: str | None = None
    csv: CsvSpec = CsvSpec()
    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    label: str | None = None  # a 0/1 column: 1 is a positive
    rating: RatingSpec | None = None  # explicit ratings with a positive threshold
    # events naming an item that is not in the catalog: an error listing them, or
    # dropped with a warning that counts them
    unknown_items: Literal["error", "drop"] = "error"

    @model_validator(mode="after")
    def _one_input(self):
        if (self.path is None) == (self.source is None):
            raise ValueError("give exactly one of 'path' or 'source'")
        if self.label is not None and self.rating is not None:
            raise ValueError("give 'label' or 'rating', not both (neither: implicit feedback)")
        return self


class PairsSpec(_Spec):
    """Collaborative signals the team already has (QARM's recipe reuses them)."""

    i2i: str | None = None  # a table trigger, target[, score]: used as I2I pairs
    i2i_columns: tuple[str, str] = ("trigger", "target")
    item_embeddings: str | None = None  # a table id, emb: the U2I miner's item space
    item_embeddings_columns: tuple[str, str] = ("id", "emb")


class EntitySpec(_Spec):
    """The item entity of the repo the QARM views key on (reused, never redeclared)."""

    name: str = "item"
    join_key: str = "item_id"


class Project(_Spec):
    """A parsed ``qarm.yaml`` plus the repo it belongs to.

    Attributes:
        repo: the feature repo directory (absolute).
    """

    repo: Path = Field(exclude=True)
    catalog: CatalogSpec
    events: EventsSpec
    pairs: PairsSpec = PairsSpec()
    # The repo's item entity the QARM views key on. None (the default): the one the
    # repo's declarations give `qarm_views(item=...)`; given, it must agree with them
    # (checked before anything is written).
    entity: EntitySpec | None = None
    build: BuildConfig = BuildConfig()
    bundles: str = "artifacts/bundles"  # built bundles, one directory per version
    # A public data set (qarm_features.datasets.movielens.DATASETS): relative catalog and events paths
    # are read from its tables folder in the cache (fetched on first use). The demo repo
    # (feature_repo/qarm.yaml) is MovieLens-100k this way.
    dataset: str | None = None

    def resolve(self, path: str) -> Path:
        """A path of the config, relative to the repo unless absolute."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else self.repo / p

    @property
    def bundles_dir(self) -> Path:
        return self.resolve(self.bundles)


def load_project(repo_path: str | os.PathLike) -> Project:
    """Read ``<repo>/qarm.yaml``.

    Raises:
        ConfigError: no repo or no file there, invalid YAML, or a key that is unknown,
            missing or of the wrong type (named with its path in the file).
    """
    import yaml

    repo = Path(repo_path).expanduser().resolve()
    if not repo.is_dir():
        raise ConfigError(f"--repo {repo_path}: no such directory")
    path = repo / FILE_NAME
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path} does not exist: run `qarm init {repo}` (a new repo) or "
            f"`qarm init --into {repo} --item-entity NAME` (an existing one)"
        ) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read it as YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return parse_project(data, repo, where=str(path))


def parse_project(data: dict, repo: Path, *, where: str = FILE_NAME) -> Project:
    """Validate a ``qarm.yaml`` mapping; errors name the key path and the value."""
    try:
        return Project.model_validate({**data, "repo": repo})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r:.80})"
            lines.append(f"  {key}: {err['msg']}{shown}")
        raise ConfigError(f"{where}: invalid QARM config\n" + "\n".join(lines)) from None
