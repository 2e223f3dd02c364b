"""What the server checks before it reads a request's body: the API key and the body's size.

FastAPI reads and parses a body before it runs a route's dependencies, so a key check written as
a dependency comes after a 100 MB body has been read. This ASGI middleware answers 401 from the
headers alone, and 413 from ``Content-Length`` (or, for a chunked body, as soon as the bytes
received pass the limit), before the application sees the request.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from vlmlab.config import ServerSettings
from vlmlab.protocol.errors import AuthenticationError, PayloadTooLargeError, VlmlabError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

KEY_HELP = "missing or wrong API key: send 'Authorization: Bearer <key>'"


def key_is_valid(authorization: str, expected: str) -> bool:
    """Constant-time comparison of a Bearer token with the expected key."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())


def needs_key(path: str, settings: ServerSettings) -> bool:
    """The routes behind the API key: the OpenAI API, /tokenize and /views, and with
    ``auth_stats`` also /stats and /metrics. /health stays open for load balancers."""
    if path.startswith("/v1/") or path in ("/tokenize", "/views"):
        return True
    return settings.auth_stats and path in ("/stats", "/metrics")


class RequestGuard:
    """ASGI middleware: the key and the size limit, checked before the body is read."""

    def __init__(self, app: ASGIApp, settings: ServerSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # When the request arrived: the route subtracts it from its own start, which gives the
        # time to receive, parse and validate the body (the "http" stage of a response's timings).
        scope.setdefault("state", {})["received"] = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        expected = self.settings.api_key
        if expected and needs_key(scope["path"], self.settings):
            if not key_is_valid(headers.get("authorization", ""), expected):
                await reply(send, AuthenticationError(KEY_HELP))
                return
        limit = self.settings.max_request_bytes
        too_large = PayloadTooLargeError(
            f"the request body is larger than this server's limit of {limit:,} bytes "
            "(vlmlab serve --max-request-bytes); send smaller or fewer images, or image URLs",
            param="messages",
        )
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > limit:
                await reply(send, too_large)
                return
            await self.app(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE", "TRACE"):
            await self.app(scope, receive, send)
            return
        # A chunked body states no length: take it in here, up to the limit, and replay it.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                await reply(send, too_large)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def reply(send: Send, error: VlmlabError) -> None:
    """An error response in OpenAI's shape, sent straight from the middleware."""
    body = json.dumps(error.to_openai()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(error, AuthenticationError):
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
