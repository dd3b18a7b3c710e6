"""The floor under ``POST /v1/ingest``: an ASGI app that reads the body and answers 202, on uvicorn as ``serve``
runs it (h11, no access log, no lifespan). ``python -m benchmarks.asgi_floor`` prints its URL, then serves.

What the HTTP server and the load generator cost per request on this machine, with none of the
pipeline's work: the most any ingest path behind this server could take here.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

_ANSWER = json.dumps({"batch_id": "0" * 32, "records": 50, "duplicate": False}).encode()


async def app(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """Read the whole body, answer 202 with a body the size of the ingest's."""
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(_ANSWER)).encode())]
    await send({"type": "http.response.start", "status": 202, "headers": headers})
    await send({"type": "http.response.body", "body": _ANSWER})


def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_config=None, access_log=False, server_header=False, lifespan="off", http="h11")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
