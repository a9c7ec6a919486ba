"""Child-process entry point for :func:`benchmarks.timing.run_child` (peak RSS of one run).

Usage: ``python -m benchmarks._child '{"func": "module:function", "kwargs": {...}}'``.
Prints the function's JSON-able result dict, plus ``peak_rss_mib`` (VmHWM) and
``rss_after_import_mib``, as the last line of stdout.
"""

from __future__ import annotations

import importlib
import json
import math
import resource
import sys


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def status_mib(key: str) -> float:
    """One memory line of ``/proc/self/status`` (``VmHWM``, ``VmRSS``, ``RssAnon``, ...) in
    MiB; NaN where the file or the line is missing (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:  # pragma: no cover - not Linux
        pass
    return float("nan")  # pragma: no cover


def _peak_rss_mib() -> float:
    """``VmHWM``: the high-water RSS of this process image.

    Not ``ru_maxrss``: Linux carries that across fork+exec, so a child would report its
    parent's peak whenever the parent is larger.
    """
    peak = status_mib("VmHWM")
    if not math.isnan(peak):
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover


def main() -> None:
    spec = json.loads(sys.argv[1])
    module, name = spec["func"].split(":")
    fn = getattr(importlib.import_module(module), name)
    before = _rss_mib()
    out = dict(fn(**spec["kwargs"]))
    out["rss_after_import_mib"] = before
    out["peak_rss_mib"] = _peak_rss_mib()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
