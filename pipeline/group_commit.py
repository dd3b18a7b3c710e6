"""Group commit: concurrent callers share one commit, each answered when that commit is done.

A write transaction and an fsync cost about the same for one batch as for a
hundred, so while one commit runs, the batches that arrive meanwhile queue up
and the next caller to find no commit running takes them all in one (the
*leader*); the others wait for their group's outcome. No thread of its own and
no timer: a lone caller commits at once, and a busy one commits in larger groups.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass
class _Waiter(Generic[_T, _R]):
    item: _T
    done: bool = False
    result: _R | None = None
    error: BaseException | None = None


class GroupCommit(Generic[_T, _R]):
    """Commit items in groups with ``commit``, which returns one result per item, in order.

    If ``commit`` raises, every item of its group gets that error (``commit`` must then
    have written nothing, or only what a retry of the same items finds and skips).
    """

    def __init__(self, commit: Callable[[Sequence[_T]], Sequence[_R]], *, max_group: int = 256) -> None:
        self._commit = commit
        self._max_group = max_group
        self._cond = threading.Condition()
        self._queue: list[_Waiter[_T, _R]] = []
        self._committing = False

    def submit(self, item: _T) -> _R:
        """Commit ``item`` with whatever else is queued; its result once the shared commit is done.

        :raises Exception: whatever the group's ``commit`` raised
        """
        waiter: _Waiter[_T, _R] = _Waiter(item)
        with self._cond:
            self._queue.append(waiter)
        while True:
            with self._cond:
                while not waiter.done and self._committing:
                    self._cond.wait()
                if waiter.done:
                    break
                # no commit running and ours not taken: lead the next group (the oldest first)
                group, self._queue = self._queue[: self._max_group], self._queue[self._max_group :]
                self._committing = True
            self._lead(group)
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[return-value]  # done without error: set by the leader

    def _lead(self, group: list[_Waiter[_T, _R]]) -> None:
        try:
            for w, result in zip(group, self._commit([w.item for w in group]), strict=True):
                w.result = result
        except BaseException as exc:  # every member hears of it, the leader re-raises it as its own
            for w in group:
                w.error = exc
        finally:  # whatever happened, the group is answered and the next leader may start
            with self._cond:
                for w in group:
                    w.done = True
                self._committing = False
                self._cond.notify_all()
