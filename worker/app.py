"""The Celery app of ``spine-node worker``: queues ``grade`` (GPU) and ``deliver`` (network).

Each task takes a job id and runs it through :class:`worker.tasks.Context`; the job row, not
Celery, holds the job's state, attempts and backoff. Celery's part is at-least-once delivery:
late acknowledgement, messages of killed processes given back, and time limits.

With ``worker_metrics_port`` the worker's main process serves ``/metrics`` (what its pool
processes counted: stages, jobs, deliveries, loaded models) and ``/healthz`` (node.metrics).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutting_down

from node.config import LogFormat, Settings
from node.db import make_engine
from node.dispatch import QUEUES, TASK_NAMES, celery_config
from node.metrics import Exposition, database_check
from node.schema import JobKind
from worker.tasks import Context

#: Delivery is network bound and quick; its hard limit is fixed.
DELIVER_TIME_LIMIT_S = 300.0


def make_app(settings: Settings) -> tuple[Celery, Context]:
    """The Celery app with both tasks bound to one job context for this worker."""
    app = Celery("spine_node", set_as_current=True)
    app.conf.update(celery_config(settings))
    ctx = Context(settings, actor=f"worker:{socket.gethostname()}")
    limits = {JobKind.GRADE: settings.grade_time_limit_s, JobKind.DELIVER: DELIVER_TIME_LIMIT_S}
    for kind, name in TASK_NAMES.items():
        app.task(name=name, acks_late=True, reject_on_worker_lost=True, time_limit=limits[kind],
                 soft_time_limit=0.9 * limits[kind])(ctx.run)
    worker_process_init.connect(lambda **_: ctx.after_fork(), weak=False)
    return app, ctx


def worker_argv(settings: Settings, queues: list[str], concurrency: int | None) -> list[str]:
    """The ``celery worker`` arguments: one task at a time per process, one process per GPU; no
    start-up banner with JSON logs (every line of output is then a JSON object)."""
    if concurrency is None:
        import torch

        concurrency = max(1, torch.cuda.device_count())
    quiet = ["--quiet"] if settings.log_format is LogFormat.JSON else []
    return [*quiet, "worker", "--loglevel", settings.log_level, "--queues", ",".join(queues), "--concurrency", str(concurrency),
            "--prefetch-multiplier", "1", "--hostname", f"spine-node-{os.getpid()}@{socket.gethostname()}",
            "--without-gossip", "--without-mingle"]


def run_worker(settings: Settings, queues: list[str] | None = None, concurrency: int | None = None) -> Any:
    """Start a Celery worker in this process (blocks until it is stopped)."""
    if not settings.broker_url:
        raise ValueError("spine-node worker needs broker_url (embedded mode grades inside spine-node serve)")
    exposition = Exposition() if settings.worker_metrics_port else None  # before the pool processes fork
    try:
        app, _ = make_app(settings)
        if exposition is not None:
            _expose(settings, exposition)
        return app.worker_main(worker_argv(settings, queues or list(QUEUES.values()), concurrency))
    finally:
        if exposition is not None:
            exposition.close()


def _expose(settings: Settings, exposition: Exposition) -> None:
    """Serve ``/metrics`` and ``/healthz`` from this (Celery's main) process."""
    health = WorkerHealth(settings)
    worker_ready.connect(health.consuming, weak=False)
    worker_shutting_down.connect(health.stopping, weak=False)
    worker_process_shutdown.connect(lambda pid, **_: exposition.process_ended(pid), weak=False)
    exposition.serve(settings.host, settings.worker_metrics_port, health)


class WorkerHealth:
    """A worker's ``/healthz``: the database answers, and the worker consumes with a live broker
    connection (Celery drops it while the broker is away and reconnects)."""

    def __init__(self, settings: Settings) -> None:
        self.engine = make_engine(settings.database_url)
        self._consumer: Any = None
        self._stopping = False

    def consuming(self, sender: Any = None, **_: Any) -> None:
        """Celery's ``worker_ready``: ``sender`` is the consumer."""
        self._consumer = sender

    def stopping(self, **_: Any) -> None:
        """Celery's ``worker_shutting_down``."""
        self._stopping = True

    def __call__(self) -> dict[str, str]:
        try:
            database = database_check(self.engine)
        finally:
            self.engine.dispose()  # keep no connection that the next forked pool process would inherit
        return {"database": database, "broker": self._broker()}

    def _broker(self) -> str:
        if self._stopping:
            return "shutting down"
        if self._consumer is None:
            return "not consuming yet"
        connection = self._consumer.connection
        if connection is None or not connection.connected:
            return "not connected: reconnecting"
        return "ok"
