"""Which bundle a feature repo serves, found without loading the bundle.

`feast apply` imports every file of the feature repo, so the repo must learn the bundle's
version and its number of RQ levels ``L`` (the ``qarm`` view has one feature per level)
cheaply: from one small JSON file, never by verifying the bundle's arrays. The answer
comes, first match wins, from

1. ``QARM_BUNDLE`` (environment): a bundle directory; its ``manifest.json`` is read.
2. ``<repo>/data/qarm_bundle.json``: the pointer that ``transformations.job`` writes when it
   materializes a bundle into the repo (bundle path, version and dims).
3. ``QARM_RQ_LEVELS`` (environment), else ``L = 3`` (``RQConfig.n_levels``): a repo applied
   before any bundle exists; its ``qarm_version`` tag reads ``"unset"``.

``<repo>`` is the directory given by the caller; code that is not told (an on-demand UDF
inside ``feast serve``) looks in ``$FEATURE_REPO_DIR_ENV_VAR`` (the variable behind
``feast -c``) and then in the working directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from qarm_features.errors import BundleError, ConfigError

ENV_BUNDLE = "QARM_BUNDLE"
ENV_LEVELS = "QARM_RQ_LEVELS"
ENV_FEAST_REPO = "FEATURE_REPO_DIR_ENV_VAR"  # what `feast -c` reads from the environment
POINTER = Path("data") / "qarm_bundle.json"
DEFAULT_LEVELS = 3  # RQConfig.n_levels
UNSET = "unset"


@dataclass(frozen=True)
class BundleRef:
    """What a repo needs to know about its bundle, without loading it.

    Attributes:
        path: the bundle directory, or None before any bundle is known.
        version: the bundle version id (``"qarm-…"``), or ``"unset"``.
        n_levels: RQ levels L (one ``rq_code_l{i}`` feature each).
        raw_dim, aligned_dim, vq_k: dims from the manifest, None when unknown.
        source: where the answer came from: ``"env"``, ``"pointer"`` or ``"default"``.
    """

    path: str | None
    version: str
    n_levels: int
    raw_dim: int | None = None
    aligned_dim: int | None = None
    vq_k: int | None = None
    source: str = "default"

    def to_json(self) -> dict:
        return asdict(self)


def read_manifest_ref(bundle_path: str | os.PathLike, *, source: str = "env") -> BundleRef:
    """Read a bundle's version and dims from its ``manifest.json`` (no hashing, no arrays).

    Raises:
        BundleError: no directory or no readable manifest there.
    """
    path = Path(bundle_path).expanduser().resolve()
    manifest = path / "manifest.json"
    try:
        data = json.loads(manifest.read_text())
        dims = data["dims"]
        return BundleRef(
            path=str(path),
            version=str(data["version"]),
            n_levels=int(dims["n_levels"]),
            raw_dim=int(dims["raw_dim"]),
            aligned_dim=int(dims["aligned_dim"]),
            vq_k=int(dims["vq_k"]),
            source=source,
        )
    except FileNotFoundError:
        raise BundleError(
            f"no bundle manifest at {manifest} (from {source}); build a bundle with "
            "`qarm build` or fix the path"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"cannot read {manifest}: {exc!r}; the bundle is corrupt") from None


def candidate_repos(repo_path: str | os.PathLike | None = None) -> list[Path]:
    """Where the pointer may be: the repo given, else ``$FEATURE_REPO_DIR_ENV_VAR``, cwd."""
    if repo_path is not None:
        return [Path(repo_path)]
    dirs = []
    if os.environ.get(ENV_FEAST_REPO):
        dirs.append(Path(os.environ[ENV_FEAST_REPO]))
    dirs.append(Path.cwd())
    return dirs


def read_pointer(repo_path: str | os.PathLike) -> BundleRef | None:
    """The pointer written into ``<repo>/data/qarm_bundle.json``, or None if there is none."""
    pointer = Path(repo_path) / POINTER
    try:
        data = json.loads(pointer.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BundleError(
            f"cannot read {pointer}: {exc!r}; delete it and re-run `qarm materialize`"
        ) from None
    keys = ("path", "version", "n_levels", "raw_dim", "aligned_dim", "vq_k")
    fields = {k: data.get(k) for k in keys}
    return BundleRef(**fields, source="pointer")


def resolve_bundle_ref(repo_path: str | os.PathLike | None = None) -> BundleRef:
    """Resolve the repo's bundle by the order in the module docstring."""
    env = os.environ.get(ENV_BUNDLE)
    if env:
        return read_manifest_ref(env, source="env")
    for repo in candidate_repos(repo_path):
        ref = read_pointer(repo)
        if ref is not None:
            return ref
    levels = os.environ.get(ENV_LEVELS, str(DEFAULT_LEVELS))
    try:
        n_levels = int(levels)
        if n_levels < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{ENV_LEVELS}={levels!r}: expected a positive integer") from None
    return BundleRef(path=None, version=UNSET, n_levels=n_levels, source="default")


def write_pointer(repo_path: str | os.PathLike, ref: BundleRef) -> Path:
    """Atomically write ``<repo>/data/qarm_bundle.json`` (temp file + rename)."""
    pointer = Path(repo_path) / POINTER
    pointer.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in ref.to_json().items() if k != "source"}
    fd, tmp = tempfile.mkstemp(prefix=".qarm_bundle.", suffix=".json", dir=pointer.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, pointer)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return pointer
