"""The batch transformation past one process: Ray Data ``map_batches`` over parquet.

``content -> aligned -> codes`` is row-independent (:mod:`qarm_features.encode`), so a
catalog splits into blocks that any number of Ray workers encode on their own and the
codes come out bit for bit those of the single-process path (tested against
:func:`~qarm_features.encode.encode_frame`). Each worker loads the bundle once
(:func:`~qarm_features.encode.get_bundle` caches it per process), pins BLAS and faiss to one
thread (Ray runs one task per CPU) and encodes its blocks with
:func:`~qarm_features.encode.encode_frame`.

Offline only; ``ray`` (``pip install "ray[data]"``, the ``ray`` extra) is imported when
:func:`encode_parquet` runs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from qarm_features.errors import DependencyError

log = logging.getLogger(__name__)

# Rows per Ray batch: the single-process chunk size (bounded memory per task).
BATCH_ROWS = 16_384


class _EncodeBatch:
    """The ``map_batches`` callable: bundle loaded once per Ray worker."""

    def __init__(self, bundle_path: str):
        from qarm_features.encode import get_bundle, pin_threads

        pin_threads(1)
        self.bundle = get_bundle(bundle_path)

    def __call__(self, batch):
        from qarm_features.encode import encode_frame

        return encode_frame(self.bundle, batch, chunk_size=BATCH_ROWS)


def encode_parquet(
    bundle_path: str | os.PathLike,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    batch_rows: int = BATCH_ROWS,
    concurrency: int | None = None,
) -> None:
    """Encode a parquet catalog (``item_id``, ``raw_emb`` and passthrough columns) with Ray.

    Args:
        bundle_path: the bundle directory (every worker loads it).
        src: parquet file or directory to read.
        dst: directory the encoded parquet files are written to (``encode_frame``'s
            columns: passthrough columns, aligned embedding, RQ and VQ codes, version).
        batch_rows: rows per ``map_batches`` batch.
        concurrency: Ray actors encoding at once (default: the cluster's CPUs).

    Uses the Ray cluster already initialised in this process (``ray.init(...)``), or starts
    a local one.

    Raises:
        DependencyError: ``ray`` is not installed.
    """
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise DependencyError('encode_parquet needs Ray: pip install "ray[data]"') from exc
    if not ray.is_initialized():
        ray.init()
    if concurrency is None:
        concurrency = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.read_parquet(str(src))
    out = ds.map_batches(
        _EncodeBatch,
        fn_constructor_args=(str(Path(bundle_path)),),
        batch_format="pandas",
        batch_size=int(batch_rows),
        concurrency=int(concurrency),
        num_cpus=1,
    )
    out.write_parquet(str(dst))
    log.info("encoded %s -> %s with Ray (%d actors)", src, dst, concurrency)
