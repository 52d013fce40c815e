"""Disc volumes for the grader: 9x112x224 (slice x height x width) per level and series.

Sagittal (after SpineNet, reference spine-ml.md 2.2): nine slices centred on the native slice
nearest the disc centre, in-plane aligned with the disc plane (height along the disc normal, head
up; width antero-posterior, posterior to the right), 224 pixels spanning twice the disc's depth
(SpineNet's 50 % margin each side) and 112 pixels the same spacing, so the box is 2:1.
T2 and STIR crops take nine contiguous native slices (no resampling across slices), SpineNet's
crop: the canal and the recesses lie within them. T1 crops, the sequence the foramina are graded
on (RSNA 2024), are spread to reach both foramina: nine slices from -FORAMEN_REACH_MM to
+FORAMEN_REACH_MM, interpolated between native slices, never closer than the native spacing and
never beyond the series' outer slices. Nine contiguous 3.3-4.4 mm slices reach only 13-18 mm
each side, while the foramina lie 14-22 mm from the midline (L5-S1 furthest).

Axial (paper section 4.1): the sagittal region of interest of the level, taken from the
primary sagittal series (T2, else STIR, else T1), is a box in patient space. An axial slice is
used when its plane cuts the posterior half of that box. Of all axial series and stacks, the
stack with the most such slices is used (one stack keeps one affine; per-disc stacks rarely
share a level). The reference point lies on the disc's posterior margin, moved left-right to
halfway between the first and last sagittal slices that cut the axial slice, i.e. the
approximate mid-sagittal plane. The crop is 2x the lateral depth of the sagittal slices wide
(clamped to 80-160 mm), half that high, and its nine slices run evenly from the first to the
last intersecting axial slice (rows posterior, columns to the patient's left, the radiological
view). A level that no axial slice cuts is missing, never guessed.

Intensities: each crop is divided by its own 99th percentile and clipped to [0, 1]. SpineNet
divides by the median of the two vertebral bodies, which needs their outlines; the percentile
works on T1, T2 and STIR alike (marrow is dark on STIR) without a segmentation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from models.detect import INFERIOR, LevelDetection
from models.sampler import Box, sample
from models.volumes import SeriesVolume, SliceSource

__all__ = ["CROPS_VERSION", "CROP_SHAPE", "FORAMEN_REACH_MM", "SLOT_OF_ROLE", "Crop", "axial_box", "disc_slots", "extract", "sagittal_box"]

CROP_SHAPE = (9, 112, 224)
# Bumped whenever the crops change: disc caches and grader weights record it and refuse another.
CROPS_VERSION = 2
DEPTH_RANGE_MM = (25.0, 70.0)
FORAMEN_REACH_MM = 24.0
AXIAL_WIDTH_MM = (80.0, 160.0)
SAGITTAL_ROLES = ("T2_SAG", "STIR_SAG", "T1_SAG")
POSTERIOR = np.array([0.0, 1.0, 0.0])
# The grader's input slots: 0 T1 sagittal, 1 T2/STIR sagittal, 2 T2 axial.
SLOT_OF_ROLE = {"T1_SAG": 0, "T2_SAG": 1, "STIR_SAG": 1, "T2_AX": 2}


@dataclass(frozen=True)
class Crop:
    """One extracted disc volume, its box (affine back to patient space) and its source stack."""

    level: str
    role: str
    view: str
    series_instance_uid: str
    stack: int
    box: Box
    pixels: np.ndarray
    coverage: float

    def source_slices(self, volume: SeriesVolume) -> list[SliceSource]:
        """The source instance (and frame) nearest to each crop slice's centre."""
        centres = np.array([[k, (CROP_SHAPE[1] - 1) / 2, (CROP_SHAPE[2] - 1) / 2] for k in range(self.box.shape[0])])
        idx = np.clip(np.rint(self.box.to_source(volume.volume, centres)[:, 0]), 0, len(volume.sources) - 1).astype(int)
        return [volume.sources[i] for i in idx]


def _depth(disc: LevelDetection) -> float:
    """The disc's AP depth, clamped to plausible values."""
    return float(np.clip(disc.depth_mm, *DEPTH_RANGE_MM))


def sagittal_box(volume: SeriesVolume, disc: LevelDetection, reach_mm: float = 0.0) -> Box:
    """The disc's sagittal box in one sagittal volume, disc plane aligned, centred on a native slice.

    Its nine slices are contiguous native ones unless ``reach_mm`` asks them to reach further to
    each side; they then step evenly, but not past the series' outer slices."""
    native = float(volume.volume.spacing[0])
    n = volume.volume.spatial_shape[0]
    axis = volume.slice_axis if volume.slice_axis @ disc.left >= 0 else -volume.slice_axis
    first = volume.slice_positions[0]
    k = int(np.clip(np.rint((disc.centre - first) @ volume.slice_axis / native), 0, n - 1))
    centre = disc.centre + ((first + k * native * volume.slice_axis - disc.centre) @ axis) * axis
    half = (CROP_SHAPE[0] - 1) / 2
    step = max(native, min(reach_mm, min(k, n - 1 - k) * native) / half)
    spacing = 2 * _depth(disc) / CROP_SHAPE[2]
    return Box.around(centre, axis, -disc.normal, CROP_SHAPE, (step, spacing, spacing))


def _posterior_corners(roi: Box) -> np.ndarray:
    """Corners (8, 3) of the posterior half of a sagittal box (width from the centre backwards)."""
    n = np.asarray(roi.shape) - 1
    mid = n[2] / 2
    idx = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (mid, n[2])], dtype=float)
    return roi.to_patient(idx)


def _cutting_slices(axial: SeriesVolume, corners: np.ndarray) -> np.ndarray:
    """Indices of the axial slices whose planes pass between the given corners."""
    offsets = (corners - axial.slice_positions[0]) @ axial.slice_axis
    k = np.arange(axial.volume.spatial_shape[0]) * axial.volume.spacing[0]
    return np.flatnonzero((offsets.min() <= k) & (k <= offsets.max()))


def _sagittal_span(sagittal: SeriesVolume, axial: SeriesVolume, k: int) -> tuple[float, float, float]:
    """Offsets along the sagittal slice axis of the first and last sagittal slices that cut axial
    slice k inside its field of view, and the lateral depth of those slices (count x spacing)."""
    shape = axial.volume.spatial_shape
    corners = np.asarray(axial.volume.map_indices_to_reference(np.array([[k, r, c] for r in (0, shape[1] - 1) for c in (0, shape[2] - 1)])))
    along = corners @ sagittal.slice_axis
    offsets = sagittal.slice_positions @ sagittal.slice_axis
    inside = offsets[(offsets >= along.min()) & (offsets <= along.max())]
    if not len(inside):
        inside = offsets
    return float(inside.min()), float(inside.max()), len(inside) * float(sagittal.volume.spacing[0])


def axial_box(axials: Sequence[SeriesVolume], roi: Box, sagittal: SeriesVolume, disc: LevelDetection) -> tuple[SeriesVolume, Box] | None:
    """The axial stack and box of one level, projected from its sagittal ROI; None without coverage."""
    corners = _posterior_corners(roi)
    best: tuple[SeriesVolume, np.ndarray] | None = None
    for axial in axials:
        cut = _cutting_slices(axial, corners)
        if len(cut) and (best is None or len(cut) > len(best[1])):
            best = (axial, cut)
    if best is None:
        return None
    axial, cut = best
    first, last, lateral = _sagittal_span(sagittal, axial, int(cut[len(cut) // 2]))
    axis = axial.slice_axis if axial.slice_axis @ INFERIOR >= 0 else -axial.slice_axis
    ends = axial.slice_positions[[cut[0], cut[-1]]] @ axis
    # on the disc's posterior face (moving along its left and normal axes only): halfway between
    # the outer sagittal slices, and on the middle of the crossing axial slices
    margin = disc.centre + disc.posterior * _depth(disc) / 2
    a = sagittal.slice_axis
    system = np.array([[disc.left @ a, disc.normal @ a], [disc.left @ axis, disc.normal @ axis]])
    wanted = np.array([(first + last) / 2 - margin @ a, ends.mean() - margin @ axis])
    along_left, along_normal = np.linalg.solve(system, wanted)
    point = margin + along_left * disc.left + along_normal * disc.normal
    width = float(np.clip(2 * lateral, *AXIAL_WIDTH_MM))
    spacing = width / CROP_SHAPE[2]
    between = max(float(abs(ends[1] - ends[0])) / (CROP_SHAPE[0] - 1), 1e-3)
    return axial, Box.around(point, axis, POSTERIOR, CROP_SHAPE, (between, spacing, spacing))


def _normalised(pixels: np.ndarray) -> np.ndarray:
    """Each crop divided by its 99th percentile, clipped to [0, 1]."""
    top = np.percentile(pixels.reshape(len(pixels), -1), 99, axis=1)
    return np.clip(pixels / np.maximum(top, 1e-6)[:, None, None, None], 0, 1).astype(np.float32)


def extract(volumes: Mapping[str, Sequence[SeriesVolume]], discs: Mapping[str, LevelDetection], device: str = "cpu") -> tuple[list[Crop], list[str]]:
    """Crops of every detected level from every sagittal and axial volume, and what is missing.

    ``volumes`` maps roles (T1_SAG, T2_SAG, STIR_SAG, T2_AX) to their volumes; one sample call
    per volume extracts all of its levels at once."""
    crops: list[Crop] = []
    warnings: list[str] = []
    levels = list(discs)
    rois: dict[str, Box] = {}
    primary = next((volumes[r][0] for r in SAGITTAL_ROLES if volumes.get(r)), None)
    for role in SAGITTAL_ROLES:
        for vol in volumes.get(role, ()):
            if not levels:
                continue
            reach = FORAMEN_REACH_MM if role == "T1_SAG" else 0.0
            boxes = [sagittal_box(vol, discs[lv], reach) for lv in levels]
            pixels, coverage = sample(vol.volume, boxes, device)
            normalised = _normalised(pixels.cpu().numpy())
            for i, lv in enumerate(levels):
                crops.append(Crop(lv, role, "sagittal", vol.series_instance_uid, vol.stack, boxes[i], normalised[i], float(coverage[i])))
                if vol is primary:
                    rois[lv] = boxes[i]
    axials = list(volumes.get("T2_AX", ()))
    if not axials:
        return crops, warnings
    if primary is None:
        return crops, [*warnings, "no sagittal series: axial volumes cannot be placed"]
    planned: dict[int, list[tuple[str, Box]]] = {}
    for lv in levels:
        found = axial_box(axials, rois[lv], primary, discs[lv])
        if found is None:
            warnings.append(f"{lv}: no axial slice crosses the disc's region: axial view missing")
            continue
        planned.setdefault(id(found[0]), []).append((lv, found[1]))
    for vol in axials:
        todo = planned.get(id(vol), [])
        if not todo:
            continue
        pixels, coverage = sample(vol.volume, [b for _, b in todo], device)
        normalised = _normalised(pixels.cpu().numpy())
        for i, (lv, box) in enumerate(todo):
            crops.append(Crop(lv, "T2_AX", "axial", vol.series_instance_uid, vol.stack, box, normalised[i], float(coverage[i])))
    return crops, warnings


def disc_slots(crops: Sequence[Crop], levels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Volumes (levels, 3, 9, H, W) and presence (levels, 3) in the grader's slots (T1 sagittal,
    T2/STIR sagittal, T2 axial); the first crop of a slot wins (T2 before STIR, then crop order)."""
    volumes = np.zeros((len(levels), 3, *CROP_SHAPE), np.float32)
    present = np.zeros((len(levels), 3), bool)
    order = sorted(crops, key=lambda c: ("T1_SAG", "T2_SAG", "STIR_SAG", "T2_AX").index(c.role))
    for c in order:
        if c.level not in levels:
            continue
        i, k = levels.index(c.level), SLOT_OF_ROLE[c.role]
        if not present[i, k]:
            volumes[i, k], present[i, k] = c.pixels, True
    return volumes, present
