"""threads: the CPUs a process may use (affinity, cgroup quota, QARM_THREADS) and the one
place that pins torch, BLAS and faiss pools; the aligner trains inside it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qarm_features import threads
from qarm_features.errors import ConfigError


@pytest.fixture
def host(monkeypatch, tmp_path):
    """A 16-CPU affinity mask and an empty cgroup root; tests write the quota files."""
    monkeypatch.delenv(threads.ENV_THREADS, raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(threads, "_CGROUP", tmp_path)
    return tmp_path


def test_affinity_bounds_the_count_without_a_quota(host):
    assert threads.usable_cpus() == 16
    (host / "cpu.max").write_text("max 100000\n")
    assert threads.usable_cpus() == 16


@pytest.mark.parametrize(("quota", "want"), [("150000 100000", 2), ("200000 100000", 2),
                                             ("50000 100000", 1), ("400000 50000", 8)])  # fmt: skip
def test_cgroup_v2_quota_caps_the_affinity(host, quota, want):
    (host / "cpu.max").write_text(quota + "\n")
    assert threads.usable_cpus() == want


def test_cgroup_v1_quota_caps_the_affinity(host):
    (host / "cpu").mkdir()
    (host / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (host / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.usable_cpus() == 3
    (host / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no quota"
    assert threads.usable_cpus() == 16


def test_a_quota_never_raises_the_affinity(host, monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {3})
    (host / "cpu.max").write_text("800000 100000\n")
    assert threads.usable_cpus() == 1


def test_env_overrides_and_bad_values_name_the_variable(host, monkeypatch):
    (host / "cpu.max").write_text("150000 100000\n")
    monkeypatch.setenv(threads.ENV_THREADS, "5")
    assert threads.usable_cpus() == 5
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(threads.ENV_THREADS, bad)
        with pytest.raises(ConfigError, match="QARM_THREADS"):
            threads.usable_cpus()


def test_limited_sets_every_pool_and_restores_it():
    import faiss
    import torch
    from threadpoolctl import threadpool_info

    def blas():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    before = (torch.get_num_threads(), faiss.omp_get_max_threads(), blas())
    with threads.limited(3) as n:
        assert n == 3
        assert (torch.get_num_threads(), faiss.omp_get_max_threads(), blas()) == (3, 3, {3})
    assert (torch.get_num_threads(), faiss.omp_get_max_threads(), blas()) == before
    with threads.limited(2, torch_threads=1):  # faiss may share torch's OpenMP pool
        assert torch.get_num_threads() == 1 and blas() == {2}
    assert (torch.get_num_threads(), faiss.omp_get_max_threads(), blas()) == before


def test_batch_workers_follow_the_usable_cpus(host, monkeypatch):
    """The row-block workers of the batch coders: the quota, not the host's cores."""
    from threadpoolctl import threadpool_limits

    from qarm_features.codes.rescore import default_workers

    (host / "cpu.max").write_text("100000 100000\n")  # one CPU of a 16-CPU mask
    with threadpool_limits(4, user_api="blas"):
        assert default_workers() == 1
        (host / "cpu.max").write_text("300000 100000\n")
        assert default_workers() == 3


# ----------------------------------------------------------------------------- the aligner
def _pairs(n=300, seed=0):
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((n, 24)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64) + 10
    nbr = (np.arange(n) + 1) % n
    return raw, ids, pd.DataFrame({"trigger_id": ids, "target_id": ids[nbr]})


def test_aligner_trains_at_config_threads_and_restores_the_pools(monkeypatch):
    import torch

    import qarm_features.align.aligner as align_mod
    from qarm_features.config import AlignerConfig

    seen = []
    original = align_mod._train_epoch

    def spy(*args, **kw):
        seen.append(torch.get_num_threads())
        return original(*args, **kw)

    monkeypatch.setattr(align_mod, "_train_epoch", spy)
    monkeypatch.setenv(threads.ENV_THREADS, "2")
    raw, ids, pairs = _pairs()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = AlignerConfig(out_dim=8, batch_size=32, max_epochs=2)
        align_mod.ItemAligner(cfg).fit(raw, ids, pairs, val_items=[])
        assert seen == [1, 1] and torch.get_num_threads() == 2
        cfg0 = cfg.model_copy(update={"threads": 0})  # 0: the usable CPUs (QARM_THREADS)
        align_mod.ItemAligner(cfg0).fit(raw, ids, pairs, val_items=[])
        assert seen[2:] == [2, 2]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("validate", [True, False])
def test_aligner_stops_at_the_time_budget(monkeypatch, validate):
    import qarm_features.align.aligner as align_mod
    from qarm_features.config import AlignerConfig

    clock = {"t": 0.0}

    def fake_clock():  # each read advances 1 s: the budget runs out after a few steps
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(align_mod.time, "perf_counter", fake_clock)
    raw, ids, pairs = _pairs()
    cfg = AlignerConfig(out_dim=8, batch_size=16, max_epochs=50, patience=50, max_seconds=6)
    h = align_mod.ItemAligner(cfg).fit(raw, ids, pairs, val_items=None if validate else []).history_
    assert h["stopped_by"] == "max_seconds" and h["epochs_run"] == 1
    n_train = h["n_train_pairs"]
    assert len(h["loss"]) == 1 and 0 < h["pairs_per_s"][0]
    if validate:
        assert len(h["val_pair_auc"]) == 2 and h["best_epoch"] in (0, 1)
    h = (
        align_mod.ItemAligner(cfg.model_copy(update={"max_seconds": None, "max_epochs": 2}))
        .fit(raw, ids, pairs, val_items=[])
        .history_
    )
    assert h["stopped_by"] == "max_epochs" and h["epochs_run"] == 2 and n_train > 0
