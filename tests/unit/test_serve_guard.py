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
         declared=True):
    """(status, headers dict, body) of one request through the guard."""
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
        sent.append(msg)

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
    from qarm_features.bundle import load_bundle
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
