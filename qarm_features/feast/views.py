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

from qarm_features.feast.context import ServingContext
from qarm_features.schema import FLOAT_LIST, INT64, INT64_LIST, RAW_EMB, RAW_EMB_B64, STRING, Column

# the UDF bodies (transformations/), by request form
_COLD_TARGETS = {
    RAW_EMB: "transformations.on_demand:qarm_cold_python",
    RAW_EMB_B64: "transformations.on_demand:qarm_cold_b64_python",
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
        request_source: a ``RequestSource`` with one field, ``raw_emb`` (Array(Float32))
            or ``raw_emb_b64`` (String).

    Not singleton (Feast 0.67 would return only a batch's first row in python mode); read
    it on its own request with ``full_feature_names=False`` (its names collide with
    ``qarm``'s, and Feast 0.67 drops python-mode outputs under full names).
    """
    from feast.on_demand_feature_view import OnDemandFeatureView

    fields = [f.name for f in request_source.schema]
    target = _COLD_TARGETS.get(fields[0]) if len(fields) == 1 else None
    if target is None:
        raise ValueError(
            f"{name}: the request source must have exactly one field, raw_emb or "
            f"{RAW_EMB_B64}; got {fields}"
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

    Online only: the file offline store would not apply the UDF in
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
