"""What every request must pass before any route reads its body: where it comes from, who sends it, what
it is and how big.

A local server without keys is reachable by any web page the user opens (a `fetch` with a `text/plain` body
needs no preflight) and by DNS rebinding; a body is parsed before a route's own key check runs, so a
keyless client could make the server read and parse 100 MB. This ASGI middleware answers first:

- a `Host` other than loopback on a loopback-bound server: 403 (rebinding);
- an `Origin` that is not allowed (`ServeSettings.allowed_origins`): 403 (a web page);
- a request with a body but no valid key, where the server has keys: 401, before the body is read;
- a body that is not JSON (protobuf on forward_backward): 415;
- a body over `ServeSettings.max_request_bytes` (declared, or counted as it arrives): 413.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from nightlab.train.api.wire import PROTOBUF
from nightlab.train.settings import LOCAL_HOSTS, ServeSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON = "application/json"
_WITH_BODY = {"POST", "PUT", "PATCH"}
_PROTOBUF_PATHS = {"/api/v1/forward_backward"}


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _hostname(host: str) -> str:
    """`host[:port]` or `[v6]:port` without the port."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestGuards:
    """The checks above, in that order; `known_key(key)` says whether an API key is accepted."""

    def __init__(self, app: ASGIApp, settings: ServeSettings, known_key: Callable[[str], bool]):
        self.app, self.settings, self.known_key = app, settings, known_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self._check_headers(scope, headers)
            if scope["method"] in _WITH_BODY:
                receive = await self._bounded_body(receive)
        except Refused as refusal:
            await _refuse(send, refusal)
            return
        await self.app(scope, receive, send)

    def _check_headers(self, scope: Scope, headers: dict[str, str]) -> None:
        settings = self.settings
        host = _hostname(headers.get("host", ""))
        if settings.host in LOCAL_HOSTS and host not in LOCAL_HOSTS:
            raise Refused(
                403,
                f"Host {host!r} is not this server: it listens on {settings.host} and answers only requests "
                "addressed to localhost, 127.0.0.1 or [::1]",
            )
        origin = headers.get("origin")
        if origin is not None and origin not in settings.allowed_origins:
            raise Refused(
                403,
                f"requests from web pages (Origin {origin!r}) are refused; start the server with "
                "--allow-origin ORIGIN to accept one",
            )
        if scope["method"] not in _WITH_BODY:
            return
        if settings.api_keys and not self._has_valid_key(headers):
            raise Refused(401, "missing or unknown API key (X-API-Key, or Authorization: Bearer)")
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        wanted = PROTOBUF if scope["path"] in _PROTOBUF_PATHS else JSON
        if kind != wanted and headers.get("content-length") != "0":
            raise Refused(415, f"{scope['path']} takes a {wanted} body, not {kind or 'an untyped one'}")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > settings.max_request_bytes:
            raise Refused(413, self._too_big())

    def _has_valid_key(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key")
        return bool(key) and self.known_key(key)

    def _too_big(self) -> str:
        limit = self.settings.max_request_bytes
        return f"request body over the limit of {limit} bytes ({limit / 2**20:g} MiB; --max-request-mb)"

    async def _bounded_body(self, receive: Receive) -> Receive:
        """The body read here, at most `max_request_bytes` of it, handed to the app as one message; later
        calls (a streaming response waiting for a disconnect) go to the server as before."""
        limit, chunks, size = self.settings.max_request_bytes, [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay(message, receive)
            size += len(message.get("body", b""))
            if size > limit:
                raise Refused(413, self._too_big())
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                return _replay(whole, receive)


def _replay(first: Message, then: Receive) -> Receive:
    pending = [first]

    async def receive() -> Message:
        return pending.pop() if pending else await then()

    return receive


async def _refuse(send: Send, refusal: Refused) -> None:
    body = json.dumps({"error": str(refusal), "category": "user"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": refusal.status,
            "headers": [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
