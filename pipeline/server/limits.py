"""Fair share of the control plane: per-key rates and concurrency, and write slots handed out in turn.

One tenant's flood must delay only that tenant. Three pieces do it:

- :class:`RateLimit` (a token bucket per key) bounds how often an account, a token
  or a member may ask;
- :class:`Concurrency` bounds how many requests of one key are in flight at once;
- :class:`FairSlots` hands the few write slots of a process to the waiting
  accounts in turn (round robin), so a batch of a quiet account waits for at
  most one batch of each busy one, never for a busy account's whole queue.

Over a limit the caller answers 429 with ``Retry-After`` (:func:`too_many`).
The state lives in this process: several ``serve`` processes each apply the limits.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

from fastapi import HTTPException

__all__ = ["Concurrency", "FairSlots", "RateLimit", "too_many"]

#: a key whose bucket is full again is forgotten once this many keys are held
_PRUNE_AT = 10_000


def too_many(detail: str, retry_after: float) -> HTTPException:
    """A 429 telling the caller how many whole seconds to wait."""
    return HTTPException(429, detail, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class RateLimit:
    """At most ``count`` events per ``period`` seconds per key, in bursts of up to ``count`` (a token bucket)."""

    def __init__(self, count: int, period: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity, self.refill, self.clock = float(count), count / period, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()  # taken from the event loop and from sync handlers in the thread pool

    def take(self, key: str) -> float:
        """Count one event of ``key``: 0 when allowed, else the seconds until it would be."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self.refill)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return (1 - tokens) / self.refill
            self._buckets[key] = (tokens - 1, now)
            if len(self._buckets) > _PRUNE_AT:
                self._prune(now)
            return 0.0

    def _prune(self, now: float) -> None:
        for key, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.refill >= self.capacity:
                del self._buckets[key]


class Concurrency:
    """At most ``limit`` requests per key in flight (a lock: a streamed answer ends on a worker thread)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> bool:
        """Take a place of ``key``; whether there was one (then :meth:`release` it)."""
        with self._lock:
            held = self._in_flight.get(key, 0)
            if held >= self.limit:
                return False
            self._in_flight[key] = held + 1
            return True

    def release(self, key: str) -> None:
        with self._lock:
            left = self._in_flight[key] - 1
            if left:
                self._in_flight[key] = left
            else:
                del self._in_flight[key]

    @contextmanager
    def hold(self, key: str) -> Iterator[bool]:
        """Yields whether ``key`` got a place; the place is held until the block ends."""
        got = self.acquire(key)
        try:
            yield got
        finally:
            if got:
                self.release(key)


class FairSlots:
    """``slots`` places to write, handed to waiting keys in turn; each key's waiters in arrival order."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        """Hold one slot for the block, after the other keys' turns."""
        if self._free and not self._waiting:
            self._free -= 1
        else:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(key, deque()).append(turn)
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # handed a slot as it was cancelled: pass it on
                    self._release()
                else:
                    self._forget(key, turn)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            key, queue = next(iter(self._waiting.items()))
            turn = queue.popleft()
            if queue:
                self._waiting.move_to_end(key)  # the next turn goes to another key
            else:
                del self._waiting[key]
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1

    def _forget(self, key: str, turn: asyncio.Future[None]) -> None:
        queue = self._waiting.get(key)
        if queue is not None and turn in queue:
            queue.remove(turn)
            if not queue:
                del self._waiting[key]
