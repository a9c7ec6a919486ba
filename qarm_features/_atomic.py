"""Atomic directory writes: build in a temporary sibling, fsync, rename into place.

A reader sees either the old directory or the complete new one, never a half-written one.
Used by the bundle writer and by the fine-tuned encoder's save.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
