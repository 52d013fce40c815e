"""Logs and privacy: JSON lines with their fields, and never a patient's name, ID, birth date or
accession number in a log line, metric, status page or error message, in real runs (embedded,
and the production shape with a Celery worker and a PACS) that receive, grade and deliver
studies carrying distinctive values; the result objects keep the source's patient module."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest

from models.data.phantom import generate
from node.admin import show_study
from node.db import make_engine, make_sessionmaker
from tests.support.orthanc import OrthancServer
from tests.support.services import NodeProcess, WorkerProcess, echo, free_port, send_raw, store, wait_for

#: Values no log line may hold; each is written into every instance of the studies sent.
PATIENT_NAME = "Quuxworthy^Zebedee^Marmaduke"
PATIENT_ID = "PID-7734-QXZ"
ACCESSION = "ACC-55201-QXZ"
BIRTH_DATE = "19230405"
#: Not a valid DA: the worker blanks it in the copies the result objects are made from, and says
#: so without quoting it.
BAD_BIRTH_DATE = "1923-04-05"
SECRETS = [PATIENT_NAME, "Quuxworthy", "Zebedee", "Marmaduke", PATIENT_ID, ACCESSION, BIRTH_DATE, BAD_BIRTH_DATE]


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    assert lines
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(entry, dict) for entry in parsed)
    return parsed


def test_json_lines_carry_fields_extras_warnings_masked_and_uncaught_errors() -> None:
    """``configure_logging(level, "json")`` in a fresh process: a record with ``extra``, a
    library warning quoting a header value (masked), and an uncaught exception; every line of
    the output is JSON."""
    code = """if True:
        import logging, warnings
        from node.logs import configure_logging
        configure_logging("INFO", "json")
        logging.getLogger("node.example").info("study %s stored", "1.2.3", extra={"study_instance_uid": "1.2.3", "count": 7})
        warnings.warn("Invalid value for VR DA: '19230405'.")
        raise RuntimeError("boom")
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    stored, warned, crashed = _json_lines(done.stderr + done.stdout)
    assert stored["message"] == "study 1.2.3 stored" and stored["level"] == "INFO" and stored["logger"] == "node.example"
    assert (stored["study_instance_uid"], stored["count"], stored["process"]) == ("1.2.3", 7, "MainProcess")
    assert stored["time"].endswith("+00:00") and isinstance(stored["pid"], int)
    assert warned["logger"] == "py.warnings" and "Invalid value for VR DA" in warned["message"]
    assert "19230405" not in warned["message"]
    assert crashed["level"] == "CRITICAL" and "RuntimeError: boom" in crashed["exception"]


@pytest.fixture
def identified_studies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two phantom studies whose every instance carries the patient values above; the second
    with the birth date that is not a valid DA."""
    studies = generate(tmp_path_factory.mktemp("identified"), 2, 4711, progress=False, axial="single")
    for study, birth_date in zip(studies, (BIRTH_DATE, BAD_BIRTH_DATE)):
        for path in study.rglob("*.dcm"):
            ds = pydicom.dcmread(path)
            ds.PatientName, ds.PatientID, ds.AccessionNumber, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, ACCESSION, birth_date
            ds.save_as(path)
    return studies


def test_a_real_run_logs_json_lines_and_no_patient_values(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                          identified_studies: list[Path]) -> None:
    """``spine-node serve`` with ``log_format = "json"`` at DEBUG receives both studies from
    storescu, refuses a wrong called AE title, grades both (the invalid birth date blanked in the
    second's result objects, with a log line that does not quote it), and stops: every line of
    its output is a JSON object, and none holds a patient value, although the stored instances
    and the result objects do."""
    node = node_factory(sqlite_url, broker_url="", log_format="json", log_level="DEBUG", quiet_period_s=0.5,
                        job_max_attempts=1)
    for study in identified_studies:
        assert store(node.port, sorted(study.rglob("*.dcm"))).returncode == 0
    assert echo(node.port, called="WRONG").returncode != 0
    good, bad = (str(json.loads((s / "truth.json").read_text())["study_instance_uid"]) for s in identified_studies)
    engine = make_engine(sqlite_url)
    try:
        sessions = make_sessionmaker(engine)
        shown = [wait_for(lambda: (s := _shown(sessions, uid)) and [j["state"] for j in s["jobs"]] == ["DONE", "DONE"] and s,
                          180, "grading and delivery") for uid in (good, bad)]
    finally:
        engine.dispose()
    assert [s["state"] for s in shown] == ["GRADED", "GRADED"]
    assert node.stop() == 0

    text = node.log.read_text()
    entries = _json_lines(text)
    assert {"time", "level", "logger", "message", "process", "pid"} <= set(entries[0])
    messages = [e["message"] for e in entries]
    assert any(f"study {good} graded" in m for m in messages)
    assert any("rejected association" in m for m in messages)
    assert any("blanking an invalid DA value of PatientBirthDate" in m for m in messages)
    assert [secret for secret in SECRETS if secret in text] == []
    results = list((node.workdir / "storage" / "results").rglob("*.dcm"))
    assert results and all(PATIENT_ID.encode() in p.read_bytes() for p in results)  # the values were there to leak
    assert [secret for secret in SECRETS if secret in json.dumps(shown)] == []


def _shown(sessions: Any, uid: str) -> dict[str, Any] | None:
    try:
        return show_study(sessions, uid)
    except LookupError:
        return None


def _get(url: str, password: str | None = None) -> str:
    """GET a page of the node or worker (with the status page's Basic auth when given), as text."""
    request = urllib.request.Request(url)
    if password is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"admin:{password}".encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


@pytest.mark.postgres
def test_no_patient_value_leaves_the_production_shape(production: Callable[..., tuple[NodeProcess, str]],
                                                      orthancs: Callable[..., OrthancServer], identified_studies: list[Path],
                                                      tmp_path: Path) -> None:
    """Node on PostgreSQL, a Celery worker, Orthanc as the PACS, metrics and the status page on:
    one identified study graded and delivered, one whose sagittal pixels are cut (FAILED, with its
    error), a truncated instance refused, a caller refused. No patient value is in the node's or
    the worker's log, their metrics and health checks, the status pages, ``studies``, ``show``,
    ``audit``, or the error messages; the result objects in Orthanc carry the source's patient module."""
    good_study, bad_study = identified_studies
    for series in json.loads((bad_study / "truth.json").read_text())["series"]:
        for path in (bad_study / series["folder"]).glob("*.dcm") if series["role"].endswith("_SAG") else ():
            ds = pydicom.dcmread(path)
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 4]
            ds.save_as(path)
    truncated = tmp_path / "truncated.dcm"
    first = next(good_study.rglob("*.dcm"))
    truncated.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    orthanc = orthancs().start()
    password = "privacy-page-secret"
    (tmp_path / "web-password").write_text(password + "\n")
    ports = {"metrics_port": free_port(), "worker_metrics_port": free_port(), "web_port": free_port()}
    node, url = production(log_format="json", log_level="DEBUG", job_max_attempts=1, delivery_retry_s=1.0,
                           web_password_file=str(tmp_path / "web-password"),
                           destinations=[{"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.port}], **ports)
    worker = WorkerProcess(node.config, tmp_path / "worker.log").start()
    try:
        for study in identified_studies:
            assert store(node.port, sorted(study.rglob("*.dcm"))).returncode == 0
        assert send_raw(node.port, truncated) != 0
        assert echo(node.port, called="WRONG").returncode != 0
        good, bad = (str(json.loads((s / "truth.json").read_text())["study_instance_uid"]) for s in identified_studies)
        wait_for(lambda: json.loads(node.cli("show", good, "--json").stdout)["state"] == "DELIVERED", 300, "delivery")
        wait_for(lambda: json.loads(node.cli("show", bad, "--json").stdout)["state"] == "FAILED", 120, "the failure")
        failed = json.loads(node.cli("show", bad, "--json").stdout)
        assert failed["jobs"][0]["error"]
        seen = {
            "node log": node.log.read_text(),
            "node metrics": _get(f"http://127.0.0.1:{ports['metrics_port']}/metrics"),
            "node health": _get(f"http://127.0.0.1:{ports['metrics_port']}/healthz"),
            "worker metrics": _get(f"http://127.0.0.1:{ports['worker_metrics_port']}/metrics"),
            "worker health": _get(f"http://127.0.0.1:{ports['worker_metrics_port']}/healthz"),
            "status pages": "".join(_get(f"http://127.0.0.1:{ports['web_port']}{page}", password)
                                    for page in ("/", f"/studies/{good}", f"/studies/{bad}")),
            "studies": node.cli("studies", "--json").stdout,
            "show": node.cli("show", good).stdout + node.cli("show", bad, "--json").stdout,
            "error messages": node.cli("requeue", bad, "--from-stage", "deliver", check=False).stderr
                              + node.cli("show", "1.2.3.4", check=False).stderr,
            "audit": node.cli("audit").stdout,
        }
    finally:
        worker.stop()
    seen["worker log"] = worker.log.read_text()
    assert "graded" in seen["worker log"] and "spine_node_instances_received_total" in seen["node metrics"]
    assert {where: [v for v in SECRETS if v in text] for where, text in seen.items() if any(v in text for v in SECRETS)} == {}

    source = pydicom.dcmread(first, stop_before_pixels=True)
    delivered = [pydicom.dcmread(BytesIO(orthanc.file(i["id"])), stop_before_pixels=True) for i in orthanc.instances_of(good)]
    assert len(delivered) >= 3  # the SR, presentation states and key images: only ours are in this PACS
    patient_module = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
    for ds in delivered:
        assert [ds.get(k) for k in patient_module] == [source.get(k) for k in patient_module]
    assert str(source.PatientID) == PATIENT_ID
