"""Volumes of one study, by role, to discs and disc volumes: detection, fusion and extraction.

The core every caller shares: the worker and ``spine-node grade`` (roles from the node's
classifier) and the evaluation (roles from the phantom's truth).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from models.detect import Detector, LevelDetection, SeriesDetection, fuse
from models.extract import SAGITTAL_ROLES, Crop, extract
from models.volumes import SeriesVolume

__all__ = ["Stage", "StudyAnalysis", "analyse_volumes", "no_stages"]

#: Times one named stage of the analysis (the worker writes each to the study's timeline).
Stage = Callable[[str], AbstractContextManager[object]]


def no_stages(name: str) -> AbstractContextManager[object]:
    """A :data:`Stage` that records nothing (offline use)."""
    return nullcontext()


@dataclass(frozen=True)
class StudyAnalysis:
    """Per-series detections, the fused discs, every crop, and warnings for the result."""

    detections: list[SeriesDetection]
    discs: dict[str, LevelDetection]
    crops: list[Crop]
    warnings: list[str]


def analyse_volumes(volumes: Mapping[str, Sequence[SeriesVolume]], detector: Detector, device: str = "cpu",
                    stage: Stage = no_stages) -> StudyAnalysis:
    """Detect on every sagittal volume (T2, STIR, then T1 lead the fusion), fuse, extract."""
    names = {v.series_instance_uid: role for role, vols in volumes.items() for v in vols}
    sagittal = [v for role in SAGITTAL_ROLES for v in volumes.get(role, ())]
    with stage("detect"):
        detections = [detector.detect(v) for v in sagittal]
        discs, fuse_warnings = fuse(detections, names)
    warnings = [f"{names[d.series_instance_uid]}: {w}" for d in detections for w in d.warnings]
    warnings.extend(fuse_warnings)
    if not sagittal:
        warnings.append("no sagittal series: discs cannot be found")
    if not volumes.get("T2_AX"):
        warnings.append("no T2_AX series: subarticular grades from sagittal views only")
    with stage("extract"):
        crops, extract_warnings = extract(volumes, discs, device)
    return StudyAnalysis(detections, discs, crops, warnings + extract_warnings)
