"""Debug pictures of one analysed study, after the paper's Fig. 3 (section 4.1): PNGs that show
where detection put each disc and what extraction cut out of every series.

``sagittal_<ROLE>.png``, one per sagittal role present (its first volume): the source slice
nearest the mean of the disc centres (the middle slice when no disc was found). Per level, the sagittal region of interest (the middle
slice of that series' crop box) is a red quadrilateral with the level's name beside it, the
detected disc centre a yellow dot, and each axial source slice that the level's axial crop was
cut from a green line: where that axial slice meets this sagittal slice, inside both images.

``axial_<LEVEL>.png``, one per level with an axial crop: the axial source slice nearest the
crop's middle slice. Red lines are the slices of the primary sagittal series (T2, else STIR,
else T1) crossing it, yellow lines where the anterior and posterior faces of that series'
region of interest cut it, the cyan quadrilateral is the outline of the crop's middle slice,
and the blue dot the crop's reference point (the axial box centre projected onto the slice).

``crops_<LEVEL>.png``: every volume extracted for the level, one row per crop (its nine slices,
112x224 each, as the grader sees them), labelled with role, view, stack and coverage.

``montage.png``: the middle slice of every level's crops, levels down and (role, view) across,
as a quick overview; where a level has several crops of one role and view (several stacks),
the first is shown.

Source slices are windowed from their 1st to 99th percentile and enlarged so that the long side
is at least ``MIN_SIZE`` pixels; marks are placed by patient geometry, never by pixel search.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models.analysis import StudyAnalysis
from models.extract import CROP_SHAPE, SAGITTAL_ROLES, Crop
from models.sampler import Box
from models.volumes import SeriesVolume

__all__ = ["MIN_SIZE", "write_debug_pictures"]

MIN_SIZE = 640  # long side of the slice pictures, in pixels
GAP = 2  # pixels between montage tiles
LABEL_WIDTH = 170  # left margin of the montages, for the row labels
HEADER = 22  # top margin of the montages, for the column labels
BACKGROUND = (24, 24, 48)
RED, GREEN, YELLOW, CYAN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (255, 255, 0), (0, 255, 255), (0, 0, 255), (255, 255, 255)
FONT = ImageFont.load_default(size=14)


@dataclass(frozen=True)
class _Patch:
    """A planar rectangle in patient space: its plane (a point and the unit normal), the map from
    patient position to its index space, and the index bounds (infinite along its normal)."""

    point: np.ndarray
    normal: np.ndarray
    inverse: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def _slice_patch(volume: SeriesVolume, k: int) -> _Patch:
    """Source slice ``k`` of a volume, out to the outer edges of its pixels."""
    rows, cols = volume.volume.spatial_shape[1:]
    point = np.asarray(volume.volume.map_indices_to_reference(np.array([[k, 0, 0]])))[0]
    return _Patch(point, volume.slice_axis, np.linalg.inv(volume.volume.affine),
                  np.array([-np.inf, -0.5, -0.5]), np.array([np.inf, rows - 0.5, cols - 0.5]))


def _face_patch(box: Box, column: float) -> _Patch:
    """The face of a box at one column index (0: first, shape - 1: last), between its corner voxel centres."""
    depth, height = box.shape[0] - 1, box.shape[1] - 1
    point = box.to_patient(np.array([[0.0, 0.0, column]]))[0]
    return _Patch(point, box.axes[2], np.linalg.inv(box.affine), np.array([0.0, 0.0, -np.inf]), np.array([depth, height, np.inf]))


def _segment(a: _Patch, b: _Patch) -> np.ndarray | None:
    """Patient end points (2, 3) of the segment where two patches cross, or None where they do
    not (parallel planes, or the planes' line misses either rectangle)."""
    direction = np.cross(a.normal, b.normal)
    length = float(np.linalg.norm(direction))
    if length < 1e-6:
        return None
    direction = direction / length
    start = np.linalg.solve(np.stack([a.normal, b.normal, direction]), np.array([a.normal @ a.point, b.normal @ b.point, 0.0]))
    lo, hi = -np.inf, np.inf
    for patch in (a, b):
        # indices along the line are origin + t * step (t in mm); clip t to the bounds (Liang-Barsky)
        origin = patch.inverse[:3, :3] @ start + patch.inverse[:3, 3]
        step = patch.inverse[:3, :3] @ direction
        bounded = np.isfinite(patch.lower)
        flat = np.abs(step) < 1e-9
        if np.any(bounded & flat & ((origin < patch.lower) | (origin > patch.upper))):
            return None
        use = bounded & ~flat
        safe = np.where(use, step, 1.0)
        t1, t2 = (patch.lower - origin) / safe, (patch.upper - origin) / safe
        lo = max(lo, float(np.minimum(t1, t2)[use].max(initial=-np.inf)))
        hi = min(hi, float(np.maximum(t1, t2)[use].min(initial=np.inf)))
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        return None
    return start + np.outer([lo, hi], direction)


def _window(pixels: np.ndarray) -> np.ndarray:
    """A slice to 8 bits, from its 1st (black) to its 99th (white) percentile."""
    lo, hi = np.percentile(pixels, [1, 99])
    return (np.clip((pixels - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255).astype(np.uint8)


class _Canvas:
    """One source slice, windowed and enlarged, to draw on in that slice's (row, column) indices."""

    def __init__(self, volume: SeriesVolume, k: int) -> None:
        self.volume = volume
        self.patch = _slice_patch(volume, k)
        rows, cols = volume.volume.spatial_shape[1:]
        row_mm, col_mm = (float(s) for s in volume.volume.spacing[1:])
        mm = min(max(rows * row_mm, cols * col_mm) / MIN_SIZE, row_mm, col_mm)  # output pixel size, never coarser than the source
        size = (max(round(cols * col_mm / mm), 1), max(round(rows * row_mm / mm), 1))
        self.scale = np.array([size[1] / rows, size[0] / cols])
        self.image = Image.fromarray(_window(volume.volume.array[k])).resize(size, Image.Resampling.BILINEAR).convert("RGB")
        self.draw = ImageDraw.Draw(self.image)

    def project(self, points: np.ndarray) -> np.ndarray:
        """(row, column) indices in this slice of patient points (N, 3), projected along its normal."""
        return np.asarray(self.volume.volume.map_reference_to_indices(np.atleast_2d(points), round_output=False, check_bounds=False))[:, 1:]

    def xy(self, rc: np.ndarray) -> list[tuple[float, float]]:
        """Picture coordinates (x, y) of slice indices (N, 2) (row, column), pixel centre to centre."""
        yx = (np.atleast_2d(rc) + 0.5) * self.scale - 0.5
        return [(float(x), float(y)) for y, x in yx]

    def segment(self, other: _Patch, colour: tuple[int, int, int]) -> None:
        """Draw where a patch crosses this slice, if it does."""
        ends = _segment(other, self.patch)
        if ends is not None:
            self.draw.line(self.xy(self.project(ends)), fill=colour, width=2)

    def polygon(self, rc: np.ndarray, colour: tuple[int, int, int]) -> list[tuple[float, float]]:
        """Draw a closed outline through slice indices (N, 2); returns its picture coordinates."""
        xy = self.xy(rc)
        self.draw.polygon(xy, outline=colour, width=2)
        return xy

    def dot(self, rc: np.ndarray, colour: tuple[int, int, int], radius: float = 4.0) -> None:
        """Draw a filled dot at slice indices (row, column)."""
        (x, y), = self.xy(rc)
        self.draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)

    def text(self, xy: tuple[float, float], text: str) -> None:
        """Write white, black-outlined text with its top-left corner at picture coordinates."""
        self.draw.text(xy, text, fill=WHITE, font=FONT, stroke_width=1, stroke_fill=(0, 0, 0))


def _axial_crops(volumes: Mapping[str, Sequence[SeriesVolume]], study: StudyAnalysis) -> list[tuple[Crop, SeriesVolume]]:
    """Each axial crop with the volume it was sampled from (same series and stack); crops whose
    volume is not among ``volumes`` are left out."""
    by_key = {(v.series_instance_uid, v.stack): v for vols in volumes.values() for v in vols}
    return [(c, by_key[(c.series_instance_uid, c.stack)]) for c in study.crops if c.view == "axial" and (c.series_instance_uid, c.stack) in by_key]


def _middle_outline(box: Box) -> np.ndarray:
    """Box indices (4, 3) of the corner voxel centres of the box's middle slice, in drawing order."""
    m, h, w = (box.shape[0] - 1) / 2, box.shape[1] - 1, box.shape[2] - 1
    return np.array([[m, 0, 0], [m, 0, w], [m, h, w], [m, h, 0]], dtype=float)


def _used_slices(crop: Crop, volume: SeriesVolume) -> range:
    """Source slices of ``volume`` between the first and last slice planes of a crop: for an
    axial crop, the axial slices that cut the posterior half of the level's sagittal ROI."""
    centre = (np.asarray(crop.box.shape[1:]) - 1) / 2
    ends = crop.box.to_source(volume.volume, np.array([[0, *centre], [crop.box.shape[0] - 1, *centre]]))[:, 0]
    top = volume.volume.spatial_shape[0] - 1
    return range(max(int(np.ceil(ends.min() - 0.01)), 0), min(int(np.floor(ends.max() + 0.01)), top) + 1)


def _sagittal_picture(volume: SeriesVolume, role: str, volumes: Mapping[str, Sequence[SeriesVolume]], study: StudyAnalysis) -> Image.Image:
    """The mid-sagittal slice with each level's ROI, centre and used axial slices (module docstring)."""
    n = volume.volume.spatial_shape[0]
    k = n // 2
    if study.discs:
        mean = np.mean([d.centre for d in study.discs.values()], axis=0)
        k = int(np.clip(np.rint(volume.volume.map_reference_to_indices(mean[None], round_output=False, check_bounds=False)[0, 0]), 0, n - 1))
    canvas = _Canvas(volume, k)
    for crop, axial in _axial_crops(volumes, study):
        for j in _used_slices(crop, axial):
            canvas.segment(_slice_patch(axial, j), GREEN)
    for crop in study.crops:
        if crop.view != "sagittal" or (crop.series_instance_uid, crop.stack) != (volume.series_instance_uid, volume.stack):
            continue
        outline = canvas.polygon(crop.box.to_source(volume.volume, _middle_outline(crop.box))[:, 1:], RED)
        right = max(x for x, _ in outline)
        width = canvas.draw.textlength(crop.level, font=FONT)
        x = right + 6 if right + 6 + width < canvas.image.width else min(x for x, _ in outline) - 6 - width
        canvas.text((x, float(np.mean([y for _, y in outline])) - 8), crop.level)
    for disc in study.discs.values():
        canvas.dot(canvas.project(disc.centre), YELLOW)
    canvas.text((4, 4), f"{role} slice {k + 1}/{n}\nred: ROI  green: axial slices used  yellow: disc centre")
    return canvas.image


def _axial_picture(crop: Crop, volume: SeriesVolume, primary: SeriesVolume | None, roi: Box | None) -> Image.Image:
    """The axial slice at a level's crop with sagittal slices, ROI faces, crop and reference point."""
    n = volume.volume.spatial_shape[0]
    centre = (np.asarray(crop.box.shape) - 1) / 2
    k = int(np.clip(np.rint(crop.box.to_source(volume.volume, centre[None])[0, 0]), 0, n - 1))
    canvas = _Canvas(volume, k)
    if primary is not None:
        for j in range(primary.volume.spatial_shape[0]):
            canvas.segment(_slice_patch(primary, j), RED)
    if roi is not None:
        for column in (0, roi.shape[2] - 1):
            canvas.segment(_face_patch(roi, column), YELLOW)
    canvas.polygon(crop.box.to_source(volume.volume, _middle_outline(crop.box))[:, 1:], CYAN)
    canvas.dot(crop.box.to_source(volume.volume, centre[None])[0, 1:], BLUE)
    canvas.text((4, 4), f"{crop.level} {crop.role} stack {crop.stack + 1} slice {k + 1}/{n}\n"
                        "red: sagittal slices  yellow: ROI front/back  cyan: crop  blue: reference")
    return canvas.image


def _grid(cells: Sequence[Sequence[np.ndarray | None]], rows: Sequence[str], columns: Sequence[str]) -> Image.Image:
    """Crop-sized images in [0, 1] on a grid, with row labels on the left and column labels on
    top; a None cell stays empty."""
    h, w = CROP_SHAPE[1:]
    out = np.full((HEADER + len(cells) * (h + GAP), LABEL_WIDTH + len(columns) * (w + GAP), 3), BACKGROUND, dtype=np.uint8)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            if cell is not None:
                y, x = HEADER + i * (h + GAP), LABEL_WIDTH + j * (w + GAP)
                out[y : y + h, x : x + w] = (np.clip(cell, 0, 1) * 255).astype(np.uint8)[..., None]
    image = Image.fromarray(out)
    draw = ImageDraw.Draw(image)
    for j, label in enumerate(columns):
        draw.text((LABEL_WIDTH + j * (w + GAP) + 4, 3), label, fill=WHITE, font=FONT)
    for i, label in enumerate(rows):
        draw.text((6, HEADER + i * (h + GAP) + 6), label, fill=WHITE, font=FONT)
    return image


def _crops_picture(level: str, crops: Sequence[Crop]) -> Image.Image:
    """Every crop of one level, one row each, its slices side by side."""
    labels = [f"{c.role} {c.view}\nstack {c.stack + 1}\ncoverage {c.coverage:.2f}" for c in crops]
    columns = [f"{level} slice {s + 1}" if s == 0 else str(s + 1) for s in range(CROP_SHAPE[0])]
    return _grid([list(c.pixels) for c in crops], labels, columns)


def _montage(study: StudyAnalysis) -> Image.Image:
    """The middle slice of each level's crops, levels down, (role, view) across."""
    columns = list(dict.fromkeys((c.role, c.view) for c in study.crops))
    levels = list(dict.fromkeys([*study.discs, *(c.level for c in study.crops)]))
    middle: dict[tuple[str, str, str], np.ndarray] = {}
    for c in study.crops:
        middle.setdefault((c.level, c.role, c.view), c.pixels[len(c.pixels) // 2])
    cells = [[middle.get((lv, role, view)) for role, view in columns] for lv in levels]
    return _grid(cells, levels, [f"{role} {view}" for role, view in columns])


def _save(image: Image.Image, path: Path, written: list[Path]) -> None:
    """Write a PNG (fast compression: these are debug pictures) and remember its path."""
    image.save(path, format="PNG", compress_level=1)
    written.append(path)


def write_debug_pictures(out: Path, volumes: Mapping[str, Sequence[SeriesVolume]], study: StudyAnalysis) -> list[Path]:
    """Write the study's debug PNGs into ``out`` (created if needed) and return their paths:
    sagittal_<ROLE>, axial_<LEVEL>, crops_<LEVEL> and montage (see the module docstring).

    ``volumes`` are the volumes the analysis ran on, by role; pictures whose series or crops
    are missing (no axial series, a level without an axial crop, no crops at all) are left out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sagittal = [(role, volumes[role][0]) for role in SAGITTAL_ROLES if volumes.get(role)]
    for role, volume in sagittal:
        _save(_sagittal_picture(volume, role, volumes, study), out / f"sagittal_{role}.png", written)
    primary = sagittal[0][1] if sagittal else None
    rois = {c.level: c.box for c in study.crops
            if primary is not None and c.view == "sagittal" and c.series_instance_uid == primary.series_instance_uid and c.stack == primary.stack}
    for crop, axial in _axial_crops(volumes, study):
        _save(_axial_picture(crop, axial, primary, rois.get(crop.level)), out / f"axial_{crop.level}.png", written)
    by_level: dict[str, list[Crop]] = {}
    for crop in study.crops:
        by_level.setdefault(crop.level, []).append(crop)
    for level, crops in by_level.items():
        _save(_crops_picture(level, crops), out / f"crops_{level}.png", written)
    if study.crops:
        _save(_montage(study), out / "montage.png", written)
    return written
