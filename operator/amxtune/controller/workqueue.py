"""Keys of jobs to reconcile, shared by the watch handlers, the resync and the workers.

Many watch events for one job (its pods are created, scheduled, become ready) collapse into one
reconcile: a key is at most once in the queue, never processed by two workers at once, and a
key added while it is processed is processed once more afterwards, so no change is missed
(the semantics of client-go's workqueue, which controller-runtime operators use).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

Key = TypeVar("Key")


class WorkQueue(Generic[Key]):
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._order: deque[Key] = deque()
        self._queued: set[Key] = set()
        self._active: set[Key] = set()
        self._again: set[Key] = set()
        self._closed = False

    def add(self, key: Key) -> None:
        with self._changed:
            if key in self._active:
                self._again.add(key)
            elif key not in self._queued:
                self._queued.add(key)
                self._order.append(key)
                self._changed.notify()

    def get(self, timeout: float | None = None) -> Key | None:
        """The next key, now being processed until `done(key)`; None once closed or after
        `timeout` seconds with nothing queued."""
        with self._changed:
            while not self._order:
                if self._closed or not self._changed.wait(timeout):
                    return None
            key = self._order.popleft()
            self._queued.discard(key)
            self._active.add(key)
            return key

    def done(self, key: Key) -> None:
        with self._changed:
            self._active.discard(key)
            if key in self._again:
                self._again.discard(key)
                self.add(key)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def __len__(self) -> int:
        with self._changed:
            return len(self._order)
