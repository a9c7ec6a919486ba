"""`qarm serve` against what real clients send.

Each finding of issue 13 on Feast 0.67's `feast serve` is one test, run against our server
(started by the test on a free loopback port, over a repo built by
`qarm_features.feast.job.materialize`). With ``QARM_COMPARE_FEAST=1`` every test also runs
against plain `feast serve` on the same repo, where each is expected to fail (strict
xfail): the finding is still Feast's, and ours still fixes it.

Our server runs with small limits here (64 KiB bodies, 500 entity rows, 2 s to send a
request's headers) so the limit tests send small requests and wait little.

Issue 21: `qarm serve` answers reads itself (`qarm_features.feast.read_path`); its answers
are compared, request by request, with Feast's own app on the same repo, in process.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import random
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.integration.helpers import (
    assert_row_equal,
    catalog_expectations,
    expected_rows,
    feast_server,
    free_port,
    http_server,
    qarm_names,
    refs,
    subprocess_env,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*experimental.*:RuntimeWarning"),
]

NAMES = qarm_names(3)
COLD = refs("qarm_cold", NAMES + ["qarm_error"])
MAX_BODY = 64 * 1024
MAX_ROWS = 500
HEADER_TIMEOUT_S = 2
SERVERS = ["qarm"] + (["feast"] if os.environ.get("QARM_COMPARE_FEAST") else [])


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def qarm_server(repo: Path, *, startup_s: float = 120, extra_args: tuple[str, ...] = ()):
    """Our server on a free loopback port (one worker); yields its base URL."""
    port = free_port()
    env = subprocess_env(repo.parent)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                         env["PYTHONPATH"]])  # fmt: skip
    command = [str(Path(sys.executable).parent / "qarm"), "serve", "--repo", str(repo),
               "--port", str(port), "--max-body-bytes", str(MAX_BODY),
               "--max-entity-rows", str(MAX_ROWS), "--header-timeout", str(HEADER_TIMEOUT_S),
               *extra_args]  # fmt: skip
    # cwd is not the repo: the server must find everything from --repo
    with http_server(command, port=port, cwd=repo.parent, env=env, startup_s=startup_s,
                     log_path=repo.parent / f"qarm-serve-{port}.log", name="qarm serve") as url:  # fmt: skip
        yield url


def start(kind: str, repo: Path):
    return qarm_server(repo) if kind == "qarm" else feast_server(repo)


@pytest.fixture(scope="module")
def serve_repo(make_repo, bundle_path):
    from qarm_features.feast.job import materialize

    repo = make_repo("serve", batch_view=False)
    materialize(bundle_path, repo)
    return repo


@pytest.fixture(scope="module", params=SERVERS)
def server(request, serve_repo):
    with start(request.param, serve_repo) as url:
        yield request.param, url


def feast_fails(request, server) -> None:
    """Plain `feast serve` is expected to fail this test (the finding reproduced)."""
    if server[0] == "feast":
        request.applymarker(pytest.mark.xfail(strict=True, reason="Feast 0.67 finding"))


# --------------------------------------------------------------------------- requests


def post(url: str, payload, *, path: str = "/get-online-features"):
    """(status, headers, parsed body) of one POST on a fresh connection."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(url + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        with contextlib.suppress(ValueError):
            body = json.loads(body)
        return exc.code, exc.headers, body


def columns(resp: dict) -> dict[str, list]:
    names = resp["metadata"]["feature_names"]
    return {n: resp["results"][j]["values"] for j, n in enumerate(names)}


def raw_rows(bundle_path, n: int, seed: int) -> np.ndarray:
    from qarm_features.bundle.artifact import load_bundle

    d = load_bundle(bundle_path).raw_dim
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# --------------------------------------------------------------------------- findings


def test_float_and_bool_ids_are_errors_not_other_items(request, server, bundle_path):
    feast_fails(request, server)
    url = server[1]
    expected = catalog_expectations(bundle_path)
    for bad, shown in [(50.7, "50.7"), (True, "True"), (50.0, "50.0")]:
        status, headers, body = post(url, {"features": ["qarm:rq_code_l1"],
                                           "entities": {"item_id": [3, bad]}})
        assert status == 400, (bad, status, body)
        assert "item_id row 1" in body["message"] and shown in body["message"], body
        assert body["problems"][0] == {"key": "item_id", "row": 1, "value": bad,
                                       "error": body["problems"][0]["error"]}
    # integer ids, also as decimal strings (JavaScript's 64-bit ids), read their own items
    status, _, body = post(url, {"features": ["qarm:rq_code_l1"],
                                 "entities": {"item_id": [50, "51"]}})
    assert status == 200
    assert columns(body)["rq_code_l1"] == [expected[50]["rq_code_l1"], expected[51]["rq_code_l1"]]


def test_null_id_names_its_row(request, server):
    feast_fails(request, server)
    status, _, body = post(server[1], {"features": ["qarm:rq_code_l1"],
                                       "entities": {"item_id": [1, 2, None]}})
    assert status == 400, body
    assert "item_id row 2" in body["message"] and "null" in body["message"], body


def test_cold_rows_take_any_mix_of_int_and_float_literals(request, server, bundle_path):
    """JavaScript writes 0.0 as 0: an integer row first, a float row, a mixed row."""
    feast_fails(request, server)
    raw = raw_rows(bundle_path, 2, seed=11)
    ints = np.round(raw[0] * 4).astype(np.float32)  # a row whose values are all integers
    mixed = raw[1].copy()
    mixed[::3] = 0.0  # JSON: 0 among floats
    as_json = [
        [int(x) for x in ints],
        [float(x) for x in raw[1]],
        [0 if x == 0 else float(x) for x in mixed],
    ]
    assert all(type(x) is int for x in as_json[0]) and 0 in as_json[2]  # ints on the wire
    status, _, body = post(server[1], {"features": COLD, "entities": {"raw_emb": as_json}})
    assert status == 200, body
    cols = columns(body)
    assert cols["qarm_error"] == ["", "", ""]
    want = expected_rows(bundle_path, [9001, 9002, 9003], [ints, raw[1], mixed])
    for i in range(3):
        assert_row_equal({n: cols[n][i] for n in NAMES}, want[9001 + i], NAMES, f"cold row {i}")


def test_a_bad_cold_row_is_that_rows_error(request, server, bundle_path):
    feast_fails(request, server)
    raw = raw_rows(bundle_path, 2, seed=12)
    rows = [raw[0].tolist(), "abc", [1.0, True] + [0.5] * 30, [], 7, None, raw[1].tolist()]
    status, _, body = post(server[1], {"features": COLD, "entities": {"raw_emb": rows}})
    assert status == 200, body
    cols = columns(body)
    want = expected_rows(bundle_path, [9001, 9002], raw)  # ids outside the catalog (VQ pool)
    assert_row_equal({n: cols[n][0] for n in NAMES}, want[9001], NAMES, "good row 0")
    assert_row_equal({n: cols[n][6] for n in NAMES}, want[9002], NAMES, "good row 6")
    assert cols["qarm_error"][0] == cols["qarm_error"][6] == ""
    assert cols["qarm_error"][1:6] == [
        "raw_emb must be a list of numbers, got a string",
        "raw_emb[1] is a boolean, not a number",
        "raw_emb is an empty list",
        "raw_emb must be a list of numbers, got a number",
        "raw_emb is missing",
    ]
    assert all(cols["rq_code_l1"][i] == -1 and cols["qarm_version"][i] == "" for i in range(1, 6))


def test_request_body_limit(request, server):
    feast_fails(request, server)
    url = server[1]
    small = {"features": ["qarm:rq_code_l1"], "entities": {"item_id": [1]}}
    padded = dict(small, pad="x" * MAX_BODY)  # an unknown field Feast ignores
    status, headers, body = post(url, padded)
    assert status == 413 and headers["Connection"] == "close", (status, body)
    assert "limit of 65536 bytes" in body["message"]
    # chunked: no Content-Length, refused once the body passes the limit
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = json.dumps(padded).encode()
    chunks = (data[i:i + 8192] for i in range(0, len(data), 8192))
    conn.request("POST", "/get-online-features", body=chunks, encode_chunked=True,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 413, resp.read()
    conn.close()
    assert post(url, small)[0] == 200


def test_entity_row_limit(request, server):
    feast_fails(request, server)
    url = server[1]
    status, headers, body = post(url, {"features": ["qarm:rq_code_l1"],
                                       "entities": {"item_id": list(range(1, MAX_ROWS + 2))}})
    assert status == 413 and headers["Connection"] == "close", (status, body)
    assert f"{MAX_ROWS + 1} entity rows" in body["message"]
    status, _, _ = post(url, {"features": ["qarm:rq_code_l1"],
                              "entities": {"item_id": list(range(1, MAX_ROWS + 1))}})
    assert status == 200


def test_an_error_does_not_break_the_next_request_on_the_connection(request, server):
    """A 500 (Feast: unknown feature) then a good request, ten times, on one connection."""
    feast_fails(request, server)
    port = int(server[1].rsplit(":", 1)[1])
    bad = json.dumps({"features": ["qarm:no_such_feature"], "entities": {"item_id": [1]}})
    good = json.dumps({"features": ["qarm:rq_code_l1"], "entities": {"item_id": [1]}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    failed, error_headers = [], set()
    for i in range(10):
        conn.request("POST", "/get-online-features", bad, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 500
        error_headers.add(resp.getheader("Connection"))
        try:
            conn.request("POST", "/get-online-features", good,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                failed.append((i, resp.status))
        except (ConnectionError, http.client.HTTPException) as exc:
            failed.append((i, repr(exc)))
            conn.close()
    conn.close()
    assert error_headers == {"close"} and not failed, (error_headers, failed)


@pytest.mark.parametrize("kind", SERVERS)
def test_health_reports_the_cold_path(request, kind, make_repo, bundle_path, tmp_path):
    """The bundle directory disappears under a running server: /health says so (503 and
    why) while every cold row errors, and recovers when the bundle is back."""
    from qarm_features.feast.job import materialize

    if kind == "feast":
        request.applymarker(pytest.mark.xfail(strict=True, reason="Feast 0.67 finding"))
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_path, bundle)
    repo = make_repo(f"health-{kind}", batch_view=False)
    materialize(bundle, repo)
    raw = raw_rows(bundle_path, 1, seed=13)[0].tolist()
    with start(kind, repo) as url:
        assert urllib.request.urlopen(url + "/health", timeout=10).status == 200
        bundle.rename(tmp_path / "moved")
        _, _, body = post(url, {"features": COLD, "entities": {"raw_emb": [raw]}})
        assert "BundleError" in columns(body)["qarm_error"][0], body
        try:
            urllib.request.urlopen(url + "/health", timeout=10)
            status, report = 200, {}
        except urllib.error.HTTPError as exc:
            status, report = exc.code, json.loads(exc.read())
        assert status == 503, "health is 200 while every cold row errors"
        assert report["status"] == "unavailable" and str(bundle) in report["reason"], report
        (tmp_path / "moved").rename(bundle)
        with urllib.request.urlopen(url + "/health", timeout=10) as resp:
            assert json.loads(resp.read())["status"] == "ok"


# --------------------------------------------------------------------------- soak


def test_mixed_soak_on_keep_alive_connections(request, server, bundle_path):
    """2,000 warm / cold / bad requests from 8 keep-alive connections: no good request
    fails, every good answer is right, every bad one gets its error."""
    feast_fails(request, server)
    from transformations.on_demand import encode_b64

    port = int(server[1].rsplit(":", 1)[1])
    expected = catalog_expectations(bundle_path)
    raw = raw_rows(bundle_path, 16, seed=14)
    raw[:, 0] = 0.0  # sent as the JSON integer 0 in list requests
    cold_want = list(expected_rows(bundle_path, list(range(9000, 9016)), raw).values())
    kinds = ["warm"] * 10 + ["cold_list"] * 3 + ["cold_b64"] * 3 + ["bad_id", "bad_feature",
                                                                      "bad_row", "too_many"]
    n_requests, n_conns = 2000, 8
    plan = [random.Random(i).choice(kinds) for i in range(n_requests)]
    failures: list = []
    lock = threading.Lock()

    def one(conn, i: int, kind: str):
        rng = random.Random(10_000 + i)
        if kind == "warm":
            ids = rng.sample(range(1, 201), 4)
            payload = {"features": ["qarm:rq_code_l1", "qarm:vq_codes"],
                       "entities": {"item_id": ids}}
        elif kind in ("cold_list", "cold_b64", "bad_row"):
            j = rng.randrange(16)
            if kind == "cold_b64":
                payload = {"features": refs("qarm_cold_b64", ["rq_code_l1", "qarm_error"]),
                           "entities": {"raw_emb_b64": [encode_b64(raw[j])]}}
            else:
                row = [0 if k == 0 else float(x) for k, x in enumerate(raw[j])]
                rows = [row, "oops"] if kind == "bad_row" else [row]
                payload = {"features": refs("qarm_cold", ["rq_code_l1", "qarm_error"]),
                           "entities": {"raw_emb": rows}}
        elif kind == "bad_id":
            payload = {"features": ["qarm:rq_code_l1"], "entities": {"item_id": [1, 2.5]}}
        elif kind == "bad_feature":
            payload = {"features": ["qarm:no_such_feature"], "entities": {"item_id": [1]}}
        else:
            payload = {"features": ["qarm:rq_code_l1"],
                       "entities": {"item_id": list(range(MAX_ROWS + 1))}}
        conn.request("POST", "/get-online-features", json.dumps(payload),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        status, data = resp.status, resp.read()
        want_status = {"bad_id": 400, "bad_feature": 500, "too_many": 413}.get(kind, 200)
        if status != want_status:
            return f"{kind}: HTTP {status} {data[:200]!r}"
        if status != 200:
            return None
        cols = columns(json.loads(data))
        if kind == "warm":
            got = [(cols["rq_code_l1"][k], cols["vq_codes"][k]) for k in range(4)]
            want = [(expected[x]["rq_code_l1"], expected[x]["vq_codes"])
                    for x in payload["entities"]["item_id"]]
            return None if got == want else f"warm {payload}: {got} != {want}"
        if cols["rq_code_l1"][0] != cold_want[j]["rq_code_l1"] or cols["qarm_error"][0]:
            return f"{kind}: {cols}"
        if kind == "bad_row" and not cols["qarm_error"][1].startswith("raw_emb must be"):
            return f"bad_row: {cols}"
        return None

    def worker(w: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i in range(w, n_requests, n_conns):
            try:
                problem = one(conn, i, plan[i])
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                problem = f"{plan[i]}: {exc!r}"
                conn.close()  # http.client reconnects on the next request
            if problem:
                with lock:
                    failures.append(problem)
        conn.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    elapsed = time.monotonic() - t0
    good_kinds = ("warm", "cold_list", "cold_b64", "bad_row")
    good = sum(k in good_kinds for k in plan)
    good_failed = sum(f.split(":")[0] in good_kinds for f in failures)
    print(f"\n{server[0]}: {n_requests} requests in {elapsed:.1f}s; {good_failed} of {good} "
          f"good failed; {len(failures) - good_failed} of {n_requests - good} bad ones got "
          "another answer than their error")
    if failures:  # by kind and cause (HTTP status or exception), for the record
        causes = collections.Counter(f.split(" {")[0].split("(")[0][:40] for f in failures)
        print("   ", dict(causes.most_common(8)))
    assert not failures, f"{len(failures)} of {n_requests} failed, e.g. {failures[:5]}"


# --------------------------------------------------------------------------- issue 19


WRITES = {
    "/write-to-online-store": {"feature_view_name": "qarm",
                               "df": {"item_id": [50], "qarm_version": ["qarm-evil"]}},
    "/push": {"push_source_name": "qarm_push",
              "df": {"item_id": [50], "qarm_version": ["qarm-evil"]}, "to": "online"},
    "/materialize": {"start_ts": "1970-01-01T00:00:00", "end_ts": "2100-01-01T00:00:00"},
    "/materialize-incremental": {"end_ts": "2100-01-01T00:00:00"},
}


@pytest.mark.parametrize("path", list(WRITES))
def test_write_endpoints_are_refused(request, server, bundle_path, path):
    """Feast's app takes writes from anyone who can connect; `qarm serve` is read-only
    unless started with --allow-writes."""
    feast_fails(request, server)
    url = server[1]
    before = post(url, {"features": ["qarm:qarm_version"], "entities": {"item_id": [50]}})
    status, headers, body = post(url, WRITES[path], path=path)
    assert status == 403 and headers["Connection"] == "close", (status, body)
    assert "read-only" in body["message"] and "--allow-writes" in body["message"], body
    after = post(url, {"features": ["qarm:qarm_version"], "entities": {"item_id": [50]}})
    assert after[2] == before[2] and "qarm-evil" not in json.dumps(after[2])


def test_http_client_reads_the_413_of_a_large_body(request, server):
    """http.client sends a whole body before reading: 8 MB against a 64 KiB limit must
    come back as a 413, not a broken pipe or a reset."""
    feast_fails(request, server)
    port = int(server[1].rsplit(":", 1)[1])
    body = json.dumps({"features": ["qarm:rq_code_l1"], "entities": {"item_id": [1]},
                       "pad": "x" * 8_000_000}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/get-online-features", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 413 and b"limit of 65536 bytes" in resp.read()
    conn.close()


def test_slow_clients_are_disconnected(request, server):
    """Slowloris: connections that send half a request's headers, or nothing, are closed
    after the header timeout; the server keeps answering."""
    import socket

    feast_fails(request, server)
    port = int(server[1].rsplit(":", 1)[1])
    socks = []
    for i in range(60):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        if i % 2:
            s.sendall(b"POST /get-online-features HTTP/1.1\r\nHost: x\r\nX-a: ")
        socks.append(s)
    deadline = time.monotonic() + HEADER_TIMEOUT_S + 20
    open_ = list(socks)
    while open_ and time.monotonic() < deadline:
        for s in list(open_):
            s.settimeout(0.05)
            try:
                if s.recv(1024) == b"":
                    open_.remove(s)
            except TimeoutError:
                pass
            except OSError:  # reset: closed too
                open_.remove(s)
    for s in socks:
        s.close()
    assert not open_, f"{len(open_)} of {len(socks)} slow connections still open"
    assert post(server[1], {"features": ["qarm:rq_code_l1"], "entities": {"item_id": [1]}})[0] == 200


def test_the_readme_curl_example_runs_as_written(server):
    """The README's curl command, against a started server (Feast 0.67 answers 422 to a
    body without `Content-Type: application/json`)."""
    import re
    import subprocess

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "curl" in b]
    assert len(blocks) == 1, blocks
    command = blocks[0].replace("localhost:6566", server[1].removeprefix("http://"))
    out = subprocess.run(["bash", "-c", command.strip() + " -w '\\n%{http_code}'"],
                         capture_output=True, text=True, timeout=60)
    body, _, code = out.stdout.rpartition("\n")
    assert code == "200", (out.stdout, out.stderr)
    cols = columns(json.loads(body))
    assert cols["rq_code_l1"] == [-1] and "raw_emb_b64" in cols["qarm_error"][0], cols


# --------------------------------------------------------------------------- issue 21


def asgi_post(app, payload, path: str = "/get-online-features",
              content_type: bytes | None = b"application/json") -> tuple[int, bytes]:
    """(status, body) of one POST through an ASGI app, in process."""
    import asyncio

    body = json.dumps(payload).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    scope = {"type": "http", "path": path, "method": "POST", "query_string": b"",
             "headers": headers,
             "root_path": "", "http_version": "1.1", "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}
    parts, sent = [body], []

    async def receive():
        if parts:
            return {"type": "http.request", "body": parts.pop(), "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    try:
        asyncio.run(app(scope, receive, send))
    except Exception:  # Starlette re-raises after its 500 (Feast's unguarded app)
        if not sent:
            raise
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture(scope="module")
def three_apps(serve_repo):
    """`qarm serve`'s app (fast reads), the same with every read left to Feast, and
    Feast's own app unguarded: one repo, one store each."""
    from feast.feature_server import get_app

    from qarm_features.feast.server import build_app

    fast, _ = build_app(serve_repo)
    assert fast.reader is not None
    answered = []
    read = fast.reader.read

    def counted(*args):
        out = read(*args)
        answered.append(out is not None)
        return out

    fast.reader.read = counted
    guarded, store = build_app(serve_repo, fast_reads=False)
    return fast, guarded, get_app(store), answered


def test_fast_reads_equal_feasts_answers(three_apps, bundle_path):
    """The same requests to `qarm serve` (its own reads), to `qarm serve` with Feast
    answering, and to Feast's plain app: the same statuses and bodies, codes bit for bit;
    warm, cold, both in one request, bad rows, string ids, full feature names, errors."""
    from transformations.on_demand import encode_b64

    fast, guarded, plain, answered = three_apps
    raw = raw_rows(bundle_path, 3, seed=21)
    good = [r.tolist() for r in raw]
    warm = refs("qarm", NAMES)
    b64 = [encode_b64(raw[0]), "x", ""]
    cases = [  # (request, also valid for Feast's plain app)
        ({"features": warm, "entities": {"item_id": [1, 7, 999]}}, True),
        ({"features": warm, "entities": {"item_id": [1, "2"]}}, True),
        ({"features": refs("item_content", ["raw_emb"]) + warm[1:3],
          "entities": {"item_id": [3, 4]}}, True),
        ({"features": COLD, "entities": {"raw_emb": good}}, True),
        ({"features": COLD, "entities": {"raw_emb": [good[0], "abc", [0, 1] + good[1][2:],
                                                     None, []]}}, False),
        ({"features": ["qarm_cold:vq_codes", "qarm_cold:aligned_emb"],
          "entities": {"item_id": [1, "2", 9999], "raw_emb": good}}, True),
        ({"features": ["qarm_cold:qarm_error", "qarm:rq_code_l1", "qarm_cold:rq_code_l2",
                       "qarm:vq_codes"], "entities": {"item_id": [1, 999, 3], "raw_emb": good}},
         True),
        ({"features": ["qarm_cold_b64:qarm_error", "qarm_cold:rq_code_l1",
                       "qarm_cold_b64:vq_codes"],
          "entities": {"raw_emb": good, "raw_emb_b64": b64}}, True),
        ({"features": ["qarm_cold_b64:qarm_error", "qarm_cold_b64:rq_code_l1"],
          "entities": {"raw_emb_b64": [b64[0], 7]}}, False),  # a number: that row's error
        ({"features": warm, "entities": {"item_id": [1]}, "full_feature_names": True}, True),
        ({"features": ["qarm:no_such_feature"], "entities": {"item_id": [1]}}, True),
        ({"features": ["qarm:rq_code_l1", "qarm_cold:rq_code_l1"],
          "entities": {"item_id": [1], "raw_emb": good[:1]}}, True),
        ({"features": ["qarm_cold:rq_code_l1"], "entities": {"item_id": [1]}}, True),
        ({"feature_service": "qarm_ranker", "entities": {"item_id": [1]}}, False),
    ]
    for i, (payload, feast_too) in enumerate(cases):
        got = asgi_post(fast, json.loads(json.dumps(payload)))
        assert got == asgi_post(guarded, json.loads(json.dumps(payload))), (i, got)
        if feast_too:
            want = asgi_post(plain, json.loads(json.dumps(payload)))
            assert got[0] == want[0] and json.loads(got[1]) == json.loads(want[1]), (i, got, want)
    # answered by qarm serve itself: the reads it covers; errors and services went to Feast
    assert answered == [True] * 10 + [False] * 4, answered
    # a body not declared as JSON: Feast's 422, from both (as the README's curl must know)
    for content_type in (None, b"text/plain", b"application/x-www-form-urlencoded"):
        got = asgi_post(fast, cases[0][0], content_type=content_type)
        want = asgi_post(plain, cases[0][0], content_type=content_type)
        assert got[0] == want[0] == 422 and got[1] == want[1], (content_type, got)
    assert asgi_post(fast, cases[0][0], content_type=b"application/json; charset=utf-8")[0] == 200
    assert len(answered) == 15
    # codes bit for bit with the batch path, the guard's row errors in place
    cols = columns(json.loads(asgi_post(fast, cases[4][0])[1]))
    want = expected_rows(bundle_path, [9001], raw[:1])[9001]
    assert_row_equal({n: cols[n][0] for n in NAMES}, want, NAMES, "good row")
    assert cols["qarm_error"][1:] == ["raw_emb must be a list of numbers, got a string", "",
                                      "raw_emb is missing", "raw_emb is an empty list"]
    cols = columns(json.loads(asgi_post(fast, cases[8][0])[1]))
    assert cols["qarm_error"] == ["", "raw_emb_b64 is a number, not a string"], cols


def test_full_feature_names_keep_cold_outputs(three_apps, bundle_path):
    """Feast 0.67 drops python-mode on-demand outputs under full feature names; `qarm
    serve` answers them under their full names, the rest of the answer as Feast's, and
    the guard's per-row errors in `qarm_cold__qarm_error`."""
    fast, _, plain, _ = three_apps
    good = [r.tolist() for r in raw_rows(bundle_path, 2, seed=22)]
    payload = {"features": ["qarm:rq_code_l1"] + COLD, "full_feature_names": True,
               "entities": {"item_id": [1, 2, 3], "raw_emb": [good[0], "oops", good[1]]}}
    status, body = asgi_post(fast, json.loads(json.dumps(payload)))
    assert status == 200
    got = json.loads(body)
    names = got["metadata"]["feature_names"]
    assert names == ["item_id", "qarm__rq_code_l1"] + [f"qarm_cold__{n}" for n in NAMES] + [
        "qarm_cold__qarm_error"]
    cols = columns(got)
    assert cols["qarm_cold__qarm_error"] == ["", "raw_emb must be a list of numbers, got a string",
                                             ""]
    short = dict(payload, full_feature_names=False, features=COLD)
    plain_cols = columns(json.loads(asgi_post(fast, json.loads(json.dumps(short)))[1]))
    for n in NAMES:
        assert cols[f"qarm_cold__{n}"] == plain_cols[n], n
    payload["entities"]["raw_emb"][1] = good[0]  # Feast's plain app fails on the bad row
    status, feast_body = asgi_post(plain, payload)
    feast = json.loads(feast_body)
    assert status == 200 and feast["metadata"]["feature_names"] == ["item_id", "qarm__rq_code_l1"]
    got = json.loads(asgi_post(fast, payload)[1])
    keep = [j for j, n in enumerate(got["metadata"]["feature_names"]) if "qarm_cold__" not in n]
    assert [got["results"][j] for j in keep] == feast["results"]


def test_cold_columns_in_process_equal_a_feast_read(serve_repo, bundle_path):
    """The fast in-process call (the view's UDF without Feast's typing) answers what
    `store.get_online_features` answers, item ids (VQ self-exclusion) included."""
    from feast import FeatureStore

    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.errors import ConfigError
    from qarm_features.feast.read_path import FastReader

    store = FeatureStore(repo_path=str(serve_repo))
    bundle = load_bundle(bundle_path)
    raw = np.concatenate([bundle.raw_emb[:2], raw_rows(bundle_path, 1, seed=23)])
    ids = [int(bundle.item_ids[0]), int(bundle.item_ids[1]), 9999]  # own rows: self-excluded
    rows = [{"item_id": i, "raw_emb": r} for i, r in zip(ids, raw)]
    want = store.get_online_features(features=COLD, entity_rows=rows).to_dict()
    got = FastReader(store).cold_columns("qarm_cold", {"item_id": ids, "raw_emb": list(raw)})
    for name in NAMES + ["qarm_error"]:
        assert got[name] == want[name], name
    assert ids[0] not in got["vq_codes"][0]  # an item is not among its own VQ codes
    with pytest.raises(ConfigError, match="not a cold view"):
        FastReader(store).cold_columns("qarm", {"item_id": ids})
