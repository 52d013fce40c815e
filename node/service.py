"""The node process: receivers on the DICOM port plus the readiness loop (``spine-node serve``)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Sequence
from multiprocessing.process import BaseProcess

from sqlalchemy import Engine

from node.config import Settings
from node.db import make_engine, make_sessionmaker, migrate
from node.readiness import Readiness
from node.scp import start_scp
from node.store import InstanceStore, sweep_incoming

LOGGER = logging.getLogger(__name__)

#: Longest sleep of the readiness loop: bounds how late it sees studies from other processes.
MAX_POLL_S = 2.0


class Receiver:
    """One receiving SCP with its store, in this process; ``close`` drains and stops both."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.store = InstanceStore(settings, engine)
        self.server = start_scp(settings, self.store)

    def close(self) -> None:
        self.server.stop()
        self.store.close()


def receive_until(settings: Settings, stop: threading.Event) -> None:
    """Run one receiver with its own engine until ``stop`` is set."""
    engine = make_engine(settings.database_url)
    try:
        receiver = Receiver(settings, engine)
        stop.wait()
        receiver.close()
    finally:
        engine.dispose()


def _receiver_process(settings: Settings, parent_pid: int) -> None:
    """Entry point of an extra receiving process; it ends on SIGTERM or when its parent dies."""
    configure_logging(settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch_parent() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent_pid:
                stop.set()

    threading.Thread(target=watch_parent, daemon=True).start()
    receive_until(settings, stop)


def serve(settings: Settings, stop: threading.Event, started: threading.Event | None = None) -> None:
    """Migrate, start ``settings.receivers`` receivers, and run readiness until ``stop`` is set.

    ``started`` is set once the port is open (the demo and embedding code wait on it).
    """
    migrate(settings.database_url)
    sweep_incoming(settings.storage_dir)
    if not settings.allowed_callers:
        LOGGER.warning("allowed_callers is empty: every calling AE title and host is admitted")
    engine = make_engine(settings.database_url)
    receiver = Receiver(settings, engine)
    spawn = multiprocessing.get_context("spawn")
    children = [
        spawn.Process(target=_receiver_process, args=(settings, os.getpid()), name=f"receiver-{i}", daemon=True)
        for i in range(1, settings.receivers)
    ]
    for child in children:
        child.start()
    readiness = Readiness(settings, make_sessionmaker(engine))
    if started is not None:
        started.set()
    poll = max(0.05, min(settings.quiet_period_s, MAX_POLL_S))
    try:
        while not stop.is_set():
            wait = readiness.check()
            _check_alive(children)
            stop.wait(poll if wait is None else min(max(wait, 0.05), poll))
    finally:
        LOGGER.info("stopping")
        for child in children:
            child.terminate()
        receiver.close()
        for child in children:
            child.join(10)
        engine.dispose()


def _check_alive(children: Sequence[BaseProcess]) -> None:
    """A receiving process that died takes the node down, so its supervisor restarts it whole."""
    for child in children:
        if child.exitcode is not None:
            raise RuntimeError(f"receiving process {child.name} exited with {child.exitcode}; stopping the node")


def configure_logging(level: str) -> None:
    """Plain, timestamped log lines; pynetdicom's chatter (which may echo headers) kept at WARNING."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
