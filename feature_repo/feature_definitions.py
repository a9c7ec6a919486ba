# QARM feature definitions: entities, sources, views and a service for rankers.
#
# Declarations only: `feast apply` imports this file, so it reads one small JSON file (the
# bundle this repo serves, data/current/qarm_bundle.json, written by `qarm materialize`) and
# computes nothing. The QARM objects come from the package's factory (the same one a team
# calls in its own repo: `qarm init --into`); column names and types come from its one
# code schema. The parquet files under data/ are written by `qarm materialize`.

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, FileSource, ValueType

from qarm_features.feast.context import ServingContext
from qarm_features.feast.views import feast_fields, qarm_views, version_tags

REPO = Path(__file__).resolve().parent
CONTEXT = ServingContext.of_repo(REPO)  # the bundle this repo serves (its pointer)

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

# The QARM objects, keyed on `item`:
#   qarm            THE view rankers read: aligned_emb, rq_code_l1..lL, vq_codes,
#                   qarm_version (source: data/current/qarm_codes.parquet; pushes: qarm_push)
#   item_content    the frozen content embedding (the baseline's dense input)
#   qarm_cold       codes at request time from a cold item's raw_emb (list or float32 array)
#   qarm_cold_b64   the same from raw_emb_b64 (base64 float32 bytes: the HTTP form)
# plus their sources. Their UDFs carry this repo's bundle (docs/feast.md, "Which bundle").
globals().update(qarm_views(item=item, repo=REPO))

# The users' behaviour sequences, point in time (written by `qarm materialize`).
user_history_source = FileSource(
    name="user_history_source",
    path="data/current/user_history.parquet",
    timestamp_field="event_timestamp",
    description="Per user and interaction time: latest positive items and their RQ codes.",
)

# The user's latest positive items and their RQ codes (most recent first), for sequence
# and target-aware features. Rebuilt with every bundle (the codes change with it).
user_history = FeatureView(
    name="user_history",
    entities=[user],
    ttl=timedelta(0),
    schema=feast_fields(CONTEXT.schema.history_features),
    source=user_history_source,
    online=True,
    tags=version_tags(CONTEXT),
    description="User behaviour sequence as item ids and QARM codes, point in time.",
)

# What a ranker reads per (user, item): QARM codes, the frozen embedding (B+D deployment:
# QARM on top of a model that already has the frozen embedding) and the user's history.
qarm_ranker = FeatureService(
    name="qarm_ranker",
    features=[qarm, item_content, user_history],  # noqa: F821 - from qarm_views above
    tags=version_tags(CONTEXT),
    description="Features a ranker needs: item QARM codes, frozen embedding, user history.",
)
