"""Bundle + raw content embeddings -> aligned embeddings and code ids.

This is the one function both Feast transformations call: the batch path
(materialization, many rows) and the on-demand path (request time, one or a few cold
items). Its output for a row depends only on that row, never on the rest of the batch,
so the on-demand view returns bit for bit what the batch path stored:

- The aligner forward runs in float64 from the bundle's float32 weights and is rounded to
  float32 once at the end. BLAS results can differ with batch shape only in the last bits
  of a float64; such a difference changes the float32 result only if it straddles a
  float32 rounding boundary (odds about 1e-9 per value).
- RQ and VQ re-score their float32 candidates in float64 per row
  (see :mod:`qarm_features.codes.rq`), so the same float32 input always yields the same
  codes.

The module imports numpy, pandas and faiss (through quantize) only: no torch.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qarm_features._validate import check_embeddings, check_ids
from qarm_features.bundle.artifact import Bundle, load_bundle
from qarm_features.codes.rescore import map_row_blocks
from qarm_features.errors import InputError
from qarm_features.schema import ALIGNED_EMB, VERSION, VQ_CODES, CodeSchema

log = logging.getLogger(__name__)

# rows per chunk: peak RSS ~290 MiB over floor at 384-d (65k: ~1 GiB), no slower (benchmarks)
DEFAULT_CHUNK = 16_384


@dataclass(frozen=True)
class EncodedItems:
    """Encoder output for n items.

    Attributes:
        aligned: ``(n, d_out)`` float32, unit-norm rows.
        rq_codes: ``(n, L)`` int64, level-l code in column l-1.
        vq_codes: ``(n, K)`` int64 pool item ids, most similar first.
        version: the bundle version id that produced them.
    """

    aligned: np.ndarray
    rq_codes: np.ndarray
    vq_codes: np.ndarray
    version: str

    def __len__(self) -> int:
        return int(self.aligned.shape[0])

    def columns(self) -> dict:
        """THE codes row, column by column, in the schema's order and names
        (:class:`~qarm_features.schema.CodeSchema`): ``aligned_emb`` ``(n, d_out)``,
        ``rq_code_l1`` .. ``rq_code_l{L}`` ``(n,)`` each, ``vq_codes`` ``(n, K)``,
        ``qarm_version`` (one string). Batch frames, streamed parquet sources and request
        outputs are all built from it; each only picks its container type."""
        out = {ALIGNED_EMB: self.aligned}
        for level, name in enumerate(CodeSchema(self.rq_codes.shape[1]).rq_columns):
            out[name] = self.rq_codes[:, level]
        out[VQ_CODES] = self.vq_codes
        out[VERSION] = self.version
        return out


def align(bundle: Bundle, raw_emb: np.ndarray) -> np.ndarray:
    """Apply the bundle's aligner to validated raw embeddings: ``(n, d_raw) -> (n, d_out)``."""
    return align_with_weights(bundle.aligner64, raw_emb)


def align_with_weights(weights: dict[str, np.ndarray], raw_emb: np.ndarray) -> np.ndarray:
    """The documented aligner forward (docs/architecture.md) in float64, rounded to float32.

    Args:
        weights: aligner weights keyed ``proj.weight`` and optionally ``mlp.0.*``/``mlp.2.*``
            (float32 or float64).
        raw_emb: ``(n, d_raw)`` validated raw embeddings.
    """
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    x = raw_emb.astype(np.float64)
    x /= np.maximum(np.sqrt((x * x).sum(axis=1, keepdims=True)), 1e-12)
    y = x @ w["proj.weight"].T
    if "mlp.0.weight" in w:
        h = x @ w["mlp.0.weight"].T
        h += w["mlp.0.bias"]
        np.maximum(h, 0.0, out=h)
        y += h @ w["mlp.2.weight"].T
        y += w["mlp.2.bias"]
    y /= np.maximum(np.sqrt((y * y).sum(axis=1, keepdims=True)), 1e-12)
    return y.astype(np.float32)


def encode_items(
    bundle: Bundle,
    raw_emb,
    item_ids=None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    n_workers: int | None = None,
) -> EncodedItems:
    """Encode raw content embeddings into aligned embeddings, RQ codes and VQ codes.

    Batches of two chunks or more run their chunks on ``n_workers`` threads (default: the
    BLAS thread budget) with BLAS at one thread each (:func:`qarm_features.codes.rescore.map_row_blocks`);
    rows come out the same either way.

    Args:
        bundle: a loaded bundle.
        raw_emb: ``(n, d_raw)`` frozen content embeddings.
        item_ids: optional ``(n,)`` ids; an item that is in the VQ pool is excluded from its
            own VQ codes. ``None`` excludes nothing (cold items).
        chunk_size: rows per chunk; memory is bounded by it (times the workers), results
            do not depend on it.
        n_workers: worker threads for large batches; 1 runs in the calling thread.

    Raises:
        InputError: wrong width, NaN/inf, empty input, or ids of the wrong length.
    """
    raw = check_embeddings(raw_emb, name="raw_emb", dim=bundle.raw_dim)
    n = raw.shape[0]
    ids = None if item_ids is None else check_ids(item_ids, name="item_ids", n=n, unique=False)
    rq, vq = bundle.rq, bundle.vq
    aligned = np.empty((n, bundle.aligned_dim), np.float32)
    rq_codes = np.empty((n, bundle.n_levels), np.int64)
    vq_codes = np.empty((n, bundle.vq_k), np.int64)

    def run(lo: int, hi: int) -> None:
        for start in range(lo, hi, chunk_size):
            sl = slice(start, min(start + chunk_size, hi))
            a = align(bundle, raw[sl])
            aligned[sl] = a
            rq_codes[sl] = rq.encode(a)
            vq_codes[sl] = vq.encode(a, exclude_ids=None if ids is None else ids[sl])

    map_row_blocks(run, n, block=chunk_size, n_workers=n_workers)
    return EncodedItems(aligned, rq_codes, vq_codes, bundle.version)


def encode_rows(bundle: Bundle, rows, item_ids=None) -> tuple[EncodedItems, list[str | None]]:
    """Per-row tolerant encoding for request time.

    Each row is checked on its own: a row that is missing, of the wrong size or holds
    NaN/inf gets an error message and zero-filled outputs (codes ``-1``); every other row
    is encoded exactly as :func:`encode_items` would encode it.

    Returns:
        ``(encoded, errors)`` with ``errors[i]`` ``None`` for a good row.
    """
    rows = list(rows)
    n = len(rows)
    errors: list[str | None] = [None] * n
    good = np.zeros((n, bundle.raw_dim), np.float32)
    ok = np.zeros(n, bool)
    for i, row in enumerate(rows):
        msg = _row_error(row, bundle.raw_dim)
        if msg is None:
            good[i] = np.asarray(row, dtype=np.float32)
            ok[i] = True
        errors[i] = msg
    aligned = np.zeros((n, bundle.aligned_dim), np.float32)
    rq_codes = np.full((n, bundle.n_levels), -1, np.int64)
    vq_codes = np.full((n, bundle.vq_k), -1, np.int64)
    if ok.any():
        ids = None
        if item_ids is not None:
            ids = bundle.ids_of(list(item_ids))[ok]  # keys -> ids; unknown/missing: -1
        enc = encode_items(bundle, good[ok], ids)
        aligned[ok], rq_codes[ok], vq_codes[ok] = enc.aligned, enc.rq_codes, enc.vq_codes
    return EncodedItems(aligned, rq_codes, vq_codes, bundle.version), errors


def _row_error(row, dim: int) -> str | None:
    if row is None:
        return "raw_emb is missing"
    try:
        arr = np.asarray(row, dtype=np.float32)
    except (TypeError, ValueError):
        return "raw_emb is not a list of numbers"
    if arr.ndim != 1 or arr.shape[0] != dim:
        return f"raw_emb has {arr.size} values, the bundle expects {dim}"
    if not np.isfinite(arr).all():
        return "raw_emb holds NaN or inf"
    return None


def encode_frame(bundle: Bundle, df, *, chunk_size: int = DEFAULT_CHUNK):
    """The batch transformation: ``item_id, raw_emb`` rows -> Feast ``qarm`` feature rows.

    Args:
        df: DataFrame with ``item_id`` and ``raw_emb`` (a sequence of d_raw floats per
            row); other columns (e.g. ``event_timestamp``) are passed through.

    Returns:
        A DataFrame with the passthrough columns plus the bundle's feature columns
        (``bundle.schema.features``: the aligned embedding as float32 lists, one int64
        column per RQ level, the VQ codes as int64 lists and the version).

    Raises:
        InputError: missing columns, or any bad row (the batch path is strict: fix the
            catalog rather than store partial rows).
    """
    import pandas as pd

    from qarm_features._validate import check_columns
    from qarm_features.schema import ITEM_ID, RAW_EMB

    schema = bundle.schema
    check_columns(df, [ITEM_ID, RAW_EMB], name="catalog frame")
    out = df.drop(columns=[RAW_EMB]).reset_index(drop=True)
    if len(df) == 0:
        for col in schema.features:
            out[col.name] = pd.Series([], dtype=object if col.dtype.endswith("list") else None)
        return out
    try:
        raw = np.stack([np.asarray(v, dtype=np.float32) for v in df[RAW_EMB]])
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"raw_emb: rows are not equal-length numeric vectors ({exc}); "
            f"each must hold {bundle.raw_dim} floats"
        ) from None
    ids = bundle.ids_of(df[ITEM_ID].to_numpy())  # a new item (not in the pool): -1
    enc = encode_items(bundle, raw, ids, chunk_size=chunk_size)
    for name, value in enc.columns().items():
        out[name] = list(value) if getattr(value, "ndim", 1) == 2 else value
    return out


_MAX_CACHED = 2  # bundles kept per process: the served one and the one rolling out
_BUNDLES: dict[tuple, Bundle] = {}
_LOCK = threading.Lock()


def get_bundle(path: str | os.PathLike) -> Bundle:
    """Load a bundle once per process (keyed by path and manifest mtime) and reuse it.

    A rebuilt bundle at the same path (new manifest mtime) is reloaded on the next call.
    The last two bundles stay loaded, so a server that serves one version while the next
    rolls out does not reload on every request.
    """
    p = Path(path).resolve()
    try:
        mtime = (p / "manifest.json").stat().st_mtime_ns
    except OSError:
        mtime = None
    key = (str(p), mtime)
    with _LOCK:
        bundle = _BUNDLES.get(key)
        if bundle is None:
            bundle = load_bundle(p).warm()
            _BUNDLES[key] = bundle
            while len(_BUNDLES) > _MAX_CACHED:
                _BUNDLES.pop(next(iter(_BUNDLES)))
    return bundle


def pin_threads(n: int = 1) -> None:
    """Limit BLAS and faiss OpenMP threads in this process (serving path).

    A server that runs many small requests loses ~1000x to thread contention with the
    default thread pools (DESIGN.md); one thread per worker is the right default. BLAS
    limits are process-wide, but faiss's OpenMP setting holds for the calling thread only:
    call this again on each thread that encodes (transformations.on_demand does). The
    pinning itself is :func:`qarm_features.threads.pin_threads` (the one place).
    """
    from qarm_features.threads import pin_threads as pin

    pin(n)
