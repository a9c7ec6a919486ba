"""Check and normalise a ``/get-online-features`` request before Feast sees it.

Feast 0.67's feature server takes entity and request values as JSON and types them itself:
an ``int64`` join key goes through ``int()`` (``50.7`` reads item 50, ``true`` item 1, a
``null`` fails the request naming no row), and a list-valued request field gets the type of
its first non-empty row (one ``0`` instead of ``0.0`` in an embedding, an integer row
before a float row, or one string row among good rows: HTTP 500 for every row). This module
decides, from the types the registry declares, what a request means:

- an entity join key declared ``INT64``/``INT32`` takes JSON integers, or strings of
  decimal digits (JavaScript sends 64-bit ids as strings), in range; a float (``50.7`` and
  ``50.0`` alike), a boolean, ``null`` or any other string is a :class:`RequestRejected`
  (HTTP 400) naming the key, the row and the value. A ``STRING`` key takes strings only.
- a request field declared ``String`` (``raw_emb_b64``) takes a string or ``null`` per row;
  any other value is replaced by ``null`` and that row alone is answered with the reason
  (as a bad ``raw_emb`` row is), instead of failing the request as a bad key would.
- a request field declared ``Array(Float32)``/``Array(Float64)`` (``raw_emb``) takes any
  mix of JSON integers and floats: integers become floats, so Feast's first-row inference
  sees floats. A row that is not a non-empty list of numbers is replaced by ``null`` (the
  on-demand view then answers that row alone with an error) and its reason is returned in
  :attr:`CheckedRequest.row_errors`, for the server to put in that row's ``qarm_error``.
- the number of entity rows is bounded (HTTP 413 beyond ``max_rows``).

Pure Python on parsed JSON; the server (:mod:`qarm_features.feast.server`) reads the
declared types from the registry (:func:`field_kinds`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from qarm_features.errors import QarmError

INT = "int"  # a scalar integer key (INT64 or INT32)
STRING = "string"  # a scalar string key
STRING_FIELD = "string_field"  # a string request field (not a key): bad rows fail alone
FLOAT_LIST = "float_list"  # a list of floats (a raw embedding)

_RANGES = {"INT64": (-(2**63), 2**63 - 1), "INT32": (-(2**31), 2**31 - 1)}
_DECIMAL = re.compile(r"-?[0-9]{1,20}\Z")
MAX_REPORTED = 5  # bad values listed in one 400 (the count says how many more)


class RequestRejected(QarmError):
    """A request the server refuses as a whole (HTTP ``status``: 400 or 413)."""

    def __init__(self, status: int, message: str, problems: list[dict] | None = None):
        super().__init__(message)
        self.status = status
        self.problems = problems or []

    def to_json(self) -> dict:
        out = {"error": type(self).__name__, "message": str(self)}
        if self.problems:
            out["problems"] = self.problems
        return out


@dataclass
class CheckedRequest:
    """What :func:`check_online_request` made of a body.

    Attributes:
        body: the body to hand to Feast (the same object, normalised in place).
        changed: whether ``body`` differs from what arrived (it must be re-serialised).
        n_rows: entity rows in the request.
        row_errors: row index -> why that row's request value was replaced by ``null``.
    """

    body: Any
    changed: bool = False
    n_rows: int = 0
    row_errors: dict[int, str] = field(default_factory=dict)


def kind_of(value_type_name: str) -> str | None:
    """Our kind of a Feast ``ValueType`` name (``"INT64"``, ``"FLOAT_LIST"`` ...), or None
    for a type this module leaves to Feast."""
    if value_type_name in _RANGES:
        return INT
    if value_type_name == "STRING":
        return STRING
    if value_type_name in ("FLOAT_LIST", "DOUBLE_LIST"):
        return FLOAT_LIST
    return None


def field_kinds(store) -> dict[str, tuple[str, str]]:
    """``name -> (kind, value type name)`` of every entity join key and request field the
    registry declares (cached registry reads)."""
    kinds: dict[str, tuple[str, str]] = {}
    for odfv in store.list_on_demand_feature_views(allow_cache=True):
        for source in odfv.source_request_sources.values():
            for f in source.schema:
                vt = f.dtype.to_value_type().name
                kind = kind_of(vt)
                if kind is not None:
                    kinds.setdefault(f.name, (STRING_FIELD if kind == STRING else kind, vt))
    for entity in store.list_entities(allow_cache=True):  # join keys win over request fields
        vt = entity.value_type.name
        if kind_of(vt) is not None:
            kinds[entity.join_key] = (kind_of(vt), vt)
    return kinds


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _a(value: Any) -> str:
    """``"a string"``, ``"an array"``: the JSON type of a value with its article."""
    t = _json_type(value)
    return f"an {t}" if t in ("array", "object") else f"a {t}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def int_id_error(value: Any, value_type: str = "INT64") -> str | None:
    """Why ``value`` is not an id of an integer join key, or None if it is one."""
    lo, hi = _RANGES[value_type]
    if type(value) is int:
        return None if lo <= value <= hi else f"is out of the {value_type} range"
    if isinstance(value, str) and _DECIMAL.match(value):
        return None if lo <= int(value) <= hi else f"is out of the {value_type} range"
    if value is None:
        return "is null; every row needs an id"
    if isinstance(value, bool):
        return "is a boolean, not an id"
    if isinstance(value, float):
        return "is a number with a fraction or exponent; send the integer id"
    return f"is {_a(value)} that is not an integer id"


def float_row(value: Any, name: str) -> tuple[Any, str | None]:
    """``(row to send, error)`` of one float-list request value.

    A list of numbers comes back as a list of floats (the same object when it holds floats
    only) and no error; ``null`` stays ``null`` (the view reports it missing); anything
    else becomes ``null`` with the reason.
    """
    if value is None:
        return None, None
    if not isinstance(value, list):
        return None, f"{name} must be a list of numbers, got {_a(value)}"
    if not value:
        return None, f"{name} is an empty list"
    types = set(map(type, value))
    if types == {float}:
        return value, None
    if types <= {float, int}:
        try:
            return [float(x) for x in value], None
        except OverflowError:
            return None, f"{name} holds an integer too large for a float"
    for i, x in enumerate(value):
        if type(x) not in (float, int):
            return None, f"{name}[{i}] is {_a(x)}, not a number"
    return None, f"{name} is not a list of numbers"  # pragma: no cover - int/float subclasses


def _add_row_error(out: CheckedRequest, row: int, why: str) -> None:
    prior = out.row_errors.get(row)
    out.row_errors[row] = why if prior is None else f"{prior}; {why}"


def check_online_request(
    body: Any, kinds: Mapping[str, tuple[str, str]], *, max_rows: int
) -> CheckedRequest:
    """Validate and normalise a parsed ``/get-online-features`` body (see the module doc).

    A body whose shape is not ``{"entities": {name: [values]}}`` is returned unchanged:
    Feast's own request model rejects it with a 422 that describes the shape.

    Raises:
        RequestRejected: 413 for more than ``max_rows`` entity rows; 400 for columns of
            different lengths or a bad entity id (up to :data:`MAX_REPORTED` listed).
    """
    out = CheckedRequest(body)
    entities = body.get("entities") if isinstance(body, dict) else None
    if not isinstance(entities, dict) or not all(isinstance(v, list) for v in entities.values()):
        return out
    lengths = {k: len(v) for k, v in entities.items()}
    out.n_rows = max(lengths.values(), default=0)
    if out.n_rows > max_rows:
        raise RequestRejected(
            413,
            f"{out.n_rows} entity rows in one request; this server takes at most {max_rows} "
            "(split the request, or start the server with a larger --max-entity-rows)",
        )
    if len(set(lengths.values())) > 1:
        raise RequestRejected(
            400, f"entity columns have different lengths: {lengths}; give every row every key"
        )
    problems: list[dict] = []
    n_bad = 0
    for name, values in entities.items():
        kind, vt = kinds.get(name, (None, None))
        if kind == INT:
            for row, v in enumerate(values):
                why = int_id_error(v, vt)
                if why is not None:
                    n_bad += 1
                    if len(problems) < MAX_REPORTED:
                        problems.append({"key": name, "row": row, "value": v, "error": why})
        elif kind == STRING:
            for row, v in enumerate(values):
                if not isinstance(v, str):
                    n_bad += 1
                    if len(problems) < MAX_REPORTED:
                        why = f"is {_a(v)}; {name} ids are strings"
                        problems.append({"key": name, "row": row, "value": v, "error": why})
        elif kind == STRING_FIELD:
            for row, v in enumerate(values):
                if v is not None and not isinstance(v, str):
                    values[row] = None
                    out.changed = True
                    _add_row_error(out, row, f"{name} is {_a(v)}, not a string")
        elif kind == FLOAT_LIST:
            for row, v in enumerate(values):
                new, why = float_row(v, name)
                if new is not v:
                    values[row] = new
                    out.changed = True
                if why is not None:
                    _add_row_error(out, row, why)
    if problems:
        listed = "; ".join(
            f"{p['key']} row {p['row']}: {_short(p['value'])} {p['error']}" for p in problems
        )
        more = f" (and {n_bad - len(problems)} more)" if n_bad > len(problems) else ""
        raise RequestRejected(400, f"invalid entity ids: {listed}{more}", problems)
    return out
