"""The aligner: a trainable head that bends the frozen content space towards behaviour.

:class:`Aligner` maps a raw content embedding to a unit-norm aligned embedding with a
bias-free linear skip (``proj``) plus an optional one-hidden-layer MLP (``mlp``). Its
weights (:meth:`Aligner.export_weights`) follow the layout fixed in
``docs/architecture.md``; ``encode.py`` recomputes the eval forward from them in numpy.
:class:`ItemAligner`, an estimator (``ItemAligner(config).fit(raw_emb, item_ids, pairs)``
-> itself with ``module_``, ``weights_``, ``history_``), fits it on mined ``<trigger,
target>`` pairs with a symmetric in-batch InfoNCE loss, a raw-consistency term that keeps
the aligned similarity structure close to the content space (so cold items keep what the
encoder knows), and early stopping on the pair-AUC of items held out of training.
Training only: torch lives here.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from qarm_features._validate import check_embeddings, check_ids, draw_items, lookup_rows
from qarm_features.align.contrastive import (
    centred_rows,
    normalized_moments,
    pair_rows,
    raw_consistency,
    raw_sample,
    symmetric_nce,
)
from qarm_features.config import AlignerConfig
from qarm_features.errors import ConfigError, DependencyError, InputError, NotFittedError
from qarm_features.metrics import pair_auc, pair_recall_at_k
from qarm_features.threads import limited, usable_cpus

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as exc:  # pragma: no cover - torch is a hard dependency today
    raise DependencyError(
        "qarm_features.align.aligner needs torch: pip install torch==2.13.0 (CPU build)"
    ) from exc

logger = logging.getLogger(__name__)

# Rows pushed through the network at once when embedding a whole catalog.
_EVAL_BATCH = 65_536
# Scale of the MLP's last layer at init: the aligned space starts as the raw PCA space.
_MLP_OUT_INIT_STD = 1e-3
# Per-epoch training statistics, in the order _train_epoch returns them.
_EPOCH_KEYS = ("loss", "loss_nce", "loss_raw", "pairs_per_s")
# Per-epoch validation, flat with scale: pair-AUC on <= 20k sampled val pairs, recall@10 on 1k.
_VAL_AUC_PAIRS, _VAL_RECALL_PAIRS = 20_000, 1_000


def weight_shapes(in_dim: int, cfg: AlignerConfig) -> dict[str, tuple[int, ...]]:
    """The exported weight names and shapes for ``in_dim`` and ``cfg`` (the documented layout)."""
    shapes = {"proj.weight": (cfg.out_dim, in_dim)}
    if cfg.hidden > 0:
        shapes.update(
            {
                "mlp.0.weight": (cfg.hidden, in_dim),
                "mlp.0.bias": (cfg.hidden,),
                "mlp.2.weight": (cfg.out_dim, cfg.hidden),
                "mlp.2.bias": (cfg.out_dim,),
            }
        )
    return shapes


class Aligner(nn.Module):
    """Raw content embedding ``(n, in_dim)`` -> unit-norm aligned embedding ``(n, out_dim)``.

    Eval forward, exactly (nothing else may enter it)::

        x = x / max(||x||, 1e-12)
        y = x @ proj.T + (relu(x @ W0.T + b0) @ W2.T + b2)     # mlp term only if hidden > 0
        out = y / max(||y||, 1e-12)

    In training, dropout (``cfg.dropout``) acts on the MLP input only.

    Args:
        in_dim: width of the raw content embedding.
        cfg: aligner settings (``out_dim``, ``hidden``, ``dropout`` are used here).
    """

    def __init__(self, in_dim: int, cfg: AlignerConfig | None = None):
        super().__init__()
        cfg = cfg if cfg is not None else AlignerConfig()
        if int(in_dim) < 1:
            raise InputError(f"in_dim: must be >= 1, got {in_dim}")
        self.in_dim = int(in_dim)
        self.out_dim = int(cfg.out_dim)
        self.hidden = int(cfg.hidden)
        self.proj = nn.Linear(self.in_dim, self.out_dim, bias=False)
        if self.hidden > 0:
            self.dropout = nn.Dropout(cfg.dropout)
            self.mlp = nn.Sequential(
                nn.Linear(self.in_dim, self.hidden),
                nn.ReLU(),
                nn.Linear(self.hidden, self.out_dim),
            )
        else:
            self.dropout = None
            self.mlp = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, in_dim)`` -> ``(n, out_dim)`` L2-normalised."""
        x = F.normalize(x, dim=-1, eps=1e-12)
        y = self.proj(x)
        if self.mlp is not None:
            y = y + self.mlp(self.dropout(x))
        return F.normalize(y, dim=-1, eps=1e-12)

    @torch.no_grad()
    def init_from_raw(self, raw_emb: np.ndarray, moments=None) -> Aligner:
        """Start from what the content encoder knows: PCA of the (normalised) raw space.

        ``proj`` rows become the top principal directions of the L2-normalised raw
        embeddings (extra rows, when ``out_dim`` exceeds the rank, small random); the MLP's
        last layer starts near zero with its bias set to ``-proj @ mean``, so the initial
        aligned embedding is the normalised, *centred* PCA projection of the raw one
        (centring removes the common direction that makes raw cosines uniformly high);
        ``moments``: ``normalized_moments(raw_emb)`` if the caller already has them.
        """
        x = check_embeddings(raw_emb, name="raw_emb", dim=self.in_dim)
        mean, cov = normalized_moments(x) if moments is None else moments
        evals, evecs = np.linalg.eigh(cov)  # ascending
        order = np.argsort(-evals, kind="stable")
        rank = int(min(self.out_dim, self.in_dim, max(x.shape[0] - 1, 1)))
        comps = evecs[:, order[:rank]].T  # (rank, in_dim)
        # Deterministic sign: the largest-magnitude coordinate of each direction is positive.
        signs = np.sign(comps[np.arange(rank), np.abs(comps).argmax(axis=1)])
        comps *= np.where(signs == 0, 1.0, signs)[:, None]
        weight = self.proj.weight
        weight.mul_(0.01)  # rows beyond the rank keep a small random init
        weight[:rank] = torch.as_tensor(comps, dtype=weight.dtype, device=weight.device)
        if self.mlp is not None:
            last = self.mlp[2]
            last.weight.normal_(0.0, _MLP_OUT_INIT_STD)
            mean_t = torch.as_tensor(mean, dtype=weight.dtype, device=weight.device)
            last.bias.copy_(-(weight @ mean_t))
        return self

    @torch.no_grad()
    def transform(self, raw_emb, *, batch_size: int = _EVAL_BATCH) -> np.ndarray:
        """Eval-mode forward of a numpy matrix: ``(n, in_dim)`` -> float32 ``(n, out_dim)``."""
        x = check_embeddings(raw_emb, name="raw_emb", dim=self.in_dim)
        was_training = self.training
        self.eval()
        device = self.proj.weight.device
        try:
            out = [
                self(torch.from_numpy(x[a : a + batch_size]).to(device)).cpu().numpy()
                for a in range(0, x.shape[0], batch_size)
            ]
        finally:
            self.train(was_training)
        return np.ascontiguousarray(np.concatenate(out).astype(np.float32, copy=False))

    def export_weights(self) -> dict[str, np.ndarray]:
        """The weights as float32 numpy arrays, with exactly the documented names and shapes."""
        return {
            k: np.ascontiguousarray(v.detach().cpu().numpy().astype(np.float32))
            for k, v in self.state_dict().items()
        }

    @classmethod
    def from_weights(cls, weights: dict, in_dim: int, cfg: AlignerConfig | None = None) -> Aligner:
        """Rebuild an aligner from :meth:`export_weights` output (keys and shapes checked)."""
        cfg = cfg if cfg is not None else AlignerConfig()
        expected = weight_shapes(int(in_dim), cfg)
        if set(weights) != set(expected):
            raise InputError(
                f"weights: expected keys {sorted(expected)}, got {sorted(weights)}; "
                "do in_dim/hidden match the config they were trained with?"
            )
        state = {}
        for name, shape in expected.items():
            arr = np.asarray(weights[name], dtype=np.float32)
            if arr.shape != shape:
                raise InputError(f"weights[{name!r}]: expected shape {shape}, got {arr.shape}")
            if not np.isfinite(arr).all():
                raise InputError(f"weights[{name!r}]: holds NaN or inf")
            state[name] = torch.from_numpy(arr.copy())
        model = cls(in_dim, cfg)
        model.load_state_dict(state)
        return model.eval()


# --------------------------------------------------------------------------- training
def _resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"AlignerConfig.device: {name!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"AlignerConfig.device: {name!r} requested but CUDA is not available; use 'cpu'"
        )
    return device


@dataclass
class _Holdout:
    """Train pairs (catalog rows) and the validation pairs of held-out items."""

    train_a: np.ndarray
    train_b: np.ndarray
    val_pairs: pd.DataFrame | None  # ids; None = no validation
    n_val_items: int
    n_val_pairs: int


def _hold_out_items(ids, ti, gi, val_items, cfg: AlignerConfig) -> _Holdout:
    """Every pair touching a validation item leaves training and becomes a validation pair.

    ``val_items=None`` draws ``cfg.val_fraction`` of the paired items (``cfg.seed``).
    """
    if val_items is None:
        val_rows = draw_items(np.concatenate([ti, gi]), cfg.val_fraction, cfg.seed, at_least=1)
    else:
        val_ids = check_ids(np.asarray(val_items).reshape(-1), name="val_items", unique=False)
        val_rows = np.unique(lookup_rows(val_ids, ids, name="val_items"))
    is_val = np.zeros(ids.size, dtype=bool)
    is_val[val_rows] = True
    touches = is_val[ti] | is_val[gi]
    validate = val_rows.size > 0
    if not (~touches).any():
        raise InputError(
            f"ItemAligner: every pair touches the {val_rows.size} validation items; "
            "hold out fewer items (val_fraction / val_items)"
        )
    if validate and not touches.any():
        raise InputError(
            "ItemAligner: no pair touches the validation items; pass val_items that "
            "appear in pairs, or val_items=[] to train without validation"
        )
    val_pairs = None
    if validate:
        val_pairs = pd.DataFrame({"trigger_id": ids[ti[touches]], "target_id": ids[gi[touches]]})
    return _Holdout(
        train_a=ti[~touches],
        train_b=gi[~touches],
        val_pairs=val_pairs,
        n_val_items=int(val_rows.size),
        n_val_pairs=int(touches.sum()),
    )


def _batch_loss(model: Aligner, x_all, mean, a, b, cfg: AlignerConfig, raw_rows=None, raw_weight=1):
    """``(loss, nce, raw_term)`` of one batch of pairs (catalog rows ``a``, ``b``).

    Triggers and targets go through the model in one forward of ``2B`` rows (one gather,
    one GEMM per layer); ``za``, ``zb`` are views of it. The raw-consistency term reads
    the positions ``raw_rows`` of those ``2B`` rows (:func:`raw_sample`; ``None``: all of
    them, as they are) against their centred reference rows (:func:`centred_rows` of the
    gathered raw rows and the catalog's normalised ``mean``); ``loss`` counts it
    ``raw_weight`` times (the steps it stands for, ``AlignerConfig.raw_consistency_every``;
    0: not computed this step, ``raw_term`` is 0).
    """
    m = a.numel()
    x = x_all[torch.cat([a, b])]
    z = model(x)
    za, zb = z[:m], z[m:]
    nce = symmetric_nce(za, zb, a, b, cfg.temperature)
    loss = nce
    raw_term = torch.zeros((), device=nce.device)
    if cfg.raw_consistency > 0 and raw_weight > 0:
        if raw_rows is not None:
            z, x = z[raw_rows], x[raw_rows]
        raw_term = raw_consistency(z, centred_rows(x, mean))
        loss = loss + (cfg.raw_consistency * raw_weight) * raw_term
    return loss, nce, raw_term


class ItemAligner:
    """Fits an :class:`Aligner` on ``<trigger, target>`` pairs (an estimator).

    Loss per batch of pairs ``(a_i, b_i)`` with aligned embeddings ``za, zb``::

        nce = (CE(za @ zb.T / T) + CE(zb @ za.T / T)) / 2          # in-batch, symmetric
        raw = mean_{i != j} (S_aligned[i, j] - S_raw[i, j])^2        # over the 2B batch items
        loss = nce + config.raw_consistency * raw

    ``S_raw``: cosines of the *centred* normalised raw embeddings (the aligner's start,
    :meth:`Aligner.init_from_raw`). In-batch false negatives are masked. ``raw`` is
    estimated on ``config.raw_consistency_rows`` of the 2B items drawn afresh each step
    (uniform, seeded; an unbiased estimate, :func:`~qarm_features.align.contrastive.raw_sample`).

    Validation: the items ``val_items`` (default: a random ``config.val_fraction`` of the
    items in ``pairs``) are held out; every pair touching one of them leaves training and
    forms the validation set, so validation measures generalisation to items never seen
    in training. After each epoch the val pair-AUC (:func:`metrics.pair_auc`, negatives
    matched on ``popularity``) is computed on a seeded sample of <= 20k validation pairs
    (recall@10 on 1k); training stops after ``config.patience`` epochs without
    improvement and the best weights (epoch 0 = the PCA init included) are restored. ``val_items=[]`` disables validation: all pairs train for
    ``config.max_epochs`` epochs (use it to refit on everything once the epoch count is known).
    Either way the loop stops at the first step past ``config.max_seconds`` (the partial
    epoch is scored like a full one). The loop runs ``config.threads`` torch threads (1 by
    default), the bulk numpy work every CPU this process may use
    (:func:`qarm_features.threads.usable_cpus`); both are restored afterwards.

    Args:
        config: aligner settings (defaults when ``None``); ``config.seed`` seeds the
            hold-out draw, the initialisation, dropout and the batch order.

    Attributes:
        module_: the fitted :class:`Aligner`, eval mode, on ``config.device``.
        weights_: :meth:`Aligner.export_weights` of ``module_`` (the bundle's weights).
        in_dim_: width of the raw embedding it was fitted on.
        history_: per-epoch ``loss``, ``loss_nce``, ``loss_raw``, ``pairs_per_s`` (epochs
            1..E) and ``val_pair_auc``, ``val_recall_at_10`` (epochs 0..E, 0 = init),
            ``best_epoch``, ``best_val_pair_auc``, ``raw_val_pair_auc`` and
            ``raw_val_recall_at_10`` (the raw space on the same validation pairs and
            negatives), ``n_train_pairs``, ``n_val_pairs``, ``n_val_pairs_scored``,
            ``n_val_items``, ``epochs_run``, ``stopped_by`` (``"patience"``,
            ``"max_epochs"`` or ``"max_seconds"``).
    """

    def __init__(self, config: AlignerConfig | None = None) -> None:
        self.config = config

    def _config(self) -> AlignerConfig:
        cfg = self.config if self.config is not None else AlignerConfig()
        if not isinstance(cfg, AlignerConfig):
            raise ConfigError(f"config: expected an AlignerConfig, got {type(cfg).__name__}")
        return cfg

    def fit(
        self,
        raw_emb,
        item_ids,
        pairs,
        *,
        val_items=None,
        popularity=None,
        init_weights: dict | None = None,
        progress: bool = False,
    ) -> ItemAligner:
        """Train on ``pairs`` over the catalog ``(item_ids, raw_emb)``; returns ``self``.

        Args:
            raw_emb: ``(n, in_dim)`` frozen content embeddings of the catalog.
            item_ids: ``(n,)`` int64 ids of ``raw_emb`` rows.
            pairs: DataFrame with ``trigger_id``, ``target_id`` (ids in ``item_ids``).
            val_items: ids to hold out, ``None`` for a random split, empty for no validation.
            popularity: interaction counts for popularity-matched negatives (Series keyed
                by id, or array aligned with ``item_ids``); default: item degree in ``pairs``.
            init_weights: start from these weights (:meth:`Aligner.export_weights` of the
                previous bundle: a warm start) instead of the raw space's PCA.
            progress: log each epoch at INFO level (DEBUG otherwise).

        Raises:
            InputError: bad shapes, NaN, unknown ids, or nothing left to train/validate on.
            ConfigError: a config of the wrong type or an unusable device.
        """
        cfg = self._config()
        raw = check_embeddings(raw_emb, name="raw_emb")
        ids = check_ids(item_ids, name="item_ids", n=raw.shape[0])
        ti, gi = pair_rows(pairs, ids)
        device = _resolve_device(cfg.device)
        hold = _hold_out_items(ids, ti, gi, val_items, cfg)
        if popularity is None:
            popularity = np.bincount(np.concatenate([ti, gi]), minlength=ids.size)
            popularity = popularity.astype(np.float64)
        history: dict = {k: [] for k in (*_EPOCH_KEYS, "val_pair_auc", "val_recall_at_10")}
        history.update(
            n_train_pairs=int(hold.train_a.size),
            n_val_pairs=hold.n_val_pairs,
            n_val_items=hold.n_val_items,
        )
        validate = hold.val_pairs is not None
        if validate:
            perm = np.random.default_rng(cfg.seed).permutation(len(hold.val_pairs))
            auc_pairs, recall_pairs = (
                hold.val_pairs.iloc[np.sort(perm[:m])] for m in (_VAL_AUC_PAIRS, _VAL_RECALL_PAIRS)
            )
            history["n_val_pairs_scored"] = int(len(auc_pairs))

        def score(space: np.ndarray) -> tuple[float, float]:
            """Validation pair-AUC and recall@10 of an embedding of the catalog."""
            auc_v = pair_auc(space, ids, auc_pairs, popularity, seed=cfg.seed)
            return auc_v, pair_recall_at_k(space, ids, recall_pairs, k=10)

        if validate:
            history["raw_val_pair_auc"], history["raw_val_recall_at_10"] = score(raw)
        fork_devices = []
        if device.type == "cuda":
            index = device.index
            fork_devices = [index if index is not None else torch.cuda.current_device()]
        cpus = usable_cpus()
        with (
            torch.random.fork_rng(devices=fork_devices),
            limited(cpus, torch_threads=cfg.threads or cpus),
        ):
            torch.manual_seed(cfg.seed)
            scorer = score if validate else None
            model = self._train(raw, hold, cfg, device, history, scorer, progress, init_weights)
        model.eval()
        self.module_ = model
        self.weights_ = model.export_weights()
        self.in_dim_ = int(raw.shape[1])
        self.history_ = history
        return self

    def _train(self, raw, hold: _Holdout, cfg, device, history, score, progress, init=None):
        """Epoch loop with early stopping on ``score`` (None: no validation)."""
        need = init is None or cfg.raw_consistency > 0  # one pass serves both uses
        mean = cov = None
        if need:
            mean, cov = normalized_moments(raw)
        if init is not None:
            model = Aligner.from_weights(init, raw.shape[1], cfg).train().to(device)
        else:
            model = Aligner(raw.shape[1], cfg).init_from_raw(raw, (mean, cov)).to(device)
        x_all = torch.from_numpy(raw).to(device)
        mean_t = None if mean is None else torch.as_tensor(mean, dtype=x_all.dtype, device=device)
        a_all = torch.from_numpy(hold.train_a).to(device)
        b_all = torch.from_numpy(hold.train_b).to(device)
        gen = torch.Generator().manual_seed(cfg.seed)  # CPU generator: same order on any device
        # The raw term's row samples draw from a stream of their own: the batch order does
        # not depend on raw_consistency_rows.
        raw_gen = torch.Generator().manual_seed(cfg.seed + 1)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_train = hold.train_a.size
        bs = min(cfg.batch_size, n_train)

        best_epoch, best_auc, best_state, since = 0, -np.inf, None, 0
        if score is not None:
            auc0, rec0 = score(model.transform(raw))
            history["val_pair_auc"].append(auc0)
            history["val_recall_at_10"].append(rec0)
            best_auc = auc0 if np.isfinite(auc0) else -np.inf  # NaN: any real AUC beats it
            best_state = copy.deepcopy(model.state_dict())
        log = logger.info if progress else logger.debug
        epoch, stopped_by = 0, "max_epochs"
        deadline = None if cfg.max_seconds is None else time.perf_counter() + cfg.max_seconds
        for epoch in range(1, cfg.max_epochs + 1):
            if deadline is not None and time.perf_counter() > deadline:  # spent in validation
                epoch, stopped_by = epoch - 1, "max_seconds"
                break
            perm = torch.randperm(n_train, generator=gen).to(device)
            *stats, out_of_time = _train_epoch(
                model, opt, x_all, mean_t, a_all, b_all, perm, bs, cfg, raw_gen, deadline
            )
            for key, value in zip(_EPOCH_KEYS, stats):
                history[key].append(value)
            if out_of_time:
                stopped_by = "max_seconds"
                logger.warning(
                    "aligner: stopped in epoch %d at the %.0f s budget "
                    "(AlignerConfig.max_seconds); keeping the best-validated weights",
                    epoch,
                    cfg.max_seconds,
                )
            if score is None:
                log("aligner epoch %d loss %.4f", epoch, history["loss"][-1])
                if out_of_time:
                    break
                continue
            auc_e, rec_e = score(model.transform(raw))
            history["val_pair_auc"].append(auc_e)
            history["val_recall_at_10"].append(rec_e)
            msg = "aligner epoch %d loss %.4f val pair-AUC %.4f recall@10 %.4f"
            log(msg, epoch, history["loss"][-1], auc_e, rec_e)
            if auc_e > best_auc:
                best_epoch, best_auc, since = epoch, auc_e, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since += 1
                if since >= cfg.patience and not out_of_time:
                    stopped_by = "patience"
                    break
            if out_of_time:
                break
        history["epochs_run"] = epoch
        history["stopped_by"] = stopped_by
        if score is not None:
            model.load_state_dict(best_state)
            history["best_epoch"] = best_epoch
            history["best_val_pair_auc"] = float(best_auc)
        else:
            history["best_epoch"] = epoch
            history["best_val_pair_auc"] = float("nan")
        return model

    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise NotFittedError("ItemAligner is not fitted; call fit(raw_emb, item_ids, pairs)")

    def transform(self, raw_emb) -> np.ndarray:
        """Eval-mode torch forward: ``(n, in_dim)`` -> float32 ``(n, out_dim)``.

        The served aligned space is :func:`qarm_features.bundle.encode.align_with_weights` of
        :attr:`weights_` (numpy float64); the two agree to float32 rounding.

        Raises:
            NotFittedError: before :meth:`fit`.
        """
        self._check_fitted()
        return self.module_.transform(raw_emb)


def _train_epoch(model, opt, x_all, mean, a_all, b_all, perm, bs, cfg, raw_gen, deadline=None):
    """One pass over the train pairs in ``perm`` order; mean losses (summed on the device,
    read once: no host sync per step), pairs/s, and whether it stopped early because
    ``time.perf_counter()`` passed ``deadline`` (checked after each step).

    The raw-consistency term is computed on the first step of each block of
    ``cfg.raw_consistency_every`` steps, weighted by the block's length (the last block
    may be shorter), on rows ``raw_gen`` draws (:func:`raw_sample`). Reported: ``loss_raw``
    is its pair-weighted mean over the steps that computed it, ``loss`` is
    ``loss_nce + cfg.raw_consistency * loss_raw``.
    """
    model.train()
    t0 = time.perf_counter()
    sums = torch.zeros(2, dtype=torch.float64, device=x_all.device)  # nce, raw (pair sums)
    starts = [s for s in range(0, perm.numel(), bs) if min(bs, perm.numel() - s) >= 2]
    every = cfg.raw_consistency_every if cfg.raw_consistency > 0 else 0
    seen, seen_raw, out_of_time = 0, 0, False
    for step, s in enumerate(starts):
        if deadline is not None and seen and time.perf_counter() > deadline:
            out_of_time = True
            break
        idx = perm[s : s + bs]  # >= 2 pairs: a lone pair has no in-batch negative
        a, b = a_all[idx], b_all[idx]
        m = idx.numel()
        raw_rows, raw_weight = None, 0
        if every and step % every == 0:
            raw_weight = min(every, len(starts) - step)
            raw_rows = raw_sample(2 * m, cfg.raw_consistency_rows, raw_gen)
            raw_rows = None if raw_rows is None else raw_rows.to(x_all.device)
            seen_raw += m
        loss, nce, raw_term = _batch_loss(model, x_all, mean, a, b, cfg, raw_rows, raw_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums += torch.stack([nce.detach(), raw_term.detach()]).double() * m
        seen += m
    elapsed = max(time.perf_counter() - t0, 1e-9)
    nce_sum, raw_sum = sums.tolist()
    loss_nce, loss_raw = nce_sum / max(seen, 1), raw_sum / max(seen_raw, 1)
    loss = loss_nce + cfg.raw_consistency * loss_raw
    return loss, loss_nce, loss_raw, seen / elapsed, out_of_time
