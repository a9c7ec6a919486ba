"""Stages of long work: each one timed, its peak memory logged, its progress reported.

The library never prints: a stage logs one INFO line when it ends (seconds, rows per
second when it counted rows, peak RSS) and calls an optional progress callback that the
CLI turns into a rich progress bar (count, rate, ETA)::

    with stage("encode", total=n, progress=cb) as s:
        for chunk in chunks:
            ...
            s.advance(len(chunk))
    s.seconds, s.peak_rss_mib

The callback is ``progress(name, total, advance)``: ``advance == 0`` announces the stage
(``total`` rows, or None when unknown), each later call advances it by ``advance``.

Peak RSS is the process's high-water mark so far (``getrusage``'s ``ru_maxrss``, which
never goes down), read when the stage ends: a stage's figure covers it and everything
before it in the process. Run one stage per process to measure it alone (the
benchmarks do).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, "int | None", int], None]


def peak_rss_mib() -> float:
    """The process's peak resident set size so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


@dataclass
class Stage:
    """One running (then finished) stage: what :func:`stage` yields.

    Attributes:
        name: the stage's label.
        total: rows (or steps) it will process; None when unknown.
        done: rows advanced so far.
        seconds: wall time, set when the stage ends.
        peak_rss_mib: the process's peak RSS when the stage ended.
    """

    name: str
    total: int | None = None
    done: int = 0
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    _progress: ProgressCallback | None = field(default=None, repr=False)

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more rows done (and tell the progress callback)."""
        self.done += int(n)
        if self._progress is not None and n:
            self._progress(self.name, self.total, int(n))

    def record(self) -> dict:
        """``seconds``, ``peak_rss_mib`` (and ``rows`` / ``rows_per_s`` when counted)."""
        out = {"seconds": round(self.seconds, 3), "peak_rss_mib": round(self.peak_rss_mib, 1)}
        if self.done:
            out["rows"] = self.done
            out["rows_per_s"] = round(self.done / max(self.seconds, 1e-9), 1)
        return out


@contextmanager
def stage(
    name: str,
    *,
    total: int | None = None,
    progress: ProgressCallback | None = None,
    records: dict | None = None,
    logger: logging.Logger | None = None,
) -> Iterator[Stage]:
    """Time a stage, log its seconds and peak RSS, report its progress.

    Args:
        name: the stage's label (also the key in ``records``).
        total: rows (or steps) it will process, for a bar with an ETA; None when unknown.
        progress: ``progress(name, total, advance)`` (see the module docstring).
        records: a dict that receives ``{name: stage.record()}`` when the stage ends.
        logger: where the INFO line goes (default: this module's logger).
    """
    s = Stage(name, total, _progress=progress)
    if progress is not None:
        progress(name, total, 0)
    t0 = time.perf_counter()
    try:
        yield s
    finally:
        s.seconds = time.perf_counter() - t0
        s.peak_rss_mib = peak_rss_mib()
        rate = f", {s.done / max(s.seconds, 1e-9):,.0f} rows/s" if s.done else ""
        (logger or log).info(
            "stage %s: %.2f s%s, peak RSS %.0f MiB", name, s.seconds, rate, s.peak_rss_mib
        )
        if records is not None:
            records[name] = s.record()


@contextmanager
def count_records(logger_name: str, prefix: str, advance: Callable[[int], None]):
    """Call ``advance(1)`` for each record of ``logger_name`` whose message starts with
    ``prefix``, logged at any level, while the block runs; what reaches the handlers is
    unchanged.

    How a stage counts the steps of code that logs them (the aligner logs each epoch,
    at DEBUG unless asked for INFO) without a callback of its own.
    """
    target = logging.getLogger(logger_name)
    floor = target.getEffectiveLevel()

    def count(record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(prefix):
            advance(1)
        return record.levelno >= floor  # the records the logger let through before

    level = target.level
    target.addFilter(count)
    target.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        target.removeFilter(count)
        target.setLevel(level)
