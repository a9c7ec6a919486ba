"""Feast declarations derived from the code schema and the serving context.

A feature repo's definitions file stays declarative: it names entities, sources and views
with a comment above each, and asks this module for what must not be written by hand:

- :func:`feast_fields`: Feast ``Field`` lists from :class:`~qarm_features.schema.CodeSchema`
  columns (the one schema), so the ``qarm``, ``qarm_batch``, ``qarm_cold*`` and
  ``user_history`` views cannot drift from what the transformations write;
- :func:`cold_view` / :func:`batch_view`: the on-demand and batch views, whose UDF source
  text carries the repo's :class:`~qarm_features.feast.context.ServingContext` (Feast
  re-executes that text wherever the view runs; see :mod:`qarm_features.feast.context`);
- :func:`version_tags`: the ``qarm_version`` tags every code-bearing view carries.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Sequence

from qarm_features.feast.context import ServingContext, read_previous
from qarm_features.feast.layout import CODES_FILE, CONTENT_FILE, PREV_CODES_FILE
from qarm_features.schema import (
    FLOAT_LIST,
    INT64,
    INT64_LIST,
    RAW_EMB,
    RAW_EMB_B64,
    STRING,
    TEXT,
    Column,
)

# the UDF bodies (transformations/), by request form
_COLD_TARGETS = {
    RAW_EMB: "transformations.on_demand:qarm_cold_python",
    RAW_EMB_B64: "transformations.on_demand:qarm_cold_b64_python",
    TEXT: "transformations.on_demand:qarm_cold_text_python",
}
_BATCH_TARGET = "transformations.batch:qarm_batch_udf"


def feast_fields(columns: Sequence[Column], *, describe: bool = True) -> list:
    """Feast fields of schema columns (``describe=False`` drops descriptions: Feast 0.67
    compares an on-demand view's declared fields, descriptions included, with the ones it
    infers from a dummy call)."""
    from feast import Field
    from feast.types import Array, Float32, Int64, String

    types = {FLOAT_LIST: Array(Float32), INT64: Int64, INT64_LIST: Array(Int64), STRING: String}
    return [
        Field(name=c.name, dtype=types[c.dtype], description=c.description if describe else "")
        for c in columns
    ]


def version_tags(context: ServingContext) -> dict[str, str]:
    """Tags of a code-bearing view: which bundle its rows come from."""
    return {
        "qarm_version": context.version,
        "qarm_n_levels": str(context.n_levels),
        "qarm_bundle": context.bundle or "",
    }


def udf_source(name: str, target: str, context: ServingContext) -> str:
    """Source text of a UDF ``name(arg)`` that calls ``target(arg, <context literal>)``.

    The context is a dict literal of strings, ints and None, so the text is valid Python
    wherever Feast re-executes it (a namespace holding only ``pd``/``np``).
    """
    module, func = target.split(":")
    return (
        f"def {name}(inputs):\n"
        f"    from {module} import {func}\n"
        f"    return {func}(inputs, {context.to_json()!r})\n"
    )


def _udf(name: str, target: str, context: ServingContext):
    source = udf_source(name, target, context)
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - our own template; Feast re-executes the same text
    fn = namespace[name]
    fn.__module__ = "__main__"  # as Feast's decorator does, so dill serialises by value
    return fn, source


def cold_view(context: ServingContext, *, name: str, request_source, description: str = ""):
    """The python-mode on-demand view computing a cold item's codes at request time.

    Args:
        context: the repo's serving context (baked into the UDF's source).
        name: the view's name (``qarm_cold``, ``qarm_cold_b64``).
        request_source: a ``RequestSource`` with one field: ``raw_emb`` (Array(Float32)),
            ``raw_emb_b64`` (String) or ``text`` (String: the bundle's frozen text encoder
            runs at request time).

    Not singleton (Feast 0.67 would return only a batch's first row in python mode); read
    it on its own request with ``full_feature_names=False`` (its names collide with
    ``qarm``'s, and Feast 0.67 drops python-mode outputs under full names).
    """
    from feast.on_demand_feature_view import OnDemandFeatureView

    fields = [f.name for f in request_source.schema]
    target = _COLD_TARGETS.get(fields[0]) if len(fields) == 1 else None
    if target is None:
        raise ValueError(
            f"{name}: the request source must have exactly one field, {sorted(_COLD_TARGETS)}; "
            f"got {fields}"
        )
    fn, source = _udf(name, target, context)
    return OnDemandFeatureView(
        name=name,
        sources=[request_source],
        schema=feast_fields(context.schema.cold_features, describe=False),
        udf=fn,
        udf_string=source,
        mode="python",
        description=description,
    )


def batch_view(
    context: ServingContext, *, name: str, entities: list, source, description: str = ""
):
    """The BatchFeatureView that runs the batch transformation inside Feast's compute engine.

    Online only: Feast's offline stores (file, DuckDB) would not apply the UDF in
    ``get_historical_features`` (rankers train on the ``qarm`` view's offline rows).
    """
    from feast import BatchFeatureView

    fn, udf_string = _udf(f"{name}_udf", _BATCH_TARGET, context)
    return BatchFeatureView(
        name=name,
        mode="pandas",
        entities=entities,
        ttl=timedelta(0),
        schema=feast_fields(context.schema.features),
        source=source,
        udf=fn,
        udf_string=udf_string,
        online=True,
        offline=False,
        tags=version_tags(context),
        description=description,
    )


# A definitions file that adds `qarm_batch` to a repo whose item entity and content source
# come from `definitions` (write it as e.g. qarm_batch_view.py; see batch_view's caveat).
BATCH_VIEW_FILE = """\
# qarm_batch: the QARM batch transformation run by Feast's compute engine at
# `feast materialize` (local here; Ray or Spark at scale). Feast 0.67's CLI `feast apply`
# crashes in its registry diff once this view is materialized: re-apply with the SDK
# (`qarm materialize`), or leave this file out.
from pathlib import Path

from {definitions} import item_content_source, {item}
from qarm_features.feast.context import ServingContext, read_previous
from qarm_features.feast.views import batch_view

qarm_batch = batch_view(
    ServingContext.of_repo(Path(__file__).resolve().parent),
    name="qarm_batch",
    entities=[{item}],
    source=item_content_source,
    description="QARM codes computed by the compute engine from item_content.",
)
"""


def qarm_views(*, item, repo, batch_view_too: bool = False, text_view: bool = False) -> dict:
    """Every Feast object QARM adds to a repo, keyed by the name to give it.

    Put them in a definitions file of the repo (``qarm init --into`` writes it)::

        from qarm_features.feast.views import qarm_views
        from my_features import product              # the repo's own item entity
        globals().update(qarm_views(item=product, repo=__file__))

    Args:
        item: the repo's item ``Entity``; its join key names the id column of every QARM
            source and its value type (INT64 or STRING) must match the bundle's ids.
        repo: the repo directory (or a file in it): its pointer names the bundle served.
        batch_view_too: also declare ``qarm_batch`` (the batch transformation run by
            Feast's compute engine at ``feast materialize``). Off by default: Feast 0.67's
            CLI ``feast apply`` crashes in its registry diff on a materialized
            BatchFeatureView with a UDF (docs/feast.md).
        text_view: also declare ``qarm_cold_text``: a cold item's codes from its *text*,
            the bundle's frozen text encoder running at request time (for teams without an
            embedding service; loads the encoder into the serving process).

    Returns:
        ``qarm_codes_source``, ``qarm_push``, ``item_content_source``,
        ``item_content_push``, ``qarm`` (the codes rankers read), ``item_content`` (the
        frozen embedding), ``qarm_cold_request``, ``qarm_cold``, ``qarm_cold_b64_request``,
        ``qarm_cold_b64`` (and ``qarm_batch``, ``qarm_cold_text_request``,
        ``qarm_cold_text``; and ``qarm_prev`` with its source while a switch keeps the
        previous version: ``qarm materialize --promote --keep-previous``).

    Raises:
        ConfigError: the entity's join key type is not INT64/STRING or not the bundle's.
    """
    from pathlib import Path

    from feast import FeatureView, Field, FileSource, PushSource, RequestSource, ValueType
    from feast.types import Array, Float32, String

    from qarm_features.errors import ConfigError

    repo = Path(repo).resolve()
    if repo.is_file():
        repo = repo.parent
    context = ServingContext.of_repo(repo)
    kinds = {ValueType.INT64: "int64", ValueType.STRING: "string"}
    kind = kinds.get(item.value_type)
    if kind is None:
        raise ConfigError(
            f"entity {item.name!r}: join key type {item.value_type.name} is not supported; "
            "QARM keys items by INT64 or STRING ids"
        )
    if context.is_set and context.id_type != kind:
        raise ConfigError(
            f"entity {item.name!r} has {kind} ids but the bundle {context.version} was built "
            f"on a catalog of {context.id_type} ids; rebuild it from this repo's catalog"
        )
    tags = version_tags(context)
    out: dict = {}
    out["qarm_codes_source"] = FileSource(
        name="qarm_codes_source",
        path=str(CODES_FILE),
        timestamp_field="event_timestamp",
        created_timestamp_column="created",
        description="QARM rows of the whole catalog, written by `qarm materialize`.",
    )
    out["qarm_push"] = PushSource(
        name="qarm_push",
        batch_source=out["qarm_codes_source"],
        description="Codes of items added after the last materialization (`qarm push`).",
    )
    out["item_content_source"] = FileSource(
        name="item_content_source",
        path=str(CONTENT_FILE),
        timestamp_field="event_timestamp",
        created_timestamp_column="created",
        description="The frozen content embedding of every item.",
    )
    out["item_content_push"] = PushSource(
        name="item_content_push",
        batch_source=out["item_content_source"],
        description="Content embeddings of items added after the last materialization.",
    )
    out["qarm"] = FeatureView(
        name="qarm",
        entities=[item],
        ttl=timedelta(0),
        schema=feast_fields(context.schema.features),
        source=out["qarm_push"],
        online=True,
        tags=tags,
        description="QARM aligned embedding, RQ codes per level and VQ codes of each item.",
    )
    previous = read_previous(repo)
    if previous is not None:  # a switch kept the previous version: serve it beside `qarm`
        out["qarm_prev_source"] = FileSource(
            name="qarm_prev_source",
            path=str(PREV_CODES_FILE),
            timestamp_field="event_timestamp",
            created_timestamp_column="created",
            description=f"Rows of the previous version {previous.version}, kept for a switch.",
        )
        out["qarm_prev"] = FeatureView(
            name="qarm_prev",
            entities=[item],
            ttl=timedelta(0),
            schema=feast_fields(previous.schema.features),
            source=out["qarm_prev_source"],
            online=True,
            tags=version_tags(previous),
            description="The previous version's QARM rows, served during a switch.",
        )
    out["item_content"] = FeatureView(
        name="item_content",
        entities=[item],
        ttl=timedelta(0),
        schema=[Field(name=RAW_EMB, dtype=Array(Float32), description="Frozen content embedding.")],
        source=out["item_content_push"],
        online=True,
        description="Frozen multi-modal content embedding (the baseline's dense input).",
    )
    if batch_view_too:
        out["qarm_batch"] = batch_view(
            context,
            name="qarm_batch",
            entities=[item],
            source=out["item_content_source"],
            description="QARM codes computed by the compute engine from item_content.",
        )
    out["qarm_cold_request"] = RequestSource(
        name="qarm_cold_request",
        schema=[Field(name=RAW_EMB, dtype=Array(Float32))],
        description="Raw content embedding of an item that has no materialized row yet.",
    )
    out["qarm_cold"] = cold_view(
        context,
        name="qarm_cold",
        request_source=out["qarm_cold_request"],
        description="Request-time QARM codes of cold items from their raw content embedding.",
    )
    out["qarm_cold_b64_request"] = RequestSource(
        name="qarm_cold_b64_request",
        schema=[Field(name=RAW_EMB_B64, dtype=String)],
        description="Raw content embedding as base64 of little-endian float32 bytes.",
    )
    out["qarm_cold_b64"] = cold_view(
        context,
        name="qarm_cold_b64",
        request_source=out["qarm_cold_b64_request"],
        description="Request-time QARM codes of cold items from base64 float32 bytes.",
    )
    if text_view:
        out["qarm_cold_text_request"] = RequestSource(
            name="qarm_cold_text_request",
            schema=[Field(name=TEXT, dtype=String)],
            description="The text of an item with no row yet (as the catalog renders it).",
        )
        out["qarm_cold_text"] = cold_view(
            context,
            name="qarm_cold_text",
            request_source=out["qarm_cold_text_request"],
            description="Request-time QARM codes of cold items from their text.",
        )
    return out
