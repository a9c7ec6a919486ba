"""Fixtures of the Feast integration tests: real servers, real `feast` CLI, temp repos.

- ``redis_server`` / ``postgres_server`` (module scope) start a real server on a free
  loopback port in a temporary directory and stop it afterwards. Missing binaries skip the
  tests that need them (``scripts/bootstrap.sh --system`` installs redis-server), unless
  ``QARM_REQUIRE_SERVERS=1`` is set, which turns the skip into a failure.
  PostgreSQL refuses to run as root: as root, the cluster is created and run as
  ``nobody`` (any uid works; only the data directory must belong to it).
- ``make_repo`` copies ``feature_repo/`` (without its data) into a temporary directory,
  with the optional ``qarm_batch`` BatchFeatureView file unless ``batch_view=False``.
- ``run_feast`` runs the unmodified ``feast`` CLI in a subprocess; ``feast_server`` runs
  ``feast serve`` on a free loopback port and stops its whole process group.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.integration.helpers import ROOT, free_port, make_interactions, missing, stop_group

FEATURE_REPO = ROOT / "feature_repo"


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def bundle_path(tmp_path_factory) -> Path:
    """A small random bundle: 200 items (ids 1..200), raw 32-d, aligned 16-d, 3x16 RQ, k=5."""
    from qarm_features.bundle.testing import make_random_bundle

    return make_random_bundle(tmp_path_factory.mktemp("qarm-bundles") / "b0")


@pytest.fixture(scope="session")
def other_bundle_path(tmp_path_factory) -> Path:
    """Another bundle version over the same catalog, with 4 RQ levels (a rollout)."""
    from qarm_features.bundle.testing import make_random_bundle

    return make_random_bundle(tmp_path_factory.mktemp("qarm-bundles") / "b1", seed=7, n_levels=4)


@pytest.fixture(scope="session")
def interactions(bundle_path) -> pd.DataFrame:
    from qarm_features.bundle.artifact import load_bundle

    return make_interactions(load_bundle(bundle_path).item_ids)


@pytest.fixture(scope="module")
def make_repo(tmp_path_factory):
    """Factory: a fresh copy of feature_repo/ (no data/, no caches) in a temp directory."""

    def make(name: str = "repo", *, batch_view: bool = True) -> Path:
        from qarm_features.feast.views import BATCH_VIEW_FILE

        dest = tmp_path_factory.mktemp("qarm-repo") / name
        shutil.copytree(
            FEATURE_REPO, dest, ignore=shutil.ignore_patterns("data", "__pycache__", "*.pyc")
        )
        if batch_view:  # the optional BatchFeatureView, so its equality with `qarm` is tested
            text = BATCH_VIEW_FILE.format(definitions="feature_definitions", item="item")
            (dest / "qarm_batch_view.py").write_text(text)
        return dest

    return make


@pytest.fixture(autouse=True)
def _clean_qarm_env(monkeypatch):
    """No test leans on the environment: a stray QARM_BUNDLE or FEATURE_REPO_DIR_ENV_VAR
    must change nothing (the views carry their serving context), so both are set to junk."""
    monkeypatch.setenv("QARM_BUNDLE", "/nonexistent/qarm-bundle")
    monkeypatch.setenv("FEATURE_REPO_DIR_ENV_VAR", "/nonexistent/feature-repo")
    yield


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="package")
def ray_cluster():
    """A local Ray cluster of two nodes (1 CPU each, ``ray.cluster_utils.Cluster``), started
    once for this package: Feast's Ray engine (test_feast_ray.py) and the Ray pair miners
    (test_ray_pairs.py) join it. Its workers import this checkout, as a real cluster's image
    or runtime_env must provide (docs/scale.md)."""
    import ray  # a test dependency (pyproject [test]): CI runs these tests, never skips them
    from feast.infra.ray_initializer import shutdown_ray
    from ray.cluster_utils import Cluster

    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env_vars = {"PYTHONPATH": os.pathsep.join(paths), "QARM_BUNDLE": "/nonexistent/qarm-bundle"}
    node = {"num_cpus": 1, "object_store_memory": 256 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env_vars})
    try:
        yield cluster
    finally:
        shutdown_ray()  # also resets Feast's "already initialised" flag
        cluster.shutdown()


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def redis_server():
    """A real redis-server on a free loopback port; yields Feast's connection string."""
    exe = shutil.which("redis-server")
    if exe is None:
        missing("redis-server is not installed (apt-get install -y redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="qarm-redis-"))
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--protected-mode", "yes", "--daemonize", "no"],
        stdout=open(workdir / "redis.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 30
    while True:
        try:
            if client.ping():
                break
        except redis.exceptions.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log = (workdir / "redis.log").read_text()[-3000:]
            stop_group(proc)
            pytest.fail(f"redis-server did not start:\n{log}")
        time.sleep(0.1)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        client.close()
        stop_group(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _pg_bindir() -> Path | None:
    exe = shutil.which("initdb")
    if exe:
        return Path(os.path.realpath(exe)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="module")
def postgres_server():
    """A real PostgreSQL on a free loopback port (trust auth); yields a SQLAlchemy URL."""
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        missing("PostgreSQL binaries (initdb, pg_ctl) not found")
    workdir = Path(tempfile.mkdtemp(prefix="qarm-pg-"))
    datadir = workdir / "data"
    run_as: dict = {}
    if os.geteuid() == 0:
        # postgres refuses root; run the cluster as an unprivileged user that owns it
        pw = pwd.getpwnam("nobody")
        os.chmod(workdir, 0o755)
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    env = {
        "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
        "LC_ALL": "C",
        "LANG": "C",
        "HOME": str(workdir),
        "TZ": "UTC",
    }
    port = free_port()

    def pg(*args, timeout=120):
        proc = subprocess.run(
            [str(bindir / args[0]), *args[1:]],
            env=env,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            **run_as,
        )
        if proc.returncode != 0:
            raise AssertionError(f"{args[0]} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    pg("initdb", "-D", str(datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8",
       "--no-sync", "--no-instructions")
    opts = (
        f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        "-c max_connections=40 -c shared_buffers=32MB"
    )
    try:
        pg("pg_ctl", "start", "-w", "-t", "60", "-D", str(datadir), "-l",
           str(workdir / "postgres.log"), "-o", opts)
    except AssertionError as exc:
        log = workdir / "postgres.log"
        raise AssertionError(f"{exc}\n{log.read_text()[-3000:] if log.exists() else ''}") from None
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    try:
        yield url
    finally:
        with contextlib.suppress(Exception):
            pg("pg_ctl", "stop", "-D", str(datadir), "-m", "fast", "-w", "-t", "60")
        shutil.rmtree(workdir, ignore_errors=True)
