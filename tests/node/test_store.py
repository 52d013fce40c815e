"""The store's ordering (rows are prepared while the file is written, committed only once it is
durable) and the lock that queues SQLite writers across receiving processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import Engine, func, select

import node.store
from node.config import load_settings
from node.db import make_engine, migrate, writer_lock
from node.store import INSTANCES, InstanceStore, Stored
from tests.support.dicomgen import make_study
from tests.support.services import wait_for


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> Iterator[tuple[InstanceStore, Engine]]:
    """An instance store on an empty database of each kind."""
    migrate(database_url)
    engine = make_engine(database_url)
    settings = load_settings(database_url=database_url, storage_dir=tmp_path / "storage", min_free_disk_mb=0)
    instances = InstanceStore(settings, engine)
    yield instances, engine
    instances.close()
    engine.dispose()


def _indexed(engine: Engine) -> int:
    """Committed instance rows, read without waiting for a writer (a WAL snapshot on SQLite)."""
    with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
        return int(conn.scalar(select(func.count()).select_from(INSTANCES)) or 0)


def _store(instances: InstanceStore, path: Path) -> Stored:
    ds = dcmread(path)
    return instances.store(ds, path.read_bytes(), ds.file_meta.TransferSyntaxUID, "TESTSCU")


def _renamed_into(directory: Path) -> bool:
    """Whether an instance file has been renamed into this directory (a series folder)."""
    return any(directory.glob("*.dcm"))


def _held_fsync_dir(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make the first directory fsync after an instance's rename wait for a gate; returns (entered, gate)."""
    entered, gate = threading.Event(), threading.Event()
    real = node.store.fsync_dir

    def held(directory: Path) -> None:
        if _renamed_into(directory) and not entered.is_set():
            entered.set()
            gate.wait(30)
        real(directory)

    monkeypatch.setattr(node.store, "fsync_dir", held)
    return entered, gate


def test_a_row_is_committed_only_after_its_file_is_durable(store: tuple[InstanceStore, Engine], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """While an instance's directory fsync is held, its row is prepared but nobody sees it; once the
    fsync completes the row is committed and the file is in place."""
    instances, engine = store
    path = make_study(tmp_path / "study", roles=("T2_SAG",), slices=1).files[0]
    entered, gate = _held_fsync_dir(monkeypatch)
    outcome: list[Stored] = []
    writer = threading.Thread(target=lambda: outcome.append(_store(instances, path)))
    writer.start()
    assert entered.wait(30), "the store never reached the directory fsync"
    assert _indexed(engine) == 0 and not outcome
    gate.set()
    writer.join(30)
    assert outcome and not outcome[0].duplicate
    assert _indexed(engine) == 1
    assert (instances.storage_dir / outcome[0].identifiers.relative_path()).read_bytes() == path.read_bytes()


def test_a_failed_write_leaves_nothing_and_the_next_instance_is_stored(store: tuple[InstanceStore, Engine], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory fsync after the rename that fails (an I/O error) rolls the prepared row back and
    removes the file; the commit thread goes on with the next instance."""
    instances, engine = store
    first, second = make_study(tmp_path / "study", roles=("T2_SAG",), slices=2).files
    real = node.store.fsync_dir
    failed: list[Path] = []

    def failing_once(directory: Path) -> None:
        if _renamed_into(directory) and not failed:
            failed.append(directory)
            raise OSError(5, "Input/output error")
        real(directory)

    monkeypatch.setattr(node.store, "fsync_dir", failing_once)
    with pytest.raises(OSError, match="Input/output error"):
        _store(instances, first)
    assert failed and _indexed(engine) == 0
    assert not [p for p in instances.storage_dir.rglob("*") if p.is_file()]
    assert not _store(instances, second).duplicate
    assert _indexed(engine) == 1


def test_a_stalled_write_fails_its_instance_without_stopping_the_commits(store: tuple[InstanceStore, Engine], tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler whose disk stalls past ON_DISK_TIMEOUT_S loses its instance (no row, no file); a
    second instance arriving meanwhile is committed."""
    instances, engine = store
    first, second = make_study(tmp_path / "study", roles=("T2_SAG",), slices=2).files
    monkeypatch.setattr(node.store, "ON_DISK_TIMEOUT_S", 0.2)
    entered, gate = _held_fsync_dir(monkeypatch)
    failures: list[BaseException] = []

    def stalled() -> None:
        try:
            _store(instances, first)
        except BaseException as exc:
            failures.append(exc)

    writer = threading.Thread(target=stalled)
    writer.start()
    assert entered.wait(30)
    assert not _store(instances, second).duplicate  # committed while the first is still stalled
    assert _indexed(engine) == 1
    gate.set()
    writer.join(30)
    wait_for(lambda: failures, 30, "the stalled instance to fail")
    assert isinstance(failures[0], TimeoutError)
    assert _indexed(engine) == 1
    files = [p for p in instances.storage_dir.rglob("*.dcm") if ".incoming" not in p.parts]
    assert len(files) == 1 and files[0].read_bytes() == second.read_bytes()


def test_sqlite_writers_of_two_processes_queue_on_one_lock(tmp_path: Path) -> None:
    """The commit threads of two receiving processes take the database's writer lock in turn: a
    waiter is blocked while another process holds it and gets it as soon as it is released; no
    descriptor is left open after a use."""
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "node.db.writers")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "held"
        descriptors = len(os.listdir("/proc/self/fd"))
        entered = threading.Event()

        def take() -> None:
            with writer_lock(engine):
                entered.set()

        waiter = threading.Thread(target=take)
        waiter.start()
        assert not entered.wait(0.5), "the lock was taken while another process held it"
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert entered.wait(10)
        waiter.join(10)
        assert len(os.listdir("/proc/self/fd")) == descriptors
    finally:
        holder.kill()
        holder.wait(10)
    assert isinstance(writer_lock(make_engine("sqlite://")), nullcontext)
    assert isinstance(writer_lock(make_engine("postgresql://nobody@127.0.0.1:1/none")), nullcontext)


HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
"""
