"""HTTP plumbing under ``qarm serve``'s guard (:mod:`qarm_features.feast.server`): reading
a request body within a size and a time limit, replaying it to the app, answering, adding
``Connection: close`` to errors, patching per-row errors into a response, and the uvicorn
worker whose connections must send their headers in time (slowloris).

ASGI only (no Feast): the guard decides what to refuse, this module does the I/O.
"""

from __future__ import annotations

import asyncio
import json
import logging

from qarm_features.feast.read_path import dumps, write_row_errors

log = logging.getLogger(__name__)


class TooLarge(Exception):
    pass


class TooSlow(Exception):
    pass


def json_reply(status: int, payload: dict) -> tuple[dict, dict]:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    start = {"type": "http.response.start", "status": status, "headers": headers}
    return start, {"type": "http.response.body", "body": body}


class Responder:
    """The ``send`` callable handed to the app: adds ``Connection: close`` to 4xx/5xx and
    remembers whether a response has started."""

    def __init__(self, send):
        self._send = send
        self.started = False

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if message["status"] >= 400:
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                message = {**message, "headers": headers + [(b"connection", b"close")]}
        await self._send(message)

    async def reply(self, status: int, payload: dict) -> None:
        start, body = json_reply(status, payload)
        await self(start)
        await self(body)

    async def reply_bytes(self, status: int, body: bytes) -> None:
        """A JSON body already rendered."""
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await self({"type": "http.response.start", "status": status, "headers": headers})
        await self({"type": "http.response.body", "body": body})


class RowErrorWriter:
    """``send`` that writes the guard's per-row reasons into a 200 response's ``qarm_error``
    column (rows whose request value was replaced by ``null``)."""

    def __init__(self, send: Responder, row_errors: dict[int, str]):
        self._send = send
        self._errors = row_errors
        self._start: dict | None = None
        self._chunks: list[bytes] = []

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            if message["status"] != 200:
                self._errors = {}
                return await self._send(message)
            self._start = message
            return None
        if self._start is None or message["type"] != "http.response.body":
            return await self._send(message)
        self._chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return None
        body = patch_errors(b"".join(self._chunks), self._errors)
        headers = [h for h in self._start["headers"] if h[0].lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self._send({**self._start, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})


def patch_errors(body: bytes, errors: dict[int, str]) -> bytes:
    try:
        resp = json.loads(body)
        write_row_errors(resp, errors)
    except (ValueError, KeyError, TypeError, IndexError):
        return body
    return dumps(resp)


def content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_body(receive, limit: int, timeout: float) -> bytes:
    chunks, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), timeout)
        except TimeoutError:
            raise TooSlow from None
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def replay(body: bytes, receive):
    """``receive`` that gives the (checked) body once, then waits on the real connection
    (a later call means "tell me when the client disconnects")."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def with_length(scope, n: int):
    headers = [h for h in scope["headers"] if h[0] not in (b"content-length", b"transfer-encoding")]
    return {**scope, "headers": headers + [(b"content-length", str(n).encode())]}


def worker_class(header_timeout_s: float):
    """Gunicorn's uvicorn worker, whose connections must send a request's headers within
    ``header_timeout_s`` (from connecting, or from the request's first byte) or be closed.

    Uvicorn 0.55 has no such timeout: a client that sends a header line now and then holds
    a connection for ever (1,500 of them were never closed). Falls back to the plain worker
    when uvicorn's httptools protocol is not installed.
    """
    from uvicorn_worker import UvicornWorker

    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools ships with uvicorn[standard]
        log.warning("httptools not installed: no header timeout (slow clients hold sockets)")
        return UvicornWorker

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _qarm_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._qarm_arm()

        def on_message_begin(self):
            super().on_message_begin()
            if self._qarm_timer is None:
                self._qarm_arm()

        def on_headers_complete(self):
            self._qarm_disarm()
            super().on_headers_complete()

        def connection_lost(self, exc):
            self._qarm_disarm()
            super().connection_lost(exc)

        def _qarm_arm(self):
            self._qarm_timer = self.loop.call_later(header_timeout_s, self._qarm_expire)

        def _qarm_disarm(self):
            if self._qarm_timer is not None:
                self._qarm_timer.cancel()
                self._qarm_timer = None

        def _qarm_expire(self):
            self._qarm_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return type(
        "QarmUvicornWorker",
        (UvicornWorker,),
        {"CONFIG_KWARGS": {"loop": "auto", "http": HeaderTimeoutProtocol}},
    )
