"""``/get-online-features`` answered by ``qarm serve`` itself: cold rows without Feast's
on-demand machinery, every response without Feast's response conversion.

Feast 0.67's server spends most of a read outside the read: a cold row's request values
are typed one by one into protobuf and back before the UDF sees them, the UDF's outputs
are typed again, and the whole response goes through ``convert_response_to_dict`` (a
per-value protobuf walk that formats every row's timestamp: ~0.6 ms of a 32-item read).
:class:`FastReader` answers the same request with the same result, JSON for JSON:

- **warm features** (regular feature views) are still read by Feast
  (``store.get_online_features``: its online store, registry, entity handling); only the
  response is built here (:func:`response_dict`, equal to Feast's
  ``convert_response_to_dict``: the same dict, built per column, timestamps formatted
  once per distinct value);
- **cold features** (the repo's ``qarm_cold*`` on-demand views, recognised by the UDF
  their registry entry carries) are computed by calling *that UDF* (the registry's, with
  its baked-in serving context: the same ``encode_request``, bundle and version checks)
  on the request's columns, and appended as Feast appends on-demand outputs: after the
  warm columns, view by view in request order, each view's outputs in the UDF's order,
  status ``PRESENT``, timestamp 0. Join keys reach the UDF typed as Feast types them.

Anything else is left to Feast (:meth:`FastReader.read` returns None and the server hands
the request to Feast's app): a feature service, auth other than ``no_auth``, metrics or
audit logging configured, version metadata, another on-demand view, an unknown view or
feature, a missing request field, two features with one short name, a body whose shape
Feast's model would coerce, and any error in the warm read (Feast then answers it with its
own status and message). One difference, on purpose: with ``full_feature_names`` Feast 0.67
drops python-mode on-demand outputs (an empty answer); here they come back under their
full names (``qarm_cold__rq_code_l1``), as documented for the option.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

from qarm_features.feast.request_check import INT
from qarm_features.schema import ERROR

log = logging.getLogger(__name__)

CATALOG_TTL_S = 5.0  # the registry's cold views and join keys are re-read this often
PRESENT = "PRESENT"
EPOCH = "1970-01-01T00:00:00Z"  # Feast's timestamp of an on-demand value
_BODY_KEYS = frozenset(
    {
        "entities",
        "features",
        "full_feature_names",
        "feature_service",
        "include_feature_view_version_metadata",
    }
)
_SCALARS = frozenset({"int64_val", "int32_val", "string_val", "bool_val", "unix_timestamp_val"})
_LISTS = frozenset(
    {
        "int64_list_val",
        "int32_list_val",
        "string_list_val",
        "bool_list_val",
        "unix_timestamp_list_val",
    }
)
_FLOAT_LISTS = frozenset({"float_list_val", "double_list_val"})


# ---------------------------------------------------------------------- response JSON
def _values(values) -> list:
    """Python values of a column of ``Value`` protos, as Feast's ``_value_to_native``."""
    from feast.feature_server_utils import _float_to_native, _value_to_native

    out: list = []
    append = out.append
    for v in values:
        kind = v.WhichOneof("val")
        if kind is None or kind == "null_val":
            append(None)
        elif kind in _SCALARS:
            append(getattr(v, kind))
        elif kind in _LISTS:
            append(list(getattr(v, kind).val))
        elif kind in _FLOAT_LISTS:
            vals = list(getattr(v, kind).val)
            append(vals if all(map(math.isfinite, vals)) else [_float_to_native(f) for f in vals])
        else:  # bytes, maps, doubles, timestamps ...: Feast's own conversion
            append(_value_to_native(v))
    return out


def response_dict(proto) -> dict:
    """The JSON dict of a ``GetOnlineFeaturesResponse``: equal to Feast 0.67's
    ``feast.feature_server_utils.convert_response_to_dict(proto)``, ~3x faster."""
    from feast.feature_server_utils import _STATUS_NAMES, _metadata_to_dict, _timestamp_to_str

    stamps: dict = {}
    results = []
    for vector in proto.results:
        entry = {
            "values": _values(vector.values),
            "statuses": [_STATUS_NAMES.get(s, "INVALID") for s in vector.statuses],
        }
        if vector.event_timestamps:
            column = []
            for ts in vector.event_timestamps:
                key = (ts.seconds, ts.nanos)
                text = stamps.get(key)
                if text is None:
                    text = stamps[key] = _timestamp_to_str(ts)
                column.append(text)
            entry["event_timestamps"] = column
        results.append(entry)
    out: dict = {"results": results}
    if proto.HasField("metadata"):
        out["metadata"] = _metadata_to_dict(proto.metadata)
    if proto.status:
        out["status"] = proto.status
    return out


def dumps(payload) -> bytes:
    """JSON bytes exactly as Starlette's ``JSONResponse`` renders them (Feast's answer)."""
    return json.dumps(
        payload, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


def error_columns(names: list[str]) -> list[int]:
    """Indexes of the ``qarm_error`` columns among a response's feature names (short or
    full names: ``qarm_error``, ``qarm_cold__qarm_error``)."""
    return [j for j, name in enumerate(names) if name == ERROR or name.endswith(f"__{ERROR}")]


def write_row_errors(resp: dict, errors: dict[int, str]) -> None:
    """Put the guard's per-row reasons into every ``qarm_error`` column of ``resp``."""
    names = resp["metadata"]["feature_names"]
    for j in error_columns(names):
        values = resp["results"][j]["values"]
        for row, why in errors.items():
            if row < len(values):
                values[row] = why


# ---------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class ColdView:
    """One of the repo's cold on-demand views, as its registry entry declares it."""

    name: str
    udf: object  # the registry's UDF: ``udf(inputs: dict) -> dict of columns``
    fields: frozenset  # the output features
    requests: tuple  # the request fields it needs


def _is_ours(odfv) -> bool:
    from qarm_features.feast.views import _COLD_TARGETS

    transformation = getattr(odfv, "feature_transformation", None)
    text = getattr(transformation, "udf_string", None) or ""
    if odfv.mode != "python" or getattr(odfv, "singleton", False):
        return False
    if getattr(odfv, "aggregations", None) or odfv.source_feature_view_projections:
        return False
    for target in _COLD_TARGETS.values():
        module, func = target.split(":")
        if f"from {module} import {func}\n" in text:
            return True
    return False


def catalog(store) -> tuple[dict[str, ColdView], set[str], set[str]]:
    """``(cold views by name, other on-demand view names, entity join keys)``."""
    cold: dict[str, ColdView] = {}
    other: set[str] = set()
    for odfv in store.list_on_demand_feature_views(allow_cache=True):
        if not _is_ours(odfv):
            other.add(odfv.name)
            continue
        requests = tuple(f.name for s in odfv.source_request_sources.values() for f in s.schema)
        cold[odfv.name] = ColdView(
            name=odfv.name,
            udf=odfv.feature_transformation.udf,
            fields=frozenset(f.name for f in odfv.schema),
            requests=requests,
        )
    keys = {e.join_key for e in store.list_entities(allow_cache=True)}
    return cold, other, keys


def fast_reads_allowed(store) -> str | None:
    """None when this store's reads may take the fast path, else why not."""
    auth = getattr(store.config.auth_config, "type", "no_auth")
    if auth != "no_auth":
        return f"auth {auth!r}: Feast's app checks permissions"
    server = getattr(store.config, "feature_server", None)
    metrics = getattr(server, "metrics", None)
    if metrics is not None and getattr(metrics, "enabled", False):
        return "feature_server.metrics: Feast's app records them"
    audit = getattr(server, "audit_logging", None)
    if audit is not None and getattr(audit, "enabled", False):
        return "feature_server.audit_logging: Feast's app writes it"
    return None


# ---------------------------------------------------------------------- the reader
class FastReader:
    """Answers ``/get-online-features`` bodies the way Feast's app does (module doc).

    Args:
        store: the server's ``FeatureStore`` (Feast's app holds the same object and keeps
            its registry fresh).
    """

    def __init__(self, store):
        self.store = store
        self._catalog: tuple[float, tuple] = (float("-inf"), ({}, set(), set()))

    def _views(self):
        at, found = self._catalog
        if time.monotonic() - at > CATALOG_TTL_S:
            found = catalog(self.store)
            self._catalog = (time.monotonic(), found)
        return found

    def cold_columns(self, view: str, entities: dict) -> dict[str, list]:
        """What the cold view ``view`` answers for these request columns, in process: the
        view's registry UDF called on them (the same encode, bundle and version checks as
        ``store.get_online_features``), without Feast's typing of each request and output
        value. The fast in-process call for cold items.

        Args:
            view: ``"qarm_cold"``, ``"qarm_cold_b64"`` or ``"qarm_cold_text"``.
            entities: columns, e.g. ``{"raw_emb": [float32 array, ...]}``, optionally
                ``"item_id"`` (VQ self-exclusion, as in a Feast read).

        Returns:
            ``{"aligned_emb", "rq_code_l1".., "vq_codes", "qarm_version", "qarm_error"}``,
            one python value per row (a bad row: codes ``-1`` and its ``qarm_error``).

        Raises:
            ConfigError: ``view`` is not one of the repo's cold views.
        """
        from qarm_features.errors import ConfigError

        cold, _, _ = self._views()
        if view not in cold:
            raise ConfigError(f"{view!r} is not a cold view of this repo; it has {sorted(cold)}")
        return cold[view].udf(dict(entities))

    def read(self, body, kinds: dict, row_errors: dict[int, str] | None = None) -> bytes | None:
        """The response body Feast's app would send with status 200, or None when the
        request is Feast's to answer (see the module doc). Blocking: call it in a thread.

        Args:
            body: the parsed (and checked) request.
            kinds: the guard's declared field kinds (:func:`request_check.field_kinds`).
            row_errors: the guard's per-row reasons, written into ``qarm_error`` columns.
        """
        plan = self._plan(body)
        if plan is None:
            return None
        warm, cold, full = plan
        entities = body["entities"]
        if warm:
            try:
                resp = self.store.get_online_features(
                    features=warm, entity_rows=entities, full_feature_names=full
                )
            except Exception as exc:  # noqa: BLE001 - Feast answers it, with its status
                log.debug("warm read left to Feast: %r", exc)
                return None
            out = response_dict(resp.proto)
        else:
            out = self._key_columns(entities, kinds)
        if cold:
            inputs = _typed(entities, kinds)
            names = out["metadata"]["feature_names"]
            for view, features in cold:
                columns = view.udf(dict(inputs))
                for name in columns:
                    if name in features:
                        n = len(columns[name])
                        names.append(f"{view.name}__{name}" if full else name)
                        out["results"].append(
                            {
                                "values": columns[name],
                                "statuses": [PRESENT] * n,
                                "event_timestamps": [EPOCH] * n,
                            }
                        )
        if row_errors:
            write_row_errors(out, row_errors)
        return dumps(out)

    def _plan(self, body):
        """``(warm refs, [(cold view, its requested features)], full names)`` or None."""
        if not isinstance(body, dict) or not set(body) <= _BODY_KEYS:
            return None
        features, entities = body.get("features"), body.get("entities")
        full = body.get("full_feature_names", False)
        if (
            body.get("feature_service") is not None
            or body.get("include_feature_view_version_metadata", False) is not False
            or type(full) is not bool
        ):
            return None
        if not isinstance(features, list) or not features or not isinstance(entities, dict):
            return None
        if not entities or not all(isinstance(v, list) for v in entities.values()):
            return None
        cold_views, other, _ = self._views()
        warm: list[str] = []
        cold: dict[str, set] = {}
        names = set()
        for ref in features:
            if not isinstance(ref, str) or ref.count(":") != 1:
                return None
            view, name = ref.split(":")
            if view in other or "@" in view:
                return None
            short = f"{view}__{name}" if full else name
            if short in names:
                return None  # Feast's FeatureNameCollisionError
            names.add(short)
            if view in cold_views:
                if name not in cold_views[view].fields:
                    return None
                cold.setdefault(view, set()).add(name)
            else:
                warm.append(ref)
        for view in cold:
            if any(field not in entities for field in cold_views[view].requests):
                return None  # Feast's RequestDataNotFoundInEntityRowsException
        return warm, [(cold_views[v], f) for v, f in cold.items()], full

    def _key_columns(self, entities: dict, kinds: dict) -> dict:
        """A cold-only response's first columns: the request's entity join keys, as Feast
        types them."""
        _, _, keys = self._views()
        typed = _typed(entities, kinds)
        names, results = [], []
        for name, values in typed.items():
            if name in keys:
                names.append(name)
                results.append(
                    {
                        "values": values,
                        "statuses": [PRESENT] * len(values),
                        "event_timestamps": [EPOCH] * len(values),
                    }
                )
        return {"results": results, "metadata": {"feature_names": names}}


def _typed(entities: dict, kinds: dict) -> dict:
    """Request columns as Feast hands them to a UDF: integer keys as ints (a checked
    decimal string ``"51"`` is item 51), everything else as sent."""
    out = {}
    for name, values in entities.items():
        kind = kinds.get(name, (None, None))[0]
        if kind == INT:
            out[name] = [int(v) for v in values]
        else:
            out[name] = values
    return out
