"""The serving guard without a server: request checks on parsed JSON, and the ASGI
middleware driven in process around a fake inner app (no Feast, no sockets)."""

from __future__ import annotations

import asyncio
import json

import pytest

from qarm_features.feast.request_check import (
    FLOAT_LIST,
    INT,
    STRING,
    STRING_FIELD,
    RequestRejected,
    check_online_request,
    float_row,
    int_id_error,
)
from qarm_features.feast.server import ServeLimits, ServingGuard

KINDS = {
    "item_id": (INT, "INT64"),
    "sku": (STRING, "STRING"),
    "raw_emb": (FLOAT_LIST, "FLOAT_LIST"),
    "raw_emb_b64": (STRING_FIELD, "STRING"),
}


# --------------------------------------------------------------------------- request checks


@pytest.mark.parametrize("value", [0, 7, -3, 2**63 - 1, "42", "-42", "9223372036854775807"])
def test_integer_ids_pass(value):
    assert int_id_error(value) is None


@pytest.mark.parametrize(
    "value, why",
    [(50.7, "fraction"), (50.0, "fraction"), (True, "boolean"), (False, "boolean"),
     (None, "null"), ("abc", "string"), ("5.0", "string"), (" 5", "string"), ("5_0", "string"),
     ([1], "array"), ({"a": 1}, "object"), (2**63, "range"), ("9223372036854775808", "range")],
)
def test_other_ids_are_errors(value, why):
    assert why in int_id_error(value)


def test_int32_range():
    assert int_id_error(2**31 - 1, "INT32") is None
    assert "INT32 range" in int_id_error(2**31, "INT32")


def test_float_rows():
    floats = [0.5, 1.5]
    assert float_row(floats, "raw_emb") == (floats, None)
    assert float_row(floats, "raw_emb")[0] is floats  # untouched: no re-serialisation
    row, why = float_row([0, 1.5, -2], "raw_emb")
    assert why is None and row == [0.0, 1.5, -2.0] and all(type(x) is float for x in row)
    assert float_row(None, "raw_emb") == (None, None)
    assert float_row([], "raw_emb") == (None, "raw_emb is an empty list")
    assert float_row("abc", "raw_emb") == (None, "raw_emb must be a list of numbers, got a string")
    assert float_row([1.0, True], "raw_emb") == (None, "raw_emb[1] is a boolean, not a number")
    assert float_row([1.0, [2.0]], "raw_emb") == (None, "raw_emb[1] is an array, not a number")
    assert float_row([10**400], "raw_emb")[1] == "raw_emb holds an integer too large for a float"


def test_check_names_key_row_and_value():
    body = {"features": ["qarm:x"], "entities": {"item_id": [1, 50.7, None, 3]}}
    with pytest.raises(RequestRejected) as info:
        check_online_request(body, KINDS, max_rows=10)
    exc = info.value
    assert exc.status == 400
    assert "item_id row 1: 50.7" in str(exc) and "item_id row 2: None is null" in str(exc)
    assert [p["row"] for p in exc.problems] == [1, 2]


def test_check_lists_at_most_five_bad_ids():
    body = {"entities": {"item_id": [0.5] * 9}}
    with pytest.raises(RequestRejected) as info:
        check_online_request(body, KINDS, max_rows=10)
    assert len(info.value.problems) == 5 and "(and 4 more)" in str(info.value)


def test_check_string_keys_take_strings_only():
    assert check_online_request({"entities": {"sku": ["a", "b"]}}, KINDS, max_rows=5).n_rows == 2
    with pytest.raises(RequestRejected, match="sku row 1: 5 is a number"):
        check_online_request({"entities": {"sku": ["a", 5]}}, KINDS, max_rows=5)


def test_check_rows_and_lengths():
    with pytest.raises(RequestRejected, match="11 entity rows") as info:
        check_online_request({"entities": {"item_id": list(range(11))}}, KINDS, max_rows=10)
    assert info.value.status == 413
    with pytest.raises(RequestRejected, match="different lengths"):
        check_online_request({"entities": {"item_id": [1, 2], "sku": ["a"]}}, KINDS, max_rows=10)


def test_check_normalises_float_lists_and_collects_row_errors():
    good = [0.5, 0.25]
    body = {"entities": {"raw_emb": [[1, 2], good, "x", None], "other": [1, 2, 3, 4]}}
    out = check_online_request(body, KINDS, max_rows=10)
    assert out.changed and out.n_rows == 4
    assert body["entities"]["raw_emb"] == [[1.0, 2.0], good, None, None]
    assert out.row_errors == {2: "raw_emb must be a list of numbers, got a string"}
    unchanged = check_online_request({"entities": {"raw_emb": [good]}}, KINDS, max_rows=10)
    assert not unchanged.changed and not unchanged.row_errors


def test_a_string_request_field_fails_bad_rows_alone():
    """A non-string ``raw_emb_b64`` row is that row's error, not a 400 calling it an id."""
    good = "AACAPw=="
    body = {"entities": {"raw_emb_b64": [good, 7, None, ["x"]]}}
    out = check_online_request(body, KINDS, max_rows=10)
    assert out.changed and body["entities"]["raw_emb_b64"] == [good, None, None, None]
    assert out.row_errors == {
        1: "raw_emb_b64 is a number, not a string",
        3: "raw_emb_b64 is an array, not a string",
    }


def test_check_leaves_unknown_shapes_to_feast():
    for body in ([1], {"entities": [1]}, {"entities": {"item_id": 5}}, {"features": []}):
        assert not check_online_request(body, KINDS, max_rows=1).changed


# --------------------------------------------------------------------------- the ASGI guard


class FakeStore:
    class registry:  # noqa: N801 - mimics store.registry
        @staticmethod
        def list_projects(allow_cache=True):
            return []


class FakeApp:
    """Echoes the entities it received as a Feast-style response; `fail` raises after a 500
    has been sent, as Starlette's ServerErrorMiddleware does."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.bodies.append(body)
        if self.fail:
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b'"boom"'})
            raise RuntimeError("boom")
        n = len(next(iter(json.loads(body)["entities"].values())))
        resp = {"metadata": {"feature_names": ["rq_code_l1", "qarm_error"]},
                "results": [{"values": [1] * n}, {"values": [""] * n}]}
        data = json.dumps(resp).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


def call(guard, body: bytes, *, path="/get-online-features", method="POST", chunk=None,
         declared=True, read=None):
    """(status, headers dict, body) of one request through the guard; ``read`` (a list)
    gets the number of body parts the guard read before it answered."""
    headers = [(b"content-type", b"application/json")]
    if declared:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "path": path, "method": method, "headers": headers}
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    sent: list[dict] = []

    async def receive():
        if parts:
            part = parts.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(parts)}
        return {"type": "http.disconnect"}

    async def send(msg):
        if read is not None and not sent:
            read.append(n_parts - len(parts))
        sent.append(msg)

    n_parts = len(parts)
    asyncio.run(guard(scope, receive, send))
    start = sent[0]
    return (start["status"], {k.decode(): v.decode() for k, v in start["headers"]},
            b"".join(m.get("body", b"") for m in sent[1:]))


def make_guard(app=None, allow_writes=False, **limits):
    guard = ServingGuard(app or FakeApp(), store=FakeStore(), repo_path=".",
                         limits=ServeLimits(**limits), allow_writes=allow_writes,
                         fast_reads=False)
    guard._kinds = (float("inf"), KINDS)  # no registry: the declared types, fixed
    return guard


def test_guard_passes_good_bodies_through_unchanged():
    app = FakeApp()
    body = json.dumps({"features": ["qarm:x"], "entities": {"item_id": [1, "2"]}}).encode()
    status, headers, _ = call(make_guard(app), body)
    assert status == 200 and "connection" not in headers and app.bodies == [body]


def test_guard_refuses_large_bodies_before_reading_them():
    app = FakeApp()
    big = json.dumps({"entities": {"item_id": [1]}, "pad": "x" * 5000}).encode()
    status, headers, out = call(make_guard(app, max_body_bytes=4096), big)
    assert status == 413 and headers["connection"] == "close" and not app.bodies
    assert b"limit of 4096 bytes" in out
    status, _, _ = call(make_guard(app, max_body_bytes=4096), big, chunk=1000, declared=False)
    assert status == 413 and not app.bodies


def test_guard_rejects_bad_ids_with_connection_close():
    app = FakeApp()
    body = json.dumps({"entities": {"item_id": [1, True]}}).encode()
    status, headers, out = call(make_guard(app), body)
    assert status == 400 and headers["connection"] == "close" and not app.bodies
    assert json.loads(out)["problems"][0]["row"] == 1


def test_guard_writes_row_errors_into_qarm_error():
    app = FakeApp()
    body = json.dumps({"entities": {"raw_emb": [[0, 1], {"a": 1}, [0.5, 0.5]]}}).encode()
    status, headers, out = call(make_guard(app), body)
    assert status == 200
    sent = json.loads(app.bodies[0])["entities"]["raw_emb"]
    assert sent == [[0.0, 1.0], None, [0.5, 0.5]]
    values = json.loads(out)["results"][1]["values"]
    assert values == ["", "raw_emb must be a list of numbers, got an object", ""]
    assert int(headers["content-length"]) == len(out)


def test_guard_keeps_the_500_and_swallows_the_reraise():
    body = json.dumps({"entities": {"item_id": [1]}}).encode()
    status, headers, out = call(make_guard(FakeApp(fail=True)), body)
    assert status == 500 and headers["connection"] == "close" and out == b'"boom"'


def test_guard_health(tmp_path):
    guard = ServingGuard(FakeApp(), store=FakeStore(), repo_path=tmp_path, fast_reads=False)
    status, headers, out = call(guard, b"", path="/health", method="GET")
    report = json.loads(out)
    assert status == 503 and report["status"] == "unavailable"
    assert "no QARM bundle configured" in report["reason"] and headers["connection"] == "close"


def test_guard_health_ok(tmp_path, random_bundle):
    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.feast.context import ServingContext, write_pointer

    write_pointer(tmp_path, ServingContext.of_bundle(random_bundle))
    guard = ServingGuard(FakeApp(), store=FakeStore(), repo_path=tmp_path, fast_reads=False)
    status, _, out = call(guard, b"", path="/health", method="GET")
    assert status == 200
    assert json.loads(out) == {"status": "ok", "qarm_version": load_bundle(random_bundle).version,
                               "bundle": str(random_bundle)}


def test_limits_are_checked():
    from qarm_features.errors import ConfigError

    with pytest.raises(ConfigError):
        ServeLimits(max_entity_rows=0)


def test_guard_answers_500_when_the_app_fails_before_responding():
    async def broken(scope, receive, send):
        await receive()
        raise RuntimeError("no response")

    for entities in ({"item_id": [1]}, {"raw_emb": [[1, 2], "x"]}):  # plain, and row errors
        body = json.dumps({"entities": entities}).encode()
        status, headers, out = call(make_guard(broken), body)
        assert status == 500 and headers["connection"] == "close"
        assert json.loads(out) == {"error": "RuntimeError", "message": "no response"}


# --------------------------------------------------------------------------- issue 19 and 21


WRITES = ["/push", "/write-to-online-store", "/materialize", "/materialize-incremental"]


@pytest.mark.parametrize("path", WRITES)
def test_write_endpoints_are_refused_unless_allowed(path):
    app = FakeApp()
    body = json.dumps({"entities": {"item_id": [1]}}).encode()
    read: list = []
    status, headers, out = call(make_guard(app), body, path=path, chunk=10, read=read)
    assert status == 403 and headers["connection"] == "close" and not app.bodies
    message = json.loads(out)["message"]
    assert f"POST {path}" in message and "--allow-writes" in message
    assert read == [-(-len(body) // 10)]  # the whole body was read first
    status, _, _ = call(make_guard(app, allow_writes=True), body, path=path)
    assert status == 200 and app.bodies == [body]  # passed through to the app


def test_serve_options_default_to_read_only(monkeypatch):
    """`qarm serve` (typer, like every qarm command) is read-only unless --allow-writes;
    limits not given keep the server's defaults."""
    from typer.testing import CliRunner

    import qarm_features.feast.server as server
    from qarm_features.app.cli import app

    calls = []
    monkeypatch.setattr(server, "serve", lambda repo, **kw: calls.append((repo, kw)))
    assert CliRunner().invoke(app, ["serve", "--repo", "r"]).exit_code == 0
    repo, default = calls[-1]
    assert default["allow_writes"] is False and str(repo) == "r"
    assert default["limits"] == server.ServeLimits()
    args = ["serve", "--allow-writes", "--header-timeout", "2", "--body-timeout", "3"]
    assert CliRunner().invoke(app, args).exit_code == 0
    opts = calls[-1][1]
    assert opts["allow_writes"] is True
    assert (opts["limits"].header_timeout_s, opts["limits"].body_timeout_s) == (2.0, 3.0)
    assert opts["limits"].max_body_bytes == server.DEFAULT_MAX_BODY_BYTES


def test_a_refused_body_is_read_before_the_413():
    """Python's http.client sends the whole body before it reads: a server that answers
    and closes first makes it see a broken pipe, not the 413."""
    big = json.dumps({"entities": {"item_id": [1]}, "pad": "x" * 50_000}).encode()
    for declared in (True, False):
        read: list = []
        status, _, _ = call(make_guard(max_body_bytes=4096), big, chunk=5000,
                            declared=declared, read=read)
        assert status == 413 and read == [-(-len(big) // 5000)], (declared, read)


def test_a_stalled_body_gets_408():
    guard = make_guard(body_timeout_s=0.05)
    scope = {"type": "http", "path": "/get-online-features", "method": "POST",
             "headers": [(b"content-length", b"100")]}
    sent: list = []

    async def receive():
        await asyncio.sleep(10)

    async def send(msg):
        sent.append(msg)

    asyncio.run(guard(scope, receive, send))
    assert sent[0]["status"] == 408 and b"stalled" in sent[1]["body"]


def test_default_body_limit_takes_2000_full_precision_cold_rows():
    """The figure in DEFAULT_MAX_BODY_BYTES's comment, measured."""
    import numpy as np

    from qarm_features.feast.server import DEFAULT_MAX_BODY_BYTES

    rows = np.random.default_rng(0).standard_normal((2000, 384)).astype(np.float32)
    body = json.dumps({"features": ["qarm_cold:rq_code_l1"],
                       "entities": {"raw_emb": [r.tolist() for r in rows]}}).encode()
    assert len(body) < DEFAULT_MAX_BODY_BYTES, (len(body), DEFAULT_MAX_BODY_BYTES)


def test_a_join_key_wins_over_a_request_field_of_the_same_name():
    """A request field named like an entity's join key must not turn the key's checks off
    (request_check.field_kinds)."""
    from feast import Entity, Field, RequestSource, ValueType
    from feast.types import Array, Float32, String

    from qarm_features.feast.request_check import field_kinds

    class Odfv:
        source_request_sources = {"r": RequestSource(
            name="r", schema=[Field(name="item_id", dtype=Array(Float32)),
                              Field(name="sku", dtype=Array(Float32)),
                              Field(name="raw_emb", dtype=Array(Float32)),
                              Field(name="note", dtype=String)])}

    class Store:
        def list_on_demand_feature_views(self, allow_cache=True):
            return [Odfv()]

        def list_entities(self, allow_cache=True):
            return [Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64),
                    Entity(name="product", join_keys=["sku"], value_type=ValueType.STRING)]

    kinds = field_kinds(Store())
    assert kinds["item_id"] == (INT, "INT64") and kinds["sku"] == (STRING, "STRING")
    assert kinds["raw_emb"] == (FLOAT_LIST, "FLOAT_LIST")
    assert kinds["note"] == (STRING_FIELD, "STRING")  # a request field: bad rows fail alone
    with pytest.raises(RequestRejected, match="item_id row 0"):
        check_online_request({"entities": {"item_id": [50.7]}}, kinds, max_rows=5)


def test_row_errors_reach_qarm_error_under_full_feature_names():
    from qarm_features.feast.read_path import write_row_errors

    resp = {"metadata": {"feature_names": ["item_id", "qarm_cold__qarm_error", "qarm_error",
                                           "qarm__rq_code_l1", "qarm_cold_b64__qarm_error"]},
            "results": [{"values": [1, 2]}, {"values": ["", ""]}, {"values": ["", ""]},
                        {"values": [3, 4]}, {"values": ["", ""]}]}
    write_row_errors(resp, {1: "raw_emb is bad"})
    values = [r["values"] for r in resp["results"]]
    assert values == [[1, 2], ["", "raw_emb is bad"], ["", "raw_emb is bad"], [3, 4],
                      ["", "raw_emb is bad"]]


def test_response_dict_equals_feasts_conversion():
    """read_path.response_dict against Feast 0.67's convert_response_to_dict, on every
    value kind a read returns (and NaN, bytes, nulls, timestamps with and without nanos)."""
    from feast.feature_server_utils import convert_response_to_dict
    from feast.protos.feast.serving.ServingService_pb2 import FieldStatus, GetOnlineFeaturesResponse
    from feast.protos.feast.types.Value_pb2 import (
        BytesList,
        DoubleList,
        FloatList,
        Int64List,
        StringList,
        Value,
    )
    from google.protobuf.timestamp_pb2 import Timestamp

    from qarm_features.feast.read_path import response_dict

    columns = {
        "i": [Value(int64_val=5), Value(), Value(int32_val=-2)],
        "s": [Value(string_val="qarm-1"), Value(string_val=""), Value(string_val="é")],
        "f": [Value(float_list_val=FloatList(val=[0.5, 1e-3])),
              Value(float_list_val=FloatList(val=[float("nan"), 1.0])),
              Value(double_list_val=DoubleList(val=[float("inf")]))],
        "l": [Value(int64_list_val=Int64List(val=[1, 2])), Value(string_list_val=StringList(val=["a"])),
              Value(bytes_list_val=BytesList(val=[b"\x00x"]))],
        "d": [Value(double_val=0.1), Value(float_val=float("-inf")), Value(bytes_val=b"ab")],
        "b": [Value(bool_val=True), Value(unix_timestamp_val=7), Value(bool_val=False)],
    }
    stamps = [Timestamp(seconds=0), Timestamp(seconds=1_700_000_000, nanos=5_000_000),
              Timestamp(seconds=1_700_000_000, nanos=123)]
    proto = GetOnlineFeaturesResponse()
    proto.metadata.feature_names.val.extend(columns)
    for values in columns.values():
        proto.results.append(GetOnlineFeaturesResponse.FeatureVector(
            values=values, statuses=[FieldStatus.PRESENT, FieldStatus.NOT_FOUND, 9],
            event_timestamps=stamps))
    proto.results.append(GetOnlineFeaturesResponse.FeatureVector(values=[Value()]))
    assert response_dict(proto) == convert_response_to_dict(proto)
    assert json.dumps(response_dict(proto)) == json.dumps(convert_response_to_dict(proto))
