"""Fixtures of the worker suites: the phantom study graded offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest



@dataclass(frozen=True)
class Graded:
    """The phantom study graded offline: its folder, the result (DESIGN.md's shape) and every
    instance's header by SeriesInstanceUID."""

    study: Path
    result: dict[str, Any]
    headers: dict[str, list[pydicom.Dataset]]


@pytest.fixture(scope="session")
def graded(phantom_study: Path) -> Graded:
    """The phantom study through the offline pipeline, once per test session."""
    from models.detect import DEFAULT_WEIGHTS, Detector
    from models.grade import DEFAULT_GRADER, GraderModel
    from node.config import DEFAULT_DEVICE_UID
    from worker.pipeline import analyse_folder, result_json

    result = result_json(analyse_folder(phantom_study, Detector.load(DEFAULT_WEIGHTS), GraderModel.load(DEFAULT_GRADER),
                                        DEFAULT_DEVICE_UID))
    headers: dict[str, list[pydicom.Dataset]] = {}
    for path in sorted(phantom_study.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        headers.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return Graded(phantom_study, result, headers)
