"""The on-demand transformations: QARM codes for cold items, computed at request time.

The ``qarm_cold`` and ``qarm_cold_b64`` on-demand views (declared with
:func:`qarm_features.feast.views.cold_view`) run a two-line UDF whose source text carries
the repo's serving context (bundle path, version, dims; see
:mod:`qarm_features.feast.context`) and calls :func:`qarm_cold_python` or
:func:`qarm_cold_b64_python` here. Feast re-executes UDF source text in a namespace holding
only ``pd``/``np``, so everything else lives in the installed package.

Two request forms, one output:

- ``raw_emb``: the raw content embedding as a list of numbers (JSON), or a float32 numpy
  array in-process (Feast then skips typing the values one by one: much faster);
- ``raw_emb_b64``: base64 of the embedding's little-endian float32 bytes, one string per
  row, for HTTP clients (a JSON list of 384 floats costs Feast ~385 type inferences).

For each row, the output is the ``aligned_emb``, ``rq_code_l*``, ``vq_codes`` and
``qarm_version`` that the batch path stores for that embedding, bit for bit (both call
:mod:`qarm_features.bundle.encode`, whose output for a row does not depend on the batch). A row
that cannot be encoded (missing, wrong size, NaN/inf, bad base64, no usable bundle) gets
codes ``-1``, a zero ``aligned_emb``, an empty ``qarm_version`` and a message in
``qarm_error``; the other rows are unaffected. ``qarm_error`` is ``""`` on a good row.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time

import numpy as np

from qarm_features.errors import QarmError
from qarm_features.feast.context import ServingContext, pin_request_thread
from qarm_features.schema import (
    ALIGNED_EMB,
    ERROR,
    ITEM_ID,
    MISSING_CODE,
    RAW_EMB,
    RAW_EMB_B64,
    TEXT,
    VERSION,
    VQ_CODES,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = 10.0  # a bundle that failed to load is retried at most this often
RECHECK_S = 1.0  # a loaded bundle's directory is re-checked (path, manifest mtime) this often

_lock = threading.Lock()
_contexts: dict[tuple, ServingContext] = {}
_failures: dict[ServingContext, tuple[float, str]] = {}
_loaded: dict[ServingContext, tuple[float, object]] = {}


def _context(ctx: dict) -> ServingContext:
    key = tuple(sorted(ctx.items()))
    found = _contexts.get(key)
    if found is None:
        found = _contexts[key] = ServingContext.from_json(ctx)
    return found


def _bundle(context: ServingContext):
    """(bundle, None) or (None, error message); failures are cached for RETRY_AFTER_S."""
    loaded = _loaded.get(context)
    if loaded is not None and time.monotonic() - loaded[0] < RECHECK_S:
        return loaded[1], None
    failure = _failures.get(context)
    if failure is not None and time.monotonic() - failure[0] < RETRY_AFTER_S:
        return None, failure[1]
    try:
        bundle = context.load()
    except Exception as exc:  # noqa: BLE001 - a request must get per-row errors, not a 500
        msg = f"{type(exc).__name__}: {exc}"
        with _lock:
            _failures[context] = (time.monotonic(), msg)
        log.warning(
            "cold-item encoding unavailable: %s", msg, exc_info=not isinstance(exc, QarmError)
        )
        return None, msg
    _failures.pop(context, None)
    _loaded[context] = (time.monotonic(), bundle)
    return bundle, None


def encode_request(
    context: ServingContext, raw_rows: list, item_ids: list | None = None
) -> dict[str, list]:
    """Encode request rows into the cold views' output columns (python-native lists).

    Args:
        context: the repo's serving context.
        raw_rows: one raw embedding (sequence of numbers or float32 array), or None, or an
            error message (str) from decoding, per row.
        item_ids: optional ids, same length; an id in the VQ pool is excluded from its own
            VQ codes, exactly as in the batch path.

    Returns:
        ``{"aligned_emb", "rq_code_l1".., "vq_codes", "qarm_version", "qarm_error"}``, each
        a list with one value per row.
    """
    pin_request_thread()
    n = len(raw_rows)
    schema = context.schema
    bundle, load_error = _bundle(context)
    if bundle is None:
        dim, k = context.aligned_dim or 1, context.vq_k or 1
        out: dict[str, list] = {ALIGNED_EMB: [[0.0] * dim for _ in range(n)]}
        for name in schema.rq_columns:
            out[name] = [MISSING_CODE] * n
        out[VQ_CODES] = [[MISSING_CODE] * k for _ in range(n)]
        out[VERSION] = [""] * n
        out[ERROR] = [load_error] * n
        return out

    from qarm_features.bundle.encode import encode_rows

    decode_errors = [r if isinstance(r, str) else None for r in raw_rows]
    rows = [None if isinstance(r, str) else r for r in raw_rows]
    ids = item_ids if item_ids is not None and len(item_ids) == n else None
    enc, errors = encode_rows(bundle, rows, ids)
    errors = [d or e for d, e in zip(decode_errors, errors)]
    out = {ALIGNED_EMB: enc.aligned.tolist()}
    for level, name in enumerate(schema.rq_columns):
        out[name] = enc.rq_codes[:, level].tolist()
    out[VQ_CODES] = enc.vq_codes.tolist()
    out[VERSION] = ["" if e else enc.version for e in errors]
    out[ERROR] = [e or "" for e in errors]
    return out


def _as_list(values) -> list:
    if values is None:
        return []
    return values if isinstance(values, list) else list(values)


def qarm_cold_python(inputs: dict, context: dict) -> dict:
    """Body of the python-mode ``qarm_cold`` view: rows carry ``raw_emb``.

    Args:
        inputs: Feast's python-mode input, ``{"raw_emb": [row, ...], ...}``; an ``item_id``
            list, when present, enables self-exclusion in VQ codes.
        context: the serving context baked into the UDF's source text.
    """
    ids = inputs.get(ITEM_ID)
    return encode_request(
        _context(context), _as_list(inputs.get(RAW_EMB)), None if ids is None else _as_list(ids)
    )


def decode_b64(value, dim: int | None):
    """One ``raw_emb_b64`` value -> a float32 array, or an error message (str) or None."""
    if value is None or value == "":
        return None
    if not isinstance(value, (str, bytes)):
        return f"{RAW_EMB_B64} must be a base64 string, got {type(value).__name__}"
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return f"{RAW_EMB_B64} is not valid base64"
    if len(data) % 4 or (dim is not None and len(data) != 4 * dim):
        want = "a multiple of 4" if dim is None else f"{4 * dim} ({dim} float32)"
        return f"{RAW_EMB_B64} decodes to {len(data)} bytes, expected {want}"
    return np.frombuffer(data, dtype="<f4")


def encode_b64(raw_emb) -> str:
    """The ``raw_emb_b64`` request value of one embedding (what an HTTP client sends)."""
    return base64.b64encode(np.ascontiguousarray(raw_emb, dtype="<f4").tobytes()).decode()


def qarm_cold_b64_python(inputs: dict, context: dict) -> dict:
    """Body of the python-mode ``qarm_cold_b64`` view: rows carry ``raw_emb_b64``."""
    ctx = _context(context)
    rows = [decode_b64(v, ctx.raw_dim) for v in _as_list(inputs.get(RAW_EMB_B64))]
    ids = inputs.get(ITEM_ID)
    return encode_request(ctx, rows, None if ids is None else _as_list(ids))


_encoders: dict = {}


def _text_encoder(bundle):
    """The bundle's text encoder (its fine-tuned ``encoder/``, else the frozen one its
    config names), loaded once per process (and pinned like a server)."""
    key = str(bundle.encoder_path or bundle.config.encoder.model_dump_json())
    encoder = _encoders.get(key)
    if encoder is None:
        from qarm_features.feast.context import serving_threads

        n = serving_threads()
        if n is not None:  # a server: torch's intra-op pool too
            import torch  # noqa: F401 - loaded first, so pin_threads reaches its pool

            from qarm_features.threads import pin_threads

            pin_threads(n)
        encoder = _encoders[key] = bundle.content_encoder()
    return encoder


def qarm_cold_text_python(inputs: dict, context: dict) -> dict:
    """Body of the python-mode ``qarm_cold_text`` view: rows carry the item's ``text``.

    The bundle's text encoder (:meth:`~qarm_features.bundle.artifact.Bundle.content_encoder`: the
    fine-tuned one it carries, else the frozen ``config.encoder``) turns each text into
    the raw embedding, which is then encoded exactly as :func:`qarm_cold_python` encodes it. The
    text must be what the catalog's template renders for the item (the build encoded
    that); a request's embedding can differ from a batched one in its last bits.
    """
    ctx = _context(context)
    texts = _as_list(inputs.get(TEXT))
    rows: list = [None if not isinstance(t, str) or not t else t for t in texts]
    good = [i for i, t in enumerate(rows) if t is not None]
    bundle, _ = _bundle(ctx)
    if good and bundle is not None:
        if bundle.config.encoder.kind != "text":
            rows = [
                f"{TEXT}: this bundle's content is {bundle.config.encoder.kind}, not text"
            ] * len(rows)
        else:
            try:
                emb = _text_encoder(bundle).encode([rows[i] for i in good])
            except Exception as exc:  # noqa: BLE001 - per-row errors, never a 500
                emb, msg = None, f"{TEXT}: the encoder failed ({type(exc).__name__}: {exc})"
                rows = [msg] * len(rows)
            if emb is not None:
                for i, e in zip(good, emb):
                    rows[i] = e
    rows = [f"{TEXT} is missing or empty" if r is None else r for r in rows]
    ids = inputs.get(ITEM_ID)
    return encode_request(ctx, rows, None if ids is None else _as_list(ids))
