"""Stable codes across retrains: code ids matched to the previous bundle, churn measured.

Codes are ids that rankers learn embeddings for; a retrain must not renumber them. k-means
cluster numbers are an arbitrary permutation, and a retrained aligner moves (rotates) the
whole aligned space, so a new bundle's level-l code k means nothing to a ranker trained on
the old one. Two tools:

- :func:`match_codebooks`: relabel a new RQ codebook so that code k of level l keeps
  meaning the same region as in the previous bundle. The new aligned space is first mapped
  onto the old one by orthogonal Procrustes on the items both bundles hold; then, per
  level, the new centroids (mapped) are assigned to the old centroids by minimum total
  distance (``scipy.optimize.linear_sum_assignment``) and the codebook rows are permuted.
  A permutation of a level's rows changes no quantisation, only the ids.
- :func:`churn`: for the items in both bundles, the fraction whose level-l code changed
  (per level and for the full tuple) and the mean overlap of their VQ top-K lists.

Both only read arrays; ``qarm build --warm-start PREV`` calls the first, ``qarm inspect
NEW --against OLD`` the second.
"""

from __future__ import annotations

import numpy as np

from qarm_features.errors import InputError


def procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The orthogonal ``R`` minimising ``||source @ R - target||`` (rows are the same items)."""
    if source.shape[1] != target.shape[1]:
        raise InputError(
            f"aligned dims differ ({source.shape[1]} vs {target.shape[1]}): codes of spaces "
            "of different sizes cannot be matched"
        )
    u, _, vt = np.linalg.svd(source.astype(np.float64).T @ target.astype(np.float64))
    return u @ vt


def match_codebooks(codebooks: np.ndarray, new_aligned, old_aligned, old_codebooks: np.ndarray):
    """Permute each level of ``codebooks`` so its ids match ``old_codebooks``'.

    Args:
        codebooks: ``(L, K, d)`` the new RQ codebooks.
        new_aligned, old_aligned: ``(m, d)`` the same m items in the new and old spaces.
        old_codebooks: ``(L', K', d)`` the previous bundle's; levels and codes beyond the
            common ``min(L, L')`` / ``K == K'`` are left as they are.

    Returns:
        ``(codebooks, perms)``: the relabelled codebooks and, per matched level, the
        permutation applied (``new_row = perm[old_id]``).
    """
    from scipy.optimize import linear_sum_assignment

    rot = procrustes(np.asarray(new_aligned), np.asarray(old_aligned))
    out = np.array(codebooks, dtype=np.float32, copy=True)
    perms = []
    for level in range(min(out.shape[0], old_codebooks.shape[0])):
        if out.shape[1] != old_codebooks.shape[1]:
            break  # another K: ids cannot keep their meaning one to one
        mapped = out[level].astype(np.float64) @ rot
        old = old_codebooks[level].astype(np.float64)
        cost = ((old[:, None, :] - mapped[None, :, :]) ** 2).sum(-1)  # (K_old, K_new), K<=~4k
        rows, cols = linear_sum_assignment(cost)
        perm = cols[np.argsort(rows)]
        out[level] = out[level][perm]
        perms.append(perm)
    return out, perms


def churn_codes(new_rq, new_vq, old_rq, old_vq) -> dict:
    """Churn of the same items' codes: ``(n, L)`` RQ codes and ``(n, K)`` VQ lists of keys.

    Returns:
        ``{"n_items", "level_1" .. "level_L", "tuple", "vq_overlap"}`` (see :func:`churn`).
    """
    levels = min(new_rq.shape[1], old_rq.shape[1])
    changed = np.asarray(new_rq)[:, :levels] != np.asarray(old_rq)[:, :levels]
    out = {"n_items": int(changed.shape[0])}
    for level in range(levels):
        out[f"level_{level + 1}"] = float(changed[:, level].mean())
    out["tuple"] = float(changed.any(axis=1).mean())
    overlap = [
        len(set(map(str, x)) & set(map(str, y))) / max(len(y), 1) for x, y in zip(new_vq, old_vq)
    ]
    out["vq_overlap"] = float(np.mean(overlap)) if overlap else 1.0
    return out


def common_rows(new_keys, old) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the items in both catalogs: positions in ``new_keys`` and in ``old``."""
    old_pos = {str(k): i for i, k in enumerate(old.keys_of(old.item_ids))}
    pairs = [(i, old_pos[str(k)]) for i, k in enumerate(new_keys) if str(k) in old_pos]
    if not pairs:
        raise InputError("the two catalogs hold no item in common: nothing to compare")
    a, b = np.asarray(pairs, np.int64).T
    return a, b


def churn(new, old) -> dict:
    """How much the codes of the items in both bundles moved from ``old`` to ``new``.

    Each bundle encodes each common item's *own* content (its ``raw_emb`` row there), as
    the batch path does.

    Returns:
        ``{"n_items", "level_1" .. "level_L", "tuple", "vq_overlap"}``: fractions in [0, 1]
        of the common items whose code of that level (or whose tuple over the common
        levels) changed, and the mean fraction of an item's VQ top-K found in its old
        top-K (pool ids compared as catalog keys).
    """
    from qarm_features.bundle.encode import encode_items

    a, b = common_rows(new.keys_of(new.item_ids), old)
    enc_new = encode_items(new, new.raw_emb[a], new.item_ids[a])
    enc_old = encode_items(old, old.raw_emb[b], old.item_ids[b])
    return churn_codes(
        enc_new.rq_codes,
        new.keys_of(enc_new.vq_codes.clip(min=0)),
        enc_old.rq_codes,
        old.keys_of(enc_old.vq_codes.clip(min=0)),
    )


# When `qarm inspect` / `qarm status` call a rebuild due (docs/feast.md, "the cycle"):
# items added since the build past this share of its catalog, or their RQ residual error
# past this multiple of the built catalog's (new content the codebooks do not cover).
REBUILD_SHARE = 0.10
REBUILD_DRIFT = 1.25
# The drift is judged on at least this many added items (one item's error is noise).
DRIFT_MIN_ITEMS = 30
# Rows of the built catalog whose residual error is the reference (a seeded sample: the
# cost does not grow with the catalog).
DRIFT_SAMPLE = 20_000


def append_report(
    bundle,
    added_raw_emb,
    *,
    share_due: float = REBUILD_SHARE,
    drift_due: float = REBUILD_DRIFT,
    drift_min_items: int = DRIFT_MIN_ITEMS,
    sample: int = DRIFT_SAMPLE,
    seed: int = 0,
) -> dict:
    """How far the items added since ``bundle``'s build (pushed, not in its catalog) have
    moved the catalog away from what its codebooks were fitted on.

    Args:
        bundle: a loaded :class:`~qarm_features.bundle.artifact.Bundle`.
        added_raw_emb: ``(m, d_raw)`` raw content of the added items (m may be 0).
        share_due: a rebuild is due past this share ``m / n_catalog``.
        drift_due: ... or past this ratio of the added items' RQ residual error to the
            built catalog's (relative residual energy, :meth:`reconstruction_error`),
            judged once at least ``drift_min_items`` items were added.
        sample: built-catalog rows (seeded sample) whose residual error is the reference;
            the added items are sampled the same way.

    Returns:
        ``{"n_catalog", "n_added", "share_added", "residual_error_catalog",
        "residual_error_added" (None when m = 0), "drift" (their ratio, or None),
        "rebuild_due", "reasons"}``.
    """
    from qarm_features._validate import check_embeddings
    from qarm_features.bundle.encode import align

    def sampled(x):
        if x.shape[0] <= sample:
            return x
        rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], sample, replace=False))
        return x[rows]

    n = int(bundle.raw_emb.shape[0])
    base = bundle.rq.reconstruction_error(align(bundle, sampled(bundle.raw_emb)))
    d_raw = bundle.raw_emb.shape[1]
    added = np.asarray(added_raw_emb, dtype=np.float32)
    m = int(added.shape[0]) if added.ndim else 0
    err = drift = None
    if m:
        added = check_embeddings(added, name="added items' raw_emb", dim=d_raw)
        err = float(bundle.rq.reconstruction_error(align(bundle, sampled(added))))
        drift = err / base if base > 0 else None
    share = m / n if n else 0.0
    reasons = []
    if share > share_due:
        reasons.append(
            f"{m} items added since the build, {share:.1%} of its {n} (> {share_due:.0%})"
        )
    if drift is not None and m >= drift_min_items and drift > drift_due:
        reasons.append(
            f"the added items' RQ residual error is {drift:.2f}x the catalog's (> {drift_due:g}x):"
            " the codebooks do not cover their content"
        )
    return {
        "n_catalog": n,
        "n_added": m,
        "share_added": share,
        "residual_error_catalog": float(base),
        "residual_error_added": err,
        "drift": drift,
        "rebuild_due": bool(reasons),
        "reasons": reasons,
    }
