"""Fixtures shared by all suites: databases (SQLite and a scratch PostgreSQL), running nodes, Redis,
Orthanc, one phantom study, and a look at a study through the database."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from models.data.phantom import generate
from node.admin import show_study
from node.db import make_engine, make_sessionmaker
from tests.support.orthanc import OrthancServer
from tests.support.services import (
    UNREACHABLE_BROKER,
    NodeProcess,
    PostgresCluster,
    RedisServer,
    wait_for,
)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One scratch PostgreSQL cluster for the whole test session."""
    cluster = PostgresCluster()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind the node supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.db'}"
    return request.getfixturevalue("postgres").create_database()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """An empty SQLite database, for tests whose subject is not the database."""
    return f"sqlite:///{tmp_path / 'node.db'}"


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start ``spine-node serve`` processes; all are stopped at the end of the test.

    Unless a test names a ``broker_url`` (``""`` for embedded grading), the node publishes to a
    broker that is not there, so its jobs wait in the outbox where receiving tests look at them.
    """
    started: list[NodeProcess] = []

    def start(database_url: str, name: str = "node", **settings: Any) -> NodeProcess:
        settings.setdefault("broker_url", UNREACHABLE_BROKER)
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        node = NodeProcess(workdir, database_url, **settings).start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.kill()


@pytest.fixture(scope="session")
def phantom_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One phantom study (all four roles, one axial stack), as a PACS would send it."""
    return generate(tmp_path_factory.mktemp("phantom"), 1, 4711, progress=False, axial="single")[0]


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


@pytest.fixture
def production(node_factory: Callable[..., NodeProcess], postgres: PostgresCluster, redis_server: RedisServer,
               ) -> Callable[..., tuple[NodeProcess, str]]:
    """``production(**settings)``: a node on PostgreSQL publishing to the test's Redis, with a short
    lease (3 s); returns it and its database URL."""

    def start(**settings: Any) -> tuple[NodeProcess, str]:
        url = settings.pop("database_url", None) or postgres.create_database()
        settings = {"broker_url": redis_server.url, "job_lease_s": 3.0, "quiet_period_s": 0.5, **settings}
        return node_factory(url, **settings), url

    return start


@pytest.fixture
def orthancs() -> Iterator[Callable[..., OrthancServer]]:
    """``orthancs(**kw)`` makes an Orthanc (not yet started); all are removed at the end."""
    made: list[OrthancServer] = []

    def make(**kw: Any) -> OrthancServer:
        made.append(OrthancServer(**kw))
        return made[-1]

    yield make
    for server in made:
        server.close()


#: The fault matrix as the fault tests of this run measured it: one row per test.
FAULT_FIGURES: list[dict[str, Any]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--faults-json", metavar="FILE", help="write the fault matrix figures of this run to FILE")


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``figure(fault, **counts)`` records what a fault test proved, for the matrix printed at the end."""

    def record(fault: str, **counts: Any) -> None:
        FAULT_FIGURES.append({"fault": fault, "test": request.node.nodeid, **counts})

    return record


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Print the fault matrix (and write it with ``--faults-json``) when fault tests ran."""
    if not FAULT_FIGURES:
        return
    terminalreporter.section("fault matrix")
    for row in FAULT_FIGURES:
        counts = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("fault", "test"))
        terminalreporter.write_line(f"{row['fault']}: {counts}")
    if path := config.getoption("--faults-json"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(FAULT_FIGURES, indent=1) + "\n")
