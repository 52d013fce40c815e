"""The job state machine on SQLite and PostgreSQL: claims, leases, the reaper, retries, backoff."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db import make_engine, make_sessionmaker, migrate, transaction
from node.jobs import JobPolicy, LeaseLost, claim, due, fail, hold, mark_queued, reap, renew
from node.schema import Event, Job, JobKind, JobState, Study, StudyState, utcnow

POLICY = JobPolicy(lease_s=30.0, max_attempts=2, backoff_s=10.0, requeue_after_s=600.0)


@pytest.fixture
def sessions(database_url: str) -> sessionmaker[Session]:
    migrate(database_url)
    return make_sessionmaker(make_engine(database_url))


def _job(sessions: sessionmaker[Session], kind: JobKind = JobKind.GRADE, state: StudyState = StudyState.READY) -> int:
    with transaction(sessions) as session:
        study = Study(study_instance_uid=f"1.2.3.{utcnow().timestamp()}", state=state.value)
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, kind=kind.value, input_key="1:1", last_instance_id=1)
        session.add(job)
        session.flush()
        return job.id


def _row(sessions: sessionmaker[Session], job_id: int) -> tuple[Job, Study]:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        study = session.get(Study, job.study_id)
        assert study is not None
        return job, study


def test_a_job_is_claimed_once_and_moves_its_study_to_grading(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    mark_queued(sessions, job_id)
    held = claim(sessions, job_id, POLICY, "test")
    assert held is not None and held.attempt == 1 and held.kind is JobKind.GRADE and held.last_instance_id == 1
    assert claim(sessions, job_id, POLICY, "test") is None  # a redelivered message finds it running
    job, study = _row(sessions, job_id)
    assert job.state == "RUNNING" and job.worker == held.token and study.state == "GRADING"
    assert job.lease_until is not None and job.lease_until > utcnow() + dt.timedelta(seconds=25)
    assert renew(sessions, held, POLICY)


def test_a_vanished_worker_is_reaped_and_its_attempts_are_bounded(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    for attempt in (1, 2):
        held = claim(sessions, job_id, POLICY, "test")
        assert held is not None and held.attempt == attempt
        assert reap(sessions, POLICY) == 0  # the lease is still good
        with transaction(sessions) as session:
            session.execute(update(Job).where(Job.id == job_id).values(lease_until=utcnow() - dt.timedelta(seconds=1)))
        assert reap(sessions, POLICY) == 1
        assert not renew(sessions, held, POLICY)  # the old holder cannot take it back
        with transaction(sessions) as session, pytest.raises(LeaseLost):
            hold(session, held)
    job, study = _row(sessions, job_id)
    assert job.state == "FAILED" and "stopped renewing its lease" in (job.error or "")
    assert study.state == "FAILED"


def test_transient_errors_back_off_and_permanent_ones_fail_at_once(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    held = claim(sessions, job_id, POLICY, "test")
    assert held is not None
    assert fail(sessions, held, "database blip", False, POLICY, "test") is JobState.PENDING
    job, _ = _row(sessions, job_id)
    assert job.not_before is not None and 9 < (job.not_before - utcnow()).total_seconds() <= 10
    assert job_id not in [j for j, _ in due(sessions)]  # not before the backoff has passed
    with transaction(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(not_before=utcnow() - dt.timedelta(seconds=1)))
    assert (job_id, JobKind.GRADE) in due(sessions)

    other = _job(sessions)
    held = claim(sessions, other, POLICY, "test")
    assert held is not None
    assert fail(sessions, held, "no sagittal series", True, POLICY, "test") is JobState.FAILED
    job, study = _row(sessions, other)
    assert job.state == "FAILED" and job.attempts == 1 and study.state == "FAILED"
    with sessions() as session:
        kinds = session.scalars(select(Event.kind).where(Event.study_id == study.id)).all()
    assert kinds == ["grade-started", "grade-failed"]


def test_backoff_doubles_up_to_an_hour() -> None:
    policy = JobPolicy.from_settings(Settings(job_retry_backoff_s=10.0))
    assert [policy.backoff(n).total_seconds() for n in (1, 2, 3)] == [10.0, 20.0, 40.0]
    assert policy.backoff(30).total_seconds() == 3600.0


def test_a_queued_job_nobody_took_is_published_again(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    mark_queued(sessions, job_id)
    assert reap(sessions, POLICY) == 0
    with transaction(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(queued_at=utcnow() - dt.timedelta(seconds=601)))
    assert reap(sessions, POLICY) == 1
    assert (job_id, JobKind.GRADE) in due(sessions)
