"""A run that changes what a repo serves: one at a time, journaled, finished or rolled back.

``qarm materialize`` (a promotion above all) changes four things that no single atomic
step can change together: the offline sources with the repo pointer (``data/current``,
switched in one rename, :func:`qarm_features.feast.job.prepare_sources`), the online rows
of the code-bearing views (cleared on a version change), the registry (``store.apply``)
and the online rows again (written view by view). :func:`roll_out` runs the steps after
the switch, in that order: cleared before the new definitions are applied, a warm read
finds no row (the cold path of the version still registered) rather than a row of the
old version beside the new version's cold codes.

- :func:`repo_lock`: an exclusive ``fcntl.flock`` on ``<repo>/data/.qarm.lock``, held for
  the whole run. The kernel releases it when the process ends, ``kill -9`` included, so a
  stale lock cannot exist. A second run is refused at once (or after ``timeout`` seconds)
  with :class:`~qarm_features.errors.RepoLocked`, whose message names the holder (pid,
  host, what it runs, since when), which it wrote into the lock file. The lock is
  re-entrant within a thread (``status --repair`` applies under its own lock).
- :class:`Journal`: ``<repo>/data/qarm_journal.json``, rewritten atomically before each
  step of :data:`STEPS` and removed when the run ends. A journal whose lock is free is a
  run that died: :func:`describe` says at which step (and which view, during the online
  write), and :func:`recover` (``qarm status --repair``) rolls it back when it died before
  the switch (the served set never changed; the unswitched sources are removed) or
  finishes it after (the new set is whole: clear, apply, write every view again).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd

from qarm_features._atomic import write_text_atomic
from qarm_features.errors import BundleError, RepoLocked
from qarm_features.feast.context import read_pointer
from qarm_features.feast.layout import CURRENT, HISTORY_FILE, JOURNAL_FILE, LOCK_FILE, VERSIONS
from qarm_features.feast.online_write import source_rows, streamable, write_view
from qarm_features.feast.sources import EPOCH
from qarm_features.feast.store import clear_online, load_definitions, open_store, registered_version
from qarm_features.progress import stage
from qarm_features.schema import EVENT_TIMESTAMP

log = logging.getLogger(__name__)

# The steps of a run, in order; the journal names the one about to run.
STEPS = ("sources", "switch", "clear", "apply", "online write")
POLL_S = 0.2  # how often a waiting run retries the lock
# Views whose rows carry codes of one bundle (cleared online on a version change).
CODE_VIEWS = ("qarm", "qarm_batch", "user_history")

_held = threading.local()  # lock paths this thread holds -> depth (re-entrancy)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def lock_holder(repo: str | os.PathLike) -> dict | None:
    """Who holds the repo's lock (what it wrote in the lock file), or None if it is free."""
    path = (Path(repo) / LOCK_FILE).resolve()
    if not path.exists():
        return None
    if getattr(_held, "depth", {}).get(str(path)):
        return _read_holder(path)  # this thread holds it
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(path)
    finally:
        os.close(fd)  # releases the probe's shared lock
    return None


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _holder_text(holder: dict) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('what')}, "
        f"since {holder.get('since')})"
    )


@contextlib.contextmanager
def repo_lock(repo: str | os.PathLike, what: str, *, timeout: float = 0.0) -> Iterator[dict]:
    """Hold ``<repo>/data/.qarm.lock`` for the block; yields what it wrote as holder.

    Args:
        repo: the feature repo.
        what: what this run does (shown to a run that is refused).
        timeout: seconds to wait for the holder to finish (0: refuse at once).

    Raises:
        RepoLocked: another run holds the lock (named in the message).
    """
    path = (Path(repo) / LOCK_FILE).resolve()
    depth = _held.__dict__.setdefault("depth", {})
    if depth.get(str(path)):  # this thread holds it already
        depth[str(path)] += 1
        try:
            yield _read_holder(path)
        finally:
            depth[str(path)] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # no O_TRUNC: the holder's name stays
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(path)
                    waited = f" after waiting {timeout:g} s" if timeout else ""
                    raise RepoLocked(
                        f"feature repo {Path(repo).resolve()} is locked by {_holder_text(holder)}"
                        f"{waited}: one run that writes the repo (`qarm materialize`, `qarm push`, "
                        "`status --repair`) at a time. "
                        f"Wait for it to end and run again; the lock ({path}) is released "
                        "when that process exits, however it ends",
                        holder,
                    ) from None
                time.sleep(POLL_S)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        depth[str(path)] = 1
        try:
            yield me
        finally:
            depth.pop(str(path), None)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def locked(what: str):
    """Decorator: hold the lock of the function's ``repo_path`` argument while it runs."""

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            repo = signature.bind(*args, **kwargs).arguments["repo_path"]
            with repo_lock(repo, what):
                return fn(*args, **kwargs)

        return run

    return wrap


class Journal:
    """The journal of one run (see the module doc); :meth:`step` before each step."""

    def __init__(self, repo: str | os.PathLike, record: dict):
        self.path = Path(repo) / JOURNAL_FILE
        self.record = record

    @classmethod
    def begin(cls, repo: str | os.PathLike, bundle, *, previous: str | None) -> "Journal":
        """Start the journal of a run serving ``bundle`` where ``previous`` was served."""
        record = {
            "run": "materialize",
            "version": bundle.version,
            "bundle": str(bundle.path),
            "previous": previous,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _now(),
            "step": None,
            "done": [],
        }
        return cls(repo, record)

    def step(self, name: str, **detail) -> None:
        """Record that step ``name`` starts now (``detail``: e.g. the view being written)."""
        if name not in STEPS:
            raise ValueError(f"unknown step {name!r}; steps are {STEPS}")
        rec = self.record
        if rec["step"] is not None and rec["step"] != name and rec["step"] not in rec["done"]:
            rec["done"].append(rec["step"])
        rec.update(step=name, detail=detail, updated=_now())
        write_text_atomic(self.path, json.dumps(rec, indent=2, sort_keys=True))

    def done(self) -> None:
        """The run ended: nothing is left to finish."""
        self.path.unlink(missing_ok=True)


def read_journal(repo: str | os.PathLike) -> dict | None:
    """The journal a run left (running or dead), or None.

    Raises:
        BundleError: a journal that cannot be read (the message says how to recover).
    """
    path = Path(repo) / JOURNAL_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BundleError(
            f"cannot read the run journal {path}: {exc!r}; re-run `qarm materialize` "
            "(with --promote for a new version) to write every store again, then delete it"
        ) from None


def describe(record: dict) -> str:
    """One line: which run, which step, since when (for ``qarm status``)."""
    prev = record.get("previous")
    what = f"materialize of {record['version']}" + (
        f" (replacing {prev})" if prev and prev != record["version"] else ""
    )
    detail = record.get("detail") or {}
    extra = "".join(f", {k} {v}" for k, v in detail.items() if k != "sources")
    done = ", ".join(record.get("done") or []) or "none"
    return (
        f"{what} was interrupted at step '{record['step']}'{extra} (steps done: {done}; "
        f"started {record.get('started')} by pid {record.get('pid')} on {record.get('host')})"
    )


def roll_out(
    store, repo: Path, journal: Journal, *, changed: bool, progress=None, stages=None
) -> dict:
    """The steps after the switch: clear (a version change), apply, write the online rows.

    The definitions read the repo's pointer, so the views' UDFs carry the served bundle.
    """
    stages = {} if stages is None else stages
    journal.step("clear")
    cleared = clear_online(store, (*CODE_VIEWS, "qarm_prev")) if changed else []
    journal.step("apply")
    t0 = time.perf_counter()
    objects = load_definitions(repo)
    store.apply(objects)
    declared = {o.name for o in objects}
    dropped = []
    for name in ("qarm_prev",):  # a previous version no longer kept: stop serving it
        if name not in declared and name in {v.name for v in store.list_feature_views()}:
            clear_online(store, [name])
            store.delete_feature_view(name)
            dropped.append(name)
    apply_seconds = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    kinds = ("FeatureView", "BatchFeatureView")
    views = [o.name for o in objects if type(o).__name__ in kinds]
    end = datetime.now(timezone.utc) + timedelta(seconds=1)
    last = pd.read_parquet(repo / HISTORY_FILE, columns=[EVENT_TIMESTAMP])[EVENT_TIMESTAMP].max()
    if pd.notna(last):  # user histories carry real times, possibly in the future
        end = max(end, last.to_pydatetime() + timedelta(seconds=1))
    streamed = streamable(store, views)  # one row per item: written batch by batch
    # an empty source has nothing to write (and fails Feast's Ray offline store)
    empty = [v for v in views if source_rows(store, repo, v) == 0]
    with stage("feast materialize", total=len(views), progress=progress, records=stages) as s:
        for view in views:  # one view at a time: the bar counts them
            journal.step("online write", view=view)
            if view in streamed:
                write_view(store, repo, view, start=EPOCH, end=end)
            elif view not in empty:
                store.materialize(start_date=EPOCH, end_date=end, feature_views=[view])
            s.advance(1)
    return {
        "cleared_views": cleared,
        "dropped_views": dropped,
        "apply_seconds": apply_seconds,
        "materialized_views": views,
        "streamed_views": streamed,
        "empty_views": empty,
        "materialize_seconds": round(time.perf_counter() - t0, 3),
    }


def recover(
    repo_path: str | os.PathLike, *, fs_yaml_file: str | os.PathLike | None = None
) -> str | None:
    """Finish or roll back the run a kill left half-done (its journal); None if none.

    A run killed before its switch changed nothing served: its unswitched sources are
    removed (rolled back). A run killed after it left a whole new set of sources and
    pointer: the rest is done again from them (clear on a version change, apply, every
    view's online rows), so pointer, registry, offline and online rows serve one version.
    Takes the repo's lock (``qarm status --repair`` calls it).

    Returns:
        What was done, in one line.

    Raises:
        RepoLocked: the run is not dead: it (or another) holds the lock.
    """
    repo = Path(repo_path).resolve()
    with repo_lock(repo, "qarm status --repair"):
        record = read_journal(repo)
        if record is None:
            return None
        journal = Journal(repo, record)
        served = read_pointer(repo)
        what = describe(record)
        pending = (record.get("detail") or {}).get("sources")  # the run's sources set
        if pending and Path(pending).name == pending:  # never switched in: removed
            path = repo / VERSIONS / pending
            if path.exists() and path.resolve() != (repo / CURRENT).resolve():
                shutil.rmtree(path, ignore_errors=True)
        if served is None or served.version != record["version"]:  # died before the switch
            journal.done()
            kept = "nothing" if served is None else served.version
            return f"rolled back: {what}; before its switch, so {kept} is still served"
        store = open_store(repo, fs_yaml_file)
        maybe_online = {record.get("previous"), registered_version(store)}
        changed = any(v is not None and v != record["version"] for v in maybe_online)
        roll_out(store, repo, journal, changed=changed)
        journal.done()
        return f"finished: {what}; {record['version']} is served everywhere"
