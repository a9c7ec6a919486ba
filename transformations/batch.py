"""The batch transformation as Feast's compute engine runs it: the ``qarm_batch`` UDF.

``qarm_batch`` (a BatchFeatureView over the raw content source, declared with
:func:`qarm_features.feast.views.batch_view`) runs a two-line UDF whose source text carries
the repo's serving context and calls :func:`qarm_batch_udf` here, during ``feast
materialize``, on whatever engine the repo configures (local, Ray, Spark). It ends in
:func:`qarm_features.feast.sources.encode_catalog`, the same function ``qarm
materialize`` writes the offline ``qarm`` rows with, so both paths store identical rows.
"""

from __future__ import annotations

import pandas as pd

from qarm_features.feast.context import ServingContext
from qarm_features.feast.sources import encode_catalog
from qarm_features.schema import CREATED, EVENT_TIMESTAMP, ITEM_ID


def qarm_batch_udf(df: pd.DataFrame, context: dict) -> pd.DataFrame:
    """Raw content rows -> ``qarm`` rows, with the bundle the context names.

    One row per item is kept: the latest content wins (a pushed update supersedes the
    catalog).

    Raises:
        QarmError: the context names no usable bundle, or the rows are bad (the batch path
            is strict: repair the catalog rather than store partial rows).
    """
    bundle = ServingContext.from_json(context).load()
    if len(df):
        order = [c for c in (EVENT_TIMESTAMP, CREATED) if c in df.columns]
        if order:
            df = df.sort_values(order, kind="stable")
        df = df.drop_duplicates(ITEM_ID, keep="last").reset_index(drop=True)
    return encode_catalog(bundle, df)
