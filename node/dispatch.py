"""The outbox: PENDING job rows go to the broker (Celery by task name) or to the embedded executor.

Jobs are written to the database first and published afterwards, so a broker that is down only
delays them: they stay PENDING and go out when it is back. With a Redis broker (which reports
its run_id), a broker that restarted empty, or a node restarted, has QUEUED jobs published again
at once; with another broker they wait for the reaper's visibility timeout. A message carries nothing but the
job's id; the worker reads the rest from the database. Publishing twice is harmless, because a
worker claims a job under its row lock (node.jobs). The Celery settings both sides must agree on
live here, so the node publishes without importing the worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.jobs import JobPolicy, due, mark_queued, reap, republish_queued, visibility_timeout_s
from node.schema import JobKind

LOGGER = logging.getLogger(__name__)

#: Celery task name and queue of each job kind: grading wants a GPU, delivery the network.
TASK_NAMES = {JobKind.GRADE: "spine_node.grade_study", JobKind.DELIVER: "spine_node.deliver"}
QUEUES = {JobKind.GRADE: "grade", JobKind.DELIVER: "deliver"}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings of the node (publisher) and the workers alike."""
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": {"visibility_timeout": visibility_timeout_s(settings)},
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 3.0,
        "task_routes": {TASK_NAMES[kind]: {"queue": queue} for kind, queue in QUEUES.items()},
        "task_acks_late": True,  # a message is acknowledged after its task ran, not when taken
        "task_reject_on_worker_lost": True,  # a killed worker process gives its message back
        "task_ignore_result": True,  # results live in the database, not a result backend
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_prefetch_multiplier": 1,  # one grade at a time per process
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


class PublishError(RuntimeError):
    """The job could not be handed over now (broker down, executor full); it stays PENDING."""


class ExecutorBusy(PublishError):
    """The embedded executor is full; the job waits for a free slot."""


class Publisher(Protocol):
    """Hands one job to whatever runs it."""

    def publish(self, job_id: int, kind: JobKind) -> None: ...

    def epoch(self) -> str | None:
        """Names the life of whatever holds published messages (None: cannot tell now); when it
        changes, messages published before may be lost."""

    def close(self) -> None: ...


class CeleryPublisher:
    """Sends ``job_id`` to the job kind's queue of a Celery broker, by task name."""

    def __init__(self, settings: Settings) -> None:
        from celery import Celery

        self.app = Celery("spine-node-outbox", set_as_current=False)
        self.app.conf.update(celery_config(settings))
        self._redis = _redis_client(settings.broker_url)

    def publish(self, job_id: int, kind: JobKind) -> None:
        try:
            self.app.send_task(TASK_NAMES[kind], args=[job_id], queue=QUEUES[kind], retry=False)
        except Exception as exc:  # kombu raises OperationalError, or the socket's own error, when the broker is down
            raise PublishError(f"broker unreachable: {exc}") from exc

    def epoch(self) -> str | None:
        """The Redis server's ``run_id``: a new one means it restarted, and a Redis without
        persistence restarts with empty queues."""
        if self._redis is None:
            return None
        try:
            return str(self._redis.info("server")["run_id"])
        except Exception:  # redis-py's ConnectionError and TimeoutError: down, or not there yet
            return None

    def close(self) -> None:
        self.app.close()
        if self._redis is not None:
            self._redis.close()


class EmbeddedPublisher:
    """Runs jobs in this process on a bounded thread pool (embedded mode: no broker).

    At most ``capacity`` jobs are handed over at once; more stay PENDING in the database, so a
    burst of studies never piles up in memory and a restart loses nothing.
    """

    def __init__(self, run_job: Callable[[int], object], capacity: int = 2, done: Callable[[], None] | None = None) -> None:
        self._run_job, self._done = run_job, done
        self._slots = threading.BoundedSemaphore(capacity)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-worker")

    def publish(self, job_id: int, kind: JobKind) -> None:
        if not self._slots.acquire(blocking=False):
            raise ExecutorBusy("embedded worker busy")
        self._pool.submit(self._run, job_id)

    def _run(self, job_id: int) -> None:
        try:
            self._run_job(job_id)
        except Exception:  # the job's own failure is recorded by the runner; this is a bug in it
            LOGGER.exception("embedded job %s raised", job_id)
        finally:
            self._slots.release()
            if self._done is not None:
                self._done()

    def epoch(self) -> str | None:
        """This process: jobs queued in an earlier process's executor were lost with it."""
        return f"embedded:{id(self)}"

    def close(self) -> None:
        """Wait for the running job; jobs not started stay QUEUED and are made PENDING at next start."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class Outbox:
    """Each round: return jobs of vanished workers, then publish every due PENDING job."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], publisher: Publisher) -> None:
        self.policy = JobPolicy.from_settings(settings)
        self.sessions, self.publisher = sessions, publisher
        self._broker_down = False
        self._epoch: str | None = None

    def run_once(self) -> int:
        """Publish what is due; return how many jobs went out."""
        self._republish_if_lost()
        reap(self.sessions, self.policy)
        sent = 0
        for job_id, kind in due(self.sessions):
            try:
                self.publisher.publish(job_id, kind)
            except ExecutorBusy:
                break
            except PublishError as exc:
                if not self._broker_down:
                    LOGGER.warning("jobs wait in the database: %s", exc)
                self._broker_down = True
                break
            mark_queued(self.sessions, job_id)
            sent += 1
        if sent and self._broker_down:
            LOGGER.info("broker reachable again: jobs are being published")
            self._broker_down = False
        return sent

    def _republish_if_lost(self) -> None:
        """At start, and whenever the broker restarted, QUEUED jobs are published again at once
        instead of waiting for the reaper's visibility timeout."""
        epoch = self.publisher.epoch()
        if epoch is None or epoch == self._epoch:
            return
        why = "published again: the broker restarted" if self._epoch else "published again at start"
        if count := republish_queued(self.sessions, why):
            LOGGER.warning("%d queued job(s) %s", count, why)
        self._epoch = epoch  # only once that committed: a database error means trying again next round


def _redis_client(broker_url: str) -> Any:
    """A Redis client on the broker for :meth:`CeleryPublisher.epoch`, or None for other brokers."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    return redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
