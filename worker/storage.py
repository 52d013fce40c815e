"""Where a worker reads a study's instances and writes the result objects: one small interface,
so that an object store can replace the shared volume the node writes to without touching the
pipeline."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from node.store import INCOMING, fsync_dir, write_durably


class StorageUnavailable(OSError):
    """The store cannot be reached at all (volume not mounted): a transient error, retried."""


class InstanceStorage(Protocol):
    """Gives local files for instances stored under ``storage_dir``-relative paths."""

    def local_files(self, relative_paths: Sequence[str]) -> AbstractContextManager[list[Path]]:
        """Local paths of the instances, valid inside the ``with`` block (an object store would
        download them to a temporary folder and delete it afterwards)."""
        ...

    def save(self, relative_path: str, data: bytes) -> None:
        """Store ``data`` durably at ``relative_path`` (written, fsynced, renamed into place)."""
        ...


class SharedVolume:
    """The node's ``storage_dir``, seen by the worker on the same disk or a shared mount."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextmanager
    def local_files(self, relative_paths: Sequence[str]) -> Iterator[list[Path]]:
        if not self.root.is_dir():
            raise StorageUnavailable(f"storage_dir {self.root} is not there (is the shared volume mounted?)")
        yield [self.root / p for p in relative_paths]

    def save(self, relative_path: str, data: bytes) -> None:
        path = self.root / relative_path
        incoming = self.root / INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        write_durably(path, data, incoming)
        fsync_dir(path.parent)
