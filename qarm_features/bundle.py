"""The QARM bundle: a versioned, verified artifact directory.

A bundle holds everything request-time and batch encoding need, and nothing that must
be unpickled::

    manifest.json          format version, bundle version id, build config, dims, metrics,
                           and the sha256/size/dtype/shape of every file below
    aligner.safetensors    aligner weights (names in docs/architecture.md)
    rq_codebooks.npy       float32 (L, K, d_out) residual k-means codebooks
    vq_pool_emb.npy        float32 (P, d_out) aligned embeddings of the VQ pool
    vq_pool_ids.npy        int64 (P,) item ids of the VQ pool
    item_ids.npy           int64 (n,) catalog the bundle was built on
    raw_emb.npy            float32 (n, d_raw) frozen content embeddings of that catalog

The version id is content-addressed (a hash of every file's sha256), so two bundles with
the same bytes share an id and any change yields a new one. Every row produced with a
bundle carries that id (``qarm_version``), so codes from different bundles are never
mixed silently. Writes go to a temporary sibling directory and are renamed into place;
loading verifies hashes, sizes, dtypes and shapes and refuses anything else with a
:class:`~qarm_features.errors.BundleError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qarm_features._atomic import atomic_dir
from qarm_features.errors import BundleError

log = logging.getLogger(__name__)

FORMAT = "qarm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ALIGNER_FILE = "aligner.safetensors"
ARRAY_FILES = {
    "rq_codebooks": ("rq_codebooks.npy", np.float32, 3),
    "vq_pool_emb": ("vq_pool_emb.npy", np.float32, 2),
    "vq_pool_ids": ("vq_pool_ids.npy", np.int64, 1),
    "item_ids": ("item_ids.npy", np.int64, 1),
    "raw_emb": ("raw_emb.npy", np.float32, 2),
}
ALIGNER_KEYS_LINEAR = ("proj.weight",)
ALIGNER_KEYS_MLP = ("mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version_id(files: dict[str, dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(files[name]["sha256"].encode())
    return "qarm-" + h.hexdigest()[:12]


@dataclass(frozen=True, eq=False)
class Bundle:
    """A loaded, verified bundle. Arrays are read-only.

    Attributes:
        path: directory the bundle was loaded from.
        version: content-addressed id, e.g. ``"qarm-1a2b3c4d5e6f"``.
        manifest: the parsed manifest.
        aligner_weights: float32 arrays keyed as in docs/architecture.md.
        rq_codebooks: ``(L, K, d_out)`` float32.
        vq_pool_emb: ``(P, d_out)`` float32; vq_pool_ids ``(P,)`` int64.
        item_ids: ``(n,)`` int64 catalog; raw_emb ``(n, d_raw)`` float32.
    """

    path: Path
    version: str
    manifest: dict
    aligner_weights: dict[str, np.ndarray]
    rq_codebooks: np.ndarray
    vq_pool_emb: np.ndarray
    vq_pool_ids: np.ndarray
    item_ids: np.ndarray
    raw_emb: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def dims(self) -> dict:
        return self.manifest["dims"]

    @property
    def raw_dim(self) -> int:
        return int(self.dims["raw_dim"])

    @property
    def aligned_dim(self) -> int:
        return int(self.dims["aligned_dim"])

    @property
    def n_levels(self) -> int:
        return int(self.dims["n_levels"])

    @property
    def n_codes(self) -> int:
        return int(self.dims["n_codes"])

    @property
    def vq_k(self) -> int:
        return int(self.dims["vq_k"])

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True) -> "Bundle":
        return load_bundle(path, verify=verify)


def write_bundle(
    path: str | os.PathLike,
    *,
    config: dict,
    aligner_weights: dict[str, np.ndarray],
    rq_codebooks: np.ndarray,
    vq_pool_emb: np.ndarray,
    vq_pool_ids: np.ndarray,
    item_ids: np.ndarray,
    raw_emb: np.ndarray,
    vq_k: int,
    metrics: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundle directory atomically and return its path.

    The bundle is assembled in a temporary sibling directory, fsynced, then renamed over
    ``path``; a reader never sees a half-written bundle. With ``overwrite`` an existing
    bundle is replaced (moved aside first, deleted after the rename succeeds).

    Raises:
        BundleError: ``path`` exists and ``overwrite`` is false, or arrays are inconsistent.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise BundleError(f"{path} already exists; pass overwrite=True to replace it")
    arrays = {
        "rq_codebooks": np.ascontiguousarray(rq_codebooks, dtype=np.float32),
        "vq_pool_emb": np.ascontiguousarray(vq_pool_emb, dtype=np.float32),
        "vq_pool_ids": np.ascontiguousarray(vq_pool_ids, dtype=np.int64),
        "item_ids": np.ascontiguousarray(item_ids, dtype=np.int64),
        "raw_emb": np.ascontiguousarray(raw_emb, dtype=np.float32),
    }
    weights = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in aligner_weights.items()}
    dims = _infer_dims(weights, arrays, vq_k)

    with atomic_dir(path) as tmp:
        files: dict[str, dict[str, Any]] = {}
        save_file(weights, str(tmp / ALIGNER_FILE), metadata={"format": FORMAT})
        files[ALIGNER_FILE] = {
            "kind": "safetensors",
            "tensors": {k: [list(v.shape), "float32"] for k, v in sorted(weights.items())},
        }
        for key, (fname, dtype, _) in ARRAY_FILES.items():
            np.save(tmp / fname, arrays[key], allow_pickle=False)
            files[fname] = {
                "kind": "npy",
                "dtype": np.dtype(dtype).name,
                "shape": list(arrays[key].shape),
            }
        for fname, meta in files.items():
            meta["sha256"] = _sha256(tmp / fname)
            meta["bytes"] = (tmp / fname).stat().st_size
        from qarm_features import __version__

        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": _version_id(files),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "qarm_features_version": __version__,
            "config": config,
            "dims": dims,
            "metrics": _jsonable(metrics or {}),
            "files": files,
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
    log.info("wrote bundle %s (%s)", path, manifest["version"])
    return path


def _infer_dims(weights: dict[str, np.ndarray], arrays: dict[str, np.ndarray], vq_k: int) -> dict:
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
    }
    _check_consistency(weights, arrays, dims)
    return dims


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


def load_bundle(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Load and verify a bundle directory.

    Args:
        path: the bundle directory.
        verify: check every file's sha256 (sizes, dtypes and shapes are always checked).

    Raises:
        BundleError: missing/extra/truncated/tampered files, an unknown format version,
            or arrays inconsistent with the manifest.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"no bundle at {path}: not a directory (build one with `qarm build`)")
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} has no {MANIFEST}; it is not a qarm bundle") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath} is not valid JSON ({exc}); the bundle is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path} has bundle format {manifest.get('format_version')}, this qarm-features "
            f"reads format {FORMAT_VERSION}; rebuild it with `qarm build`"
        )
    for key in ("version", "config", "dims", "files"):
        if key not in manifest:
            raise BundleError(f"{mpath} lacks '{key}'; the bundle is corrupt")
    files = manifest["files"]
    expected_files = {ALIGNER_FILE} | {f for f, _, _ in ARRAY_FILES.values()}
    if set(files) != expected_files:
        raise BundleError(
            f"{mpath} lists files {sorted(files)}, expected {sorted(expected_files)}"
        )
    if _version_id(files) != manifest["version"]:
        raise BundleError(
            f"{path}: version id {manifest['version']} does not match the file hashes; "
            "the manifest was edited"
        )
    for fname, meta in files.items():
        fpath = path / fname
        if not fpath.is_file():
            raise BundleError(f"{path}: {fname} is missing")
        size = fpath.stat().st_size
        if size != meta.get("bytes"):
            raise BundleError(
                f"{path}: {fname} is {size} bytes, manifest says {meta.get('bytes')} "
                "(truncated or replaced)"
            )
        if verify and _sha256(fpath) != meta.get("sha256"):
            raise BundleError(f"{path}: {fname} fails its sha256 check (tampered or corrupt)")

    try:
        weights = load_file(str(path / ALIGNER_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{path}: cannot read {ALIGNER_FILE} ({exc})") from None
    arrays = {}
    for key, (fname, dtype, ndim) in ARRAY_FILES.items():
        try:
            arr = np.load(path / fname, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise BundleError(f"{path}: cannot read {fname} ({exc})") from None
        meta = files[fname]
        if arr.dtype != dtype or arr.ndim != ndim or list(arr.shape) != meta.get("shape"):
            raise BundleError(
                f"{path}: {fname} is {arr.dtype}{list(arr.shape)}, manifest says "
                f"{meta.get('dtype')}{meta.get('shape')}"
            )
        arr.setflags(write=False)
        arrays[key] = arr
    for arr in weights.values():
        arr.setflags(write=False)
    dims = manifest["dims"]
    try:
        inferred = _infer_dims(weights, arrays, int(dims.get("vq_k", -1)))
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    if any(dims.get(k) != v for k, v in inferred.items()):
        raise BundleError(f"{path}: manifest dims {dims} disagree with the arrays {inferred}")
    return Bundle(
        path=path,
        version=manifest["version"],
        manifest=manifest,
        aligner_weights=weights,
        **arrays,
    )


def _jsonable(obj):
    """Convert numpy scalars/arrays inside metrics to plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
