"""The rankers of the protocol: one variant's item features, its training loop, its scores.

Every variant trains the same :class:`~qarm_features.app.ranker.DINRanker` with the same
budget (:class:`~qarm_features.app.protocol.EvalConfig`); only the item tower's inputs
change (:data:`~qarm_features.app.protocol.VARIANTS`). The best validation epoch is kept,
and test rows are scored with AUC / UAUC / GAUC on all, warm-item, cold-item and new-item
rows.
"""

from __future__ import annotations

import numpy as np

from qarm_features._validate import lookup_rows
from qarm_features.app.item_spaces import ItemSpaces
from qarm_features.app.protocol import VARIANTS, EvalConfig, Rows, Split
from qarm_features.errors import InputError


# --------------------------------------------------------------------------- item features
def variant_items(
    variant: str,
    spaces: ItemSpaces,
    split: Split,
    *,
    vq_tied: bool = False,
    content_codes: bool = False,
):
    """(RankerConfig keyword arguments, ItemFeatures, content) for one variant.

    ``content``: DINRanker's ``rq_codebooks`` / ``vq_pool_emb`` keyword arguments (the
    codes' decoded vectors, when ``content_codes``; empty otherwise).
    """
    from qarm_features.ranking import CodeVocab, ItemFeatures

    if variant not in VARIANTS:
        raise InputError(f"variant: unknown {variant!r}; choose from {list(VARIANTS)}")
    parts = VARIANTS[variant][0]
    kw: dict = {}
    content: dict = {}
    rq = vq = dense = None
    vocab = CodeVocab(spaces.vq_pool_ids)
    for p in parts:
        if p.endswith("_dense"):
            dense = spaces.raw if p == "raw_dense" else spaces.aligned
            if dense is not None and "dense_dim" in kw:
                raise InputError(f"variant {variant}: two dense inputs are not supported")
            kw["dense_dim"] = dense.shape[1]
        elif p.endswith("_rq"):
            rq = spaces.raw_rq if p == "raw_rq" else spaces.aligned_rq
            kw.update(rq_levels=rq.shape[1], rq_codes=spaces.n_codes)
            if content_codes:
                content["rq_codebooks"] = (
                    spaces.raw_codebooks if p == "raw_rq" else spaces.aligned_codebooks
                )
        elif p.endswith("_vq"):
            vq = vocab.map(spaces.raw_vq if p == "raw_vq" else spaces.aligned_vq)
            if vq_tied:  # pool rows -> item-id rows minus one (pool items are warm items)
                pool_rows = lookup_rows(spaces.vq_pool_ids, split.item_ids, name="VQ pool")
                id_rows = split.item_id_index[pool_rows] - 1
                vq = np.where(vq >= 0, id_rows[np.maximum(vq, 0)], -1)
                kw.update(vq_vocab=int(split.item_id_index.max()), vq_tied=True)
            else:
                kw["vq_vocab"] = len(vocab)
            kw["vq_k"] = vq.shape[1]
            if content_codes:
                content["vq_pool_emb"] = (
                    spaces.raw_pool_emb if p == "raw_vq" else spaces.aligned_pool_emb
                )
    items = ItemFeatures.from_numpy(split.item_id_index, rq=rq, vq=vq, dense=dense)
    return kw, items, content


def ranker_options(cfg: EvalConfig) -> dict:
    """The DINRanker keyword arguments ``cfg`` sets for every variant (code tables, dropout)."""
    return dict(
        prefix_buckets=cfg.prefix_buckets,
        code_init_std=cfg.code_init_std,
        level_dropout=cfg.level_dropout,
        rq_mode=cfg.rq_mode,
    )


# --------------------------------------------------------------------------- rankers
def _tensors(rows: Rows, sel=None):
    import torch

    sl = slice(None) if sel is None else sel
    return (
        torch.from_numpy(rows.user[sl]),
        torch.from_numpy(rows.item[sl]),
        torch.from_numpy(rows.hist[sl]),
        torch.from_numpy(rows.hist_label[sl]),
    )


def _predict(model, items, rows: Rows, batch_size: int = 8192) -> np.ndarray:
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for a in range(0, len(rows), batch_size):
            u, i, h, hl = _tensors(rows, slice(a, a + batch_size))
            out.append(model(items, u, i, h, hl).numpy())
    return np.concatenate(out) if out else np.empty(0, np.float32)


def fit_best_epoch(model, train_epoch, val_scores, split: Split, cfg: EvalConfig) -> dict:
    """The early stopping every ranker of the evaluation shares: up to ``cfg.epochs`` calls
    of ``train_epoch()``, each followed by the validation rows' AUC of ``val_scores()``;
    stops after ``cfg.patience`` epochs without a better one and restores the best epoch's
    weights. Returns ``best_epoch`` (from 1), ``val_auc`` per epoch and ``n_params``."""
    from qarm_features.metrics import auc

    best, best_state, val_aucs, bad = -np.inf, None, [], 0
    for _epoch in range(cfg.epochs):
        train_epoch()
        v = auc(split.val.y, val_scores())
        val_aucs.append(float(v))
        if v > best:
            best, bad = v, 0
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    model.load_state_dict(best_state)
    return {
        "best_epoch": int(np.argmax(val_aucs)) + 1,
        "val_auc": val_aucs,
        "n_params": int(sum(p.numel() for p in model.parameters())),
    }


def train_ranker(
    ranker_kw: dict,
    items,
    split: Split,
    cfg: EvalConfig,
    seed: int,
    content: dict | None = None,
    *,
    score_with: dict | None = None,
):
    """Train one DINRanker (budget from ``cfg``), keep the best validation epoch.

    ``content``: DINRanker's content keyword arguments (see :func:`variant_items`).
    ``score_with``: other item features (name -> ItemFeatures, same layout) to score the
    test rows with too, e.g. a retrain's codes read by a ranker trained on the old ones.

    Returns:
        ``(test_scores, info)`` with ``info`` = best epoch, validation AUC per epoch, params
        (and ``scores_with``: name -> test scores, with ``score_with``).
    """
    import torch

    from qarm_features.app.ranker import DINRanker, RankerConfig

    torch.manual_seed(seed)
    rcfg = RankerConfig(
        n_users=split.n_users,
        n_item_ids=int(split.item_id_index.max()) + 1,
        dim=cfg.dim,
        dropout=cfg.dropout,
        **ranker_kw,
    )
    model = DINRanker(rcfg, **(content or {}))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(seed)
    fit = split.fit
    y_fit = torch.from_numpy(fit.y)

    def train_epoch() -> None:
        model.train()
        perm = rng.permutation(len(fit))
        for a in range(0, len(fit), cfg.batch_size):
            sel = perm[a : a + cfg.batch_size]
            logits = model(items, *_tensors(fit, sel))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_fit[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    info = fit_best_epoch(model, train_epoch, lambda: _predict(model, items, split.val), split, cfg)
    if score_with:
        info["scores_with"] = {
            name: _predict(model, other, split.test_rows) for name, other in score_with.items()
        }
    return _predict(model, items, split.test_rows), info


def subset_masks(split: Split, item_ids) -> dict[str, np.ndarray]:
    """Boolean masks of the test rows: ``all``; ``warm`` (items with train rows),
    ``cold`` (items whose train rows were removed), ``new`` (items first seen in the test
    period)."""
    rows = split.test_rows
    tid = np.asarray(item_ids)[rows.item]
    return {
        "all": np.ones(len(rows), bool),
        "warm": np.isin(tid, split.warm_items),
        "cold": np.isin(tid, split.cold_items),
        "new": np.isin(tid, split.new_items),
    }


def score_subsets(split: Split, scores: np.ndarray, item_ids) -> dict:
    """AUC / UAUC / GAUC on all, warm-item, cold-item and new-item test rows."""
    from qarm_features.metrics import auc, gauc, uauc

    rows = split.test_rows
    out = {}
    for name, m in subset_masks(split, item_ids).items():
        y, s, u = rows.y[m].astype(np.int8), scores[m], rows.user_id[m]
        out[name] = {
            "auc": auc(y, s),
            "uauc": uauc(u, y, s),
            "gauc": gauc(u, y, s),
            "n_rows": int(m.sum()),
        }
    return out
