"""The structured report: valid for dciodvfy and dsrdump, flagged as research, and its grades
read back equal the result's."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from highdicom.sr import Comprehensive3DSR, MeasurementReport, PlanarROIMeasurementsAndQualitativeEvaluations

from models.data.pathology import CONDITIONS, LEVELS
from models.data.phantom import generate
from node.config import DEFAULT_DEVICE_UID
from tests.worker.conftest import Graded
from worker.anchors import Anchor, find_anchors
from worker.codes import LOCAL_SCHEME
from worker.identity import NOT_FOR_DIAGNOSIS, Identity
from worker.reports import build_sr, read_grades

IDENTITY = Identity(device_uid=DEFAULT_DEVICE_UID, uid_root="2.25", software_version="test grader 0123456789ab")


@pytest.fixture(scope="module")
def anchors(graded: Graded) -> dict[tuple[str, str], Anchor]:
    """Where each of the graded study's grades is shown."""
    return find_anchors(graded.result, graded.headers)


@pytest.fixture(scope="module")
def evidence(graded: Graded) -> list[pydicom.Dataset]:
    """Every instance's header of the graded study."""
    return [ds for series in graded.headers.values() for ds in series]


@pytest.fixture(scope="module")
def written(graded: Graded, anchors: dict[tuple[str, str], Anchor], evidence: list[pydicom.Dataset],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The 3-D and the plain Comprehensive SR of the graded study, each written as a DICOM file."""
    out = tmp_path_factory.mktemp("sr")
    paths = {}
    for name, three_d in (("3d", True), ("2d", False)):
        paths[name] = out / f"sr_{name}.dcm"
        build_sr(graded.result, anchors, evidence, IDENTITY, three_d=three_d).save_as(paths[name], enforce_file_format=True)
    return paths


def _run(*args: str | Path) -> str:
    """A validator's stdout and stderr together."""
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _groups(sr: Comprehensive3DSR) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    """The report's planar measurement groups, as highdicom parses them."""
    assert isinstance(sr.content, MeasurementReport)
    return sr.content.get_planar_roi_measurement_groups()


def _dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's errors; its warnings are allowed, as it knows no private coding scheme."""
    return [line for line in _run("/usr/bin/dciodvfy", "-new", path).splitlines() if line.startswith("Error")]


def _dsrdump(path: Path) -> str:
    """dsrdump's rendering of the whole tree (long values in full), which must hold no complaint."""
    output = _run("/usr/bin/dsrdump", "+Pt", "+Pl", path)
    assert not [line for line in output.splitlines() if line.startswith(("E:", "F:", "W:"))], output
    return output


@pytest.mark.parametrize("kind", ["3d", "2d"])
def test_dciodvfy_finds_no_error(written: dict[str, Path], kind: str) -> None:
    assert _dciodvfy_errors(written[kind]) == []


@pytest.mark.parametrize("kind", ["3d", "2d"])
def test_dsrdump_parses_the_tid_1500_tree(written: dict[str, Path], kind: str) -> None:
    output = _dsrdump(written[kind])
    assert "TID 1500" in output
    assert output.count('"Measurement Group"') == 25
    assert "L4-L5 left neural foraminal narrowing" in output


def test_groups_are_coded_as_the_reference_recommends(graded: Graded, written: dict[str, Path]) -> None:
    """Sites compartment first with its side, then the disc; severity and probabilities coded."""
    groups = {block.split('"', 2)[1]: block for block in _dsrdump(written["3d"]).split('"Tracking Identifier")=')[1:]}
    left, right, canal = (groups[f"L4-L5 {c}"] for c in ("left neural foraminal narrowing", "right neural foraminal narrowing",
                                                           "spinal canal stenosis"))
    assert '(S001,99SPNODE,"Intervertebral foramen")>\n        <has concept mod CODE:(,,"Laterality")=(7771000,SCT,"Left")>' in left
    assert '(24028007,SCT,"Right")' in right and "7771000" not in right
    assert '"Finding Site")=(61853006,SCT,"Vertebral canal")>\n      <has concept mod CODE:(,,"Finding Site")=(84020006,SCT,"L4/L5 disc")>' in canal
    assert '"Laterality"' not in canal
    assert '"Finding")=(18347007,SCT,"Spinal stenosis of lumbar region")' in canal
    grade = graded.result["levels"]["L4-L5"]["conditions"]["spinal_canal_stenosis"]["grade"]
    severity = {"normal_mild": '(G000,99SPNODE,"Normal or mild")', "moderate": '(6736007,SCT,"Moderate")', "severe": '(24484000,SCT,"Severe")'}
    assert f'"Severity")={severity[grade]}' in canal
    assert canal.count('(1,UCUM,"no units")') == 3 and '"Probability of moderate")=' in canal


@pytest.mark.parametrize("kind", ["3d", "2d"])
def test_grades_read_back_equal_the_result(graded: Graded, written: dict[str, Path], kind: str) -> None:
    grades = read_grades(pydicom.dcmread(written[kind]))
    assert sorted(grades) == sorted(LEVELS)
    for level in LEVELS:
        assert sorted(grades[level]) == sorted(CONDITIONS)
        for condition in CONDITIONS:
            expected = graded.result["levels"][level]["conditions"][condition]
            got = grades[level][condition]
            assert got["grade"] == expected["grade"]
            assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-4)


def test_header_marks_an_unverified_research_report_of_the_source_study(graded: Graded, written: dict[str, Path]) -> None:
    sr3d, sr2d = (pydicom.dcmread(written[k]) for k in ("3d", "2d"))
    assert sr3d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr2d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    for sr in (sr3d, sr2d):
        assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
        assert sr.ContentQualification == "RESEARCH"
        assert NOT_FOR_DIAGNOSIS in sr.SeriesDescription
        assert sr.StudyInstanceUID == graded.result["study_instance_uid"]
        assert sr.SeriesInstanceUID not in graded.headers
        assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == [LOCAL_SCHEME]
    assert sr3d.SeriesInstanceUID != sr2d.SeriesInstanceUID


def test_every_marked_image_is_in_the_image_library_and_the_evidence(
        written: dict[str, Path], anchors: dict[tuple[str, str], Anchor], evidence: list[pydicom.Dataset]) -> None:
    sr = Comprehensive3DSR.from_dataset(pydicom.dcmread(written["3d"]))
    marked = {a.plane.sop_instance_uid for a in anchors.values()}
    groups = _groups(sr)
    assert len(groups) == 25
    assert {g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID for g in groups if g.roi} == marked
    assert {str(uid) for _, _, uid, _ in sr.get_evidence()} == {str(ds.SOPInstanceUID) for ds in evidence}
    library = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"]
    assert len(library) == 1
    assert {image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for group in library[0].ContentSequence for image in group.ContentSequence if image.ValueType == "IMAGE"} == marked


def test_a_new_report_references_the_earlier_one_as_its_predecessor(
        graded: Graded, anchors: dict[tuple[str, str], Anchor], evidence: list[pydicom.Dataset]) -> None:
    first = build_sr(graded.result, anchors, evidence, IDENTITY, three_d=False)
    second = build_sr(graded.result, anchors, evidence, IDENTITY, three_d=False, previous=[first])
    study = second.PredecessorDocumentsSequence[0]
    assert study.StudyInstanceUID == first.StudyInstanceUID
    series = study.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in first


def _partial(result: dict[str, Any]) -> dict[str, Any]:
    """The result with two of L5-S1's grades gone, one probability not a number and a warning."""
    partial = copy.deepcopy(result)
    conditions = partial["levels"]["L5-S1"]["conditions"]
    del conditions["left_subarticular_stenosis"], conditions["right_subarticular_stenosis"]
    partial["levels"]["L1-L2"]["conditions"]["spinal_canal_stenosis"]["probabilities"]["severe"] = float("nan")
    partial["warnings"] = ["no T2_AX series: subarticular grades from sagittal views only"]
    return partial


def test_missing_or_unencodable_grades_give_a_valid_partial_report(
        graded: Graded, anchors: dict[tuple[str, str], Anchor], evidence: list[pydicom.Dataset], tmp_path: Path) -> None:
    """Left-out grades make the report PARTIAL, and the result's warnings are in it as text."""
    path = tmp_path / "partial.dcm"
    build_sr(_partial(graded.result), anchors, evidence, IDENTITY, three_d=False).save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []
    assert "no T2_AX series: subarticular grades from sagittal views only" in _dsrdump(path)
    sr = pydicom.dcmread(path)
    assert sr.CompletionFlag == "PARTIAL"
    grades = read_grades(sr)
    assert sorted(grades["L5-S1"]) == sorted(set(CONDITIONS) - {"left_subarticular_stenosis", "right_subarticular_stenosis"})
    assert "spinal_canal_stenosis" not in grades["L1-L2"]
    assert sum(len(g) for g in grades.values()) == 22


def test_a_grade_without_an_image_is_left_out(
        graded: Graded, anchors: dict[tuple[str, str], Anchor], evidence: list[pydicom.Dataset]) -> None:
    fewer = {key: a for key, a in anchors.items() if key != ("L3-L4", "spinal_canal_stenosis")}
    sr = build_sr(graded.result, fewer, evidence, IDENTITY)
    assert sr.CompletionFlag == "PARTIAL"
    assert "spinal_canal_stenosis" not in read_grades(sr)["L3-L4"]


def test_a_result_without_grades_is_refused(
        graded: Graded, anchors: dict[tuple[str, str], Anchor], evidence: list[pydicom.Dataset]) -> None:
    ungraded = {**graded.result, "levels": {lv: {**block, "conditions": {}} for lv, block in graded.result["levels"].items()}}
    with pytest.raises(ValueError, match="result"):
        build_sr(ungraded, anchors, evidence, IDENTITY)


@pytest.fixture(scope="module")
def enhanced(graded: Graded, tmp_path_factory: pytest.TempPathFactory) -> Graded:
    """The graded phantom study written again as Enhanced MR (one multi-frame instance per
    series), with the result's series pointed at the new ones by description."""
    study = generate(tmp_path_factory.mktemp("enhanced"), 1, 4711, progress=False, axial="single", enhanced=True)[0]
    headers: dict[str, list[pydicom.Dataset]] = {}
    for path in sorted(study.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        headers.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    by_description = {str(series[0].SeriesDescription): uid for uid, series in headers.items()}
    result = {**graded.result, "series": [
        {**s, "series_instance_uid": by_description[str(graded.headers[s["series_instance_uid"]][0].SeriesDescription)]}
        for s in graded.result["series"]]}
    return Graded(study, result, headers)


def test_a_multi_frame_source_is_referenced_by_frame(enhanced: Graded, tmp_path: Path) -> None:
    anchors = find_anchors(enhanced.result, enhanced.headers)
    assert len(anchors) == 25 and all(a.plane.frame_number for a in anchors.values())
    path = tmp_path / "enhanced.dcm"
    build_sr(enhanced.result, anchors, [ds for series in enhanced.headers.values() for ds in series], IDENTITY).save_as(
        path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []
    _dsrdump(path)
    sr = Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    for group in _groups(sr):
        assert group.tracking_identifier is not None and group.roi is not None
        level, condition = group.tracking_identifier.split(" ", 1)
        anchor = anchors[(level, condition.replace(" ", "_"))]
        source = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert (source.ReferencedSOPInstanceUID, source.ReferencedFrameNumber) == (anchor.plane.sop_instance_uid, anchor.plane.frame_number)
    assert {lv: {c: g["grade"] for c, g in cs.items()} for lv, cs in read_grades(sr).items()} == {
        lv: {c: g["grade"] for c, g in block["conditions"].items()} for lv, block in enhanced.result["levels"].items()}
