"""Call an ASGI app in-process (no server, no Ray, no httpx): one request, its answer, and
how many body chunks the app pulled, so tests can tell a body was not read whole."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # parsed JSON, or the raw bytes when it is not JSON
    chunks_read: int  # http.request messages the app received
    crashed: BaseException | None  # what escaped the app (a 500 from the error middleware)


async def _call(app: Any, method: str, path: str, headers: dict[str, str],
                chunks: Iterator[bytes]) -> Answer:
    pending = next(chunks, b"")  # an empty body still arrives as one message
    read = 0

    async def receive() -> dict[str, Any]:
        nonlocal pending, read
        if pending is None:  # the body is over; a further read means the client left
            return {"type": "http.disconnect"}
        body, pending = pending, next(chunks, None)
        read += 1
        return {"type": "http.request", "body": body, "more_body": pending is not None}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path,
             "raw_path": path.encode("utf-8", "surrogateescape"), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                         for k, v in headers.items()]}
    crashed = None
    try:
        await app(scope, receive, send)
    except Exception as err:  # Starlette answers 500, then re-raises for the server to log
        crashed = err
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    raw = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = raw
    return Answer(start["status"] if start else 0, body, read, crashed)


def call(app: Any, method: str, path: str, *, body: bytes | Iterable[bytes] = b"",
         headers: dict[str, str] | None = None, chunked: bool = False,
         timeout_s: float = 60) -> Answer:
    """One request. A `bytes` body is sent whole with its Content-Length unless `chunked`;
    an iterable of chunks is sent chunk by chunk without one (as chunked encoding arrives).
    Past `timeout_s` the call fails (a hang is a bug)."""
    headers = dict(headers or {})
    if isinstance(body, bytes):
        if not chunked:
            headers.setdefault("content-length", str(len(body)))
        chunks: Iterator[bytes] = iter([body])
    else:
        chunks = iter(body)
    return asyncio.run(asyncio.wait_for(_call(app, method, path, headers, chunks), timeout_s))
