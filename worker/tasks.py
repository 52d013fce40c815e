"""Running one job by id: claim it, keep its lease alive, do it, record how it ended.

The Celery tasks (worker.app) and the embedded executor of ``spine-node serve`` both call
:meth:`Context.run`, so a study takes the same path on a GPU worker and on one machine.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db import make_engine, make_sessionmaker
from node.jobs import Claim, JobPolicy, LeaseLost, claim, fail, renew
from node.logs import exception_message
from node.metrics import JOB_RUNS, MODEL_INFO
from node.schema import JobKind
from models.volumes import VolumeError
from worker.delivery import NothingToSend, deliver_result
from worker.grading import grade_study
from worker.pipeline import StudyError
from worker.storage import SharedVolume

if TYPE_CHECKING:
    from models.detect import Detector
    from models.grade import GraderModel

LOGGER = logging.getLogger(__name__)

#: Errors that another attempt cannot fix: the job fails at once, with the reason.
PERMANENT = (StudyError, VolumeError, NothingToSend)


@dataclass(frozen=True)
class Models:
    """The detector and grader, loaded once per process, on their device."""

    detector: Detector
    grader: GraderModel
    device: str


def pick_device() -> str:
    """A GPU when torch sees one (Celery pool process N takes GPU N mod count), else the CPU."""
    import torch
    from billiard.process import current_process

    if not torch.cuda.is_available():
        return "cpu"
    index = int(getattr(current_process(), "index", 0) or 0)
    return f"cuda:{index % torch.cuda.device_count()}"


class Context:
    """What a worker process needs to run jobs: settings, database, storage and models."""

    def __init__(self, settings: Settings, actor: str = "worker") -> None:
        self.settings, self.actor = settings, actor
        self.policy = JobPolicy.from_settings(settings)
        self.storage = SharedVolume(settings.storage_dir)
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self._models: Models | None = None
        self._db_lock, self._models_lock = threading.Lock(), threading.Lock()  # the lease thread never waits on a model load

    @property
    def sessions(self) -> sessionmaker[Session]:
        """Sessions of this process's engine, made on first use (after a fork, a new one)."""
        with self._db_lock:
            if self._sessions is None:
                self._engine = make_engine(self.settings.database_url)
                self._sessions = make_sessionmaker(self._engine)
            return self._sessions

    def after_fork(self) -> None:
        """In a new pool process: forget the parent's connections without closing them."""
        if self._engine is not None:
            self._engine.dispose(close=False)
        self._engine = self._sessions = None

    def models(self) -> Models:
        """The shipped detector and grader, loaded on the first job of this process."""
        with self._models_lock:
            if self._models is None:
                from models.detect import DEFAULT_WEIGHTS, Detector
                from models.grade import DEFAULT_GRADER, GraderModel

                device = pick_device()
                self._models = Models(Detector.load(DEFAULT_WEIGHTS, device), GraderModel.load(DEFAULT_GRADER, device), device)
                LOGGER.info("models loaded on %s", device)
                MODEL_INFO.labels(name="spine-node", version=importlib.metadata.version("spine-node"),
                                  detector_sha256=self._models.detector.sha256, grader_sha256=self._models.grader.sha256,
                                  device=device).set(1)
            return self._models

    def run(self, job_id: int) -> str:
        """Run job ``job_id`` if it is ours to run; returns what happened (for logs and tests):
        skipped (not ours), done, waiting (a delivery until its next C-STORE attempt), pending
        (retried later after an error), failed, lost or cancelled; counted by kind and outcome."""
        held = claim(self.sessions, job_id, self.policy, self.actor)
        if held is None:
            return "skipped"
        outcome = self._run_held(held)
        JOB_RUNS.labels(kind=held.kind.value, outcome=outcome).inc()
        return outcome

    def _run_held(self, held: Claim) -> str:
        job_id = held.job_id
        with _Lease(self, held):
            try:
                if held.kind is JobKind.DELIVER:
                    return deliver_result(self, held)
                grade_study(self, held)
            except LeaseLost as exc:
                LOGGER.warning("job %s: %s; its result was not written", job_id, exc)
                return "lost"
            except PERMANENT as exc:
                LOGGER.warning("job %s failed: %s", job_id, exception_message(exc))
                fail(self.sessions, held, exception_message(exc), True, self.policy, self.actor)
                return "failed"
            except Exception as exc:  # noqa: BLE001 - anything else may be transient: retried, bounded by attempts
                LOGGER.exception("job %s attempt %s failed", job_id, held.attempt)
                error = f"{type(exc).__name__}: {exception_message(exc)}"
                return fail(self.sessions, held, error, False, self.policy, self.actor).value.lower()
        return "done"


class _Lease:
    """Renews a held job's lease every third of its length while the job runs, on a thread."""

    def __init__(self, ctx: Context, held: Claim) -> None:
        self.ctx, self.held = ctx, held
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{held.job_id}", daemon=True)

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _renew(self) -> None:
        while not self._stop.wait(self.ctx.policy.lease_s / 3):
            try:
                if not renew(self.ctx.sessions, self.held, self.ctx.policy):
                    LOGGER.warning("job %s: lease lost", self.held.job_id)
                    return
            except Exception:  # noqa: BLE001 - a database blip; the next renewal may succeed
                LOGGER.warning("job %s: could not renew the lease", self.held.job_id, exc_info=True)
