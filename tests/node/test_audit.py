"""The audit log: requeue, retry-failed, purge and configuration changes recorded with who, what
and when, on SQLite and PostgreSQL; kept after a purge; shown by ``show``, exported by ``audit``;
refused UPDATE and DELETE by the database itself.

Studies are received through the real store; the commands run as an operator runs them.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from node.admin import NothingToDeliver, UnknownStudy, requeue, retry_failed, show_study
from node.audit import AuditAction, entries, local_actor, record, record_config
from node.config import Settings, load_settings
from node.db import make_engine, make_sessionmaker, migrate, transaction
from node.retention import apply_retention
from node.schema import AuditEntry, Job, JobKind, Study, utcnow
from node.store import InstanceStore
from node.web import start_web
from tests.node.test_web import fetch, token_of
from tests.support.dicomgen import make_study
from tests.support.services import NodeProcess, free_port, toml_text

PATIENT = ("AUDIT^PATIENT", "AUDIT-PID-0042")


@dataclass
class Site:
    """A node's config, database and store, without its network (nothing is served)."""

    node: NodeProcess
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: InstanceStore

    def receive(self, name: str) -> str:
        """Store a three-role study as the SCP would; return its StudyInstanceUID."""
        study = make_study(self.node.workdir / name, slices=1, patient_name=PATIENT[0], patient_id=PATIENT[1])
        for path in study.files:
            ds = dcmread(path)
            self.store.store(ds, path.read_bytes(), ds.file_meta.TransferSyntaxUID, "PACS")
        return study.study_instance_uid

    def settle(self, uid: str, state: str, age_days: float = 0.0) -> None:
        """Put the study in ``state``, last changed ``age_days`` ago, its open jobs done."""
        with transaction(self.sessions) as session:
            study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == uid))
            session.execute(update(Job).where(Job.study_id == study_id, Job.state.in_(["PENDING", "QUEUED", "RUNNING"]))
                            .values(state="FAILED" if state == "FAILED" else "DONE"))
            session.execute(update(Study).where(Study.id == study_id)
                            .values(state=state, updated_at=utcnow() - dt.timedelta(days=age_days)))

    def audit(self, **filters: Any) -> list[dict[str, Any]]:
        return list(entries(self.sessions, **filters))


@pytest.fixture
def site_factory(tmp_path: Path) -> Iterator[Callable[[str], Site]]:
    sites: list[Site] = []

    def make(database_url: str) -> Site:
        node = NodeProcess(tmp_path, database_url, retention_days={"DELIVERED": 30.0, "FAILED": 30.0})
        settings = load_settings(node.config)
        migrate(database_url)
        engine = make_engine(database_url)
        sites.append(Site(node, settings, engine, make_sessionmaker(engine), InstanceStore(settings, engine)))
        return sites[-1]

    yield make
    for site in sites:
        site.store.close()
        site.engine.dispose()


def at(entry: dict[str, Any]) -> dt.datetime:
    return dt.datetime.fromisoformat(entry["at"])


def test_the_database_refuses_to_change_or_delete_entries(site_factory: Callable[[str], Site], database_url: str) -> None:
    site = site_factory(database_url)
    with transaction(site.sessions) as session:
        record(session, "cli:alice@ws1", AuditAction.REQUEUE, "1.2.3", job_id=1)
    for statement in (update(AuditEntry).values(actor="cli:mallory@ws1"), delete(AuditEntry)):
        with pytest.raises(DBAPIError, match="append-only"), transaction(site.sessions) as session:
            session.execute(statement)
    [entry] = site.audit()
    assert (entry["actor"], entry["action"], entry["study_instance_uid"], entry["details"]) == ("cli:alice@ws1", "requeue", "1.2.3",
                                                                                                 {"job_id": 1})


def test_requeue_and_retry_failed_record_who_what_when(site_factory: Callable[[str], Site], database_url: str) -> None:
    site = site_factory(database_url)
    uid = site.receive("a")
    before = utcnow()
    job = requeue(site.sessions, uid, "cli:alice@ws1")
    [entry] = site.audit(study_instance_uid=uid)
    assert before <= at(entry) <= utcnow()
    assert (entry["actor"], entry["action"]) == ("cli:alice@ws1", "requeue")
    assert entry["details"] == {"from_stage": "grade", "job_id": job["id"], "previous_state": "RECEIVING", "missing_roles": []}

    with pytest.raises(NothingToDeliver):  # the action rolled back: so did its entry
        requeue(site.sessions, uid, "cli:alice@ws1", from_stage=JobKind.DELIVER)
    assert len(site.audit()) == 1

    site.settle(uid, "FAILED")
    [retried] = retry_failed(site.sessions, "cli:bob@ws2")
    assert [(e["actor"], e["action"], e["details"]["job_id"], e["details"]["previous_state"]) for e in site.audit()] == [
        ("cli:alice@ws1", "requeue", job["id"], "RECEIVING"), ("cli:bob@ws2", "retry-failed", retried["id"], "FAILED")]


def test_a_purge_keeps_the_entries_of_the_study_it_deletes(site_factory: Callable[[str], Site], database_url: str) -> None:
    site = site_factory(database_url)
    by_retention, by_hand = site.receive("a"), site.receive("b")
    requeue(site.sessions, by_retention, "web:admin")
    for uid in (by_retention, by_hand):
        site.settle(uid, "DELIVERED", age_days=40)

    dry = site.node.cli("purge", "--dry-run", "--json")
    assert json.loads(dry.stdout)["studies"] == 2 and [e["action"] for e in site.audit()] == ["requeue"]  # a dry run records nothing

    [purged] = apply_retention(site.settings, site.sessions, limit=1).purged
    assert purged.study_instance_uid == by_retention
    with pytest.raises(UnknownStudy):
        show_study(site.sessions, by_retention)
    requeued, gone = site.audit(study_instance_uid=by_retention)
    assert (requeued["actor"], requeued["action"]) == ("web:admin", "requeue")
    assert (gone["actor"], gone["action"]) == ("retention", "purge")
    assert gone["details"] == {"state": "DELIVERED", "age_days": purged.age_days, "retention_days": 30.0, "instances": 3,
                               "result_objects": 0, "bytes": purged.bytes, "files_missing": 0}

    site.node.cli("purge")
    [by_cli] = site.audit(study_instance_uid=by_hand)
    assert (by_cli["actor"], by_cli["action"], by_cli["details"]["state"]) == (local_actor("cli"), "purge", "DELIVERED")
    exported = site.node.cli("audit").stdout
    assert PATIENT[0] not in exported and PATIENT[1] not in exported


def test_a_start_records_the_settings_that_changed(site_factory: Callable[[str], Site], database_url: str) -> None:
    site = site_factory(database_url)
    secret = "hunter2-broker"
    first = load_settings(site.node.config, broker_url=f"redis://:{secret}@redis:6379/0")
    changed = record_config(site.sessions, first, "node:spine@host1")
    [initial] = site.audit(action=AuditAction.CONFIG)
    assert initial["actor"] == "node:spine@host1" and initial["study_instance_uid"] is None
    assert initial["details"]["initial"] is True and changed == initial["details"]["changed"] == sorted(Settings.model_fields)
    assert initial["details"]["settings"]["broker_url"] == "redis://:***@redis:6379/0" and secret not in json.dumps(initial)
    assert initial["details"]["settings"]["retention_days"] == {"DELIVERED": 30.0, "FAILED": 30.0}

    assert record_config(site.sessions, first, "node:spine@host1") == []  # the same settings: nothing recorded
    assert len(site.audit()) == 1

    second = load_settings(site.node.config, broker_url="redis://:rotated@redis:6379/0", quiet_period_s=5.0,
                           retention_days={"DELIVERED": 7.0})
    assert record_config(site.sessions, second, "node:spine@host1") == ["quiet_period_s", "retention_days"]
    [_, later] = site.audit(action=AuditAction.CONFIG)
    assert later["details"]["initial"] is False and later["details"]["changed"] == ["quiet_period_s", "retention_days"]
    assert later["details"]["previous"] == {"quiet_period_s": 0.5, "retention_days": {"DELIVERED": 30.0, "FAILED": 30.0}}
    assert later["details"]["settings"]["quiet_period_s"] == 5.0 and "rotated" not in json.dumps(later)


def test_serve_records_its_settings_when_they_changed(node_factory: Callable[..., NodeProcess], sqlite_url: str) -> None:
    node = node_factory(sqlite_url)
    assert node.stop() == 0
    node.start()  # the same settings: nothing recorded
    assert node.stop() == 0
    node.settings["quiet_period_s"] = 2.0
    node.config.write_text(toml_text(node.settings))
    node.start()
    rows = [json.loads(line) for line in node.cli("audit", "--action", "config").stdout.splitlines()]
    assert [(r["actor"], r["details"]["initial"]) for r in rows] == [(local_actor("node"), True), (local_actor("node"), False)]
    assert rows[1]["details"]["changed"] == ["quiet_period_s"] and rows[1]["details"]["previous"] == {"quiet_period_s": 0.5}


def test_show_lists_the_entries_and_the_export_round_trips(site_factory: Callable[[str], Site], sqlite_url: str) -> None:
    site = site_factory(sqlite_url)
    uid, other = site.receive("a"), site.receive("b")
    record_config(site.sessions, site.settings, "node:spine@host1")
    site.node.cli("requeue", uid)
    assert site.node.cli("requeue", uid, "--from-stage", "deliver", check=False).returncode == 1  # no result: nothing recorded
    requeue(site.sessions, other, "web:admin")

    shown = json.loads(site.node.cli("show", uid, "--json").stdout)
    [entry] = shown["audit"]
    assert (entry["actor"], entry["action"], entry["details"]["job_id"]) == (local_actor("cli"), "requeue", shown["jobs"][-1]["id"])
    table = site.node.cli("show", uid).stdout
    assert "audit log" in table and local_actor("cli") in table and "from_stage=grade" in table

    rows = [json.loads(line) for line in site.node.cli("audit").stdout.splitlines()]
    assert [(r["action"], r["study_instance_uid"]) for r in rows] == [("config", None), ("requeue", uid), ("requeue", other)]
    assert rows == sorted(rows, key=at) and rows[1] == entry
    parsed = list(csv.DictReader(io.StringIO(site.node.cli("audit", "--format", "csv").stdout)))
    assert [{**r, "id": int(r["id"]), "study_instance_uid": r["study_instance_uid"] or None, "details": json.loads(r["details"])}
            for r in parsed] == rows

    assert [json.loads(line)["study_instance_uid"] for line in site.node.cli("audit", "--study", other).stdout.splitlines()] == [other]
    assert site.node.cli("audit", "--action", "requeue", "--since", rows[1]["at"]).stdout.count("\n") == 2
    assert site.node.cli("audit", "--since", (utcnow() + dt.timedelta(hours=1)).replace(tzinfo=None).isoformat()).stdout == ""
    bad = site.node.cli("audit", "--since", "yesterday", check=False)
    assert bad.returncode == 2 and "not an ISO 8601 time" in bad.stderr


def test_the_status_page_records_its_user(tmp_path: Path) -> None:
    password_file = tmp_path / "web-password"
    password_file.write_text("s3cret pass\n")
    settings = load_settings(database_url=f"sqlite:///{tmp_path / 'node.db'}", storage_dir=tmp_path / "storage", host="127.0.0.1",
                             web_port=free_port(), web_user="auditor", web_password_file=password_file)
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    with transaction(sessions) as session:
        session.add(Study(study_instance_uid="1.2.826.0.1.3680043.8.498.301", state="FAILED"))
    server = start_web(settings, sessions)
    url = f"http://127.0.0.1:{server.server_address[1]}/studies/1.2.826.0.1.3680043.8.498.301"
    try:
        token = token_of(fetch(url, user="auditor", password="s3cret pass")[2])
        status, _, _ = fetch(url + "/requeue", user="auditor", password="s3cret pass", form={"token": token, "stage": "grade"})
        assert status == 303
        [entry] = entries(sessions)
        assert (entry["actor"], entry["action"], entry["details"]["from_stage"]) == ("web:auditor", "requeue", "grade")
        page = fetch(url, user="auditor", password="s3cret pass")[2].decode()
        assert "<h2>Audit log</h2>" in page and "<td>requeue</td><td>web:auditor</td><td>from_stage=grade, job_id=1" in page
    finally:
        server.shutdown()
        engine.dispose()
