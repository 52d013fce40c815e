"""The RSNA 2024 layout reader: phantom annotation points come back in patient space."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.data.pathology import LEVELS
from models.data.phantom import generate
from models.data.rsna import numeric_id
from models.data.rsna_reader import LevelPoints, condition_name, level_name, natural_key, pixel_to_patient, read_level_points

SEED = 5  # study 0 gets a multi-stack axial series, study 1 a single stack
ROLE_OF = {"Sagittal T2/STIR": "T2_SAG", "Sagittal T1": "T1_SAG", "Axial T2": "T2_AX"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two phantom studies (no STIR, so one Sagittal T2/STIR series per study as in RSNA) with the RSNA layout."""
    out = tmp_path_factory.mktemp("rsna_reader")
    generate(out, 2, SEED, rsna=True, progress=False, omit=("STIR_SAG",))
    return out


def _truths(run: Path) -> dict[str, dict]:
    """truth.json of each study keyed by its RSNA study id."""
    truths = [json.loads(p.read_text()) for p in sorted(run.glob("study_*/truth.json"))]
    return {str(numeric_id(t["study_instance_uid"])): t for t in truths}


def _slices(series_dir: Path) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(normal, origin, spacing to the nearest parallel slice) of every instance of a series (any number of stacks)."""
    planes = []
    for f in series_dir.glob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        planes.append((np.cross(iop[:3], iop[3:]), np.array(ds.ImagePositionPatient, dtype=float)))
    out = []
    for normal, origin in planes:
        gaps = [abs(float(normal @ (o - origin))) for n, o in planes if np.allclose(n, normal, atol=1e-4) and not np.array_equal(o, origin)]
        out.append((normal, origin, min(gaps)))
    return out


def _check(run: Path, found: list[LevelPoints], condition: str, description: str) -> None:
    """Every truth point of ``condition`` is recovered: in-plane tightly, through-plane within half a slice spacing."""
    truths = _truths(run)
    assert [lp.study_id for lp in found] == sorted(truths, key=natural_key)
    for lp in found:
        truth = truths[lp.study_id]
        series = next(s for s in truth["series"] if s["role"] == ROLE_OF[description])
        assert lp.series_id == str(numeric_id(series["series_instance_uid"]))
        assert lp.series_dir == run / "rsna" / "train_images" / lp.study_id / lp.series_id
        assert (lp.description, lp.condition) == (description, condition)
        assert list(lp.points) == list(LEVELS)
        slices = _slices(lp.series_dir)
        for level, point in lp.points.items():
            assert point.shape == (3,)
            # the point lies on one of the series' slices: the one the writer snapped to
            normal, _, spacing = min(slices, key=lambda s: abs(float(s[0] @ (point - s[1]))))
            assert min(abs(float(n @ (point - o))) for n, o, _ in slices) < 1e-3
            true = np.array(truth["levels"][level]["conditions"][condition]["point"])
            diff = point - true
            through = float(normal @ diff)
            assert np.linalg.norm(diff - through * normal) < 0.01, (lp.study_id, level)
            assert abs(through) <= spacing / 2 + 1e-3, (lp.study_id, level, through)


def test_canal_points_on_sagittal_t2(run: Path) -> None:
    found = read_level_points(run / "rsna")
    assert len(found) == 2
    _check(run, found, "spinal_canal_stenosis", "Sagittal T2/STIR")


def test_foraminal_points_on_sagittal_t1(run: Path) -> None:
    for side in ("left", "right"):
        condition = f"{side}_neural_foraminal_narrowing"
        found = read_level_points(run / "rsna", condition=condition, description="Sagittal T1")
        _check(run, found, condition, "Sagittal T1")
    # exact condition: left and right points differ (opposite sides of the midline)
    left = read_level_points(run / "rsna", "left_neural_foraminal_narrowing", "Sagittal T1")[0].points["L4-L5"]
    right = read_level_points(run / "rsna", "right_neural_foraminal_narrowing", "Sagittal T1")[0].points["L4-L5"]
    assert left[0] * right[0] < 0 or abs(left[0] - right[0]) > 10


def test_subarticular_points_on_axial_t2(run: Path) -> None:
    """Axial series, one stack or one angled stack per disc: the point is on the snapped slice of its stack."""
    assert {t["axial_stacks"] for t in _truths(run).values()} == {"single", "multi"}
    for side in ("left", "right"):
        condition = f"{side}_subarticular_stenosis"
        _check(run, read_level_points(run / "rsna", condition, "Axial T2"), condition, "Axial T2")


def test_description_filter(run: Path) -> None:
    root = run / "rsna"
    assert read_level_points(root, "spinal_canal_stenosis", "Sagittal T1") == []
    assert [lp.description for lp in read_level_points(root, "spinal_canal_stenosis", None)] == ["Sagittal T2/STIR"] * 2
    axial = read_level_points(root, "left_subarticular_stenosis", None)
    assert {lp.description for lp in axial} == {"Axial T2"}


def _copy_root(run: Path, dest: Path) -> Path:
    """A root with copied CSVs and a link to the phantom's train_images."""
    dest.mkdir()
    for name in ("train_series_descriptions.csv", "train_label_coordinates.csv"):
        shutil.copy(run / "rsna" / name, dest / name)
    (dest / "train_images").symlink_to(run / "rsna" / "train_images", target_is_directory=True)
    return dest


@pytest.mark.parametrize("name", ["train_series_descriptions.csv", "train_label_coordinates.csv"])
def test_missing_csv_is_named(run: Path, tmp_path: Path, name: str) -> None:
    root = _copy_root(run, tmp_path / "root")
    (root / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        read_level_points(root)


def test_incomplete_layout(run: Path, tmp_path: Path) -> None:
    root = _copy_root(run, tmp_path / "root")
    with pytest.raises(ValueError, match="unknown condition"):
        read_level_points(root, "Spinal Canal Stenosis")
    (root / "train_images").unlink()
    with pytest.raises(FileNotFoundError, match="train_images"):
        read_level_points(root)
    with pytest.raises(FileNotFoundError):
        read_level_points(tmp_path / "nowhere")
    (root / "train_label_coordinates.csv").write_text("study_id,series_id,instance_number,level,x,y\n")
    with pytest.raises(ValueError, match=r"train_label_coordinates\.csv.*condition"):
        read_level_points(root)


def test_missing_instance_is_skipped(run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _copy_root(run, tmp_path / "root")
    path = root / "train_label_coordinates.csv"
    rows = list(csv.DictReader(path.open()))
    target = next(r for r in rows if r["condition"] == "Spinal Canal Stenosis" and r["level"] == "L3/L4")
    target["instance_number"] = "9999"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with caplog.at_level(logging.WARNING, logger="models.data.rsna_reader"):
        found = {lp.study_id: lp for lp in read_level_points(root)}
    assert len(found) == 2
    assert list(found[target["study_id"]].points) == ["L1-L2", "L2-L3", "L4-L5", "L5-S1"]
    assert all(len(lp.points) == 5 for sid, lp in found.items() if sid != target["study_id"])
    assert any("9999" in r.getMessage() and target["study_id"] in r.getMessage() for r in caplog.records)
    # the other points are unchanged
    full = {lp.study_id: lp for lp in read_level_points(run / "rsna")}
    for level, p in found[target["study_id"]].points.items():
        np.testing.assert_array_equal(p, full[target["study_id"]].points[level])


def test_pixel_to_patient_convention() -> None:
    """x runs along IOP[:3] in steps of PixelSpacing[1], y along IOP[3:] in steps of PixelSpacing[0]."""
    ds = pydicom.Dataset()
    ds.ImagePositionPatient = [10.0, -20.0, 30.0]
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # sagittal: columns go posterior, rows go down
    ds.PixelSpacing = [0.5, 0.8]  # row spacing, column spacing
    np.testing.assert_allclose(pixel_to_patient(ds, 10, 0), [10.0, -12.0, 30.0])
    np.testing.assert_allclose(pixel_to_patient(ds, 0, 10), [10.0, -20.0, 25.0])
    del ds.PixelSpacing
    with pytest.raises(ValueError):
        pixel_to_patient(ds, 1, 1)


def test_names() -> None:
    assert condition_name("Left Neural Foraminal Narrowing") == "left_neural_foraminal_narrowing"
    assert level_name("L5/S1") == level_name("l5_s1") == "L5-S1"
    assert sorted(["10", "9", "100"], key=natural_key) == ["9", "10", "100"]
