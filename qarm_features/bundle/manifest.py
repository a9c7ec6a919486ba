"""The bundle manifest: its schema, its one parser and the version id it carries.

``manifest.json`` records the format, the bundle version id, the build config (typed:
:class:`~qarm_features.config.BuildConfig`), the dims, the metrics, and the sha256, size,
dtype and shape of every file. :func:`read_manifest` is the only parser of it in the
code base: anything that fails the schema below is a
:class:`~qarm_features.errors.BundleError` naming the field and the value, never a
TypeError. The version id is a content address of everything that decides a served code
(the files' hashes, the config and the dims; not the metrics). :func:`infer_dims` derives
the dims from the arrays (and checks them against each other), on write and on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
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

    kind: Literal["npy", "safetensors", "file"]  # file: the fine-tuned encoder's folder
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


def infer_dims(weights: dict[str, np.ndarray], arrays: dict[str, np.ndarray], vq_k: int) -> dict:
    """The :class:`Dims` of a bundle's weights and arrays, checked for consistency."""
    if "proj.weight" not in weights:
        raise BundleError("aligner weights lack 'proj.weight'")
    out_dim, raw_dim = weights["proj.weight"].shape
    hidden = int(weights["mlp.0.weight"].shape[0]) if "mlp.0.weight" in weights else 0
    cb = arrays["rq_codebooks"]
    if cb.ndim != 3 or cb.shape[2] != out_dim:
        raise BundleError(f"rq_codebooks must be (L, K, {out_dim}), got {cb.shape}")
    if arrays["vq_pool_emb"].shape[1:] != (out_dim,):
        raise BundleError(f"vq_pool_emb must be (P, {out_dim}), got {arrays['vq_pool_emb'].shape}")
    if arrays["raw_emb"].shape[1:] != (raw_dim,):
        raise BundleError(f"raw_emb must be (n, {raw_dim}), got {arrays['raw_emb'].shape}")
    dims = {
        "raw_dim": int(raw_dim),
        "aligned_dim": int(out_dim),
        "hidden": hidden,
        "n_levels": int(cb.shape[0]),
        "n_codes": int(cb.shape[1]),
        "vq_k": int(vq_k),
        "pool_size": int(arrays["vq_pool_ids"].shape[0]),
        "n_items": int(arrays["item_ids"].shape[0]),
        "id_type": "int64",
    }
    _check_consistency(weights, arrays, dims)
    return dims


def check_keys(keys: np.ndarray, item_ids: np.ndarray) -> None:
    """A string catalog's keys: one per row, unique, over item_ids 0 .. n-1."""
    if keys.ndim != 1 or keys.shape[0] != item_ids.shape[0]:
        raise BundleError(f"item_keys has shape {keys.shape}, item_ids {item_ids.shape}")
    if not np.array_equal(item_ids, np.arange(item_ids.shape[0])):
        raise BundleError("a catalog with item_keys must have item_ids 0 .. n-1 (row indices)")
    if np.unique(keys).size != keys.size:
        raise BundleError("item_keys holds duplicate keys")


def _check_consistency(weights: dict, arrays: dict, dims: dict) -> None:
    raw, out, hidden = dims["raw_dim"], dims["aligned_dim"], dims["hidden"]
    expected = {"proj.weight": (out, raw)}
    if hidden:
        expected.update(
            {
                "mlp.0.weight": (hidden, raw),
                "mlp.0.bias": (hidden,),
                "mlp.2.weight": (out, hidden),
                "mlp.2.bias": (out,),
            }
        )
    if set(weights) != set(expected):
        raise BundleError(
            f"aligner weights have keys {sorted(weights)}, expected {sorted(expected)}"
        )
    for k, shape in expected.items():
        if tuple(weights[k].shape) != shape:
            raise BundleError(f"aligner weight {k} has shape {weights[k].shape}, expected {shape}")
    if arrays["vq_pool_emb"].shape[0] != arrays["vq_pool_ids"].shape[0]:
        raise BundleError("vq_pool_emb and vq_pool_ids disagree on the pool size")
    if arrays["item_ids"].shape[0] != arrays["raw_emb"].shape[0]:
        raise BundleError("item_ids and raw_emb disagree on the catalog size")
    if dims["vq_k"] < 1 or dims["vq_k"] >= max(dims["pool_size"], 1):
        raise BundleError(f"vq_k={dims['vq_k']} must be in [1, pool_size={dims['pool_size']})")
    for key in ("vq_pool_ids", "item_ids"):
        ids = arrays[key]
        if np.unique(ids).size != ids.size:
            raise BundleError(f"{key} holds duplicate ids")
    for key, arr in list(arrays.items()) + list(weights.items()):
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise BundleError(f"{key} holds NaN or inf")
