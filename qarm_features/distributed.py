"""The batch transformation past one process: Ray Data ``map_batches`` over parquet.

``content -> aligned -> codes`` is row-independent (:mod:`qarm_features.encode`), so a
catalog splits into blocks that any number of Ray workers encode on their own and the
codes come out bit for bit those of the single-process path (tested against
:func:`~qarm_features.encode.encode_frame`). Each worker loads the bundle once
(:func:`~qarm_features.encode.get_bundle` caches it per worker process), pins BLAS and
faiss to one thread (Ray runs one task per CPU) and encodes its blocks with
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


def _encode_batch(batch, bundle_path: str):
    """The ``map_batches`` task: a pandas batch -> its feature rows (bundle cached per worker)."""
    from qarm_features.encode import encode_frame, get_bundle, pin_threads

    pin_threads(1)  # one Ray task per CPU
    return encode_frame(get_bundle(bundle_path), batch, chunk_size=BATCH_ROWS)


def encode_parquet(
    bundle_path: str | os.PathLike,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    batch_rows: int = BATCH_ROWS,
    num_blocks: int | None = None,
) -> None:
    """Encode a parquet catalog (``item_id``, ``raw_emb`` and passthrough columns) with Ray.

    Args:
        bundle_path: the bundle directory (every worker loads it).
        src: parquet file or directory to read.
        dst: directory the encoded parquet files are written to (``encode_frame``'s
            columns: passthrough columns, aligned embedding, RQ and VQ codes, version).
        batch_rows: rows per ``map_batches`` batch.
        num_blocks: read parallelism (Ray's ``override_num_blocks``; default: Ray's choice).

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
    # Tasks, not actors: Ray fuses read -> encode -> write into one task per block, so the
    # encode never holds CPUs the reads wait for (actors on every CPU deadlock the read).
    ds = ray.data.read_parquet(str(src), override_num_blocks=num_blocks)
    out = ds.map_batches(
        _encode_batch,
        fn_kwargs={"bundle_path": str(Path(bundle_path))},
        batch_format="pandas",
        batch_size=int(batch_rows),
        num_cpus=1,
    )
    out.write_parquet(str(dst))
    log.info("encoded %s -> %s with Ray", src, dst)
