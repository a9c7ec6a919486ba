"""The on-demand transformation: QARM codes for cold items, computed at request time.

The ``qarm_cold`` on-demand feature view (``feature_repo/feature_definitions.py``) is a
two-line UDF that imports :func:`qarm_cold_python` inside its body: Feast re-executes UDF
source text in a namespace holding only ``pd``/``np``, so everything lives here.

For each request row, the raw content embedding ``raw_emb`` becomes the same
``aligned_emb``, ``rq_code_l1`` … ``rq_code_l{L}``, ``vq_codes`` and ``qarm_version`` that
the batch path stores for that embedding, bit for bit (both call
:mod:`qarm_features.encode`, whose output for a row does not depend on the batch). A row
that cannot be encoded (wrong size, NaN/inf, missing, no usable bundle) gets codes ``-1``,
a zero ``aligned_emb``, an empty ``qarm_version`` and a message in ``qarm_error``; the
other rows of the request are unaffected. ``qarm_error`` is ``""`` on a good row.

Heavy state (the verified bundle, quantizers) loads once per process. Thread pools are a
process-wide policy, so they are pinned only where the process is a server: ``feast
serve`` workers (through ``feature_repo/static_artifacts.py``), a process that calls
:func:`configure` with ``threads``, or any process started with ``QARM_SERVING_THREADS``
set. A server running many small requests loses three orders of magnitude to BLAS/OpenMP
contention with the default pools; a training job that happens to call the view (or
``feast apply``, which calls it with dummy input) keeps its threads.

Which bundle: :func:`configure` (``feature_repo/static_artifacts.py`` makes every ``feast
serve`` worker follow its repo's pointer, so a rollout reaches the cold path without a
restart), else ``QARM_BUNDLE``, else the repo pointer (:mod:`transformations.bundle_ref`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from qarm_features.errors import BundleVersionMismatch, QarmError
from transformations.bundle_ref import (
    ENV_BUNDLE,
    POINTER,
    UNSET,
    BundleRef,
    candidate_repos,
    read_manifest_ref,
    read_pointer,
    resolve_bundle_ref,
)

log = logging.getLogger(__name__)

ENV_THREADS = "QARM_SERVING_THREADS"  # set in a server's environment to pin its pools
RETRY_AFTER_S = 10.0  # a bundle that failed to load is retried at most this often

_lock = threading.Lock()
_state: dict = {
    "path": None,  # configured bundle path (None: resolve from env / pointer)
    "expected_version": None,  # registry's version; a different bundle is refused
    "threads": None,  # pin BLAS/OpenMP pools to this many threads before encoding
    "pinned": None,  # the thread count pinned so far in this process
    "failure": None,  # (time, message) of the last failed load
    "repo": None,  # followed feature repo (its pointer names the bundle and the version)
    "pointer": None,  # ((pointer path, mtime), BundleRef) of the last pointer read
}


def configure(
    bundle_path: str | os.PathLike | None = None,
    *,
    repo_path: str | os.PathLike | None = None,
    expected_version: str | None = None,
    threads: int | None = None,
    warm: bool = False,
) -> None:
    """Choose the bundle this process serves cold items with.

    Args:
        bundle_path: a fixed bundle directory. None: ``QARM_BUNDLE``, else the pointer of
            ``repo_path`` (or of ``$FEATURE_REPO_DIR_ENV_VAR`` / the working directory).
        repo_path: follow this feature repo: its pointer is re-read whenever it changes,
            so a rollout (``qarm materialize --promote``) moves this process to the new
            bundle at its next request, and the pointer's version is the one expected.
        expected_version: the version the registry serves; a bundle with another version
            is refused and every row reports the mismatch in ``qarm_error``. None: the
            followed repo's pointer version, or no check.
        threads: pin BLAS and faiss thread pools of this process to ``threads`` before the
            next encode (servers: 1). None leaves them (unless ``QARM_SERVING_THREADS``).
        warm: load the bundle and run one encode now, so the first request does not pay.

    Raises:
        QarmError: with ``warm=True``, when the bundle cannot be loaded or mismatches.
    """
    with _lock:
        _state["path"] = None if bundle_path is None else str(bundle_path)
        _state["repo"] = None if repo_path is None else str(repo_path)
        _state["expected_version"] = expected_version
        _state["failure"] = None
        if threads is not None:
            _state["threads"] = int(threads)
    if warm:
        warm_up()


def pin_threads() -> None:
    """Pin BLAS and faiss threads if this process asked for it (configure / env).

    BLAS limits are process-wide and set once. OpenMP's thread count (faiss) belongs to the
    calling thread, and `feast serve` answers requests on worker threads: each new thread
    is pinned on its first request (a thread-local check, nanoseconds). Pinning only the
    loading thread left request threads on the default pool, 5x slower cold reads.
    """
    n = _state["threads"]
    if n is None and os.environ.get(ENV_THREADS):
        n = int(os.environ[ENV_THREADS])
    if n is None:
        return
    if _state["pinned"] != n:
        from qarm_features.encode import pin_threads as _pin

        _pin(n)
        _state["pinned"] = n
        _thread_state.pinned = n
        log.info("thread pools pinned to %d thread(s) for request-time encoding", n)
    elif getattr(_thread_state, "pinned", None) != n:
        import faiss

        faiss.omp_set_num_threads(n)
        _thread_state.pinned = n


_thread_state = threading.local()


def _pointer(repos) -> BundleRef | None:
    """The first repo pointer found; re-read only when the file changes."""
    for repo in repos:
        pointer = Path(repo) / POINTER
        try:
            key = (str(pointer.resolve()), pointer.stat().st_mtime_ns)
        except OSError:
            continue
        cached = _state["pointer"]
        if cached is None or cached[0] != key:
            cached = _state["pointer"] = (key, read_pointer(repo))
        return cached[1]
    return None


def _resolve() -> tuple[str | None, str | None]:
    """(bundle path, expected version): configure() > QARM_BUNDLE > repo pointer."""
    repos = [_state["repo"]] if _state["repo"] else candidate_repos()
    followed = _pointer(repos) if _state["repo"] else None
    expected = _state["expected_version"]
    if expected is None and followed is not None:
        expected = followed.version
    if _state["path"]:
        return _state["path"], expected
    env = os.environ.get(ENV_BUNDLE)
    if env:
        return env, expected
    ref = followed if _state["repo"] else _pointer(repos)
    return (None if ref is None else ref.path), expected


def load_serving_bundle():
    """The bundle for request-time encoding: loaded and verified once per process.

    Raises:
        QarmError: no bundle configured, a corrupt bundle, or a version other than the
            expected one.
    """
    from qarm_features.encode import get_bundle

    pin_threads()
    path, expected = _resolve()
    if not path:
        raise QarmError(
            "no QARM bundle configured for cold items: set QARM_BUNDLE, run "
            "`qarm materialize` in the feature repo, or call "
            "transformations.on_demand.configure(path)"
        )
    bundle = get_bundle(path)
    if expected and expected != UNSET and bundle.version != expected:
        raise BundleVersionMismatch(
            f"cold-item bundle {bundle.path} is {bundle.version} but the registry serves "
            f"{expected}; point QARM_BUNDLE at the registered bundle or re-materialize"
        )
    return bundle


def warm_up() -> str:
    """Load the bundle and encode one dummy row; returns the bundle version."""
    bundle = load_serving_bundle()
    from qarm_features.encode import encode_rows

    encode_rows(bundle, [np.zeros(bundle.raw_dim, np.float32)])
    return bundle.version


def _try_bundle():
    """(bundle, None) or (None, error message); failures are cached for RETRY_AFTER_S."""
    failure = _state["failure"]
    if failure is not None and time.monotonic() - failure[0] < RETRY_AFTER_S:
        return None, failure[1]
    try:
        bundle = load_serving_bundle()
    except Exception as exc:  # noqa: BLE001 - a request must get per-row errors, not a 500
        msg = f"{type(exc).__name__}: {exc}"
        _state["failure"] = (time.monotonic(), msg)
        log.warning(
            "cold-item encoding unavailable: %s", msg, exc_info=not isinstance(exc, QarmError)
        )
        return None, msg
    _state["failure"] = None
    return bundle, None


def _fallback_dims() -> tuple[int, int, int]:
    """(L, d, K) of placeholder rows when no bundle can be used.

    Happens for ``feast apply``'s dummy call before any bundle exists, and for a bundle
    refused as a mismatch. Every bundle this process knows of is asked and the largest L
    wins: extra ``rq_code_l*`` outputs are ignored by Feast, missing ones are not.
    """
    refs = []
    with contextlib.suppress(Exception):
        refs.append(resolve_bundle_ref())
    for repo in ([_state["repo"]] if _state["repo"] else []) + candidate_repos():
        with contextlib.suppress(Exception):
            refs.append(read_pointer(repo))
    if _state["path"]:
        with contextlib.suppress(Exception):
            refs.append(read_manifest_ref(_state["path"]))
    refs = [r for r in refs if r is not None]
    if not refs:
        return 3, 1, 1
    n_levels = max(r.n_levels for r in refs)
    dim = next((r.aligned_dim for r in refs if r.aligned_dim), 1)
    k = next((r.vq_k for r in refs if r.vq_k), 1)
    return n_levels, dim, k


def encode_request(raw_rows: list, item_ids: list | None = None) -> dict[str, list]:
    """Encode request rows into the ``qarm_cold`` output columns (python-native lists).

    Args:
        raw_rows: one raw embedding (sequence of floats) or None per row.
        item_ids: optional ids, same length; an id in the VQ pool is excluded from its own
            VQ codes, exactly as in the batch path.

    Returns:
        ``{"aligned_emb", "rq_code_l1".., "vq_codes", "qarm_version", "qarm_error"}``,
        each a list with one value per row.
    """
    n = len(raw_rows)
    bundle, load_error = _try_bundle()
    if bundle is None:
        n_levels, dim, k = _fallback_dims()
        out: dict[str, list] = {"aligned_emb": [[0.0] * dim for _ in range(n)]}
        for level in range(n_levels):
            out[f"rq_code_l{level + 1}"] = [-1] * n
        out["vq_codes"] = [[-1] * k for _ in range(n)]
        out["qarm_version"] = [""] * n
        out["qarm_error"] = [load_error] * n
        return out

    from qarm_features.encode import encode_rows

    ids = None
    if item_ids is not None and len(item_ids) == n:
        ids = [None if v is None else int(v) for v in item_ids]
    enc, errors = encode_rows(bundle, raw_rows, ids)
    out = {"aligned_emb": enc.aligned.tolist()}
    for level in range(bundle.n_levels):
        out[f"rq_code_l{level + 1}"] = enc.rq_codes[:, level].tolist()
    out["vq_codes"] = enc.vq_codes.tolist()
    out["qarm_version"] = ["" if e else enc.version for e in errors]
    out["qarm_error"] = [e or "" for e in errors]
    return out


def qarm_cold_python(inputs: dict) -> dict:
    """Body of the python-mode ``qarm_cold`` on-demand view.

    Args:
        inputs: Feast's python-mode input: ``{"raw_emb": [row, ...], ...}``; an
            ``item_id`` list, when Feast passes one, enables self-exclusion in VQ codes.
    """
    raw = inputs.get("raw_emb")
    if raw is None:
        raw = []
    elif not isinstance(raw, list):
        raw = list(raw)
    item_ids = inputs.get("item_id")
    if item_ids is not None and not isinstance(item_ids, list):
        item_ids = list(item_ids)
    return encode_request(raw, item_ids)
