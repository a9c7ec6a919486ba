# QARM feature definitions: entities, sources, views and a service for rankers.
#
# Declarations only: `feast apply` imports this file, so it reads one small JSON file
# (the bundle's version and RQ levels, see transformations/bundle_ref.py) and computes
# nothing. The work happens in transformations/ (installed with qarm-features):
#   transformations.batch      catalog -> codes (the `qarm` rows and the `qarm_batch` UDF)
#   transformations.on_demand  request-time codes for cold items (`qarm_cold`)
#   transformations.job        `qarm materialize`: write the sources below, apply, materialize
# The parquet files under data/ are written by that job; see docs/feast.md. Re-apply with
# `qarm materialize` (SDK): Feast 0.67's CLI re-apply crashes on `qarm_batch` once it has
# been materialized.

from datetime import timedelta
from inspect import getsource
from pathlib import Path

from feast import (
    BatchFeatureView,
    Entity,
    FeatureService,
    FeatureView,
    Field,
    FileSource,
    PushSource,
    RequestSource,
    ValueType,
)
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Array, Float32, Int64, String

from transformations.bundle_ref import resolve_bundle_ref

# The bundle this repo serves: version id and number of RQ levels L (QARM_BUNDLE, else the
# data/qarm_bundle.json pointer written by `qarm materialize`, else QARM_RQ_LEVELS or 3).
BUNDLE = resolve_bundle_ref(Path(__file__).resolve().parent)
RQ_LEVELS = BUNDLE.n_levels

# Stamped on every code-bearing view, so a registry says which bundle its rows come from;
# `transformations.job` compares it with the bundle it is given (BundleVersionMismatch).
QARM_TAGS = {
    "qarm_version": BUNDLE.version,
    "qarm_n_levels": str(RQ_LEVELS),
    "qarm_bundle": BUNDLE.path or "",
}

# An item of the catalog (a movie, a product, an ad). The join key every item view uses.
item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.INT64,
    description="A catalog item; item_id is the catalog's int64 id.",
)

# A user; the join key of the user-side (behaviour sequence) view.
user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.INT64,
    description="A user; user_id is the int64 id of the interaction logs.",
)

# The QARM features of every catalog item, one row per item and bundle: what the batch
# transformation wrote. Rows are stamped near 1970 so that historical retrieval gives any
# training row, however old, the live bundle's codes (docs/feast.md, "backfill").
qarm_codes_source = FileSource(
    name="qarm_codes_source",
    path="data/qarm_codes.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="Output of transformations.batch.encode_catalog for the whole catalog.",
)

# New items get their codes online without a batch rerun: transformations.job.push_items
# encodes their content with the same batch function and pushes the rows here.
qarm_push = PushSource(
    name="qarm_push",
    batch_source=qarm_codes_source,
    description="Codes of items added after the last materialization.",
)

# The frozen content embedding of every item (the input of both transformations).
item_content_source = FileSource(
    name="item_content_source",
    path="data/item_content.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="item_id, raw_emb: the frozen multi-modal content embedding.",
)

# Raw content of new items, pushed next to their codes (the raw view stays complete).
item_content_push = PushSource(
    name="item_content_push",
    batch_source=item_content_source,
    description="Content embeddings of items added after the last materialization.",
)

# The users' behaviour sequences, point in time (written by transformations.batch).
user_history_source = FileSource(
    name="user_history_source",
    path="data/user_history.parquet",
    timestamp_field="event_timestamp",
    description="Per user and interaction time: latest positive items and their RQ codes.",
)

# Fields of a QARM code row; the `qarm`, `qarm_batch` and `qarm_cold` views share them.
# (Feast 0.67 compares an on-demand view's declared fields, descriptions included, with
# the fields it infers from a dummy call, so `qarm_cold` declares them undescribed.)
def qarm_fields(describe=True):
    def d(text):
        return text if describe else ""

    return (
        [Field(name="aligned_emb", dtype=Array(Float32), description=d("Aligned embedding."))]
        + [
            Field(name=f"rq_code_l{i}", dtype=Int64, description=d(f"RQ code of level {i}."))
            for i in range(1, RQ_LEVELS + 1)
        ]
        + [
            Field(name="vq_codes", dtype=Array(Int64), description=d("Top-K pool item ids.")),
            Field(name="qarm_version", dtype=String, description=d("Bundle version of the row.")),
        ]
    )


# THE feature view rankers read: aligned embedding and trainable code ids per item.
# ttl 0: codes never expire (they are a function of the content, not of time).
qarm = FeatureView(
    name="qarm",
    entities=[item],
    ttl=timedelta(0),
    schema=qarm_fields(),
    source=qarm_push,
    online=True,
    tags=QARM_TAGS,
    description="QARM aligned embedding, RQ codes per level and VQ codes of each item.",
)

# The frozen content embedding as a feature: the "cascading" baseline a ranker already has.
item_content = FeatureView(
    name="item_content",
    entities=[item],
    ttl=timedelta(0),
    schema=[Field(name="raw_emb", dtype=Array(Float32), description="Frozen content embedding.")],
    source=item_content_push,
    online=True,
    description="Frozen multi-modal content embedding (the baseline's dense input).",
)

# The user's latest positive items and their RQ codes (most recent first), for sequence
# and target-aware features. Rebuilt with every bundle (the codes change with it).
user_history = FeatureView(
    name="user_history",
    entities=[user],
    ttl=timedelta(0),
    schema=[Field(name="hist_item_ids", dtype=Array(Int64), description="Latest positives.")]
    + [
        Field(name=f"hist_rq_code_l{i}", dtype=Array(Int64), description=f"Their level-{i} codes.")
        for i in range(1, RQ_LEVELS + 1)
    ]
    + [
        Field(name="hist_len", dtype=Int64, description="Number of items in the history."),
        Field(name="hist_qarm_version", dtype=String, description="Bundle version of the codes."),
    ],
    source=user_history_source,
    online=True,
    tags=QARM_TAGS,
    description="User behaviour sequence as item ids and QARM codes, point in time.",
)


# The same batch transformation, run by Feast's compute engine (local here; Ray or Spark
# at scale) over the raw content during `feast materialize`. Feast re-executes this source
# text with only pd/np in scope: the body imports what it needs. Online only: the file
# offline store would not apply the UDF in get_historical_features (train on `qarm`).
def qarm_batch_udf(df):
    from transformations.batch import qarm_batch_udf as run

    return run(df)


# The `qarm` rows computed by Feast itself from `item_content`; equal to `qarm` online.
qarm_batch = BatchFeatureView(
    name="qarm_batch",
    mode="pandas",
    entities=[item],
    ttl=timedelta(0),
    schema=qarm_fields(),
    source=item_content_source,
    udf=qarm_batch_udf,
    udf_string=getsource(qarm_batch_udf),
    online=True,
    offline=False,
    tags=QARM_TAGS,
    description="QARM codes computed by the compute engine from item_content at materialize.",
)

# What a cold item's request carries: its raw content embedding (same encoder as the catalog).
qarm_cold_request = RequestSource(
    name="qarm_cold_request",
    schema=[Field(name="raw_emb", dtype=Array(Float32))],
    description="Raw content embedding of an item that has no materialized row yet.",
)


# Codes at request time for items with no `qarm` row (new, not yet pushed): equal, bit for
# bit, to what the batch path stores for the same embedding. A bad row gets codes -1 and a
# message in qarm_error; the other rows are unaffected. Python mode, not singleton (Feast
# 0.67 would return only the first row of a batch). Read it on its own request with
# full_feature_names=False: its names collide with `qarm`'s, and Feast 0.67 drops
# python-mode outputs under full names. Send `item_id` too for an item that may be in the
# VQ pool (it is then excluded from its own VQ codes, as in the batch path).
@on_demand_feature_view(
    sources=[qarm_cold_request],
    schema=qarm_fields(describe=False) + [Field(name="qarm_error", dtype=String)],
    mode="python",
    description="Request-time QARM codes of cold items from their raw content embedding.",
)
def qarm_cold(inputs: dict) -> dict:
    from transformations.on_demand import qarm_cold_python

    return qarm_cold_python(inputs)


# What a ranker reads per (user, item): QARM codes, the frozen embedding (B+D deployment:
# QARM on top of a model that already has the frozen embedding) and the user's history.
qarm_ranker = FeatureService(
    name="qarm_ranker",
    features=[qarm, item_content, user_history],
    tags=QARM_TAGS,
    description="Features a ranker needs: item QARM codes, frozen embedding, user history.",
)
