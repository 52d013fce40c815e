"""What admins see and do: study lists, a study's full timeline with stage timings and audit
entries, requeue (each recorded in the audit log with the job it wrote).

Functions return plain dicts in the JSON shapes of DESIGN.md, so the CLI prints them as JSON
or as tables and tests compare them directly.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from node import audit
from node.audit import AuditAction
from node.db import reading, transaction
from node.jobs import cancel_open_jobs
from node.readiness import missing_roles
from node.schema import (Delivery, DeliveryState, Event, Instance, Job, JobKind, JobState, Result, ResultObject, Series, Study,
                         StudyState)
from node.series import SeriesRole


class UnknownStudy(LookupError):
    """No study with that StudyInstanceUID is known to the node."""


class NothingToDeliver(LookupError):
    """A delivery was requeued for a study that has no result yet."""


def list_studies(sessions: sessionmaker[Session], state: StudyState | None = None) -> list[dict[str, Any]]:
    """Every study (newest first) with its state and instance and series counts."""
    instances = (
        select(Instance.study_id, func.count(Instance.id).label("n"), func.count(func.distinct(Instance.series_id)).label("s"))
        .group_by(Instance.study_id)
        .subquery()
    )
    query = (
        select(Study.study_instance_uid, Study.state, Study.updated_at, instances.c.n, instances.c.s)
        .outerjoin(instances, instances.c.study_id == Study.id)
        .order_by(Study.updated_at.desc(), Study.id.desc())
    )
    if state is not None:
        query = query.where(Study.state == state.value)
    with reading(sessions) as session:
        return [
            {"study_instance_uid": uid, "state": st, "instances": n or 0, "series": s or 0, "updated_at": _iso(at)}
            for uid, st, at, n, s in session.execute(query)
        ]


def show_study(sessions: sessionmaker[Session], study_instance_uid: str) -> dict[str, Any]:
    """One study in full: series with roles and reasons, jobs, timeline, result, deliveries, audit entries."""
    with reading(sessions) as session:
        study = _study(session, study_instance_uid)
        counts = dict(
            session.execute(
                select(Instance.series_id, func.count(Instance.id)).where(Instance.study_id == study.id).group_by(Instance.series_id)
            ).all()
        )
        series = session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.series_number, Series.id)).all()
        jobs = session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)).all()
        events = session.scalars(select(Event).where(Event.study_id == study.id).order_by(Event.at, Event.id)).all()
        result = session.scalars(select(Result).where(Result.study_id == study.id).order_by(Result.id.desc())).first()
        deliveries = session.scalars(select(Delivery).where(Delivery.study_id == study.id).order_by(Delivery.id)).all()
        audited = [audit.as_json(e) for e in session.scalars(audit.query(study_instance_uid=study.study_instance_uid))]
    roles = frozenset(SeriesRole(s.role) for s in series)
    return {
        "study_instance_uid": study.study_instance_uid,
        "state": study.state,
        "created_at": _iso(study.created_at),
        "updated_at": _iso(study.updated_at),
        "missing_roles": missing_roles(roles),
        "series": [
            {
                "series_instance_uid": s.series_instance_uid,
                "series_number": s.series_number,
                "series_description": s.series_description,
                "modality": s.modality,
                "role": s.role,
                "role_reason": s.role_reason,
                "instances": counts.get(s.id, 0),
            }
            for s in series
        ],
        "jobs": [_job(job) for job in jobs],
        "stages": [
            {k: e.details.get(k) for k in ("job_id", "stage", "started_at", "ended_at", "duration_s", "ok")}
            for e in events if e.kind == "stage"
        ],
        "timeline": [
            {"at": _iso(e.at), "kind": e.kind, "message": e.message, "actor": e.actor, "details": e.details}
            for e in events
        ],
        "result": result.payload if result else None,
        "deliveries": [
            {"destination": d.destination, "via": d.via, "sop_instance_uid": d.sop_instance_uid, "state": d.state,
             "attempts": d.attempts, "last_status": d.last_status, "updated_at": _iso(d.updated_at)}
            for d in deliveries
        ],
        "audit": audited,
    }


def requeue(sessions: sessionmaker[Session], study_instance_uid: str, actor: str,
            from_stage: JobKind = JobKind.GRADE, action: AuditAction = AuditAction.REQUEUE) -> dict[str, Any]:
    """Write a new job for the study, superseding its jobs of that kind not yet started; record
    it as ``action`` in the audit log, in the same transaction.

    From ``grade``: grade the study as it is now (a result for the same series and model is
    kept, not duplicated). From ``deliver``: send the newest result's objects again, to every
    destination, with fresh attempts (dead letters included).
    """
    with transaction(sessions) as session:
        study = _study(session, study_instance_uid)
        session.refresh(study, with_for_update=True)
        earlier = session.scalar(select(func.count(Job.id)).where(Job.study_id == study.id, Job.kind == from_stage.value)) or 0
        if from_stage is JobKind.DELIVER:
            result_id = session.scalar(select(Result.id).where(Result.study_id == study.id).order_by(Result.id.desc()).limit(1))
            if result_id is None:
                raise NothingToDeliver(f"study {study_instance_uid} has no result to deliver; requeue it from grade")
            cancel_open_jobs(session, study.id, JobKind.DELIVER)
            session.execute(update(Delivery).where(Delivery.result_id == result_id).values(
                state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=None, via=Delivery.destination))
            job = Job(study_id=study.id, kind=JobKind.DELIVER.value, input_key=f"result-{result_id}-requeue-{earlier + 1}",
                      result_id=result_id)
            state, missing = StudyState.GRADED, []
        else:
            count, last = session.execute(
                select(func.count(Instance.id), func.max(Instance.id)).where(Instance.study_id == study.id)
            ).one()
            roles = frozenset(SeriesRole(r) for r in session.scalars(select(Series.role).where(Series.study_id == study.id)))
            cancel_open_jobs(session, study.id, JobKind.GRADE)
            missing = missing_roles(roles)
            job = Job(study_id=study.id, kind=JobKind.GRADE.value, input_key=f"{count}:{last}:requeue-{earlier + 1}",
                      last_instance_id=last, partial=bool(missing), missing_roles=missing)
            state = StudyState.READY
        session.add(job)
        previous = study.state
        study.state = state.value
        session.add(Event(study_id=study.id, kind="requeued", actor=actor,
                          message=f"requeued from {previous} to {from_stage.value} by {actor}",
                          details={"missing_roles": missing, "from_stage": from_stage.value}))
        session.flush()
        audit.record(session, actor, action, study.study_instance_uid, from_stage=from_stage.value, job_id=job.id,
                     previous_state=previous, missing_roles=missing)
        return _job(job)


def retry_failed(sessions: sessionmaker[Session], actor: str) -> list[dict[str, Any]]:
    """Requeue every FAILED study from the stage that failed (its newest failed job's kind)."""
    with reading(sessions) as session:
        failed = session.execute(
            select(Study.study_instance_uid, Job.kind)
            .join(Job, Job.study_id == Study.id)
            .where(Study.state == StudyState.FAILED.value, Job.state == JobState.FAILED.value)
            .order_by(Study.id, Job.id)
        ).all()
    stage = {uid: JobKind(kind) for uid, kind in failed}  # the newest failed job of each study wins
    return [{"study_instance_uid": uid, **requeue(sessions, uid, actor, kind, AuditAction.RETRY_FAILED)}
            for uid, kind in stage.items()]


def result_objects(sessions: sessionmaker[Session], study_instance_uid: str) -> list[dict[str, str]]:
    """The DICOM objects of the study's newest result: kind, UIDs and path below ``storage_dir``."""
    with reading(sessions) as session:
        study = _study(session, study_instance_uid)
        result_id = session.scalar(select(Result.id).where(Result.study_id == study.id).order_by(Result.id.desc()).limit(1))
        rows = session.scalars(select(ResultObject).where(ResultObject.result_id == result_id).order_by(ResultObject.id)).all()
    return [{"kind": r.kind, "sop_class_uid": r.sop_class_uid, "sop_instance_uid": r.sop_instance_uid, "path": r.path} for r in rows]


def _study(session: Session, study_instance_uid: str) -> Study:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
    if study is None:
        raise UnknownStudy(f"no study {study_instance_uid}")
    return study


def _job(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "partial": job.partial,
        "missing_roles": job.missing_roles,
        "attempts": job.attempts,
        "error": job.error,
        "created_at": _iso(job.created_at),
        "queued_at": _iso(job.queued_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None
