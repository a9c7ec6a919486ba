"""The evaluation's second ranker: deepctr-torch's DeepFM, a CTR model the project did not write.

Issue 17: the lift must not be an artefact of our own ranker
(:class:`~qarm_features.app.ranker.DINRanker`). :func:`train_deepfm` trains the public
library's ``DeepFM`` per variant on the same rows, labels, splits and seed as
:func:`~qarm_features.app.variants.train_ranker`, with the same budget (``dim``,
``epochs``, ``patience``, ``batch_size``, ``lr``, ``dropout``, the MLP widths) and the same
early stopping (best epoch by validation AUC), fed what that variant's item tower gets
(:class:`DeepFMInputs`, built from :func:`~qarm_features.app.variants.variant_items`):

- ``user`` (sparse): the user index, 0 = no training row;
- ``item`` (sparse): the item-id row + 1, so row 1 is the OOV id cold and new items get
  (as in DIN) and row 0 is the history's padding;
- ``hist_item`` (``VarLenSparseFeat``, mean pooling): the point-in-time history's item-id
  rows, sharing the ``item`` table;
- per variant: ``dense`` (``DenseFeat``, the raw or aligned embedding), one sparse feature
  per RQ slot (level codes and/or prefix ids, exactly DIN's slots for ``cfg.rq_mode``:
  :meth:`~qarm_features.ranking.RQCodeEmbedding.slot_ids`) and ``vq`` (``VarLenSparseFeat``
  of the top-K VQ codes, mean pooling). Cold items keep their codes and embedding.

What DIN has and this model does not: history labels and history items' codes (the
library pools history ids only), target attention, content-initialised code tables
(``content_codes``) and RQ level dropout. The library's own defaults stand for the rest
(init, L2 on embeddings); its progress output is off (``verbose=0``, stdout of ``fit``
discarded), as is the PyPI version check its ``import`` starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import threading

import numpy as np

from qarm_features.app.protocol import EvalConfig, Rows, Split
from qarm_features.app.variants import fit_best_epoch

LIBRARY = "deepctr-torch"
# Test / validation rows scored at once (the library's default of 256 costs ~10x).
PREDICT_BATCH = 8192


class _NoVersionCheck(threading.Thread):
    """A thread, except deepctr-torch's import-time PyPI version check, which never starts
    (a module that binds ``Thread`` while the patch is on keeps working threads)."""

    def start(self) -> None:
        target = getattr(self, "_target", None)
        if getattr(target, "__qualname__", "") != "check_version.<locals>.check":
            super().start()


def _deepctr():
    """``(DeepFM, SparseFeat, VarLenSparseFeat, DenseFeat, version)``, imported with the
    package's version check off: its ``__init__`` starts a thread that asks PyPI for a
    newer release and prints to stdout when it cannot reach it (offline machines)."""
    import sys

    from qarm_features.errors import DependencyError

    if "deepctr_torch" not in sys.modules:
        try:
            original = threading.Thread
            threading.Thread = _NoVersionCheck  # seen by its `from threading import Thread`
            try:
                import deepctr_torch
            finally:
                threading.Thread = original
        except ImportError as exc:
            raise DependencyError(
                f"the DeepFM ranker needs {LIBRARY} ({exc}); `pip install {LIBRARY}`, or "
                "leave 'deepfm' out of EvalConfig.rankers"
            ) from exc
    import deepctr_torch
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DeepFM

    return DeepFM, SparseFeat, VarLenSparseFeat, DenseFeat, deepctr_torch.__version__


def library_title() -> str:
    """``"DeepFM (deepctr-torch x.y.z)"``: the report's section title."""
    return f"DeepFM ({LIBRARY} {_deepctr()[-1]})"


class DeepFMInputs:
    """One variant's deepctr-torch feature columns and the row arrays that feed them.

    Args:
        ranker_kw: :func:`~qarm_features.app.variants.variant_items`' RankerConfig
            arguments (sizes of the variant's parts).
        items: its :class:`~qarm_features.ranking.ItemFeatures` (one row per catalog item).
        split: the seed's split (item-id rows, user count).
        cfg: the protocol (``dim``, ``rq_mode``, ``prefix_buckets``).

    Attributes:
        columns: the feature columns (linear and DNN parts read the same ones).
        names: their names, in column order.
    """

    def __init__(self, ranker_kw: dict, items, split: Split, cfg: EvalConfig) -> None:
        from qarm_features.ranking import RQCodeEmbedding

        _model, Sparse, VarLen, Dense, _v = _deepctr()
        d = cfg.dim
        n_ids = int(split.item_id_index.max()) + 1
        item = Sparse("item", n_ids + 1, d, embedding_name="item")
        self._hist = VarLen(
            Sparse("hist_item", n_ids + 1, d, embedding_name="item"),
            maxlen=cfg.history_len,
            combiner="mean",
        )
        self.columns = [Sparse("user", split.n_users, d), item, self._hist]
        # Per catalog row: name -> (n_catalog,) or (n_catalog, w) values (0 = padding).
        self._per_item = {"item": items.id_index.numpy() + 1}
        self._id_rows = self._per_item["item"]
        if items.rq is not None:
            rq = RQCodeEmbedding(
                ranker_kw["rq_levels"],
                ranker_kw["rq_codes"],
                1,
                mode=cfg.rq_mode,
                prefix_buckets=cfg.prefix_buckets,
            )
            ids = rq.slot_ids(items.rq).numpy()
            for s, (kind, pos, offset, size) in enumerate(rq.slots):
                name = f"rq_{kind}{pos + (kind == 'level')}"
                self.columns.append(Sparse(name, size, d))
                self._per_item[name] = ids[:, s] - offset
        if items.vq is not None:
            vq = items.vq.numpy()
            if ranker_kw.get("vq_tied"):  # codes are item-id rows - 1: read the item table
                sparse = Sparse("vq", n_ids + 1, d, embedding_name="item")
                self._per_item["vq"] = np.where(vq >= 0, vq + 2, 0)
            else:
                sparse = Sparse("vq", ranker_kw["vq_vocab"] + 1, d)
                self._per_item["vq"] = vq + 1  # -1 (padding) -> 0
            self.columns.append(VarLen(sparse, maxlen=vq.shape[1], combiner="mean"))
        if items.dense is not None:
            self.columns.append(Dense("dense", items.dense.shape[1]))
            self._per_item["dense"] = items.dense.numpy()
        self.names = [c.name for c in self.columns]

    def rows(self, rows: Rows) -> dict[str, np.ndarray]:
        """The model's input arrays (float32, the library concatenates them) for ``rows``."""
        out = {
            "user": rows.user,
            "hist_item": np.where(rows.hist >= 0, self._id_rows[np.maximum(rows.hist, 0)], 0),
        }
        for name, table in self._per_item.items():
            out[name] = table[rows.item]
        return {n: np.asarray(out[n], dtype=np.float32) for n in self.names}


def _mlp_hidden() -> tuple[int, ...]:
    """DINRanker's MLP widths (RankerConfig's default): the same budget for DeepFM's DNN."""
    from qarm_features.app.ranker import RankerConfig

    return {f.name: f for f in dataclasses.fields(RankerConfig)}["mlp_hidden"].default


def train_deepfm(ranker_kw: dict, items, split: Split, cfg: EvalConfig, seed: int):
    """Train one DeepFM (budget from ``cfg``), keep the best validation epoch.

    Args: as :func:`~qarm_features.app.variants.train_ranker` (``ranker_kw`` and
        ``items`` from :func:`~qarm_features.app.variants.variant_items`).

    Returns:
        ``(test_scores, info)``: ``(n_test,)`` float64 probabilities; ``info`` = best epoch,
        validation AUC per epoch, params, ``inputs`` (the feature names).
    """
    import torch

    DeepFM = _deepctr()[0]
    inputs = DeepFMInputs(ranker_kw, items, split, cfg)
    torch.manual_seed(seed)  # the library seeds its init; the batch order draws from torch
    model = DeepFM(
        inputs.columns,
        inputs.columns,
        dnn_hidden_units=_mlp_hidden(),
        dnn_dropout=cfg.dropout,
        seed=seed,
        device="cpu",
    )
    model.compile(torch.optim.Adam(model.parameters(), lr=cfg.lr), "binary_crossentropy")
    x_fit, x_val = inputs.rows(split.fit), inputs.rows(split.val)

    def train_epoch() -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # fit prints its device and sizes
            model.fit(x_fit, split.fit.y, batch_size=cfg.batch_size, epochs=1, verbose=0)

    info = fit_best_epoch(
        model, train_epoch, lambda: model.predict(x_val, PREDICT_BATCH).ravel(), split, cfg
    )
    info["inputs"] = inputs.names
    return model.predict(inputs.rows(split.test_rows), PREDICT_BATCH).ravel(), info
