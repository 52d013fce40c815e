"""The node process: the DICOM edge, the readiness loop and the outbox (``spine-node serve``).

With ``receivers = 1`` the SCP runs in this process; with more, this process accepts and hands
connections to that many receiving processes (node.handoff). Jobs go to the Celery broker, or,
with no ``broker_url``, to ``run_job`` on an in-process executor (embedded mode). With
``metrics_port`` it serves ``/metrics`` (its own, its receivers' and the database's) and
``/healthz`` (node.metrics).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from node.audit import local_actor, record_config
from node.config import Settings
from node.db import make_engine, make_sessionmaker, migrate
from node.dispatch import CeleryPublisher, EmbeddedPublisher, Outbox, Publisher
from node.handoff import Dispatcher, run_receiver
from node.metrics import DatabaseCollector, Exposition, database_check
from node.readiness import Readiness
from node.retention import Retention
from node.scp import start_scp
from node.store import InstanceStore, sweep_incoming
from node.web import start_web

LOGGER = logging.getLogger(__name__)

#: Longest sleep of the node's loop: bounds how late it sees studies and jobs of other processes.
MAX_POLL_S = 1.0
#: ``/healthz`` fails when the loop has not started a round for this long (a round takes well
#: under a second; a broker that does not answer costs it a few seconds).
LOOP_STALE_S = 15.0


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
    ``stop`` is set; with ``metrics_port``, serve ``/metrics`` and ``/healthz`` meanwhile.

    ``started`` is set once the port is open (the demo and embedding code wait on it).
    ``run_job`` runs one job by id in embedded mode (no ``broker_url``); the composition root
    passes the worker's.
    """
    if not settings.broker_url and run_job is None:
        raise ValueError("embedded mode (no broker_url) needs a job runner")
    exposition = Exposition() if settings.metrics_port else None  # before anything is counted, here or in receivers
    try:
        _serve(settings, stop, started, run_job, exposition)
    finally:
        if exposition is not None:
            exposition.close()


def _serve(settings: Settings, stop: threading.Event, started: threading.Event | None,
           run_job: Callable[[int], object] | None, exposition: Exposition | None) -> None:
    migrate(settings.database_url)
    sweep_incoming(settings.storage_dir)
    if not settings.allowed_callers:
        LOGGER.warning("allowed_callers is empty: every calling AE title and host is admitted")
    engine = make_engine(settings.database_url)
    health = NodeHealth(engine)
    if exposition is not None:  # a metrics port in use stops the node here, before any receiver starts
        exposition.serve(settings.host, settings.metrics_port, health, [DatabaseCollector(engine)])
    sessions = make_sessionmaker(engine)
    record_config(sessions, settings, local_actor("node"))  # the audit log notes changed settings at start
    web = start_web(settings, sessions) if settings.web_port else None  # a bad password file stops the node here too
    edge = Receiver(settings, engine) if settings.receivers == 1 else _start_receivers(settings)
    children = health.children = edge.processes if isinstance(edge, Dispatcher) else []
    readiness = Readiness(settings, sessions)
    retention = Retention(settings, sessions)
    wake = threading.Event()
    publisher = _publisher(settings, run_job, wake)
    outbox = Outbox(settings, sessions, publisher)
    if started is not None:
        started.set()
    poll = max(0.05, min(settings.quiet_period_s, MAX_POLL_S))
    database_lost = False
    try:
        while not stop.is_set():
            health.beat()
            try:
                wait = readiness.check()
                outbox.run_once()
                retention.run_if_due()
            except OperationalError as exc:  # the database is restarting or unreachable: go round again
                if not database_lost:
                    LOGGER.error("database unreachable; readiness and dispatch wait for it: %s", exc.orig)
                database_lost, wait = True, poll
            else:
                if database_lost:
                    LOGGER.info("database reachable again")
                database_lost = False
            _check_alive(children)
            wake.wait(poll if wait is None else min(max(wait, 0.05), poll))
            wake.clear()
    finally:
        LOGGER.info("stopping")
        if web is not None:
            web.shutdown()
        edge.close()
        publisher.close()
        for child in children:
            child.terminate()
        for child in children:
            child.join(40)
            if exposition is not None and child.pid is not None:
                exposition.process_ended(child.pid)
        engine.dispose()


class NodeHealth:
    """The node's ``/healthz``: the database answers, the loop (readiness, outbox) went round
    within ``stale_after_s``, and every receiving process is alive."""

    def __init__(self, engine: Engine, children: Sequence[BaseProcess] = (), stale_after_s: float = LOOP_STALE_S) -> None:
        self.engine, self.children, self.stale_after_s = engine, children, stale_after_s
        self._last_round: float | None = None

    def beat(self) -> None:
        """The loop starts a round."""
        self._last_round = time.monotonic()

    def __call__(self) -> dict[str, str]:
        return {"database": database_check(self.engine), "loop": self._loop(), "receivers": self._receivers()}

    def _loop(self) -> str:
        if self._last_round is None:
            return "not started"
        age = time.monotonic() - self._last_round
        return "ok" if age <= self.stale_after_s else f"no round for {age:.0f} s"

    def _receivers(self) -> str:
        gone = [f"{c.name} (exit code {c.exitcode})" for c in self.children if c.exitcode is not None]
        return f"exited: {', '.join(gone)}" if gone else "ok"


def _publisher(settings: Settings, run_job: Callable[[int], object] | None, wake: threading.Event) -> Publisher:
    """Celery when a broker is configured; else the embedded executor, which wakes the loop when
    a job ends so the job it wrote (a delivery) goes out at once."""
    if settings.broker_url:
        return CeleryPublisher(settings)
    assert run_job is not None
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
