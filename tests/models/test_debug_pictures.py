"""Debug pictures (models.debug_pictures) of a phantom study analysed without the network: discs
from the phantom's truth, crops from the real extraction. Marks are checked by colour at positions
projected here from the boxes and the volumes' affines, independently of the module's drawing code."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.analysis import StudyAnalysis
from models.data.pathology import LEVELS
from models.data.phantom import generate
from models.debug_pictures import write_debug_pictures
from models.detect import LevelDetection
from models.evaluate_detector import load_study
from models.extract import CROP_SHAPE, extract
from models.sampler import Box
from models.volumes import SeriesVolume

SAGITTAL = ("T2_SAG", "STIR_SAG", "T1_SAG")


@dataclass(frozen=True)
class Written:
    """One analysed phantom study, its debug pictures and how long writing them took."""

    truth: dict[str, Any]
    volumes: dict[str, list[SeriesVolume]]
    study: StudyAnalysis
    out: Path
    paths: list[Path]
    seconds: float


def _analyse(study_dir: Path, out: Path) -> Written:
    """Discs from the truth (confidence 1), crops by ``extract``, pictures into ``out``."""
    truth, volumes = load_study(study_dir)
    discs = {
        level: LevelDetection(level, np.array(t["center"]), np.array(t["plane"]["normal"]), np.array(t["plane"]["posterior"]),
                              np.array(t["plane"]["left"]), float(t["disc_depth_mm"]), 1.0, "")
        for level, t in truth["levels"].items()
    }
    crops, warnings = extract(volumes, discs)
    study = StudyAnalysis([], discs, crops, warnings)
    start = time.perf_counter()
    paths = write_debug_pictures(out, volumes, study)
    return Written(truth, volumes, study, out, paths, time.perf_counter() - start)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    """A study with one axial stack per disc."""
    root = tmp_path_factory.mktemp("debug")
    (study_dir,) = generate(root / "phantom", 1, 5, progress=False, axial="multi")
    return _analyse(study_dir, root / "pictures")


def _rc(volume: SeriesVolume, points: np.ndarray) -> np.ndarray:
    """(row, column) source indices of patient points (N, 3), projected along the slice normal."""
    p = np.atleast_2d(points)
    return (np.c_[p, np.ones(len(p))] @ np.linalg.inv(volume.volume.affine).T)[:, 1:3]


def _middle_corners(box: Box) -> np.ndarray:
    """Patient positions (4, 3) of the corner voxel centres of a box's middle slice, in order round."""
    m, h, w = (box.shape[0] - 1) / 2, box.shape[1] - 1, box.shape[2] - 1
    idx = np.array([[m, 0, 0, 1], [m, 0, w, 1], [m, h, w, 1], [m, h, 0, 1]])
    return (idx @ box.affine.T)[:, :3]


def _xy(image: np.ndarray, volume: SeriesVolume, rc: np.ndarray) -> np.ndarray:
    """Picture (x, y) of source (row, column) indices: the picture is the slice, scaled."""
    rows, cols = volume.volume.spatial_shape[1:]
    scale = np.array([image.shape[1] / cols, image.shape[0] / rows])
    return (np.atleast_2d(rc)[:, ::-1] + 0.5) * scale - 0.5


def _near(image: np.ndarray, xy: np.ndarray, is_colour: Callable[[np.ndarray], np.ndarray], radius: int = 1) -> bool:
    """Whether a pixel within ``radius`` of picture position xy has the colour."""
    x, y = (int(round(float(v))) for v in xy)
    return bool(is_colour(image[max(y - radius, 0) : y + radius + 1, max(x - radius, 0) : x + radius + 1]).any())


def _colour(high: tuple[bool, bool, bool]) -> Callable[[np.ndarray], np.ndarray]:
    """Test of RGB pixels (..., 3): each channel over 200 where ``high`` says, else under 90."""
    want = np.array(high)

    def test(pixels: np.ndarray) -> np.ndarray:
        return np.asarray(np.where(want, pixels > 200, pixels < 90).all(axis=-1))

    return test


_red, _yellow, _blue, _cyan = _colour((True, False, False)), _colour((True, True, False)), _colour((False, False, True)), _colour((False, True, True))


def _edge_points(corners: np.ndarray, per_edge: int = 12) -> np.ndarray:
    """Points along a closed outline (N, 2), away from its corners."""
    f = np.linspace(0.1, 0.9, per_edge)[:, None]
    return np.concatenate([a + f * (b - a) for a, b in zip(corners, np.roll(corners, -1, axis=0))])


def _open(path: Path) -> np.ndarray:
    """A PNG, checked for integrity, as RGB pixels (rows, columns, 3)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_every_picture_is_written_as_a_png_of_sensible_size(written: Written) -> None:
    expected = {*(f"sagittal_{r}.png" for r in SAGITTAL), *(f"axial_{lv}.png" for lv in LEVELS), *(f"crops_{lv}.png" for lv in LEVELS), "montage.png"}
    assert {p.name for p in written.paths} == expected
    assert {p.name for p in written.out.iterdir()} == expected
    for path in written.paths:
        height, width, _ = _open(path).shape
        if path.name.startswith(("sagittal", "axial")):
            assert max(height, width) >= 512 and min(height, width) >= 256, path.name
        elif path.name.startswith("crops"):  # a row per crop: three sagittal and one axial, nine slices each
            assert width >= CROP_SHAPE[0] * CROP_SHAPE[2] and height >= 4 * CROP_SHAPE[1], path.name
        else:  # levels down, four (role, view) columns across
            assert width >= 4 * CROP_SHAPE[2] and height >= len(LEVELS) * CROP_SHAPE[1], path.name
    assert written.seconds < 5, "debug pictures should take well under a second per study"


@pytest.mark.parametrize("role", SAGITTAL)
def test_sagittal_picture_marks_centres_yellow_and_rois_red(written: Written, role: str) -> None:
    volume = written.volumes[role][0]
    image = _open(written.out / f"sagittal_{role}.png")
    for level in LEVELS:
        centre = _xy(image, volume, _rc(volume, np.array(written.truth["levels"][level]["center"])))[0]
        assert _near(image, centre, _yellow), f"{role} {level}: no yellow dot at the disc centre {centre}"
        (crop,) = [c for c in written.study.crops if c.level == level and c.role == role]
        outline = _xy(image, volume, _rc(volume, _middle_corners(crop.box)))
        on_edge = [_near(image, p, _red) for p in _edge_points(outline)]
        assert np.mean(on_edge) > 0.85, f"{role} {level}: ROI outline red at only {np.mean(on_edge):.0%} of its points"
    assert _red(image).mean() < 0.1, "outlines, not filled boxes"


def test_axial_pictures_mark_the_reference_point_blue_inside_the_cyan_crop(written: Written) -> None:
    axial = [c for c in written.study.crops if c.view == "axial"]
    assert {c.level for c in axial} == set(LEVELS)
    for crop in axial:
        (volume,) = [v for v in written.volumes["T2_AX"] if v.series_instance_uid == crop.series_instance_uid and v.stack == crop.stack]
        image = _open(written.out / f"axial_{crop.level}.png")
        dot = _xy(image, volume, _rc(volume, crop.box.centre))[0]
        assert _near(image, dot, _blue), f"{crop.level}: no blue dot at the axial box centre {dot}"
        outline = _xy(image, volume, _rc(volume, _middle_corners(crop.box)))
        on_edge = [_near(image, p, _cyan) for p in _edge_points(outline)]
        assert np.mean(on_edge) > 0.85, f"{crop.level}: crop outline cyan at only {np.mean(on_edge):.0%} of its points"


def test_a_study_without_axial_series_gets_no_axial_pictures(tmp_path: Path) -> None:
    (study_dir,) = generate(tmp_path / "phantom", 1, 6, progress=False, omit=("T2_AX",))
    result = _analyse(study_dir, tmp_path / "pictures")
    names = {p.name for p in result.paths}
    assert not any(n.startswith("axial_") for n in names)
    assert names == {*(f"sagittal_{r}.png" for r in SAGITTAL), *(f"crops_{lv}.png" for lv in LEVELS), "montage.png"}
    assert all(p.exists() for p in result.paths)


def test_a_study_without_discs_still_shows_its_sagittal_slices(written: Written, tmp_path: Path) -> None:
    paths = write_debug_pictures(tmp_path, written.volumes, StudyAnalysis([], {}, [], ["levels not found"]))
    assert sorted(p.name for p in paths) == sorted(f"sagittal_{r}.png" for r in SAGITTAL)
    for path in paths:
        _open(path)
