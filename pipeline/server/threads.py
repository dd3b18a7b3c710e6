"""One hop from the event loop to a thread, at a third of what anyio's costs.

Blocking work (a token's lookup, a batch's checks) leaves the event loop through
``loop.run_in_executor`` on the loop's own pool. Starlette's ``run_in_threadpool``
goes through anyio, whose capacity limiter, cancel scope and event-loop lookup cost
the loop more than a cheap lookup itself does; ingest pays a hop twice a batch.

Unlike anyio's, a hop given up (its request cancelled) lets the thread finish
unwatched: nothing run this way may leave half its work for the caller to finish.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["in_thread"]

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in the event loop's thread pool."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))
