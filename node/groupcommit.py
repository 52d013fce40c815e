"""Group commit: many threads hand in items, one thread makes each batch durable at once.

With several associations receiving in one process, each instance would otherwise pay its own
database commit; batching pays it once per batch, and every caller still learns only after its
own item is durable. Callers get a future, so they can do their own part (write the file) while
the batch is being prepared.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

LOGGER = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class GroupCommitter(Generic[T, R]):
    """Runs ``commit(batch) -> results`` (one result per item, in order) on a thread of its own.

    A failed batch is retried item by item, so one bad item fails only its own caller.
    """

    def __init__(self, commit: Callable[[list[T]], list[R]], name: str = "group-commit", max_batch: int = 64) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._commit = commit
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[T, Future[R]] | None] = queue.SimpleQueue()
        self.closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future[R]:
        """Hand in ``item``; the future resolves once its batch is committed, or with its failure."""
        if self.closed:
            raise RuntimeError("the committer is closed")
        future: Future[R] = Future()
        self._queue.put((item, future))
        return future

    def close(self) -> None:
        """Commit what is queued, then stop the thread; later submits raise RuntimeError."""
        self.closed = True
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._settle(batch)
                    return
                batch.append(more)
            self._settle(batch)

    def _settle(self, batch: list[tuple[T, Future[R]]]) -> None:
        try:
            results = self._commit([item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            LOGGER.warning("a batch of %d failed; committing its items one by one", len(batch))
            for one in batch:
                self._settle([one])
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)

