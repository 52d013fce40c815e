"""The job state machine, shared by the node (outbox, reaper) and the workers (claim, lease, end).

PENDING -> QUEUED (handed to a broker or the embedded executor) -> RUNNING (claimed, with a
lease) -> DONE | FAILED; back to PENDING after a transient error (with a backoff) or when a
lease expires. Every transition is made under the job's row lock, so two workers holding the
same message never both run the job, and a worker that lost its lease cannot finish it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import uuid
from dataclasses import dataclass

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db import reading, transaction
from node.schema import Event, Job, JobKind, JobState, Study, StudyState, utcnow

LOGGER = logging.getLogger(__name__)

#: The study state a job of each kind moves the study out of (and back to FAILED from).
_STUDY_STAGE = {
    JobKind.GRADE: (StudyState.READY, StudyState.GRADING),
    JobKind.DELIVER: (StudyState.GRADED,),
}


@dataclass(frozen=True)
class JobPolicy:
    """Leases, attempts and backoff, from the settings."""

    lease_s: float
    max_attempts: int
    backoff_s: float
    requeue_after_s: float  # a QUEUED job nobody claimed by then is published again

    @classmethod
    def from_settings(cls, settings: Settings) -> JobPolicy:
        return cls(settings.job_lease_s, settings.job_max_attempts, settings.job_retry_backoff_s,
                   visibility_timeout_s(settings))

    def backoff(self, attempts: int) -> dt.timedelta:
        """Delay before the next attempt: ``backoff_s`` doubling per attempt, at most an hour."""
        return dt.timedelta(seconds=min(self.backoff_s * 2 ** max(attempts - 1, 0), 3600.0))


def visibility_timeout_s(settings: Settings) -> float:
    """How long the broker waits before giving an unacknowledged message to another worker.

    Above the longest task (its hard time limit), so a slow grade is never run twice by the
    broker; the lease reaper returns jobs of vanished workers much sooner.
    """
    return 2 * settings.grade_time_limit_s + 60


@dataclass(frozen=True)
class Claim:
    """A job a worker holds, with what it needs to run it; ``token`` names the lease."""

    job_id: int
    kind: JobKind
    study_id: int
    study_instance_uid: str
    token: str
    attempt: int
    last_instance_id: int | None
    result_id: int | None
    missing_roles: tuple[str, ...]


class LeaseLost(RuntimeError):
    """The job is no longer ours: the reaper returned it, or a requeue superseded it."""


def lease_holder() -> str:
    """A name for one claim: host, process and a random token."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def claim(sessions: sessionmaker[Session], job_id: int, policy: JobPolicy, actor: str) -> Claim | None:
    """Take job ``job_id`` if it is waiting (or its lease expired); None if it is not ours to run."""
    now = utcnow()
    token = lease_holder()
    with transaction(sessions) as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            LOGGER.warning("job %s: no such job; message dropped", job_id)
            return None
        expired = job.state == JobState.RUNNING.value and job.lease_until is not None and job.lease_until < now
        if job.state not in (JobState.PENDING.value, JobState.QUEUED.value) and not expired:
            LOGGER.info("job %s is %s; message dropped", job_id, job.state)
            return None
        kind = JobKind(job.kind)
        job.state, job.worker, job.lease_until = JobState.RUNNING.value, token, now + dt.timedelta(seconds=policy.lease_s)
        job.attempts, job.started_at, job.not_before = job.attempts + 1, now, None
        study = session.get(Study, job.study_id, with_for_update=True)
        assert study is not None
        if kind is JobKind.GRADE and study.state == StudyState.READY.value:
            study.state = StudyState.GRADING.value
        session.add(Event(study_id=job.study_id, kind=f"{kind.value}-started", actor=actor,
                          message=f"{kind.value} job {job.id}, attempt {job.attempts}",
                          details={"job_id": job.id, "attempt": job.attempts, "worker": token}))
        return Claim(job.id, kind, job.study_id, study.study_instance_uid, token, job.attempts,
                     job.last_instance_id, job.result_id, tuple(job.missing_roles or ()))


def renew(sessions: sessionmaker[Session], held: Claim, policy: JobPolicy) -> bool:
    """Extend the lease; False if the job is no longer ours."""
    with transaction(sessions) as session:
        done = session.execute(
            update(Job)
            .where(Job.id == held.job_id, Job.worker == held.token, Job.state == JobState.RUNNING.value)
            .values(lease_until=utcnow() + dt.timedelta(seconds=policy.lease_s))
        )
        return bool(done.rowcount)  # type: ignore[attr-defined]


def hold(session: Session, held: Claim) -> Job:
    """Lock the job row for the final write; raise :class:`LeaseLost` if it is not ours any more."""
    job = session.get(Job, held.job_id, with_for_update=True)
    if job is None or job.state != JobState.RUNNING.value or job.worker != held.token:
        raise LeaseLost(f"job {held.job_id} is no longer held by this worker")
    return job


def complete(session: Session, job: Job, result_id: int | None = None) -> None:
    """Mark a held job DONE (inside the caller's transaction, with what it wrote)."""
    job.state, job.finished_at, job.lease_until, job.error = JobState.DONE.value, utcnow(), None, None
    if result_id is not None:
        job.result_id = result_id


def set_study_state(session: Session, study_id: int, state: StudyState, only_from: tuple[StudyState, ...]) -> bool:
    """Move the study to ``state`` if it is in one of ``only_from`` (a newer input may have reopened it)."""
    done = session.execute(
        update(Study).where(Study.id == study_id, Study.state.in_([s.value for s in only_from])).values(state=state.value)
    )
    return bool(done.rowcount)  # type: ignore[attr-defined]


def fail(sessions: sessionmaker[Session], held: Claim, error: str, permanent: bool, policy: JobPolicy, actor: str) -> JobState:
    """Record a failed attempt: FAILED at once (permanent, or attempts used up), else PENDING after a backoff."""
    with transaction(sessions) as session:
        try:
            job = hold(session, held)
        except LeaseLost:
            LOGGER.warning("job %s failed after its lease was lost: %s", held.job_id, error)
            return JobState.CANCELLED
        return _give_up_or_retry(session, job, error, permanent, policy, policy.backoff(job.attempts), actor)


def _give_up_or_retry(session: Session, job: Job, error: str, permanent: bool, policy: JobPolicy, delay: dt.timedelta,
                      actor: str) -> JobState:
    kind = JobKind(job.kind)
    job.error, job.worker, job.lease_until = error[:4000], None, None
    if permanent or job.attempts >= policy.max_attempts:
        job.state, job.finished_at = JobState.FAILED.value, utcnow()
        set_study_state(session, job.study_id, StudyState.FAILED, _STUDY_STAGE[kind])
        why = "permanent error" if permanent else f"{job.attempts} attempts used"
        session.add(Event(study_id=job.study_id, kind=f"{kind.value}-failed", actor=actor,
                          message=f"{kind.value} job {job.id} failed ({why}): {error}",
                          details={"job_id": job.id, "attempts": job.attempts, "permanent": permanent}))
        return JobState.FAILED
    job.state, job.not_before = JobState.PENDING.value, utcnow() + delay
    session.add(Event(study_id=job.study_id, kind=f"{kind.value}-retry", actor=actor,
                      message=f"{kind.value} job {job.id} attempt {job.attempts} failed, retrying in {delay.total_seconds():.0f} s: {error}",
                      details={"job_id": job.id, "attempts": job.attempts, "retry_in_s": delay.total_seconds()}))
    return JobState.PENDING


def reschedule(session: Session, job: Job, when: dt.datetime, message: str, actor: str) -> None:
    """Put a held job back to PENDING until ``when`` without counting a failed attempt (a
    delivery waiting for its objects' next C-STORE attempt), inside the caller's transaction."""
    job.state, job.not_before, job.worker, job.lease_until = JobState.PENDING.value, when, None, None
    job.attempts = max(job.attempts - 1, 0)
    session.add(Event(study_id=job.study_id, kind=f"{job.kind}-waiting", actor=actor, message=message,
                      details={"job_id": job.id, "not_before": when.isoformat()}))


def reap(sessions: sessionmaker[Session], policy: JobPolicy) -> int:
    """Return RUNNING jobs whose lease expired (their worker vanished) and QUEUED jobs nobody took.

    A vanished worker's attempt counts, so a study that kills its worker every time fails after
    ``max_attempts`` instead of looping.
    """
    now = utcnow()
    stale_queue = now - dt.timedelta(seconds=policy.requeue_after_s)
    with reading(sessions) as session:
        ids = session.scalars(
            select(Job.id).where(or_(
                (Job.state == JobState.RUNNING.value) & (Job.lease_until < now),
                (Job.state == JobState.QUEUED.value) & (Job.queued_at < stale_queue),
            ))
        ).all()
    returned = 0
    for job_id in ids:
        with transaction(sessions) as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                continue
            if job.state == JobState.QUEUED.value and job.queued_at is not None and job.queued_at < stale_queue:
                job.state = JobState.PENDING.value
                session.add(Event(study_id=job.study_id, kind="job-republished",
                                  message=f"{job.kind} job {job.id} not taken within {policy.requeue_after_s:.0f} s: publishing it again",
                                  details={"job_id": job.id}))
            elif job.state == JobState.RUNNING.value and job.lease_until is not None and job.lease_until < now:
                LOGGER.warning("job %s: lease of %s expired; returning it", job.id, job.worker)
                _give_up_or_retry(session, job, f"worker {job.worker} stopped renewing its lease", False, policy,
                                  dt.timedelta(0), "reaper")
            else:
                continue
            returned += 1
    return returned


def due(sessions: sessionmaker[Session], limit: int = 100) -> list[tuple[int, JobKind]]:
    """PENDING jobs whose backoff has passed, oldest first."""
    now = utcnow()
    with reading(sessions) as session:
        rows = session.execute(
            select(Job.id, Job.kind)
            .where(Job.state == JobState.PENDING.value, or_(Job.not_before.is_(None), Job.not_before <= now))
            .order_by(Job.id)
            .limit(limit)
        ).all()
    return [(job_id, JobKind(kind)) for job_id, kind in rows]


def mark_queued(sessions: sessionmaker[Session], job_id: int) -> None:
    """PENDING -> QUEUED once the job is handed over (a claim may already have run it: then nothing)."""
    with transaction(sessions) as session:
        session.execute(
            update(Job).where(Job.id == job_id, Job.state == JobState.PENDING.value)
            .values(state=JobState.QUEUED.value, queued_at=utcnow())
        )


def republish_queued(sessions: sessionmaker[Session], why: str) -> int:
    """QUEUED jobs whose messages may be gone (the last process's embedded executor, a broker that
    restarted empty) become PENDING, so they are published again; a copy that did survive is
    harmless, since a worker claims a job only once."""
    with transaction(sessions) as session:
        jobs = session.scalars(select(Job).where(Job.state == JobState.QUEUED.value).with_for_update()).all()
        for job in jobs:
            job.state = JobState.PENDING.value
            session.add(Event(study_id=job.study_id, kind="job-republished", message=f"{job.kind} job {job.id}: {why}",
                              details={"job_id": job.id}))
        return len(jobs)


def cancel_open_jobs(session: Session, study_id: int, kind: JobKind) -> None:
    """Mark a study's jobs of ``kind`` that no worker has started CANCELLED: a newer job supersedes them."""
    session.execute(
        update(Job)
        .where(Job.study_id == study_id, Job.kind == kind.value, Job.state.in_((JobState.PENDING.value, JobState.QUEUED.value)))
        .values(state=JobState.CANCELLED.value, finished_at=utcnow(), error="superseded by a newer job")
    )
