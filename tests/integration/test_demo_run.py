"""`make run`'s job (`qarm run`) on a copy of the demo repo, from another working
directory, then the README's "Reading QARM features from Feast (the demo repo)" block as
written. The block names `emb` (a cold item's content embedding) and `events` (ranker
training events); the test gives it both."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.integration.helpers import ROOT, subprocess_env

QARM = Path(sys.executable).parent / "qarm"
pytestmark = pytest.mark.slow


def _demo_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Reading QARM features from Feast (the demo repo)", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_qarm_run_then_the_readmes_demo_block(tmp_path, monkeypatch):
    repo = tmp_path / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "artifacts"))
    cache = os.environ.get("QARM_CACHE") or str(Path.home() / ".cache" / "qarm")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [str(QARM), "run", "--repo", str(repo)],
        cwd=elsewhere,
        env=subprocess_env(tmp_path, QARM_CACHE=cache),
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    said = " ".join(proc.stdout.split())
    assert "get_online_features" in said and "qarm_error" in said

    from qarm_features.bundle.encode import get_bundle
    from qarm_features.feast.context import read_pointer

    bundle = get_bundle(read_pointer(repo).bundle)
    assert bundle.n_levels == 4  # the default config: 4 RQ levels
    emb = bundle.raw_emb[0] + np.float32(0.01)
    events = pd.DataFrame(
        {
            "user_id": [1, 2, 3],
            "item_id": [50, 172, 1],
            "event_timestamp": pd.to_datetime(["1998-03-01", "1998-03-02", "1998-04-01"], utc=True),
        }
    )
    monkeypatch.chdir(tmp_path)  # the block opens FeatureStore(repo_path="feature_repo")
    namespace: dict = {"emb": emb, "events": events}
    exec(compile(_demo_block(), "README.md", "exec"), namespace)  # as written: no error
    store = namespace["store"]
    got = store.get_online_features(
        features=["qarm:rq_code_l4", "qarm:qarm_version"], entity_rows=[{"item_id": 50}]
    ).to_dict()
    assert got["qarm_version"] == [bundle.version] and got["rq_code_l4"][0] >= 0
