"""One study through the models: series roles -> chosen series -> volumes -> detection ->
extraction -> grades -> result.

The same pipeline serves ``spine-node grade DIR`` (offline, a folder of DICOM files) and the
worker's grading task (files from the node's store). Series roles come from ``node.series``, so
a folder is read exactly as the node reads the same study received over the network. The
result has the shape DESIGN.md gives.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from models.analysis import Stage, StudyAnalysis, analyse_volumes, no_stages
from models.detect import Detector
from models.extract import SAGITTAL_ROLES
from models.grade import GraderModel
from models.volumes import SeriesVolume, VolumeError, group_by_series, load_series
from node.series import classify_series

LOGGER = logging.getLogger(__name__)
__all__ = ["Analysis", "SeriesEntry", "StudyError", "analyse", "analyse_folder", "read_series", "result_json"]

GRADED_ROLES = (*SAGITTAL_ROLES, "T2_AX")


class StudyError(ValueError):
    """A folder or study the pipeline cannot grade, however often it tries; the message says why."""


@dataclass
class SeriesEntry:
    """A series of the study: its role, why, and whether the models used it."""

    series_instance_uid: str
    role: str
    role_reason: str
    paths: list[Path]
    recency: tuple[str, str, int] = ("", "", -1)  # SeriesDate, SeriesTime, SeriesNumber: newest sorts last
    used: bool = False
    volumes: list[SeriesVolume] = field(default_factory=list)


@dataclass
class Analysis:
    """Everything the pipeline found in one study: series, discs, crops, grades and warnings."""

    study_instance_uid: str
    series: list[SeriesEntry]
    study: StudyAnalysis
    warnings: list[str]
    detector_sha256: str
    grades: dict[str, dict[str, Any]] = field(default_factory=dict)
    grader_sha256: str | None = None

    def volumes(self) -> dict[str, list[SeriesVolume]]:
        """Volumes per role, of the series that formed volumes."""
        return _by_role(self.series)


def _by_role(series: Iterable[SeriesEntry]) -> dict[str, list[SeriesVolume]]:
    """Volumes per role of the series that formed volumes."""
    out: dict[str, list[SeriesVolume]] = {}
    for s in series:
        if s.volumes:
            out.setdefault(s.role, []).extend(s.volumes)
    return out


def read_series(paths: Iterable[Path], own_device_uid: str) -> tuple[str, list[SeriesEntry]]:
    """The study UID and its series with their roles; one study per call."""
    groups = group_by_series(paths)
    if not groups:
        raise StudyError("no DICOM files found")
    entries = []
    studies = set()
    for uid, files in groups.items():
        files.sort()
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        studies.add(str(ds.get("StudyInstanceUID", "")))
        decision = classify_series(ds, own_device_uid)
        entries.append(SeriesEntry(uid, decision.role.value, decision.reason, files, _recency(ds)))
    if len(studies) > 1:
        raise StudyError(f"the files hold {len(studies)} studies; grade one study at a time")
    entries.sort(key=lambda e: (GRADED_ROLES.index(e.role) if e.role in GRADED_ROLES else len(GRADED_ROLES), e.series_instance_uid))
    return studies.pop(), entries


def _recency(ds: pydicom.Dataset) -> tuple[str, str, int]:
    """Orders repeats of a role by acquisition: SeriesDate, SeriesTime, then SeriesNumber."""
    try:
        number = int(ds.get("SeriesNumber") or -1)
    except (TypeError, ValueError):
        number = -1
    return str(ds.get("SeriesDate", "") or ""), str(ds.get("SeriesTime", "") or ""), number


def load_chosen(series: list[SeriesEntry]) -> list[str]:
    """Load the volumes of one series per graded role: the newest that forms a volume.

    A role sent more than once (a repeated acquisition) uses its newest complete series and says
    which; the others are left unused. Returns the warnings.
    """
    warnings: list[str] = []
    by_role: dict[str, list[SeriesEntry]] = {}
    for s in series:
        if s.role in GRADED_ROLES:
            by_role.setdefault(s.role, []).append(s)
    for role, entries in by_role.items():
        entries.sort(key=lambda e: (e.recency, e.series_instance_uid), reverse=True)
        chosen = None
        for s in entries:
            try:
                s.volumes, skipped = load_series(s.paths)
            except VolumeError as exc:
                warnings.append(f"{role} series {s.series_instance_uid} not used: {exc}")
                continue
            warnings.extend(f"{role} series {s.series_instance_uid}: {why}" for why in skipped)
            chosen = s
            break
        if chosen is not None and len(entries) > 1:
            others = ", ".join(e.series_instance_uid for e in entries if e is not chosen)
            warnings.append(f"{role} sent {len(entries)} times: using series {chosen.series_instance_uid}, the newest complete one (not {others})")
    return warnings


def analyse(study_uid: str, series: list[SeriesEntry], detector: Detector, grader: GraderModel | None, device: str = "cpu",
            stage: Stage = no_stages) -> Analysis:
    """Volumes of the chosen series, the models' analysis and, with a grader, every level's grades
    in one batch; marks which series were used. Raises StudyError when no disc can be found."""
    with stage("volumes"):
        warnings = load_chosen(series)
    study = analyse_volumes(_by_role(series), detector, device, stage)
    if not study.discs:
        raise StudyError("; ".join(warnings + study.warnings) or "no disc found in any sagittal series")
    used = {c.series_instance_uid for c in study.crops}
    for s in series:
        s.used = s.series_instance_uid in used
    with stage("grade"):
        grades = grader.grade(study.crops, list(study.discs)) if grader else {}
    return Analysis(study_uid, series, study, warnings + study.warnings, detector.sha256, grades, grader.sha256 if grader else None)


def analyse_folder(folder: Path, detector: Detector, grader: GraderModel | None, own_device_uid: str, device: str = "cpu") -> Analysis:
    """``analyse`` for every DICOM file under ``folder`` (recursively)."""
    if not folder.is_dir():
        raise StudyError(f"{folder} is not a folder")
    study_uid, series = read_series((p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() not in {".json", ".csv", ".png", ".md", ".txt"}), own_device_uid)
    return analyse(study_uid, series, detector, grader, device)


def _rounded(values: Iterable[float], digits: int = 2) -> list[float]:
    """Floats rounded for JSON."""
    return [round(float(v), digits) for v in values]


def result_json(analysis: Analysis) -> dict[str, Any]:
    """The grading result in DESIGN.md's shape (grades absent until the grader runs)."""
    levels: dict[str, Any] = {}
    for level, disc in analysis.study.discs.items():
        views = [
            {"role": c.role, "view": c.view, "series_instance_uid": c.series_instance_uid, "stack": c.stack, "coverage": round(c.coverage, 3)}
            for c in analysis.study.crops if c.level == level
        ]
        levels[level] = {
            "center": _rounded(disc.centre),
            "confidence": round(disc.confidence, 3),
            "normal": _rounded(disc.normal, 4),
            "posterior": _rounded(disc.posterior, 4),
            "left": _rounded(disc.left, 4),
            "depth_mm": round(disc.depth_mm, 1),
            "views": views,
            "conditions": analysis.grades.get(level, {}),
        }
    return {
        "study_instance_uid": analysis.study_instance_uid,
        "model": {"name": "spine-node", "version": importlib.metadata.version("spine-node"), "detector_sha256": analysis.detector_sha256, "weights_sha256": analysis.grader_sha256},
        "series": [{"series_instance_uid": s.series_instance_uid, "role": s.role, "role_reason": s.role_reason, "used": s.used} for s in analysis.series],
        "levels": levels,
        "warnings": analysis.warnings,
        "not_for_diagnostic_use": True,
    }
