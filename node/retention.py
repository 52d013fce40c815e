"""Retention: which studies may go, and purging them from the disk and the database.

**The rule.** A study is purged only when all of these hold:

1. its state has a retention (``retention_days`` in the settings, or ``purge --older-than``)
   and its last change (``studies.updated_at``) is older than that;
2. its state is a settled one: DELIVERED, GRADED, INCOMPLETE or FAILED. RECEIVING, READY and
   GRADING are work in progress and are never purged, whatever the settings say;
3. no job of the study is PENDING, QUEUED or RUNNING (a requeue or a delivery under way);
4. its results were delivered: a study with no result at all may go (INCOMPLETE, or FAILED
   because grading failed); a study with a result may go only when every delivery row of its
   newest result is SENT, or, when it has no delivery rows, only when no ``destinations`` are
   configured (a node without destinations keeps its results in the database: GRADED is then
   its end state, and there is nobody to deliver to). So a FAILED study with DEAD deliveries,
   and a GRADED study on a node with destinations, are kept until their results are delivered
   (``retry-failed``, ``requeue --from-stage deliver``) or the study is purged by hand after
   that. Older results of a study are superseded by its newest one and do not hold it back.

**Purging one study**, in this order, so that no row ever points at a file that is gone:

1. one transaction locks the study row and checks the rule again (the study may have changed
   since it was listed: a new instance re-opens it, a requeue writes a job); it lists the
   study's files (instances, result objects) with each file's identity (device, inode, size,
   mtime), writes that list to a journal file ``storage_dir/.purge/<id>-<uid>.json``
   (fsynced), deletes the study row (series, instances, jobs, results, result objects,
   deliveries and the study's events go with it: ON DELETE CASCADE), adds an audit entry
   (action ``purge``, the UID and counts; the audit log keeps it after the study is gone) and
   commits;
2. then the files are removed, each only if it is still the file that was listed (same
   identity: a PACS sending the same instance again meanwhile writes a new file, which stays),
   emptied folders are removed, and the journal goes last.

A crash before the commit leaves the study as it was (and a journal naming a study that still
exists, which is ignored and tidied away an hour later); a crash after it leaves files with
no rows, which the next run (:func:`finish_interrupted`, called by every purge) removes from
the journal. A study whose files were already gone (removed by hand) is purged all the same;
its missing files are counted. One line per purged study is logged (UIDs and counts only).
A dry run records nothing in the audit log: it changes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from node import audit
from node.audit import AuditAction
from node.config import Settings
from node.db import reading, transaction
from node.schema import Delivery, DeliveryState, Instance, Job, JobState, Result, ResultObject, Study, StudyState, utcnow
from node.store import INCOMING, fsync_dir, write_durably

LOGGER = logging.getLogger(__name__)

#: States a retention may purge; the others are work in progress and always kept.
PURGEABLE_STATES = (StudyState.DELIVERED, StudyState.GRADED, StudyState.INCOMPLETE, StudyState.FAILED)

#: Job states that hold a study back (work written or under way).
OPEN_JOB_STATES = (JobState.PENDING.value, JobState.QUEUED.value, JobState.RUNNING.value)

#: Folder below storage_dir holding the journal of each purge under way.
JOURNAL_DIR = ".purge"

#: Folder below storage_dir holding the result objects, one folder per study.
RESULTS_DIR = "results"

#: A journal naming a study that still exists is a purge that rolled back; removed after this.
STALE_JOURNAL_S = 3600.0

#: Studies examined per database round trip (IN lists stay short on every database).
_CHUNK = 500

Policy = dict[StudyState, float]  # state -> days to keep after the study's last change


@dataclass(frozen=True)
class PurgedStudy:
    """A study purged (or, in a dry run, one that would be): counts and bytes of its files."""

    study_instance_uid: str
    state: str
    age_days: float
    instances: int
    result_objects: int
    bytes: int  # freed, or that would be freed: the sizes of the files found on disk
    files_missing: int = 0  # listed in rows but not on disk


@dataclass(frozen=True)
class KeptStudy:
    """A study old enough for its state's retention that the rule keeps, and why."""

    study_instance_uid: str
    state: str
    age_days: float
    reason: str


@dataclass
class PurgeReport:
    """What one purge did (or, with ``dry_run``, would do)."""

    dry_run: bool
    purged: list[PurgedStudy] = field(default_factory=list)
    kept: list[KeptStudy] = field(default_factory=list)
    remaining: int = 0  # purgeable studies left for the next run (``limit``)
    interrupted: int = 0  # purges of an earlier run that were finished now (dry run: found)

    @property
    def studies(self) -> int:
        return len(self.purged)

    @property
    def instances(self) -> int:
        return sum(p.instances for p in self.purged)

    @property
    def bytes_freed(self) -> int:
        return sum(p.bytes for p in self.purged)

    def as_json(self) -> dict[str, Any]:
        """The report as ``purge --json`` prints it."""
        return {
            "dry_run": self.dry_run,
            "studies": self.studies,
            "instances": self.instances,
            "bytes_freed": self.bytes_freed,
            "remaining": self.remaining,
            "interrupted": self.interrupted,
            "purged": [asdict(p) for p in self.purged],
            "kept": [asdict(k) for k in self.kept],
        }


@dataclass(frozen=True)
class StudyFacts:
    """What the rule needs to know about a study besides its state."""

    open_job: str | None = None  # "grade job RUNNING", the first open job found
    has_result: bool = False
    deliveries: Counter[str] = field(default_factory=Counter)  # newest result's delivery rows by state


def keep_reason(state: str, facts: StudyFacts, destinations_configured: bool) -> str | None:
    """Why the rule keeps a study old enough for its state's retention; None if it may go."""
    if state not in {s.value for s in PURGEABLE_STATES}:
        return f"work in progress ({state})"
    if facts.open_job:
        return f"{facts.open_job}"
    if not facts.has_result:
        return None
    waiting = {s: n for s, n in facts.deliveries.items() if s != DeliveryState.SENT.value}
    if waiting:
        total = sum(facts.deliveries.values())
        return "result not delivered: " + ", ".join(f"{n} of {total} deliveries {s}" for s, n in sorted(waiting.items()))
    if not facts.deliveries and destinations_configured:
        return "result not delivered yet (destinations are configured)"
    return None


def retention_policy(settings: Settings) -> Policy:
    """The configured retention, ``retention_days``, by study state."""
    return {StudyState(state): days for state, days in settings.retention_days.items()}


def apply_retention(settings: Settings, sessions: sessionmaker[Session], limit: int | None = None) -> PurgeReport:
    """Purge what the configured retention allows (the node's loop calls this periodically)."""
    return purge(settings, sessions, retention_policy(settings), limit=limit, actor="retention")


def purge(settings: Settings, sessions: sessionmaker[Session], policy: Policy, dry_run: bool = False,
          limit: int | None = None, actor: str = "retention") -> PurgeReport:
    """Purge the studies ``policy`` allows under the rule, oldest first, at most ``limit``.

    Finishes any purge an earlier run left half done first. ``dry_run`` lists the same studies
    and touches nothing (not even an unfinished purge, which it only counts).
    """
    storage_dir = settings.storage_dir.resolve()
    report = PurgeReport(dry_run=dry_run)
    report.interrupted = len(_journals(storage_dir)) if dry_run else finish_interrupted(storage_dir, sessions)
    purgeable, report.kept = find_candidates(sessions, policy, bool(settings.destinations))
    if limit is not None:
        purgeable, report.remaining = purgeable[:limit], max(len(purgeable) - limit, 0)
    for study_id, age_days in purgeable:
        done = (_measure(sessions, storage_dir, study_id, age_days) if dry_run
                else _purge_study(sessions, storage_dir, study_id, policy, bool(settings.destinations), actor))
        if isinstance(done, PurgedStudy):
            report.purged.append(done)
        elif isinstance(done, KeptStudy):
            report.kept.append(done)
    if report.purged and not dry_run:
        LOGGER.info("retention purged %d studies, %d instances, %d bytes; kept %d", report.studies, report.instances,
                    report.bytes_freed, len(report.kept), extra={"actor": actor})
    return report


def find_candidates(sessions: sessionmaker[Session], policy: Policy,
                    destinations_configured: bool) -> tuple[list[tuple[int, float]], list[KeptStudy]]:
    """Studies past their state's retention: the (id, age in days) of those the rule lets go,
    oldest first, and those it keeps, with the reason."""
    if not policy:
        return [], []
    now = utcnow()
    with reading(sessions) as session:
        studies = session.execute(_past_retention(policy, now).order_by(Study.updated_at, Study.id)).all()
        facts = _facts(session, [s.id for s in studies])
    purgeable, kept = [], []
    for study_id, uid, state, updated_at in studies:
        age = _age_days(now, updated_at)
        reason = keep_reason(state, facts.get(study_id, StudyFacts()), destinations_configured)
        if reason is None:
            purgeable.append((study_id, age))
        else:
            kept.append(KeptStudy(uid, state, round(age, 3), reason))
    return purgeable, kept


def _past_retention(policy: Policy, now: dt.datetime) -> Any:
    """SELECT id, uid, state, updated_at of the studies older than their state's retention."""
    older = [and_(Study.state == state.value, Study.updated_at < now - dt.timedelta(days=days)) for state, days in policy.items()]
    return select(Study.id, Study.study_instance_uid, Study.state, Study.updated_at).where(or_(*older))


def _facts(session: Session, study_ids: Sequence[int]) -> dict[int, StudyFacts]:
    """Open jobs, results and the newest result's deliveries of each study, in a few queries."""
    open_jobs: dict[int, str] = {}
    newest: dict[int, int] = {}
    deliveries: dict[int, Counter[str]] = {}
    for chunk in _chunks(study_ids):
        for study_id, kind, state in session.execute(
                select(Job.study_id, Job.kind, Job.state).where(Job.study_id.in_(chunk), Job.state.in_(OPEN_JOB_STATES))
                .order_by(Job.id)):
            open_jobs.setdefault(study_id, f"{kind} job {state}")
        newest.update((study_id, result_id) for study_id, result_id in session.execute(
            select(Result.study_id, func.max(Result.id)).where(Result.study_id.in_(chunk)).group_by(Result.study_id)))
    by_result = {result_id: study_id for study_id, result_id in newest.items()}
    for chunk in _chunks(list(by_result)):
        for result_id, state, count in session.execute(
                select(Delivery.result_id, Delivery.state, func.count(Delivery.id)).where(Delivery.result_id.in_(chunk))
                .group_by(Delivery.result_id, Delivery.state)):
            deliveries.setdefault(by_result[result_id], Counter())[state] += count
    return {i: StudyFacts(open_jobs.get(i), i in newest, deliveries.get(i, Counter())) for i in study_ids}


@dataclass(frozen=True)
class _File:
    """One file of a study, relative to storage_dir, with its identity when it was listed."""

    path: str
    identity: tuple[int, int, int, int] | None  # (st_dev, st_ino, st_size, st_mtime_ns); None: not on disk

    @property
    def size(self) -> int:
        return self.identity[2] if self.identity else 0


def _list_files(session: Session, storage_dir: Path, study_id: int) -> tuple[list[_File], int, int]:
    """The study's instance and result object files with their identities; the two row counts."""
    instances = session.scalars(select(Instance.path).where(Instance.study_id == study_id)).all()
    objects = session.scalars(select(ResultObject.path).join(Result, Result.id == ResultObject.result_id)
                              .where(Result.study_id == study_id)).all()
    files = [_File(p, _identity(storage_dir, p)) for p in dict.fromkeys([*instances, *objects])]
    return files, len(instances), len(objects)


def _measure(sessions: sessionmaker[Session], storage_dir: Path, study_id: int, age_days: float) -> PurgedStudy | None:
    """A dry run's entry for one study: what purging it would free."""
    with reading(sessions) as session:
        study = session.get(Study, study_id)
        if study is None:
            return None
        files, instances, objects = _list_files(session, storage_dir, study_id)
    return _purged(study, age_days, instances, objects, files)


def _purge_study(sessions: sessionmaker[Session], storage_dir: Path, study_id: int, policy: Policy,
                 destinations_configured: bool, actor: str) -> PurgedStudy | KeptStudy | None:
    """Purge one study: rows (under the study's lock, the rule checked again), then files.

    Should the transaction fail, its journal stays: :func:`finish_interrupted` tells from the
    study row whether the delete committed after all.
    """
    with transaction(sessions) as session:
        study = session.scalars(select(Study).where(Study.id == study_id).with_for_update()).one_or_none()
        if study is None:
            return None  # purged meanwhile by another run
        age = _age_days(utcnow(), study.updated_at)
        days = policy.get(StudyState(study.state))
        if days is None or age < days:
            return None  # changed since it was listed (re-opened, requeued): not a candidate now
        reason = keep_reason(study.state, _facts(session, [study_id])[study_id], destinations_configured)
        if reason is not None:
            return KeptStudy(study.study_instance_uid, study.state, round(age, 3), reason)
        files, instances, objects = _list_files(session, storage_dir, study_id)
        journal = _write_journal(storage_dir, study, files)
        session.execute(delete(Study).where(Study.id == study_id))
        listed = _purged(study, age, instances, objects, files)
        audit.record(session, actor, AuditAction.PURGE, study.study_instance_uid, retention_days=days,
                     **{k: v for k, v in asdict(listed).items() if k != "study_instance_uid"})
    purged = replace(listed, bytes=_remove_files(storage_dir, files))
    journal.unlink()
    LOGGER.info("purged a study (%s, %.1f days since its last change): %d instances, %d result objects, %d bytes freed",
                purged.state, purged.age_days, purged.instances, purged.result_objects, purged.bytes,
                extra={"study_instance_uid": purged.study_instance_uid, "actor": actor})
    return purged


def _purged(study: Study, age_days: float, instances: int, objects: int, files: list[_File]) -> PurgedStudy:
    return PurgedStudy(study.study_instance_uid, study.state, round(age_days, 3), instances, objects,
                       sum(f.size for f in files), sum(f.identity is None for f in files))


def _write_journal(storage_dir: Path, study: Study, files: list[_File]) -> Path:
    """Durably record what a purge will remove, before the rows that name it go."""
    directory = storage_dir / JOURNAL_DIR
    directory.mkdir(parents=True, exist_ok=True)
    (storage_dir / INCOMING).mkdir(exist_ok=True)
    path = directory / f"{study.id}-{study.study_instance_uid}.json"
    entry = {"study_id": study.id, "study_instance_uid": study.study_instance_uid, "created_at": study.created_at.isoformat(),
             "files": [[f.path, *(f.identity or ())] for f in files]}
    write_durably(path, json.dumps(entry).encode(), storage_dir / INCOMING)
    fsync_dir(directory)
    return path


def _journals(storage_dir: Path) -> list[Path]:
    directory = storage_dir / JOURNAL_DIR
    return sorted(directory.glob("*.json")) if directory.is_dir() else []


def finish_interrupted(storage_dir: Path, sessions: sessionmaker[Session]) -> int:
    """Finish the purges a crash interrupted (rows deleted, files maybe not); return how many.

    A journal whose study row still exists belongs to a purge that never committed (or one
    under way in another process): it is left alone, and removed once it is an hour old.
    """
    finished = 0
    for journal in _journals(storage_dir):
        try:
            entry = json.loads(journal.read_text())
        except (OSError, ValueError) as exc:
            LOGGER.warning("cannot read purge journal %s: %s", journal.name, exc)
            continue
        with reading(sessions) as session:
            created = session.scalar(select(Study.created_at).where(Study.id == entry["study_id"]))
        if created is not None and created.isoformat() == entry["created_at"]:
            if time.time() - journal.stat().st_mtime > STALE_JOURNAL_S:
                journal.unlink(missing_ok=True)
            continue
        files = [_File(path, (identity[0], identity[1], identity[2], identity[3]) if identity else None)
                 for path, *identity in entry["files"]]
        freed = _remove_files(storage_dir, files)
        journal.unlink(missing_ok=True)
        finished += 1
        LOGGER.warning("finished an interrupted purge: %d bytes freed", freed, extra={"study_instance_uid": entry["study_instance_uid"]})
    return finished


def _remove_files(storage_dir: Path, files: Iterable[_File]) -> int:
    """Remove each file that is still the one listed; then the folders this emptied. Returns
    the bytes freed."""
    freed, folders = 0, set()
    for f in files:
        path = storage_dir / f.path
        if f.identity is None or not _inside(storage_dir, path):
            continue
        if _identity(storage_dir, f.path) != f.identity:
            continue  # gone already, or written again since (a re-sent instance): not ours to remove
        path.unlink(missing_ok=True)
        freed += f.size
        folders.add(path.parent)
    touched = set()
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        touched.add(_remove_empty(storage_dir, folder))
    for folder in touched:
        if folder.is_dir():
            fsync_dir(folder)  # the removals are durable before the journal goes
    return freed


def _remove_empty(storage_dir: Path, folder: Path) -> Path:
    """Remove ``folder`` and its parents while empty, up to ``storage_dir`` and its ``results``
    folder (which other processes write into); return the first folder kept."""
    while folder not in (storage_dir, storage_dir / RESULTS_DIR) and _inside(storage_dir, folder):
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): stop here
            return folder
        folder = folder.parent
    return folder


def _identity(storage_dir: Path, relative: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(storage_dir / relative)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _inside(storage_dir: Path, path: Path) -> bool:
    """True if ``path`` lies below ``storage_dir`` (a row's path never leads the purge outside)."""
    return os.path.normpath(path).startswith(str(storage_dir) + os.sep)


def _age_days(now: dt.datetime, updated_at: dt.datetime) -> float:
    return (now - updated_at).total_seconds() / 86400.0


def _chunks(values: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start:start + _CHUNK]


class Retention:
    """Retention from the node's loop: :func:`apply_retention` every ``every_s`` seconds (the
    first time at start), in batches of ``batch`` studies, the next batch at once while a
    backlog remains. A failure is logged and tried again later; it never stops the node."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], every_s: float = 3600.0, batch: int = 100) -> None:
        if every_s <= 0:
            raise ValueError(f"every_s must be positive, got {every_s}")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.settings, self.sessions, self.every_s, self.batch = settings, sessions, every_s, batch
        self._due = time.monotonic()

    def run_if_due(self) -> PurgeReport | None:
        """Purge one batch if it is time; return its report, or None if it was not time."""
        now = time.monotonic()
        if now < self._due:
            return None
        try:
            report = apply_retention(self.settings, self.sessions, limit=self.batch)
        except Exception:
            LOGGER.exception("retention failed; trying again in %.0f s", min(self.every_s, 300.0))
            self._due = now + min(self.every_s, 300.0)
            return None
        self._due = now if report.remaining else now + self.every_s
        return report
