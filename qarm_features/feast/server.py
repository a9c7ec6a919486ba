"""The production feature server: Feast's own app behind a QARM guard (``qarm serve``).

``feast serve`` is Feast 0.67's FastAPI app under gunicorn + uvicorn workers. This module
serves the *same app* (``feast.feature_server.get_app``: every endpoint, auth, the repo's
``static_artifacts.py`` warm-up), wrapped in one ASGI middleware, :class:`ServingGuard`,
that fixes what Feast gets wrong for clients on the wire (measured on Feast 0.67):

- **read-only**: Feast's write endpoints (``/push``, ``/write-to-online-store``,
  ``/materialize``, ``/materialize-incremental``) answer 403 unless the server was started
  with ``allow_writes`` (``--allow-writes``): Feast's app takes writes with no credentials.
- **request size**: a body over ``max_body_bytes`` is refused with 413 without being kept
  (by ``Content-Length``, or as soon as a chunked body passes the limit); the refused body
  is read and dropped (up to :data:`DRAIN_MAX_BYTES`) before the answer, so a client that
  sends its whole body first (Python's ``http.client``) reads the 413, not a reset. A
  ``/get-online-features`` request over ``max_entity_rows`` rows gets 413. Feast reads any
  size (6.5M ids in 55 MB drove a worker to 8.7 GB).
- **slow clients**: a connection must finish its request headers within
  ``header_timeout_s`` of connecting (or of a request's first byte) and send each part of
  its body within ``body_timeout_s`` (408 otherwise); idle keep-alive connections close
  after ``keep_alive_timeout``. Uvicorn alone keeps a slowloris connection forever.
- **entity ids**: checked against the join keys' registered types
  (:mod:`qarm_features.feast.request_check`): a float or boolean id is a 400 naming the key,
  row and value, not another item (Feast reads ``50.7`` as item 50, ``true`` as item 1).
- **cold requests**: ``raw_emb`` rows with any mix of integer and float literals are
  accepted; a row that is not a list of numbers gets its own error in ``qarm_error`` while
  the other rows are encoded (Feast fails the whole batch with a 500).
- **errors and keep-alive**: every 4xx/5xx carries ``Connection: close``, and an exception
  that Starlette re-raises after its 500 was sent stops here (uvicorn would drop the
  keep-alive connection without saying so and fail the client's next request).
- **health**: ``GET /health`` answers 503 with the reason while the registry is unreadable
  or the repo's cold path cannot load its bundle, 200 with the served version otherwise.
- **workers**: thread pools pinned (``QARM_SERVING_THREADS``, default 1) and the bundle
  loaded before the first request; workers are never recycled (``max_requests=0``).
- **reads**: a JSON ``/get-online-features`` body is answered by
  :class:`~qarm_features.feast.read_path.FastReader` when it covers the request (cold rows
  by the view's own UDF without Feast's on-demand typing, responses built without Feast's
  per-value conversion; JSON-equal to Feast's answer); anything else goes to Feast's app.

Run: ``qarm serve --repo feature_repo``, or
:func:`serve` / :func:`build_app` from Python (docs/feast.md, "Production serving").
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from qarm_features.feast.asgi_io import (
    Responder,
    RowErrorWriter,
    TooLarge,
    TooSlow,
    content_length,
    read_body,
    replay,
    with_length,
    worker_class,
)
from qarm_features.feast.read_path import FastReader, fast_reads_allowed
from qarm_features.feast.request_check import (
    RequestRejected,
    check_online_request,
    field_kinds,
)

log = logging.getLogger(__name__)

# 2,000 cold rows of 384 full-precision JSON floats: json.dumps writes a float32 value as
# its shortest double repr, ~19-20 characters plus ", " (~21.5 bytes a value, ~8.3 kB a
# row: 16.5 MB for 2,000 rows, tests/unit/test_serve_guard.py measures it); 24 MiB takes
# them with ~50% room. As base64 (raw_emb_b64) a row is 2 kB: 12,000 rows.
DEFAULT_MAX_BODY_BYTES = 24 * 1024 * 1024
DEFAULT_MAX_ENTITY_ROWS = 10_000  # 10x a large ranking request's candidates
DEFAULT_HEADER_TIMEOUT_S = 10.0  # a request's headers arrive within this (slowloris)
DEFAULT_BODY_TIMEOUT_S = 30.0  # the longest wait for the next part of a body
DRAIN_MAX_BYTES = 64 * 1024 * 1024  # a refused body is read and dropped up to this size
WRITE_PATHS = frozenset(
    {"/push", "/write-to-online-store", "/materialize", "/materialize-incremental"}
)
KINDS_TTL_S = 5.0  # the registry's declared types are re-read this often (cached reads)
ONLINE_PATH = "/get-online-features"
_BODY_METHODS = {"POST", "PUT", "PATCH"}


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on one request.

    Attributes:
        max_body_bytes: largest request body (any endpoint); 413 beyond.
        max_entity_rows: most entity rows in one ``/get-online-features`` request; 413
            beyond.
        header_timeout_s: seconds a connection may take to send a request's headers
            (then it is closed).
        body_timeout_s: seconds to wait for each part of a body (then 408).
    """

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_entity_rows: int = DEFAULT_MAX_ENTITY_ROWS
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S

    def __post_init__(self):
        from qarm_features.errors import ConfigError

        if self.max_body_bytes < 1024 or self.max_entity_rows < 1:
            raise ConfigError(
                f"limits must be max_body_bytes >= 1024 and max_entity_rows >= 1; got {self}"
            )
        if not (self.header_timeout_s > 0 and self.body_timeout_s > 0):
            raise ConfigError(f"timeouts must be > 0 seconds; got {self}")


class ServingGuard:
    """ASGI middleware around Feast's feature server app (see the module docstring).

    Args:
        app: the ASGI app to guard (``feast.feature_server.get_app(store)``).
        store: the app's ``FeatureStore`` (declared types, registry health, fast reads).
        repo_path: the feature repo (its bundle pointer: the cold path's bundle).
        limits: request bounds.
        allow_writes: pass Feast's write endpoints through (default: 403).
        fast_reads: answer the reads :class:`FastReader` covers (default: when the store
            allows it, :func:`fast_reads_allowed`); False: every read goes to Feast.
    """

    def __init__(
        self,
        app,
        *,
        store,
        repo_path,
        limits: ServeLimits | None = None,
        allow_writes: bool = False,
        fast_reads: bool | None = None,
    ):
        self.app = app
        self.store = store
        self.repo = Path(repo_path).resolve()
        self.limits = limits or ServeLimits()
        self.allow_writes = allow_writes
        if fast_reads is None:
            why = fast_reads_allowed(store)
            if why is not None:
                log.info("reads answered by Feast's app (%s)", why)
            fast_reads = why is None
        self.reader = FastReader(store) if fast_reads else None
        self._kinds: tuple[float, dict] = (float("-inf"), {})

    # ------------------------------------------------------------------ ASGI entry
    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, self._on_startup(receive), send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        base = Responder(send)
        try:
            if scope["path"] == "/health" and scope["method"] in ("GET", "HEAD"):
                report = await self._run(self.health)
                return await base.reply(200 if report["status"] == "ok" else 503, report)
            if scope["path"] in WRITE_PATHS and not self.allow_writes:
                await self._drain(scope, receive)
                return await base.reply(403, _read_only(scope))
            out = base
            if scope["method"] in _BODY_METHODS:
                scope, receive, out = await self._guard_body(scope, receive, base)
                if scope is None:
                    return
            await self.app(scope, receive, out)
        except Exception as exc:  # noqa: BLE001 - the connection must outlive any error
            if base.started:  # Starlette re-raises after its 500 (already logged by Feast)
                log.debug("error after the response was sent: %r", exc)
                return
            log.exception("request failed before a response")
            await base.reply(500, {"error": type(exc).__name__, "message": str(exc)})

    # ------------------------------------------------------------------ request bodies
    async def _guard_body(self, scope, receive, out):
        """Read the body within the limits; check and answer ``/get-online-features``.

        Returns ``(scope, receive, send)`` to call the app with, or ``(None, None, None)``
        when a response was already sent.
        """
        limit = self.limits.max_body_bytes
        declared = content_length(scope)
        if declared is not None and declared > limit:
            await self._drain(scope, receive)
            await out.reply(413, _too_large(declared, limit))
            return None, None, None
        try:
            body = await read_body(receive, limit, self.limits.body_timeout_s)
        except TooLarge:
            await self._drain(scope, receive)
            await out.reply(413, _too_large(None, limit))
            return None, None, None
        except TooSlow:
            await out.reply(408, _too_slow(self.limits.body_timeout_s))
            return None, None, None
        if scope["path"] == ONLINE_PATH:
            try:
                body, row_errors = await self._check_online(body, out, _is_json(scope))
            except RequestRejected as exc:
                await out.reply(exc.status, exc.to_json())
                return None, None, None
            if body is None:  # answered here
                return None, None, None
            if row_errors:
                out = RowErrorWriter(out, row_errors)
        return with_length(scope, len(body)), replay(body, receive), out

    async def _drain(self, scope, receive) -> None:
        """Read and drop what the client sends of a refused body (bounded), so that it
        reads the answer instead of a connection reset."""
        if scope["method"] not in _BODY_METHODS:
            return
        declared = content_length(scope)
        if declared is not None and declared > DRAIN_MAX_BYTES:
            return
        size = 0
        while size <= DRAIN_MAX_BYTES:
            try:
                message = await asyncio.wait_for(receive(), self.limits.body_timeout_s)
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    async def _check_online(
        self, body: bytes, out, is_json: bool
    ) -> tuple[bytes | None, dict[int, str]]:
        """Check a read; answer it here when :class:`FastReader` covers it (then the
        returned body is None), else return the body to hand to Feast. A body not sent as
        JSON is Feast's to answer (422, as ``feast serve``)."""
        try:
            parsed = json.loads(body)
        except ValueError:
            return body, {}  # Feast answers 422 with the decoder's message
        kinds = await self._field_kinds()
        checked = check_online_request(parsed, kinds, max_rows=self.limits.max_entity_rows)
        if self.reader is not None and is_json:
            data = await self._run(self.reader.read, checked.body, kinds, checked.row_errors)
            if data is not None:
                await out.reply_bytes(200, data)
                return None, {}
        if checked.changed:
            body = json.dumps(checked.body).encode()
        return body, checked.row_errors

    async def _field_kinds(self) -> dict:
        at, kinds = self._kinds
        if time.monotonic() - at > KINDS_TTL_S:
            kinds = await self._run(field_kinds, self.store)
            self._kinds = (time.monotonic(), kinds)
        return kinds

    # ------------------------------------------------------------------ health, startup
    def health(self) -> dict:
        """``{"status": "ok", "qarm_version", ...}`` or ``{"status": "unavailable", "reason"}``."""
        from qarm_features.feast.context import ServingContext

        try:
            self.store.registry.list_projects(allow_cache=True)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return {"status": "unavailable", "reason": f"registry: {type(exc).__name__}: {exc}"}
        try:
            context = ServingContext.of_repo(self.repo)
            bundle = context.load()
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return {
                "status": "unavailable",
                "reason": f"cold path: {type(exc).__name__}: {exc}",
            }
        return {"status": "ok", "qarm_version": bundle.version, "bundle": context.bundle}

    def _on_startup(self, receive):
        """Wrap lifespan ``receive``: pin threads and load the bundle at startup."""

        async def wrapped():
            message = await receive()
            if message["type"] == "lifespan.startup":
                from qarm_features.feast.serving import serving_setup

                try:
                    info = await self._run(serving_setup, self.repo)
                    log.info("QARM server worker %d ready: %s", os.getpid(), info)
                except Exception as exc:  # noqa: BLE001 - /health reports it
                    log.error("QARM warm-up failed (the cold path is down): %s", exc)
            return message

        return wrapped

    @staticmethod
    async def _run(fn, *args):
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(fn, *args)


def _is_json(scope) -> bool:
    """Whether the request says its body is JSON (FastAPI's test: ``application/json`` or
    a ``+json`` media type); Feast's app answers 422 to any other body."""
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            media = value.split(b";")[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


def _too_large(declared: int | None, limit: int) -> dict:
    size = f"{declared} bytes" if declared is not None else "a body"
    return {
        "error": "RequestTooLarge",
        "message": f"{size} over this server's limit of {limit} bytes; split the request, "
        "send cold embeddings as raw_emb_b64, or raise --max-body-bytes",
    }


def _too_slow(timeout: float) -> dict:
    return {
        "error": "RequestTimeout",
        "message": f"the request body stalled for over {timeout:g} s; send it whole",
    }


def _read_only(scope) -> dict:
    return {
        "error": "WriteRefused",
        "message": f"{scope['method']} {scope['path']}: this server is read-only; write "
        "with `qarm push` / `qarm materialize`, or start it with --allow-writes (Feast's "
        "write endpoints take no credentials: keep such a server behind your own auth)",
    }


# ---------------------------------------------------------------------- app and server
def build_app(
    repo_path: str | os.PathLike,
    *,
    fs_yaml_file: str | os.PathLike | None = None,
    registry_ttl_sec: int = 60,
    limits: ServeLimits | None = None,
    allow_writes: bool = False,
    fast_reads: bool | None = None,
):
    """Feast's feature server app for a repo, wrapped in :class:`ServingGuard`.

    Returns ``(asgi_app, store)``. Initialises Feast's auth managers as ``feast serve`` does.
    ``allow_writes`` and ``fast_reads``: see :class:`ServingGuard`.
    """
    from feast import FeatureStore
    from feast.feature_server import get_app
    from feast.permissions.server.utils import (
        ServerType,
        init_auth_manager,
        init_security_manager,
        str_to_auth_manager_type,
    )

    repo = Path(repo_path).resolve()
    kwargs = {} if fs_yaml_file is None else {"fs_yaml_file": Path(fs_yaml_file).resolve()}
    store = FeatureStore(repo_path=str(repo), **kwargs)
    auth_type = str_to_auth_manager_type(store.config.auth_config.type)
    init_security_manager(auth_type=auth_type, fs=store)
    init_auth_manager(
        auth_type=auth_type, server_type=ServerType.REST, auth_config=store.config.auth_config
    )
    app = get_app(store, registry_ttl_sec)
    guard = ServingGuard(
        app,
        store=store,
        repo_path=repo,
        limits=limits,
        allow_writes=allow_writes,
        fast_reads=fast_reads,
    )
    return guard, store


def serve(
    repo_path: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 6566,
    workers: int = 1,
    fs_yaml_file: str | os.PathLike | None = None,
    limits: ServeLimits | None = None,
    keep_alive_timeout: int = 30,
    registry_ttl_sec: int = 60,
    access_log: bool = False,
    allow_writes: bool = False,
) -> None:
    """Serve a feature repo (blocks): gunicorn, uvicorn workers, workers never recycled.

    Args:
        repo_path: the feature repo.
        host, port: where to listen (loopback by default, as ``feast serve``).
        workers: worker processes; each loads the bundle and answers requests on a thread
            pool (scale with workers).
        fs_yaml_file: another config of the repo (``feature_store.redis.yaml`` ...).
        limits: request bounds and timeouts (:class:`ServeLimits`).
        keep_alive_timeout: seconds an idle keep-alive connection stays open.
        registry_ttl_sec: how often a worker re-reads the registry (a rollout reaches the
            cold path at the next refresh).
        access_log: log every request (off: one line per request costs more than a read).
        allow_writes: accept Feast's write endpoints (no credentials: behind your auth).
    """
    import gunicorn.app.base

    limits = limits or ServeLimits()
    app, _ = build_app(
        repo_path,
        fs_yaml_file=fs_yaml_file,
        registry_ttl_sec=registry_ttl_sec,
        limits=limits,
        allow_writes=allow_writes,
    )
    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": worker_class(limits.header_timeout_s),
        "max_requests": 0,  # never recycle: a new worker reloads the bundle, drops connections
        "keepalive": keep_alive_timeout,
        "accesslog": "-" if access_log else None,
    }

    class _Application(gunicorn.app.base.BaseApplication):
        def load_config(self):
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):
            return app

    _Application().run()
