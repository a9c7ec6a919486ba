"""Symmetric in-batch InfoNCE over ``<trigger, target>`` pairs: the pieces the aligner
(:mod:`qarm_features.align`) and the encoder fine-tuner (:mod:`qarm_features.finetune`)
share: pair rows from ids (:func:`pair_rows`) and the loss with in-batch false negatives
masked (:func:`masked_nce`, :func:`symmetric_nce`); and the aligner's training-only
auxiliary item heads (:class:`TargetHeads`, :func:`weighted_targets`). Training only:
imports torch.
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
            "(qarm_features.pairs.mine_pairs)"
        )
    return ti[keep], gi[keep]


def masked_nce(logits: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of row i against column i, masking in-batch false negatives.

    Column ``j != i`` is masked for row ``i`` when its key item ``k[j]`` is row i's
    positive ``k[i]`` (the same target twice in a batch) or row i's query item ``q[i]``.
    """
    n = logits.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    mask = ((k[None, :] == k[:, None]) | (k[None, :] == q[:, None])) & ~eye
    labels = torch.arange(n, device=logits.device)
    return F.cross_entropy(logits.masked_fill(mask, float("-inf")), labels)


def symmetric_nce(za, zb, a, b, temperature: float):
    """``(CE(za @ zb.T / T) + CE(zb @ za.T / T)) / 2`` with :func:`masked_nce` masking.

    ``za``, ``zb``: ``(B, d)`` unit-norm embeddings of the pairs' items; ``a``, ``b``:
    ``(B,)`` their item rows (equal rows are the same item).
    """
    logits = za @ zb.T / temperature
    return 0.5 * (masked_nce(logits, a, b) + masked_nce(logits.T, b, a))


def weighted_targets(item_targets: dict | None, weights: dict[str, float], n: int) -> dict:
    """``{name: (weight, (n, t) float32)}`` for every target with a positive weight.

    Raises:
        InputError: a target array that is not ``(n, t)``.
    """
    out = {}
    for name, weight in weights.items():
        if weight > 0 and item_targets is not None and name in item_targets:
            arr = np.asarray(item_targets[name], dtype=np.float32)
            if arr.ndim != 2 or arr.shape[0] != n:
                raise InputError(
                    f"item_targets[{name!r}]: expected shape ({n}, t), got {arr.shape}"
                )
            out[name] = (weight, arr)
    return out


class TargetHeads(torch.nn.Module):
    """Training-only linear heads: aligned embedding -> standardised item targets.

    ``targets``: ``{name: (weight, (n, t) float32 array, NaN rows = unknown)}``. Never
    exported: the served aligner is :class:`Aligner` alone.
    """

    def __init__(self, out_dim: int, targets: dict, device) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleDict()
        self.weights: dict[str, float] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.known: dict[str, torch.Tensor] = {}
        for name, (weight, arr) in targets.items():
            arr = np.asarray(arr, dtype=np.float64)
            known = np.isfinite(arr).all(axis=1)
            if known.sum() < 2:
                continue
            mu, sd = arr[known].mean(axis=0), arr[known].std(axis=0)
            z = np.where(known[:, None], (arr - mu) / np.maximum(sd, 1e-8), 0.0)
            self.heads[name] = torch.nn.Linear(out_dim, arr.shape[1])
            self.weights[name] = float(weight)
            self.values[name] = torch.from_numpy(z.astype(np.float32)).to(device)
            self.known[name] = torch.from_numpy(known).to(device)

    def loss(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=z.device)
        for name, head in self.heads.items():
            k = self.known[name][rows]
            if k.any():
                err = head(z[k]) - self.values[name][rows[k]]
                total = total + self.weights[name] * (err**2).mean()
        return total


# --------------------------------------------------------------------------- raw geometry
_MOMENT_CHUNK = 65_536  # rows per float64 chunk (bounded memory on large catalogs)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def normalized_moments(x: np.ndarray, chunk: int = _MOMENT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the L2-normalised rows of ``x``, in float64, chunk by chunk."""
    d = x.shape[1]
    total, outer = np.zeros(d), np.zeros((d, d))
    for a in range(0, x.shape[0], chunk):
        u = _unit_rows(x[a : a + chunk])
        total += u.sum(axis=0)
        outer += u.T @ u
    n = max(x.shape[0], 1)
    mean = total / n
    return mean, outer / n - np.outer(mean, mean)


def centred_reference(x: np.ndarray, mean: np.ndarray, chunk: int = _MOMENT_CHUNK) -> np.ndarray:
    """float32 unit rows of ``normalise(x) - mean``: the raw geometry the aligner keeps close to."""
    out = np.empty(x.shape, dtype=np.float32)
    for a in range(0, x.shape[0], chunk):
        u = _unit_rows(x[a : a + chunk]) - mean
        out[a : a + chunk] = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    return out
