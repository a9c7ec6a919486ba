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
    item_keys.npy          str (n,) the catalog's string ids, when they are strings
                           (item_ids are then the row indices 0 .. n-1)
    vq_index.npy           uint8 faiss.serialize_index of the VQ pool's ANN index, when the
                           pool is large enough for one (bundles without it rebuild it)
    encoder/...            the fine-tuned text encoder raw_emb came from (a
                           sentence-transformers folder, safetensors weights), when the
                           build fine-tuned one (build.encoder.finetune_layers > 0): every
                           path that encodes content for this bundle loads it

The version id is content-addressed (a hash of every file's sha256, the build config and
the dims: everything that decides a served code), so two bundles with the same content
share an id and any change yields a new one (the manifest: :mod:`qarm_features.bundle.manifest`).
Every row produced with a bundle carries that id (``qarm_version``), so codes from different bundles are never
mixed silently. Writes go to a temporary sibling directory and are renamed into place;
loading verifies hashes, sizes, dtypes and shapes and refuses anything else with a
:class:`~qarm_features.errors.BundleError`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from qarm_features._atomic import atomic_dir
from qarm_features.bundle.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    Dims,
    Manifest,
    check_keys,
    infer_dims,
    read_manifest,
    sha256_file,
    version_id,
)
from qarm_features.config import BuildConfig
from qarm_features.errors import BundleError, InputError
from qarm_features.schema import CodeSchema

log = logging.getLogger(__name__)

ALIGNER_FILE = "aligner.safetensors"
ARRAY_FILES = {
    "rq_codebooks": ("rq_codebooks.npy", np.float32, 3),
    "vq_pool_emb": ("vq_pool_emb.npy", np.float32, 2),
    "vq_pool_ids": ("vq_pool_ids.npy", np.int64, 1),
    "item_ids": ("item_ids.npy", np.int64, 1),
    "raw_emb": ("raw_emb.npy", np.float32, 2),
}
# A catalog with string ids also stores them: item_ids are then the row indices 0..n-1
# (the pipeline's int64 ids, and the VQ codes), item_keys the team's ids in the same order.
KEYS_FILE = "item_keys.npy"
# The trained ANN index of a large VQ pool (VQCoder.export_index): loaded, not rebuilt.
INDEX_FILE = "vq_index.npy"
# The fine-tuned text encoder's folder, file by file (each hashed like every other file).
ENCODER_DIR = "encoder"


def _int_or_missing(key) -> int:
    """An int catalog's id from a request value; -1 for None, bools and non-integers."""
    if key is None or isinstance(key, bool):
        return -1
    try:
        value = int(key)
    except (TypeError, ValueError):
        return -1
    return value if value == key or str(value) == str(key) else -1


@dataclass(frozen=True, eq=False)
class Bundle:
    """A loaded, verified bundle: THE face of it for every other module.

    It parses its manifest into the typed build config, hands out the fitted coders and
    owns the code-row schema (:class:`~qarm_features.schema.CodeSchema`). Arrays are
    read-only.

    Attributes:
        path: directory the bundle was loaded from.
        version: content-addressed id, e.g. ``"qarm-1a2b3c4d5e6f"``.
        manifest: the typed manifest.
        aligner_weights: float32 arrays keyed as in docs/architecture.md.
        rq_codebooks: ``(L, K, d_out)`` float32.
        vq_pool_emb: ``(P, d_out)`` float32; vq_pool_ids ``(P,)`` int64.
        item_ids: ``(n,)`` int64 catalog; raw_emb ``(n, d_raw)`` float32.
    """

    path: Path
    version: str
    manifest: Manifest
    aligner_weights: dict[str, np.ndarray]
    rq_codebooks: np.ndarray
    vq_pool_emb: np.ndarray
    vq_pool_ids: np.ndarray
    item_ids: np.ndarray
    raw_emb: np.ndarray
    item_keys: np.ndarray | None = None
    vq_index: np.ndarray | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def dims(self) -> Dims:
        return self.manifest.dims

    @property
    def raw_dim(self) -> int:
        return self.dims.raw_dim

    @property
    def aligned_dim(self) -> int:
        return self.dims.aligned_dim

    @property
    def n_levels(self) -> int:
        return self.dims.n_levels

    @property
    def n_codes(self) -> int:
        return self.dims.n_codes

    @property
    def vq_k(self) -> int:
        return self.dims.vq_k

    @property
    def config(self) -> BuildConfig:
        return self.manifest.config

    @property
    def metrics(self) -> dict:
        return self.manifest.metrics

    @property
    def id_type(self) -> str:
        """``"int64"`` or ``"string"``: the type of the catalog's ids (the join key's)."""
        return self.dims.id_type

    @property
    def vq_code_space(self) -> str:
        """What a VQ code is: ``"item_id"`` (an int catalog: the pool item's own id) or
        ``"catalog_row"`` (a string catalog: the pool item's row in the catalog;
        :meth:`keys_of` maps it back to the SKU). Codes of ``-1`` mark a missing code."""
        return "item_id" if self.item_keys is None else "catalog_row"

    @cached_property
    def vq_vocab_size(self) -> int:
        """The size of a ranker's embedding table for VQ codes: every code is in
        ``0 .. vq_vocab_size - 1``. An int catalog's codes are item ids, so it is the
        largest pool id + 1 (gaps in the ids included); a string catalog's, its pool's
        catalog rows + 1 (the catalog size when the pool is the whole catalog)."""
        return int(self.vq_pool_ids.max()) + 1

    def ids_of(self, keys) -> np.ndarray:
        """The pipeline's int64 ids of catalog keys; -1 for a missing (None) or, in a
        string catalog, an unknown key. Int catalogs: the keys are the ids. String
        catalogs: the keys' row indices."""
        if self.item_keys is None:
            if isinstance(keys, np.ndarray) and keys.dtype.kind in "iu":
                return keys.astype(np.int64)
            return np.asarray([_int_or_missing(k) for k in keys], dtype=np.int64)
        index = self._key_index
        return np.fromiter((index.get(str(k), -1) for k in keys), np.int64, count=len(keys))

    def keys_of(self, ids: np.ndarray) -> np.ndarray:
        """The catalog keys of int64 ids (ids themselves for an int catalog)."""
        return ids if self.item_keys is None else self.item_keys[ids]

    @cached_property
    def _key_index(self) -> dict[str, int]:
        return {str(k): int(i) for k, i in zip(self.item_keys, self.item_ids)}

    @cached_property
    def schema(self) -> CodeSchema:
        """The columns of the rows this bundle produces."""
        return CodeSchema(self.n_levels)

    @cached_property
    def aligner64(self) -> dict[str, np.ndarray]:
        """The aligner weights in float64 (the serving forward's precision)."""
        return {k: v.astype(np.float64) for k, v in self.aligner_weights.items()}

    @cached_property
    def rq(self):
        """The fitted :class:`~qarm_features.codes.rq.ResidualQuantizer`."""
        from qarm_features.codes.rq import ResidualQuantizer

        return ResidualQuantizer.from_codebooks(self.rq_codebooks)

    @cached_property
    def vq(self):
        """The fitted VQ coder over the bundle's pool (search settings from ``config.vq``)."""
        from qarm_features.codes.vq import VQCoder

        cfg = self.config.vq
        try:
            coder = VQCoder.from_config(cfg, k=self.vq_k)
            if self.vq_index is None:
                # An ANN pool without a stored index is a bundle from before indexes were
                # stored (every build since stores one), hence before the recall floor:
                # its codes were made at ``ann_nprobe`` exactly.
                coder.ann_min_recall = None
            return coder.fit(self.vq_pool_emb, self.vq_pool_ids, index=self.vq_index)
        except InputError as exc:  # a stored index that is not this pool's
            if self.vq_index is None or not str(exc).startswith("index:"):
                raise
            raise BundleError(f"{self.path / INDEX_FILE} rejected ({exc})") from None

    @property
    def encoder_path(self) -> Path | None:
        """The fine-tuned text encoder this bundle's raw space comes from (None: the
        frozen encoder ``config.encoder`` names)."""
        prefix = ENCODER_DIR + "/"
        finetuned = any(f.startswith(prefix) for f in self.manifest.files)
        return self.path / ENCODER_DIR if finetuned else None

    def content_encoder(self):
        """The encoder of this bundle's raw space: its own fine-tuned ``encoder/``, else
        the configured frozen one. Every path that encodes content for the bundle (batch
        codes, ``qarm push``, ``qarm_cold_text``) uses it, so all of them share one raw
        space."""
        from qarm_features.content.encoders import TextEncoder, make_encoder

        cfg = self.config.encoder
        if self.encoder_path is None:
            return make_encoder(cfg)
        return TextEncoder(
            model_path=self.encoder_path, batch_size=cfg.batch_size, normalize=cfg.normalize
        )

    def warm(self) -> "Bundle":
        """Build the coders and float64 weights now (servers: before the first request)."""
        _ = self.aligner64, self.rq, self.vq
        return self


def write_bundle(
    path: str | os.PathLike,
    *,
    config: BuildConfig | dict,
    aligner_weights: dict[str, np.ndarray],
    rq_codebooks: np.ndarray,
    vq_pool_emb: np.ndarray,
    vq_pool_ids: np.ndarray,
    item_ids: np.ndarray,
    raw_emb: np.ndarray,
    vq_k: int,
    item_keys: np.ndarray | None = None,
    vq_index: np.ndarray | None = None,
    metrics: dict | None = None,
    overwrite: bool = False,
    encoder_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a bundle directory atomically and return its path.

    The bundle is assembled in a temporary sibling directory, fsynced, then renamed over
    ``path``; a reader never sees a half-written bundle. With ``overwrite`` an existing
    bundle is replaced (moved aside first, deleted after the rename succeeds).

    Args:
        item_keys: a string catalog's ids, in ``item_ids`` order; ``item_ids`` must then
            be ``0 .. n-1``. None for an int catalog (its ids are ``item_ids``).
        vq_index: the pool's ANN index, ``VQCoder.export_index()`` of the coder fitted on
            ``vq_pool_emb``/``vq_pool_ids`` with ``config.vq`` (None: none stored).
        encoder_dir: the fine-tuned text encoder ``raw_emb`` came from (a
            sentence-transformers folder): copied in as ``encoder/``, every file hashed.

    Raises:
        BundleError: ``path`` exists and ``overwrite`` is false, or arrays are inconsistent.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise BundleError(f"{path} already exists; pass overwrite=True to replace it")
    if not isinstance(config, BuildConfig):
        try:
            config = BuildConfig.model_validate(config)
        except ValidationError as exc:
            raise BundleError(f"config is not a valid BuildConfig: {exc}") from None
    config_json = config.model_dump(mode="json")
    arrays = {
        "rq_codebooks": np.ascontiguousarray(rq_codebooks, dtype=np.float32),
        "vq_pool_emb": np.ascontiguousarray(vq_pool_emb, dtype=np.float32),
        "vq_pool_ids": np.ascontiguousarray(vq_pool_ids, dtype=np.int64),
        "item_ids": np.ascontiguousarray(item_ids, dtype=np.int64),
        "raw_emb": np.ascontiguousarray(raw_emb, dtype=np.float32),
    }
    weights = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in aligner_weights.items()}
    dims = infer_dims(weights, arrays, vq_k)
    keys = None
    if item_keys is not None:
        keys = np.asarray([str(k) for k in item_keys], dtype=str)
        check_keys(keys, arrays["item_ids"])
        dims["id_type"] = "string"
    index = None if vq_index is None else _checked_index(vq_index, config, arrays, vq_k)

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
        if keys is not None:
            np.save(tmp / KEYS_FILE, keys, allow_pickle=False)
            files[KEYS_FILE] = {"kind": "npy", "dtype": keys.dtype.str, "shape": [len(keys)]}
        if index is not None:
            np.save(tmp / INDEX_FILE, index, allow_pickle=False)
            files[INDEX_FILE] = {"kind": "npy", "dtype": "uint8", "shape": [index.size]}
        if encoder_dir is not None:
            files.update(_copy_encoder(Path(encoder_dir), tmp / ENCODER_DIR))
        for fname, meta in files.items():
            meta["sha256"] = sha256_file(tmp / fname)
            meta["bytes"] = (tmp / fname).stat().st_size
        from qarm_features._version import __version__

        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": version_id(files, config_json, dims),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "qarm_features_version": __version__,
            "config": config_json,
            "dims": dims,
            "metrics": _jsonable(metrics or {}),
            "files": files,
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
    log.info("wrote bundle %s (%s)", path, manifest["version"])
    return path


def _copy_encoder(src: Path, dst: Path) -> dict[str, dict[str, Any]]:
    """Copy a saved text encoder's files into the bundle; their manifest entries."""
    import shutil

    if not (src / "modules.json").is_file():
        raise BundleError(f"encoder_dir {src} holds no modules.json: not a saved text encoder")
    entries = {}
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst / rel)
        kind = "safetensors" if f.suffix == ".safetensors" else "file"
        entries[f"{ENCODER_DIR}/{rel}"] = {"kind": kind}
    return entries


def _checked_index(vq_index, config: BuildConfig, arrays: dict, vq_k: int) -> np.ndarray:
    """``vq_index`` as uint8 bytes, once it loads as the ANN index of this pool."""
    from qarm_features.codes.vq import VQCoder

    index = np.ascontiguousarray(np.asarray(vq_index).reshape(-1), dtype=np.uint8)
    cfg, pool = config.vq, arrays["vq_pool_emb"]
    if pool.shape[0] <= cfg.exact_max_pool:
        raise BundleError(
            f"vq_index given for a pool of {pool.shape[0]} items, searched "
            f"exactly (<= config.vq.exact_max_pool={cfg.exact_max_pool})"
        )
    try:
        VQCoder.from_config(cfg, k=vq_k).fit(pool, arrays["vq_pool_ids"], index=index)
    except InputError as exc:
        raise BundleError(f"vq_index rejected ({exc})") from None
    return index


def load_bundle(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Load and verify a bundle directory.

    Args:
        path: the bundle directory.
        verify: check every file's sha256 (sizes, dtypes and shapes are always checked).

    Raises:
        BundleError: missing/extra/truncated/tampered/symlinked files, an unknown format
            version, a manifest that fails its schema, arrays inconsistent with the
            manifest, or a version id that does not cover the files, config and dims.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    manifest, raw = read_manifest(path)
    files = manifest.files
    expected_files = {ALIGNER_FILE} | {f for f, _, _ in ARRAY_FILES.values()}
    if manifest.dims.id_type == "string":
        expected_files.add(KEYS_FILE)
    expected_files |= {INDEX_FILE} & set(files)  # optional: older bundles rebuild the index
    expected_files |= {f for f in files if f.startswith(ENCODER_DIR + "/")}  # fine-tuned
    if set(files) != expected_files:
        raise BundleError(
            f"{path / MANIFEST} lists files {sorted(files)}, expected {sorted(expected_files)}"
        )
    for fname, meta in files.items():
        fpath = path / fname
        if Path(fname).is_absolute() or ".." in Path(fname).parts:
            raise BundleError(f"{path / MANIFEST} names a file outside the bundle: {fname!r}")
        if fpath.is_symlink():
            raise BundleError(
                f"{path}: {fname} is a symbolic link; a bundle holds its own files "
                "(copy the target in, or rebuild)"
            )
        if not fpath.is_file():
            raise BundleError(f"{path}: {fname} is missing")
        size = fpath.stat().st_size
        if size != meta.bytes:
            raise BundleError(
                f"{path}: {fname} is {size} bytes, manifest says {meta.bytes} "
                "(truncated or replaced)"
            )
        if verify and sha256_file(fpath) != meta.sha256:
            raise BundleError(f"{path}: {fname} fails its sha256 check (tampered or corrupt)")

    try:
        weights = load_file(str(path / ALIGNER_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{path}: cannot read {ALIGNER_FILE} ({exc})") from None
    arrays = {}
    for key, (fname, dtype, ndim) in ARRAY_FILES.items():
        mmap = key == "raw_emb"  # the catalog's content: paged in as read, not held
        arrays[key] = _load_npy(path, fname, files[fname], dtype, ndim, mmap=mmap)
    for arr in weights.values():
        arr.setflags(write=False)
    keys = _load_npy(path, KEYS_FILE, files[KEYS_FILE], "U", 1) if KEYS_FILE in files else None
    index = None
    if INDEX_FILE in files:
        index = _load_npy(path, INDEX_FILE, files[INDEX_FILE], np.uint8, 1)
    dims = manifest.dims.model_dump()
    try:
        inferred = infer_dims(weights, arrays, manifest.dims.vq_k)
        if keys is not None:
            check_keys(keys, arrays["item_ids"])
            inferred["id_type"] = "string"
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    if dims != inferred:
        raise BundleError(f"{path}: manifest dims {dims} disagree with the arrays {inferred}")
    if version_id(raw["files"], raw["config"], raw["dims"]) != manifest.version:
        raise BundleError(
            f"{path}: version id {manifest.version} does not match the file hashes, config "
            "and dims; the manifest was edited"
        )
    return Bundle(
        path=path,
        version=manifest.version,
        manifest=manifest,
        aligner_weights=weights,
        item_keys=keys,
        vq_index=index,
        **arrays,
    )


def _load_npy(path: Path, fname: str, meta, dtype, ndim: int, *, mmap: bool = False):
    """A read-only array that matches its manifest entry (``dtype="U"``: any unicode);
    ``mmap``: memory-mapped read-only (a bundle's files never change once written)."""
    try:
        arr = np.load(path / fname, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:
        raise BundleError(f"{path}: cannot read {fname} ({exc})") from None
    kind_ok = arr.dtype.kind == "U" if dtype == "U" else arr.dtype == dtype
    if not kind_ok or arr.ndim != ndim or list(arr.shape) != meta.shape:
        raise BundleError(
            f"{path}: {fname} is {arr.dtype}{list(arr.shape)}, manifest says "
            f"{meta.dtype}{meta.shape}"
        )
    arr.setflags(write=False)
    return arr


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
