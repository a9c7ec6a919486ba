"""align: the documented weight layout and forward, generalisation to unseen items on a
synthetic world where content = collaborative factors + strong nuisance, determinism,
the raw-consistency term, in-batch masking and input validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from qarm_features.align.aligner import Aligner, ItemAligner, weight_shapes
from qarm_features.align.contrastive import masked_nce
from qarm_features.config import AlignerConfig
from qarm_features.errors import ConfigError, InputError, NotFittedError
from qarm_features.metrics import pair_auc, pair_recall_at_k

torch.set_num_threads(1)

CFG = AlignerConfig(
    out_dim=16, hidden=32, batch_size=64, lr=1e-2, max_epochs=30, patience=4, val_fraction=0.15
)


def make_world(n_items=400, collab_dim=8, nuis_dim=16, content_dim=32, nuisance=3.0, seed=0):
    """Content = collab @ A + nuisance * N @ B + a common offset; pairs = collab neighbours.

    A linear map can remove the nuisance (8 + 16 latent dims < 32), but raw cosine is
    dominated by it, so raw-space pair-AUC is low and an aligner has a measurable job.
    """
    rng = np.random.default_rng(seed)
    collab = rng.standard_normal((n_items, collab_dim))
    nuis = rng.standard_normal((n_items, nuis_dim))
    a = rng.standard_normal((collab_dim, content_dim)) / np.sqrt(collab_dim)
    b = rng.standard_normal((nuis_dim, content_dim)) / np.sqrt(nuis_dim)
    offset = rng.standard_normal(content_dim)
    content = collab @ a + nuisance * nuis @ b + 2.0 * offset / np.linalg.norm(offset)
    cn = collab / np.linalg.norm(collab, axis=1, keepdims=True)
    sims = cn @ cn.T
    np.fill_diagonal(sims, -np.inf)
    nbrs = np.argsort(-sims, axis=1)[:, :5]
    ids = np.arange(n_items, dtype=np.int64) + 1000
    pairs = pd.DataFrame({"trigger_id": np.repeat(ids, 5), "target_id": ids[nbrs.ravel()]})
    return ids, content.astype(np.float32), pairs


def split_items(ids, pairs, fraction, seed):
    """Hold out ``fraction`` of the items: every pair touching one is a test pair."""
    test_items = np.random.default_rng(seed).choice(ids, int(fraction * ids.size), replace=False)
    touch = pairs["trigger_id"].isin(test_items) | pairs["target_id"].isin(test_items)
    return pairs[~touch].reset_index(drop=True), pairs[touch].reset_index(drop=True)


@pytest.fixture(scope="module")
def world():
    return make_world()


@pytest.fixture(scope="module")
def trained(world):
    ids, content, pairs = world
    train_pairs, test_pairs = split_items(ids, pairs, 0.2, seed=1)
    est = ItemAligner(CFG).fit(content, ids, train_pairs)
    model, history = est.module_, est.history_
    return model, history, test_pairs


def numpy_forward(weights, x):
    """The forward of docs/architecture.md, in float64, from exported weights only."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    x = x.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = x @ w["proj.weight"].T
    if "mlp.0.weight" in w:
        h = np.maximum(x @ w["mlp.0.weight"].T + w["mlp.0.bias"], 0.0)
        y = y + h @ w["mlp.2.weight"].T + w["mlp.2.bias"]
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------- layout / forward
@pytest.mark.parametrize("hidden", [0, 24])
def test_exported_weights_have_documented_keys_and_shapes(hidden):
    cfg = AlignerConfig(out_dim=8, hidden=hidden)
    w = Aligner(20, cfg).export_weights()
    expected = {"proj.weight": (8, 20)}
    if hidden:
        expected.update(
            {
                "mlp.0.weight": (24, 20),
                "mlp.0.bias": (24,),
                "mlp.2.weight": (8, 24),
                "mlp.2.bias": (8,),
            }
        )
    assert {k: v.shape for k, v in w.items()} == expected
    assert weight_shapes(20, cfg) == expected
    assert all(v.dtype == np.float32 for v in w.values())


def test_numpy_forward_matches_torch_eval_forward(trained, world):
    model, _, _ = trained
    _, content, _ = world
    x = content * np.linspace(0.1, 10.0, content.shape[0], dtype=np.float32)[:, None]
    ours = model.transform(x)
    ref = numpy_forward(model.export_weights(), x)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    again = Aligner.from_weights(model.export_weights(), content.shape[1], CFG).transform(x)
    np.testing.assert_array_equal(again, ours)


def test_dropout_only_acts_in_training(world):
    _, content, _ = world
    model = Aligner(content.shape[1], AlignerConfig(out_dim=8, hidden=16, dropout=0.5))
    with torch.no_grad():
        model.mlp[2].weight.normal_()  # make the mlp matter
        x = torch.from_numpy(content[:50])
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


def test_pca_init_starts_from_the_centred_raw_space(world):
    _, content, _ = world
    model = Aligner(content.shape[1], AlignerConfig(out_dim=32, hidden=16)).init_from_raw(content)
    x = content / np.linalg.norm(content, axis=1, keepdims=True)
    xc = x - x.mean(axis=0)
    xc /= np.linalg.norm(xc, axis=1, keepdims=True)
    z = model.transform(content)  # full-rank PCA: only the tiny mlp weights differ
    np.testing.assert_allclose(z @ z.T, xc @ xc.T, atol=0.05)


# --------------------------------------------------------------------------- training
def test_aligner_beats_raw_on_items_unseen_in_training(trained, world):
    ids, content, pairs = world
    model, history, test_pairs = trained
    pop = np.bincount(
        np.searchsorted(ids, np.r_[pairs["trigger_id"], pairs["target_id"]]), minlength=ids.size
    )
    aligned = model.transform(content)
    raw_auc = pair_auc(content, ids, test_pairs, pop)
    aligned_auc = pair_auc(aligned, ids, test_pairs, pop)
    assert aligned_auc > raw_auc + 0.15, (raw_auc, aligned_auc)
    raw_recall = pair_recall_at_k(content, ids, test_pairs)
    assert pair_recall_at_k(aligned, ids, test_pairs) > 2 * raw_recall
    # validation (other unseen items) tells the same story, and early stopping kept the best
    assert history["best_val_pair_auc"] > history["raw_val_pair_auc"] + 0.15
    assert history["best_val_pair_auc"] == max(history["val_pair_auc"])
    assert history["val_pair_auc"][history["best_epoch"]] == history["best_val_pair_auc"]
    assert len(history["val_pair_auc"]) == history["epochs_run"] + 1
    assert len(history["loss"]) == history["epochs_run"] and history["pairs_per_s"][0] > 0
    assert history["loss"][-1] < history["loss"][0]


def test_training_is_deterministic(world):
    ids, content, pairs = world
    cfg = CFG.model_copy(update={"max_epochs": 2})
    e1 = ItemAligner(cfg).fit(content, ids, pairs)
    e2 = ItemAligner(cfg).fit(content, ids, pairs)
    (m1, h1), (m2, h2) = (e1.module_, e1.history_), (e2.module_, e2.history_)
    assert e1.weights_.keys() == m1.export_weights().keys()
    for k, v in m1.export_weights().items():
        np.testing.assert_array_equal(v, m2.export_weights()[k])
    assert h1["loss"] == h2["loss"] and h1["val_pair_auc"] == h2["val_pair_auc"]
    m3 = ItemAligner(cfg.model_copy(update={"seed": 1})).fit(content, ids, pairs).module_
    w1, w3 = m1.export_weights()["proj.weight"], m3.export_weights()["proj.weight"]
    assert not np.array_equal(w1, w3)


def test_raw_consistency_keeps_raw_similarity_structure(world):
    ids, content, pairs = world
    x = content / np.linalg.norm(content, axis=1, keepdims=True)
    xc = x - x.mean(axis=0)
    xc /= np.linalg.norm(xc, axis=1, keepdims=True)
    iu = np.triu_indices(ids.size, 1)
    raw_sims = (xc @ xc.T)[iu]

    def corr(rc):
        cfg = CFG.model_copy(update={"raw_consistency": rc, "max_epochs": 6})
        est = ItemAligner(cfg).fit(content, ids, pairs, val_items=[])
        model, hist = est.module_, est.history_
        assert hist["n_val_pairs"] == 0 and hist["epochs_run"] == 6
        z = model.transform(content)
        return np.corrcoef((z @ z.T)[iu], raw_sims)[0, 1]

    assert corr(30.0) > corr(0.0) + 0.1


def test_in_batch_duplicates_are_masked():
    logits = torch.zeros(3, 3)
    q = torch.tensor([0, 1, 2])
    # rows 0 and 1 share their target: each other's column is a false negative
    loss = masked_nce(logits, q, torch.tensor([7, 7, 8]))
    # row 0 keeps columns {0, 2}, row 1 keeps {1, 2}: log 2 each; row 2 keeps all three
    expected = (np.log(2) + np.log(2) + np.log(3)) / 3
    assert float(loss) == pytest.approx(expected)
    # a column holding the query item itself is masked too
    loss = masked_nce(logits, q, torch.tensor([5, 0, 6]))
    assert float(loss) == pytest.approx((np.log(2) + np.log(3) + np.log(3)) / 3)


@pytest.mark.cuda
def test_cuda_training_matches_cpu_quality(world):
    ids, content, pairs = world
    cfg = CFG.model_copy(update={"max_epochs": 5})
    h_cpu = ItemAligner(cfg).fit(content, ids, pairs).history_
    gpu = ItemAligner(cfg.model_copy(update={"device": "cuda"})).fit(content, ids, pairs)
    m_gpu, h_gpu = gpu.module_, gpu.history_
    assert abs(h_gpu["best_val_pair_auc"] - h_cpu["best_val_pair_auc"]) < 0.02
    assert m_gpu.transform(content).shape == (ids.size, cfg.out_dim)


# --------------------------------------------------------------------------- validation
def test_nan_in_a_late_block_of_the_blocked_finiteness_check_is_named(world, monkeypatch):
    """The finiteness check runs block by block (bounded memory): a NaN in the last, short
    block is found, and its row named."""
    import qarm_features._validate as validate

    ids, content, pairs = world
    monkeypatch.setattr(validate, "_FINITE_BLOCK_ROWS", 7)
    bad = content.copy()
    bad[-1, 0] = np.inf
    with pytest.raises(InputError, match=f"first at row {len(bad) - 1}"):
        ItemAligner(CFG).fit(bad, ids, pairs)
    assert validate.check_embeddings(content).shape == content.shape


def test_bad_input_raises_input_error(world):
    ids, content, pairs = world
    with pytest.raises(InputError, match="2-d"):
        ItemAligner(CFG).fit(content[0], ids, pairs)
    with pytest.raises(InputError, match="expected 400 ids"):
        ItemAligner(CFG).fit(content, ids[:-1], pairs)
    bad = content.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        ItemAligner(CFG).fit(bad, ids, pairs)
    unknown = pd.concat([pairs, pd.DataFrame({"trigger_id": [1000], "target_id": [5]})])
    with pytest.raises(InputError, match="unknown id"):
        ItemAligner(CFG).fit(content, ids, unknown)
    with pytest.raises(InputError, match="missing column"):
        ItemAligner(CFG).fit(content, ids, pairs.rename(columns={"target_id": "item"}))
    with pytest.raises(InputError, match="no .*pair"):
        ItemAligner(CFG).fit(content, ids, pairs.iloc[:0])
    some = pairs.iloc[:50]
    lonely = ids[~np.isin(ids, np.r_[some["trigger_id"], some["target_id"]])][:3]
    with pytest.raises(InputError, match="no pair touches"):
        ItemAligner(CFG).fit(content, ids, some, val_items=lonely)
    with pytest.raises(InputError, match="unknown id"):
        ItemAligner(CFG).fit(content, ids, pairs, val_items=[1])
    with pytest.raises(InputError, match="width"):
        Aligner(content.shape[1], CFG).transform(content[:, :5])
    with pytest.raises(NotFittedError):
        ItemAligner(CFG).transform(content)
    with pytest.raises(ConfigError, match="AlignerConfig"):
        ItemAligner({"hidden": 0}).fit(content, ids, pairs)


def test_from_weights_rejects_mismatched_weights():
    cfg = AlignerConfig(out_dim=8, hidden=16)
    w = Aligner(20, cfg).export_weights()
    with pytest.raises(InputError, match="keys"):
        Aligner.from_weights({"proj.weight": w["proj.weight"]}, 20, cfg)
    with pytest.raises(InputError, match="shape"):
        Aligner.from_weights(w, 21, cfg)
    w["mlp.2.bias"] = np.full(8, np.nan, np.float32)
    with pytest.raises(InputError, match="NaN"):
        Aligner.from_weights(w, 20, cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_unavailable_device_is_a_config_error(world):
    ids, content, pairs = world
    with pytest.raises(ConfigError, match="CUDA"):
        ItemAligner(CFG.model_copy(update={"device": "cuda"})).fit(content, ids, pairs)


# --------------------------------------------------------------------------- loss pins
def _reference_losses(za, zb, ref_a, ref_b, a, b, temperature):
    """The pre-issue-9 formulation: two dense masks and two (2B, 2B) Gram matrices."""
    logits = za @ zb.T / temperature
    nce = 0.5 * (masked_nce(logits, a, b) + masked_nce(logits.T, b, a))
    z, r = torch.cat([za, zb]), torch.cat([ref_a, ref_b])
    n2 = z.shape[0]
    return nce, ((z @ z.T - r @ r.T) ** 2).sum() / (n2 * (n2 - 1))


@pytest.mark.parametrize("n_items", [3, 12, 40, 10_000])
@pytest.mark.parametrize("batch", [2, 64, 300])
def test_batch_losses_match_the_dense_reference(n_items, batch):
    """symmetric_nce (sparse masks) and raw_consistency (Frobenius identity) equal the dense
    formulation, value and gradient, on random batches; few items = many duplicates
    (the same trigger or target in several pairs, a trigger that is another pair's target)."""
    from qarm_features.align.contrastive import raw_consistency, symmetric_nce

    gen = torch.Generator().manual_seed(n_items * 1000 + batch)
    a = torch.randint(0, n_items, (batch,), generator=gen)
    b = (a + torch.randint(1, n_items, (batch,), generator=gen)) % n_items  # no self-pair
    ref = torch.nn.functional.normalize(torch.randn(n_items, 48, generator=gen), dim=1)
    w = torch.randn(48, 16, generator=gen)
    raw = torch.randn(n_items, 48, generator=gen)

    def embed(rows):
        return torch.nn.functional.normalize(raw[rows] @ w, dim=1)

    w.requires_grad_(True)
    za, zb = embed(a), embed(b)
    nce, term = (
        symmetric_nce(za, zb, a, b, 0.07),
        raw_consistency(torch.cat([za, zb]), ref[torch.cat([a, b])]),
    )
    grads = torch.autograd.grad(nce + 0.5 * term, w)[0]
    za, zb = embed(a), embed(b)
    ref_nce, ref_term = _reference_losses(za, zb, ref[a], ref[b], a, b, 0.07)
    ref_grads = torch.autograd.grad(ref_nce + 0.5 * ref_term, w)[0]
    if n_items < batch:
        assert (a[:, None] == b[None, :]).any(), "the batch must hold duplicates"
    assert float(nce) == pytest.approx(float(ref_nce), rel=1e-5)
    assert float(term) == pytest.approx(float(ref_term), rel=1e-4, abs=1e-7)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("raw_rows", "every"), [(None, 1), (48, 1), (48, 3)])
def test_fit_history_matches_the_dense_reference_loss(world, raw_rows, every):
    """One epoch of ItemAligner.fit reports the losses the dense formulation gives on the
    same batches (same seed: same init, batch order and steps); with raw_consistency_rows
    48 of the 128 batch rows, the dense raw term reads the same sampled rows; with
    raw_consistency_every 3, it is computed on steps 0, 3, 6 ... of each epoch, each
    weighted by the steps its block holds (32 steps: ten blocks of 3, one of 2)."""
    import qarm_features.align.aligner as align_mod

    ids, content, pairs = world
    cfg = CFG.model_copy(
        update={
            "max_epochs": 2,
            "hidden": 0,
            "raw_consistency": 0.3,
            "raw_consistency_rows": raw_rows,
            "raw_consistency_every": every,
        }
    )
    fast = ItemAligner(cfg).fit(content, ids, pairs, val_items=[]).history_
    sampled = []
    x = content / np.linalg.norm(content, axis=1, keepdims=True)
    xc = x - x.mean(axis=0)  # the centred raw space, written plainly (float64)
    ref = torch.from_numpy((xc / np.linalg.norm(xc, axis=1, keepdims=True)).astype(np.float32))

    weights = []

    def dense_batch_loss(model, x_all, mean, a, b, cfg, raw_rows=None, raw_weight=1):
        weights.append(raw_weight)
        za, zb = model(x_all[a]), model(x_all[b])
        nce, raw_term = _reference_losses(za, zb, ref[a], ref[b], a, b, cfg.temperature)
        if raw_weight == 0:
            return nce, nce, torch.zeros(())
        if raw_rows is not None:
            sampled.append(raw_rows.numel())
            z, r = torch.cat([za, zb])[raw_rows], ref[torch.cat([a, b])[raw_rows]]
            raw_term = ((z @ z.T - r @ r.T) ** 2).sum() / (z.shape[0] * (z.shape[0] - 1))
        return nce + cfg.raw_consistency * raw_weight * raw_term, nce, raw_term

    original = align_mod._batch_loss
    align_mod._batch_loss = dense_batch_loss
    try:
        dense = ItemAligner(cfg).fit(content, ids, pairs, val_items=[]).history_
    finally:
        align_mod._batch_loss = original
    assert set(sampled) == (set() if raw_rows is None else {raw_rows})
    n_steps = -(-len(pairs) // cfg.batch_size)
    assert len(weights) == 2 * n_steps == 64  # two epochs of 32 steps
    for epoch in (weights[:n_steps], weights[n_steps:]):
        assert sum(epoch) == n_steps  # every step stood for once
        assert [w > 0 for w in epoch] == [i % every == 0 for i in range(n_steps)]
    for key in ("loss", "loss_nce", "loss_raw"):
        np.testing.assert_allclose(fast[key], dense[key], rtol=1e-4)


@pytest.mark.parametrize("size", [2, 40, 129])
def test_sampled_raw_term_is_an_unbiased_estimate_of_the_batch_term(size):
    """raw_consistency on raw_sample's rows averages, over draws, to its value on the whole
    batch: every ordered pair of distinct rows is equally likely to be sampled. The batch
    makes a biased sampler show: each trigger's aligned row is its target's (the pairs
    the InfoNCE pulls together), the reference rows are unrelated, so over- or
    under-weighing a trigger against its own target moves the mean."""
    from qarm_features.align.contrastive import raw_consistency, raw_sample

    gen = torch.Generator().manual_seed(size)
    m = 64
    za = torch.nn.functional.normalize(torch.randn(m, 8, generator=gen), dim=1)
    z = torch.cat([za, za])  # rows i and m + i: one pair, identical aligned rows
    r = torch.nn.functional.normalize(torch.randn(2 * m, 24, generator=gen), dim=1)
    full = float(raw_consistency(z, r))
    assert raw_sample(2 * m, None, gen) is None and raw_sample(2 * m, 2 * m, gen) is None
    draws = 4000 if size < 2 * m else 1
    values = []
    for _ in range(draws):
        rows = raw_sample(2 * m, size, gen)
        if rows is None:  # a sample at least the batch: every row, the exact term
            values.append(full)
            continue
        assert rows.numel() == size and rows.unique().numel() == size  # no repeats
        values.append(float(raw_consistency(z[rows], r[rows])))
    values = np.asarray(values)
    stderr = values.std() / np.sqrt(draws)
    assert abs(values.mean() - full) < 4 * stderr + 1e-6 * full
