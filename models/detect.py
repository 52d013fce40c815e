"""IVD detection and labelling on sagittal series: per level L1-L2..L5-S1, the disc centre and
disc plane in patient space, with a confidence, checked for anatomical consistency.

Each sagittal volume is resampled by the sampler into a canonical frame (its own slices, head up,
anterior left, ``INPUT_SPACING`` mm pixels), so odd orientations and reversed slice orders look
the same to the network. ``DiscNet`` gives a heatmap per level on every slice (from the slice and
its two neighbours); a level's centre is the heatmap peak refined to a fraction of a pixel, and
its left-right position the Gaussian fit of the peak heights across slices. The disc plane is
the regressed in-plane normal with the slice axis as its left-right axis (no coronal tilt).

Choices: a level whose peak is under ``MIN_CONFIDENCE`` is missing, not guessed. Levels must run
caudally in order with 15-70 mm between neighbours; a level that breaks this is reported and its
confidence halved. Series sharing a frame of reference are fused by confidence-weighted mean when
they agree within ``AGREE_MM``, otherwise the more confident one wins and a warning says so.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from models.data.pathology import LEVELS
from models.detector_net import DEPTH_SCALE, INPUT_SIZE, INPUT_SPACING, LEVEL_COUNT, DiscNet
from models.sampler import Box, sample
from models.volumes import SeriesVolume

LOGGER = logging.getLogger(__name__)
__all__ = ["DEFAULT_WEIGHTS", "Detector", "LevelDetection", "SeriesDetection", "canonical_box", "check_levels", "fuse", "normalise"]

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "detector.safetensors"
MIN_CONFIDENCE = 0.3
AGREE_MM = 6.0
GAP_MM = (15.0, 70.0)
INFERIOR = np.array([0.0, 0.0, -1.0])


@dataclass(frozen=True, eq=False)
class LevelDetection:
    """One disc: centre (patient mm), unit normal (cranial), posterior and left axes, depth,
    confidence, and the series it was found in. Compared by identity (it holds arrays)."""

    level: str
    centre: np.ndarray
    normal: np.ndarray
    posterior: np.ndarray
    left: np.ndarray
    depth_mm: float
    confidence: float
    series_instance_uid: str

    def plane_axes(self) -> np.ndarray:
        """Rows: left, normal (cranial), posterior: an orthonormal frame of the disc."""
        return np.stack([self.left, self.normal, self.posterior])


@dataclass(frozen=True)
class SeriesDetection:
    """The levels found in one sagittal series and what was wrong with them."""

    series_instance_uid: str
    frame_of_reference_uid: str | None
    levels: dict[str, LevelDetection]
    warnings: list[str] = field(default_factory=list)


def canonical_box(volume: SeriesVolume, spacing: float = INPUT_SPACING, size: int = INPUT_SIZE) -> Box:
    """Every native slice of a sagittal volume, resampled head up, anterior left, slices to the left."""
    axis = volume.slice_axis if volume.slice_axis[0] >= 0 else -volume.slice_axis
    return Box.around(np.asarray(volume.volume.center_position), axis, INFERIOR, (volume.volume.spatial_shape[0], size, size), (volume.volume.spacing[0], spacing, spacing))


def normalise(array: np.ndarray) -> float:
    """The intensity that maps to 1: the 99.5th percentile of the volume (subsampled)."""
    return float(np.percentile(array[:, ::4, ::4], 99.5)) or 1.0


def stacked_inputs(slices: torch.Tensor) -> torch.Tensor:
    """(S, H, W) slices to (S, 3, H, W): each slice with its neighbours, zeros beyond the ends."""
    padded = torch.nn.functional.pad(slices, (0, 0, 0, 0, 1, 1))
    return torch.stack([padded[:-2], padded[1:-1], padded[2:]], dim=1)


def weights_sha256(path: Path) -> str:
    """SHA-256 of a weights file, as results report it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Detector:
    """The trained DiscNet and the post-processing that turns its maps into levels."""

    def __init__(self, net: DiscNet, device: torch.device | str = "cpu", sha256: str = "") -> None:
        self.net = net.to(device).eval()
        self.device = torch.device(device)
        self.sha256 = sha256

    @classmethod
    def load(cls, path: Path = DEFAULT_WEIGHTS, device: torch.device | str = "cpu") -> Detector:
        """Load fp16 safetensors weights written by ``spine-node train-detector``."""
        if not path.exists():
            raise FileNotFoundError(f"detector weights not found at {path}; run `spine-node train-detector`")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        net = DiscNet(tuple(int(w) for w in meta["widths"].split(",")))
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return cls(net, device, weights_sha256(path))

    def detect(self, volume: SeriesVolume) -> SeriesDetection:
        """Levels of one sagittal volume (patient coordinates), before fusion with other series."""
        box = canonical_box(volume)
        slices, _ = sample(volume.volume, [box], self.device)
        x = (slices[0] / normalise(volume.volume.array)).clamp(0, 2)
        with torch.inference_mode():
            out = self.net(stacked_inputs(x)).float().cpu().numpy()
        levels = {}
        warnings = []
        for i, level in enumerate(LEVELS[:LEVEL_COUNT]):
            found = _peak(out, i, box, volume.series_instance_uid, level)
            if found.confidence < MIN_CONFIDENCE:
                warnings.append(f"{level} not found in series {volume.series_instance_uid} (confidence {found.confidence:.2f})")
                continue
            levels[level] = found
        levels, more = check_levels(levels)
        frame = volume.volume.frame_of_reference_uid
        return SeriesDetection(volume.series_instance_uid, str(frame) if frame else None, levels, warnings + more)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function."""
    return 1.0 / (1.0 + np.exp(-x))


def _peak(out: np.ndarray, channel: int, box: Box, series_uid: str, level: str) -> LevelDetection:
    """A level's centre from its heatmaps over all slices: sub-pixel in plane, Gaussian fit across slices."""
    prob = _sigmoid(out[:, channel])
    heights = prob.reshape(len(prob), -1).max(axis=1)
    k = int(np.argmax(heights))
    confidence = float(heights[k])
    positions = []
    weights = []
    for j in range(max(k - 2, 0), min(k + 3, len(prob))):
        if heights[j] >= 0.5 * confidence:
            positions.append(_refine(prob[j], prob[k]))
            weights.append(heights[j])
    row, col = np.average(np.array(positions), axis=0, weights=np.array(weights))
    offset = 0.0
    if 0 < k < len(prob) - 1:
        lm, l0, lp = np.log(np.clip(heights[k - 1 : k + 2], 1e-6, 1))
        curvature = lm - 2 * l0 + lp
        if curvature < 0:
            offset = float(np.clip(0.5 * (lm - lp) / curvature, -1, 1))
    centre = box.to_patient(np.array([[k + offset, row, col]]))[0]
    r, c = int(round(row)), int(round(col))
    window = out[k, :, max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2]
    n_row, n_col, depth = (float(window[LEVEL_COUNT + i].mean()) for i in range(3))
    axes = box.axes
    normal = n_row * axes[1] + n_col * axes[2]
    normal = normal / (np.linalg.norm(normal) or 1.0)
    if normal @ axes[1] > 0:
        normal = -normal
    left = axes[0] - (axes[0] @ normal) * normal
    left = left / np.linalg.norm(left)
    posterior = np.cross(normal, left)
    return LevelDetection(level, centre, normal, posterior, left, depth * DEPTH_SCALE, confidence, series_uid)


def _refine(prob: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Sub-pixel peak: probability-weighted centroid in a 7x7 window around the reference slice's argmax."""
    r, c = np.unravel_index(int(np.argmax(reference)), reference.shape)
    r0, c0 = max(r - 3, 0), max(c - 3, 0)
    win = prob[r0 : r + 4, c0 : c + 4] ** 2
    rr, cc = np.mgrid[r0 : r0 + win.shape[0], c0 : c0 + win.shape[1]]
    total = float(win.sum()) or 1.0
    return float((win * rr).sum() / total), float((win * cc).sum() / total)


def check_levels(levels: dict[str, LevelDetection]) -> tuple[dict[str, LevelDetection], list[str]]:
    """Order along the spine and spacing of neighbouring levels; offenders get half confidence."""
    warnings = []
    present = [lv for lv in LEVELS if lv in levels]
    suspect: set[str] = set()
    for upper, lower in zip(present, present[1:]):
        a, b = levels[upper].centre, levels[lower].centre
        gap = float(np.linalg.norm(b - a))
        expected = LEVELS.index(lower) - LEVELS.index(upper)
        if (b - a) @ INFERIOR <= 0:
            warnings.append(f"{lower} is not below {upper}: level labels are inconsistent")
            suspect.update((upper, lower))
        elif not GAP_MM[0] * expected <= gap <= GAP_MM[1] * expected:
            warnings.append(f"{upper} to {lower} is {gap:.0f} mm apart, outside {GAP_MM[0]:.0f}-{GAP_MM[1]:.0f} mm per level")
            suspect.update((upper, lower))
    missing = [lv for lv in LEVELS if lv not in levels]
    if missing:
        warnings.append(f"levels not found: {', '.join(missing)}")
    checked = {k: replace(v, confidence=v.confidence / 2) if k in suspect else v for k, v in levels.items()}
    return checked, warnings


def fuse(detections: Sequence[SeriesDetection], names: dict[str, str] | None = None) -> tuple[dict[str, LevelDetection], list[str]]:
    """One set of levels from several sagittal series in one frame of reference (the first one's).

    Agreeing detections are averaged by confidence; disagreeing ones are reported and the more
    confident kept. Series in another frame of reference are not fused, and that is reported."""
    names = names or {}
    if not detections:
        return {}, []
    frame = detections[0].frame_of_reference_uid
    warnings = []
    usable = []
    for d in detections:
        if d.frame_of_reference_uid != frame:
            warnings.append(f"series {names.get(d.series_instance_uid, d.series_instance_uid)} is in another frame of reference: its detections are not fused")
        else:
            usable.append(d)
    fused: dict[str, LevelDetection] = {}
    for level in LEVELS:
        found = sorted((d.levels[level] for d in usable if level in d.levels), key=lambda x: -x.confidence)
        if not found:
            continue
        best = found[0]
        agree = [f for f in found if np.linalg.norm(f.centre - best.centre) <= AGREE_MM]
        for f in found:
            if f not in agree:
                warnings.append(
                    f"{level}: {names.get(f.series_instance_uid, 'series ' + f.series_instance_uid)} and {names.get(best.series_instance_uid, 'series ' + best.series_instance_uid)} "
                    f"disagree by {np.linalg.norm(f.centre - best.centre):.1f} mm; keeping {names.get(best.series_instance_uid, best.series_instance_uid)}"
                )
        w = np.array([f.confidence for f in agree])
        normal = np.average([f.normal for f in agree], axis=0, weights=w)
        normal /= np.linalg.norm(normal)
        left = best.left - (best.left @ normal) * normal
        left /= np.linalg.norm(left)
        fused[level] = replace(
            best,
            centre=np.average([f.centre for f in agree], axis=0, weights=w),
            normal=normal, left=left, posterior=np.cross(normal, left),
            depth_mm=float(np.average([f.depth_mm for f in agree], weights=w)),
        )
    return fused, warnings
