"""Disc volumes from true disc positions: sagittal and axial boxes, coverage, odd orientations.

The discs come from the phantom's truth, not the detector, so these tests pin the geometry of
extraction alone (paper section 4.1) whatever the shipped weights do.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models.data.pathology import LEVELS
from models.data.phantom import generate
from models.detect import LevelDetection
from models.evaluate_detector import load_study
from models.extract import CROP_SHAPE, FORAMEN_REACH_MM, extract, sagittal_box
from models.sampler import sample
from models.volumes import SeriesVolume

SEED = 23


def true_discs(truth: dict) -> dict[str, LevelDetection]:
    """LevelDetections at the phantom's true disc centres and planes."""
    out = {}
    for level in LEVELS:
        t = truth["levels"][level]
        plane = {k: np.array(v) for k, v in t["plane"].items()}
        out[level] = LevelDetection(level, np.array(t["center"]), plane["normal"], plane["posterior"], plane["left"], t["disc_depth_mm"], 1.0, "")
    return out


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One study with a single axial stack, one with a stack per disc."""
    base = tmp_path_factory.mktemp("extract")
    return {
        "single": generate(base / "single", 1, SEED, progress=False, axial="single")[0],
        "multi": generate(base / "multi", 1, SEED, progress=False, axial="multi")[0],
    }


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_every_level_gets_a_crop_from_every_series(studies: dict[str, Path], kind: str) -> None:
    """Five levels x (three sagittal series + the axial series), each 9x112x224, fully covered."""
    truth, volumes = load_study(studies[kind])
    crops, warnings = extract(volumes, true_discs(truth))
    assert warnings == []
    assert sorted((c.level, c.role) for c in crops) == sorted((lv, r) for lv in LEVELS for r in ("T1_SAG", "T2_SAG", "STIR_SAG", "T2_AX"))
    for c in crops:
        assert c.pixels.shape == CROP_SHAPE
        assert 0.0 <= c.pixels.min() and c.pixels.max() <= 1.0
        assert c.coverage > (0.99 if c.view == "sagittal" else 0.9), (c.level, c.role, c.coverage)


def test_sagittal_box_is_native_slices_aligned_with_the_disc(studies: dict[str, Path]) -> None:
    """Nine contiguous native slices around the disc (T2, STIR), rows caudal along the normal,
    columns posterior, 2:1."""
    truth, volumes = load_study(studies["single"])
    vol = volumes["T2_SAG"][0]
    for level, disc in true_discs(truth).items():
        box = sagittal_box(vol, disc)
        slice_idx = box.to_source(vol.volume, np.array([[k, 55.5, 111.5] for k in range(9)]))[:, 0]
        assert np.allclose(slice_idx, np.round(slice_idx), atol=1e-6), "box slices must be native slices"
        assert abs(float(np.diff(slice_idx).mean())) == pytest.approx(1.0)
        assert np.linalg.norm(box.centre - disc.centre) < vol.volume.spacing[0] / 2 + 1e-6
        assert box.axes[1] @ disc.normal == pytest.approx(-1.0, abs=1e-3)
        assert box.axes[2] @ disc.posterior == pytest.approx(1.0, abs=1e-3)
        width = box.spacing[2] * CROP_SHAPE[2]
        assert width == pytest.approx(2 * disc.depth_mm)
        assert box.spacing[1] == box.spacing[2]


def test_t1_sagittal_crops_reach_both_foramina_within_the_series(studies: dict[str, Path]) -> None:
    """T1 crops step out to FORAMEN_REACH_MM each side (never below the native spacing, never past
    the outer slices) around a native centre slice; T2 crops stay contiguous."""
    truth, volumes = load_study(studies["single"])
    crops, _ = extract(volumes, true_discs(truth))
    t1 = volumes["T1_SAG"][0]
    native, n = float(t1.volume.spacing[0]), t1.volume.spatial_shape[0]
    assert {c.role for c in crops} >= {"T1_SAG", "T2_SAG"}
    for c in crops:
        if c.role == "T2_SAG":
            assert c.box.spacing[0] == pytest.approx(float(volumes["T2_SAG"][0].volume.spacing[0]))
        if c.role != "T1_SAG":
            continue
        assert native <= c.box.spacing[0] <= FORAMEN_REACH_MM / 4 + 1e-9
        ends = c.box.to_source(t1.volume, np.array([[k, 55.5, 111.5] for k in (0, 4, 8)]))[:, 0]
        assert ends[1] == pytest.approx(round(ends[1]), abs=1e-6), "the centre slice is a native one"
        assert -1e-6 <= ends.min() and ends.max() <= n - 1 + 1e-6, (c.level, ends)
        assert c.coverage > 0.99
        at_edge = min(ends) == pytest.approx(0.0, abs=1e-6) or max(ends) == pytest.approx(n - 1, abs=1e-6)
        assert 4 * c.box.spacing[0] == pytest.approx(FORAMEN_REACH_MM) or at_edge, (c.level, ends)
        assert 4 * c.box.spacing[0] > 4 * native, "the crop must reach further than nine contiguous slices"


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_axial_crop_is_placed_as_in_the_paper(studies: dict[str, Path], kind: str) -> None:
    """Reference point on the disc's posterior margin, mid-sagittal, within the crossing axial slices;
    the crop contains the true disc centre and rows run posterior, columns to the patient's left."""
    truth, volumes = load_study(studies[kind])
    discs = true_discs(truth)
    crops, _ = extract(volumes, discs)
    sagittal = volumes["T2_SAG"][0]
    offsets = sagittal.slice_positions @ sagittal.slice_axis
    for c in (c for c in crops if c.view == "axial"):
        disc = discs[c.level]
        posterior = disc.centre + disc.posterior * disc.depth_mm / 2
        ref = c.box.centre
        assert ref @ sagittal.slice_axis == pytest.approx((offsets.min() + offsets.max()) / 2, abs=1e-6)
        assert (ref - posterior) @ disc.posterior == pytest.approx(0.0, abs=1e-6), c.level
        assert c.box.axes[1][1] > 0.8 and c.box.axes[2][0] > 0.95
        idx = c.box.to_voxels(disc.centre[None])[0]
        assert np.all(idx >= -0.5) and np.all(idx <= np.asarray(CROP_SHAPE) - 0.5), (c.level, idx)


def test_level_without_axial_coverage_is_reported_missing(studies: dict[str, Path], tmp_path: Path) -> None:
    """Removing the L5-S1 stack of a per-disc axial series loses that level's axial view, loudly."""
    study = tmp_path / "study"
    shutil.copytree(studies["multi"], study)
    truth, volumes = load_study(study)
    discs = true_discs(truth)
    kept = [v for v in volumes["T2_AX"] if not _cuts(v, discs["L5-S1"])]
    assert len(kept) == len(volumes["T2_AX"]) - 1
    crops, warnings = extract({**volumes, "T2_AX": kept}, discs)
    assert not [c for c in crops if c.view == "axial" and c.level == "L5-S1"]
    assert any(w.startswith("L5-S1:") and "axial view missing" in w for w in warnings)
    assert {c.level for c in crops if c.view == "axial"} == set(LEVELS) - {"L5-S1"}


def _cuts(vol: SeriesVolume, disc: LevelDetection) -> bool:
    """Whether an axial stack's slices span the disc centre."""
    d = (disc.centre - vol.slice_positions[0]) @ vol.slice_axis
    return 0 <= d <= (vol.volume.spatial_shape[0] - 1) * vol.volume.spacing[0]


def test_flipped_volume_gives_the_same_crops(studies: dict[str, Path]) -> None:
    """A series stored mirrored (rows, columns and slice order reversed) yields the same crops:
    extraction happens in patient space, never in array order."""
    truth, volumes = load_study(studies["single"])
    discs = true_discs(truth)
    vol = volumes["T1_SAG"][0]
    flipped = SeriesVolume(vol.series_instance_uid, 0, vol.volume.flip_spatial((0, 1, 2)), tuple(reversed(vol.sources)))
    assert not np.allclose(flipped.volume.array, vol.volume.array)
    a, _ = extract({"T1_SAG": [vol]}, discs)
    b, _ = extract({"T1_SAG": [flipped]}, discs)
    for x, y in zip(a, b):
        assert np.abs(x.pixels - y.pixels).max() < 1e-3


def test_crop_slices_point_back_to_their_source_instances(studies: dict[str, Path]) -> None:
    """Each sagittal crop slice names the instance it was read from, and resampling that box
    again from the source volume gives the same pixels (the box is the crop's affine)."""
    truth, volumes = load_study(studies["single"])
    vol = volumes["T2_SAG"][0]
    crops, _ = extract({"T2_SAG": [vol]}, true_discs(truth))
    for c in crops:
        sources = c.source_slices(vol)
        k = [vol.sources.index(s) for s in sources]
        assert np.abs(np.diff(k)).tolist() == [1] * 8
        again, _ = sample(vol.volume, [c.box])
        raw = again[0].numpy()
        assert np.corrcoef(raw.ravel(), c.pixels.ravel())[0, 1] > 0.99
