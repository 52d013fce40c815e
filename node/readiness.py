"""When is a study ready to grade? Decided from the database alone, so timers survive restarts.

A study is READY when it holds T1_SAG, T2_SAG or STIR_SAG, and T2_AX, and nothing has arrived
for ``quiet_period_s``. If ``study_timeout_s`` passes with a role missing, the policy decides:
write a partial job naming the missing roles, or mark the study INCOMPLETE. Either way the job
row is the outbox: its ``input_key`` names the instances it covers, so the same input never
gets a second job.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import IncompletePolicy, Settings
from node.db import reading, transaction
from node.jobs import cancel_open_jobs
from node.schema import Event, Instance, Job, JobKind, Series, Study, StudyState, utcnow
from node.series import SeriesRole

LOGGER = logging.getLogger(__name__)

SAGITTAL_ROLES = frozenset({SeriesRole.T1_SAG, SeriesRole.T2_SAG, SeriesRole.STIR_SAG})
#: How far in the future an arrival time may lie before it means the clock stepped back (the
#: receiving processes and this one read the same clock, a moment apart).
CLOCK_TOLERANCE = dt.timedelta(seconds=5)


@dataclass(frozen=True)
class Pending:
    """A study still RECEIVING, as the readiness check sees it."""

    study_id: int
    study_instance_uid: str
    last_received_at: dt.datetime
    instances: int
    last_instance_id: int
    roles: frozenset[SeriesRole]

    @property
    def input_key(self) -> str:
        """Names the instances present: instances are only ever added, never replaced."""
        return f"{self.instances}:{self.last_instance_id}"


def missing_roles(roles: frozenset[SeriesRole]) -> list[str]:
    """The roles a full grading still needs: T1_SAG, a T2 or STIR sagittal, and T2_AX."""
    missing = []
    if SeriesRole.T1_SAG not in roles:
        missing.append(SeriesRole.T1_SAG.value)
    if not roles & {SeriesRole.T2_SAG, SeriesRole.STIR_SAG}:
        missing.append("T2_SAG|STIR_SAG")
    if SeriesRole.T2_AX not in roles:
        missing.append(SeriesRole.T2_AX.value)
    return missing


class Readiness:
    """Checks RECEIVING studies against their deadlines and writes their jobs."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._stepped_back: dict[str, dt.datetime] = {}

    def check(self, now: dt.datetime | None = None) -> float | None:
        """Decide every study whose deadline has passed; return seconds to the next deadline."""
        now = now or utcnow()
        next_deadline: dt.datetime | None = None
        pending_now = self._pending()
        for pending in pending_now:
            quiet = dt.timedelta(seconds=self.settings.quiet_period_s)
            timeout = dt.timedelta(seconds=self.settings.study_timeout_s)
            missing = missing_roles(pending.roles)
            deadline = self._last_arrival(pending, now) + (timeout if missing else quiet)
            if deadline > now:
                next_deadline = min(deadline, next_deadline or deadline)
                continue
            self._decide(pending, missing)
        live = {f"{p.study_id}:{p.input_key}" for p in pending_now}
        self._stepped_back = {key: at for key, at in self._stepped_back.items() if key in live}
        return None if next_deadline is None else max(0.0, (next_deadline - now).total_seconds())

    def _last_arrival(self, pending: Pending, now: dt.datetime) -> dt.datetime:
        """When the study's newest instance arrived; if that lies in the future, the wall clock
        stepped back since, and the timers count from when this process first saw it instead
        (else a study would wait as long as the step)."""
        if pending.last_received_at <= now + CLOCK_TOLERANCE:
            return pending.last_received_at
        key = f"{pending.study_id}:{pending.input_key}"
        if key not in self._stepped_back:
            LOGGER.warning("study %s: its last instance is stamped %.0f s in the future (the clock stepped back); "
                           "timers count from now", pending.study_instance_uid, (pending.last_received_at - now).total_seconds())
            self._stepped_back[key] = now
        return self._stepped_back[key]

    def _pending(self) -> list[Pending]:
        with reading(self.sessions) as session:
            rows = session.execute(
                select(
                    Study.id,
                    Study.study_instance_uid,
                    func.max(Instance.received_at),
                    func.count(Instance.id),
                    func.max(Instance.id),
                )
                .join(Instance, Instance.study_id == Study.id)
                .where(Study.state == StudyState.RECEIVING.value)
                .group_by(Study.id, Study.study_instance_uid)
            ).all()
            roles: dict[int, set[SeriesRole]] = {}
            if rows:
                for study_id, role in session.execute(
                    select(Series.study_id, Series.role).where(Series.study_id.in_([r[0] for r in rows])).distinct()
                ):
                    roles.setdefault(study_id, set()).add(SeriesRole(role))
        return [
            Pending(r[0], r[1], _as_utc(r[2]), r[3], r[4], frozenset(roles.get(r[0], ())))
            for r in rows
        ]

    def _decide(self, pending: Pending, missing: list[str]) -> None:
        if not missing:
            self._write_job(pending, missing, "all roles present and quiet period over")
        elif self.settings.incomplete_policy is IncompletePolicy.GRADE_PARTIAL and pending.roles & SAGITTAL_ROLES:
            self._write_job(pending, missing, f"study timeout with {', '.join(missing)} missing: grading what is there")
        else:
            reason = "no sagittal series to grade" if not pending.roles & SAGITTAL_ROLES else "policy mark_incomplete"
            self._set_state(pending, StudyState.INCOMPLETE, "incomplete",
                            f"study timeout with {', '.join(missing)} missing ({reason})", {"missing_roles": missing})

    def _write_job(self, pending: Pending, missing: list[str], why: str) -> None:
        """READY: supersede open grade jobs and write one job for exactly these instances."""
        with transaction(self.sessions) as session:
            if not _claim(session, pending):
                return
            exists = session.scalar(
                select(Job.id).where(Job.study_id == pending.study_id, Job.kind == JobKind.GRADE.value,
                                     Job.input_key == pending.input_key)
            )
            if exists is None:
                cancel_open_jobs(session, pending.study_id, JobKind.GRADE)
                session.add(Job(study_id=pending.study_id, kind=JobKind.GRADE.value, input_key=pending.input_key,
                                last_instance_id=pending.last_instance_id, partial=bool(missing), missing_roles=missing))
            _set(session, pending.study_id, StudyState.READY)
            session.add(Event(study_id=pending.study_id, kind="ready", message=why,
                              details={"instances": pending.instances, "missing_roles": missing,
                                       "job_written": exists is None}))
        LOGGER.info("study %s READY (%s)", pending.study_instance_uid, why)

    def _set_state(self, pending: Pending, state: StudyState, kind: str, message: str, details: dict[str, object]) -> None:
        with transaction(self.sessions) as session:
            if not _claim(session, pending):
                return
            _set(session, pending.study_id, state)
            session.add(Event(study_id=pending.study_id, kind=kind, message=message, details=details))
        LOGGER.info("study %s %s: %s", pending.study_instance_uid, state.value, message)


def _claim(session: Session, pending: Pending) -> bool:
    """Lock the study row and check nothing arrived since we looked (else the next check decides)."""
    study = session.get(Study, pending.study_id, with_for_update=True)
    if study is None or study.state != StudyState.RECEIVING.value:
        return False
    latest = session.scalar(select(func.max(Instance.id)).where(Instance.study_id == pending.study_id))
    return latest == pending.last_instance_id


def _set(session: Session, study_id: int, state: StudyState) -> None:
    session.execute(update(Study).where(Study.id == study_id).values(state=state.value))


def _as_utc(value: dt.datetime) -> dt.datetime:
    """Aggregates bypass the column type; SQLite hands them back naive (or as text)."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value
