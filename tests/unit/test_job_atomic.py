"""The offline sources of a repo switch as one set: a crash mid-write (a full disk, here
injected into the writer) leaves the previous bundle's files and pointer served, whole."""

from __future__ import annotations

import pandas as pd
import pytest

from qarm_features.bundle.testing import make_random_bundle
from qarm_features.feast import job, sources
from qarm_features.feast.context import read_pointer


def _served(repo):
    codes = pd.read_parquet(repo / sources.CODES_FILE, columns=["qarm_version"])
    hist = pd.read_parquet(repo / sources.HISTORY_FILE)
    return read_pointer(repo).version, set(codes["qarm_version"]), len(hist)


def test_a_failed_write_leaves_the_previous_set_served(tmp_path, monkeypatch, random_bundle):
    repo = tmp_path / "repo"
    repo.mkdir()
    events = pd.DataFrame({"user_id": [1, 1], "item_id": [3, 4], "rating": [5.0, 4.0],
                           "timestamp": [100, 200]})  # fmt: skip
    job.prepare_sources(random_bundle, repo, interactions_df=events)
    before = _served(repo)
    assert before[1] == {before[0]} and before[2] == 2

    other = make_random_bundle(tmp_path / "other", seed=5, n_levels=4)
    real = sources.write_parquet

    def full_disk(df, path, schema=None):
        if path.name == "user_history.parquet":
            raise OSError(28, "No space left on device")
        return real(df, path, schema)

    monkeypatch.setattr(job, "write_parquet", full_disk)
    with pytest.raises(OSError, match="No space left"):
        job.prepare_sources(other, repo, interactions_df=events)
    assert _served(repo) == before  # codes, history and pointer: all of the old version

    monkeypatch.setattr(job, "write_parquet", real)
    job.prepare_sources(other, repo, interactions_df=events)
    after = _served(repo)
    assert after[0] != before[0] and after[1] == {after[0]}
    assert (repo / sources.CURRENT).is_symlink()
    assert len(list((repo / sources.VERSIONS).iterdir())) <= sources.KEEP_VERSIONS


def test_written_files_follow_the_umask(tmp_path, random_bundle):
    """tempfile makes 0600/0700 whatever the umask: a separate service account could not
    read bundles or sources; they now get the modes the umask gives."""
    import os
    import stat

    from qarm_features.bundle.testing import make_random_bundle

    old = os.umask(0o022)
    try:
        b = make_random_bundle(tmp_path / "b", seed=2)
        repo = tmp_path / "repo"
        repo.mkdir()
        job.prepare_sources(random_bundle, repo)
    finally:
        os.umask(old)
    for path in [b, b / "manifest.json", repo / sources.CODES_FILE, repo / "data/current/qarm_bundle.json"]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
