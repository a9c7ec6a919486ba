"""The light retrieval model behind U2I pair mining: BPR matrix factorisation.

QARM's U2I pairs take as trigger the target's nearest neighbour, *in a retrieval model's
item space*, among the user's recent positives (:func:`qarm_features.pairs.mining.mine_u2i_pairs`).
A team passes its own retrieval item embeddings; without them, :class:`BPRMF` fits one on
the positives of the interaction log:

    score(u, i) = p_u . q_i + b_i

Each positive ``(u, i)`` is contrasted with one item drawn uniformly among the items ``u``
has no positive with (BPR loss), by sparse SGD: a step touches the three rows it samples
and nothing else, so an epoch costs ``O(positives x dim)`` whatever the catalog size (the
dense-Adam trainer this replaces updated every row every step: ~940 s of pair mining at
200k items). The kernel is ``implicit``'s compiled BPR (its last factor column is the item
bias, against a user column fixed at 1). The item bias absorbs popularity, so the item
vectors carry taste rather than head-ness. An estimator: ``__init__`` stores
hyperparameters, :meth:`BPRMF.fit` returns ``self`` with the learned state in attributes
ending in ``_``. Training only; ``implicit`` is imported when :meth:`BPRMF.fit` runs.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from qarm_features._validate import check_ids, check_interactions
from qarm_features.config import PairsConfig
from qarm_features.errors import DependencyError, InputError, NotFittedError

logger = logging.getLogger(__name__)


class BPRMF:
    """BPR matrix factorisation on positives; seeded, sparse SGD updates.

    ~55k MovieLens positives x 30 epochs take well under a second; 18M positives x 30
    epochs about 5 minutes on one core (~2M samples/s, memory-bound row gathers).

    Args:
        dim: embedding width.
        epochs: passes over the positives.
        seed: seeds initialisation and negative sampling.
        positive_threshold: ``rating >= threshold`` is a positive.
        lr: SGD learning rate (0.05: clusters separate within ~10 epochs on small logs,
            where implicit's default 0.01 has barely moved them after 15).
        reg: L2 penalty on the rows a step touches (implicit's default).
        n_threads: SGD threads. 1 (default) is reproducible bit for bit; more threads run
            lock-free (Hogwild) updates whose order, hence result, varies between runs.

    Attributes:
        item_ids_: ``(n_items,)`` int64, every item of the log (positive or not), sorted.
        item_emb_: ``(n_items, dim)`` float32 item vectors (the retrieval item space).
        item_bias_: ``(n_items,)`` float32 item biases.
        user_ids_: ``(n_users,)`` int64 users with at least one positive, sorted.
        user_emb_: ``(n_users, dim)`` float32 user vectors.
        train_auc_: per epoch, the fraction of sampled (positive, negative) comparisons the
            model ranked right before its update (rises as it learns).
    """

    def __init__(
        self,
        *,
        dim: int = 32,
        epochs: int = 30,
        seed: int = 0,
        positive_threshold: float = 4.0,
        lr: float = 0.05,
        reg: float = 0.01,
        n_threads: int = 1,
    ) -> None:
        self.dim = dim
        self.epochs = epochs
        self.seed = seed
        self.positive_threshold = positive_threshold
        self.lr = lr
        self.reg = reg
        self.n_threads = n_threads

    @classmethod
    def from_config(cls, cfg: PairsConfig) -> BPRMF:
        """The retrieval model :func:`~qarm_features.pairs.mining.mine_pairs` fits for ``cfg``."""
        return cls(
            dim=cfg.mf_dim,
            epochs=cfg.mf_epochs,
            seed=cfg.seed,
            positive_threshold=cfg.positive_threshold,
        )

    def fit(self, interactions) -> BPRMF:
        """Fit on the positives of ``interactions`` (``[user_id, item_id, rating, timestamp]``).

        Raises:
            InputError: a malformed log, no positive row, or ``dim``/``epochs``/
                ``n_threads`` below 1.
            DependencyError: ``implicit`` is not installed.
        """
        try:
            from implicit.cpu.bpr import BayesianPersonalizedRanking
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise DependencyError("BPRMF needs implicit: pip install implicit") from exc
        dim, epochs, n_threads = int(self.dim), int(self.epochs), int(self.n_threads)
        if dim < 1 or epochs < 1 or n_threads < 1:
            raise InputError(
                f"BPRMF: dim, epochs and n_threads must be >= 1, got {self.dim}, "
                f"{self.epochs}, {self.n_threads}"
            )
        # Validates every row, copies only the positives (not the whole log).
        log = check_interactions(interactions, min_rating=self.positive_threshold)
        item_ids = np.unique(
            check_ids(interactions["item_id"].to_numpy(), name="interactions.item_id", unique=False)
        )
        users = log["user_id"].to_numpy()
        items = log["item_id"].to_numpy()
        del log
        if users.size == 0:
            raise InputError(
                f"interactions: no positive rows (rating >= {self.positive_threshold}); "
                "BPRMF needs positives"
            )
        user_ids, u = np.unique(users, return_inverse=True)
        i = np.searchsorted(item_ids, items)
        del users, items
        # Duplicates (repeated positives) sum in the CSR; BPR reads non-zeros as binary.
        ui = sp.csr_matrix(
            (np.ones(u.size, np.float32), (u, i)), shape=(user_ids.size, item_ids.size)
        )
        del u, i
        model = BayesianPersonalizedRanking(
            factors=dim,
            learning_rate=float(self.lr),
            regularization=float(self.reg),
            iterations=epochs,
            num_threads=n_threads,
            random_state=int(self.seed),
            verify_negative_samples=True,
        )
        auc: list[float] = []

        def on_epoch(epoch, _elapsed, correct, skipped):
            seen = max(ui.nnz - skipped, 1)  # skipped: negatives that were positives
            auc.append(correct / seen)
            logger.debug("BPRMF epoch %d train AUC %.4f", epoch, auc[-1])

        model.fit(ui, show_progress=False, callback=on_epoch)
        factors = np.asarray(model.item_factors, dtype=np.float32)  # (n_items, dim + 1)
        self.item_ids_ = item_ids.astype(np.int64)
        self.item_emb_ = np.ascontiguousarray(factors[:, :dim])
        self.item_bias_ = np.ascontiguousarray(factors[:, dim])
        self.user_ids_ = user_ids.astype(np.int64)
        self.user_emb_ = np.ascontiguousarray(np.asarray(model.user_factors)[:, :dim], np.float32)
        self.train_auc_ = auc
        return self

    def item_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """``(item_ids_, item_emb_)``: what U2I mining reads.

        Raises:
            NotFittedError: before :meth:`fit`.
        """
        if not hasattr(self, "item_emb_"):
            raise NotFittedError("BPRMF is not fitted; call fit(interactions) first")
        return self.item_ids_, self.item_emb_
