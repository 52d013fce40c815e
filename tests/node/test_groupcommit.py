"""Group commit: callers block until their own item is committed, batches form under load."""

from __future__ import annotations

import threading

import pytest

from node.groupcommit import GroupCommitter
from tests.support.services import wait_for


def test_items_queued_behind_a_commit_share_the_next_batch() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def commit(batch: list[int]) -> list[int]:
        batches.append(batch)
        if batch == [0]:
            gate.wait(10)  # hold the first batch while the others queue up
        return [item * 10 for item in batch]

    committer: GroupCommitter[int, int] = GroupCommitter(commit)
    results: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i: results.update({i: committer.submit(i).result()})) for i in range(6)]
    threads[0].start()
    wait_for(lambda: batches, 10, "the first batch")
    for thread in threads[1:]:
        thread.start()
    wait_for(lambda: committer._queue.qsize() == 5, 10, "five queued items")
    gate.set()
    for thread in threads:
        thread.join(10)
    committer.close()
    assert results == {i: i * 10 for i in range(6)}
    assert batches[0] == [0] and sorted(batches[1]) == [1, 2, 3, 4, 5]


def test_a_failing_item_fails_only_its_own_caller() -> None:
    def commit(batch: list[int]) -> list[int]:
        if 13 in batch:
            raise ValueError("unlucky")
        return batch

    committer: GroupCommitter[int, int] = GroupCommitter(commit)
    assert committer.submit(1).result() == 1
    with pytest.raises(ValueError, match="unlucky"):
        committer.submit(13).result()
    assert committer.submit(2).result() == 2
    committer.close()


def test_a_failing_batch_is_retried_item_by_item() -> None:
    gate = threading.Event()
    sizes: list[int] = []

    def commit(batch: list[int]) -> list[int]:
        sizes.append(len(batch))
        if batch == [0]:
            gate.wait(10)
        if 13 in batch:
            raise ValueError("unlucky")
        return batch

    committer: GroupCommitter[int, int] = GroupCommitter(commit)
    outcomes: dict[int, object] = {}

    def submit(item: int) -> None:
        try:
            outcomes[item] = committer.submit(item).result()
        except ValueError as exc:
            outcomes[item] = exc

    first = threading.Thread(target=submit, args=(0,))
    first.start()
    wait_for(lambda: sizes, 10, "the first batch")
    others = [threading.Thread(target=submit, args=(i,)) for i in (13, 2, 3)]
    for thread in others:
        thread.start()
    wait_for(lambda: committer._queue.qsize() == 3, 10, "three queued items")
    gate.set()
    for thread in [first, *others]:
        thread.join(10)
    committer.close()
    assert sizes == [1, 3, 1, 1, 1]
    assert (outcomes[0], outcomes[2], outcomes[3]) == (0, 2, 3) and isinstance(outcomes[13], ValueError)
