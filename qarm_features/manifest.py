"""The bundle manifest: its schema, its one parser and the version id it carries.

``manifest.json`` records the format, the bundle version id, the build config (typed:
:class:`~qarm_features.config.BuildConfig`), the dims, the metrics, and the sha256, size,
dtype and shape of every file. :func:`read_manifest` is the only parser of it in the
code base: anything that fails the schema below is a
:class:`~qarm_features.errors.BundleError` naming the field and the value, never a
TypeError. The version id is a content address of everything that decides a served code
(the files' hashes, the config and the dims; not the metrics).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qarm_features.config import BuildConfig
from qarm_features.errors import BundleError

FORMAT = "qarm-bundle"
# 2: the version id also covers the config and dims (format 1 hashed the files only, so
# an edited config.vq changed every VQ code under the same id).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class FileEntry(_Strict):
    """One file of the bundle: what it holds and how to verify it."""

    kind: Literal["npy", "safetensors"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)
    dtype: str | None = None
    shape: list[int] | None = None
    tensors: dict[str, list[Any]] | None = None


class Dims(_Strict):
    """Sizes of a bundle; checked against its arrays on every load."""

    raw_dim: int = Field(ge=1)
    aligned_dim: int = Field(ge=1)
    hidden: int = Field(ge=0)
    n_levels: int = Field(ge=1)
    n_codes: int = Field(ge=1)
    vq_k: int = Field(ge=1)
    pool_size: int = Field(ge=1)
    n_items: int = Field(ge=1)
    id_type: Literal["int64", "string"] = "int64"  # the catalog's ids (string: item_keys)


class Manifest(_Strict):
    """The parsed ``manifest.json``: the only parser of it in the code base."""

    format: Literal["qarm-bundle"]
    format_version: int
    version: str = Field(pattern=r"^qarm-[0-9a-f]{12}$")
    created_at: str
    qarm_features_version: str
    config: BuildConfig
    dims: Dims
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileEntry]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def version_id(files: dict[str, dict[str, Any]], config: dict, dims: dict) -> str:
    """Content address of everything that decides a served code: files, config, dims."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(str(files[name]["sha256"]).encode())
    h.update(json.dumps({"config": config, "dims": dims}, sort_keys=True).encode())
    return "qarm-" + h.hexdigest()[:12]


def read_manifest(path: str | os.PathLike) -> tuple[Manifest, dict]:
    """Parse ``<path>/manifest.json`` (no file hashing, no arrays).

    Returns:
        ``(manifest, raw)``: the typed manifest and the JSON object it was parsed from.

    Raises:
        BundleError: no directory, no manifest, invalid JSON, another format version, or
            any field that fails the manifest schema (named in the message).
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"no bundle at {path}: not a directory (build one with `qarm build`)")
    mpath = path / MANIFEST
    try:
        raw = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} has no {MANIFEST}; it is not a qarm bundle") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(
            f"{mpath} is not valid JSON ({exc!r:.200}); the bundle is corrupt"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{mpath} is not a {FORMAT} manifest")
    if raw.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path} has bundle format {raw.get('format_version')}, this qarm-features "
            f"reads format {FORMAT_VERSION}; rebuild it with `qarm build`"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(
            f"{mpath}: '{where}' {first['msg']} (value {first.get('input')!r}); "
            f"{exc.error_count()} problem(s) in all: the manifest is corrupt or was edited"
        ) from None
    return manifest, raw
