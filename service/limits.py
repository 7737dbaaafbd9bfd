"""Request body size limits (413), enforced while the body streams in.

A declared ``Content-Length`` over the limit is refused before a byte is read; a chunked body
is counted as it arrives and refused the moment it crosses the limit, so an oversized upload
never fills the disk. Pure ASGI, so it also guards bodies parsed by Starlette's form parser.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.problems import PROBLEM_MEDIA_TYPE

#: (method, path) → limit in bytes; everything else gets the default.
LimitFor = Callable[[str, str], int]


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` when a streamed body crosses its limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit:,} bytes")


class BodySizeLimitMiddleware:
    """Refuse request bodies larger than ``limit_for(method, path)`` bytes with a 413."""

    def __init__(self, app: ASGIApp, limit_for: LimitFor) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_413(scope, send, limit)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        await self.app(scope, counting_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(scope: Scope, send: Send, limit: int) -> None:
    body = json.dumps(
        {
            "type": "urn:camres:problem:content-too-large",
            "title": "Content Too Large",
            "status": 413,
            "detail": f"request body exceeds the limit of {limit:,} bytes",
            "instance": scope["path"],
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
                # The client may still be sending; tell it the connection will not be reused.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
