"""Group commit: concurrent callers share one commit, each answered when that commit is done.

A write transaction and an fsync cost about the same for one batch as for a
hundred, so while one commit runs, the items that arrive meanwhile queue up and
the next commit takes them all. A committer thread runs while there is work,
group after group, and ends when the queue is empty: a lone item commits at once,
a busy stream in larger groups. Callers wait on a future, so a waiting caller holds
no thread (the API awaits it on its event loop) and wakes only for its own answer;
a blocking caller that finds no commit running commits its own group itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

_T = TypeVar("_T")
_R = TypeVar("_R")


class GroupCommit(Generic[_T, _R]):
    """Commit items in groups with ``commit``, which returns one result per item, in order; an
    exception as an item's result is that item's error alone.

    If ``commit`` raises, every item of its group gets that error (``commit`` must then
    have written nothing, or only what a retry of the same items finds and skips).
    """

    def __init__(self, commit: Callable[[Sequence[_T]], Sequence[_R | Exception]], *, max_group: int = 256) -> None:
        self._commit = commit
        self._max_group = max_group
        self._lock = threading.Lock()
        self._queue: list[tuple[_T, Future[_R]]] = []
        self._committing = False

    def enqueue(self, item: _T) -> Future[_R]:
        """Queue ``item`` for the next group; its future holds the result (or the error) once that group's
        commit is done."""
        future, idle = self._queued(item)
        if idle:
            self._committer()
        return future

    def submit(self, item: _T) -> _R:
        """Commit ``item`` with whatever else is queued; its result once the shared commit is done.

        A caller that finds no commit running commits its own group in its thread (a lone caller,
        as in-process ingest is, pays no thread hop), then leaves what queued meanwhile to a
        committer thread.

        :raises Exception: whatever the group's ``commit`` raised
        """
        future, idle = self._queued(item)
        if idle:
            self._commit_next()
            with self._lock:
                more = self._committing = bool(self._queue)
            if more:
                self._committer()
        return future.result()

    def _queued(self, item: _T) -> tuple[Future[_R], bool]:
        """Queue ``item``; its future, and whether no commit was running (the caller must start one)."""
        future: Future[_R] = Future()
        with self._lock:
            self._queue.append((item, future))
            idle, self._committing = not self._committing, True
        return future, idle

    def _committer(self) -> None:
        threading.Thread(target=self._run, name="group-commit", daemon=True).start()

    def _run(self) -> None:
        """Commit group after group, the oldest first, until the queue is empty."""
        while self._commit_next():
            pass

    def _commit_next(self) -> bool:
        """Commit the next group and answer its members; ``False`` when none was queued (no commit runs now)."""
        with self._lock:
            group, self._queue = self._queue[: self._max_group], self._queue[self._max_group :]
            if not group:
                self._committing = False
                return False
        # a caller gone (its request cancelled) has no use for its item; the rest can no longer be cancelled
        group = [(item, future) for item, future in group if future.set_running_or_notify_cancel()]
        if not group:
            return True
        try:
            answered = list(zip(group, self._commit([item for item, _future in group]), strict=True))
        except BaseException as exc:  # every member hears of it; the next group starts afresh
            for _item, future in group:
                future.set_exception(exc)
        else:
            for (_item, future), result in answered:
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        return True
