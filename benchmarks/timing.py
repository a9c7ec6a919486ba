"""Timing helpers shared by every benchmark section: interleaved runs, medians, ratios.

The machine is shared: absolute times drift by 2x within a minute. Every measurement here
therefore runs its contenders *interleaved* (A B B A A B ... so that neither side always
goes first) and reports medians; a figure is only ever quoted as a ratio against a
baseline from the same interleaving. Peak memory is measured in a child process
(:func:`run_child`) so the parent's heap does not pollute it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Stats:
    """Wall times (seconds) of repeated runs of one case."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return float(np.median(self.times)) if self.times else float("nan")

    @property
    def best(self) -> float:
        return float(np.min(self.times)) if self.times else float("nan")

    def pct(self, q: float) -> float:
        return float(np.percentile(self.times, q)) if self.times else float("nan")

    def to_json(self, *, per_call_ms: bool = False) -> dict:
        scale = 1e3 if per_call_ms else 1.0
        unit = "ms" if per_call_ms else "s"
        out = {
            f"median_{unit}": self.median * scale,
            f"min_{unit}": self.best * scale,
            "n": len(self.times),
        }
        if per_call_ms:
            out["p50_ms"] = self.pct(50) * scale
            out["p99_ms"] = self.pct(99) * scale
        return out


def interleave(
    cases: dict[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 1
) -> dict[str, Stats]:
    """Time each case ``repeats`` times, interleaved; return per-case :class:`Stats`.

    Round ``r`` runs the cases in the given order when ``r`` is even and reversed when odd
    (A B, B A, A B ...). The garbage collector is paused while a case runs.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    stats = {name: Stats() for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                cases[name]()
                stats[name].times.append(time.perf_counter() - t0)
            finally:
                gc.enable()
    return stats


def latencies(
    cases: dict[str, Callable[[], object]],
    *,
    n_calls: int = 1000,
    block: int = 25,
    warmup: int = 20,
    budget_s: float | None = None,
) -> dict[str, Stats]:
    """Per-call latency distributions of small calls, interleaved in blocks of ``block``.

    Each case gets about ``n_calls`` calls (fewer if ``budget_s`` of wall time runs out;
    the cases always get the same number). Use ``Stats.pct(50)``/``pct(99)``.
    """
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    stats = {name: Stats() for name in names}
    t_start = time.perf_counter()
    done = 0
    r = 0
    while done < n_calls:
        for name in names if r % 2 == 0 else names[::-1]:
            fn, times = cases[name], stats[name].times
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        done += block
        r += 1
        if budget_s is not None and time.perf_counter() - t_start > budget_s and done >= 4 * block:
            break
    return stats


def ratio(a: float, b: float) -> float:
    """``a / b`` or NaN when ``b`` is not positive."""
    return float(a) / float(b) if b and b > 0 else float("nan")


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Limit BLAS (every loaded library), faiss OpenMP and torch intra-op threads to ``n``."""
    from threadpoolctl import threadpool_limits

    torch_mod = sys.modules.get("torch")
    old_torch = torch_mod.get_num_threads() if torch_mod is not None else None
    faiss_mod = sys.modules.get("faiss")
    old_faiss = faiss_mod.omp_get_max_threads() if faiss_mod is not None else None
    with threadpool_limits(n):
        if torch_mod is not None:
            torch_mod.set_num_threads(n)
        if faiss_mod is not None:
            faiss_mod.omp_set_num_threads(n)
        try:
            yield
        finally:
            if torch_mod is not None and old_torch is not None:
                torch_mod.set_num_threads(old_torch)
            if faiss_mod is not None and old_faiss is not None:
                faiss_mod.omp_set_num_threads(old_faiss)


@contextlib.contextmanager
def env_vars(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for a block; restore them after."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sgemm_case(m: int, n: int, k: int, seed: int = 0) -> tuple[Callable[[], object], float]:
    """A float32 GEMM ``(m, k) @ (k, n)`` as a timed case, and its FLOP count ``2mnk``."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    out = np.empty((m, n), np.float32)
    return (lambda: np.matmul(a, b, out=out)), 2.0 * m * n * k


def fmt(x, digits: int = 2) -> str:
    """A figure for the summary tables: thousands separated, "n/a" for None/NaN/inf."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, int) or abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def merge_results(path, sections: dict, *, indent: int = 1, default=float) -> None:
    """Write ``sections`` (top-level keys) into the JSON results file at ``path``, keeping
    its other keys (``scale.json`` holds the sweep, the streamed runs and the online write;
    ``rq.json`` the suite's section and ``--sample-vs-full``). ``indent``: the file's own
    (the suite writes its section files with 2); ``default``: ``json.dumps``'s."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(sections)
    path.write_text(json.dumps(data, indent=indent, default=default))


def machine() -> dict:
    """What the figures were measured on: CPU, cores, memory, load, library versions."""
    import psutil

    info: dict = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    versions = {}
    for mod in ("numpy", "torch", "faiss", "feast", "pandas", "pyarrow"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    info["versions"] = versions
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = sorted(
            {f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture')})"
             for p in threadpool_info()}  # fmt: skip
        )
    except Exception:
        info["blas"] = []
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_child(func: str, kwargs: dict, *, timeout: float = 1800) -> dict:
    """Run ``module:function(**kwargs)`` in a fresh interpreter; return its JSON result.

    The child adds ``peak_rss_mib`` (the child's own high-water RSS, ``VmHWM``) and
    ``rss_after_import_mib`` (RSS once the function's module is imported, before it runs)
    to the dict the function returns.

    Raises:
        RuntimeError: the child failed (its stderr tail is in the message).
    """
    spec = json.dumps({"func": func, "kwargs": kwargs})
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks._child", spec],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=root,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{func} failed in a child process:\n{proc.stderr[-3000:]}")
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last)
