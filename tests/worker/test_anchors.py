"""Where grades are shown: every graded level and condition gets an image and a point on it."""

from __future__ import annotations

import numpy as np
import pytest

from models.data.pathology import CONDITIONS, LEVELS
from tests.worker.conftest import Graded
from worker.anchors import find_anchors


def test_every_grade_has_an_anchor_on_the_expected_view(graded: Graded) -> None:
    """Canal on the sagittal T2, foramina on the sagittal T1 (left on a slice further to the
    patient's left), subarticular zones on the axial T2; points inside their image, on a plane
    within 3 mm, the canal point just behind the disc's box."""
    result, datasets = graded.result, graded.headers
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
        graded: Graded) -> None:
    result, datasets = graded.result, graded.headers
    no_axial = {**result, "series": [s for s in result["series"] if s["role"] != "T2_AX"]}
    anchors = find_anchors(no_axial, datasets)
    assert {anchors[(lv, "left_subarticular_stenosis")].role for lv in LEVELS} == {"T2_SAG"}
