"""Thread counts: how many CPUs this process may use, and the one place pools are pinned.

A process may use the CPUs of its affinity mask (``os.sched_getaffinity``), at most its
cgroup CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``,
rounded up), never the host's core count: a container granted 2 CPUs of a 64-core host
that starts 64 BLAS threads spends its quota waiting on them. :func:`usable_cpus` is that
number (``QARM_THREADS`` overrides it). :func:`pin_threads` and :func:`limited` set torch's
intra-op pool (when torch is already imported: the serving path never imports it), every
BLAS and OpenMP pool threadpoolctl finds (numpy's and faiss's OpenBLAS, libgomp), and
faiss's OpenMP pool of the calling thread.

Why it matters on a shared machine: an OpenMP parallel region waits for all its threads,
and a thread the scheduler has parked stalls every region. Beside two busy processes on
2 cores, the aligner's training loop at 2 torch threads took 20x its 1-thread time (issue
20); ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at barriers instead of spinning; set by
:func:`passive_wait_default` before torch or faiss load libgomp) cut that to 2.5x.

Vocabulary floor: the standard library only at import; threadpoolctl, torch and faiss are
touched only when a pinning function runs (torch and faiss only if already imported).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from qarm_features.errors import ConfigError

__all__ = ["ENV_THREADS", "limited", "passive_wait_default", "pin_threads", "usable_cpus"]

log = logging.getLogger(__name__)

ENV_THREADS = "QARM_THREADS"  # an explicit thread budget for this process (>= 1)
_CGROUP = Path("/sys/fs/cgroup")


def _cgroup_quota(root: Path | None = None) -> float | None:
    """CPUs granted by the cgroup CPU quota (``None``: no quota, or no cgroup file)."""
    root = _CGROUP if root is None else root
    try:  # cgroup v2: "max 100000" or "150000 100000"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: quota -1 means none
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def usable_cpus() -> int:
    """CPUs this process may use: ``QARM_THREADS`` if set, else min(affinity, cgroup quota).

    Raises:
        ConfigError: ``QARM_THREADS`` is set but not an integer >= 1.
    """
    env = os.environ.get(ENV_THREADS)
    if env is not None and env.strip():
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"{ENV_THREADS}: expected an integer >= 1, got {env!r}")
        return n
    n = _affinity()
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _current() -> tuple[int | None, int | None]:
    torch = sys.modules.get("torch")
    faiss = sys.modules.get("faiss")
    return (
        torch.get_num_threads() if torch is not None else None,
        faiss.omp_get_max_threads() if faiss is not None else None,
    )


def _set(torch_n: int | None, faiss_n: int | None) -> None:
    """faiss first, torch last: when torch was imported first, its libgomp is global and
    faiss's ``omp_set_num_threads`` binds to it (one OpenMP pool), so the last call wins."""
    torch = sys.modules.get("torch")
    faiss = sys.modules.get("faiss")
    if faiss is not None and faiss_n is not None:
        faiss.omp_set_num_threads(faiss_n)
    if torch is not None and torch_n is not None:
        torch.set_num_threads(torch_n)


def _resolve(n: int | None) -> int:
    if n is None:
        return usable_cpus()
    if int(n) < 1:
        raise ConfigError(f"threads: expected >= 1, got {n}")
    return int(n)


def pin_threads(n: int | None = None) -> int:
    """Set every pool to ``n`` threads (default :func:`usable_cpus`) for the process; returns ``n``.

    BLAS limits are process-wide; torch's intra-op count is too; faiss's OpenMP setting
    holds for the calling thread only (call again on each thread that searches).
    """
    n = _resolve(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        log.debug("threadpoolctl missing; BLAS threads not pinned")
    _set(n, n)
    return n


@contextlib.contextmanager
def limited(n: int | None = None, *, torch_threads: int | None = None) -> Iterator[int]:
    """Pools at ``n`` threads (default :func:`usable_cpus`) inside the block, restored after.

    ``torch_threads``: torch's intra-op count when it should differ from ``n`` (a loop of
    small steps runs best at 1 while its bulk numpy work uses ``n``). Yields ``n``.
    """
    n = _resolve(n)
    tt = n if torch_threads is None else _resolve(torch_threads)
    before = _current()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        ctx = contextlib.nullcontext()
    else:
        ctx = threadpool_limits(n)
    with ctx:
        _set(tt, n)
        try:
            yield n
        finally:
            _set(*before)


def passive_wait_default() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise.

    libgomp reads it once, when it loads (``import torch`` / ``import faiss``): call this
    before either is imported (``qarm_features/__init__`` does). Idle OpenMP threads then
    sleep instead of spinning on cores other processes need.
    """
    if "torch" in sys.modules or "faiss" in sys.modules:
        log.debug("OMP_WAIT_POLICY not set: libgomp is already loaded")
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
