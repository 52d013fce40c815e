"""The grading job: a claimed study's instances from the database and the store, the pipeline
with each stage on the study's timeline, the DICOM objects, then the result and the job that
delivers it."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db import reading, transaction
from node.jobs import Claim, complete, hold, set_study_state
from node.metrics import JOB_LATENCY, STAGE_SECONDS
from node.schema import Event, Instance, Job, JobKind, Result, ResultObject, StudyState, utcnow
from worker.objects import SavedObject, make_objects
from worker.pipeline import Analysis, StudyError, analyse, read_series, result_json

if TYPE_CHECKING:
    from worker.tasks import Context

LOGGER = logging.getLogger(__name__)


class Timeline:
    """A :data:`models.analysis.Stage` that writes each stage's start, end and duration as one
    event of the study's timeline (``spine-node show`` lists them), and observes the duration of
    each that succeeded (``spine_node_stage_duration_seconds``)."""

    def __init__(self, sessions: sessionmaker[Session], held: Claim, actor: str) -> None:
        self.sessions, self.held, self.actor = sessions, held, actor

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started, t0, ok = utcnow(), time.perf_counter(), False
        try:
            yield
            ok = True
        finally:
            duration = time.perf_counter() - t0
            if ok:
                STAGE_SECONDS.labels(stage=name).observe(duration)
            try:
                with transaction(self.sessions) as session:
                    session.add(Event(study_id=self.held.study_id, kind="stage", actor=self.actor,
                                      message=f"{name} {duration:.2f} s" + ("" if ok else " (failed)"),
                                      details={"job_id": self.held.job_id, "stage": name, "ok": ok,
                                               "started_at": started.isoformat(), "ended_at": utcnow().isoformat(),
                                               "duration_s": round(duration, 4)}))
            except Exception:  # noqa: BLE001 - a timeline line must not hide the stage's own error
                LOGGER.warning("could not record stage %s of job %s", name, self.held.job_id, exc_info=True)


def grade_study(ctx: Context, held: Claim) -> None:
    """Grade the instances the job covers and store the result; raises StudyError when the
    study cannot be graded (permanent) and anything else for a retry."""
    timeline = Timeline(ctx.sessions, held, ctx.actor)
    with timeline("series"):
        paths = _instance_paths(ctx.sessions, held)
    with timeline("models"):
        models = ctx.models()
    with ctx.storage.local_files(paths) as files:
        with timeline("read"):
            study_uid, series = read_series(files, ctx.settings.device_uid)
        if study_uid != held.study_instance_uid:
            raise StudyError(f"stored files hold study {study_uid}, not {held.study_instance_uid}")
        analysis = analyse(study_uid, series, models.detector, models.grader, models.device, timeline)
        if held.missing_roles:
            analysis.warnings.insert(0, f"graded at the study timeout without {', '.join(held.missing_roles)}")
        payload, key = result_json(analysis), result_key(analysis)
        objects: list[SavedObject] = []
        if _result_for(ctx.sessions, held, key) is None:
            with timeline("report"):
                objects = make_objects(ctx.settings, ctx.storage, ctx.sessions, held.study_id, payload, series)
    with timeline("store"):
        store_result(ctx.sessions, held, payload, key, objects, ctx.actor)


def _instance_paths(sessions: sessionmaker[Session], held: Claim) -> list[str]:
    """Stored paths of the instances the job covers (those present when it was written)."""
    query = select(Instance.path).where(Instance.study_id == held.study_id).order_by(Instance.id)
    if held.last_instance_id is not None:
        query = query.where(Instance.id <= held.last_instance_id)
    with reading(sessions) as session:
        paths = list(session.scalars(query))
    if not paths:
        raise StudyError("the study has no stored instances")
    return paths


def result_key(analysis: Analysis) -> str:
    """Names a result's input: the series used, their instance counts, and both models' weights."""
    used = sorted((s.role, s.series_instance_uid, len(s.paths)) for s in analysis.series if s.used)
    text = json.dumps([used, analysis.detector_sha256, analysis.grader_sha256])
    return hashlib.sha256(text.encode()).hexdigest()


def _result_for(sessions: sessionmaker[Session], held: Claim, key: str) -> int | None:
    """The result this study already has for this input, if any."""
    with reading(sessions) as session:
        return session.scalar(select(Result.id).where(Result.study_id == held.study_id, Result.input_key == key))


def store_result(sessions: sessionmaker[Session], held: Claim, payload: dict[str, Any], key: str, objects: list[SavedObject],
                 actor: str) -> int:
    """Write the result, its objects and its delivery job in one transaction, or find the result
    this input already has (a redelivered or requeued job), and finish the job; returns its id."""
    with transaction(sessions) as session:
        job = hold(session, held)
        result_id = session.scalar(select(Result.id).where(Result.study_id == held.study_id, Result.input_key == key))
        if result_id is None:
            result = Result(study_id=held.study_id, job_id=held.job_id, input_key=key, model_name=payload["model"]["name"],
                            model_version=payload["model"]["version"], weights_sha256=payload["model"]["weights_sha256"] or "",
                            payload=payload)
            session.add(result)
            session.flush()
            result_id = result.id
            session.add_all(ResultObject(result_id=result_id, kind=o.kind, sop_class_uid=o.sop_class_uid,
                                         sop_instance_uid=o.sop_instance_uid, path=o.path) for o in objects)
            session.add(Job(study_id=held.study_id, kind=JobKind.DELIVER.value, input_key=f"result-{result_id}", result_id=result_id))
            message = f"{sum(bool(lv['conditions']) for lv in payload['levels'].values())} levels graded, {len(payload['warnings'])} warnings; delivery queued"
        else:
            message = (f"same series and models as result {result_id}: kept it, nothing new to deliver "
                       "(requeue --from-stage deliver sends it again)")
        complete(session, job, result_id)
        set_study_state(session, held.study_id, StudyState.GRADED, (StudyState.READY, StudyState.GRADING))
        session.add(Event(study_id=held.study_id, kind="graded", actor=actor, message=message,
                          details={"job_id": held.job_id, "result_id": result_id, "warnings": payload["warnings"]}))
        written = job.created_at
    JOB_LATENCY.labels(kind=JobKind.GRADE.value).observe((utcnow() - written).total_seconds())
    LOGGER.info("study %s graded (result %s)", held.study_instance_uid, result_id)
    return result_id
