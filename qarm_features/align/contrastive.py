"""Symmetric in-batch InfoNCE over ``<trigger, target>`` pairs: the pieces the aligner
(:mod:`qarm_features.align.aligner`) and the encoder fine-tuner (:mod:`qarm_features.content.finetune`)
share: pair rows from ids (:func:`pair_rows`) and the loss with in-batch false negatives
masked (:func:`masked_nce`, :func:`symmetric_nce`); and the raw-space geometry the
aligner's raw-consistency term keeps close to. Training only: imports torch.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from qarm_features._validate import check_columns, check_ids, lookup_rows
from qarm_features.errors import DependencyError, InputError

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # pragma: no cover - torch is a hard dependency today
    raise DependencyError("contrastive training needs torch: pip install torch==2.13.0") from exc

logger = logging.getLogger(__name__)


def pair_rows(pairs, item_ids: np.ndarray, *, name: str = "pairs"):
    """Row positions ``(trigger rows, target rows)`` of ``pairs`` in ``item_ids``.

    Unknown ids raise, self-pairs are dropped (logged); no pair left raises.
    """
    if not isinstance(pairs, pd.DataFrame):
        raise InputError(
            f"{name}: expected a DataFrame [trigger_id, target_id], got {type(pairs).__name__}"
        )
    check_columns(pairs, ["trigger_id", "target_id"], name=name)
    trig = check_ids(pairs["trigger_id"].to_numpy(), name=f"{name}.trigger_id", unique=False)
    targ = check_ids(pairs["target_id"].to_numpy(), name=f"{name}.target_id", unique=False)
    ti = lookup_rows(trig, item_ids, name=f"{name}.trigger_id")
    gi = lookup_rows(targ, item_ids, name=f"{name}.target_id")
    keep = ti != gi
    if not keep.all():
        logger.info("dropping %d self-pair(s) from %s", int((~keep).sum()), name)
    if not keep.any():
        raise InputError(
            f"{name}: no (non-self) pair among {len(pairs)} rows; mine pairs first "
            "(qarm_features.pairs.mining.mine_pairs)"
        )
    return ti[keep], gi[keep]


def masked_nce(logits: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of row i against column i, masking in-batch false negatives.

    Column ``j != i`` is masked for row ``i`` when its key item ``k[j]`` is row i's
    positive ``k[i]`` (the same target twice in a batch) or row i's query item ``q[i]``.
    The dense reference formulation; :func:`symmetric_nce` masks the same entries sparsely.
    """
    n = logits.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    mask = ((k[None, :] == k[:, None]) | (k[None, :] == q[:, None])) & ~eye
    labels = torch.arange(n, device=logits.device)
    return F.cross_entropy(logits.masked_fill(mask, float("-inf")), labels)


def _false_negative_entries(a: torch.Tensor, b: torch.Tensor):
    """The entries :func:`masked_nce` masks in both directions, found without a dense mask.

    Slot ``s`` of ``cat([a, b])`` is pair ``s % B``'s trigger (``s < B``) or target. Two
    slots of different pairs ``i != j`` holding the same item mask ``[i, j]`` in the
    trigger->target direction when slot ``j`` is a target (``b_j in {a_i, b_i}``), and in
    the target->trigger direction (rows ``b``, columns ``a``) when it is a trigger. Only
    the slots of repeated items are compared (usually a small share of the batch).

    Returns:
        ``((rows, cols), (rows, cols))`` for ``logits`` and ``logits.T``.
    """
    m = a.numel()
    _, inv, counts = torch.unique(torch.cat([a, b]), return_inverse=True, return_counts=True)
    slots = (counts[inv] > 1).nonzero().squeeze(1)
    si = sj = torch.empty(0, dtype=torch.long, device=a.device)
    if slots.numel():
        same = (inv[slots][:, None] == inv[slots][None, :]).nonzero()
        si, sj = slots[same[:, 0]], slots[same[:, 1]]
    pi, pj = si % m, sj % m
    keep = pi != pj
    to_target = keep & (sj >= m)
    to_trigger = keep & (sj < m)
    return (pi[to_target], pj[to_target]), (pi[to_trigger], pj[to_trigger])


def _masked(logits: torch.Tensor, entries) -> torch.Tensor:
    rows, cols = entries
    if rows.numel() == 0:
        return logits
    return logits.index_put((rows, cols), torch.tensor(float("-inf"), device=logits.device))


def symmetric_nce(za, zb, a, b, temperature: float):
    """``(CE(za @ zb.T / T) + CE(zb @ za.T / T)) / 2`` with :func:`masked_nce` masking.

    ``za``, ``zb``: ``(B, d)`` unit-norm embeddings of the pairs' items; ``a``, ``b``:
    ``(B,)`` their item rows (equal rows are the same item). Equal to
    ``(masked_nce(L, a, b) + masked_nce(L.T, b, a)) / 2`` (tested); the masked entries
    are found sparsely on CPU (:func:`_false_negative_entries`) and both cross-entropies
    read one logits matrix (row-wise and column-wise log-softmax, no transposed copy; its
    fused kernels ran ~20% faster than ``logsumexp`` minus the diagonal, 512 x 512, 1 thread).
    """
    logits = za @ zb.T / temperature
    if logits.device.type != "cpu":  # dense masks: no host sync per step on an accelerator
        return 0.5 * (masked_nce(logits, a, b) + masked_nce(logits.T, b, a))
    fwd, bwd = _false_negative_entries(a, b)
    rows = torch.log_softmax(_masked(logits, fwd), dim=1).diagonal()
    cols = torch.log_softmax(_masked(logits, (bwd[1], bwd[0])), dim=0).diagonal()
    return -0.5 * (rows.mean() + cols.mean())


def raw_consistency(z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``mean over all (i, j), i != j, of (z_i . z_j - r_i . r_j)^2`` without a ``(n, n)`` matrix.

    ``z``: ``(n, d)`` aligned unit rows (differentiable); ``r``: ``(n, D)`` reference unit
    rows (constant). The sum over all ``(i, j)`` of ``(S_z - S_r)^2`` is
    ``||Z^T Z||^2 - 2 ||Z^T R||^2 + ||R^T R||^2`` (Frobenius): three ``d x d``, ``d x D``,
    ``D x D`` products instead of two ``n x n`` Gram matrices. The diagonal terms are
    ``(1 - 1)^2 = 0`` for unit rows, so the full sum is the off-diagonal sum, divided by
    ``n (n - 1)``. The last term is a constant of the batch (:func:`gram_energy`): it takes
    no part in the gradient. The training loop passes a sample of the batch's rows
    (:func:`raw_sample`): the same mean, estimated.
    """
    n = z.shape[0]
    zz, zr = z.T @ z, z.T @ r
    return (zz.square().sum() - 2.0 * zr.square().sum() + gram_energy(r)) / (n * (n - 1))


def raw_sample(n: int, size: int | None, generator: torch.Generator) -> torch.Tensor | None:
    """Positions of ``min(size, n)`` of ``n`` batch rows, uniform without replacement (CPU).

    ``None`` (use every row) when ``size`` is ``None`` or at least ``n``. Every ordered
    pair ``(i, j), i != j`` of the batch is equally likely to be in the sample, so
    :func:`raw_consistency` of the sampled rows is an unbiased estimate of its value on
    the whole batch (tested); its cost falls with the sample (``s d D`` instead of
    ``n d D``). Rows are drawn one by one from the ``2B`` rows, not as whole pairs: a
    sample of pairs would weigh each trigger against its own target ``(2B - 1) / (s - 1)``
    times too much. Its spread: 256 of 1,024 rows (the defaults) put a step's estimate
    within a relative standard deviation of 6.8% of the batch's term (128 rows: 10.7%,
    512: 3.9%; bench world, 500 draws).
    """
    if size is None or size >= n:
        return None
    return torch.randperm(n, generator=generator)[:size]


@torch.no_grad()
def gram_energy(r: torch.Tensor) -> torch.Tensor:
    """``||R^T R||^2 = ||R R^T||^2`` (Frobenius), a constant: no gradient.

    The smaller Gram is formed: ``D x D`` from ``n`` rows, or ``n x n`` when ``n < D`` (a
    sampled batch, :func:`raw_sample`). On CPU it is numpy's ``r.T @ r`` (or ``r @ r.T``),
    which BLAS computes as a symmetric rank-k update (half a GEMM's work, ~0.4x torch's
    GEMM time measured on 1024 x 384 batches).
    """
    small = r.shape[0] < r.shape[1]
    if r.device.type != "cpu":
        gram = r @ r.T if small else r.T @ r
        return gram.square().sum()
    rn = r.detach().numpy()
    gram = rn @ rn.T if small else rn.T @ rn  # numpy recognises A @ A.T, A.T @ A: one syrk
    return torch.as_tensor(np.einsum("ij,ij->", gram, gram), dtype=r.dtype)


# --------------------------------------------------------------------------- raw geometry
_MOMENT_CHUNK = 8_192  # rows per chunk: bounded, reused temporaries on any catalog


def _normalise_rows_(u: np.ndarray) -> np.ndarray:
    """``u`` with unit rows (norms floored at 1e-12), normalised in place, in its own dtype."""
    u /= np.maximum(np.sqrt(np.einsum("ij,ij->i", u, u)), 1e-12)[:, None]
    return u


def normalized_moments(x: np.ndarray, chunk: int = _MOMENT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and covariance of the L2-normalised rows of ``x``, in one chunked pass.

    Rows are normalised in float32 (within ~5e-8 of float64 rows on the bench's 10k x 384
    catalog, at ~0.65x the float64 pass's time) and summed in float64. Each chunk's outer
    product is a float32 symmetric rank-k update of rows shifted by the first chunk's mean
    (no cancellation against the large common direction: every entry within ~1e-6 of
    float64), summed in float64.
    """
    n, d = x.shape
    total, outer = np.zeros(d), np.zeros((d, d))
    shift = None
    for a in range(0, n, chunk):
        u = _normalise_rows_(np.array(x[a : a + chunk], dtype=np.float32))
        total += u.sum(axis=0, dtype=np.float64)
        if shift is None:
            shift = u.mean(axis=0, dtype=np.float64).astype(np.float32)
        u -= shift
        outer += u.T @ u  # numpy computes A.T @ A as one syrk call
    n = max(n, 1)
    mean = total / n
    delta = mean - (shift if shift is not None else 0.0)
    cov = outer / n - np.outer(delta, delta)  # E[(u - s)(u - s)^T] - (m - s)(m - s)^T
    return mean, cov


def centred_rows(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Unit rows of ``normalise(x) - mean``: the raw geometry the aligner keeps close to.

    ``x``: ``(n, D)`` raw rows; ``mean``: ``(D,)`` mean of the catalog's normalised rows
    (:func:`normalized_moments`). Computed for a step's sampled rows only (no ``(N, D)``
    centred copy of the catalog is kept).
    """
    return F.normalize(F.normalize(x, dim=-1, eps=1e-12) - mean, dim=-1, eps=1e-12)
