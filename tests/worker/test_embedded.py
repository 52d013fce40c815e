"""Embedded mode end to end: ``spine-node serve`` with no broker receives a study from storescu,
grades it in-process through the same job runner as a Celery worker, and records every stage."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from models.data.pathology import CONDITIONS, LEVELS
from node.schema import Result, ResultObject
from tests.support.services import NodeProcess, store, wait_for

STAGES = ["series", "models", "read", "volumes", "detect", "extract", "grade", "report", "store"]


def _series_folder(study: Path, role: str) -> Path:
    return study / next(s["folder"] for s in json.loads((study / "truth.json").read_text())["series"] if s["role"] == role)


def _corrupt_pixels(folder: Path) -> None:
    """Keep every header but cut each instance's pixel data to a quarter: it cannot be decoded."""
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 8 * 2]
        ds.save_as(path)


def _send(port: int, study: Path) -> int:
    """storescu sends the study's DICOM files (not its truth.json); returns its exit code."""
    return store(port, sorted(study.rglob("*.dcm"))).returncode


def _uid(study: Path) -> str:
    return str(json.loads((study / "truth.json").read_text())["study_instance_uid"])


def test_a_study_is_graded_once_with_every_stage_timed(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                       phantom_study: Path, watch: Any) -> None:
    """Received, READY, graded and (no destinations) its delivery job done; the result has every
    level and condition; each stage's start, end and duration is on the timeline. A requeue of the
    same input keeps the one result; a requeue from deliver sends it again."""
    node = node_factory(sqlite_url, broker_url="", quiet_period_s=0.5)
    assert _send(node.port, phantom_study) == 0
    study = watch(sqlite_url, _uid(phantom_study))
    shown = study.wait_state("GRADED", "FAILED")
    assert shown["state"] == "GRADED", shown["timeline"]
    wait_for(lambda: [j["state"] for j in study.show()["jobs"]] == ["DONE", "DONE"], 30, "the delivery job")
    shown = study.show()  # the store stage is recorded once its transaction has committed
    result = shown["result"]
    assert result["not_for_diagnostic_use"] is True and set(result["levels"]) == set(LEVELS)
    assert all(set(lv["conditions"]) == set(CONDITIONS) for lv in result["levels"].values())
    assert [s["stage"] for s in shown["stages"]] == STAGES
    assert all(s["ok"] and s["duration_s"] >= 0 and s["started_at"] <= s["ended_at"] for s in shown["stages"])

    requeued = node.cli("requeue", _uid(phantom_study))
    assert "from grade" in requeued.stdout
    kept = wait_for(lambda: (s := study.show())["state"] == "GRADED" and s["jobs"][-1]["state"] == "DONE" and s, 120, "the regrade")
    assert [j["kind"] for j in kept["jobs"]] == ["grade", "deliver", "grade"]  # same input: no second result to deliver
    assert "kept it" in [e for e in kept["timeline"] if e["kind"] == "graded"][-1]["message"]
    with study.sessions() as session:
        assert session.scalar(select(func.count(Result.id))) == 1

    node.cli("requeue", _uid(phantom_study), "--from-stage", "deliver")
    wait_for(lambda: [j["kind"] for j in study.show()["jobs"] if j["state"] == "DONE"].count("deliver") == 2, 60, "the redelivery")
    shown_text = node.cli("show", _uid(phantom_study)).stdout
    assert "stages" in shown_text and "detect" in shown_text


def test_the_result_objects_are_stored_and_rendered(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                    phantom_study: Path, tmp_path: Path, watch: Any) -> None:
    """Grading writes the SR, its Comprehensive SR twin, presentation states and key images to the
    store; ``spine-node render`` turns the key images and each presentation state on its images
    into PNGs."""
    node = node_factory(sqlite_url, broker_url="", quiet_period_s=0.5)
    assert _send(node.port, phantom_study) == 0
    study = watch(sqlite_url, _uid(phantom_study))
    assert study.wait_state("GRADED", "FAILED")["state"] == "GRADED"
    with study.sessions() as session:
        objects = session.execute(select(ResultObject.kind, ResultObject.path)).all()
    kinds = sorted({kind for kind, _ in objects})
    assert kinds == ["PR", "SC", "SR", "SR-2D"]
    assert all((node.workdir / "storage" / path).is_file() for _, path in objects)
    out = tmp_path / "png"
    rendered = node.cli("render", _uid(phantom_study), "--out", str(out)).stdout.split()
    names = [Path(p).name for p in rendered]
    assert sum(n.startswith("SC_") for n in names) == sum(k == "SC" for k, _ in objects)
    assert any(n.startswith("PR_") for n in names) and all(Path(p).stat().st_size > 1000 for p in rendered)
    missing = node.cli("render", "1.2.3.4", "--out", str(out), check=False)
    assert missing.returncode == 1 and "no study 1.2.3.4" in missing.stderr


def test_a_corrupt_axial_series_is_graded_from_what_is_usable(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                              phantom_study: Path, tmp_path: Path, watch: Any) -> None:
    """Axial pixel data that cannot be decoded: the sagittal views are graded, the axial series is
    marked unused and the warning says why."""
    copy = tmp_path / "study"
    shutil.copytree(phantom_study, copy)
    _corrupt_pixels(_series_folder(copy, "T2_AX"))
    node = node_factory(sqlite_url, broker_url="", quiet_period_s=0.5)
    assert _send(node.port, copy) == 0
    shown = watch(sqlite_url, _uid(copy)).wait_state("GRADED", "FAILED")
    assert shown["state"] == "GRADED", shown["timeline"]
    result = shown["result"]
    assert {s["role"]: s["used"] for s in result["series"]}["T2_AX"] is False
    assert any("T2_AX series" in w and "not used" in w for w in result["warnings"])
    assert any("subarticular grades from sagittal views only" in w for w in result["warnings"])
    assert all(set(lv["conditions"]) == set(CONDITIONS) for lv in result["levels"].values())


def test_a_study_that_cannot_be_graded_fails_at_once_and_can_be_retried(node_factory: Callable[..., NodeProcess],
                                                                       sqlite_url: str, phantom_study: Path,
                                                                       tmp_path: Path, watch: Any) -> None:
    """No sagittal series forms a volume: FAILED after one attempt with the reason, no retries;
    ``retry-failed`` requeues it from grade."""
    copy = tmp_path / "study"
    shutil.copytree(phantom_study, copy)
    for role in ("T1_SAG", "T2_SAG", "STIR_SAG"):
        _corrupt_pixels(_series_folder(copy, role))
    node = node_factory(sqlite_url, broker_url="", quiet_period_s=0.5)
    assert _send(node.port, copy) == 0
    study = watch(sqlite_url, _uid(copy))
    shown = study.wait_state("FAILED", "GRADED")
    assert shown["state"] == "FAILED"
    (job,) = shown["jobs"]
    assert job["attempts"] == 1 and "not used" in job["error"] and shown["result"] is None
    nothing = node.cli("requeue", _uid(copy), "--from-stage", "deliver", check=False)
    assert nothing.returncode == 1 and "no result to deliver" in nothing.stderr
    retried = node.cli("retry-failed")
    assert "1 failed studies requeued" in retried.stdout and "from grade" in retried.stdout
    wait_for(lambda: len(s := study.show()["jobs"]) == 2 and s[-1]["state"] == "FAILED", 120, "the retried job to end")


def test_a_role_sent_twice_uses_its_newest_series(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                  phantom_study: Path, tmp_path: Path, watch: Any) -> None:
    """A repeated T2 sagittal (later SeriesTime, new UIDs): the newest is used and the warning
    names it; the older one is left unused."""
    copy = tmp_path / "study"
    shutil.copytree(phantom_study, copy)
    repeat = copy / "repeat"
    repeat.mkdir()
    new_series = generate_uid()
    for path in _series_folder(copy, "T2_SAG").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = new_series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesTime, ds.SeriesNumber = "235959", 99
        ds.save_as(repeat / path.name)
    node = node_factory(sqlite_url, broker_url="", quiet_period_s=0.5)
    assert _send(node.port, copy) == 0
    shown = watch(sqlite_url, _uid(copy)).wait_state("GRADED", "FAILED")
    assert shown["state"] == "GRADED", shown["timeline"]
    used = {s["series_instance_uid"]: s["used"] for s in shown["result"]["series"] if s["role"] == "T2_SAG"}
    assert used[new_series] is True and sum(used.values()) == 1
    assert any(w.startswith(f"T2_SAG sent 2 times: using series {new_series}") for w in shown["result"]["warnings"])


def test_a_node_killed_mid_grade_grades_the_study_once_after_restart(node_factory: Callable[..., NodeProcess],
                                                                    sqlite_url: str, phantom_study: Path, watch: Any) -> None:
    """SIGKILL the embedded node while it grades; after a restart the lapsed lease returns the
    job, the study is graded on the second attempt, and there is one result."""
    node = node_factory(sqlite_url, broker_url="", quiet_period_s=0.5, job_lease_s=2.0)
    assert _send(node.port, phantom_study) == 0
    study = watch(sqlite_url, _uid(phantom_study))
    wait_for(lambda: any(s["stage"] == "models" for s in study.show()["stages"]), 120, "grading to start")
    node.kill()
    assert study.show()["jobs"][0]["state"] == "RUNNING"
    node.start()
    shown = study.wait_state("GRADED", "FAILED")
    assert shown["state"] == "GRADED" and shown["jobs"][0]["attempts"] == 2
    with study.sessions() as session:
        assert session.scalar(select(func.count(Result.id))) == 1
