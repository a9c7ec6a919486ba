"""The evaluation protocol (DESIGN.md): configuration, variants, splits.

1. **Split.** Label as the repo's ``qarm.yaml`` defines it (``rating >= threshold``; a 0/1
   label column; implicit logs: every row positive, plus ``negatives_per_positive``
   sampled negatives per ranker row, :func:`sample_negatives`). Global temporal split:
   events before the timestamp at the 80% quantile are train, the rest test. Two kinds of
   cold items on the test side, reported apart: *cold* items, 20% of the items with train
   rows (random, per seed), lose every train row; *new* items first appear in the test
   period. Pairs, aligner, codebooks and rankers see the remaining train rows only; the
   last 10% of them (by time) are the rankers' validation rows (early stopping).
2. **History.** Every row carries the user's latest ``history_len`` events strictly before
   it and their past labels — Feast's point-in-time join with a strict inequality, so an
   event never sees itself. Train rows see train-visible events only (no cold item), test
   rows see everything earlier (a cold item's codes come from its content, as ``qarm_cold``
   serves them).
3. **Variants**: one ranker architecture and budget; only the item tower's inputs change
   (:data:`VARIANTS`).
4. **Validation split** (:func:`make_validation_split`), for every choice: the same
   protocol applied *inside* the train rows. The last ``test_fraction`` of train rows (by
   time) are validation rows and ``cold_item_fraction`` of the train-visible items
   (drawn with ``seed + VAL_COLD_SEED_OFFSET``) lose their earlier rows: validation has its
   own warm and cold items, and never touches test rows. Candidates
   (:attr:`EvalConfig.candidates`) are compared there, on ``selection_seeds``; test rows
   only report.

:class:`EvalConfig` holds the protocol, the ranker budget and the item-space sections,
which are :class:`~qarm_features.config.BuildConfig`'s (same classes, same defaults: one
preset for ``qarm build`` and ``qarm evaluate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from qarm_features._validate import check_columns, check_ids, lookup_rows
from qarm_features.config import AlignerConfig, BuildConfig, PairsConfig, RQConfig, VQConfig
from qarm_features.errors import InputError

# variant -> (item-tower inputs, description). Every variant also has user id, item id and
# the user's history (history items go through the same item tower).
VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    "A": ((), "item id only"),
    "B": (("raw_dense",), "+ frozen raw embedding (dense)"),
    "C": (("raw_rq", "raw_vq"), "+ RQ/VQ codes of the raw embedding"),
    "D": (("aligned_rq", "aligned_vq"), "+ QARM codes (RQ + VQ of the aligned embedding)"),
    "E": (("aligned_dense",), "+ aligned embedding (dense)"),
    "D_vq": (("aligned_vq",), "+ QARM VQ codes only"),
    "D_rq": (("aligned_rq",), "+ QARM RQ codes only"),
    "B+D": (("raw_dense", "aligned_rq", "aligned_vq"), "+ frozen raw embedding and QARM codes"),
}


class Ablation(BaseModel):
    """One candidate ("what if"): other item-space and/or ranker settings for a few variants.

    Measured on the validation split (:func:`make_validation_split`) against the main
    configuration, paired by seed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str
    aligner: dict = {}  # AlignerConfig overrides (a new aligner and codes per seed)
    rq: dict = {}  # RQConfig overrides (new codes per seed)
    ranker: dict = {}  # EvalConfig overrides of ranker fields (rq_mode, content_codes, ...)
    variants: tuple[str, ...] = ("D", "B+D")

    @property
    def refits_space(self) -> bool:
        return bool(self.aligner or self.rq)


# Offset of the validation split's cold-item draw from the run's seed (the test split's
# cold items use the seed itself, the aligner's validation items seed + 1000).
VAL_COLD_SEED_OFFSET = 2000


class EvalConfig(BaseModel):
    """Protocol and budget. Unknown keys are rejected; defaults fit 3 seeds in < 20 min."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    positive_threshold: float = 4.0  # label = rating >= 4 (the repo route: qarm.yaml's)
    # Implicit logs (every row a positive): sampled negatives per positive ranker row,
    # drawn from the items of the row's own period (fit, validation or test rows) in
    # proportion to their rows there (popularity-matched: an item's share of negatives
    # equals its share of positives, so popularity alone scores AUC 0.5), seeded. 0: the
    # log has its own negatives (ratings or a 0/1 label).
    negatives_per_positive: int = Field(0, ge=0)
    test_fraction: float = Field(0.2, gt=0, lt=1)  # global temporal split
    cold_item_fraction: float = Field(0.2, ge=0, lt=1)  # items removed from train
    val_fraction: float = Field(0.1, gt=0, lt=1)  # last train rows: ranker early stopping
    history_len: int = Field(30, ge=1)  # latest events per row (DIN sequence length)
    # Ranker budget, identical for every variant.
    dim: int = Field(32, ge=2)  # per-part embedding width (paper: 64; 32 fits the CPU budget)
    epochs: int = Field(6, ge=1)  # max epochs; the best validation epoch is kept
    # Rankers peak after 1-2 epochs and validation AUC falls monotonically after (every
    # run so far), so one epoch of patience keeps the same best epoch at 2/3 of the cost.
    patience: int = Field(1, ge=1)
    batch_size: int = Field(1024, ge=8)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    # Rows per prefix-n-gram length before hashing: K=64 keeps (c1, c2) exact (4096 rows) and
    # hashes (c1, c2, c3) into 8191 rows, plenty for ~1.3k warm items' distinct prefixes
    # (the module default, 2**16, would make Adam update 65k rows per step for nothing).
    prefix_buckets: int = Field(1 << 13, ge=2)
    code_init_std: float = Field(0.0, ge=0)  # 0: codes unseen in training add nothing
    # RQ codes as prefix n-grams (c1), (c1, c2), (c1, c2, c3), as in the semantic-id ranking
    # literature (see RQCodeEmbedding and the rq_* ablations).
    rq_mode: Literal["level", "prefix", "both"] = "prefix"
    vq_tied: bool = False  # VQ codes read the item-id table (see RankerConfig.vq_tied)
    # RQ level dropout in ranker training (RQCodeEmbedding.level_dropout): adopted by the
    # selection rule on the validation split (issue 11 sweep: D warm -0.0020, cold +0.0002;
    # reports/movielens-100k.md); the candidate `no_level_dropout` measures it again.
    level_dropout: float = Field(0.3, ge=0, lt=1)
    # Content-initialised code embeddings (ranking.QarmEmbedding.with_content: a code's row
    # is a learned map of its decoded RQ vector / pool item's aligned embedding plus a
    # learned delta). On by default: issue 11's validation winner (validation seeds 0-2,
    # paired: cold D +0.014, cold B+D +0.013, warm D +0.006 AUC over plain code tables);
    # unseen fine codes of cold items still score through maps every warm item trained.
    content_codes: bool = True
    # Item spaces: BuildConfig's sections with BuildConfig's defaults, the preset `qarm
    # build` uses too (the run's seed replaces their seeds). The aligner's early stopping
    # holds out aligner.val_fraction of the paired (warm) items.
    pairs: PairsConfig = BuildConfig().pairs
    aligner: AlignerConfig = BuildConfig().aligner
    rq: RQConfig = BuildConfig().rq
    vq: VQConfig = BuildConfig().vq
    # The report's variants (D_vq / D_rq, the VQ-only / RQ-only ablations, are left out of
    # the default run to fit 5 seeds plus the validation candidates in the CPU budget).
    variants: tuple[str, ...] = ("A", "B", "C", "D", "E", "B+D")
    # Every candidate tried, measured on the validation split (selection_seeds) against
    # the main configuration: the report's candidates table, regenerated with it.
    candidates: dict[str, Ablation] = {
        "plain_code_tables": Ablation(
            description="code tables without content (the previous default: a code's row "
            "is a free, zero-initialised embedding)",
            ranker={"content_codes": False},
        ),
        "rq_3_levels": Ablation(
            description="a coarser residual code: 3 RQ levels instead of 4 (the previous "
            "default)",
            rq={"n_levels": 3},
        ),
        "no_level_dropout": Ablation(
            description="no RQ level dropout in ranker training (the previous default)",
            ranker={"level_dropout": 0.0},
            variants=("D",),
        ),
        "exact_raw_term": Ablation(
            description="the aligner's raw-consistency term on every batch row at every step "
            "(the previous default; the shipped term: 256 sampled rows on every 8th step)",
            aligner={"raw_consistency_rows": None, "raw_consistency_every": 1},
        ),
        "mlp_aligner": Ablation(
            description="aligner with a 256-unit MLP next to the linear skip",
            aligner={"hidden": 256},
            variants=("D",),
        ),
    }
    selection_seeds: tuple[int, ...] = (0, 1, 2)
    # Variants trained on the validation split for the main configuration (the baselines
    # every candidate's paired deltas are taken against).
    selection_variants: tuple[str, ...] = ("A", "B", "D", "B+D")
    # Test-split ablations (same seeds as the report); none by default: choices are made
    # on the validation split.
    ablations: dict[str, Ablation] = {}
    threads: int = Field(1, ge=1)  # torch threads (the budget assumes a shared 2-core box)
    # Rankers trained on every test-split variant, paired per ranker: "din" (ours,
    # app.ranker; the only one the validation selection runs, and required) and "deepfm"
    # (deepctr-torch's DeepFM, app.deepfm: a ranker the project did not write, issue 17).
    rankers: tuple[Literal["din", "deepfm"], ...] = ("din", "deepfm")

    def with_candidate(self, cand: Ablation) -> EvalConfig:
        """This configuration with a candidate's overrides applied."""
        return self.model_copy(
            update={
                **cand.ranker,
                "aligner": self.aligner.model_copy(update=cand.aligner),
                "rq": self.rq.model_copy(update=cand.rq),
            }
        )

    def build_config(self, seed: int) -> BuildConfig:
        """The item-space sections as a :class:`BuildConfig`, every seed set to ``seed``."""
        sections = {"pairs": self.pairs, "aligner": self.aligner, "rq": self.rq, "vq": self.vq}
        return BuildConfig(**sections).with_seed(seed)


QUICK = {
    "variants": ("A", "B", "D", "B+D"),  # the aims' variants: keeps --quick under a minute
    "epochs": 1,
    "history_len": 10,
    "dim": 16,
    "ablations": {},
    "candidates": {},
    "selection_seeds": (),
}

# Sampled negatives per positive for implicit logs (the repo route sets it when qarm.yaml's
# events have neither label nor rating): 4 keeps ranker rows 5x the log, the usual 1:4 of
# CTR training sets.
IMPLICIT_NEGATIVES = 4


def repo_config(data, config: EvalConfig | None = None, *, quick: bool = False) -> EvalConfig:
    """The protocol for a repo: its ``qarm.yaml`` item-space sections (pairs, aligner, RQ,
    VQ) and label; sampled negatives when its events are implicit; ``config``'s ranker
    budget and candidates (default :class:`EvalConfig`), cut to :data:`QUICK`."""
    cfg = config or EvalConfig()
    build = data.config
    events = data.project.events
    implicit = events.label is None and events.rating is None
    cfg = cfg.model_copy(
        update={
            "pairs": build.pairs,
            "aligner": build.aligner,
            "rq": build.rq,
            "vq": build.vq,
            "positive_threshold": data.threshold,
            "negatives_per_positive": IMPLICIT_NEGATIVES if implicit else 0,
        }
    )
    return cfg.model_copy(update=QUICK) if quick else cfg


# --------------------------------------------------------------------------- split
def label_of(interactions: pd.DataFrame, threshold: float) -> np.ndarray:
    return (interactions["rating"].to_numpy() >= threshold).astype(np.int8)


def temporal_split(interactions: pd.DataFrame, test_fraction: float = 0.2):
    """Global temporal split: rows before the ``1 - test_fraction`` timestamp quantile are train.

    Rows sharing the boundary timestamp all go to test, so no second is split in two.

    Returns:
        ``(train, test, cut_ts)`` with ``train.timestamp < cut_ts <= test.timestamp``.
    """
    check_columns(interactions, ["user_id", "item_id", "rating", "timestamp"], name="interactions")
    if len(interactions) < 2:
        raise InputError("interactions: need at least 2 rows to split")
    df = interactions.sort_values("timestamp", kind="stable").reset_index(drop=True)
    cut = min(max(round((1 - test_fraction) * len(df)), 1), len(df) - 1)
    cut_ts = int(df["timestamp"].iloc[cut])
    train = df[df["timestamp"] < cut_ts].reset_index(drop=True)
    test = df[df["timestamp"] >= cut_ts].reset_index(drop=True)
    return train, test, cut_ts


def choose_cold_items(item_ids, fraction: float, seed: int) -> np.ndarray:
    """``round(fraction * n)`` catalog items drawn uniformly at random (sorted int64)."""
    ids = check_ids(item_ids, name="item_ids")
    n = round(fraction * ids.size)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(ids, size=n, replace=False)) if n else ids[:0]


def point_in_time_history(events: pd.DataFrame, queries: pd.DataFrame, n: int):
    """The latest ``n`` events of each query's user strictly before the query's timestamp.

    The offline equivalent of Feast's point-in-time join of a user-history view (with a
    strict inequality: an event never sees itself or events of the same second).

    Args:
        events: ``user_id, item_id, label, timestamp``.
        queries: ``user_id, timestamp``.
        n: history length.

    Returns:
        ``(items, labels)``, both ``(len(queries), n)`` int64, most recent first, padded
        with ``-1`` (items) and ``0`` (labels).
    """
    check_columns(events, ["user_id", "item_id", "label", "timestamp"], name="events")
    check_columns(queries, ["user_id", "timestamp"], name="queries")
    ev = events.sort_values(["user_id", "timestamp"], kind="stable")
    eu = ev["user_id"].to_numpy(np.int64)
    et = ev["timestamp"].to_numpy(np.int64)
    ei = ev["item_id"].to_numpy(np.int64)
    el = ev["label"].to_numpy(np.int64)
    qu = queries["user_id"].to_numpy(np.int64)
    qt = queries["timestamp"].to_numpy(np.int64)
    # One sortable int64 key per (user, timestamp): dense ranks, so no overflow.
    user_vals = np.unique(np.r_[eu, qu])
    ts_vals = np.unique(np.r_[et, qt])
    span = np.int64(ts_vals.size)
    key_e = np.searchsorted(user_vals, eu) * span + np.searchsorted(ts_vals, et)
    key_q = np.searchsorted(user_vals, qu) * span + np.searchsorted(ts_vals, qt)
    ustart = np.searchsorted(key_e, np.searchsorted(user_vals, qu) * span, side="left")
    end = np.searchsorted(key_e, key_q, side="left")  # events strictly before the query
    items = np.full((qu.size, n), -1, np.int64)
    labels = np.zeros((qu.size, n), np.int64)
    for j in range(n):
        idx = end - 1 - j
        ok = idx >= ustart
        items[ok, j] = ei[idx[ok]]
        labels[ok, j] = el[idx[ok]]
    return items, labels


@dataclass
class Rows:
    """Ranker rows: catalog row of the target, user index, history rows, label."""

    user: np.ndarray  # (m,) int64 user index (0 = unknown)
    user_id: np.ndarray  # (m,) raw user ids, for UAUC/GAUC
    item: np.ndarray  # (m,) int64 catalog row
    hist: np.ndarray  # (m, T) int64 catalog rows, -1 padding
    hist_label: np.ndarray  # (m, T) int64
    y: np.ndarray  # (m,) float32

    def __len__(self) -> int:
        return int(self.item.shape[0])


@dataclass
class Split:
    """One seed's split: rows for the ranker and the item sets of the protocol."""

    train: pd.DataFrame  # train-visible interactions (cold items removed): all fitting sees
    test: pd.DataFrame
    cold_items: np.ndarray  # items with train rows, removed (the per-seed draw)
    warm_items: np.ndarray  # items with >= 1 train-visible interaction
    fit: Rows
    val: Rows
    test_rows: Rows
    n_users: int
    item_ids: np.ndarray  # (n_catalog,) the catalog; rows index it
    item_id_index: np.ndarray  # (n_catalog,) row in the item-id table, 0 = OOV
    # items of the test period with no row before it (first appear after the split)
    new_items: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


def make_split(item_ids, interactions, cfg: EvalConfig, seed: int) -> Split:
    """Apply the protocol's splits and attach point-in-time histories to every row."""
    item_ids = check_ids(item_ids, name="item_ids")
    train, test, _ = temporal_split(interactions, cfg.test_fraction)
    seen = np.unique(train["item_id"].to_numpy(np.int64))  # cold items are drawn among them
    cold = choose_cold_items(seen, cfg.cold_item_fraction, seed)
    return _split_rows(item_ids, train, test, cold, cfg, seed)


def make_validation_split(item_ids, split: Split, cfg: EvalConfig, seed: int) -> Split:
    """The protocol applied inside ``split``'s train-visible rows (never its test rows).

    The last ``cfg.test_fraction`` of train rows by time become validation rows; a
    ``cfg.cold_item_fraction`` of the train-visible items, drawn with
    ``seed + VAL_COLD_SEED_OFFSET``, lose their earlier rows (the validation cold items).
    Returns a :class:`Split` whose ``test_rows`` are the validation rows.
    """
    item_ids = check_ids(item_ids, name="item_ids")
    cols = ["user_id", "item_id", "rating", "timestamp"]
    inner, val, _ = temporal_split(split.train[cols], cfg.test_fraction)
    cold = choose_cold_items(
        np.unique(inner["item_id"].to_numpy(np.int64)),
        cfg.cold_item_fraction,
        seed + VAL_COLD_SEED_OFFSET,
    )
    return _split_rows(item_ids, inner, val, cold, cfg, seed + VAL_COLD_SEED_OFFSET)


def sample_negatives(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``df`` plus ``n`` sampled negatives (``label`` 0) per row, sorted by time.

    A negative copies its row's user and timestamp; its item is drawn from ``df``'s items
    in proportion to their rows in ``df`` (popularity-matched within the period), never
    the row's own item. Seeded; a row's negatives follow it at the same timestamp.
    """
    if n == 0 or df.empty:
        return df
    items, counts = np.unique(df["item_id"].to_numpy(np.int64), return_counts=True)
    if items.size < 2:
        return df
    rng = np.random.default_rng(seed)
    p = counts / counts.sum()
    own = df["item_id"].to_numpy(np.int64)[:, None]
    neg = rng.choice(items, size=(len(df), n), p=p)
    for _ in range(20):  # redraw a row's own item (a head item may take a few rounds)
        same = neg == own
        if not same.any():
            break
        neg[same] = rng.choice(items, size=int(same.sum()), p=p)
    keep = (neg != own).ravel()
    rows = np.repeat(np.arange(len(df)), n)[keep]
    negs = df.iloc[rows].assign(item_id=neg.ravel()[keep], label=np.int8(0))
    if "rating" in negs:
        negs = negs.assign(rating=0.0)
    out = pd.concat([df, negs], ignore_index=True)
    return out.sort_values("timestamp", kind="stable").reset_index(drop=True)


def _split_rows(item_ids, train, test, cold, cfg: EvalConfig, seed: int = 0) -> Split:
    new = np.setdiff1d(
        np.unique(test["item_id"].to_numpy(np.int64)), train["item_id"].to_numpy(np.int64)
    )
    train = train[~train["item_id"].isin(cold)].reset_index(drop=True)
    warm = np.unique(train["item_id"].to_numpy(np.int64))
    thr = cfg.positive_threshold
    train = train.assign(label=label_of(train, thr))
    test = test.assign(label=label_of(test, thr))

    n_val = max(1, round(cfg.val_fraction * len(train)))
    fit_df, val_df = train.iloc[:-n_val], train.iloc[-n_val:]
    users = np.unique(fit_df["user_id"].to_numpy(np.int64))
    id_index = np.zeros(item_ids.size, np.int64)
    warm_rows = lookup_rows(warm, item_ids, name="train.item_id")
    id_index[warm_rows] = np.arange(1, warm.size + 1)
    all_events = pd.concat([train, test], ignore_index=True)

    def rows(df: pd.DataFrame, events: pd.DataFrame) -> Rows:
        h_items, h_labels = point_in_time_history(events, df, cfg.history_len)
        hist = np.full(h_items.shape, -1, np.int64)
        ok = h_items >= 0
        hist[ok] = lookup_rows(h_items[ok], item_ids, name="history item_id")
        uid = df["user_id"].to_numpy(np.int64)
        pos = np.searchsorted(users, uid)
        hit = (pos < users.size) & (users[np.minimum(pos, max(users.size - 1, 0))] == uid)
        return Rows(
            user=np.where(hit, pos + 1, 0).astype(np.int64),
            user_id=uid,
            item=lookup_rows(df["item_id"].to_numpy(np.int64), item_ids, name="item_id"),
            hist=hist,
            hist_label=h_labels,
            y=df["label"].to_numpy(np.float32),
        )

    neg = cfg.negatives_per_positive
    rng = np.random.SeedSequence([seed, 7]).generate_state(3)  # fit, validation, test draws
    return Split(
        train=train,
        test=test,
        cold_items=cold,
        warm_items=warm,
        new_items=new,
        fit=rows(sample_negatives(fit_df, neg, int(rng[0])), train),
        val=rows(sample_negatives(val_df, neg, int(rng[1])), train),
        test_rows=rows(sample_negatives(test, neg, int(rng[2])), all_events),
        n_users=users.size + 1,
        item_ids=item_ids,
        item_id_index=id_index,
    )

