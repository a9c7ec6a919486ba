"""Tests for qarm_features.content.encoders: MiniLM text, tiny CLIP, precomputed, the factory."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from qarm_features.config import EncoderConfig
from qarm_features.content import encoders as encoders
from qarm_features.content.encoders import (
    ClipEncoder,
    ContentEncoder,
    PrecomputedEncoder,
    TextEncoder,
    clip_preprocess,
    make_encoder,
)
from qarm_features.errors import ConfigError, DependencyError, InputError


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_module_import_does_not_pull_torch():
    code = (
        "import sys, qarm_features.content.encoders, qarm_features.datasets.movielens, qarm_features.datasets.synthetic\n"
        "heavy = {'torch', 'transformers', 'sentence_transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_dependency_names_the_pip_install():
    with pytest.raises(DependencyError, match="pip install some-extra"):
        encoders._import("qarm_no_such_module", "some-extra")


# ----------------------------------------------------------------- text (real MiniLM)


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder()


def test_minilm_text_encoder(minilm):
    texts = ["a cat", "a kitten", "a spreadsheet"]
    emb = minilm.encode(texts)
    assert emb.shape == (3, 384) and emb.dtype == np.float32 and emb.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert _cos(emb[0], emb[1]) > _cos(emb[0], emb[2]) + 0.1
    assert minilm.dim == 384 and minilm.name == "text:all-MiniLM-L6-v2"
    assert isinstance(minilm, ContentEncoder)
    assert os.environ.get("HF_HUB_OFFLINE") and os.environ.get("TRANSFORMERS_OFFLINE")
    # one model per (path, device) in the process
    assert TextEncoder(batch_size=2).model is minilm.model
    # batch composition does not change a row beyond float noise
    np.testing.assert_allclose(TextEncoder(batch_size=1).encode(texts), emb, atol=1e-5)


def test_loading_the_text_model_draws_no_progress_bar(minilm, monkeypatch, capfd):
    """The cold-text view loads the model in each serving process: no "Loading weights"
    bar on stderr each time; transformers' bars are as they were afterwards."""
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(encoders, "_MODELS", {})  # a fresh process's cache
    capfd.readouterr()
    TextEncoder().encode(["a cat"])
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err
    assert hf_logging.is_progress_bar_enabled()


def test_text_encoder_edge_cases(minilm):
    empty = minilm.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    with pytest.raises(InputError, match=r"texts\[1\]: expected str, got NoneType"):
        minilm.encode(["ok", None])
    with pytest.raises(InputError, match="single string"):
        minilm.encode("a cat")
    with pytest.raises(InputError, match="ClipEncoder"):
        minilm.encode(["a cat"], images=[np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(InputError, match="model_path"):
        TextEncoder(model_path="/nonexistent/model").encode(["x"])


# ----------------------------------------------------------------- tiny CLIP


def _byte_chars():
    """GPT-2/CLIP byte-to-unicode table: one printable character per byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialised CLIP (16-d output) with a byte-level tokenizer, saved to disk."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny-clip")
    chars = _byte_chars()
    vocab = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    tok = tf.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[])
    small = {"hidden_size": 32, "intermediate_size": 64}
    small |= {"num_hidden_layers": 2, "num_attention_heads": 2}
    text = small | {
        "vocab_size": len(vocab),
        "max_position_embeddings": 64,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vision = small | {"image_size": 32, "patch_size": 8}
    config = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    tf.CLIPModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _images(n, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    shapes = [(40, 60, 3), (61, 33, 3), (32, 32, 3), (50, 50, 3)]
    return [Image.fromarray(rng.integers(0, 256, shapes[i % 4], dtype=np.uint8)) for i in range(n)]


def test_tiny_clip_text_image_and_both(tiny_clip_dir, tmp_path):
    enc = ClipEncoder(tiny_clip_dir, batch_size=2)
    assert enc.dim == 16 and enc.name == f"clip:{tiny_clip_dir.name}"
    texts = ["a cat", "a dog on a mat", "x"]
    t = enc.encode(texts)
    assert t.shape == (3, 16) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ClipEncoder(tiny_clip_dir, batch_size=8).encode(texts), t, atol=1e-5)

    imgs = _images(3)
    i = enc.encode(None, images=imgs)
    assert i.shape == (3, 16) and not np.allclose(i, t)
    # arrays and file paths give the same embeddings as PIL images
    imgs[0].save(tmp_path / "img0.png")
    same = enc.encode([], images=[tmp_path / "img0.png", np.asarray(imgs[1]), imgs[2]])
    np.testing.assert_allclose(same, i, atol=1e-5)

    both = enc.encode(texts, images=imgs)
    mean = t + i
    np.testing.assert_allclose(both, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)

    raw = ClipEncoder(tiny_clip_dir, normalize=False).encode(texts)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    assert enc.encode([]).shape == (0, 16)


def test_tiny_clip_errors(tiny_clip_dir, tmp_path):
    enc = ClipEncoder(tiny_clip_dir)
    with pytest.raises(InputError, match="2 texts but 1 images"):
        enc.encode(["a", "b"], images=_images(1))
    with pytest.raises(InputError, match=r"images\[0\]"):
        enc.encode(None, images=[np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(InputError, match="config.json"):
        ClipEncoder(tmp_path).encode(["a"])


def test_clip_preprocess_matches_transformers_processor():
    pil = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    ref = pil.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    imgs = _images(8, seed=3)
    expected = np.asarray(ref(images=imgs, return_tensors="np")["pixel_values"])
    np.testing.assert_allclose(clip_preprocess(imgs, size=32), expected, atol=1e-5)


# ----------------------------------------------------------------- precomputed + factory


def test_precomputed_encoder_lookup_and_errors():
    emb = np.arange(12, dtype=np.float64).reshape(4, 3)
    enc = PrecomputedEncoder([40, 10, 30, 20], emb)
    assert enc.dim == 3 and enc.name == "precomputed" and isinstance(enc, ContentEncoder)
    out = enc.lookup([20, 40, 20])
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, emb[[3, 0, 3]].astype(np.float32))
    assert enc.lookup([]).shape == (0, 3)
    with pytest.raises(InputError, match=r"unknown id\(s\) \[99\]"):
        enc.lookup([10, 99])
    with pytest.raises(InputError, match="use lookup"):
        enc.encode(["a"])
    with pytest.raises(InputError, match="duplicate ids"):
        PrecomputedEncoder([1, 1], np.zeros((2, 3)))
    with pytest.raises(InputError, match="expected 2 ids"):
        PrecomputedEncoder([1, 2, 3], np.zeros((2, 3)))
    with pytest.raises(InputError, match="NaN"):
        PrecomputedEncoder([1, 2], np.array([[0.0, np.nan], [1.0, 1.0]]))


def test_make_encoder(tmp_path, tiny_clip_dir):
    assert isinstance(make_encoder(EncoderConfig()), TextEncoder)
    clip = make_encoder(EncoderConfig(kind="clip", model_path=str(tiny_clip_dir), batch_size=4))
    assert isinstance(clip, ClipEncoder) and clip.batch_size == 4

    ids, emb = np.array([5, 6], np.int64), np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)
    np.savez(tmp_path / "emb.npz", item_ids=ids, embeddings=emb)
    (tmp_path / "dir").mkdir()
    np.save(tmp_path / "dir" / "item_ids.npy", ids)
    np.save(tmp_path / "dir" / "embeddings.npy", emb)
    for src in ("emb.npz", "dir"):
        cfg = EncoderConfig(kind="precomputed", model_path=str(tmp_path / src))
        enc = make_encoder(cfg)  # normalize=True by default
        np.testing.assert_allclose(enc.lookup([5, 6]), [[0.6, 0.8], [0.0, 1.0]], atol=1e-6)
    raw = make_encoder(
        EncoderConfig(kind="precomputed", model_path=str(tmp_path / "dir"), normalize=False)
    )
    np.testing.assert_array_equal(raw.lookup([5]), emb[:1])

    with pytest.raises(ConfigError, match="needs a model_path"):
        make_encoder(EncoderConfig(kind="clip"))
    with pytest.raises(ConfigError, match="EncoderConfig"):
        make_encoder({"kind": "text"})
    with pytest.raises(InputError, match="cannot load precomputed"):
        make_encoder(EncoderConfig(kind="precomputed", model_path=str(tmp_path / "missing")))
