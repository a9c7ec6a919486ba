"""Torch modules that turn QARM features into learned ranker inputs.

What an existing ranker adds to use QARM (paper §3.3: item-side, user-side and cross
features, code embedding dim 64):

* :class:`RQCodeEmbedding` — RQ codes ``(..., L)`` to a learned vector ``(..., dim)``: one
  table holding every level's unigram ids (``(c_l)`` at level ``l``, shifted by a per-level
  offset so equal code values at different levels never share a row) and the prefix n-gram
  ids ``(c1, c2)``, ``(c1, c2, c3)``, … of the semantic-id ranking literature (each prefix
  length has its own id range; exact while ``K**l`` fits the bucket budget, hashed beyond).
* :class:`VQCodeEmbedding` — the VQ code list ``(..., K)`` (top-K pool items) pooled into one
  vector; ``-1`` marks padding.
* :class:`QarmEmbedding` — both of the above, concatenated: the drop-in item-side module.
* :class:`TargetAttention` — DIN target attention: the target item's vector queries the
  user's recent items' vectors (user-side sequences of codes), padding masked.

Code ids are produced by :mod:`qarm_features.codes.rq`; VQ codes are pool *item ids*, which
:class:`CodeVocab` maps to dense rows ``0..n-1`` (unknown ids to padding). torch is imported
here only; nothing on the serving path imports this module. An example ranker built from
these modules lives in :mod:`qarm_features.app.ranker`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qarm_features.errors import DependencyError, InputError

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - torch is a core dependency
    raise DependencyError(
        "qarm_features.ranking needs torch; install it with `pip install torch==2.13.0`"
    ) from exc

__all__ = [
    "CodeVocab",
    "ItemFeatures",
    "QarmEmbedding",
    "RQCodeEmbedding",
    "TargetAttention",
    "VQCodeEmbedding",
]


def _largest_prime_at_most(n: int) -> int:
    """Largest prime <= n (n >= 2). Hashed prefixes use it as modulus (spreads ids evenly)."""
    for p in range(n, 1, -1):
        if all(p % q for q in range(2, math.isqrt(p) + 1)):
            return p
    raise ValueError(f"no prime <= {n}")


class CodeVocab:
    """Maps arbitrary int64 ids (VQ pool item ids) to dense rows ``0..n-1``.

    Unknown ids and ``-1`` map to ``-1`` (padding), which :class:`VQCodeEmbedding` ignores.

    Args:
        ids: the vocabulary, 1-d unique int64 (e.g. the VQ pool ids).
    """

    def __init__(self, ids) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or np.unique(ids).size != ids.size:
            raise InputError(f"ids: expected 1-d unique ids, got shape {ids.shape}")
        self.ids = ids
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]

    def __len__(self) -> int:
        return int(self.ids.size)

    def map(self, values) -> np.ndarray:
        """Map an int array of any shape to rows; unknown / negative values give -1."""
        values = np.asarray(values, dtype=np.int64)
        if self._sorted.size == 0:
            return np.full(values.shape, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self._sorted, values), 0, self._sorted.size - 1)
        hit = (self._sorted[pos] == values) & (values >= 0)
        return np.where(hit, self._order[pos], -1).astype(np.int64)


class RQCodeEmbedding(nn.Module):
    """Embeds RQ codes: per-level unigram ids and prefix n-gram ids, one shared table.

    Table layout (rows): ``[level 1: K][level 2: K]…[level L: K]`` then, for prefix lengths
    ``l = 2..L``, a block of ``min(K**l, prefix_buckets')`` rows, where ``prefix_buckets'`` is
    the largest prime <= ``prefix_buckets``. A prefix ``(c1..cl)`` is the mixed-radix number
    ``sum_j c_j K**(l-j)``, taken modulo that prime when ``K**l`` exceeds it (computed
    incrementally, so no int64 overflow for any ``L``); below the budget ids are exact, so
    distinct prefixes never share a row. The prefix of length 1 *is* the level-1 unigram.

    Args:
        n_levels: L, the number of RQ levels.
        n_codes: K, the codebook size per level.
        dim: output dimension (paper: 64).
        mode: ``"level"`` (unigrams only), ``"prefix"`` (prefix n-grams, with ``(c1)``) or
            ``"both"`` (default; unigrams for every level plus prefixes of length >= 2).
        prefix_buckets: row budget per prefix length before hashing kicks in. The default
            (2**16) keeps ``K=64, L<=2`` exact and hashes deeper prefixes into 65 521 rows,
            far more than the number of distinct prefixes a catalog of ~1e4 items uses.
        pooling: ``"sum"`` (default) or ``"mean"`` over the slots, or ``"none"`` to return
            every slot, shape ``(..., n_slots, dim)``.
        init_std: std of the normal init. The default 0 makes a code never seen in
            training contribute nothing (a cold item whose fine-level prefix no warm item
            shares falls back on its coarser levels instead of on random noise); the
            gradient of a row does not depend on its value, so zero rows still learn.
        codebooks: a bundle's ``rq_codebooks`` ``(L, K, d)``, or None. Given, a slot's row is
            ``W_s @ content + table[row]`` (SIDE-style content initialisation, tied
            per-slot maps ``content_proj`` ``(n_slots, d, dim)``); content = the decoded
            code (level slot: centroid ``codebooks[l, c_l]``; prefix of length ``l``: the
            RQ reconstruction ``sum_{j<=l} codebooks[j, c_j]``). Codes no training row used
            still score through ``W_s``, which every warm item trained (cold items).
        level_dropout: training only: each row, with this probability, keeps only its first
            ``l`` levels (``l`` uniform in ``1..L-1``), deeper slots dropped.

    Shapes:
        forward: codes ``(..., L)`` int64 in ``[0, K)`` -> ``(..., dim)`` (or slots).
    """

    def __init__(
        self,
        n_levels: int,
        n_codes: int,
        dim: int = 64,
        *,
        mode: str = "both",
        prefix_buckets: int = 1 << 16,
        pooling: str = "sum",
        init_std: float = 0.0,
        codebooks=None,
        level_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if n_levels < 1 or n_codes < 2 or dim < 1:
            raise InputError(
                f"RQCodeEmbedding: need n_levels >= 1, n_codes >= 2, dim >= 1; got "
                f"{n_levels}, {n_codes}, {dim}"
            )
        if mode not in ("level", "prefix", "both"):
            raise InputError(f"mode: expected 'level', 'prefix' or 'both', got {mode!r}")
        if pooling not in ("sum", "mean", "none"):
            raise InputError(f"pooling: expected 'sum', 'mean' or 'none', got {pooling!r}")
        if prefix_buckets < n_codes:
            raise InputError(
                f"prefix_buckets: must be >= n_codes ({n_codes}), got {prefix_buckets}"
            )
        self.n_levels, self.n_codes, self.dim = n_levels, n_codes, dim
        self.mode, self.pooling = mode, pooling
        self.prefix_modulus = _largest_prime_at_most(prefix_buckets)

        # (kind, length/level, offset, size) for every slot, in output order.
        slots: list[tuple[str, int, int, int]] = []
        offset = 0
        if mode in ("level", "both"):
            for level in range(n_levels):
                slots.append(("level", level, offset, n_codes))
                offset += n_codes
        first_prefix = 1 if mode == "prefix" else 2
        if mode in ("prefix", "both"):
            for length in range(first_prefix, n_levels + 1):
                exact = n_codes**length
                size = min(exact, self.prefix_modulus)
                slots.append(("prefix", length, offset, size))
                offset += size
        self.slots = tuple(slots)
        depth = [pos + 1 if kind == "level" else pos for kind, pos, _o, _s in slots]
        self.register_buffer("slot_depth", torch.tensor(depth), persistent=False)  # 1-based
        self.n_rows = offset
        self.table = nn.Embedding(offset, dim)
        nn.init.normal_(self.table.weight, std=init_std) if init_std > 0 else nn.init.zeros_(
            self.table.weight
        )
        if not 0.0 <= level_dropout < 1.0:
            raise InputError(f"level_dropout: expected a value in [0, 1), got {level_dropout}")
        self.level_dropout, self.content_proj = float(level_dropout), None
        if codebooks is not None:
            cb = torch.as_tensor(np.asarray(codebooks), dtype=torch.float32).contiguous()
            if cb.dim() != 3 or tuple(cb.shape[:2]) != (n_levels, n_codes):
                raise InputError(f"codebooks: expected ({n_levels}, {n_codes}, d), got {cb.shape}")
            self.register_buffer("codebooks", cb)
            bound = 1.0 / math.sqrt(cb.shape[2])  # nn.Linear's default init, one map per slot
            proj = torch.empty(len(slots), cb.shape[2], dim).uniform_(-bound, bound)
            self.content_proj = nn.Parameter(proj)

    def slot_content(self, codes: torch.Tensor) -> torch.Tensor:
        """Decoded vector of every slot: ``(..., L)`` -> ``(..., n_slots, d)``."""
        levels = torch.arange(self.n_levels, device=codes.device)
        per_level = self.codebooks[levels, codes.long()]  # (..., L, d)
        cum = per_level.cumsum(dim=-2)
        at = lambda kind, pos: per_level[..., pos, :] if kind == "level" else cum[..., pos - 1, :]
        return torch.stack([at(kind, pos) for kind, pos, *_ in self.slots], dim=-2)

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    def slot_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Row ids of every slot: ``(..., L)`` -> ``(..., n_slots)`` int64 (validated)."""
        if codes.shape[-1] != self.n_levels:
            raise InputError(
                f"codes: expected last dimension {self.n_levels} (RQ levels), got shape "
                f"{tuple(codes.shape)}"
            )
        codes = codes.long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.n_codes):
            raise InputError(
                f"codes: values must lie in [0, {self.n_codes}), got range "
                f"[{int(codes.min())}, {int(codes.max())}]; was the bundle fitted with "
                "another n_codes?"
            )
        out = []
        running = torch.zeros_like(codes[..., 0])
        prefixes = {}
        for length in range(1, self.n_levels + 1):
            running = (running * self.n_codes + codes[..., length - 1]) % self.prefix_modulus
            prefixes[length] = running
        for kind, pos, offset, _size in self.slots:
            if kind == "level":
                out.append(codes[..., pos] + offset)
            else:
                out.append(prefixes[pos] + offset)
        return torch.stack(out, dim=-1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        emb = self.table(self.slot_ids(codes))  # (..., n_slots, dim)
        if self.content_proj is not None:
            content = self.slot_content(codes)  # (..., n_slots, d)
            emb = emb + torch.einsum("...sd,sde->...se", content, self.content_proj)
        if self.training and self.level_dropout > 0 and self.n_levels > 1:
            shape = codes.shape[:-1]
            drop = torch.rand(shape, device=codes.device) < self.level_dropout
            depth = torch.randint(1, self.n_levels, shape, device=codes.device)
            depth = torch.where(drop, depth, self.n_levels)
            emb = emb * (self.slot_depth <= depth.unsqueeze(-1)).to(emb.dtype).unsqueeze(-1)
        if self.pooling == "sum":
            return emb.sum(dim=-2)
        if self.pooling == "mean":
            return emb.mean(dim=-2)
        return emb


class VQCodeEmbedding(nn.Module):
    """Pools the embeddings of a VQ code list (top-K pool items) into one vector.

    Args:
        vocab_size: number of pool rows (codes must be mapped to ``[0, vocab_size)`` first,
            e.g. with :class:`CodeVocab`); ``-1`` is padding.
        dim: output dimension.
        k: length of the code list; with ``rank_weights`` each position gets a learned
            weight (the list is ordered by descending similarity), initialised uniform.
        rank_weights: learn per-position pooling weights (default True).
        init_std: std of the normal init (0 = zeros, see :class:`RQCodeEmbedding`).
        table: share an existing ``nn.Embedding`` of ``vocab_size + 1`` rows whose row 0 is
            padding, e.g. the ranker's item-id table: the pool items *are* items, so a code
            list then pools the id embeddings of the item's nearest pool items (code ``c``
            reads row ``c + 1``). ``init_std`` is ignored.
        pool_emb: a bundle's ``vq_pool_emb`` ``(vocab_size, d)`` (rows in code order), or
            None. Given, the weighted pool is over ``table[c] + W @ pool_emb[c]``
            (``W`` = ``content_proj``; see :class:`RQCodeEmbedding`).

    Shapes:
        forward: codes ``(..., k)`` int64 in ``[-1, vocab_size)`` -> ``(..., dim)``; a row of
        only padding gives zeros.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 64,
        *,
        k: int,
        rank_weights: bool = True,
        init_std: float = 0.0,
        table: nn.Embedding | None = None,
        pool_emb=None,
    ):
        super().__init__()
        if vocab_size < 1 or dim < 1 or k < 1:
            raise InputError(
                f"VQCodeEmbedding: need vocab_size, dim, k >= 1; got {vocab_size}, {dim}, {k}"
            )
        self.vocab_size, self.dim, self.k = vocab_size, dim, k
        if table is not None:
            if tuple(table.weight.shape) != (vocab_size + 1, dim) or table.padding_idx != 0:
                raise InputError(
                    f"table: expected an nn.Embedding({vocab_size + 1}, {dim}, padding_idx=0), "
                    f"got shape {tuple(table.weight.shape)}, padding_idx {table.padding_idx}"
                )
            self.table = table
        else:
            # Row 0 is padding (index -1 shifted by one), kept at zero by padding_idx.
            self.table = nn.Embedding(vocab_size + 1, dim, padding_idx=0)
            if init_std > 0:
                nn.init.normal_(self.table.weight, std=init_std)
            else:
                nn.init.zeros_(self.table.weight)
        with torch.no_grad():
            self.table.weight[0].zero_()
        self.rank_logits = nn.Parameter(torch.zeros(k)) if rank_weights else None
        self.content_proj = None
        if pool_emb is not None:
            pe = torch.as_tensor(np.asarray(pool_emb), dtype=torch.float32)
            if pe.dim() != 2 or pe.shape[0] != vocab_size:
                raise InputError(f"pool_emb: expected ({vocab_size}, d), got {tuple(pe.shape)}")
            # Row 0 is padding, as in the table.
            self.register_buffer("pool_emb", torch.cat([pe.new_zeros(1, pe.shape[1]), pe]))
            self.content_proj = nn.Linear(pe.shape[1], dim, bias=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.shape[-1] != self.k:
            raise InputError(
                f"codes: expected last dimension {self.k} (VQ top-K), got {tuple(codes.shape)}"
            )
        codes = codes.long()
        if codes.numel() and (int(codes.min()) < -1 or int(codes.max()) >= self.vocab_size):
            raise InputError(
                f"codes: values must lie in [-1, {self.vocab_size}) (map pool ids with "
                f"CodeVocab), got range [{int(codes.min())}, {int(codes.max())}]"
            )
        valid = (codes >= 0).to(self.table.weight.dtype)  # (..., k)
        emb = self.table(codes + 1)  # (..., k, dim), padding rows are zero
        if self.rank_logits is not None:
            w = torch.softmax(self.rank_logits, dim=0) * valid
        else:
            w = valid
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        out = (emb * w.unsqueeze(-1)).sum(dim=-2)
        if self.content_proj is not None:
            # Linear, so projecting the pooled content equals pooling projected contents.
            out = out + self.content_proj((self.pool_emb[codes + 1] * w.unsqueeze(-1)).sum(dim=-2))
        return out


class QarmEmbedding(nn.Module):
    """Drop-in item-side module: RQ codes and/or VQ codes -> one learned vector.

    Args:
        dim: per-part dimension (paper: 64). Output is ``dim`` per enabled part, concatenated.
        rq_levels, rq_codes: RQ shape (0 levels disables the RQ part).
        vq_vocab, vq_k: VQ vocabulary size and list length (0 disables the VQ part).
        rq_mode, prefix_buckets: passed to :class:`RQCodeEmbedding`.
        init_std: code-table init (0 = zeros: unseen codes contribute nothing).
        vq_table: share this table for VQ codes (see :class:`VQCodeEmbedding`).
        rq_codebooks, vq_pool_emb, level_dropout: content-initialised codes and RQ level
            dropout (:class:`RQCodeEmbedding`, :class:`VQCodeEmbedding`, :meth:`with_content`).

    Shapes:
        forward(rq ``(..., L)``, vq ``(..., K)``) -> ``(..., out_dim)``.
    """

    def __init__(
        self,
        dim: int = 64,
        *,
        rq_levels: int = 0,
        rq_codes: int = 0,
        vq_vocab: int = 0,
        vq_k: int = 0,
        rq_mode: str = "both",
        prefix_buckets: int = 1 << 16,
        init_std: float = 0.0,
        vq_table: nn.Embedding | None = None,
        rq_codebooks=None,
        vq_pool_emb=None,
        level_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.rq = self.vq = None
        if rq_levels > 0:
            self.rq = RQCodeEmbedding(
                *(rq_levels, rq_codes, dim),
                mode=rq_mode,
                prefix_buckets=prefix_buckets,
                init_std=init_std,
                codebooks=rq_codebooks,
                level_dropout=level_dropout,
            )
        if vq_vocab > 0:
            self.vq = VQCodeEmbedding(
                vq_vocab, dim, k=vq_k, init_std=init_std, table=vq_table, pool_emb=vq_pool_emb
            )
        if self.rq is None and self.vq is None:
            raise InputError("QarmEmbedding: enable RQ (rq_levels > 0) and/or VQ (vq_vocab > 0)")
        self.out_dim = dim * ((self.rq is not None) + (self.vq is not None))

    @classmethod
    def with_content(cls, dim=64, *, rq_codebooks=None, vq_pool_emb=None, vq_k=0, **kwargs):
        """Content-initialised codes (issue 11's validation winner, the evaluation default)
        from ``bundle.rq_codebooks`` ``(L, K, d)`` and ``bundle.vq_pool_emb`` ``(P, d)``
        (map VQ codes with ``CodeVocab(bundle.vq_pool_ids)``: same row order)."""
        if rq_codebooks is not None:
            if np.ndim(rq_codebooks) != 3:
                raise InputError(f"rq_codebooks: expected (L, K, d), got {np.shape(rq_codebooks)}")
            kwargs.update(rq_levels=np.shape(rq_codebooks)[0], rq_codes=np.shape(rq_codebooks)[1])
        if vq_pool_emb is not None:
            if vq_k < 1:
                raise InputError(f"vq_k: the VQ list length is required (>= 1), got {vq_k}")
            kwargs.update(vq_vocab=np.shape(vq_pool_emb)[0], vq_k=vq_k)
        return cls(dim, rq_codebooks=rq_codebooks, vq_pool_emb=vq_pool_emb, **kwargs)

    def forward(self, rq: torch.Tensor | None = None, vq: torch.Tensor | None = None):
        parts = []
        for name, module, x in (("rq", self.rq, rq), ("vq", self.vq, vq)):
            if module is None:
                continue
            if x is None:
                raise InputError(f"QarmEmbedding: {name} codes are required (part enabled)")
            parts.append(module(x))
        return torch.cat(parts, dim=-1)


class TargetAttention(nn.Module):
    """DIN target attention: a query (target item) pools a sequence (the user's history).

    Score ``a(q, k_t) = MLP([q, k_t, q - k_t, q * k_t])``; weights are a softmax over the
    unmasked positions; a sequence with no valid position pools to zeros. The first MLP
    layer is applied in its factored form ``W_q q + W_k k_t + W_x (q * k_t)`` (the same
    function class: ``q - k`` folds into ``W_q`` and ``W_k``), so the query part is computed
    once per row instead of once per history position.

    Shapes:
        forward(query ``(B, D)``, keys ``(B, T, D)``, mask ``(B, T)`` bool, True = valid,
        values ``(B, T, D_v)`` or None = keys) -> ``(B, D_v)``.
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (64, 32)) -> None:
        super().__init__()
        if not hidden:
            raise InputError("TargetAttention: hidden needs at least one layer width")
        h0 = hidden[0]
        self.w_q = nn.Linear(dim, h0)
        self.w_k = nn.Linear(dim, h0, bias=False)
        self.w_x = nn.Linear(dim, h0, bias=False)
        layers: list[nn.Module] = [nn.ReLU()]
        width = h0
        for h in hidden[1:]:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, query, keys, mask, values=None):
        if keys.dim() != 3 or query.shape != (keys.shape[0], keys.shape[2]):
            raise InputError(
                f"TargetAttention: query (B, D) and keys (B, T, D) expected, got "
                f"{tuple(query.shape)} and {tuple(keys.shape)}"
            )
        if mask.shape != keys.shape[:2]:
            raise InputError(
                f"mask: expected shape {tuple(keys.shape[:2])}, got {tuple(mask.shape)}"
            )
        values = keys if values is None else values
        if values.shape[:2] != keys.shape[:2]:
            raise InputError(
                f"values: expected shape {tuple(keys.shape[:2])} + (D_v,), got {tuple(values.shape)}"
            )
        h = self.w_q(query).unsqueeze(1) + self.w_k(keys) + self.w_x(query.unsqueeze(1) * keys)
        scores = self.mlp(h).squeeze(-1)
        scores = scores.masked_fill(~mask, float("-inf"))
        any_valid = mask.any(dim=1, keepdim=True)
        # All-padding rows: softmax of all -inf is NaN; give them zero weights instead.
        scores = torch.where(any_valid, scores, torch.zeros_like(scores))
        w = torch.softmax(scores, dim=1) * mask.to(values.dtype)
        return (w.unsqueeze(-1) * values).sum(dim=1)


@dataclass
class ItemFeatures:
    """Per-item feature table the ranker reads rows from (one row per item it may see).

    Attributes:
        id_index: ``(n,)`` int64 row in the item-id embedding; 0 = out of vocabulary (items
            never seen in training, e.g. cold items: their id embedding stays zero).
        rq: ``(n, L)`` int64 RQ codes, or None.
        vq: ``(n, K)`` int64 VQ codes mapped to ``[-1, vocab)``, or None.
        dense: ``(n, d)`` float32 content embedding (frozen raw or aligned), or None.
    """

    id_index: torch.Tensor
    rq: torch.Tensor | None = None
    vq: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.id_index.shape[0])

    @classmethod
    def from_numpy(cls, id_index, rq=None, vq=None, dense=None) -> ItemFeatures:
        t = lambda a, dt: None if a is None else torch.as_tensor(np.asarray(a), dtype=dt)
        return cls(
            t(id_index, torch.long), t(rq, torch.long), t(vq, torch.long), t(dense, torch.float32)
        )

    def take(self, rows: torch.Tensor) -> ItemFeatures:
        """Subset of rows (shape ``(m,)``)."""
        pick = lambda a: None if a is None else a[rows]
        return ItemFeatures(self.id_index[rows], pick(self.rq), pick(self.vq), pick(self.dense))
