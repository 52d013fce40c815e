"""Retention and disk safety: what may be purged, purging files and rows, a crash mid-purge, the
``purge`` command, and the free-space watermark.

Studies are received through the real store (files written and indexed as a PACS would leave
them), then given states, ages, jobs, results, result object files and deliveries directly in
the database, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from node import retention
from node.audit import AuditAction, entries
from node.config import Settings, load_settings
from node.db import make_engine, make_sessionmaker, migrate, transaction
from node.retention import JOURNAL_DIR, PurgeReport, StudyFacts, apply_retention, finish_interrupted, keep_reason, purge
from node.schema import (Delivery, Event, Instance, Job, Result, ResultObject, Series, Study, StudyState, utcnow)
from node.store import InstanceStore
from tests.support.dicomgen import GeneratedStudy, make_study
from tests.support.services import NodeProcess, send_raw, store, toml_text, wait_for

PACS = {"ae_title": "PACS", "host": "127.0.0.1", "port": 11113}
RETENTION = {"DELIVERED": 30.0, "GRADED": 30.0, "INCOMPLETE": 30.0, "FAILED": 30.0, "READY": 30.0}
STUDY_ROWS = (Series, Instance, Job, Result, Delivery, Event)


class Site:
    """A node's storage and database without its network: studies are put in place directly."""

    def __init__(self, tmp_path: Path, database_url: str, **settings: Any) -> None:
        self.tmp_path = tmp_path
        self.values = {"database_url": database_url, "storage_dir": str(tmp_path / "storage"), "min_free_disk_mb": 0,
                       "retention_days": RETENTION, "destinations": [PACS], **settings}
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.config = tmp_path / "spine-node.toml"
        self.config.write_text(toml_text(self.values))
        self.settings: Settings = load_settings(self.config)
        self.storage = self.settings.storage_dir
        migrate(database_url)
        self.engine = make_engine(database_url)
        self.sessions: sessionmaker[Session] = make_sessionmaker(self.engine)
        self._store: InstanceStore | None = None

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        self.engine.dispose()

    def receive(self, study: GeneratedStudy, fresh_store: bool = False) -> None:
        """Store a study's files as the SCP would (``fresh_store``: as a restarted node would)."""
        if self._store is None or fresh_store:
            if self._store is not None:
                self._store.close()
            self._store = InstanceStore(self.settings, self.engine)
        for path in study.files:
            ds = dcmread(path)
            self._store.store(ds, path.read_bytes(), ds.file_meta.TransferSyntaxUID, "PACS")

    def study(self, state: str, age_days: float, results: tuple[tuple[str, ...], ...] = (), open_job: str | None = None) -> str:
        """A received study in ``state``, last changed ``age_days`` ago, with ``results`` (oldest
        first; each the delivery states of its objects, "" for an object with no delivery row)."""
        generated = make_study(self.tmp_path / "sent" / generate_uid(), roles=("T1_SAG", "T2_SAG", "T2_AX"), slices=2)
        self.receive(generated)
        uid = generated.study_instance_uid
        with transaction(self.sessions) as session:
            study_id = session.scalars(select(Study.id).where(Study.study_instance_uid == uid)).one()
            for number, deliveries in enumerate(results):
                self._result(session, study_id, uid, number, deliveries)
            if open_job:
                session.add(Job(study_id=study_id, kind="deliver", state=open_job, input_key="requeue-1"))
            session.flush()
            session.execute(update(Study).where(Study.id == study_id)
                            .values(state=state, updated_at=utcnow() - dt.timedelta(days=age_days)))
        return uid

    def _result(self, session: Session, study_id: int, uid: str, number: int, deliveries: tuple[str, ...]) -> None:
        job = Job(study_id=study_id, kind="grade", state="DONE", input_key=f"grade-{number}")
        session.add(job)
        session.flush()
        result = Result(study_id=study_id, job_id=job.id, input_key=f"result-{number}", model_name="grader", model_version="1",
                        weights_sha256="0" * 64, payload={"study_instance_uid": uid})
        session.add(result)
        session.flush()
        for state in deliveries:
            sop = generate_uid()
            relative = f"results/{uid}/{sop}.dcm"
            (self.storage / relative).parent.mkdir(parents=True, exist_ok=True)
            (self.storage / relative).write_bytes(b"\0" * 128 + b"DICM" + bytes(1000))
            session.add(ResultObject(result_id=result.id, kind="SR", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                                     sop_instance_uid=sop, path=relative))
            if state:
                session.add(Delivery(study_id=study_id, result_id=result.id, destination="PACS@127.0.0.1:11113",
                                     via="PACS@127.0.0.1:11113", sop_instance_uid=sop, state=state))

    def files(self) -> dict[str, int]:
        """Every stored file (instances, result objects) by path below storage_dir, with its size."""
        return {str(p.relative_to(self.storage)): p.stat().st_size for p in self.storage.rglob("*")
                if p.is_file() and p.relative_to(self.storage).parts[0] not in (".incoming", JOURNAL_DIR)}

    def files_of(self, uid: str) -> dict[str, int]:
        return {p: size for p, size in self.files().items() if uid in Path(p).parts}

    def rows_of(self, uid: str) -> int:
        """The study's rows in every table (0 when it is gone)."""
        with self.sessions() as session:
            study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == uid))
            if study_id is None:
                return 0
            rows = 1 + sum(session.scalar(select(func.count()).select_from(t).where(t.study_id == study_id)) or 0
                           for t in STUDY_ROWS)
            return rows + (session.scalar(select(func.count(ResultObject.id)).join(Result).where(Result.study_id == study_id)) or 0)

    def purge_entries(self) -> list[dict[str, Any]]:
        return list(entries(self.sessions, action=AuditAction.PURGE))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "node.cli", "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=120)


@pytest.fixture
def site_factory(tmp_path: Path) -> Iterator[Callable[..., Site]]:
    sites: list[Site] = []

    def make(database_url: str, **settings: Any) -> Site:
        sites.append(Site(tmp_path / f"site{len(sites)}", database_url, **settings))
        return sites[-1]

    yield make
    for site in sites:
        site.close()


def uids(report: PurgeReport) -> set[str]:
    return {p.study_instance_uid for p in report.purged}


def reasons(report: PurgeReport) -> dict[str, str]:
    return {k.study_instance_uid: k.reason for k in report.kept}


@pytest.mark.parametrize(("state", "facts", "destinations", "kept"), [
    ("DELIVERED", StudyFacts(has_result=True, deliveries=Counter({"SENT": 3})), True, None),
    ("FAILED", StudyFacts(), True, None),  # grading failed: nothing to deliver
    ("INCOMPLETE", StudyFacts(), True, None),
    ("FAILED", StudyFacts(has_result=True, deliveries=Counter({"SENT": 2, "DEAD": 1})), True, "1 of 3 deliveries DEAD"),
    ("GRADED", StudyFacts(has_result=True, deliveries=Counter({"PENDING": 3})), True, "3 of 3 deliveries PENDING"),
    ("GRADED", StudyFacts(has_result=True), True, "destinations are configured"),
    ("GRADED", StudyFacts(has_result=True), False, None),  # no destinations: GRADED is the end
    ("DELIVERED", StudyFacts(open_job="deliver job QUEUED", has_result=True, deliveries=Counter({"SENT": 3})), True,
     "deliver job QUEUED"),
    ("RECEIVING", StudyFacts(), False, "work in progress"),
    ("READY", StudyFacts(), False, "work in progress"),
    ("GRADING", StudyFacts(), False, "work in progress"),
])
def test_the_rule(state: str, facts: StudyFacts, destinations: bool, kept: str | None) -> None:
    reason = keep_reason(state, facts, destinations)
    assert (reason is None) == (kept is None) and (kept is None or kept in str(reason))


def test_retention_purges_only_what_the_rule_allows(site_factory: Callable[..., Site], database_url: str) -> None:
    site = site_factory(database_url)
    gone = {
        site.study("DELIVERED", 40, results=(("SENT", "SENT"),)),
        site.study("DELIVERED", 40, results=(("DEAD",), ("SENT",))),  # an older result is superseded by the newest
        site.study("FAILED", 31, results=()),  # grading failed: no result to deliver
        site.study("INCOMPLETE", 45),
    }
    young = site.study("DELIVERED", 10, results=(("SENT",),))
    kept = {
        site.study("FAILED", 40, results=(("SENT", "DEAD"),)): "1 of 2 deliveries DEAD",
        site.study("DELIVERED", 40, results=(("SENT",),), open_job="PENDING"): "deliver job PENDING",
        site.study("GRADED", 40, results=(("",),)): "result not delivered yet",
        site.study("READY", 40): "work in progress",
    }
    before = site.files()
    size_of_gone = sum(size for uid in gone for size in site.files_of(uid).values())
    assert size_of_gone > 0 and all(site.files_of(uid) and site.rows_of(uid) for uid in gone)

    dry = purge(site.settings, site.sessions, retention.retention_policy(site.settings), dry_run=True)
    assert uids(dry) == gone and dry.bytes_freed == size_of_gone and dry.instances == 4 * 6
    assert {uid: r for uid, r in reasons(dry).items()}.keys() == kept.keys()
    assert site.files() == before and all(site.rows_of(uid) for uid in gone) and site.purge_entries() == []

    report = apply_retention(site.settings, site.sessions)
    assert uids(report) == gone and report.bytes_freed == size_of_gone and report.instances == 4 * 6
    for uid, why in kept.items():
        assert why in reasons(report)[uid]
    for uid in gone:
        assert site.rows_of(uid) == 0 and site.files_of(uid) == {}
        assert not (site.storage / uid).exists() and not (site.storage / "results" / uid).exists()
    assert site.files() == {p: s for p, s in before.items() if not any(uid in Path(p).parts for uid in gone)}
    for uid in (young, *kept):
        assert site.rows_of(uid) > 0 and site.files_of(uid)
    assert {e["study_instance_uid"] for e in site.purge_entries()} == gone
    assert not any((site.storage / JOURNAL_DIR).iterdir())

    again = apply_retention(site.settings, site.sessions)
    assert again.purged == [] and reasons(again).keys() == kept.keys()


def test_graded_is_the_end_state_without_destinations(site_factory: Callable[..., Site], database_url: str) -> None:
    site = site_factory(database_url, destinations=[])
    graded = site.study("GRADED", 40, results=(("",),))
    recent = site.study("GRADED", 20, results=(("",),))
    assert uids(apply_retention(site.settings, site.sessions)) == {graded}
    assert site.rows_of(recent) and site.files_of(recent)


def test_a_batch_limit_leaves_the_rest_for_the_next_run(site_factory: Callable[..., Site], sqlite_url: str) -> None:
    site = site_factory(sqlite_url)
    oldest, older = site.study("INCOMPLETE", 50), site.study("INCOMPLETE", 40)
    first = apply_retention(site.settings, site.sessions, limit=1)
    assert uids(first) == {oldest} and first.remaining == 1
    second = apply_retention(site.settings, site.sessions, limit=1)
    assert uids(second) == {older} and second.remaining == 0


def test_a_study_requeued_after_it_was_listed_is_kept(site_factory: Callable[..., Site], database_url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    site = site_factory(database_url)
    uid = site.study("DELIVERED", 40, results=(("SENT",),))
    files, rows = site.files_of(uid), site.rows_of(uid)
    listed = retention.find_candidates

    def requeued_meanwhile(*args: Any) -> Any:
        found = listed(*args)
        with transaction(site.sessions) as session:  # as `requeue --from-stage deliver` would, between list and purge
            study_id = session.scalars(select(Study.id).where(Study.study_instance_uid == uid)).one()
            session.add(Job(study_id=study_id, kind="deliver", state="PENDING", input_key="requeue-1"))
        return found

    monkeypatch.setattr(retention, "find_candidates", requeued_meanwhile)
    report = apply_retention(site.settings, site.sessions)
    assert report.purged == [] and reasons(report) == {uid: "deliver job PENDING"}
    assert site.files_of(uid) == files and site.rows_of(uid) == rows + 1


def test_the_loop_runs_retention_hourly_in_batches_and_survives_a_failure(site_factory: Callable[..., Site], sqlite_url: str,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    site = site_factory(sqlite_url)
    first, second = site.study("INCOMPLETE", 50), site.study("INCOMPLETE", 40)
    loop = retention.Retention(site.settings, site.sessions, every_s=3600.0, batch=1)
    ran = loop.run_if_due()  # at start
    assert ran is not None and uids(ran) == {first} and ran.remaining == 1
    ran = loop.run_if_due()  # a backlog: the next batch at once
    assert ran is not None and uids(ran) == {second} and ran.remaining == 0
    assert loop.run_if_due() is None  # then not before an hour

    def broken(*args: Any, **kwargs: Any) -> PurgeReport:
        raise RuntimeError("database unreachable")

    monkeypatch.setattr(retention, "apply_retention", broken)
    monkeypatch.setattr(loop, "_due", 0.0)
    assert loop.run_if_due() is None  # logged, not raised: receiving goes on
    assert "retention failed" in caplog.text and "database unreachable" in caplog.text


class Crash(BaseException):
    """The process dies here."""


def test_a_crash_after_the_rows_went_is_finished_by_the_next_run(site_factory: Callable[..., Site], database_url: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    site = site_factory(database_url)
    uid = site.study("DELIVERED", 40, results=(("SENT", "SENT"),))
    files = site.files_of(uid)
    remove = retention._remove_files

    def crash_after_one_file(storage_dir: Path, listed: Any) -> int:
        remove(storage_dir, list(listed)[:1])
        raise Crash

    monkeypatch.setattr(retention, "_remove_files", crash_after_one_file)
    with pytest.raises(Crash):
        apply_retention(site.settings, site.sessions)
    monkeypatch.undo()
    left = site.files_of(uid)
    assert site.rows_of(uid) == 0 and len(left) == len(files) - 1
    assert len(list((site.storage / JOURNAL_DIR).iterdir())) == 1

    # Meanwhile the PACS sends one of the study's instances again (to a restarted node): it is a
    # new study now, acknowledged, and its file must survive the rest of the old purge.
    resent = sorted(p for p in left if not p.startswith("results/"))[0]
    again = make_study(site.tmp_path / "again", roles=("T2_AX",), slices=1, study_instance_uid=uid)
    shutil.copy(site.storage / resent, again.files[0])
    site.receive(again, fresh_store=True)

    report = apply_retention(site.settings, site.sessions)
    assert report.interrupted == 1 and report.purged == []  # the new study is RECEIVING, not a candidate
    assert site.files_of(uid) == {resent: files[resent]}
    assert not (site.storage / "results" / uid).exists()
    assert site.rows_of(uid) > 0 and not any((site.storage / JOURNAL_DIR).iterdir())


def test_a_crash_before_the_commit_leaves_the_study_whole(site_factory: Callable[..., Site], database_url: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    site = site_factory(database_url)
    uid = site.study("DELIVERED", 40, results=(("SENT",),))
    files, rows = site.files_of(uid), site.rows_of(uid)
    write = retention._write_journal

    def crash_after_the_journal(*args: Any) -> Path:
        write(*args)
        raise Crash

    monkeypatch.setattr(retention, "_write_journal", crash_after_the_journal)
    with pytest.raises(Crash):
        apply_retention(site.settings, site.sessions)
    monkeypatch.undo()
    assert site.files_of(uid) == files and site.rows_of(uid) == rows
    assert finish_interrupted(site.storage.resolve(), site.sessions) == 0  # the study is still there: nothing to finish
    assert site.files_of(uid) == files

    report = apply_retention(site.settings, site.sessions)
    assert uids(report) == {uid} and report.interrupted == 0
    assert site.files_of(uid) == {} and site.rows_of(uid) == 0 and not any((site.storage / JOURNAL_DIR).iterdir())


def test_files_already_gone_with_rows_still_there(site_factory: Callable[..., Site], database_url: str) -> None:
    site = site_factory(database_url)
    uid = site.study("DELIVERED", 40, results=(("SENT",),))
    files = site.files_of(uid)
    shutil.rmtree(site.storage / uid)  # as a purge that removed files first would leave it, or an admin
    [purged] = apply_retention(site.settings, site.sessions).purged
    assert purged.files_missing == 6 and purged.instances == 6 and purged.bytes == sum(
        size for path, size in files.items() if path.startswith("results/"))
    assert site.rows_of(uid) == 0 and site.files_of(uid) == {}


def test_purge_command(site_factory: Callable[..., Site], database_url: str) -> None:
    site = site_factory(database_url)
    old = site.study("DELIVERED", 25, results=(("SENT",),))
    failed = site.study("FAILED", 25)
    dead = site.study("FAILED", 25, results=(("DEAD",),))
    recent = site.study("DELIVERED", 5, results=(("SENT",),))
    before = site.files()

    dry = site.cli("purge", "--older-than", "20", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    listed = json.loads(dry.stdout)
    assert listed["dry_run"] is True and {p["study_instance_uid"] for p in listed["purged"]} == {old, failed}
    assert [(k["study_instance_uid"], k["reason"]) for k in listed["kept"]] == [(dead, "result not delivered: 1 of 1 deliveries DEAD")]
    assert site.files() == before

    only_failed = site.cli("purge", "--older-than", "20", "--state", "FAILED")
    assert only_failed.returncode == 0, only_failed.stderr
    assert "purged 1 studies, 6 instances" in only_failed.stdout
    assert failed in only_failed.stdout and dead in only_failed.stdout and "1 of 1 deliveries DEAD" in only_failed.stdout
    assert site.rows_of(failed) == 0 and site.rows_of(old) > 0

    configured = site.cli("purge", "--json")  # retention_days: 30 days for DELIVERED, so nothing more goes
    assert configured.returncode == 0 and json.loads(configured.stdout)["studies"] == 0

    everything = site.cli("purge", "--older-than", "1")
    assert everything.returncode == 0 and "purged 2 studies" in everything.stdout
    assert site.rows_of(old) == site.rows_of(recent) == 0 and site.rows_of(dead) > 0

    refused = site.cli("purge", "--older-than", "1", "--state", "RECEIVING")
    assert refused.returncode == 2 and "invalid choice" in refused.stderr


def test_a_purged_study_sent_again_is_received(node_factory: Callable[..., NodeProcess], database_url: str,
                                               tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", slices=2)
    node = node_factory(database_url, quiet_period_s=0.2, retention_days={"DELIVERED": 30.0})
    assert store(node.port, tmp_path / "study").returncode == 0
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    try:
        wait_for(lambda: _state(sessions, study.study_instance_uid) == "READY", 30, "READY")
        with transaction(sessions) as session:  # graded and delivered long ago, as far as retention can tell
            session.execute(update(Job).values(state="DONE"))
            session.execute(update(Study).values(state=StudyState.DELIVERED.value, updated_at=utcnow() - dt.timedelta(days=40)))
        purged = node.cli("purge", "--json")
        assert json.loads(purged.stdout)["studies"] == 1
        assert not (node.workdir / "storage" / study.study_instance_uid).exists()

        again = store(node.port, tmp_path / "study")  # the same node, which saw the study's series before
        assert again.returncode == 0 and "Failed" not in again.stderr, again.stderr
        wait_for(lambda: _state(sessions, study.study_instance_uid) == "READY", 30, "READY again")
        assert len(list((node.workdir / "storage" / study.study_instance_uid).rglob("*.dcm"))) == 6
    finally:
        engine.dispose()


def _state(sessions: sessionmaker[Session], uid: str) -> str | None:
    with sessions() as session:
        return session.scalar(select(Study.state).where(Study.study_instance_uid == uid))


@pytest.mark.parametrize(("margin_mb", "status"), [(1, 0xA700), (-256, 0x0000)])
def test_the_watermark_is_the_free_space_in_mib(node_factory: Callable[..., NodeProcess], sqlite_url: str, tmp_path: Path,
                                                margin_mb: int, status: int) -> None:
    """Just above the free space refuses, a little below accepts: the watermark is compared with
    the storage disk's real free space, in MiB (tests/node/test_receive.py has the far-off case)."""
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=1)
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    if free_mb < 512:
        pytest.skip("needs some free disk to place the watermark below it")
    node = node_factory(sqlite_url, min_free_disk_mb=free_mb + margin_mb)
    assert send_raw(node.port, study.files[0]) == status
    stored = [p for p in (node.workdir / "storage").rglob("*.dcm")]
    listed = json.loads(node.cli("studies", "--json").stdout)
    if status:
        assert stored == [] and listed == []
    else:
        assert len(stored) == 1 and listed[0]["instances"] == 1
