"""The repo lock and the run journal (qarm_features/feast/rollout.py), without Feast: one
holder at a time (re-entrant in its thread, refused elsewhere naming it, waited for on
request), and a journal that names the step a run was at."""

from __future__ import annotations

import json
import os
import threading
import time
from types import SimpleNamespace

import pytest

from qarm_features.errors import RepoLocked
from qarm_features.feast.rollout import (
    JOURNAL_FILE,
    Journal,
    describe,
    lock_holder,
    read_journal,
    repo_lock,
)


def _in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out


def test_one_holder_reentrant_in_its_thread_refused_elsewhere(tmp_path):
    assert lock_holder(tmp_path) is None
    with repo_lock(tmp_path, "qarm materialize qarm-b") as me:
        with repo_lock(tmp_path, "qarm apply"):  # the same thread: re-entrant
            assert lock_holder(tmp_path) == me
        out = _in_thread(lambda: repo_lock(tmp_path, "a second run").__enter__())
        assert isinstance(out.get("error"), RepoLocked), out
        assert f"locked by pid {os.getpid()} on " in str(out["error"])
        assert "(qarm materialize qarm-b, since " in str(out["error"])
        assert out["error"].holder == me
    assert lock_holder(tmp_path) is None


def test_a_run_told_to_wait_runs_after_the_holder(tmp_path):
    order = []
    held = threading.Event()

    def first():
        with repo_lock(tmp_path, "first"):
            held.set()
            time.sleep(0.6)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    held.wait()
    with repo_lock(tmp_path, "second", timeout=30):
        order.append("second holds")
    t.join()
    assert order == ["first done", "second holds"]


def test_the_journal_names_the_step_and_what_was_done(tmp_path):
    bundle = SimpleNamespace(version="qarm-b", path=tmp_path / "b")
    journal = Journal.begin(tmp_path, bundle, previous="qarm-a")
    assert read_journal(tmp_path) is None  # nothing written before the first step
    journal.step("sources", sources="123-qarm-b-x")
    journal.step("switch", sources="123-qarm-b-x")
    journal.step("clear")
    journal.step("apply")
    journal.step("online write", view="qarm")
    journal.step("online write", view="user_history")
    record = read_journal(tmp_path)
    assert record == json.loads((tmp_path / JOURNAL_FILE).read_text())
    assert record["done"] == ["sources", "switch", "clear", "apply"]
    said = describe(record)
    assert said.startswith(
        "materialize of qarm-b (replacing qarm-a) was interrupted at step 'online write', "
        "view user_history (steps done: sources, switch, clear, apply; started "
    )
    assert not list((tmp_path / "data").glob(".*.tmp"))  # every rewrite atomic
    with pytest.raises(ValueError, match="unknown step"):
        journal.step("teleport")
    journal.done()
    assert read_journal(tmp_path) is None
