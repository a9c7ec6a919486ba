"""The build pipeline and the `qarm` CLI on a small synthetic world (no text encoder)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qarm_features.app.cli import app
from qarm_features.build.bundles import build_bundle
from qarm_features.bundle.artifact import load_bundle
from qarm_features.config import AlignerConfig, BuildConfig, PairsConfig, RQConfig, VQConfig
from qarm_features.datasets.synthetic import SyntheticWorld
from qarm_features.errors import InputError

runner = CliRunner()


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(n_items=300, n_users=400, content_dim=32, nuisance=3.0, seed=0)


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    torch.set_num_threads(1)
    cfg = BuildConfig(
        dataset="synthetic",
        pairs=PairsConfig(mf_epochs=10, mf_dim=16),
        aligner=AlignerConfig(out_dim=16, hidden=32, lr=1e-2, batch_size=64, max_epochs=15),
        rq=RQConfig(n_levels=2, n_codes=8),
        vq=VQConfig(k=5),
    )
    out = tmp_path_factory.mktemp("build") / "bundle"
    return build_bundle(
        out,
        item_ids=world.item_ids,
        raw_emb=world.content,
        interactions=world.interactions(n_per_user=30),
        config=cfg,
        test_item_fraction=0.2,
    )


def test_build_writes_a_verified_bundle_and_alignment_helps(built):
    b = load_bundle(built.path)
    assert b.version == built.version
    assert b.n_levels == 2 and b.vq_k == 5 and b.aligned_dim == 16
    held = built.metrics["heldout"]
    assert held["aligned"]["n_pairs"] == held["raw"]["n_pairs"] > 0
    # items unseen by the aligner: the aligned space ranks their true pairs higher
    assert held["aligned"]["pair_auc"] > held["raw"]["pair_auc"]
    assert set(built.metrics["codes"]) == {"aligned", "raw"}
    assert b.metrics["heldout"]["aligned"]["pair_auc"] == pytest.approx(held["aligned"]["pair_auc"])
    # the alignment check compares the same two numbers, with an interval, and says better
    check = b.metrics["alignment_check"]
    assert check["raw"] == pytest.approx(held["raw"]["pair_auc"])
    assert check["aligned"] == pytest.approx(held["aligned"]["pair_auc"])
    assert check["ci"][0] > 0 and check["verdict"] == "better"
    assert check["ci"][0] <= check["delta"] <= check["ci"][1]


def test_build_refuses_bad_input(world, tmp_path):
    inter = world.interactions(n_per_user=5)
    with pytest.raises(InputError, match="not in the catalog"):
        build_bundle(tmp_path / "b", item_ids=world.item_ids[:-10], raw_emb=world.content[:-10],
                     interactions=inter)
    with pytest.raises(InputError, match="missing column"):
        build_bundle(tmp_path / "b", item_ids=world.item_ids, raw_emb=world.content,
                     interactions=inter.drop(columns=["rating"]))
    bad = world.content.copy()
    bad[3, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        build_bundle(tmp_path / "b", item_ids=world.item_ids, raw_emb=bad, interactions=inter)
    with pytest.raises(InputError, match="duplicate"):
        ids = world.item_ids.copy()
        ids[1] = ids[0]
        build_bundle(tmp_path / "b", item_ids=ids, raw_emb=world.content, interactions=inter)
    assert not (tmp_path / "b").exists()


def test_inspect_ok_and_bad_bundle_exit_codes(built, tmp_path):
    res = runner.invoke(app, ["inspect", str(built.path)])
    assert res.exit_code == 0, res.output
    assert built.version in res.output and "held-out pairs" in res.output
    assert "alignment check: better" in " ".join(res.output.split())
    res = runner.invoke(app, ["inspect", str(built.path), "--json"])
    assert res.exit_code == 0 and '"format": "qarm-bundle"' in res.output
    bad = tmp_path / "bad"
    shutil.copytree(built.path, bad)
    p = bad / "rq_codebooks.npy"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))
    res = runner.invoke(app, ["inspect", str(bad)])
    assert res.exit_code == 1 and "sha256" in res.output
    res = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert res.exit_code == 1


def test_build_reads_the_repos_qarm_yaml_only(tmp_path):
    """One route: `qarm build` builds a repo's qarm.yaml (the demo repo by default); there
    is no JSON config or --set route beside it."""
    res = runner.invoke(app, ["build", "--repo", str(tmp_path)])
    assert res.exit_code == 1 and "qarm.yaml does not exist" in " ".join(res.output.split())
    res = runner.invoke(app, ["build", "--repo", str(tmp_path), "--config", "c.json"])
    assert res.exit_code == 2 and "--config" in res.output


@pytest.mark.parametrize(
    "ids, cfg, match",
    [
        (np.arange(-1, 299), BuildConfig(), "must be >= 0: -1 would be confused"),
        (np.arange(40), BuildConfig(rq=RQConfig(n_codes=64)), "rq.n_codes=64 .* the catalog has 40"),
        (np.arange(40), BuildConfig(rq=RQConfig(n_codes=8), vq=VQConfig(k=40)), "vq.k=40"),
    ],
)
def test_catalog_size_and_ids_are_checked_before_training(world, tmp_path, ids, cfg, match):
    raw = np.random.default_rng(0).standard_normal((len(ids), 8)).astype(np.float32)
    events = world.interactions(n_per_user=2).head(0)
    with pytest.raises(InputError, match=match):
        build_bundle(tmp_path / "b", item_ids=ids, raw_emb=raw, interactions=events, config=cfg)
    assert not (tmp_path / "b").exists()


def test_environment_faults_end_in_one_line(tmp_path):
    """A missing repo or a corrupt registry: one line naming it, not a traceback."""
    import subprocess
    import sys
    from pathlib import Path

    qarm = str(Path(sys.executable).parent / "qarm")
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "feature_store.yaml").write_text(
        "project: p\nprovider: local\nregistry: data/registry.db\n"
        "online_store: {type: sqlite, path: data/online.db}\nentity_key_serialization_version: 3\n"
    )
    (repo / "data" / "registry.db").write_bytes(b"garbage")
    for args, match in [
        (["status", "--repo", str(tmp_path / "missing")], "is not a directory"),
        (["status", "--repo", str(repo)], "registry file is corrupt"),
    ]:
        proc = subprocess.run([qarm, *args], capture_output=True, text=True, timeout=120,
                              env=_this_checkout())  # fmt: skip
        out = proc.stdout + proc.stderr
        assert proc.returncode in (1, 2) and match in " ".join(out.split()), out
        assert "Traceback" not in out


def test_build_bundle_refuses_an_existing_directory_unless_told(world, tmp_path):
    """The Python API's default keeps what ``out`` holds (refused before any training);
    ``overwrite=True`` replaces it."""
    from qarm_features.errors import BundleError

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    kw = {"item_ids": world.item_ids, "raw_emb": world.content,
          "interactions": world.interactions(n_per_user=5)}  # fmt: skip
    with pytest.raises(BundleError, match=r"mine already exists; .* unless overwrite=True"):
        build_bundle(out, config=BuildConfig(pairs=PairsConfig(mf_epochs=1)), **kw)
    assert (out / "notes.txt").read_text() == "keep me"
    cfg = BuildConfig(pairs=PairsConfig(mf_epochs=1, mf_dim=8),
                      aligner=AlignerConfig(out_dim=8, max_epochs=1, batch_size=64),
                      rq=RQConfig(n_levels=1, n_codes=4), vq=VQConfig(k=3))  # fmt: skip
    res = build_bundle(out, config=cfg, overwrite=True, **kw)
    assert not (out / "notes.txt").exists() and load_bundle(res.path).version == res.version


def _this_checkout() -> dict:
    """The environment of a subprocess that imports this checkout's package (not the one
    the virtualenv's editable install points at)."""
    import os
    from pathlib import Path

    import qarm_features

    root = str(Path(qarm_features.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


# Every command's help, in a fresh process from another directory: Feast's import costs
# ~9 s and pulls torch; a command that needs no store or model must import neither.
_PROBE = """
import sys
sys.argv = ["qarm", *sys.argv[1:]]
from qarm_features.app.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted(m for m in ("feast", "torch", "transformers") if m in sys.modules)
print("EXIT", code, "HEAVY", heavy)
"""


@pytest.mark.parametrize(
    "args",
    [["--help"], ["build", "--help"], ["materialize", "--help"], ["status", "--help"],
     ["push", "--help"], ["init", "--help"], ["inspect", "--help"], ["datasets", "fetch", "--help"],
     ["evaluate", "--help"], ["run", "--help"], ["serve", "--help"]],
)  # fmt: skip
def test_help_imports_neither_feast_nor_torch(args, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=_this_checkout(), check=False)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "usage" in out.lower() and "EXIT 0 HEAVY []" in out, out


def test_a_build_without_a_terminal_writes_progress_lines_as_it_goes(world, tmp_path):
    """``qarm build --repo R > log`` (stdout a file, no TTY): a line per stage step with
    count, rate and ETA; "mining pairs" once; the mining's time is in pairs_s."""
    import re
    import subprocess
    import sys

    import pandas as pd

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    pd.DataFrame({"item_id": world.item_ids, "emb": list(world.content)}).to_parquet(
        repo / "data" / "items.parquet"
    )
    world.interactions(n_per_user=20).to_parquet(repo / "data" / "events.parquet")
    (repo / "qarm.yaml").write_text(
        "catalog: {path: data/items.parquet, id: item_id, embedding: emb}\n"
        "events: {path: data/events.parquet, user: user_id, item: item_id, timestamp: timestamp,"
        " rating: {column: rating, threshold: 4}}\n"
        "build:\n  pairs: {mf_epochs: 3, mf_dim: 8}\n"
        "  aligner: {out_dim: 8, max_epochs: 3, batch_size: 64}\n"
        "  rq: {n_levels: 2, n_codes: 8}\n  vq: {k: 5}\n"
    )
    log = tmp_path / "build.log"
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, "-c", "from qarm_features.app.cli import main; main()", "build",
             "--repo", str(repo)],
            stdout=f, stderr=subprocess.STDOUT, timeout=600, cwd=tmp_path, env=_this_checkout(),
            check=False,
        )  # fmt: skip
    text = log.read_text()
    assert proc.returncode == 0, text
    assert text.count("mining pairs") == 1, text
    step = re.compile(r"^aligner: 1/3 \(33%\)  [\d,.]+/s  elapsed \d+:\d\d  ETA \d+:\d\d$", re.MULTILINE)
    first = step.search(text)
    assert first and first.start() < text.index("writing bundle"), text  # as it went
    pairs_s = float(re.search(r"pairs_s=([\d.]+)", text).group(1))
    assert pairs_s > 0.0, text


def test_inspect_states_the_vq_vocabulary(tmp_path):
    import json

    from qarm_features.bundle.testing import make_random_bundle

    path = make_random_bundle(tmp_path / "s", string_ids=True)
    res = runner.invoke(app, ["inspect", str(path)])
    assert res.exit_code == 0 and "VQ codes: catalog row indices" in res.output, res.output
    assert "vq_vocab_size=200" in res.output
    res = runner.invoke(app, ["inspect", str(path), "--json"])
    assert json.loads(res.output)["vq_codes"] == {"space": "catalog_row", "vocab_size": 200}


def test_content_embeddings_of_cold_items_are_the_builds(tmp_path, monkeypatch):
    """A text catalog: the items' columns rendered with qarm.yaml's template and encoded
    with its encoder, as the build encodes the catalog; from another directory."""
    import pandas as pd

    from qarm_features import content_embeddings
    from qarm_features.content.encoders import TextEncoder

    repo = tmp_path / "shop"
    repo.mkdir()
    (repo / "qarm.yaml").write_text(
        "catalog: {path: items.parquet, id: sku, text: '{title}. {description}'}\n"
        "events: {path: clicks.parquet, user: u, item: sku, timestamp: ts}\n"
        "entity: {name: product, join_key: sku}\n"
    )
    items = pd.DataFrame({"sku": ["A", "B"], "title": ["green scarf", "red boot"],
                          "description": ["silk", "leather"]})  # fmt: skip
    items.to_parquet(tmp_path / "new.parquet")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QARM_CACHE", str(tmp_path / "cache"))
    got = content_embeddings("shop", items)
    want = TextEncoder().encode(["green scarf. silk", "red boot. leather"])
    assert got.dtype == np.float32 and got.shape == (2, 384)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(content_embeddings(repo, tmp_path / "new.parquet"), got)
    with pytest.raises(InputError, match=r"names column\(s\) \['description'\]"):
        content_embeddings(repo, items.drop(columns=["description"]))


UNALIGNABLE_YAML = """\
catalog: {path: items.parquet, id: sku, embedding: emb}
events: {path: clicks.parquet, user: visitor, item: sku, timestamp: ts}
build:
  pairs: {mf_epochs: 5, mf_dim: 8}
  aligner: {out_dim: 8, hidden: 256, dropout: 0.0, lr: 0.01, max_epochs: 30, patience: 30,
            raw_consistency: 0.0, batch_size: 64}
  rq: {n_levels: 2, n_codes: 8, n_iter: 5}
  vq: {k: 4}
"""


def _unalignable_repo(root, policy: str | None = None):
    """A catalog alignment cannot help: every visitor clicks one product and then a random
    other one (pairs unrelated to the content), half a pair per product."""
    import pandas as pd

    rng = np.random.default_rng(0)
    repo = root / "shop"
    repo.mkdir()
    n = 400
    skus = [f"SKU-{i:04d}" for i in range(n)]
    emb = rng.normal(size=(n, 32)).astype(np.float32)
    pd.DataFrame({"sku": skus, "emb": list(emb)}).to_parquet(repo / "items.parquet")
    rows = []
    for v in range(n):
        rows += [(f"v{v}", skus[v], 2 * v), (f"v{v}", skus[rng.integers(0, n)], 2 * v + 1)]
    pd.DataFrame(rows, columns=["visitor", "sku", "ts"]).to_parquet(repo / "clicks.parquet")
    yaml = UNALIGNABLE_YAML
    if policy:
        yaml += f"  on_alignment_failure: {policy}\n"
    (repo / "qarm.yaml").write_text(yaml)
    return repo


def test_a_build_whose_alignment_failed_says_so_and_records_it(tmp_path, caplog, monkeypatch):
    """Alignment that does not beat the frozen space: the build warns (cause, what to do),
    the manifest records the comparison, `qarm build` and `qarm inspect` end with it."""
    import json
    import logging

    torch.set_num_threads(1)
    repo = _unalignable_repo(tmp_path)
    monkeypatch.chdir(tmp_path / "shop")  # the CLI from inside the repo, --repo relative
    with caplog.at_level(logging.WARNING, logger="qarm_features"):
        res = runner.invoke(app, ["build", "--repo", "."])
    assert res.exit_code == 0, res.output
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    said = [m for m in warned if "alignment" in m]
    assert len(said) == 1, warned
    assert "Likely cause: too few pairs for the catalog" in said[0]
    assert "What to do:" in said[0] and "on_alignment_failure: error" in said[0]
    out = " ".join(res.output.split())
    assert "alignment check: not better" in out or "alignment check: inconclusive" in out
    from qarm_features.build.bundles import latest_bundle

    manifest = json.loads((latest_bundle(repo / "artifacts/bundles") / "manifest.json").read_text())
    check = manifest["metrics"]["alignment_check"]
    assert check["verdict"] in ("not_better", "inconclusive")
    assert check["ci"][0] <= 0 and check["n_pairs"] > 0
    assert check["delta"] == pytest.approx(check["aligned"] - check["raw"])
    res = runner.invoke(app, ["inspect", "--repo", "."])
    assert res.exit_code == 0 and f"alignment check: {check['verdict'].replace('_', ' ')}" in (
        " ".join(res.output.split())
    )


def test_on_alignment_failure_error_refuses_only_a_failed_alignment(tmp_path):
    """The policy switch: `error` refuses a not-better verdict before anything is written;
    an inconclusive one (aligned ahead, interval reaching 0) is built with the warning."""
    from qarm_features.build.bundles import check_alignment
    from qarm_features.errors import AlignmentFailed

    metrics = {
        "alignment_check": {"raw": 0.554, "aligned": 0.545, "delta": -0.009,
                            "ci": [-0.02, 0.003], "n_pairs": 900, "n_items": 200,
                            "verdict": "not_better"},
        "pairs": {"n_pairs": 2460},
        "aligner": {"n_train_pairs": 2200},
    }  # fmt: skip
    strict = BuildConfig(on_alignment_failure="error")
    with pytest.raises(AlignmentFailed, match="2,200 training pairs for 2,000 items"):
        check_alignment(metrics, 2000, strict)
    check_alignment(metrics, 2000, BuildConfig())  # warn: no error
    soft = {**metrics, "alignment_check": {**metrics["alignment_check"], "delta": 0.001,
                                           "verdict": "inconclusive"}}  # fmt: skip
    check_alignment(soft, 2000, strict)
    good = {**metrics, "alignment_check": {**metrics["alignment_check"], "verdict": "better"}}
    check_alignment(good, 2000, strict)
    repo = _unalignable_repo(tmp_path, policy="error")
    torch.set_num_threads(1)
    res = runner.invoke(app, ["build", "--repo", str(repo)])
    out = " ".join(res.output.split())
    assert res.exit_code == 1 and "build refused (build.on_alignment_failure: error)" in out
    assert not (repo / "artifacts/bundles/LATEST").exists()
