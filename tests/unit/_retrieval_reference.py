"""The BPR-MF retrieval model as it was before issue 9 (main at 901e8f1): a slow reference.

Dense torch Adam: every step updates the whole user and item tables, which is what made
pair mining cost ~940 s at 200k items. :class:`qarm_features.pairs.retrieval.BPRMF` now trains
with sparse SGD updates (implicit); this copy is what its tests compare quality against.
Verbatim except for the class name.
"""

from __future__ import annotations

import logging

import numpy as np

from qarm_features._validate import check_interactions
from qarm_features.config import PairsConfig
from qarm_features.errors import DependencyError, InputError, NotFittedError

logger = logging.getLogger(__name__)

_INIT_STD = 0.1
_NEG_RESAMPLE_ROUNDS = 5


class ReferenceBPRMF:
    """BPR matrix factorisation on positives; seeded and single-process.

    ~55k MovieLens positives x 30 epochs take a few seconds on one core.

    Args:
        dim: embedding width.
        epochs: passes over the positives.
        seed: seeds initialisation, negative sampling and batch order.
        positive_threshold: ``rating >= threshold`` is a positive.
        lr: Adam learning rate.
        batch_size: positives per step.
        reg: L2 penalty on the embeddings touched by a batch.

    Attributes:
        item_ids_: ``(n_items,)`` int64, every item of the log (positive or not), sorted.
        item_emb_: ``(n_items, dim)`` float32 item vectors (the retrieval item space).
        item_bias_: ``(n_items,)`` float32 item biases.
        user_ids_: ``(n_users,)`` int64 users with at least one positive, sorted.
        user_emb_: ``(n_users, dim)`` float32 user vectors.
        loss_: mean BPR loss per epoch.
    """

    def __init__(
        self,
        *,
        dim: int = 32,
        epochs: int = 30,
        seed: int = 0,
        positive_threshold: float = 4.0,
        lr: float = 0.01,
        batch_size: int = 1024,
        reg: float = 1e-4,
    ) -> None:
        self.dim = dim
        self.epochs = epochs
        self.seed = seed
        self.positive_threshold = positive_threshold
        self.lr = lr
        self.batch_size = batch_size
        self.reg = reg

    @classmethod
    def from_config(cls, cfg: PairsConfig) -> "ReferenceBPRMF":
        """The retrieval model :func:`~qarm_features.pairs.mining.mine_pairs` fits for ``cfg``."""
        return cls(
            dim=cfg.mf_dim,
            epochs=cfg.mf_epochs,
            seed=cfg.seed,
            positive_threshold=cfg.positive_threshold,
        )

    def fit(self, interactions) -> "ReferenceBPRMF":
        """Fit on the positives of ``interactions`` (``[user_id, item_id, rating, timestamp]``).

        Raises:
            InputError: a malformed log, no positive row, or ``dim``/``epochs``/
                ``batch_size`` below 1.
        """
        try:
            import torch
            import torch.nn.functional as F
        except ImportError as exc:  # pragma: no cover - torch is a hard dependency today
            raise DependencyError("BPRMF needs torch: pip install torch==2.13.0") from exc
        dim, epochs, batch_size = self.dim, self.epochs, self.batch_size
        if dim < 1 or epochs < 1 or batch_size < 1:
            raise InputError(
                f"BPRMF: dim, epochs and batch_size must be >= 1, got {dim}, {epochs}, "
                f"{batch_size}"
            )
        log = check_interactions(interactions)
        pos = log.loc[log["rating"] >= self.positive_threshold]
        pos = pos.drop_duplicates(["user_id", "item_id"])
        if pos.empty:
            raise InputError(
                f"interactions: no positive rows (rating >= {self.positive_threshold}); "
                "BPRMF needs positives"
            )
        item_ids = np.unique(log["item_id"].to_numpy())
        user_ids = np.unique(pos["user_id"].to_numpy())
        n_items, n_users = item_ids.size, user_ids.size
        u = np.searchsorted(user_ids, pos["user_id"].to_numpy())
        i = np.searchsorted(item_ids, pos["item_id"].to_numpy())
        pos_keys = np.sort(u.astype(np.int64) * n_items + i)
        rng = np.random.default_rng(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        user_emb = torch.nn.Parameter(torch.randn(n_users, dim, generator=gen) * _INIT_STD)
        item_emb = torch.nn.Parameter(torch.randn(n_items, dim, generator=gen) * _INIT_STD)
        item_bias = torch.nn.Parameter(torch.zeros(n_items))
        opt = torch.optim.Adam([user_emb, item_emb, item_bias], lr=self.lr)
        u_t, i_t = torch.from_numpy(u), torch.from_numpy(i)
        n = u.size
        losses = []
        for epoch in range(epochs):
            j_t = torch.from_numpy(_negatives(rng, u, pos_keys, n_items))
            perm = torch.from_numpy(rng.permutation(n))
            total = 0.0
            for a in range(0, n, batch_size):
                idx = perm[a : a + batch_size]
                ub, ib, jb = u_t[idx], i_t[idx], j_t[idx]
                pu, qi, qj = user_emb[ub], item_emb[ib], item_emb[jb]
                diff = (pu * (qi - qj)).sum(1) + item_bias[ib] - item_bias[jb]
                loss = -F.logsigmoid(diff).mean() + self.reg * (
                    pu.pow(2).sum() + qi.pow(2).sum() + qj.pow(2).sum()
                ) / idx.numel()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
            losses.append(total / n)
            logger.debug("BPRMF epoch %d loss %.4f", epoch, losses[-1])
        self.item_ids_ = item_ids.astype(np.int64)
        self.item_emb_ = np.ascontiguousarray(item_emb.detach().numpy().astype(np.float32))
        self.item_bias_ = item_bias.detach().numpy().astype(np.float32)
        self.user_ids_ = user_ids.astype(np.int64)
        self.user_emb_ = np.ascontiguousarray(user_emb.detach().numpy().astype(np.float32))
        self.loss_ = losses
        return self

    def item_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """``(item_ids_, item_emb_)``: what U2I mining reads.

        Raises:
            NotFittedError: before :meth:`fit`.
        """
        if not hasattr(self, "item_emb_"):
            raise NotFittedError("BPRMF is not fitted; call fit(interactions) first")
        return self.item_ids_, self.item_emb_


def _negatives(rng: np.random.Generator, u: np.ndarray, pos_keys: np.ndarray, n_items: int):
    """One uniform negative per positive, re-drawn (a few rounds) where it is a positive."""
    n = u.size
    neg = rng.integers(0, n_items, size=n)
    for _ in range(_NEG_RESAMPLE_ROUNDS):
        keys = u.astype(np.int64) * n_items + neg
        hit = pos_keys[np.minimum(np.searchsorted(pos_keys, keys), n - 1)] == keys
        if not hit.any():
            break
        neg[hit] = rng.integers(0, n_items, size=int(hit.sum()))
    return neg
