"""Where each grade is shown: the source image, the point and the disc's box, per level and condition.

The result object (SR regions), the overlays (GSPS) and the key images (SC) all mark the same
places, computed here once from the result's disc frame (centre, posterior and left axes,
depth) and the source images' geometry:

- spinal canal: just behind the disc's posterior margin, on the sagittal T2 (else STIR, T1);
- neural foramina: the posterior margin moved 18 mm to each side, on the sagittal T1 (else T2,
  STIR), where radiologists read foramina;
- subarticular zones: the posterior margin moved 10 mm to each side, on the axial T2 when one
  cuts the disc, else on the sagittal T2.

Each place goes on the image (or frame) whose plane is nearest, if that plane is within half a
slice gap (at least 3 mm) of it; a place no image reaches falls back to the level's canal image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from highdicom.spatial import ReferenceToPixelTransformer
from pydicom import Dataset

CONDITIONS = ("spinal_canal_stenosis", "left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing",
              "left_subarticular_stenosis", "right_subarticular_stenosis")

#: Series roles to mark each condition on, in order of preference.
PREFERRED_ROLES = {
    "spinal_canal_stenosis": ("T2_SAG", "STIR_SAG", "T1_SAG"),
    "left_neural_foraminal_narrowing": ("T1_SAG", "T2_SAG", "STIR_SAG"),
    "right_neural_foraminal_narrowing": ("T1_SAG", "T2_SAG", "STIR_SAG"),
    "left_subarticular_stenosis": ("T2_AX", "T2_SAG", "STIR_SAG", "T1_SAG"),
    "right_subarticular_stenosis": ("T2_AX", "T2_SAG", "STIR_SAG", "T1_SAG"),
}
#: Place of each condition in the disc frame: (mm to the patient's left, mm behind the posterior margin).
OFFSETS_MM = {
    "spinal_canal_stenosis": (0.0, 5.0),
    "left_neural_foraminal_narrowing": (18.0, 0.0),
    "right_neural_foraminal_narrowing": (-18.0, 0.0),
    "left_subarticular_stenosis": (10.0, 3.0),
    "right_subarticular_stenosis": (-10.0, 3.0),
}
MIN_REACH_MM = 3.0
DISC_HALF_HEIGHT_MM = 6.0


@dataclass(frozen=True)
class Plane:
    """One image plane: a single-frame instance, or one frame of a multi-frame instance."""

    dataset: Dataset
    frame_number: int | None
    transformer: ReferenceToPixelTransformer

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    def pixels(self, points: np.ndarray) -> np.ndarray:
        """(column, row, mm off the plane) of patient points; (0, 0) is the top-left pixel's centre."""
        return np.asarray(self.transformer(np.atleast_2d(points)), dtype=float)

    def inside(self, column: float, row: float) -> bool:
        return -0.5 <= column <= int(self.dataset.Columns) - 0.5 and -0.5 <= row <= int(self.dataset.Rows) - 0.5


@dataclass(frozen=True)
class Anchor:
    """Where one level's grade of one condition is shown.

    ``point`` and ``box`` (left, top, right, bottom) are in DICOM graphic pixel coordinates: (0, 0)
    is the top-left corner of the top-left pixel, columns first.
    """

    level: str
    condition: str
    role: str
    series_instance_uid: str
    plane: Plane
    point: tuple[float, float]
    box: tuple[float, float, float, float]
    off_plane_mm: float


def planes(datasets: Sequence[Dataset]) -> list[Plane]:
    """Every image plane of a series' instances (headers are enough)."""
    out = []
    for ds in datasets:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if "PerFrameFunctionalGroupsSequence" in ds:
            for n in range(1, frames + 1):
                out.append(Plane(ds, n, ReferenceToPixelTransformer.for_image(ds, frame_number=n, round_output=False)))
        elif "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "PixelSpacing" in ds:
            out.append(Plane(ds, None, ReferenceToPixelTransformer.for_image(ds, round_output=False)))
    return out


def _nearest(candidates: Sequence[Plane], point: np.ndarray) -> tuple[Plane, np.ndarray] | None:
    """The plane nearest ``point`` that holds it inside its pixels and is close enough to it."""
    if not candidates:
        return None
    offsets = np.array([abs(p.pixels(point)[0, 2]) for p in candidates])
    order = np.argsort(offsets)
    gaps = np.diff(np.sort(offsets)) if len(offsets) > 1 else np.array([])
    reach = max(MIN_REACH_MM, float(np.median(gaps[gaps > 0.1])) if np.any(gaps > 0.1) else MIN_REACH_MM)
    for i in order:
        plane = candidates[int(i)]
        px = plane.pixels(point)[0]
        if abs(px[2]) <= reach and plane.inside(px[0], px[1]):
            return plane, px
        if abs(px[2]) > reach:
            break
    return None


def _box(plane: Plane, corners: np.ndarray) -> tuple[float, float, float, float]:
    """The pixel box (corner origin) around patient-space corners, clipped to the image."""
    px = plane.pixels(corners)[:, :2] + 0.5
    cols, rows = int(plane.dataset.Columns), int(plane.dataset.Rows)
    left, top = np.clip(px.min(axis=0), 0, [cols, rows])
    right, bottom = np.clip(px.max(axis=0), 0, [cols, rows])
    return float(left), float(top), float(right), float(bottom)


def _disc_corners(level: Mapping[str, Any], axial: bool) -> np.ndarray:
    """Patient-space corners of the disc: its AP extent, and its height (sagittal) or width (axial)."""
    centre, posterior = np.asarray(level["center"], float), np.asarray(level["posterior"], float)
    across = np.asarray(level["left"] if axial else level["normal"], float)
    half_ap = float(level["depth_mm"]) / 2
    half_across = half_ap if axial else DISC_HALF_HEIGHT_MM
    return np.array([centre + a * half_ap * posterior + b * half_across * across for a in (-1, 1) for b in (-1, 1)])


def find_anchors(result: Mapping[str, Any], datasets: Mapping[str, Sequence[Dataset]]) -> dict[tuple[str, str], Anchor]:
    """The anchor of every graded (level, condition) of ``result`` (DESIGN.md's result shape, with
    each level's ``posterior``, ``left`` and ``depth_mm``), on the series the models used.

    ``datasets`` maps SeriesInstanceUID to the series' instances (headers suffice).
    """
    roles = {s["series_instance_uid"]: s["role"] for s in result["series"] if s.get("used")}
    by_role: dict[str, list[Plane]] = {}
    for uid, role in roles.items():
        by_role.setdefault(role, []).extend(planes(datasets.get(uid, ())))
    anchors: dict[tuple[str, str], Anchor] = {}
    for level_name, level in result["levels"].items():
        centre, posterior, left = (np.asarray(level[k], float) for k in ("center", "posterior", "left"))
        margin = centre + posterior * float(level["depth_mm"]) / 2
        for condition in CONDITIONS:
            if condition not in level.get("conditions", {}):
                continue
            lateral, behind = OFFSETS_MM[condition]
            point = margin + left * lateral + posterior * behind
            fallback = anchors.get((level_name, "spinal_canal_stenosis"))
            for role in PREFERRED_ROLES[condition]:
                found = _nearest(by_role.get(role, []), point)
                if found is not None:
                    plane, px = found
                    anchors[(level_name, condition)] = Anchor(
                        level_name, condition, role, str(plane.dataset.SeriesInstanceUID), plane, (float(px[0] + 0.5), float(px[1] + 0.5)),
                        _box(plane, _disc_corners(level, role == "T2_AX")), float(px[2]))
                    break
            else:
                if fallback is not None:
                    anchors[(level_name, condition)] = dataclasses.replace(fallback, condition=condition)
    return anchors
