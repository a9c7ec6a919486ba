"""Promotions are serialized and repairable (issue 19, items 3 and 4).

A `qarm materialize --promote` killed (SIGKILL, in a subprocess) at each step of its
journal (sources, switch, clear, apply, the online write) is named by `qarm status` at
that step and finished or rolled back by `qarm status --repair` (the CLI, from another
working directory): pointer, registry, offline sources and online rows then serve one
version, and no response ever pairs `qarm` of one version with `user_history` of another.
Two promotes at once: the second is refused naming the first (or waits for it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.helpers import ROOT, online, subprocess_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*experimental.*:RuntimeWarning"),
]

QARM = str(Path(sys.executable).parent / "qarm")

# A promote that stops at one journal step: kill -9 itself there, or wait for a file.
PROMOTE = """
import os, signal, sys, time
from pathlib import Path
from qarm_features.feast import rollout
from qarm_features.feast.job import materialize

bundle, repo, step, view, how = sys.argv[1:6]
real = rollout.Journal.step

def step_then_stop(self, name, **detail):
    real(self, name, **detail)
    if name == step and detail.get("view", view) == view:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        Path(repo, "at-step").write_text(name)  # then wait until the test says go
        for _ in range(600):
            if Path(repo, "go").exists():
                break
            time.sleep(0.1)

rollout.Journal.step = step_then_stop
materialize(bundle, repo, promote=True)
"""


def _promote(bundle, repo, step, view="-", how="kill", *, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PROMOTE, str(bundle), str(repo), step, view, how],
        cwd=cwd, env=subprocess_env(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def _qarm(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([QARM, *args], cwd=cwd, env=subprocess_env(cwd), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def _one_version(repo, version, user_id) -> None:
    """Pointer, registry tags, offline and online rows all serve ``version``; one response
    reads `qarm` and `user_history` of that version."""
    from qarm_features.feast.serving import check_versions
    from qarm_features.feast.store import open_store

    report = check_versions(repo, raise_on_mismatch=False)
    assert report["problems"] == [] and report["pointer"] == version, report
    assert set(report["registry"].values()) == {version}, report["registry"]
    assert report["offline"] == [version] and report["online"] == [version], report
    values, statuses = online(open_store(repo), ["qarm:qarm_version",
                              "user_history:hist_qarm_version"],
                              [{"item_id": 7, "user_id": user_id}])  # fmt: skip
    assert values["qarm_version"] == [version], (values, statuses)
    assert values["hist_qarm_version"] == [version], (values, statuses)


def _never_mixed(repo, user_ids) -> None:
    """Whatever a killed run left, one response never pairs two versions."""
    from qarm_features.feast.store import open_store

    rows = [{"item_id": i, "user_id": u} for i, u in zip(range(1, 41), user_ids * 40)]
    values, _ = online(open_store(repo), ["qarm:qarm_version", "user_history:hist_qarm_version"],
                       rows)  # fmt: skip
    for a, b in zip(values["qarm_version"], values["hist_qarm_version"]):
        assert a is None or b is None or a == b, f"qarm {a} with user_history {b}"


@pytest.mark.parametrize(
    ("step", "view", "rolled"),
    [
        ("sources", "-", "back"),  # killed writing the new sources: nothing served changed
        ("switch", "-", "back"),  # killed just before data/current is switched
        ("clear", "-", "forward"),  # killed just after the switch
        ("apply", "-", "forward"),  # online rows cleared, the registry still on v1
        ("online write", "user_history", "forward"),  # some views written, others not
    ],
)
def test_a_killed_promote_is_named_and_repaired(
    make_repo, bundle_path, other_bundle_path, interactions, tmp_path, step, view, rolled
):
    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.feast.job import materialize
    from qarm_features.feast.serving import status

    a, b = load_bundle(bundle_path).version, load_bundle(other_bundle_path).version
    repo = make_repo(f"killed-{step.replace(' ', '-')}", batch_view=False)
    materialize(bundle_path, repo, interactions_df=interactions)
    users = sorted(set(interactions["user_id"]))[:3]

    proc = _promote(other_bundle_path, repo, step, view, cwd=tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -9, out  # killed at the step, not an error before it
    _never_mixed(repo, users)

    report = status(repo)
    assert not report["ok"] and report["run"]["running"] is False
    said = report["problems"][0]
    assert f"materialize of {b} (replacing {a}) was interrupted at step '{step}'" in said, said
    if view != "-":
        assert f"view {view}" in said

    proc = _qarm("status", "--repo", str(repo), "--repair", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    repaired = json.loads(proc.stdout)
    assert repaired["ok"] and repaired["run"] is None
    assert repaired["repaired"][0].startswith("rolled back" if rolled == "back" else "finished")
    _one_version(repo, a if rolled == "back" else b, users[0])
    if rolled == "back":  # the killed run's sources are gone, the served set is whole
        assert len(list((repo / "data" / "versions").iterdir())) == 1


def test_a_new_promote_after_a_killed_one_clears_what_it_left(
    make_repo, bundle_path, other_bundle_path, interactions, tmp_path
):
    """Killed in the online write (registry on v2, views half written): a plain re-run
    with v2 (no --promote: the registry says v2) is still the promotion from v1 (it
    clears every code view first) and serves v2 everywhere."""
    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.feast.job import materialize

    b = load_bundle(other_bundle_path).version
    repo = make_repo("rerun", batch_view=False)
    materialize(bundle_path, repo, interactions_df=interactions)
    proc = _promote(other_bundle_path, repo, "online write", "qarm", cwd=tmp_path)
    proc.communicate(timeout=600)
    assert proc.returncode == -9
    stats = materialize(other_bundle_path, repo)
    assert stats["promoted"] and "user_history" in stats["cleared_views"]
    _one_version(repo, b, int(interactions["user_id"].iloc[0]))


def test_two_promotes_at_once_are_serialized(
    make_repo, bundle_path, other_bundle_path, interactions, tmp_path
):
    """While one promote runs (held at its apply step): `qarm status` says it is running
    and where, a second promote and `status --repair` are refused naming its pid; a
    promote told to wait runs after it, and the repo ends on the later one's version."""
    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.errors import RepoLocked
    from qarm_features.feast.job import materialize

    a, b = load_bundle(bundle_path).version, load_bundle(other_bundle_path).version
    repo = make_repo("concurrent", batch_view=False)
    materialize(bundle_path, repo, interactions_df=interactions)
    first = _promote(other_bundle_path, repo, "apply", how="wait", cwd=tmp_path)
    try:
        for _ in range(1200):
            if (repo / "at-step").exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert (repo / "at-step").exists(), first.communicate()[0]

        with pytest.raises(RepoLocked, match=f"locked by pid {first.pid} on .*qarm materialize"):
            materialize(bundle_path, repo, promote=True)
        proc = _qarm("status", "--repo", str(repo), cwd=tmp_path)
        assert proc.returncode == 1
        said = json.loads(proc.stdout)["problems"][0]
        assert f"materialize of {b} (replacing {a}) is running: now at step 'apply'" in said
        proc = _qarm("status", "--repo", str(repo), "--repair", cwd=tmp_path)
        assert proc.returncode == 1 and f"locked by pid {first.pid}" in proc.stdout.replace(
            "\n", " "
        ), proc.stdout

        # a promote that waits: it starts once the first ends, and its version wins
        threading.Timer(2.0, lambda: (repo / "go").write_text("")).start()
        stats = materialize(bundle_path, repo, promote=True, lock_timeout=300)
    finally:
        (repo / "go").write_text("")
        out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    assert stats["previous_version"] == b and stats["promoted"]
    _one_version(repo, a, int(interactions["user_id"].iloc[0]))


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    """The holder's pid is in the refusal; a holder killed with SIGKILL frees the lock."""
    from qarm_features.errors import RepoLocked
    from qarm_features.feast.rollout import lock_holder, repo_lock

    script = (
        "import sys, time\nfrom qarm_features.feast.rollout import repo_lock\n"
        "with repo_lock(sys.argv[1], 'a test holder'):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_holder(tmp_path)["pid"] == holder.pid
        with pytest.raises(RepoLocked, match=f"pid {holder.pid} on .* \\(a test holder, since"):
            with repo_lock(tmp_path, "a second run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(tmp_path) is None
    with repo_lock(tmp_path, "after the kill") as me:
        assert me["pid"] == os.getpid()
