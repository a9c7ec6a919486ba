"""An example DIN-style ranker over QARM features (the evaluation's ranker).

:class:`DINRanker` scores ``(user, target item)`` from the user id, the item tower (item
id, optional dense content embedding, optional QARM codes through
:class:`~qarm_features.ranking.QarmEmbedding`) and the user's point-in-time history, with
DIN target attention (:class:`~qarm_features.ranking.TargetAttention`).
:class:`RankerConfig` holds its hyperparameters. An application of the reusable modules
in :mod:`qarm_features.ranking`, not part of them: a team plugs those into its own ranker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qarm_features.errors import InputError
from qarm_features.ranking import ItemFeatures, QarmEmbedding, TargetAttention

__all__ = ["DINRanker", "RankerConfig"]


@dataclass(frozen=True)
class RankerConfig:
    """Hyperparameters of :class:`DINRanker` (same for every variant of an experiment).

    ``n_users`` / ``n_item_ids`` count rows including the OOV row 0. A part is enabled when
    its size is > 0: ``dense_dim`` (a content embedding), ``rq_levels`` (RQ codes),
    ``vq_vocab`` (VQ codes).
    """

    n_users: int
    n_item_ids: int
    dim: int = 64  # paper's code embedding dimension
    dense_dim: int = 0
    rq_levels: int = 0
    rq_codes: int = 0
    vq_vocab: int = 0
    vq_k: int = 0
    rq_mode: str = "both"
    prefix_buckets: int = 1 << 16
    code_init_std: float = 0.0  # 0: a code no training row used adds nothing (cold items)
    # VQ codes read the item-id table (codes = id row - 1): a code list pools the id
    # embeddings of the item's nearest pool items. Needs vq_vocab == n_item_ids - 1.
    vq_tied: bool = False
    # Training only: RQ level dropout (see RQCodeEmbedding.level_dropout).
    level_dropout: float = 0.0
    n_history_labels: int = 2  # history events carry their past label (0/1): PIT-safe
    # Attention scores are computed on a projection of the item vectors to this width
    # (per distinct item, before the gather), so their cost does not grow with the number
    # of enabled parts; values stay full item vectors. 0 = the item width itself.
    attention_dim: int = 32
    attention_hidden: tuple[int, ...] = (64, 32)
    mlp_hidden: tuple[int, ...] = field(default=(128, 64))
    dropout: float = 0.1


class DINRanker(nn.Module):
    """Example DIN-style ranker over user id, item features and the user's history.

    The item tower maps a row of :class:`ItemFeatures` to the concatenation of its parts
    (item-id embedding, QARM code embedding, projected dense embedding), each ``dim`` wide.
    The same tower embeds the target item and every history item (so history items are
    sequences of codes), history events add a learned vector for their past label, the
    target attends over the history (:class:`TargetAttention`, scored on an
    ``attention_dim`` projection of the item vectors, pooling the full vectors), and an
    MLP scores
    ``[user, target, attended, mean history, target * attended]``.

    The tower runs once per *distinct* item row in the batch (the table may be the whole
    catalog): cost scales with items, not with ``B * T``.

    Shapes:
        forward(items: ItemFeatures with n rows, user ``(B,)``, target ``(B,)`` rows of items,
        hist ``(B, T)`` rows of items (-1 = padding), hist_label ``(B, T)`` in
        ``[0, n_history_labels)``) -> logits ``(B,)``.
    """

    def __init__(self, config: RankerConfig, *, rq_codebooks=None, vq_pool_emb=None) -> None:
        """``rq_codebooks`` / ``vq_pool_emb``: content-initialised code embeddings (see
        :class:`~qarm_features.ranking.QarmEmbedding`); None = plain code tables."""
        super().__init__()
        c = config
        self.config = c
        self.user_emb = nn.Embedding(c.n_users, c.dim, padding_idx=0)
        if c.vq_tied and c.vq_vocab not in (0, c.n_item_ids - 1):
            raise InputError(
                f"RankerConfig: vq_tied needs vq_vocab == n_item_ids - 1 ({c.n_item_ids - 1}), "
                f"got {c.vq_vocab}; map VQ pool ids to item-id rows minus one"
            )
        self.item_emb = nn.Embedding(c.n_item_ids, c.dim, padding_idx=0)
        for emb in (self.user_emb, self.item_emb):
            nn.init.normal_(emb.weight, std=0.05)
            with torch.no_grad():
                emb.weight[0].zero_()
        n_parts = 1
        self.qarm = None
        if c.rq_levels > 0 or c.vq_vocab > 0:
            self.qarm = QarmEmbedding(
                c.dim,
                rq_levels=c.rq_levels,
                rq_codes=c.rq_codes,
                vq_vocab=c.vq_vocab,
                vq_k=c.vq_k,
                rq_mode=c.rq_mode,
                prefix_buckets=c.prefix_buckets,
                init_std=c.code_init_std,
                vq_table=self.item_emb if c.vq_tied else None,
                rq_codebooks=rq_codebooks,
                vq_pool_emb=vq_pool_emb,
                level_dropout=c.level_dropout,
            )
            n_parts += self.qarm.out_dim // c.dim
        self.dense = nn.Linear(c.dense_dim, c.dim) if c.dense_dim > 0 else None
        n_parts += self.dense is not None
        self.item_dim = n_parts * c.dim
        self.label_emb = nn.Embedding(c.n_history_labels, self.item_dim)
        nn.init.zeros_(self.label_emb.weight)
        att_dim = c.attention_dim or self.item_dim
        self.att_proj = nn.Linear(self.item_dim, att_dim)
        self.att_label = nn.Embedding(c.n_history_labels, att_dim)
        nn.init.zeros_(self.att_label.weight)
        self.attention = TargetAttention(att_dim, c.attention_hidden)
        layers: list[nn.Module] = []
        width = c.dim + 4 * self.item_dim
        for h in c.mlp_hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(c.dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def item_tower(self, items: ItemFeatures) -> torch.Tensor:
        """``(n,)`` item rows -> ``(n, item_dim)``."""
        parts = [self.item_emb(items.id_index)]
        if self.qarm is not None:
            parts.append(self.qarm(items.rq, items.vq))
        if self.dense is not None:
            if items.dense is None:
                raise InputError("DINRanker: dense item features are required (dense_dim > 0)")
            parts.append(self.dense(items.dense))
        return torch.cat(parts, dim=-1)

    def forward(
        self,
        items: ItemFeatures,
        user: torch.Tensor,
        target: torch.Tensor,
        hist: torch.Tensor,
        hist_label: torch.Tensor,
    ) -> torch.Tensor:
        if hist.shape != hist_label.shape or hist.shape[0] != target.shape[0]:
            raise InputError(
                f"DINRanker: hist {tuple(hist.shape)} and hist_label {tuple(hist_label.shape)} "
                f"must be (B, T) with B = {target.shape[0]}"
            )
        mask = hist >= 0
        # Embed each distinct item row once, then gather.
        rows, inverse = torch.unique(
            torch.cat([target, hist.clamp_min(0).reshape(-1)]), return_inverse=True
        )
        vecs = self.item_tower(items.take(rows))
        proj = self.att_proj(vecs)
        b = target.shape[0]
        tgt, tgt_p = vecs[inverse[:b]], proj[inverse[:b]]
        labels = hist_label.clamp_min(0)
        m = mask.unsqueeze(-1)
        values = (vecs[inverse[b:]].reshape(*hist.shape, -1) + self.label_emb(labels)) * m
        keys = (proj[inverse[b:]].reshape(*hist.shape, -1) + self.att_label(labels)) * m
        att = self.attention(tgt_p, keys, mask, values)
        n_valid = mask.sum(dim=1, keepdim=True).clamp_min(1)
        mean_hist = values.sum(dim=1) / n_valid
        x = torch.cat([self.user_emb(user), tgt, att, mean_hist, tgt * att], dim=-1)
        return self.mlp(x).squeeze(-1)
