"""Readiness, store and admin actions against a real database, with the clock passed in."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from rich.console import Console
from pydicom.uid import generate_uid
from sqlalchemy import Engine, text

from node.admin import UnknownStudy, list_studies, requeue, show_study
from node.config import Settings, load_settings
from node.db import make_engine, make_sessionmaker, migrate
from node.readiness import Readiness
from node.schema import StudyState, utcnow
from node.store import InstanceStore
from node.views import print_study
from tests.support.dicomgen import GeneratedStudy, make_study
from tests.support.services import wait_for


def make_node(database_url: str, tmp_path: Path, **overrides: object) -> tuple[Settings, InstanceStore, Readiness]:
    settings = load_settings(database_url=database_url, storage_dir=tmp_path / "storage", min_free_disk_mb=0,
                             quiet_period_s=10, study_timeout_s=100, **overrides)
    migrate(database_url)
    engine = make_engine(database_url)
    return settings, InstanceStore(settings, engine), Readiness(settings, make_sessionmaker(engine))


def receive(store: InstanceStore, files: list[Path]) -> None:
    for path in files:
        ds = dcmread(path)
        store.store(ds, path.read_bytes(), ds.file_meta.TransferSyntaxUID, "TESTSCU")


def later(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)


def test_ready_after_the_quiet_period_with_exactly_one_job(database_url: str, tmp_path: Path) -> None:
    _, store, readiness = make_node(database_url, tmp_path)
    study = make_study(tmp_path / "study")
    receive(store, study.files)
    wait = readiness.check()
    assert wait is not None and 9 < wait <= 10
    assert show_study(readiness.sessions, study.study_instance_uid)["state"] == "RECEIVING"
    assert readiness.check(later(11)) is None
    for _ in range(3):
        readiness.check(later(12))
    detail = show_study(readiness.sessions, study.study_instance_uid)
    assert detail["state"] == "READY" and len(detail["jobs"]) == 1
    assert detail["jobs"][0]["missing_roles"] == [] and detail["jobs"][0]["state"] == "PENDING"


@pytest.mark.parametrize(
    ("roles", "policy", "state", "missing"),
    [
        (("T1_SAG", "T2_SAG"), "grade_partial", "READY", ["T2_AX"]),
        (("T2_SAG", "T2_AX"), "grade_partial", "READY", ["T1_SAG"]),
        (("T1_SAG", "T2_AX"), "grade_partial", "READY", ["T2_SAG|STIR_SAG"]),
        (("T2_AX", "COR"), "grade_partial", "INCOMPLETE", ["T1_SAG", "T2_SAG|STIR_SAG"]),
        (("T1_SAG", "T2_SAG"), "mark_incomplete", "INCOMPLETE", ["T2_AX"]),
    ],
)
def test_study_timeout(sqlite_url: str, tmp_path: Path, roles: tuple[str, ...], policy: str, state: str,
                       missing: list[str]) -> None:
    _, store, readiness = make_node(sqlite_url, tmp_path, incomplete_policy=policy)
    study = make_study(tmp_path / "study", roles=roles, slices=1)
    receive(store, study.files)
    readiness.check(later(50))  # quiet period over, but a role is missing: wait for the timeout
    assert show_study(readiness.sessions, study.study_instance_uid)["state"] == "RECEIVING"
    readiness.check(later(101))
    detail = show_study(readiness.sessions, study.study_instance_uid)
    assert detail["state"] == state and detail["missing_roles"] == missing
    assert [j["missing_roles"] for j in detail["jobs"]] == ([missing] if state == "READY" else [])


def test_new_instance_after_ready_reopens_and_supersedes(database_url: str, tmp_path: Path) -> None:
    _, store, readiness = make_node(database_url, tmp_path)
    study = make_study(tmp_path / "study", slices=2)
    receive(store, study.files)
    readiness.check(later(11))
    late = make_study(tmp_path / "late", roles=("T2_AX",), slices=1, study_instance_uid=study.study_instance_uid)
    receive(store, late.files)
    assert show_study(readiness.sessions, study.study_instance_uid)["state"] == "RECEIVING"
    readiness.check(later(11))
    readiness.check(later(12))
    jobs = show_study(readiness.sessions, study.study_instance_uid)["jobs"]
    assert [j["state"] for j in jobs] == ["CANCELLED", "PENDING"]


def test_requeue_writes_a_new_job_and_records_who(database_url: str, tmp_path: Path) -> None:
    _, store, readiness = make_node(database_url, tmp_path)
    study = make_study(tmp_path / "study", slices=1)
    receive(store, study.files)
    readiness.check(later(11))
    requeue(readiness.sessions, study.study_instance_uid, actor="cli:tester")
    requeue(readiness.sessions, study.study_instance_uid, actor="cli:tester")
    detail = show_study(readiness.sessions, study.study_instance_uid)
    assert [j["state"] for j in detail["jobs"]] == ["CANCELLED", "CANCELLED", "PENDING"]
    assert [e["actor"] for e in detail["timeline"] if e["kind"] == "requeued"] == ["cli:tester"] * 2
    with pytest.raises(UnknownStudy):
        requeue(readiness.sessions, "1.2.3.4", actor="cli:tester")


def test_studies_are_listed_and_filtered_by_state(sqlite_url: str, tmp_path: Path) -> None:
    _, store, readiness = make_node(sqlite_url, tmp_path)
    ready = make_study(tmp_path / "a", slices=1)
    waiting = make_study(tmp_path / "b", roles=("T2_SAG",), slices=2)
    receive(store, ready.files + waiting.files)
    readiness.check(later(11))
    rows = {r["study_instance_uid"]: r for r in list_studies(readiness.sessions)}
    assert set(rows[ready.study_instance_uid]) == {"study_instance_uid", "state", "instances", "series", "updated_at"}
    assert (rows[ready.study_instance_uid]["state"], rows[ready.study_instance_uid]["instances"]) == ("READY", 3)
    assert (rows[waiting.study_instance_uid]["series"], rows[waiting.study_instance_uid]["instances"]) == (1, 2)
    only = list_studies(readiness.sessions, StudyState.RECEIVING)
    assert [r["study_instance_uid"] for r in only] == [waiting.study_instance_uid]


def test_show_has_the_contract_keys(sqlite_url: str, tmp_path: Path) -> None:
    _, store, readiness = make_node(sqlite_url, tmp_path)
    study = make_study(tmp_path / "study", slices=1)
    receive(store, study.files)
    detail = show_study(readiness.sessions, study.study_instance_uid)
    assert {"study_instance_uid", "state", "series", "jobs", "timeline", "result", "deliveries", "audit"} <= set(detail)
    assert {"series_instance_uid", "role", "role_reason", "instances"} <= set(detail["series"][0])
    assert [e["kind"] for e in detail["timeline"]][:2] == ["study_created", "series_added"]


def test_a_failed_commit_leaves_no_file(sqlite_url: str, tmp_path: Path) -> None:
    _, store, readiness = make_node(sqlite_url, tmp_path)
    with readiness.sessions() as session, session.begin():
        session.execute(text("CREATE TRIGGER no_rows BEFORE INSERT ON instances BEGIN SELECT RAISE(ABORT, 'disk gone'); END"))
    study = make_study(tmp_path / "study", slices=1)
    with pytest.raises(Exception, match="disk gone"):
        receive(store, study.files[:1])
    assert [p for p in (tmp_path / "storage").rglob("*") if p.is_file()] == []
    assert list_studies(readiness.sessions) == []


def test_duplicates_are_acknowledged_without_writing(sqlite_url: str, tmp_path: Path) -> None:
    _, store, readiness = make_node(sqlite_url, tmp_path)
    study: GeneratedStudy = make_study(tmp_path / "study", slices=1)
    ds = dcmread(study.files[0])
    first = store.store(ds, study.files[0].read_bytes(), ds.file_meta.TransferSyntaxUID, "A")
    stored = next((tmp_path / "storage").rglob("*.dcm"))
    before = stored.stat().st_mtime_ns
    second = store.store(ds, b"different bytes", ds.file_meta.TransferSyntaxUID, "A")
    assert (first.duplicate, second.duplicate) == (False, True)
    assert stored.stat().st_mtime_ns == before and stored.read_bytes() == study.files[0].read_bytes()


def test_a_duplicate_under_another_study_creates_nothing(sqlite_url: str, tmp_path: Path) -> None:
    _, store, readiness = make_node(sqlite_url, tmp_path)
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=1)
    receive(store, study.files)
    ds = dcmread(study.files[0])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4.5", "1.2.3.4.5.6"
    assert store.store(ds, study.files[0].read_bytes(), ds.file_meta.TransferSyntaxUID, "PACS").duplicate
    assert [r["study_instance_uid"] for r in list_studies(readiness.sessions)] == [study.study_instance_uid]
    assert [p.name for p in (tmp_path / "storage").rglob("*.dcm")] == [f"{ds.SOPInstanceUID}.dcm"]


def test_an_unreadable_header_element_makes_the_series_other(sqlite_url: str, tmp_path: Path) -> None:
    _, store, readiness = make_node(sqlite_url, tmp_path)
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=1)
    ds = dcmread(study.files[0])
    ds[0x00180081] = RawDataElement(Tag(0x00180081), "DS", 3, b"1\x00\xff", 0, False, True)  # EchoTime, garbage
    ds[0x00189087] = RawDataElement(Tag(0x00189087), "FD", 3, b"abc", 0, False, True)  # DiffusionBValue, 3 of 8 bytes
    stored = store.store(ds, study.files[0].read_bytes(), ds.file_meta.TransferSyntaxUID, "PACS")
    assert not stored.duplicate
    [series] = show_study(readiness.sessions, study.study_instance_uid)["series"]
    assert series["role"] in {"OTHER", "T2_AX"} and series["role_reason"]


def test_markup_in_a_description_is_shown_as_text(sqlite_url: str, tmp_path: Path) -> None:
    _, store, readiness = make_node(sqlite_url, tmp_path)
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=1)
    ds = dcmread(study.files[0])
    ds.SeriesDescription = "t2_tse_tra [/] [red]x"
    store.store(ds, study.files[0].read_bytes(), ds.file_meta.TransferSyntaxUID, "PACS")
    console = Console(record=True, width=300)
    print_study(show_study(readiness.sessions, study.study_instance_uid), console)
    assert "t2_tse_tra [/] [red]x" in console.export_text()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_an_instance_committed_during_a_readiness_decision_reopens_the_study(database_url: str, tmp_path: Path) -> None:
    """The store locks the study before inserting, so a READY decided meanwhile is undone."""
    _, store, readiness = make_node(database_url, tmp_path)
    study = make_study(tmp_path / "study", slices=1)
    receive(store, study.files)
    late = tmp_path / "late.dcm"  # one more instance of a series the store already knows
    ds = dcmread(study.files[-1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(late)
    engine = store.engine
    with engine.connect() as deciding:  # what Readiness._write_job does, held open
        deciding.begin()
        deciding.execute(text("SELECT id FROM studies FOR UPDATE"))
        deciding.execute(text("UPDATE studies SET state = 'READY'"))
        arriving = threading.Thread(target=receive, args=(store, [late]))
        arriving.start()
        wait_for(lambda: waiting_for_locks(engine), 30, "the store to wait for the study lock")
        deciding.commit()
    arriving.join(30)
    detail = show_study(readiness.sessions, study.study_instance_uid)
    assert detail["state"] == "RECEIVING" and detail["series"][-1]["instances"] == 2
    assert "reopened" in [e["kind"] for e in detail["timeline"]]


def waiting_for_locks(engine: Engine) -> int:
    """Backends of this database waiting on a lock (a fresh statistics snapshot each call)."""
    with engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )).scalar() or 0)


def test_reads_do_not_wait_for_a_writer_on_sqlite(sqlite_url: str, tmp_path: Path) -> None:
    _, store, readiness = make_node(sqlite_url, tmp_path)
    study = make_study(tmp_path / "study", slices=1)
    receive(store, study.files)
    with store.engine.connect() as writer:
        writer.begin()  # BEGIN IMMEDIATE: holds the write lock until the end of this block
        writer.execute(text("UPDATE studies SET state = 'RECEIVING'"))
        done: list[object] = []
        reader = threading.Thread(target=lambda: done.extend([list_studies(readiness.sessions),
                                                              show_study(readiness.sessions, study.study_instance_uid),
                                                              readiness.check()]))
        reader.start()
        wait_for(lambda: len(done) == 3, 20, "the reads to finish while the writer holds the lock")
        writer.rollback()
    reader.join(10)
