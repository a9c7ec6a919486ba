"""`qarm evaluate --repo R --quick` on repos made by `qarm init`, from another directory.

Two tiny shops (generated data, well under a minute each): int item ids with a 0/1 label
column, and string item ids with implicit clicks (sampled negatives). The report must
have every variant, warm / cold / new items, and paired differences with intervals, for
our ranker and for deepctr-torch's DeepFM.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.integration.helpers import subprocess_env

pytestmark = [pytest.mark.slow]

QARM = Path(sys.executable).parent / "qarm"
WORDS = [  # the title words of 6 taste groups, two per pair
    ("red wool scarf coat hat", "blue denim jeans jacket"),
    ("green silk dress skirt", "black leather boot belt bag"),
    ("white cotton shirt sock", "linen canvas sneaker"),
]
SMALL_BUILD = """\
build:
  pairs: {mf_epochs: 3, mf_dim: 8, swing_top_k: 10}
  aligner: {out_dim: 16, max_epochs: 4, batch_size: 128}
  rq: {n_levels: 2, n_codes: 8}
  vq: {k: 5}
"""


def qarm(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(QARM), *args], cwd=cwd, env=subprocess_env(home), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(
            f"qarm {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def _shop_data(repo: Path, *, string_ids: bool, label: bool) -> None:
    """240 products in 6 taste groups (titles carry the group); 400 visitors who come back
    over 30 days and click within their group; the last 15% of the products appear only
    in the last 5 days (new items on the test side)."""
    rng = np.random.default_rng(1)
    n = 240
    group = rng.integers(0, 6, n)
    titles = [" ".join(rng.choice(WORDS[g // 2][g % 2].split(), 3)) for g in group]
    ids = [f"P-{i:04d}" for i in range(n)] if string_ids else list(range(10, 10 + n))
    pd.DataFrame(
        {"item_id": ids, "title": titles, "description": [f"a {t} for every day" for t in titles]}
    ).to_parquet(repo / "data" / "items.parquet")
    late = np.arange(n) >= n - 36
    rows = []
    for v in range(400):
        g = rng.integers(0, 6)
        for t in np.sort(rng.integers(0, 30 * 86400, 15)):
            pool = np.flatnonzero((group == g) & (~late | (t > 25 * 86400)))
            i = int(rng.choice(pool))
            clicked = int(rng.random() < 0.6) if label else 1
            rows.append((f"u{v}" if string_ids else v, ids[i], 1_700_000_000 + int(t), clicked))
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "clicked"])
    if not label:
        events = events.drop(columns=["clicked"])
    events.to_parquet(repo / "data" / "events.parquet")


def _repo(root: Path, name: str, *, string_ids: bool, label: bool) -> Path:
    init = ["init", name] + (["--string-ids"] if string_ids else [])
    qarm(*init, cwd=root, home=root)
    repo = root / name
    _shop_data(repo, string_ids=string_ids, label=label)
    yaml = (repo / "qarm.yaml").read_text()
    if label:
        yaml = yaml.replace("  # label: clicked ", "  label: clicked   ")
    (repo / "qarm.yaml").write_text(yaml.replace("build: {}", SMALL_BUILD.strip()))
    return repo


def _check_report(out: Path, name: str) -> dict:
    report = json.loads((out / f"{name}.json").read_text())
    md = (out / f"{name}.md").read_text()
    assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert set(report["results"]) == {"A", "B", "D", "B+D"}
    counts = report["counts"]
    for subset in ("warm", "cold", "new"):
        assert counts[subset]["mean"] > 0, (subset, counts)
        for v in ("A", "B", "D", "B+D"):
            assert 0.0 <= report["results"][v][subset]["auc"]["mean"] <= 1.0
    for pair in ("B - A", "D - A", "B+D - A", "D - B", "B+D - B"):
        for subset in ("warm", "cold", "new"):
            for metric in ("auc", "gauc"):
                cell = report["paired"][pair][subset][metric]
                lo, hi = cell["ci"]
                assert lo <= cell["mean"] <= hi and lo < hi, (pair, subset, metric, cell)
                assert cell["ci_method"] == "bootstrap over users"  # one --quick seed
    assert "## Paired differences" in md and "**new rows**" in md and "**cold rows**" in md
    # the second ranker, one the project did not write (issue 17): every variant, warm and
    # cold, paired with intervals, its own section in the report
    fm = report["other_rankers"]["deepfm"]
    assert set(fm["results"]) == {"A", "B", "D", "B+D"}
    for subset in ("warm", "cold"):
        for v in ("A", "B", "D", "B+D"):
            assert 0.0 <= fm["results"][v][subset]["auc"]["mean"] <= 1.0
        for pair in ("D - A", "B+D - B"):
            lo, hi = fm["paired"][pair][subset]["auc"]["ci"]
            assert lo <= fm["paired"][pair][subset]["auc"]["mean"] <= hi
    assert f"## {fm['title']}" in md and fm["title"].startswith("DeepFM (deepctr-torch ")
    assert md.count("**cold rows**") == 2 and md.count("### Aims") == 1
    assert f"`qarm evaluate --repo {name} --quick`" in md
    return report


def test_evaluate_an_int_id_repo_with_labels(tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    _repo(root, "shop", string_ids=False, label=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = qarm("evaluate", "--repo", str(root / "shop"), "--quick", "--out-dir", "out",
                cwd=elsewhere, home=root)  # fmt: skip
    report = _check_report(elsewhere / "out", "shop")
    assert report["data"]["id_kind"] == "int64" and report["data"]["negatives_per_positive"] == 0
    assert report["data"]["label"] == "clicked = 1"
    # progress per seed and variant, plain lines without a terminal
    for step in ("seed 0: split + item spaces", "seed 0: ranker A", "seed 0: ranker B+D",
                 "seed 0: deepfm A", "seed 0: deepfm B+D"):  # fmt: skip
        assert step in proc.stdout


def test_evaluate_a_string_id_repo_with_implicit_clicks(tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    _repo(root, "boutique", string_ids=True, label=False)
    proc = qarm("evaluate", "--repo", "work/boutique", "--quick", "--out-dir", "reports",
                cwd=tmp_path, home=root)  # fmt: skip
    report = _check_report(tmp_path / "reports", "boutique")
    assert report["data"]["id_kind"] != "int64"
    assert report["data"]["negatives_per_positive"] == 4
    md = (tmp_path / "reports" / "boutique.md").read_text()
    assert "4 sampled negatives" in md and "popularity-matched" in md
    assert "report written to" in proc.stdout
