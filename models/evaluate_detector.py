"""How well detection and extraction work on held-out phantoms (``spine-node evaluate-detector``).

Reports, over every level of every study: the distance between detected and true disc centres
(median, 95th percentile, max), the disc-plane angle error, the share of studies with all five
levels found and each nearer its own true centre than any other level's (level assignment), the
share of levels whose axial crop contains the true disc centre, per series role and condition the
share of crops that contain the point where the condition is measured (what each input can show
the grader at all), and the share of labels whose point no crop contains. Roles come from the
phantom's truth, so this measures the models alone. ``twins`` re-renders studies with another
encoding or acquisition and compares their crops with the plain ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import track

from models.analysis import StudyAnalysis, analyse_volumes
from models.data.pathology import LEVELS
from models.data.phantom import PhantomOptions, generate_study
from models.detect import Detector
from models.volumes import SeriesVolume, load_series

__all__ = ["TWIN_OPTIONS", "evaluate", "load_study", "twins"]

# Encodings and acquisitions that must give the same crops as the plain study (same seed/index).
TWIN_OPTIONS: dict[str, dict[str, Any]] = {
    "reversed": {"reverse_order": True},
    "enhanced": {"enhanced": True},
    "jpeg2000": {"compression": "jpeg2000"},
    "jpeg-lossless": {"compression": "jpeg-lossless"},
    "multi-stack axial": {"axial": "multi"},
}


@dataclass(frozen=True)
class _Scored:
    truth: dict[str, Any]
    analysis: StudyAnalysis


def load_study(study_dir: Path) -> tuple[dict[str, Any], dict[str, list[SeriesVolume]]]:
    """A phantom study's truth and its volumes by role (roles from the truth)."""
    truth = json.loads((study_dir / "truth.json").read_text())
    volumes: dict[str, list[SeriesVolume]] = {}
    for s in truth["series"]:
        vols, _ = load_series(sorted((study_dir / s["folder"]).glob("*.dcm")))
        volumes.setdefault(s["role"], []).extend(vols)
    return truth, volumes


def _angle(a: np.ndarray, b: Sequence[float]) -> float:
    """Angle in degrees between two unit vectors, ignoring sign."""
    return float(np.degrees(np.arccos(np.clip(abs(float(np.dot(a, b))), 0, 1))))


def _contains(crop_box: Any, point: np.ndarray) -> bool:
    """Whether a patient point lies inside a box (half a voxel of margin)."""
    idx = crop_box.to_voxels(point[None])[0]
    return bool(np.all(idx >= -0.5) and np.all(idx <= np.asarray(crop_box.shape) - 0.5))


def _family(condition: str) -> str:
    """A condition without its side: the foramina and the subarticular recesses pool both."""
    return condition.removeprefix("left_").removeprefix("right_")


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """Median, 95th percentile and max, rounded (None when there are no values)."""
    if not values:
        return {"median": None, "p95": None, "max": None}
    v = np.asarray(values)
    return {"median": round(float(np.median(v)), 2), "p95": round(float(np.percentile(v, 95)), 2), "max": round(float(v.max()), 2)}


def evaluate(study_dirs: Sequence[Path], detector: Detector, progress: bool = True) -> dict[str, Any]:
    """Detection and extraction metrics over phantom studies (see the module docstring)."""
    scored = []
    for d in track(study_dirs, description="evaluating", disable=not progress, console=Console(stderr=True)):
        truth, volumes = load_study(d)
        scored.append(_Scored(truth, analyse_volumes(volumes, detector)))
    distances, angles, axial_hits, axial_total = [], [], 0, 0
    all_right = 0
    shown: dict[str, dict[str, list[bool]]] = {}
    seen: dict[str, list[bool]] = {}
    for s in scored:
        truth_centres = {lv: np.array(s.truth["levels"][lv]["center"]) for lv in LEVELS}
        right = len(s.analysis.discs) == len(LEVELS)
        for lv, disc in s.analysis.discs.items():
            dist = float(np.linalg.norm(disc.centre - truth_centres[lv]))
            distances.append(dist)
            angles.append(_angle(disc.normal, s.truth["levels"][lv]["plane"]["normal"]))
            nearest = min(LEVELS, key=lambda other: float(np.linalg.norm(disc.centre - truth_centres[other])))
            right = right and nearest == lv
        for crop in s.analysis.crops:
            if crop.view == "axial":
                axial_total += 1
                axial_hits += _contains(crop.box, truth_centres[crop.level])
            for condition, found in s.truth["levels"][crop.level]["conditions"].items():
                shown.setdefault(crop.role, {}).setdefault(_family(condition), []).append(_contains(crop.box, np.asarray(found["point"])))
        for lv, level in s.truth["levels"].items():
            for condition, found in level["conditions"].items():
                point = np.asarray(found["point"])
                seen.setdefault(_family(condition), []).append(any(_contains(c.box, point) for c in s.analysis.crops if c.level == lv))
        all_right += right
    expected_axial = sum(len(LEVELS) for s in scored if any(x["role"] == "T2_AX" for x in s.truth["series"]))
    return {
        "studies": len(scored),
        "levels_found": sum(len(s.analysis.discs) for s in scored),
        "centre_error_mm": _percentiles(distances),
        "plane_angle_error_deg": _percentiles(angles),
        "level_assignment_accuracy": round(all_right / max(len(scored), 1), 4),
        "axial_crops": axial_total,
        "axial_crops_expected": expected_axial,
        "axial_crops_containing_centre": round(axial_hits / max(axial_total, 1), 4),
        "crops_containing_condition_point": {role: {c: round(float(np.mean(hits)), 4) for c, hits in by.items()} for role, by in sorted(shown.items())},
        "condition_point_in_no_crop": {c: round(1 - float(np.mean(hits)), 4) for c, hits in seen.items()},
        "warnings": sum(len(s.analysis.warnings) for s in scored),
    }


def twins(out: Path, seed: int, studies: int, detector: Detector, progress: bool = True) -> dict[str, Any]:
    """Crops of each twin variant against the plain study: pixel difference and box shift.

    Encodings (reversed order, Enhanced MR, compression) must match to rounding. A multi-stack
    axial twin is another rendering (its random draws differ from the axial geometry on), so only
    its boxes are compared: they must sit at the same place."""
    report: dict[str, Any] = {}
    plain = {}
    for i in range(studies):
        _, vols = load_study(generate_study(out / "plain", seed, i, PhantomOptions(axial="single")))
        plain[i] = analyse_volumes(vols, detector).crops
    for name, options in track(list(TWIN_OPTIONS.items()), description="twins", disable=not progress, console=Console(stderr=True)):
        diffs: list[float] = []
        shifts: dict[str, list[float]] = {"sagittal": [], "axial": []}
        missing = 0
        for i in range(studies):
            opts = PhantomOptions(**{"axial": "single", **options})
            _, vols = load_study(generate_study(out / name.replace(" ", "-"), seed, i, opts))
            crops = {(c.level, c.role): c for c in analyse_volumes(vols, detector).crops}
            for c in plain[i]:
                twin = crops.get((c.level, c.role))
                if twin is None:
                    missing += 1
                    continue
                shifts[c.view].append(float(np.linalg.norm(twin.box.centre - c.box.centre)))
                if name != "multi-stack axial":
                    diffs.append(float(np.abs(twin.pixels - c.pixels).mean()))
        report[name] = {
            "missing_crops": missing,
            "max_mean_abs_difference": round(max(diffs), 5) if diffs else None,
            **{f"max_{view}_box_shift_mm": round(max(v), 3) if v else None for view, v in shifts.items()},
        }
    return report
