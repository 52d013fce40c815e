"""The disc detector: the shipped weights on held-out phantoms, orientation invariance, level
checks and fusion of T1 and T2 detections."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from models.data.pathology import LEVELS
from models.data.phantom import generate
from models.detect import DEFAULT_WEIGHTS, Detector, LevelDetection, SeriesDetection, check_levels, fuse
from models.evaluate_detector import evaluate, load_study, twins
from models.volumes import SeriesVolume

HELD_OUT_SEED = 777  # never a training seed (training uses 1)


@pytest.fixture(scope="module")
def detector() -> Detector:
    """The shipped detector."""
    return Detector.load(DEFAULT_WEIGHTS)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four held-out phantom studies, default acquisition."""
    return generate(tmp_path_factory.mktemp("held-out"), 4, HELD_OUT_SEED, progress=False)


def _disc(level: str, z: float, confidence: float = 0.9, series: str = "1.2") -> LevelDetection:
    """A disc at height z on the midline with a horizontal plane."""
    return LevelDetection(level, np.array([0.0, 0.0, z]), np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0]), 40.0, confidence, series)


def test_shipped_weights_meet_the_goals_on_held_out_phantoms(detector: Detector, held_out: list[Path]) -> None:
    """Median centre error under 2 mm, 95th percentile under 4 mm, every level right, planes
    within a few degrees, every axial crop containing its true disc centre, every crop the points
    where the canal and the recesses are measured, and the T1 crops the foramina."""
    report = evaluate(held_out, detector, progress=False)
    assert report["levels_found"] == 5 * len(held_out)
    assert report["level_assignment_accuracy"] == 1.0
    assert report["centre_error_mm"]["median"] < 2.0
    assert report["centre_error_mm"]["p95"] < 4.0
    assert report["plane_angle_error_deg"]["p95"] < 8.0
    assert report["axial_crops"] == report["axial_crops_expected"]
    assert report["axial_crops_containing_centre"] == 1.0
    shown = report["crops_containing_condition_point"]
    assert set(shown) == {"T1_SAG", "T2_SAG", "STIR_SAG", "T2_AX"}
    for role, by in shown.items():
        assert set(by) == {"spinal_canal_stenosis", "neural_foraminal_narrowing", "subarticular_stenosis"}, role
        assert by["spinal_canal_stenosis"] == by["subarticular_stenosis"] == 1.0, role
    # the T1 crops, spread to reach both foramina, show the foramen; the contiguous T2 ones cannot
    assert shown["T1_SAG"]["neural_foraminal_narrowing"] >= 0.95
    assert shown["T2_SAG"]["neural_foraminal_narrowing"] < shown["T1_SAG"]["neural_foraminal_narrowing"]
    assert set(report["condition_point_in_no_crop"].values()) == {0.0}


def test_detection_does_not_depend_on_how_the_series_is_stored(detector: Detector, held_out: list[Path]) -> None:
    """Mirrored rows, columns and slice order give the same discs (the canonical frame is built
    in patient space), within a fraction of a millimetre."""
    _, volumes = load_study(held_out[0])
    vol = volumes["T2_SAG"][0]
    flipped = SeriesVolume(vol.series_instance_uid, 0, vol.volume.flip_spatial((0, 1, 2)), tuple(reversed(vol.sources)))
    a, b = detector.detect(vol), detector.detect(flipped)
    assert set(a.levels) == set(b.levels) == set(LEVELS)
    for level in LEVELS:
        assert np.linalg.norm(a.levels[level].centre - b.levels[level].centre) < 0.5


def test_t1_and_t2_detections_agree_in_one_frame_of_reference(detector: Detector, held_out: list[Path]) -> None:
    """The sagittal series of a study share their frame of reference: detections agree and fuse
    without warnings."""
    _, volumes = load_study(held_out[1])
    detections = [detector.detect(volumes[r][0]) for r in ("T2_SAG", "STIR_SAG", "T1_SAG")]
    assert len({d.frame_of_reference_uid for d in detections}) == 1
    fused, warnings = fuse(detections)
    assert warnings == []
    assert set(fused) == set(LEVELS)


def test_level_checks_flag_order_and_spacing() -> None:
    """Levels out of order or implausibly spaced are reported and their confidence halved;
    missing levels are named."""
    good = {lv: _disc(lv, 100.0 - 40.0 * i) for i, lv in enumerate(LEVELS)}
    checked, warnings = check_levels(good)
    assert warnings == [] and checked == good
    swapped = {**good, "L2-L3": _disc("L2-L3", good["L3-L4"].centre[2] - 10), "L3-L4": good["L3-L4"]}
    checked, warnings = check_levels(swapped)
    assert any("not below" in w for w in warnings)
    assert checked["L2-L3"].confidence == pytest.approx(0.45)
    far = {k: v for k, v in good.items() if k != "L5-S1"}
    far["L4-L5"] = _disc("L4-L5", good["L3-L4"].centre[2] - 120)
    _, warnings = check_levels(far)
    assert any("mm apart" in w for w in warnings)
    assert any(w == "levels not found: L5-S1" for w in warnings)


def test_fusion_averages_agreeing_series_and_reports_disagreement() -> None:
    """Within 6 mm: confidence-weighted mean; beyond: the more confident series wins, said aloud;
    another frame of reference is not fused."""
    t2 = SeriesDetection("t2", "for", {"L1-L2": _disc("L1-L2", 0.0, 0.9, "t2"), "L2-L3": _disc("L2-L3", -40.0, 0.9, "t2")})
    t1 = SeriesDetection("t1", "for", {"L1-L2": _disc("L1-L2", 3.0, 0.3, "t1"), "L2-L3": _disc("L2-L3", -55.0, 0.95, "t1")})
    other = SeriesDetection("ax", "another", {"L1-L2": _disc("L1-L2", 50.0, 1.0, "ax")})
    fused, warnings = fuse([t2, t1, other], {"t2": "T2_SAG", "t1": "T1_SAG", "ax": "STIR_SAG"})
    assert fused["L1-L2"].centre[2] == pytest.approx(0.75)
    assert fused["L2-L3"].centre[2] == pytest.approx(-55.0)
    assert any("L2-L3: T2_SAG and T1_SAG disagree by 15.0 mm; keeping T1_SAG" == w for w in warnings)
    assert any("STIR_SAG is in another frame of reference" in w for w in warnings)
    assert replace(fused["L1-L2"], centre=np.zeros(3)).series_instance_uid == "t2"


def test_encodings_and_acquisitions_give_the_same_crops(detector: Detector, tmp_path: Path) -> None:
    """Reversed instance order, Enhanced MR and lossless compression give the plain study's crops
    to rounding; a multi-stack axial twin (another rendering) puts every box at the same place."""
    report = twins(tmp_path, HELD_OUT_SEED, 1, detector, progress=False)
    for name in ("reversed", "enhanced", "jpeg2000", "jpeg-lossless"):
        assert report[name]["missing_crops"] == 0, name
        assert report[name]["max_mean_abs_difference"] < 1e-4, (name, report[name])
        assert report[name]["max_sagittal_box_shift_mm"] < 1e-3 and report[name]["max_axial_box_shift_mm"] < 1e-3, name
    multi = report["multi-stack axial"]
    assert multi["missing_crops"] == 0
    assert multi["max_sagittal_box_shift_mm"] < 2.0
    assert multi["max_axial_box_shift_mm"] < 8.0  # other crossing slices: the centre moves along the spine by up to ~1 slice
