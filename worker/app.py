"""The Celery app of ``spine-node worker``: queues ``grade`` (GPU) and ``deliver`` (network).

Each task takes a job id and runs it through :class:`worker.tasks.Context`; the job row, not
Celery, holds the job's state, attempts and backoff. Celery's part is at-least-once delivery:
late acknowledgement, messages of killed processes given back, and time limits.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from node.config import Settings
from node.dispatch import QUEUES, TASK_NAMES, celery_config
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
    """The ``celery worker`` arguments: one task at a time per process, one process per GPU."""
    if concurrency is None:
        import torch

        concurrency = max(1, torch.cuda.device_count())
    return ["worker", "--loglevel", settings.log_level, "--queues", ",".join(queues), "--concurrency", str(concurrency),
            "--prefetch-multiplier", "1", "--hostname", f"spine-node-{os.getpid()}@{socket.gethostname()}",
            "--without-gossip", "--without-mingle"]


def run_worker(settings: Settings, queues: list[str] | None = None, concurrency: int | None = None) -> Any:
    """Start a Celery worker in this process (blocks until it is stopped)."""
    if not settings.broker_url:
        raise ValueError("spine-node worker needs broker_url (embedded mode grades inside spine-node serve)")
    app, _ = make_app(settings)
    return app.worker_main(worker_argv(settings, queues or list(QUEUES.values()), concurrency))
