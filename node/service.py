"""The node process: the DICOM edge plus the readiness loop (``spine-node serve``).

With ``receivers = 1`` the SCP runs in this process; with more, this process accepts and hands
connections to that many receiving processes (node.handoff).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Sequence
from multiprocessing.process import BaseProcess

from sqlalchemy import Engine

from node.config import Settings
from node.db import make_engine, make_sessionmaker, migrate
from node.handoff import Dispatcher, run_receiver
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


def serve(settings: Settings, stop: threading.Event, started: threading.Event | None = None) -> None:
    """Migrate, start ``settings.receivers`` receivers, and run readiness until ``stop`` is set.

    ``started`` is set once the port is open (the demo and embedding code wait on it).
    """
    migrate(settings.database_url)
    sweep_incoming(settings.storage_dir)
    if not settings.allowed_callers:
        LOGGER.warning("allowed_callers is empty: every calling AE title and host is admitted")
    engine = make_engine(settings.database_url)
    edge = Receiver(settings, engine) if settings.receivers == 1 else _start_receivers(settings)
    children = edge.processes if isinstance(edge, Dispatcher) else []
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
        edge.close()
        for child in children:
            child.terminate()
        for child in children:
            child.join(40)
        engine.dispose()


def _start_receivers(settings: Settings) -> Dispatcher:
    """``settings.receivers`` receiving processes behind one dispatcher in this process."""
    spawn = multiprocessing.get_context("spawn")
    receivers = []
    for index in range(1, settings.receivers + 1):
        ours, theirs = spawn.Pipe()
        process = spawn.Process(target=run_receiver, args=(settings, theirs, os.getpid()), name=f"receiver-{index}",
                                daemon=True)
        process.start()
        theirs.close()
        receivers.append((process, ours))
    return Dispatcher(settings, receivers)


def _check_alive(children: Sequence[BaseProcess]) -> None:
    """A receiving process that died takes the node down, so its supervisor restarts it whole."""
    for child in children:
        if child.exitcode is not None:
            raise RuntimeError(f"receiving process {child.name} exited with {child.exitcode}; stopping the node")
