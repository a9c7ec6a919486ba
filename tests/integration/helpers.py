"""Expectations and readers shared by the Feast integration tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
FEAST_BIN = Path(sys.executable).parent / "feast"
NOT_FOUND = "NOT_FOUND"
PRESENT = "PRESENT"


def qarm_names(n_levels: int) -> list[str]:
    return (
        ["aligned_emb"]
        + [f"rq_code_l{i}" for i in range(1, n_levels + 1)]
        + ["vq_codes", "qarm_version"]
    )


def refs(view: str, names: list[str]) -> list[str]:
    return [f"{view}:{n}" for n in names]


def expected_rows(bundle_path, item_ids, raw_emb) -> dict[int, dict]:
    """What the batch path stores for these items: item_id -> {feature: value}."""
    from qarm_features.bundle.encode import encode_frame, get_bundle

    bundle = get_bundle(bundle_path)
    df = pd.DataFrame({"item_id": np.asarray(item_ids, np.int64), "raw_emb": list(raw_emb)})
    out = encode_frame(bundle, df)
    rows = {}
    for rec in out.to_dict("records"):
        rec["aligned_emb"] = np.asarray(rec["aligned_emb"], np.float32)
        rec["vq_codes"] = np.asarray(rec["vq_codes"], np.int64).tolist()
        rows[int(rec.pop("item_id"))] = rec
    return rows


def catalog_expectations(bundle_path) -> dict[int, dict]:
    from qarm_features.bundle.encode import get_bundle

    b = get_bundle(bundle_path)
    return expected_rows(bundle_path, b.item_ids, b.raw_emb)


def online(store, features, entity_rows, **kw) -> tuple[dict, dict]:
    """(values by feature name, statuses by feature name) of one online read."""
    from feast.protos.feast.serving.ServingService_pb2 import FieldStatus

    resp = store.get_online_features(features=features, entity_rows=entity_rows, **kw)
    names = list(resp.proto.metadata.feature_names.val)
    statuses = {
        name: [FieldStatus.Name(s) for s in resp.proto.results[j].statuses]
        for j, name in enumerate(names)
    }
    return resp.to_dict(), statuses


def assert_row_equal(got: dict, want: dict, names: list[str], where: str = "") -> None:
    """Bit-for-bit equality of one QARM row (float32 embeddings compared exactly)."""
    for name in names:
        g, w = got[name], want[name]
        if name == "aligned_emb":
            g = np.asarray(g, np.float32)
            assert g.dtype == w.dtype and g.shape == w.shape, f"{where} {name}: {g.shape}"
            assert np.array_equal(g.view(np.uint32), w.view(np.uint32)), f"{where} {name} differs"
        elif name == "vq_codes":
            assert [int(x) for x in g] == w, f"{where} {name}: {g} != {w}"
        else:
            assert g == w, f"{where} {name}: {g!r} != {w!r}"


def row(values: dict, i: int, names: list[str]) -> dict:
    return {n: values[n][i] for n in names}


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing(what: str) -> None:
    if os.environ.get("QARM_REQUIRE_SERVERS"):
        pytest.fail(f"{what} (QARM_REQUIRE_SERVERS is set, so this is an error)")
    pytest.skip(what)


def subprocess_env(home: Path, **extra: str) -> dict:
    """Environment of a feast subprocess: the repo importable, its own HOME, no stray bundle."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths + [str(ROOT)])
    env["HOME"] = str(home)  # gunicorn keeps a control socket under $HOME
    env["QARM_BUNDLE"] = "/nonexistent/qarm-bundle"  # must change nothing
    env.pop("FEATURE_REPO_DIR_ENV_VAR", None)  # `feast` reads it as the repo: not ours to set
    env.setdefault("QARM_SERVING_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


def run_feast(args: list[str], repo: Path, *, env: dict | None = None, timeout: int = 180):
    """Run ``feast ARGS`` in ``repo``; raise with its output if it fails."""
    if not FEAST_BIN.exists():
        pytest.fail(f"feast CLI not found at {FEAST_BIN}")
    env = env or subprocess_env(repo.parent)
    proc = subprocess.run(
        [str(FEAST_BIN), *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"feast {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def http_json(url: str, payload: dict | None = None, *, timeout: float = 30) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def stop_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def http_server(command: list[str], *, port: int, cwd: Path, env: dict, log_path: Path,
                startup_s: float = 120, name: str = "server"):  # fmt: skip
    """Run an HTTP server command in its own process group; yield its base URL once it
    answers ``/health`` (any HTTP status: a 503 is an answer); stop the whole group."""
    log = open(log_path, "w")
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: gunicorn master + workers
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited:\n{log_path.read_text()[-6000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except urllib.error.HTTPError:  # answering
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{name} not answering after {startup_s}s:\n" + log_path.read_text()[-6000:]
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        stop_group(proc)
        log.close()


@contextlib.contextmanager
def feast_server(
    repo: Path, *, env: dict | None = None, extra_args=(), feast_args=(), startup_s: float = 120
):
    """``feast [feast_args] serve [extra_args]`` on a free loopback port; yields its base URL."""
    port = free_port()
    command = [str(FEAST_BIN), *feast_args, "serve", "-h", "127.0.0.1", "-p", str(port),
               "--max-requests", "0", "--no-access-log", *extra_args]  # fmt: skip
    with http_server(command, port=port, cwd=repo, env=env or subprocess_env(repo.parent),
                     log_path=repo.parent / f"feast-serve-{port}.log", startup_s=startup_s,
                     name="feast serve") as url:  # fmt: skip
        yield url



def make_interactions(item_ids: np.ndarray, *, n_users: int = 30, per_user: int = 12, seed=0):
    """Seeded interactions in 1998 (unix s), ratings 1..5, with ties on timestamps."""
    rng = np.random.default_rng(seed)
    rows = []
    base = 883_000_000  # 1997-12-25
    for u in range(1, n_users + 1):
        items = rng.choice(item_ids, size=per_user, replace=False)
        ts = base + np.sort(rng.integers(0, 3_000_000, size=per_user))
        ts[1] = ts[0]  # two events at the same second
        for i, t in zip(items, ts):
            rows.append((u, int(i), float(rng.integers(1, 6)), int(t)))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])




# --------------------------------------------------------------------------- scenarios


def check_history_point_in_time(store, interactions, expected=None) -> None:
    """``user_history`` in ``get_historical_features``: a row at an event's own time sees
    only earlier positives, one 2 s later sees the event too (the busiest user's last
    positive). With ``expected`` (item id -> row, :func:`catalog_expectations`), the
    history's level-1 codes are checked too."""
    pos = interactions[interactions["rating"] >= 4.0].sort_values("timestamp", kind="stable")
    user = int(pos["user_id"].value_counts().index[0])
    events = pos[pos["user_id"] == user]
    t_event = int(events["timestamp"].iloc[-1])
    probes = [t_event, t_event + 2]
    entity_df = pd.DataFrame(
        {"user_id": [user, user], "event_timestamp": pd.to_datetime(probes, unit="s", utc=True)}
    )
    features = ["user_history:hist_item_ids"]
    if expected is not None:
        features.append("user_history:hist_rq_code_l1")
    got = store.get_historical_features(entity_df=entity_df, features=features).to_df()
    assert len(got) == 2
    for t, rec in zip(probes, got.sort_values("event_timestamp").to_dict("records")):
        seen = events[events["timestamp"] < t]["item_id"].tolist()[::-1][:20]
        assert [int(x) for x in rec["hist_item_ids"]] == seen, f"history at {t}"
        if expected is not None:
            assert [int(x) for x in rec["hist_rq_code_l1"]] == [
                expected[i]["rq_code_l1"] for i in seen
            ]


def check_read_path(store, bundle_path, n_levels: int = 3) -> None:
    """Warm reads, unknown ids, the BatchFeatureView, cold items and the feature service."""
    from qarm_features.bundle.encode import get_bundle

    names = qarm_names(n_levels)
    expected = catalog_expectations(bundle_path)
    ids = [1, 42, 200, 31_337]
    values, statuses = online(store, refs("qarm", names), [{"item_id": i} for i in ids])
    for i, item in enumerate(ids[:3]):
        assert_row_equal(row(values, i, names), expected[item], names, f"item {item}")
    assert all(values[n][3] is None and statuses[n][3] == NOT_FOUND for n in names)

    values, _ = online(store, refs("qarm_batch", names), [{"item_id": i} for i in ids[:3]])
    for i, item in enumerate(ids[:3]):
        assert_row_equal(row(values, i, names), expected[item], names, f"qarm_batch {item}")

    b = get_bundle(bundle_path)
    new = np.random.default_rng(99).standard_normal((2, b.raw_dim)).astype(np.float32)
    want = expected_rows(bundle_path, [7001, 7002], new)
    rows = [{"raw_emb": new[0].tolist()}, {"raw_emb": [0.0] * 3}, {"raw_emb": new[1].tolist()}]
    values, _ = online(store, refs("qarm_cold", names + ["qarm_error"]), rows)
    assert_row_equal(row(values, 0, names), want[7001], names, "cold 0")
    assert_row_equal(row(values, 2, names), want[7002], names, "cold 2")
    assert values["qarm_error"][1].startswith("raw_emb has 3 values")

    service = store.get_feature_service("qarm_ranker")
    values, statuses = online(store, service, [{"item_id": 5, "user_id": 1}])
    assert values["qarm_version"] == [b.version]
    assert values["hist_qarm_version"] == [b.version]
    assert values["hist_len"][0] == len(values["hist_item_ids"][0])
    assert np.array_equal(np.asarray(values["raw_emb"][0], np.float32), b.raw_emb[4])


def check_rollout(repo, fs_yaml_file, bundle_path, other_bundle_path, interactions) -> None:
    """Push, then promote another bundle (4 RQ levels): every online/offline row moves."""
    from qarm_features.bundle.encode import get_bundle
    from qarm_features.errors import BundleVersionMismatch
    from qarm_features.feast.job import materialize, open_store, push_items
    from qarm_features.feast.serving import check_versions

    old, new = get_bundle(bundle_path), get_bundle(other_bundle_path)
    pushed = np.random.default_rng(5).standard_normal((1, old.raw_dim)).astype(np.float32)
    push_items(repo, pd.DataFrame({"item_id": [8001], "raw_emb": list(pushed)}),
               fs_yaml_file=fs_yaml_file)

    with pytest.raises(BundleVersionMismatch):
        materialize(other_bundle_path, repo, fs_yaml_file=fs_yaml_file)
    stats = materialize(other_bundle_path, repo, promote=True, fs_yaml_file=fs_yaml_file)
    assert stats["promoted"] and stats["previous_version"] == old.version
    assert stats["n_pushed_items_kept"] == 1 and stats["n_items"] == len(new.item_ids) + 1

    store = open_store(repo, fs_yaml_file)
    names = qarm_names(new.n_levels)
    assert [f.name for f in store.get_feature_view("qarm").features] == names
    expected = catalog_expectations(other_bundle_path)
    expected.update(expected_rows(other_bundle_path, [8001], pushed))
    ids = sorted(expected)
    values, _ = online(store, refs("qarm", names), [{"item_id": i} for i in ids])
    for i, item in enumerate(ids):
        assert_row_equal(row(values, i, names), expected[item], names, f"promoted {item}")
    hist, _ = online(store, ["user_history:hist_qarm_version", "user_history:hist_item_ids",
                             "user_history:hist_rq_code_l4"], [{"user_id": 1}])
    assert hist["hist_qarm_version"] == [new.version]
    assert [int(c) for c in hist["hist_rq_code_l4"][0]] == [
        expected[int(i)]["rq_code_l4"] for i in hist["hist_item_ids"][0]
    ]
    report = check_versions(repo, fs_yaml_file=fs_yaml_file)
    assert report["ok"] and report["offline"] == [new.version], report

    # training rows of any age get the promoted codes; one version offline
    entity_df = pd.DataFrame(
        {"item_id": [1, 8001], "event_timestamp": pd.to_datetime(["1997-06-01"] * 2, utc=True)}
    )
    got = store.get_historical_features(
        entity_df=entity_df, features=["qarm:rq_code_l4", "qarm:qarm_version"]
    ).to_df().set_index("item_id")
    assert set(got["qarm_version"]) == {new.version}
    assert int(got.loc[1, "rq_code_l4"]) == expected[1]["rq_code_l4"]

    # same version, edited content: the newer row wins online (stamps increase)
    edited = pd.DataFrame({"item_id": new.item_ids, "raw_emb": list(new.raw_emb)})
    edited.at[0, "raw_emb"] = -new.raw_emb[0]
    materialize(other_bundle_path, repo, edited, fs_yaml_file=fs_yaml_file)
    want = expected_rows(other_bundle_path, [int(new.item_ids[0])], [-new.raw_emb[0]])
    values, _ = online(store, refs("qarm", names), [{"item_id": int(new.item_ids[0])}])
    assert_row_equal(row(values, 0, names), want[int(new.item_ids[0])], names, "edited item")
