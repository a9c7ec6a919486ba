"""THE row schema of QARM features: every column name and dtype, in one place.

A bundle with ``L`` RQ levels produces, per item, the row::

    aligned_emb     float32 list (d_out)    unit-norm aligned embedding
    rq_code_l1..lL  int64                   RQ code of each level
    vq_codes        int64 list (K)          top-K pool items, most similar first
    qarm_version    string                  the bundle version that produced the row

The on-demand (cold) path adds ``qarm_error`` (``""`` on a good row), and the user-side
view holds the user's latest positive items with their codes (``hist_*``). Everything
else derives from :class:`CodeSchema`: the Feast fields (:mod:`qarm_features.feast.views`),
the pyarrow schemas of the offline sources (:mod:`qarm_features.feast.sources`), the
batch encoder's frame (:func:`qarm_features.bundle.encode.encode_frame`) and the request path's
output (:mod:`transformations.on_demand`). No other module spells a column name.

Dtypes are named by the small vocabulary below (``FLOAT_LIST`` ...), which the Feast and
pyarrow layers map to their own types; this module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

FLOAT_LIST = "float32_list"
INT64 = "int64"
INT64_LIST = "int64_list"
STRING = "string"
TIMESTAMP = "timestamp"
ID = "id"  # the entity's join key: int64 or string, whatever the catalog uses

ITEM_ID = "item_id"
USER_ID = "user_id"
RAW_EMB = "raw_emb"
RAW_EMB_B64 = "raw_emb_b64"  # compact request form: base64 of little-endian float32 bytes
TEXT = "text"  # content-in request form: the item's text, encoded at request time
EVENT_TIMESTAMP = "event_timestamp"
CREATED = "created"
ALIGNED_EMB = "aligned_emb"
VQ_CODES = "vq_codes"
VERSION = "qarm_version"
ERROR = "qarm_error"
HISTORY_PREFIX = "hist_"
HIST_ITEM_IDS = "hist_item_ids"
HIST_LEN = "hist_len"

MISSING_CODE = -1  # code of a row that could not be encoded (cold path) / unknown item


@dataclass(frozen=True)
class Column:
    """One column: its name, dtype (the vocabulary above) and a one-line description."""

    name: str
    dtype: str
    description: str = ""


def rq_column(level: int) -> str:
    """Name of the RQ code feature of ``level`` (1-based)."""
    if level < 1:
        raise ValueError(f"RQ levels are 1-based, got {level}")
    return f"rq_code_l{level}"


@dataclass(frozen=True)
class CodeSchema:
    """The columns of a bundle with ``n_levels`` RQ levels.

    Attributes:
        n_levels: number of RQ levels ``L``.
    """

    n_levels: int

    def __post_init__(self) -> None:
        if int(self.n_levels) < 1:
            raise ValueError(f"n_levels must be >= 1, got {self.n_levels}")

    @cached_property
    def rq_columns(self) -> tuple[str, ...]:
        """``rq_code_l1`` … ``rq_code_l{L}``."""
        return tuple(rq_column(i) for i in range(1, self.n_levels + 1))

    @cached_property
    def features(self) -> tuple[Column, ...]:
        """The ``qarm`` view's features, in order."""
        return (
            (Column(ALIGNED_EMB, FLOAT_LIST, "Aligned embedding."),)
            + tuple(
                Column(name, INT64, f"RQ code of level {i}.")
                for i, name in enumerate(self.rq_columns, start=1)
            )
            + (
                Column(VQ_CODES, INT64_LIST, "Top-K pool item ids."),
                Column(VERSION, STRING, "Bundle version of the row."),
            )
        )

    @cached_property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.features)

    @cached_property
    def cold_features(self) -> tuple[Column, ...]:
        """The on-demand views' outputs: the features plus the per-row error."""
        return self.features + (Column(ERROR, STRING, "Why a row could not be encoded."),)

    @cached_property
    def history_features(self) -> tuple[Column, ...]:
        """The user-side view's features: latest positives and their RQ codes."""
        return (
            (Column(HIST_ITEM_IDS, INT64_LIST, "Latest positives."),)
            + tuple(
                Column(HISTORY_PREFIX + name, INT64_LIST, f"Their level-{i} codes.")
                for i, name in enumerate(self.rq_columns, start=1)
            )
            + (
                Column(HIST_LEN, INT64, "Number of items in the history."),
                Column(HISTORY_PREFIX + VERSION, STRING, "Bundle version of the codes."),
            )
        )

    @cached_property
    def history_rq_columns(self) -> tuple[str, ...]:
        return tuple(HISTORY_PREFIX + name for name in self.rq_columns)

    # ------------------------------------------------------------------ offline tables
    def table(self, which: str, *, id_column: str = ITEM_ID) -> tuple[Column, ...]:
        """Columns of an offline source: ``"codes"``, ``"content"`` or ``"history"``.

        ``id_column``: the item entity's join key (``item_id`` unless the repo's entity
        says otherwise).
        """
        stamps = (Column(EVENT_TIMESTAMP, TIMESTAMP), Column(CREATED, TIMESTAMP))
        if which == "codes":
            return (Column(id_column, ID),) + stamps + self.features
        if which == "content":
            return (Column(id_column, ID),) + stamps + (Column(RAW_EMB, FLOAT_LIST),)
        if which == "history":
            return (Column(USER_ID, ID), Column(EVENT_TIMESTAMP, TIMESTAMP)) + (
                self.history_features
            )
        raise ValueError(f"unknown table {which!r}; expected codes, content or history")

    def arrow(self, which: str, *, id_type: str = INT64, id_column: str = ITEM_ID):
        """The pyarrow schema of an offline source (see :meth:`table`).

        Args:
            which: ``"codes"``, ``"content"`` or ``"history"``.
            id_type: dtype of the join key column, :data:`INT64` or :data:`STRING`.
            id_column: name of the item join key column.
        """
        import pyarrow as pa

        types = {
            FLOAT_LIST: pa.list_(pa.float32()),
            INT64: pa.int64(),
            INT64_LIST: pa.list_(pa.int64()),
            STRING: pa.string(),
            TIMESTAMP: pa.timestamp("us", tz="UTC"),
        }
        types[ID] = types[id_type]
        return pa.schema([(c.name, types[c.dtype]) for c in self.table(which, id_column=id_column)])
