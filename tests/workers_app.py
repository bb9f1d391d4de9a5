"""A bare ASGI app for the tests of ``serve --workers``' supervisor: every path answers the worker's process ID, and
``/hang`` blocks its event loop for an hour first (a worker stuck in a call that never returns)."""

from __future__ import annotations

import os
import time


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/hang":
        time.sleep(3600)
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
