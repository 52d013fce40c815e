"""Where grades are shown: every graded level and condition gets an image and a point on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from models.data.pathology import CONDITIONS, LEVELS
from models.detect import DEFAULT_WEIGHTS, Detector
from models.grade import DEFAULT_GRADER, GraderModel
from node.config import DEFAULT_DEVICE_UID
from worker.anchors import find_anchors
from worker.pipeline import analyse_folder, result_json


@pytest.fixture(scope="module")
def graded(phantom_study: Path) -> tuple[dict[str, Any], dict[str, list[pydicom.Dataset]]]:
    result = result_json(analyse_folder(phantom_study, Detector.load(DEFAULT_WEIGHTS), GraderModel.load(DEFAULT_GRADER),
                                        DEFAULT_DEVICE_UID))
    datasets: dict[str, list[pydicom.Dataset]] = {}
    for path in phantom_study.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        datasets.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return result, datasets


def test_every_grade_has_an_anchor_on_the_expected_view(graded: tuple[dict[str, Any], dict[str, list[pydicom.Dataset]]]) -> None:
    """Canal on the sagittal T2, foramina on the sagittal T1 (left on a slice further to the
    patient's left), subarticular zones on the axial T2; points inside their image, on a plane
    within 3 mm, the canal point just behind the disc's box."""
    result, datasets = graded
    anchors = find_anchors(result, datasets)
    assert set(anchors) == {(lv, c) for lv in LEVELS for c in CONDITIONS}
    for level in LEVELS:
        canal = anchors[(level, "spinal_canal_stenosis")]
        assert canal.role == "T2_SAG" and abs(canal.off_plane_mm) < 3.0
        left, top, right, bottom = canal.box
        assert left < right and top < bottom and top <= canal.point[1] <= bottom
        assert canal.point[0] == pytest.approx(right, abs=8.0)  # posterior margin: the box's right edge on a sagittal
        foramina = [anchors[(level, f"{side}_neural_foraminal_narrowing")] for side in ("left", "right")]
        assert [a.role for a in foramina] == ["T1_SAG", "T1_SAG"]
        x = [float(np.asarray(a.plane.dataset.ImagePositionPatient)[0]) for a in foramina]
        assert x[0] > x[1] + 20  # LPS: +x is the patient's left
        for side in ("left", "right"):
            sub = anchors[(level, f"{side}_subarticular_stenosis")]
            assert sub.role == "T2_AX" and abs(sub.off_plane_mm) < 3.0
            assert 0 <= sub.point[0] <= sub.plane.dataset.Columns and 0 <= sub.point[1] <= sub.plane.dataset.Rows
        assert anchors[(level, "left_subarticular_stenosis")].point[0] > anchors[(level, "right_subarticular_stenosis")].point[0]


def test_without_an_axial_series_subarticular_grades_fall_back_to_the_sagittal(
        graded: tuple[dict[str, Any], dict[str, list[pydicom.Dataset]]]) -> None:
    result, datasets = graded
    no_axial = {**result, "series": [s for s in result["series"] if s["role"] != "T2_AX"]}
    anchors = find_anchors(no_axial, datasets)
    assert {anchors[(lv, "left_subarticular_stenosis")].role for lv in LEVELS} == {"T2_SAG"}
