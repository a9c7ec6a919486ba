"""A seeded synthetic multi-modal world with ground truth, where alignment has a job.

:class:`SyntheticWorld` generates items whose content embedding mixes collaborative
factors (what users care about) with modality nuisance (what they do not), a per-item
popularity and a per-item quality, and samples interaction logs in the MovieLens schema of
:mod:`qarm_features.datasets.movielens`. Because every factor is known, questions the real data set can
only estimate -- do content neighbours follow co-engagement, does a representation keep
item quality -- have an answer to check against. Deterministic for a seed, whatever the
size or chunking.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from qarm_features.errors import InputError


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name}: expected a positive int, got {value!r}")


class SyntheticWorld:
    """A seeded multi-modal world with ground truth, where alignment has a measurable job.

    Items have clustered collaborative factors ``collab`` (a Gaussian mixture: what users
    care about) and a popularity bias. Their content embedding is
    ``content = collab @ A + nuisance * N @ B + noise``, where ``N`` are clustered
    modality-nuisance factors independent of taste (visual style, wording). When
    ``nuisance`` is large, nearest neighbours in content space follow the nuisance, not
    co-engagement; an aligner has to learn to project it out (when
    ``2 * collab_dim <= content_dim``, ``A`` and ``B`` span orthogonal subspaces,
    so a linear map can). Users prefer one taste cluster; engagement follows
    ``softmax(beta * user . collab + popularity)`` and ratings follow affinity plus
    ``quality_effect * quality``, so ``rating >= 4`` means a positive. ``quality`` is a
    per-item ground truth (standard normal, correlation 0.5 with popularity) that the
    label depends on but co-engagement does not: the question "does a representation
    keep item quality?" has a known answer here.

    Item rows are generated in fixed blocks of ``BLOCK`` items, each from its own seeded
    RNG, so any size streams with bounded memory and :meth:`iter_content` gives the same
    rows as :attr:`content`, whatever the chunk size. Item ids are ``1..n_items``.

    Args:
        n_items: number of items.
        n_users: number of users.
        collab_dim: dimension of the collaborative factors (and of the nuisance factors).
        content_dim: dimension of the content embedding.
        nuisance: weight of the modality nuisance in content (0 = content is a rotation
            of ``collab`` plus small noise).
        seed: seed of everything.
        n_clusters: taste clusters (and nuisance clusters).
        quality_effect: weight of :attr:`quality` in the rating, in rating points per
            standard deviation (0 = the label ignores quality). The default 0.5 moves an
            item one std above average by half a star; it only changes ratings, never
            which items are engaged or when.
        content_quality: weight of :attr:`quality` in the content embedding, along one
            fixed unit direction (default 0: content knows nothing of quality, the world is
            unchanged). A small weight makes quality a *weak* content direction next to the
            collaborative and nuisance factors, as item quality is in a text embedding:
            the setting where a representation can keep it or lose it.
    """

    BLOCK = 65_536  # rows per generation block; changing it changes the world
    _SPREAD = 0.35  # within-cluster spread relative to the unit-norm cluster centres
    _NOISE = 0.05  # isotropic content noise
    _BETA = 4.0  # engagement sharpness: in-cluster items get ~e^4 more weight
    _POP_SCALE = 1.0  # std of the popularity logit (log-normal popularity)

    def __init__(
        self,
        n_items: int,
        n_users: int,
        collab_dim: int = 16,
        content_dim: int = 64,
        nuisance: float = 1.0,
        seed: int = 0,
        *,
        n_clusters: int = 16,
        quality_effect: float = 0.5,
        content_quality: float = 0.0,
    ):
        for name, value in (
            ("n_items", n_items),
            ("n_users", n_users),
            ("collab_dim", collab_dim),
            ("content_dim", content_dim),
            ("n_clusters", n_clusters),
        ):
            _check_positive_int(name, value)
        if not np.isfinite(nuisance) or nuisance < 0:
            raise InputError(f"nuisance: expected a finite value >= 0, got {nuisance!r}")
        if not np.isfinite(quality_effect) or quality_effect < 0:
            raise InputError(
                f"quality_effect: expected a finite value >= 0, got {quality_effect!r}"
            )
        self.n_items, self.n_users = int(n_items), int(n_users)
        self.collab_dim, self.content_dim = int(collab_dim), int(content_dim)
        self.nuisance, self.seed, self.n_clusters = float(nuisance), int(seed), int(n_clusters)
        self.quality_effect = float(quality_effect)  # a Python float keeps ratings float32
        if not np.isfinite(content_quality) or content_quality < 0:
            raise InputError(
                f"content_quality: expected a finite value >= 0, got {content_quality!r}"
            )
        self.content_quality = float(content_quality)
        g = self._rng(0)
        d = self.collab_dim
        self._centers = (g.standard_normal((n_clusters, d)) / np.sqrt(d)).astype(np.float32)
        self._cluster_p = g.dirichlet(np.full(n_clusters, 5.0))
        self._nuis_centers = (g.standard_normal((n_clusters, d)) / np.sqrt(d)).astype(np.float32)
        mix = g.standard_normal((2 * d, self.content_dim))
        if 2 * d <= self.content_dim:  # orthonormal rows: collab and nuisance separable
            mix = np.linalg.qr(mix.T)[0].T
        else:
            mix /= np.sqrt(self.content_dim)
        self._A = np.ascontiguousarray(mix[:d], dtype=np.float32)
        self._B = np.ascontiguousarray(mix[d:], dtype=np.float32)
        # The content's quality direction: its own RNG stream, so the other draws (and
        # every world with content_quality = 0) are unchanged.
        q_dir = self._rng(4).standard_normal(self.content_dim)
        self._q_dir = (q_dir / np.linalg.norm(q_dir)).astype(np.float32)
        self._cache: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return (
            f"SyntheticWorld(n_items={self.n_items}, n_users={self.n_users}, "
            f"collab_dim={self.collab_dim}, content_dim={self.content_dim}, "
            f"nuisance={self.nuisance}, seed={self.seed}, quality_effect={self.quality_effect}, "
            f"content_quality={self.content_quality})"
        )

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=key))

    @property
    def _n_blocks(self) -> int:
        return -(-self.n_items // self.BLOCK)

    def _block(self, b: int, *, content: bool = True) -> dict[str, np.ndarray]:
        """Generate item block ``b``; content draws come last, so skipping them is safe."""
        n = min(self.BLOCK, self.n_items - b * self.BLOCK)
        d = self.collab_dim
        rng = self._rng(1, b)
        clusters = rng.choice(self.n_clusters, size=n, p=self._cluster_p)
        spread = np.float32(self._SPREAD / np.sqrt(d))
        collab = self._centers[clusters] + spread * rng.standard_normal((n, d), dtype=np.float32)
        pop_z = rng.standard_normal(n)
        quality = 0.5 * pop_z + np.sqrt(0.75) * rng.standard_normal(n)  # popular ~ better
        out = {
            "clusters": clusters.astype(np.int64),
            "collab": collab,
            "popularity": (self._POP_SCALE * pop_z).astype(np.float32),
            "quality": quality.astype(np.float32),
        }
        if content:
            nc = rng.integers(self.n_clusters, size=n)
            nz = self._nuis_centers[nc] + spread * rng.standard_normal((n, d), dtype=np.float32)
            eps = rng.standard_normal((n, self.content_dim), dtype=np.float32)
            eps *= np.float32(self._NOISE / np.sqrt(self.content_dim))
            eps += collab @ self._A
            eps += np.float32(self.nuisance) * (nz @ self._B)
            if self.content_quality > 0:
                q = out["quality"][:, None] * self._q_dir
                eps += np.float32(self.content_quality) * q
            out["content"] = eps
        return out

    def _materialize(self, key: str) -> np.ndarray:
        if key not in self._cache:
            if key == "content":
                parts = [c for _, c in self.iter_content(self.BLOCK)]
                self._cache["content"] = np.ascontiguousarray(np.concatenate(parts))
            else:
                blocks = [self._block(b, content=False) for b in range(self._n_blocks)]
                for k in ("clusters", "collab", "popularity", "quality"):
                    self._cache[k] = np.ascontiguousarray(np.concatenate([x[k] for x in blocks]))
        return self._cache[key]

    @property
    def item_ids(self) -> np.ndarray:
        """Item ids, int64 ``(n_items,)``: ``1..n_items``."""
        return np.arange(1, self.n_items + 1, dtype=np.int64)

    @property
    def user_ids(self) -> np.ndarray:
        """User ids, int64 ``(n_users,)``: ``1..n_users``."""
        return np.arange(1, self.n_users + 1, dtype=np.int64)

    @property
    def collab(self) -> np.ndarray:
        """Ground-truth collaborative factors, float32 ``(n_items, collab_dim)`` (lazy)."""
        return self._materialize("collab")

    @property
    def clusters(self) -> np.ndarray:
        """Taste cluster of each item, int64 ``(n_items,)`` (lazy)."""
        return self._materialize("clusters")

    @property
    def popularity(self) -> np.ndarray:
        """Popularity logit of each item, float32 ``(n_items,)`` (lazy)."""
        return self._materialize("popularity")

    @property
    def quality(self) -> np.ndarray:
        """Ground-truth item quality, float32 ``(n_items,)`` (lazy): standard normal,
        correlation 0.5 with :attr:`popularity`; enters ratings with ``quality_effect``."""
        return self._materialize("quality")

    @property
    def content(self) -> np.ndarray:
        """Content embedding, float32 ``(n_items, content_dim)`` (lazy; prefer
        :meth:`iter_content` for large worlds)."""
        return self._materialize("content")

    @property
    def user_factors(self) -> np.ndarray:
        """User preference vectors in collab space, float32 ``(n_users, collab_dim)``."""
        if "users" not in self._cache:
            rng, d = self._rng(2), self.collab_dim
            taste = rng.choice(self.n_clusters, size=self.n_users, p=self._cluster_p)
            noise = rng.standard_normal((self.n_users, d), dtype=np.float32)
            noise *= np.float32(0.5 / np.sqrt(d))  # users are less tight than item clusters
            self._cache["users"] = np.ascontiguousarray(self._centers[taste] + noise)
        return self._cache["users"]

    def iter_content(self, chunk_size: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(ids int64 (m,), content float32 (m, content_dim))`` in order.

        The chunks concatenate to :attr:`content` exactly, for any ``chunk_size``; memory
        stays bounded by one generation block plus one chunk.
        """
        _check_positive_int("chunk_size", chunk_size)
        cached = self._cache.get("content")
        if cached is not None:
            for lo in range(0, self.n_items, chunk_size):
                hi = min(lo + chunk_size, self.n_items)
                yield np.arange(lo + 1, hi + 1, dtype=np.int64), cached[lo:hi]
            return
        start, pending, n_pending = 0, [], 0
        for b in range(self._n_blocks):
            block = self._block(b)["content"]
            pending.append(block)
            n_pending += len(block)
            if n_pending < chunk_size and b < self._n_blocks - 1:
                continue
            buf = pending[0] if len(pending) == 1 else np.concatenate(pending)
            lo = 0
            while len(buf) - lo >= chunk_size or (b == self._n_blocks - 1 and lo < len(buf)):
                hi = min(lo + chunk_size, len(buf))
                yield np.arange(start + 1, start + hi - lo + 1, dtype=np.int64), buf[lo:hi]
                start += hi - lo
                lo = hi
            pending, n_pending = ([buf[lo:]], len(buf) - lo) if lo < len(buf) else ([], 0)

    def interactions(self, n_per_user: int = 20) -> pd.DataFrame:
        """Sample each user's engagements and ratings.

        Each user engages ``min(n_per_user, n_items)`` distinct items, drawn without
        replacement from ``softmax(beta * user . collab + popularity)`` (Gumbel top-k).
        Ratings (1..5) rise with affinity ``user . collab`` and with
        ``quality_effect * quality``; ``>= 4`` is a positive. Timestamps increase along each
        user's sequence. ``quality_effect`` changes ratings only: the engaged items and
        timestamps are the same for any weight.

        Returns:
            DataFrame ``user_id`` int64, ``item_id`` int64, ``rating`` float32,
            ``timestamp`` int64, sorted by timestamp (stable).
        """
        _check_positive_int("n_per_user", n_per_user)
        k = min(int(n_per_user), self.n_items)
        collab, users = self.collab, self.user_factors
        pop, quality = self.popularity, self.quality
        rng = self._rng(3, k)
        step = max(1, (1 << 22) // self.n_items)  # bound the (users x items) logit block
        items, affinity = [], []
        for lo in range(0, self.n_users, step):
            u = users[lo : lo + step]
            logits = np.float32(self._BETA) * (u @ collab.T) + pop
            uniform = rng.random(logits.shape, dtype=np.float32) + np.float32(1e-12)
            logits -= np.log(-np.log(uniform))  # + Gumbel noise: top-k = sampling w/o replacement
            top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(logits, top, axis=1), axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)  # most wanted first
            items.append(top)
            affinity.append(np.einsum("ud,ukd->uk", u, collab[top]))
        top, aff = np.concatenate(items), np.concatenate(affinity)
        noise = 0.5 * rng.standard_normal(top.shape)  # float64: raw is float64, as before
        raw = 3.0 + 2.0 * (aff - 0.5) + self.quality_effect * quality[top] + noise
        rating = np.clip(np.rint(raw), 1, 5).astype(np.float32)
        start = 880_000_000 + rng.integers(0, 180 * 86_400, size=(self.n_users, 1))
        gaps = rng.exponential(86_400.0, size=top.shape).astype(np.int64) + 1
        df = pd.DataFrame(
            {
                "user_id": np.repeat(self.user_ids, k),
                "item_id": (top + 1).astype(np.int64).ravel(),
                "rating": rating.ravel(),
                "timestamp": (start + np.cumsum(gaps, axis=1)).astype(np.int64).ravel(),
            }
        )
        return df.sort_values("timestamp", kind="stable").reset_index(drop=True)
