"""Fixtures of the worker suites: one phantom study, and a look at a study through the database."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from models.data.phantom import generate
from node.admin import show_study
from node.db import make_engine, make_sessionmaker
from tests.support.services import RedisServer, wait_for


@pytest.fixture(scope="session")
def phantom_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One phantom study (all four roles, one axial stack), as a PACS would send it."""
    return generate(tmp_path_factory.mktemp("phantom"), 1, 4711, progress=False, axial="single")[0]


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


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for this test, on a free port."""
    server = RedisServer().start()
    yield server
    server.close()


class StudyWatch:
    """Reads a study's ``show`` document straight from the node's database."""

    def __init__(self, database_url: str, study_instance_uid: str) -> None:
        self.engine = make_engine(database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.uid = study_instance_uid

    def show(self) -> dict[str, Any]:
        return show_study(self.sessions, self.uid)

    def wait_state(self, *states: str, timeout: float = 120.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            try:
                shown = self.show()
            except LookupError:
                return None
            return shown if shown["state"] in states else None

        return wait_for(reached, timeout, f"study state in {states}")

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture
def watch() -> Iterator[Any]:
    """``watch(database_url, uid)`` gives a :class:`StudyWatch`; all are closed at the end."""
    made: list[StudyWatch] = []

    def make(database_url: str, uid: str) -> StudyWatch:
        made.append(StudyWatch(database_url, uid))
        return made[-1]

    yield make
    for w in made:
        w.close()
