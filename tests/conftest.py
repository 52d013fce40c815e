"""Fixtures shared by all suites: databases (SQLite and a scratch PostgreSQL), running nodes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.services import NodeProcess, PostgresCluster

#: Nothing listens on TCP port 1: publishing fails at once and jobs stay PENDING.
UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"


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
