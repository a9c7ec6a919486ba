"""The build pipeline and the `qarm` CLI on a small synthetic world (no text encoder)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qarm_features.build import build_bundle
from qarm_features.bundle import load_bundle
from qarm_features.app.cli import app, load_build_config
from qarm_features.config import AlignerConfig, BuildConfig, PairsConfig, RQConfig, VQConfig
from qarm_features.synthetic import SyntheticWorld
from qarm_features.errors import ConfigError, InputError

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


def test_config_file_and_overrides(tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text('{"rq": {"n_levels": 4}}')
    cfg = load_build_config(cfg_file, ["vq.k=10", "aligner.temperature=0.1"])
    assert cfg.rq.n_levels == 4 and cfg.vq.k == 10 and cfg.aligner.temperature == 0.1
    with pytest.raises(ConfigError, match="levels"):
        load_build_config(None, ["rq.levels=4"])  # unknown key is an error, not ignored
    with pytest.raises(ConfigError):
        load_build_config(None, ["rq.n_levels=0"])
    res = runner.invoke(app, ["build", "--set", "rq.nlevels=3", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "nlevels" in res.output
