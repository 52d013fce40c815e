"""The synthetic lumbar spine phantom: geometry, truth, DICOM validity, RSNA layout, options."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.data.anatomy import sample_spine
from models.data.pathology import CONDITIONS, LEVELS, rsna_rates
from models.data.phantom import generate, generate_truth, write_contact_sheet
from models.data.render import NUCLEUS_BASE, render_points
from models.data.tissues import Tissue

SEED = 11


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two default studies with the RSNA layout."""
    out = tmp_path_factory.mktemp("phantom")
    generate(out, 2, SEED, rsna=True, progress=False)
    return out


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One study per option set: enhanced+JPEG 2000, RLE reversed without STIR, JPEG-LS randomised."""
    base = tmp_path_factory.mktemp("variants")
    settings = {
        "enhanced": dict(enhanced=True, compression="jpeg2000", axial="multi"),
        "reversed": dict(compression="rle", reverse_order=True, omit="STIR_SAG", axial="single"),
        "randomized": dict(compression="jpeg-ls", randomize=True, omit=("T2_AX",)),
    }
    return {name: generate(base / name, 1, SEED + 1, progress=False, **kw)[0] for name, kw in settings.items()}


def _truth(study: Path) -> dict:
    return json.loads((study / "truth.json").read_text())


def _series(study: Path, role: str) -> list[pydicom.Dataset]:
    truth = _truth(study)
    folder = study / next(s["folder"] for s in truth["series"] if s["role"] == role)
    return sorted((pydicom.dcmread(f) for f in folder.glob("*.dcm")), key=lambda d: int(d.InstanceNumber))


def _affine(ds: pydicom.Dataset) -> np.ndarray:
    """(col, row, 0, 1) -> patient LPS mm."""
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    sp = [float(v) for v in ds.PixelSpacing]
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2] = iop[:3] * sp[1], iop[3:] * sp[0], np.cross(iop[:3], iop[3:])
    m[:3, 3] = np.array(ds.ImagePositionPatient, dtype=float)
    return m


def _nearest(slices: list[pydicom.Dataset], p: np.ndarray) -> tuple[pydicom.Dataset, np.ndarray]:
    """Nearest slice to p and p's (col, row, normal distance) in it."""
    best = min(slices, key=lambda d: abs((np.linalg.inv(_affine(d)) @ np.append(p, 1))[2]))
    return best, (np.linalg.inv(_affine(best)) @ np.append(p, 1))[:3]


def test_grade_rates_follow_rsna() -> None:
    truths = [generate_truth(5, i, label_noise=0.0) for i in range(400)]
    for condition in CONDITIONS:
        for level in LEVELS:
            grades = [t["levels"][level]["conditions"][condition]["grade"] for t in truths]
            expected = rsna_rates(condition, level)
            observed = [grades.count(g) / len(grades) for g in ("normal_mild", "moderate", "severe")]
            assert np.allclose(observed, expected, atol=0.075), (condition, level, observed, expected)
    worse = {c: np.array([[t["levels"][lv]["conditions"][c]["grade"] != "normal_mild" for lv in LEVELS] for t in truths]) for c in CONDITIONS}
    scs, lss, rss = worse["spinal_canal_stenosis"], worse["left_subarticular_stenosis"], worse["right_subarticular_stenosis"]
    assert lss[scs].mean() > 0.6 > lss[~scs].mean()
    assert 0.4 < (lss == rss).mean() < 0.98 and rss[lss].mean() > 2 * rss[~lss].mean()
    assert scs[:, 3].mean() == max(scs[:, i].mean() for i in range(5))


def test_grade_follows_measurement_and_noise() -> None:
    noisy = [generate_truth(6, i, label_noise=0.2) for i in range(40)]
    cells = [c for t in noisy for lv in t["levels"].values() for c in lv["conditions"].values()]
    flipped = np.mean([c["grade"] != c["grade_measured"] for c in cells])
    assert 0.1 < flipped < 0.3
    for c in cells:
        m = c["measurement"]
        assert 0 <= c["severity"] <= 1 and m["value"] <= m["nominal"] + 1e-6


def test_truth_is_deterministic() -> None:
    assert generate_truth(3, 2) == generate_truth(3, 2)
    assert generate_truth(3, 2) != generate_truth(4, 2)


def test_ivd_centres_are_inside_the_discs() -> None:
    for i in range(15):
        sp = sample_spine(np.random.default_rng([21, i, 0]))
        truth = generate_truth(21, i)
        centres = np.array([truth["levels"][lv]["center"] for lv in LEVELS], dtype=np.float32)
        labels = render_points(sp, centres, 0.5).labels()
        assert all(lab >= NUCLEUS_BASE or lab == Tissue.ANNULUS for lab in labels), labels
        canal = np.array([truth["levels"][lv]["conditions"]["spinal_canal_stenosis"]["point"] for lv in LEVELS], dtype=np.float32)
        assert all(lab in (Tissue.CSF, Tissue.NERVE) for lab in render_points(sp, canal, 0.5).labels())


def test_every_file_reads_and_geometry_round_trips(run: Path, variants: dict[str, Path]) -> None:
    for study in [*sorted(run.glob("study_*")), *variants.values()]:
        truth = _truth(study)
        for series in truth["series"]:
            files = sorted((study / series["folder"]).glob("*.dcm"))
            assert len(files) == series["files"]
            for f in files:
                ds = pydicom.dcmread(f)
                assert ds.pixel_array.shape[-2:] == (ds.Rows, ds.Columns)
                assert ds.StudyInstanceUID == truth["study_instance_uid"] and ds.BodyPartExamined == "LSPINE"
    study = run / "study_0000"
    frames = {_series(study, r)[0].FrameOfReferenceUID for r in ("T1_SAG", "T2_SAG", "STIR_SAG", "T2_AX")}
    assert len(frames) == 1
    for role in ("T1_SAG", "T2_SAG", "STIR_SAG", "T2_AX"):
        slices = _series(study, role)
        for level in _truth(study)["levels"].values():
            p = np.array(level["center"])
            ds, (col, row, dist) = _nearest(slices, p)
            assert dist <= float(ds.SpacingBetweenSlices) / 2 + 0.6
            back = _affine(ds) @ np.array([col, row, dist, 1.0])
            assert np.allclose(back[:3], p, atol=1e-6)
            assert 0 <= col < ds.Columns and 0 <= row < ds.Rows
        normal = np.cross(*np.reshape(np.array(slices[0].ImageOrientationPatient, float), (2, 3)))
        positions = sorted(float(np.dot(normal, d.ImagePositionPatient)) for d in slices)
        gaps = np.diff(positions)
        if role != "T2_AX":
            assert np.allclose(gaps, float(slices[0].SpacingBetweenSlices), atol=1e-3)


def test_discs_are_where_the_truth_says_on_t1(run: Path) -> None:
    study = run / "study_0001"
    slices = _series(study, "T1_SAG")
    for level in _truth(study)["levels"].values():
        p, normal = np.array(level["center"]), np.array(level["plane"]["normal"])
        ds, (col, row, _) = _nearest(slices, p)
        disc = ds.pixel_array[int(round(row)) - 1 : int(round(row)) + 2, int(round(col)) - 1 : int(round(col)) + 2].mean()
        above = p + normal * (level["disc_height_mm"] / 2 + 12)
        _, (c2, r2, _) = _nearest([ds], above)
        body = ds.pixel_array[int(round(r2)) - 1 : int(round(r2)) + 2, int(round(c2)) - 1 : int(round(c2)) + 2].mean()
        assert disc < 0.85 * body, (disc, body)


def test_headers_match_the_weighting(run: Path) -> None:
    study = run / "study_0000"
    t1, t2, stir = (_series(study, r)[0] for r in ("T1_SAG", "T2_SAG", "STIR_SAG"))
    assert float(t1.RepetitionTime) < 1000 and float(t1.EchoTime) < 20 and "InversionTime" not in t1
    assert float(t2.RepetitionTime) > 2000 and float(t2.EchoTime) > 80
    assert "IR" in stir.ScanningSequence and 100 < float(stir.InversionTime) < 300
    assert t1.SOPClassUID == pydicom.uid.MRImageStorage and t1.Manufacturer


@pytest.mark.parametrize("kind", ["single", "enhanced", "rle", "jpeg-ls"])
def test_dciodvfy_finds_no_errors(kind: str, run: Path, variants: dict[str, Path]) -> None:
    study = {"single": run / "study_0000", "enhanced": variants["enhanced"], "rle": variants["reversed"], "jpeg-ls": variants["randomized"]}[kind]
    files = sorted(study.glob("*/*.dcm"))
    result = subprocess.run([shutil.which("dciodvfy") or "/usr/bin/dciodvfy", str(files[0])], capture_output=True, text=True)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_options_change_the_files(variants: dict[str, Path]) -> None:
    enhanced = variants["enhanced"]
    for series in _truth(enhanced)["series"]:
        ds = pydicom.dcmread(next((enhanced / series["folder"]).glob("*.dcm")))
        assert series["files"] == 1 and int(ds.NumberOfFrames) > 1
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    axial = _series(enhanced, "T2_AX")[0]
    orientations = {tuple(np.round(f.PlaneOrientationSequence[0].ImageOrientationPatient, 3)) for f in axial.PerFrameFunctionalGroupsSequence}
    assert len(orientations) == 5
    rev = variants["reversed"]
    assert "STIR_SAG" not in {s["role"] for s in _truth(rev)["series"]}
    sag = _series(rev, "T2_SAG")
    normal = np.cross(*np.reshape(np.array(sag[0].ImageOrientationPatient, float), (2, 3)))
    along = [float(np.dot(normal, d.ImagePositionPatient)) for d in sag]
    assert np.all(np.diff(along) > 0) or np.all(np.diff(along) < 0)
    assert sag[0].file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert len({tuple(np.round(d.ImageOrientationPatient, 3)) for d in _series(rev, "T2_AX")}) == 1
    assert "T2_AX" not in {s["role"] for s in _truth(variants["randomized"])["series"]}
    with pytest.raises(ValueError):
        generate(rev.parent / "bad", 1, 0, progress=False, compression="gif")


def test_generation_is_deterministic(run: Path, tmp_path: Path) -> None:
    again = generate(tmp_path, 1, SEED, progress=False)[0]
    first = run / "study_0000"
    assert _truth(again) == _truth(first)
    for f in sorted(first.glob("*/*.dcm"))[::7]:
        assert f.read_bytes() == (again / f.relative_to(first)).read_bytes()


def test_rsna_layout(run: Path) -> None:
    root = run / "rsna"
    rows = list(csv.DictReader((root / "train.csv").open()))
    assert len(rows) == 2 and len(rows[0]) == 26
    assert set(rows[0]) >= {"study_id", "spinal_canal_stenosis_l4_l5", "right_subarticular_stenosis_l5_s1"}
    assert {v for r in rows for k, v in r.items() if k != "study_id"} <= {"Normal/Mild", "Moderate", "Severe"}
    series = list(csv.DictReader((root / "train_series_descriptions.csv").open()))
    assert {s["series_description"] for s in series} == {"Sagittal T1", "Sagittal T2/STIR", "Axial T2"}
    coords = list(csv.DictReader((root / "train_label_coordinates.csv").open()))
    assert len(coords) == 2 * 25
    for c in coords:
        ds = pydicom.dcmread(root / "train_images" / c["study_id"] / c["series_id"] / f"{c['instance_number']}.dcm")
        assert 0 <= float(c["x"]) < ds.Columns and 0 <= float(c["y"]) < ds.Rows
        assert int(ds.InstanceNumber) == int(c["instance_number"])


def test_contact_sheet(run: Path, tmp_path: Path) -> None:
    png = write_contact_sheet(run / "study_0000", tmp_path / "sheet.png")
    from PIL import Image

    with Image.open(png) as img:
        assert img.size == (1600, 640)
        assert np.asarray(img).std() > 10


def _disc_posterior_border(sp, level: str, xs: np.ndarray) -> np.ndarray:
    """Posterior extent (mm, v) of disc tissue at lateral offsets xs in the disc's mid-plane."""
    lv = sp.level(level)
    v = np.arange(0.0, 30.0, 0.1)
    pts = np.array([sp.point(lv.s_centre, vv, xx) for xx in xs for vv in v], dtype=np.float32)
    labels = render_points(sp, pts, 0.2).labels().reshape(len(xs), len(v))
    disc = (labels == Tissue.ANNULUS) | (labels >= NUCLEUS_BASE)
    return np.array([v[np.flatnonzero(row)[-1]] for row in disc])


def test_disc_section_is_kidney_shaped_and_bulges_with_stenosis() -> None:
    concave, bulges = 0, {"normal_mild": [], "severe": []}
    for i in range(12):
        sp = sample_spine(np.random.default_rng([31, i, 0]))
        for level in LEVELS:
            t = sp.truth[level]["spinal_canal_stenosis"]
            if t.grade_measured in bulges:
                bulges[t.grade_measured].append(sp.level(level).bulge_central)
        if sp.truth["L2-L3"]["spinal_canal_stenosis"].grade_measured == "normal_mild":
            centre, left, right = _disc_posterior_border(sp, "L2-L3", np.array([0.0, 9.0, -9.0]))
            concave += int(centre < min(left, right) - 0.5)
    assert concave >= 8
    assert np.mean(bulges["severe"]) > np.mean(bulges["normal_mild"]) + 2.0


def test_enhanced_mr_frames_map_points(variants: dict[str, Path]) -> None:
    study = variants["enhanced"]
    ds = _series(study, "T1_SAG")[0]
    assert ds.SOPClassUID == pydicom.uid.EnhancedMRImageStorage
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert shared.MRImageFrameTypeSequence[0].FrameType[0] == "ORIGINAL"
    assert float(shared.MRTimingAndRelatedParametersSequence[0].RepetitionTime) < 1000
    frames = []
    for frame in ds.PerFrameFunctionalGroupsSequence:
        fd = pydicom.Dataset()
        fd.ImagePositionPatient = frame.PlanePositionSequence[0].ImagePositionPatient
        fd.ImageOrientationPatient = frame.PlaneOrientationSequence[0].ImageOrientationPatient
        fd.PixelSpacing = shared.PixelMeasuresSequence[0].PixelSpacing
        frames.append(fd)
    spacing = float(shared.PixelMeasuresSequence[0].SpacingBetweenSlices)
    for level in _truth(study)["levels"].values():
        p = np.array(level["center"])
        fd, (col, row, dist) = _nearest(frames, p)
        assert dist <= spacing / 2 + 0.6 and 0 <= col < ds.Columns and 0 <= row < ds.Rows
        assert np.allclose((_affine(fd) @ np.array([col, row, dist, 1.0]))[:3], p, atol=1e-6)
    positions = [int(f.FrameContentSequence[0].InStackPositionNumber) for f in ds.PerFrameFunctionalGroupsSequence]
    assert positions == list(range(1, len(frames) + 1))


def test_jpeg_lossless_round_trips(tmp_path: Path) -> None:
    omit = "T2_AX,STIR_SAG,T2_SAG"
    study = generate(tmp_path / "ljpeg", 1, SEED, progress=False, compression="jpeg-lossless", omit=omit)[0]
    plain = _series(generate(tmp_path / "plain", 1, SEED, progress=False, omit=omit)[0], "T1_SAG")
    packed = _series(study, "T1_SAG")
    assert packed[0].file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    for a, b in zip(plain, packed):
        assert np.array_equal(a.pixel_array, b.pixel_array)
    files = sorted(study.glob("*/*.dcm"))
    result = subprocess.run([shutil.which("dciodvfy") or "/usr/bin/dciodvfy", str(files[0])], capture_output=True, text=True)
    assert [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")] == []
