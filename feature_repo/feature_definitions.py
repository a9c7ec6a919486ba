# QARM feature definitions: entities, sources, views and a service for rankers.
#
# Declarations only: `feast apply` imports this file, so it reads one small JSON file (the
# bundle this repo serves, data/qarm_bundle.json, written by `qarm materialize`) and
# computes nothing. Column names and types come from the package's one code schema; the
# work happens in the installed package:
#   qarm_features.feast     the library: views, serving context, `qarm materialize`
#   transformations/        the UDF bodies (batch and on-demand), thin
# The parquet files under data/ are written by `qarm materialize`; see docs/feast.md.

from datetime import timedelta
from pathlib import Path

from feast import (
    Entity,
    FeatureService,
    FeatureView,
    Field,
    FileSource,
    PushSource,
    RequestSource,
    ValueType,
)
from feast.types import Array, Float32, String

from qarm_features.feast.context import ServingContext
from qarm_features.feast.views import batch_view, cold_view, feast_fields, version_tags

# The bundle this repo serves (its pointer, else "unset" with the default number of RQ
# levels). Baked into the UDFs below: they serve this bundle from any working directory.
CONTEXT = ServingContext.of_repo(Path(__file__).resolve().parent)
SCHEMA = CONTEXT.schema

# Stamped on every code-bearing view, so a registry says which bundle its rows come from;
# `qarm materialize` compares it with the bundle it is given (BundleVersionMismatch).
QARM_TAGS = version_tags(CONTEXT)

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
    description="Output of the batch transformation for the whole catalog.",
)

# New items get their codes online without a batch rerun: `qarm_features.feast.job.
# push_items` encodes their content with the same batch function and pushes the rows here.
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

# The users' behaviour sequences, point in time (written by `qarm materialize`).
user_history_source = FileSource(
    name="user_history_source",
    path="data/user_history.parquet",
    timestamp_field="event_timestamp",
    description="Per user and interaction time: latest positive items and their RQ codes.",
)

# THE feature view rankers read: aligned embedding and trainable code ids per item.
# ttl 0: codes never expire (they are a function of the content, not of time).
qarm = FeatureView(
    name="qarm",
    entities=[item],
    ttl=timedelta(0),
    schema=feast_fields(SCHEMA.features),
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
    schema=feast_fields(SCHEMA.history_features),
    source=user_history_source,
    online=True,
    tags=QARM_TAGS,
    description="User behaviour sequence as item ids and QARM codes, point in time.",
)

# The same batch transformation, run by Feast's compute engine (local here; Ray or Spark
# at scale) over the raw content during `feast materialize`; equal to `qarm` online.
qarm_batch = batch_view(
    CONTEXT,
    name="qarm_batch",
    entities=[item],
    source=item_content_source,
    description="QARM codes computed by the compute engine from item_content at materialize.",
)

# What a cold item's request carries: its raw content embedding (same encoder as the
# catalog), as a list of numbers, or a float32 array in-process.
qarm_cold_request = RequestSource(
    name="qarm_cold_request",
    schema=[Field(name="raw_emb", dtype=Array(Float32))],
    description="Raw content embedding of an item that has no materialized row yet.",
)

# Codes at request time for items with no `qarm` row (new, not yet pushed): equal, bit for
# bit, to what the batch path stores for the same embedding. A bad row gets codes -1 and a
# message in qarm_error; the other rows are unaffected. Read it on its own request.
qarm_cold = cold_view(
    CONTEXT,
    name="qarm_cold",
    request_source=qarm_cold_request,
    description="Request-time QARM codes of cold items from their raw content embedding.",
)

# The compact form for HTTP clients: base64 of the embedding's little-endian float32 bytes
# (one string instead of hundreds of JSON numbers Feast would type one by one).
qarm_cold_b64_request = RequestSource(
    name="qarm_cold_b64_request",
    schema=[Field(name="raw_emb_b64", dtype=String)],
    description="Raw content embedding as base64 of little-endian float32 bytes.",
)

# The same outputs as `qarm_cold`, from the compact request field.
qarm_cold_b64 = cold_view(
    CONTEXT,
    name="qarm_cold_b64",
    request_source=qarm_cold_b64_request,
    description="Request-time QARM codes of cold items from base64 float32 bytes.",
)

# What a ranker reads per (user, item): QARM codes, the frozen embedding (B+D deployment:
# QARM on top of a model that already has the frozen embedding) and the user's history.
qarm_ranker = FeatureService(
    name="qarm_ranker",
    features=[qarm, item_content, user_history],
    tags=QARM_TAGS,
    description="Features a ranker needs: item QARM codes, frozen embedding, user history.",
)
