"""DICOM series to volumes (models.volumes): geometry, slice order, stacks, Enhanced MR,
compressed transfer syntaxes, mixed matrices, and the errors of series that form no volume."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from numpy.typing import ArrayLike
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from models.data.dicomwrite import COMPRESSIONS
from models.data.phantom import generate
from models.volumes import SeriesVolume, SliceSource, VolumeError, group_by_series, load_series

SEED = 23
# Every twin shares these options, so the same seed renders the same anatomy, noise and geometry.
COMMON: dict[str, Any] = {"axial": "multi", "omit": ("T1_SAG", "STIR_SAG"), "sag_matrix": 128, "ax_matrix": 96}
TWINS: dict[str, dict[str, Any]] = {
    "plain": {},
    "reversed": {"reverse_order": True},
    "enhanced": {"enhanced": True},
    "enhanced-jpeg2000": {"enhanced": True, "compression": "jpeg2000"},
    **{name: {"compression": name} for name in ("jpeg-lossless", "jpeg-ls", "jpeg2000", "rle")},
}
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
OBLIQUE = (0.0, 0.9659258, -0.2588190, 0.0, -0.2588190, -0.9659258)  # sagittal, tilted 15 degrees


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Twin studies from one seed (plain, reversed instance numbers, Enhanced MR, each lossless
    compression), plus a single-stack axial study."""
    base = tmp_path_factory.mktemp("volumes")
    out = {name: generate(base / name, 1, SEED, progress=False, **{**COMMON, **kw})[0] for name, kw in TWINS.items()}
    out["single"] = generate(base / "single", 1, SEED, progress=False, **{**COMMON, "axial": "single"})[0]
    return out


def _truth(study: Path) -> dict:
    return json.loads((study / "truth.json").read_text())


def _entry(study: Path, role: str) -> dict:
    return next(s for s in _truth(study)["series"] if s["role"] == role)


def _files(study: Path, role: str) -> list[Path]:
    return sorted((study / _entry(study, role)["folder"]).glob("*.dcm"))


def _load(study: Path, role: str) -> list[SeriesVolume]:
    """The volumes of one series of a study, which must all form."""
    volumes, skipped = load_series(_files(study, role))
    assert skipped == []
    return volumes


def _index(vol: SeriesVolume, points: np.ndarray) -> np.ndarray:
    """Fractional voxel indices (slice, row, column) of patient points."""
    return np.asarray(vol.volume.map_reference_to_indices(np.atleast_2d(points), round_output=False, check_bounds=False))


def _inside(vol: SeriesVolume, points: np.ndarray, slack: float = 0.0) -> np.ndarray:
    """Whether each patient point lies within the volume's voxel centres (plus ``slack`` voxels)."""
    idx = _index(vol, points)
    return np.all((idx >= -slack) & (idx <= np.asarray(vol.volume.spatial_shape) - 1 + slack), axis=1)


def _assert_same(a: Sequence[SeriesVolume], b: Sequence[SeriesVolume], sources: bool = True) -> None:
    """Two loads of a series give the same volumes: stacks, pixels, affines (and sources)."""
    assert len(a) == len(b)
    for va, vb in zip(a, b):
        assert va.stack == vb.stack
        assert va.volume.spatial_shape == vb.volume.spatial_shape
        assert np.array_equal(va.volume.array, vb.volume.array)
        assert np.allclose(va.volume.affine, vb.volume.affine, atol=1e-4)
        if sources:
            assert va.sources == vb.sources


def _normal(orientation: Sequence[float]) -> np.ndarray:
    """DICOM slice normal, row direction x column direction."""
    o = np.asarray(orientation, dtype=float)
    return np.cross(o[:3], o[3:])


def _instance(position: ArrayLike, orientation: Sequence[float] = AXIAL, shape: tuple[int, int] = (6, 7),
              spacing: tuple[float, float] = (0.5, 0.8), value: int = 0, series_uid: str = "1.2.826.0.1.3680043.10.9999.1") -> Dataset:
    """A small synthetic MR Image dataset; its pixels are ``value`` plus a ramp over the image."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series_uid, "1.2.826.0.1.3680043.10.9999.2"
    ds.Modality = "MR"
    ds.ImagePositionPatient = [float(v) for v in np.asarray(position, dtype=float)]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = list(spacing)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (value + np.arange(shape[0] * shape[1], dtype=np.uint16).reshape(shape)).tobytes()
    return ds


def _stack(n: int, origin: Sequence[float] = (10.0, -20.0, 30.0), orientation: Sequence[float] = AXIAL, step: float = 3.0,
           spacing: tuple[float, float] = (0.5, 0.8)) -> list[Dataset]:
    """``n`` parallel synthetic slices ``step`` mm apart along the DICOM normal; the pixels of
    slice k start at 100 * k, and InstanceNumber k + 1 runs along the DICOM normal, so against
    the volume's slice order (whose slice axis is minus the normal)."""
    normal = _normal(orientation)
    out = []
    for k in range(n):
        ds = _instance(np.asarray(origin) + k * step * normal, orientation, spacing=spacing, value=100 * k)
        ds.InstanceNumber = k + 1
        out.append(ds)
    return out


def test_sagittal_series_is_one_volume_at_the_instances_positions(studies: dict[str, Path]) -> None:
    """A classic sagittal series forms one volume: every slice comes from one instance, its first
    pixel sits at that instance's ImagePositionPatient, its pixels are the instance's, and the
    truth disc centres fall inside the volume."""
    study = studies["plain"]
    files = _files(study, "T2_SAG")
    (vol,) = _load(study, "T2_SAG")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in files)}
    first = next(iter(by_uid.values()))
    assert vol.volume.spatial_shape == (len(files), first.Rows, first.Columns)
    assert vol.series_instance_uid == first.SeriesInstanceUID and vol.stack == 0
    assert vol.volume.frame_of_reference_uid == first.FrameOfReferenceUID
    assert sorted(s.sop_instance_uid for s in vol.sources) == sorted(by_uid)
    for k, source in enumerate(vol.sources):
        ds = by_uid[source.sop_instance_uid]
        assert source == SliceSource(str(ds.SOPInstanceUID), str(ds.SOPClassUID), None)
        ipp = np.array(ds.ImagePositionPatient, dtype=float)
        assert np.allclose(vol.volume.map_indices_to_reference(np.array([[k, 0, 0]]))[0], ipp, atol=1e-3)
        assert np.allclose(vol.slice_positions[k], ipp, atol=1e-3)
        assert np.array_equal(vol.volume.array[k], ds.pixel_array.astype(np.float32))
    # the slice axis is the volume's, and positions increase along it by one spacing per slice
    along = vol.slice_positions @ vol.slice_axis
    assert np.allclose(np.diff(along), vol.volume.spacing[0], atol=1e-3)
    assert np.isclose(abs(vol.slice_axis @ _normal(first.ImageOrientationPatient)), 1.0)
    centres = np.array([lv["center"] for lv in _truth(study)["levels"].values()])
    assert _inside(vol, centres).all(), _index(vol, centres)


def test_affine_follows_pixel_spacing_and_orientation() -> None:
    """On an oblique stack with anisotropic pixels, voxel (k, r, c) maps to IPP_k + c * column
    spacing * row direction + r * row spacing * column direction, whatever the instance order."""
    slices = _stack(5, orientation=OBLIQUE, step=2.5, spacing=(0.5, 0.8))
    random.Random(3).shuffle(slices)
    (vol,), skipped = load_series(slices)
    assert skipped == []
    assert np.allclose(vol.volume.spacing, (2.5, 0.5, 0.8))
    row_dir, col_dir = np.array(OBLIQUE[:3]), np.array(OBLIQUE[3:])
    by_uid = {str(ds.SOPInstanceUID): ds for ds in slices}
    for k, source in enumerate(vol.sources):
        ds = by_uid[source.sop_instance_uid]
        assert ds.pixel_array[0, 0] == 100 * (4 - k)  # sorted by position, against the DICOM normal
        for r, c in ((0, 0), (5, 0), (0, 6), (5, 6), (2, 3)):
            expected = np.array(ds.ImagePositionPatient, dtype=float) + c * 0.8 * row_dir + r * 0.5 * col_dir
            assert np.allclose(vol.volume.map_indices_to_reference(np.array([[k, r, c]]))[0], expected, atol=1e-4)
    assert np.array_equal(vol.volume.array[:, 0, 0], 100 * np.arange(4, -1, -1, dtype=np.float32))
    assert np.allclose(vol.slice_axis, -_normal(OBLIQUE))


def test_stacks_are_numbered_the_same_whatever_the_file_order() -> None:
    """A three-plane localiser (sagittal, coronal and axial blocks in one series) forms three
    volumes whose order and stack numbers do not depend on the order the files came in."""
    planes = [
        _stack(3, origin=(-3.0, -40.0, 40.0), orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0)),
        _stack(3, origin=(-40.0, 0.0, 40.0), orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0)),
        _stack(3, origin=(-40.0, -40.0, 0.0), orientation=AXIAL),
    ]
    slices = [ds for plane in planes for ds in plane]
    reference, skipped = load_series(slices)
    assert skipped == [] and len(reference) == 3 and [v.stack for v in reference] == [0, 1, 2]
    for seed in range(6):
        order = list(slices)
        random.Random(seed).shuffle(order)
        _assert_same(reference, load_series(order)[0])


@pytest.mark.parametrize("role", ["T2_SAG", "T2_AX"])
def test_file_order_does_not_matter(studies: dict[str, Path], role: str) -> None:
    """Reversed instance numbers, reversed and shuffled file lists all give the same volumes:
    slices are sorted by position, never by InstanceNumber."""
    plain = _load(studies["plain"], role)
    files = _files(studies["plain"], role)
    shuffled = list(files)
    random.Random(7).shuffle(shuffled)
    for order in (files[::-1], shuffled):
        volumes, skipped = load_series(order)
        assert skipped == []
        _assert_same(plain, volumes)
    reversed_twin = _load(studies["reversed"], role)
    _assert_same(plain, reversed_twin)
    # the twin really numbers its instances the other way round
    numbers = {
        name: {str(ds.SOPInstanceUID): int(ds.InstanceNumber) for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in _files(studies[name], role))}
        for name in ("plain", "reversed")
    }
    along = [s.sop_instance_uid for v in plain for s in v.sources]
    assert [numbers["plain"][u] for u in along] != [numbers["reversed"][u] for u in along]


def test_multi_stack_axial_gives_one_volume_per_stack(studies: dict[str, Path]) -> None:
    """An axial series of one tilted block per disc forms one volume per block: parallel slices
    from instances of one orientation, every instance used once, each disc centre in its own block."""
    study = studies["plain"]
    entry = _entry(study, "T2_AX")
    volumes = _load(study, "T2_AX")
    assert entry["stacks"] > 1 and len(volumes) == entry["stacks"]
    assert [v.stack for v in volumes] == list(range(len(volumes)))
    headers = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in _files(study, "T2_AX"))}
    used = [s.sop_instance_uid for v in volumes for s in v.sources]
    assert sorted(used) == sorted(headers) and len(set(used)) == len(used)
    axes = []
    for vol in volumes:
        orientations = np.array([headers[s.sop_instance_uid].ImageOrientationPatient for s in vol.sources], dtype=float)
        assert np.allclose(orientations, orientations[0], atol=1e-6)
        assert np.isclose(abs(vol.slice_axis @ _normal(orientations[0])), 1.0, atol=1e-6)
        positions = np.array([headers[s.sop_instance_uid].ImagePositionPatient for s in vol.sources], dtype=float)
        assert np.allclose(positions, vol.slice_positions, atol=1e-3)
        axes.append(vol.slice_axis)
    assert min(1 - abs(a @ b) for i, a in enumerate(axes) for b in axes[i + 1 :]) > 1e-3  # the blocks are tilted differently
    centres = np.array([lv["center"] for lv in _truth(study)["levels"].values()])
    holders = [[i for i, vol in enumerate(volumes) if _inside(vol, c[None], slack=0.5)[0]] for c in centres]
    assert all(len(h) == 1 for h in holders), holders
    assert sorted(h[0] for h in holders) == list(range(len(volumes)))


def test_single_stack_axial_gives_one_volume(studies: dict[str, Path]) -> None:
    """A single-block axial series forms one volume holding every instance; the discs lie in its
    field of view, in order along its slices (the block stops near the L5-S1 disc centre, which
    the phantom prescribes at the posterior canal, so the last disc may fall just past it)."""
    study = studies["single"]
    assert _entry(study, "T2_AX")["stacks"] == 1
    (vol,) = _load(study, "T2_AX")
    assert vol.volume.spatial_shape[0] == len(_files(study, "T2_AX")) > 20
    centres = np.array([lv["center"] for lv in _truth(study)["levels"].values()])
    idx = _index(vol, centres)
    assert np.all((idx[:, 1:] >= 0) & (idx[:, 1:] <= np.asarray(vol.volume.spatial_shape[1:]) - 1)), idx
    assert np.all(np.diff(idx[:, 0]) > 5) and -2 < idx[0, 0] and idx[-1, 0] < vol.volume.spatial_shape[0] + 1, idx
    assert _inside(vol, centres[1:4]).all()


@pytest.mark.parametrize("name", ["enhanced", "enhanced-jpeg2000"])
def test_enhanced_mr_matches_its_classic_twin(studies: dict[str, Path], name: str) -> None:
    """Enhanced MR multi-frame gives the classic twin's pixels and affines; each slice names its
    frame, whose per-frame ImagePositionPatient is where the slice starts."""
    for role in ("T2_SAG", "T2_AX"):
        plain, enhanced = _load(studies["plain"], role), _load(studies[name], role)
        _assert_same(plain, enhanced, sources=False)
        (path,) = _files(studies[name], role)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        frames = [s.frame for v in enhanced for s in v.sources]
        assert sorted(f for f in frames if f is not None) == list(range(1, int(ds.NumberOfFrames) + 1))
        for vol in enhanced:
            for k, source in enumerate(vol.sources):
                assert source.sop_instance_uid == ds.SOPInstanceUID and source.sop_class_uid == ds.SOPClassUID
                assert source.frame is not None
                group = ds.PerFrameFunctionalGroupsSequence[source.frame - 1]
                ipp = np.array(group.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
                assert np.allclose(vol.slice_positions[k], ipp, atol=1e-3)


@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
def test_lossless_compression_gives_identical_pixels(studies: dict[str, Path], compression: str) -> None:
    """Each lossless transfer syntax decodes to the uncompressed twin's pixels exactly."""
    study = studies[compression]
    for role in ("T2_SAG", "T2_AX"):
        meta = pydicom.dcmread(_files(study, role)[0], stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == COMPRESSIONS[compression]
        _assert_same(_load(studies["plain"], role), _load(study, role))


def test_enhanced_rescale_is_applied_per_frame(studies: dict[str, Path]) -> None:
    """Enhanced MR keeps RescaleSlope/Intercept in the Pixel Value Transformation functional
    group (shared, or per frame); the volume holds rescaled values like a classic series."""
    (plain,) = _load(studies["plain"], "T2_SAG")
    (path,) = _files(studies["enhanced"], "T2_SAG")
    ds = pydicom.dcmread(path)
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    transform.RescaleSlope, transform.RescaleIntercept = 2.0, -100.0
    override = Dataset()
    override.RescaleSlope, override.RescaleIntercept, override.RescaleType = 0.5, 0.0, "US"
    ds.PerFrameFunctionalGroupsSequence[0].PixelValueTransformationSequence = DicomSequence([override])
    (vol,), _ = load_series([ds])
    expected = plain.volume.array * 2.0 - 100.0
    first = next(k for k, s in enumerate(vol.sources) if s.frame == 1)
    expected[first] = plain.volume.array[first] * 0.5
    assert np.allclose(vol.volume.array, expected)


def test_mixed_image_sizes_split_into_volumes(studies: dict[str, Path]) -> None:
    """A series whose lowest slices were reconstructed at half the matrix and whose highest were
    cropped (same pixel spacing, same first pixel as the untouched middle ones) forms three
    volumes, one per image size, each with its own pixels and the original's geometry."""
    (original,) = _load(studies["plain"], "T2_SAG")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in _files(studies["plain"], "T2_SAG"))}
    n, rows, cols = original.volume.spatial_shape
    a, b = n // 3, 2 * n // 3
    for k, source in enumerate(original.sources):
        ds = by_uid[source.sop_instance_uid]
        if a <= k < b:
            continue
        if k < a:
            edited = np.ascontiguousarray(ds.pixel_array[::2, ::2])
            ds.PixelSpacing = [2 * float(v) for v in ds.PixelSpacing]
        else:
            edited = np.ascontiguousarray(ds.pixel_array[: rows - 16, : cols - 8])
        ds.Rows, ds.Columns = edited.shape
        ds.PixelData = edited.tobytes()
    volumes, skipped = load_series(list(by_uid.values()))
    assert skipped == []
    assert [v.volume.spatial_shape for v in volumes] == [(a, rows // 2, cols // 2), (b - a, rows, cols), (n - b, rows - 16, cols - 8)]
    low, middle, high = volumes
    assert (low.sources, middle.sources, high.sources) == (original.sources[:a], original.sources[a:b], original.sources[b:])
    assert np.array_equal(low.volume.array, original.volume.array[:a, ::2, ::2])
    assert np.array_equal(middle.volume.array, original.volume.array[a:b])
    assert np.array_equal(high.volume.array, original.volume.array[b:, : rows - 16, : cols - 8])
    idx = np.array([[0, 0, 0], [a - 1, 5, 9], [1, 20, 3]])
    assert np.allclose(low.volume.map_indices_to_reference(idx), original.volume.map_indices_to_reference(idx * [1, 2, 2]), atol=1e-3)
    for vol, start in ((middle, a), (high, b)):
        assert np.allclose(vol.volume.map_indices_to_reference(idx), original.volume.map_indices_to_reference(idx + [start, 0, 0]), atol=1e-3)


def test_series_that_form_no_volume_say_why() -> None:
    """One slice, missing geometry, irregular spacing, duplicate positions, no instances and
    multi-frame pixels without per-frame geometry each raise a VolumeError that says so."""
    with pytest.raises(VolumeError, match="no instances"):
        load_series([])
    with pytest.raises(VolumeError, match="one slice"):
        load_series(_stack(1))
    missing = _stack(4)
    del missing[2].ImagePositionPatient
    with pytest.raises(VolumeError, match="ImagePositionPatient: no patient geometry"):
        load_series(missing)
    no_spacing = _stack(4)
    for ds in no_spacing:
        del ds.PixelSpacing
    with pytest.raises(VolumeError, match="PixelSpacing: no patient geometry"):
        load_series(no_spacing)
    uneven = _stack(8, step=3.0)
    uneven[3].ImagePositionPatient = [float(v) for v in np.array(uneven[3].ImagePositionPatient) + 0.3 * 3.0 * _normal(AXIAL)]
    with pytest.raises(VolumeError, match="spacing varies from 2.10 to 3.90 mm"):
        load_series(uneven)
    duplicate = _stack(5)
    duplicate[4].ImagePositionPatient = duplicate[2].ImagePositionPatient
    with pytest.raises(VolumeError, match="two slices share one position"):
        load_series(duplicate)
    sheared = _stack(5)
    sheared[2].ImagePositionPatient = [float(v) for v in np.array(sheared[2].ImagePositionPatient) + [3.0, 0.0, 0.0]]
    with pytest.raises(VolumeError, match="not stacked along their normal"):
        load_series(sheared)
    legacy = _instance((0.0, 0.0, 0.0))
    legacy.NumberOfFrames = 3
    legacy.PixelData = np.zeros((3, 6, 7), dtype=np.uint16).tobytes()
    with pytest.raises(VolumeError, match="3 frames"):
        load_series([legacy, _instance((0.0, 0.0, 3.0))])


def test_unreadable_instances_are_left_out_with_their_reason(tmp_path: Path) -> None:
    """A truncated file and an instance without geometry at the end of a stack are left out,
    each with its reason; the other slices still form the volume."""
    stack = _stack(6)
    paths = []
    for n, ds in enumerate(stack):
        ds.SOPInstanceUID = f"1.2.3.{n + 1}"
        path = tmp_path / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    paths[5].write_bytes(paths[5].read_bytes()[:-20])  # truncated in the pixel data
    no_geometry = pydicom.dcmread(paths[4])
    del no_geometry.ImageOrientationPatient
    volumes, skipped = load_series([*paths[:4], no_geometry, paths[5]])
    assert [v.volume.spatial_shape[0] for v in volumes] == [4]
    assert any("ImageOrientationPatient" in why for why in skipped)
    assert any("5.dcm unreadable" in why for why in skipped), skipped
    with pytest.raises(VolumeError, match="no instance of the series could be read"):
        load_series([paths[5]])
    (tmp_path / "header-only.dcm").write_bytes(paths[0].read_bytes()[:300])
    with pytest.raises(VolumeError, match="no instance of the series could be read"):
        load_series([tmp_path / "header-only.dcm"])


def test_a_bad_stack_is_skipped_and_the_good_ones_kept(studies: dict[str, Path]) -> None:
    """In a multi-stack axial series where one block has a misplaced slice, the other blocks
    still form their volumes, unchanged, and the skip reason names the bad block."""
    plain = _load(studies["plain"], "T2_AX")
    datasets = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in _files(studies["plain"], "T2_AX"))}
    bad = plain[2]
    moved = datasets[bad.sources[1].sop_instance_uid]
    moved.ImagePositionPatient = [float(v) for v in np.array(moved.ImagePositionPatient) + 0.3 * bad.volume.spacing[0] * bad.slice_axis]
    volumes, skipped = load_series(list(datasets.values()))
    assert len(skipped) == 1 and "spacing varies" in skipped[0] and "stack 3 " in skipped[0], skipped
    assert [v.stack for v in volumes] == [0, 1, 3, 4]
    _assert_same([v for v in plain if v is not bad], volumes)
    isolated = [*_stack(4), *_stack(1, origin=(10.0, -20.0, 90.0))]
    (alone,), why = load_series(isolated)
    assert alone.volume.spatial_shape[0] == 4 and len(why) == 1 and "one slice" in why[0]


def test_group_by_series_skips_files_that_are_not_dicom(studies: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Grouping a study folder's files (truth.json included) plus junk files gives one group per
    series with exactly its files; files that are not DICOM are skipped with a warning (without
their names, which may identify patients), and a
    DICOM file cut short before its SeriesInstanceUID joins no group."""
    study = studies["plain"]
    junk = [tmp_path / "notes.dcm", tmp_path / "empty.dcm", study / "truth.json"]
    junk[0].write_text("not a DICOM file\n")
    junk[1].write_bytes(b"")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(_files(study, "T2_SAG")[0].read_bytes()[:300])
    files = sorted(p for p in study.rglob("*") if p.is_file())
    with caplog.at_level(logging.WARNING, logger="models.volumes"):
        groups = group_by_series([*files, *junk[:2], truncated])
    truth = _truth(study)
    assert set(groups) == {s["series_instance_uid"] for s in truth["series"]}
    for entry in truth["series"]:
        assert sorted(groups[entry["series_instance_uid"]]) == sorted((study / entry["folder"]).glob("*.dcm"))
    skipped = [r for r in caplog.records if "not DICOM" in r.getMessage()]
    assert len(skipped) == len(junk)
    assert not any("notes" in r.getMessage() or "notes" in str(r.__dict__.values()) for r in skipped), "file names may identify patients"
