"""DICOM series to volumes: pixels plus a voxel-to-patient affine (highdicom ``Volume``).

A series is read frame by frame, classic single-frame and Enhanced MR multi-frame alike, so
both go through one path: each frame's position, orientation and pixel spacing, its decoded
pixels (pydicom with the pylibjpeg and gdcm plugins), and where it came from (SOP Instance UID
and frame number, for the SR and presentation states that point back at it).

Frames are split into stacks by orientation and image size (RSNA quirk: axial series holding
one tilted block per disc, and series of mixed matrices), then sorted by position along the
slice normal, never by InstanceNumber. Parallel blocks separated by a gap wider than 1.5 slice
spacings become separate stacks too. highdicom's ``get_volume_from_series`` is not used because
it refuses both multi-stack series and multi-frame instances; its ``Volume`` is the container.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset

LOGGER = logging.getLogger(__name__)
__all__ = ["SeriesVolume", "SliceSource", "VolumeError", "group_by_series", "load_series"]

ORIENTATION_TOL = 1e-3  # 1 - cos(angle): frames within ~2.6 degrees share a stack
SPACING_RTOL = 0.05  # slice steps may differ from their median by 5 % (+0.05 mm) within a stack
GAP_FACTOR = 1.5  # a step wider than this many median steps starts a new stack


class VolumeError(ValueError):
    """A series, or a stack of it, that cannot form a volume; the message says why."""


@dataclass(frozen=True)
class SliceSource:
    """The instance (and frame, 1-based, for multi-frame) a volume slice was read from."""

    sop_instance_uid: str
    sop_class_uid: str
    frame: int | None


@dataclass(frozen=True)
class SeriesVolume:
    """One stack of a series: the volume (slices, rows, cols) and the source of each slice."""

    series_instance_uid: str
    stack: int
    volume: hd.Volume
    sources: tuple[SliceSource, ...]

    @property
    def slice_axis(self) -> np.ndarray:
        """Unit vector in patient space along increasing slice index (minus the DICOM normal)."""
        return np.asarray(self.volume.unit_vectors()[0])

    @property
    def slice_positions(self) -> np.ndarray:
        """Patient position (mm) of the first pixel of every slice, (slices, 3)."""
        return np.asarray(self.volume.map_indices_to_reference(np.array([[k, 0, 0] for k in range(self.volume.spatial_shape[0])])))


@dataclass(frozen=True)
class _Frame:
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    shape: tuple[int, int]
    source: SliceSource
    pixels: np.ndarray


def group_by_series(paths: Iterable[Path]) -> dict[str, list[Path]]:
    """DICOM files per SeriesInstanceUID (headers only); unreadable files are skipped with a log line."""
    groups: dict[str, list[Path]] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (pydicom.errors.InvalidDicomError, OSError, ValueError) as exc:
            LOGGER.warning("skipping a file that is not DICOM", extra={"error": type(exc).__name__})
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid:
            groups.setdefault(uid, []).append(path)
    return groups


def load_series(items: Sequence[Path | Dataset]) -> tuple[list[SeriesVolume], list[str]]:
    """Volumes of one series (one per stack, ordered along the first stack's slice axis) and the
    reasons instances and stacks were left out; raises VolumeError when no stack forms a volume.

    An instance that cannot be read or decoded (a truncated file, corrupt pixel data) is left out
    with its reason, so the rest of the series still forms what volumes it can.
    """
    if not items:
        raise VolumeError("the series has no instances")
    frames: list[_Frame] = []
    skipped: list[str] = []
    first: Dataset | None = None
    for item in items:
        name = item.name if isinstance(item, Path) else str(item.get("SOPInstanceUID", "?"))
        try:
            ds = pydicom.dcmread(item) if isinstance(item, Path) else item
            frames.extend(_frames(ds))
        except VolumeError as exc:
            skipped.append(str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - readers and pixel decoders raise many types
            skipped.append(f"instance {name} unreadable ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        first = first or ds
    if first is None:
        raise VolumeError(f"no instance of the series could be read: {'; '.join(skipped[:3])}")
    series_uid = str(first.get("SeriesInstanceUID", ""))
    # a canonical order first, so that grouping and stack order do not depend on the file order
    frames.sort(key=lambda f: (f.source.sop_instance_uid, f.source.frame or 0))
    volumes: list[SeriesVolume] = []
    for index, group in enumerate(_stacks(frames)):
        try:
            volumes.append(_volume(series_uid, index, group, first))
        except VolumeError as exc:
            skipped.append(str(exc))
    if not volumes:
        raise VolumeError(f"series {series_uid} forms no volume: {'; '.join(skipped)}")
    return volumes, skipped


def _frames(ds: Dataset) -> list[_Frame]:
    """Geometry, pixels (rescaled) and source of every frame of one instance."""
    sop = SliceSource(str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", "")), None)
    if "PixelData" not in ds:
        raise VolumeError(f"instance {sop.sop_instance_uid} has no pixel data")
    shape = (int(ds.Rows), int(ds.Columns))
    pixels = ds.pixel_array.astype(np.float32)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if pixels.shape != shape:
            frames, samples = int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("SamplesPerPixel", 1) or 1)
            raise VolumeError(f"instance {sop.sop_instance_uid} is not one greyscale slice ({frames} frames, {samples} samples per pixel) "
                              "and has no per-frame geometry")
        position, orientation, spacing = _geometry(ds, ds, sop.sop_instance_uid)
        return [_Frame(position, orientation, spacing, shape, sop, _rescale(pixels, ds, ds, ds))]
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
    groups = ds.PerFrameFunctionalGroupsSequence
    if pixels.size != len(groups) * shape[0] * shape[1]:
        raise VolumeError(f"instance {sop.sop_instance_uid} has {len(groups)} per-frame groups but pixels of shape {pixels.shape}")
    pixels = pixels.reshape(-1, *shape)
    out = []
    for n, item in enumerate(groups):
        where = f"{sop.sop_instance_uid} frame {n + 1}"
        position, orientation, spacing = _geometry(item, shared, where)
        src = SliceSource(sop.sop_instance_uid, sop.sop_class_uid, n + 1)
        out.append(_Frame(position, orientation, spacing, shape, src, _rescale(pixels[n], item, shared, ds)))
    return out


def _find(item: Dataset, shared: Dataset, seq: str, keyword: str) -> object:
    """``keyword`` of a classic instance, or of one frame: its per-frame functional group item
    ``seq`` first, then the shared one (``item`` and ``shared`` are the dataset for classic)."""
    for holder in (item, shared):
        if keyword in holder:
            return holder.get(keyword)
        if seq in holder and len(holder[seq].value) and keyword in holder[seq].value[0]:
            return holder[seq].value[0].get(keyword)
    return None


def _rescale(pixels: np.ndarray, item: Dataset, shared: Dataset, top: Dataset) -> np.ndarray:
    """Pixels times RescaleSlope plus RescaleIntercept: a classic instance's, or for a frame of
    a multi-frame its Pixel Value Transformation group (per-frame, then shared, then top level)."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        value = _find(item, shared, "PixelValueTransformationSequence", keyword)
        value = top.get(keyword) if value is None else value
        values.append(float(value or default))  # type: ignore[arg-type]
    slope, intercept = values
    if (slope, intercept) == (1.0, 0.0):
        return pixels
    return pixels * np.float32(slope) + np.float32(intercept)


def _geometry(item: Dataset, shared: Dataset, where: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Position, orientation and pixel spacing of a classic instance or of one frame's groups."""
    position = _find(item, shared, "PlanePositionSequence", "ImagePositionPatient")
    orientation = _find(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = _find(item, shared, "PixelMeasuresSequence", "PixelSpacing")
    missing = [k for k, v in (("ImagePositionPatient", position), ("ImageOrientationPatient", orientation), ("PixelSpacing", spacing)) if not v]
    if missing:
        raise VolumeError(f"{where} lacks {', '.join(missing)}: no patient geometry")
    o = np.asarray(orientation, dtype=float)
    if o.shape != (6,) or abs(np.linalg.norm(o[:3]) - 1) > 1e-2 or abs(np.linalg.norm(o[3:]) - 1) > 1e-2 or abs(o[:3] @ o[3:]) > 1e-2:
        raise VolumeError(f"{where} has an invalid ImageOrientationPatient {list(o)}")
    s = [float(v) for v in spacing]  # type: ignore[attr-defined]
    return np.asarray(position, dtype=float), o, (s[0], s[1])


def _stacks(frames: list[_Frame]) -> list[list[_Frame]]:
    """Frames grouped by orientation and image size, sorted along the normal, split at gaps."""
    groups: list[list[_Frame]] = []
    for f in frames:
        for g in groups:
            h = g[0]
            if h.shape == f.shape and np.allclose(h.spacing, f.spacing, rtol=1e-3) and 1 - h.orientation[:3] @ f.orientation[:3] < ORIENTATION_TOL and 1 - h.orientation[3:] @ f.orientation[3:] < ORIENTATION_TOL:
                g.append(f)
                break
        else:
            groups.append([f])
    stacks: list[list[_Frame]] = []
    for g in groups:
        axis = _slice_axis(g[0])
        g.sort(key=lambda f: float(f.position @ axis))
        d = np.array([f.position @ axis for f in g])
        steps = np.diff(d)
        start = 0
        if len(steps):
            median = float(np.median(steps))
            for i, step in enumerate(steps):
                if median > 0 and step > GAP_FACTOR * median:
                    stacks.append(g[start : i + 1])
                    start = i + 1
        stacks.append(g[start:])
    first = _slice_axis(frames[0])
    stacks.sort(key=lambda s: float(np.mean([f.position @ first for f in s])))
    return stacks


def _slice_axis(frame: _Frame) -> np.ndarray:
    """Direction of increasing slice index: column x row, so that (slice, row, column) is
    right-handed as highdicom's Volume makes it (the opposite of the DICOM normal)."""
    return np.cross(frame.orientation[3:], frame.orientation[:3])


def _volume(series_uid: str, index: int, frames: list[_Frame], first: Dataset) -> SeriesVolume:
    """A highdicom Volume of one sorted stack, after checking it is regular."""
    n = len(frames)
    where = f"series {series_uid} stack {index + 1} ({n} slice{'s' if n != 1 else ''}, {frames[0].shape[1]}x{frames[0].shape[0]})"
    if n < 2:
        raise VolumeError(f"{where}: one slice cannot form a volume")
    axis = _slice_axis(frames[0])
    d = np.array([f.position @ axis for f in frames])
    steps = np.diff(d)
    median = float(np.median(steps))
    if median < 1e-3 or steps.min() < 1e-3:
        raise VolumeError(f"{where}: two slices share one position")
    if np.abs(steps - median).max() > SPACING_RTOL * median + 0.05:
        raise VolumeError(f"{where}: slice spacing varies from {steps.min():.2f} to {steps.max():.2f} mm")
    offsets = np.array([f.position - frames[0].position - (di - d[0]) * axis for f, di in zip(frames, d)])
    if np.abs(offsets).max() > 0.5 * max(frames[0].spacing) + 0.05:
        raise VolumeError(f"{where}: slices are not stacked along their normal (sheared by {np.abs(offsets).max():.2f} mm)")
    volume = hd.Volume.from_attributes(
        array=np.stack([f.pixels for f in frames]),
        image_position=frames[0].position.tolist(),
        image_orientation=frames[0].orientation.tolist(),
        pixel_spacing=list(frames[0].spacing),
        spacing_between_slices=median,
        coordinate_system="PATIENT",
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")) or None,
    )
    return SeriesVolume(series_uid, index, volume, tuple(f.source for f in frames))
