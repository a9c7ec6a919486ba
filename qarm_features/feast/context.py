"""Which bundle a feature repo serves: the serving context, resolved one way.

A feature repo serves one bundle at a time. ``qarm materialize`` records it in the repo's
pointer, ``<repo>/data/current/qarm_bundle.json`` (a :class:`ServingContext` as JSON: the bundle's
absolute path, version id and dims). When Feast imports the repo's definitions, they read
that pointer and bake the context into the *source text* of the UDFs (``qarm_cold``,
``qarm_cold_b64``, ``qarm_batch``; see :mod:`qarm_features.feast.views`). Feast keeps that
source in its registry and re-executes it wherever the views run: a
``FeatureStore(repo_path=...)`` opened from any working directory, every ``feast serve``
worker, a compute engine's workers. So a UDF knows its bundle and the version the
registry serves without an environment variable, the working directory or a
``configure()`` call, and a rollout (which re-applies the definitions) reaches every
reader at its next registry refresh.

The resolution order, the only one in the code base:

1. an explicit bundle directory (a CLI option, an SDK argument);
2. the repo pointer;
3. nothing: a repo applied before any bundle exists. Its views have
   ``RQConfig``'s default number of levels, its ``qarm_version`` tag reads ``"unset"``
   and every cold row reports that no bundle is configured.

Thread pools are a process-wide policy kept here too (:func:`set_serving_threads`,
:func:`pin_request_thread`): a server answering many small requests loses three orders of
magnitude to BLAS/OpenMP contention with the default pools, a training job that happens
to call a view must keep its threads.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from qarm_features._atomic import write_text_atomic
from qarm_features.bundle.manifest import read_manifest
from qarm_features.config import RQConfig
from qarm_features.errors import BundleError, BundleVersionMismatch, QarmError
from qarm_features.schema import CodeSchema

log = logging.getLogger(__name__)

POINTER = Path("data") / "current" / "qarm_bundle.json"  # switched with the sources
UNSET = "unset"
DEFAULT_LEVELS = RQConfig.model_fields["n_levels"].default
ENV_THREADS = "QARM_SERVING_THREADS"  # set in a server's environment to pin its pools


@dataclass(frozen=True)
class ServingContext:
    """The bundle a repo serves, as its UDFs see it.

    Attributes:
        bundle: absolute path of the bundle directory; None before any bundle exists.
        version: the bundle's version id (``"qarm-…"``), or ``"unset"``.
        n_levels: RQ levels ``L`` (one ``rq_code_l*`` feature each).
        raw_dim, aligned_dim, vq_k: dims from the manifest; None without a bundle.
        id_type: the catalog's ids, ``"int64"`` or ``"string"``.
    """

    bundle: str | None
    version: str
    n_levels: int
    raw_dim: int | None = None
    aligned_dim: int | None = None
    vq_k: int | None = None
    id_type: str = "int64"

    # ----------------------------------------------------------------- constructors
    @classmethod
    def of_bundle(cls, path: str | os.PathLike) -> "ServingContext":
        """The context of a bundle directory, from its manifest (no hashing, no arrays).

        Raises:
            BundleError: no bundle there, or a manifest that fails its schema.
        """
        path = Path(path).expanduser().resolve()
        manifest, _ = read_manifest(path)
        d = manifest.dims
        return cls(
            bundle=str(path),
            version=manifest.version,
            n_levels=d.n_levels,
            raw_dim=d.raw_dim,
            aligned_dim=d.aligned_dim,
            vq_k=d.vq_k,
            id_type=d.id_type,
        )

    @classmethod
    def unset(cls) -> "ServingContext":
        """The context of a repo that serves no bundle yet."""
        return cls(bundle=None, version=UNSET, n_levels=DEFAULT_LEVELS)

    @classmethod
    def of_repo(
        cls, repo_path: str | os.PathLike, bundle_path: str | os.PathLike | None = None
    ) -> "ServingContext":
        """Resolve by the module's order: ``bundle_path``, else the pointer, else unset."""
        if bundle_path is not None:
            return cls.of_bundle(bundle_path)
        return read_pointer(repo_path) or cls.unset()

    @classmethod
    def from_json(cls, data: dict) -> "ServingContext":
        fields = ("bundle", "version", "n_levels", "raw_dim", "aligned_dim", "vq_k", "id_type")
        unknown = sorted(set(data) - set(fields))
        if unknown or "version" not in data or "n_levels" not in data:
            raise BundleError(f"not a serving context: {data!r}")
        return cls(**{k: data[k] for k in fields if k in data})

    # ----------------------------------------------------------------- use
    def to_json(self) -> dict:
        return asdict(self)

    @property
    def schema(self) -> CodeSchema:
        return CodeSchema(self.n_levels)

    @property
    def is_set(self) -> bool:
        return self.bundle is not None and self.version != UNSET

    def load(self):
        """The bundle, loaded and verified once per process, with this context's version.

        Raises:
            QarmError: no bundle configured; BundleError: the bundle is missing or
                corrupt; BundleVersionMismatch: the directory now holds another version.
        """
        from qarm_features.bundle.encode import get_bundle

        if not self.is_set:
            raise QarmError(
                "no QARM bundle configured for this feature repo: run `qarm materialize` "
                "(it writes the repo's bundle pointer and re-applies the views)"
            )
        bundle = get_bundle(self.bundle)
        if bundle.version != self.version:
            raise BundleVersionMismatch(
                f"bundle {self.bundle} is {bundle.version} but the registry serves "
                f"{self.version}; re-run `qarm materialize --promote` with the bundle "
                "you want served"
            )
        return bundle


# --------------------------------------------------------------------- the pointer
def read_pointer(repo_path: str | os.PathLike) -> ServingContext | None:
    """The context recorded in the repo's pointer; None if there is none.

    Raises:
        BundleError: the pointer exists but cannot be read.
    """
    pointer = Path(repo_path) / POINTER
    try:
        data = json.loads(pointer.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BundleError(
            f"cannot read {pointer}: {exc!r}; delete it and re-run `qarm materialize`"
        ) from None
    try:
        return ServingContext.from_json(data)
    except (BundleError, TypeError) as exc:
        raise BundleError(f"{pointer}: {exc}; re-run `qarm materialize`") from None


def write_pointer(
    repo_path: str | os.PathLike, context: ServingContext, *, into: Path | None = None
) -> Path:
    """Atomically write the repo's pointer (temp file, fsync, rename).

    ``into``: a sources directory not yet served (the pointer is then switched in with
    it); default: the served one.
    """
    pointer = (into / POINTER.name) if into is not None else Path(repo_path) / POINTER
    return write_text_atomic(pointer, json.dumps(context.to_json(), indent=2, sort_keys=True))


PREVIOUS = Path("data") / "current" / "qarm_prev.json"  # the version kept beside the new one


def read_previous(repo_path: str | os.PathLike) -> ServingContext | None:
    """The previous version a repo keeps serving beside its pointer's (``qarm_prev``)."""
    path = Path(repo_path) / PREVIOUS
    try:
        return ServingContext.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, BundleError) as exc:
        raise BundleError(f"cannot read {path}: {exc!r}; re-run `qarm materialize`") from None


# --------------------------------------------------------------------- threads
_threads: dict = {"n": None, "pinned": None}
_local = threading.local()


def set_serving_threads(n: int | None) -> None:
    """Declare this process a server whose encodes run on ``n`` BLAS/OpenMP threads."""
    _threads["n"] = None if n is None else int(n)


def serving_threads() -> int | None:
    """The thread count this process serves with (None: not a server)."""
    n = _threads["n"]
    if n is None and os.environ.get(ENV_THREADS):
        n = int(os.environ[ENV_THREADS])
    return n


def pin_request_thread() -> None:
    """Pin BLAS and faiss threads if this process is a server (set above, or by env).

    BLAS limits are process-wide and set once. OpenMP's thread count (faiss) belongs to the
    calling thread, and ``feast serve`` answers requests on worker threads: each new thread
    is pinned on its first request (a thread-local check, nanoseconds). Pinning only the
    loading thread left request threads on the default pool: 5x slower cold reads.
    """
    n = serving_threads()
    if n is None:
        return
    if _threads["pinned"] != n:
        from qarm_features.bundle.encode import pin_threads

        pin_threads(n)
        _threads["pinned"] = n
        _local.pinned = n
        log.info("thread pools pinned to %d thread(s) for request-time encoding", n)
    elif getattr(_local, "pinned", None) != n:
        import faiss

        faiss.omp_set_num_threads(n)
        _local.pinned = n
