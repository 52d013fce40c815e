"""The node process: the DICOM edge, the readiness loop and the outbox (``spine-node serve``).

With ``receivers = 1`` the SCP runs in this process; with more, this process accepts and hands
connections to that many receiving processes (node.handoff). Jobs go to the Celery broker, or,
with no ``broker_url``, to ``run_job`` on an in-process executor (embedded mode).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db import make_engine, make_sessionmaker, migrate
from node.dispatch import CeleryPublisher, EmbeddedPublisher, Outbox, Publisher
from node.handoff import Dispatcher, run_receiver
from node.jobs import requeue_local
from node.readiness import Readiness
from node.scp import start_scp
from node.store import InstanceStore, sweep_incoming

LOGGER = logging.getLogger(__name__)

#: Longest sleep of the node's loop: bounds how late it sees studies and jobs of other processes.
MAX_POLL_S = 1.0


class Receiver:
    """One receiving SCP with its store, in this process; ``close`` drains and stops both."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.store = InstanceStore(settings, engine)
        self.server = start_scp(settings, self.store)

    def close(self) -> None:
        self.server.stop()
        self.store.close()


def serve(settings: Settings, stop: threading.Event, started: threading.Event | None = None,
          run_job: Callable[[int], object] | None = None) -> None:
    """Migrate, start ``settings.receivers`` receivers, and run readiness and the outbox until
    ``stop`` is set.

    ``started`` is set once the port is open (the demo and embedding code wait on it).
    ``run_job`` runs one job by id in embedded mode (no ``broker_url``); the composition root
    passes the worker's.
    """
    if not settings.broker_url and run_job is None:
        raise ValueError("embedded mode (no broker_url) needs a job runner")
    migrate(settings.database_url)
    sweep_incoming(settings.storage_dir)
    if not settings.allowed_callers:
        LOGGER.warning("allowed_callers is empty: every calling AE title and host is admitted")
    engine = make_engine(settings.database_url)
    edge = Receiver(settings, engine) if settings.receivers == 1 else _start_receivers(settings)
    children = edge.processes if isinstance(edge, Dispatcher) else []
    sessions = make_sessionmaker(engine)
    readiness = Readiness(settings, sessions)
    wake = threading.Event()
    publisher = _publisher(settings, sessions, run_job, wake)
    outbox = Outbox(settings, sessions, publisher)
    if started is not None:
        started.set()
    poll = max(0.05, min(settings.quiet_period_s, MAX_POLL_S))
    try:
        while not stop.is_set():
            wait = readiness.check()
            outbox.run_once()
            _check_alive(children)
            wake.wait(poll if wait is None else min(max(wait, 0.05), poll))
            wake.clear()
    finally:
        LOGGER.info("stopping")
        edge.close()
        publisher.close()
        for child in children:
            child.terminate()
        for child in children:
            child.join(40)
        engine.dispose()


def _publisher(settings: Settings, sessions: sessionmaker[Session], run_job: Callable[[int], object] | None,
               wake: threading.Event) -> Publisher:
    """Celery when a broker is configured; else the embedded executor, which wakes the loop when
    a job ends so the job it wrote (a delivery) goes out at once."""
    if settings.broker_url:
        return CeleryPublisher(settings)
    assert run_job is not None
    if requeue_local(sessions):
        LOGGER.info("jobs handed to the previous process's embedded worker are pending again")
    return EmbeddedPublisher(run_job, done=wake.set)


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
