"""The evaluation's second ranker (qarm_features.app.deepfm): deepctr-torch's DeepFM fed
each variant's inputs, trained on the protocol's rows, on tiny synthetic splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qarm_features.app.deepfm import DeepFMInputs, library_title, train_deepfm
from qarm_features.app.protocol import EvalConfig, make_split
from qarm_features.app.variants import score_subsets, variant_items
from qarm_features.ranking import CodeVocab
from tests.unit.test_evaluate import _fake_spaces, _world


def _setup(**kw):
    item_ids, raw, df = _world(**kw)
    cfg = EvalConfig(history_len=4, dim=4, epochs=2, batch_size=256, rq_mode="both")
    sp = make_split(item_ids, df, cfg, seed=0)
    return item_ids, raw, cfg, sp, _fake_spaces(item_ids, raw, sp)


def test_each_variant_feeds_deepfm_its_item_inputs():
    item_ids, raw, cfg, sp, spaces = _setup()
    names = {}
    for v in ("A", "B", "C", "D", "B+D"):
        kw, items, _ = variant_items(v, spaces, sp)
        inputs = DeepFMInputs(kw, items, sp, cfg)
        names[v] = set(inputs.names)
        x = inputs.rows(sp.test_rows)
        assert all(a.shape[0] == len(sp.test_rows) and a.dtype == np.float32 for a in x.values())
    base = {"user", "item", "hist_item"}
    codes = {"rq_level1", "rq_level2", "rq_prefix2", "vq"}  # rq_mode "both", 2 levels
    assert names["A"] == base and names["B"] == base | {"dense"}
    assert names["C"] == names["D"] == base | codes and names["B+D"] == base | codes | {"dense"}

    kw, items, _ = variant_items("B+D", spaces, sp)
    inputs = DeepFMInputs(kw, items, sp, cfg)
    x = inputs.rows(sp.test_rows)
    # the history pools rows of the target's item-id table (one shared embedding)
    col = {c.name: c for c in inputs.columns}
    assert col["hist_item"].embedding_name == col["item"].embedding_name == "item"
    rows = sp.test_rows.item
    # the variant's own codes and embedding, cold items included (content, not training)
    np.testing.assert_array_equal(x["rq_level1"], spaces.aligned_rq[rows, 0])
    np.testing.assert_array_equal(x["rq_level2"], spaces.aligned_rq[rows, 1])
    np.testing.assert_array_equal(x["rq_prefix2"], spaces.aligned_rq[rows] @ [8, 1])  # exact
    vq = CodeVocab(spaces.vq_pool_ids).map(spaces.aligned_vq)[rows] + 1
    np.testing.assert_array_equal(x["vq"], vq)
    np.testing.assert_array_equal(x["dense"], raw[rows])
    # ids: row 0 pads the history, row 1 is the OOV id of cold and new items (as in DIN)
    cold = np.isin(item_ids[rows], np.r_[sp.cold_items, sp.new_items])
    assert cold.any() and (x["item"][cold] == 1).all() and (x["item"][~cold] > 1).all()
    h = sp.test_rows.hist
    np.testing.assert_array_equal(x["hist_item"] == 0, h < 0)
    np.testing.assert_array_equal(x["hist_item"][h >= 0], sp.item_id_index[h[h >= 0]] + 1)
    # C reads the raw space's codes, D the aligned one's
    kw_c, items_c, _ = variant_items("C", spaces, sp)
    xc = DeepFMInputs(kw_c, items_c, sp, cfg).rows(sp.test_rows)
    np.testing.assert_array_equal(xc["rq_level1"], spaces.raw_rq[rows, 0])


def test_deepfm_trains_seeded_and_keeps_the_best_epoch():
    _ids, _raw, cfg, sp, spaces = _setup()
    out = {}
    for v in ("A", "B+D"):
        kw, items, _ = variant_items(v, spaces, sp)
        scores, info = train_deepfm(kw, items, sp, cfg, seed=0)
        assert scores.shape == (len(sp.test_rows),) and np.isfinite(scores).all()
        assert info["best_epoch"] == int(np.argmax(info["val_auc"])) + 1
        assert 1 <= len(info["val_auc"]) <= cfg.epochs
        out[v] = (kw, items, scores, info)
    assert out["B+D"][3]["n_params"] > out["A"][3]["n_params"]
    again, _ = train_deepfm(*out["A"][:2], sp, cfg, seed=0)
    np.testing.assert_allclose(again, out["A"][2], rtol=1e-5)
    other, _ = train_deepfm(*out["A"][:2], sp, cfg, seed=1)
    assert not np.allclose(other, out["A"][2])
    assert library_title().startswith("DeepFM (deepctr-torch ")


def test_deepfm_uses_content_on_cold_items():
    """Relative check: content that carries item quality lifts DeepFM's cold rows (B > A),
    and so do the codes of that content (C > A)."""
    item_ids, raw, df = _world(n_items=80, n_users=60, n_rows=4000, seed=1)
    cfg = EvalConfig(history_len=4, dim=8, epochs=4, batch_size=256, lr=5e-3)
    sp = make_split(item_ids, df, cfg, seed=0)
    spaces = _fake_spaces(item_ids, raw, sp)
    # codes that carry quality: level 1 = the quality octile (raw column 0)
    q = np.digitize(raw[:, 0], np.quantile(raw[:, 0], np.linspace(0, 1, 9)[1:-1]))
    spaces.raw_rq[:, 0] = q
    spaces.raw_vq[:] = spaces.raw_vq[0]  # one VQ code list for all: C's signal is its RQ
    cold = {}
    for v in ("A", "B", "C"):
        kw, items, _ = variant_items(v, spaces, sp)
        scores, _ = train_deepfm(kw, items, sp, cfg, seed=0)
        cold[v] = score_subsets(sp, scores, item_ids)["cold"]["auc"]
    assert cold["B"] > cold["A"] + 0.05, cold
    assert cold["C"] > cold["A"] + 0.05, cold


def test_the_library_is_imported_without_its_version_check():
    import subprocess
    import sys

    code = "from qarm_features.app.deepfm import library_title; library_title()"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # no "Please check the latest version" from a PyPI thread


@pytest.mark.parametrize("rankers", [("deepfm",), ()])
def test_din_stays_the_main_ranker(rankers):
    from qarm_features.app.evaluate import run_protocol
    from qarm_features.errors import InputError

    item_ids, raw, df = _world()
    with pytest.raises(InputError, match="lacks 'din'"):
        run_protocol(item_ids, raw, df, EvalConfig(rankers=rankers), seeds=(0,))
