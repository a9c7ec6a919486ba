"""Atomic writes: build in a temporary sibling, fsync, rename into place.

A reader sees either the old file/directory or the complete new one, never a half-written
one. :func:`atomic_dir` serves the bundle writer and the fine-tuned encoder's save;
:func:`atomic_file` every single file the package writes in place (the repo's pointer,
parquet sources, the embedding cache, ``LATEST``, reports).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # read it (the only way), put it back at once
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and everything under it) the modes a plain write would have had.

    ``tempfile`` creates files 0600 and directories 0700 whatever the umask, so an
    artifact written through a temporary name would be unreadable by another service
    account that the umask lets read it (a feature server's user, say).
    """
    mask = _umask()
    path = Path(path)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        if entry.is_symlink():
            continue
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


def fsync_dir(path: Path) -> None:
    """fsync a directory entry (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on a clean exit swap it into ``path``.

    Every file and folder written is fsynced, an existing ``path`` is moved aside, the new
    one renamed in, the old one removed. On any exception the temporary directory is
    deleted and ``path`` is left untouched. The caller decides whether overwriting is
    allowed before entering.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for entry in sorted(tmp.rglob("*")):
            if entry.is_file():
                with open(entry, "rb") as fh:
                    os.fsync(fh.fileno())
        for d in [tmp, *(d for d in tmp.rglob("*") if d.is_dir())]:
            fsync_dir(d)
        honour_umask(tmp)
        backup = None
        if path.exists():
            backup = path.parent / f".{path.name}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(path, backup)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit swap it into ``path``.

    The caller writes the file at the yielded path (any writer: ``np.save``, parquet,
    JSON); it is then fsynced, given the umask's modes and renamed over ``path``. On any
    exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file atomically (:func:`atomic_file`); returns ``path``."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path

