"""A wall-clock step, as NTP makes one after a host's clock drifted or its battery died.

The node compares times it stored (arrival, leases, back-offs) with its clock. Stepping the
clock of a process under test is not possible here (the system clock is shared; libfaketime
0.9.10 breaks Python's sleeps when the monotonic clock is left alone), so these tests move
every stored time the other way, by the same amount, while the node runs: what the node then
sees is exactly what it sees after its clock steps."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from node.db import make_engine, make_sessionmaker
from node.schema import Instance, Job
from tests.faults.conftest import holdings, study_uid
from tests.support.services import NodeProcess, events, store, wait_for

pytestmark = pytest.mark.faults

HOUR = dt.timedelta(hours=1)
#: Long enough for the test to step the clock before the quiet period ends on a busy machine.
QUIET_S = 10.0


def step_clock(database_url: str, step: dt.timedelta) -> None:
    """What a node sees when its clock steps by ``step``: every time it stored moves by ``-step``."""
    engine = make_engine(database_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            for instance in session.scalars(select(Instance)):
                instance.received_at -= step
            for job in session.scalars(select(Job)):
                for column in ("lease_until", "not_before", "queued_at", "started_at", "created_at"):
                    if (value := getattr(job, column)) is not None:
                        setattr(job, column, value - step)
    finally:
        engine.dispose()


def test_clock_stepping_back_an_hour_during_the_quiet_period(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                             phantom_study: Path, watch: Any,
                                                             figure: Callable[..., None]) -> None:
    """The clock steps back an hour after the study's last instance: its arrival now lies in the
    future, and the study would wait an hour for its quiet period; instead the node notices, times
    the quiet period from when it saw that, and grades the study once."""
    node = node_factory(sqlite_url, broker_url="", quiet_period_s=QUIET_S)
    assert store(node.port, sorted(phantom_study.rglob("*.dcm"))).returncode == 0
    study = watch(sqlite_url, study_uid(phantom_study))
    step_clock(sqlite_url, -HOUR)
    stepped = time.monotonic()
    assert study.show()["state"] == "RECEIVING"
    study.wait_state("READY", "GRADING", "GRADED", timeout=120)
    waited = time.monotonic() - stepped
    shown = study.wait_state("GRADED", "FAILED", timeout=240)
    assert shown["state"] == "GRADED" and holdings(node).results() == 1 and waited < 120
    assert "the clock stepped back" in node.log.read_text()
    figure("clock stepped back 1 h in the quiet period", quiet_period_s=QUIET_S, ready_after_the_step_s=round(waited, 1),
           results=holdings(node).results(), final_state=shown["state"])


def test_clock_stepping_forward_an_hour_during_grading(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                                       phantom_study: Path, watch: Any, figure: Callable[..., None]) -> None:
    """The clock steps forward an hour while a study is graded: its lease looks an hour old, the
    reaper returns the job and the grading that lost its lease stores nothing; the next attempt
    grades it, so there is one result, and the timeline says why there were two attempts."""
    node = node_factory(sqlite_url, broker_url="", job_lease_s=3.0)
    assert store(node.port, sorted(phantom_study.rglob("*.dcm"))).returncode == 0
    study = watch(sqlite_url, study_uid(phantom_study))
    wait_for(lambda: any(j["state"] == "RUNNING" for j in study.show()["jobs"]), 120, "the grading to start")

    def lease_returned() -> bool:
        step_clock(sqlite_url, HOUR)  # again until the reaper sees it before the next renewal does
        return bool(events(study.show(), "grade-retry"))

    wait_for(lease_returned, 60, "the reaper to return the job")
    shown = study.wait_state("GRADED", "FAILED", timeout=240)
    retry = events(shown, "grade-retry")
    assert shown["state"] == "GRADED" and holdings(node).results() == 1
    assert "stopped renewing its lease" in retry[0]["message"] and shown["jobs"][0]["attempts"] == 2
    figure("clock stepped forward 1 h during grading", grade_attempts=shown["jobs"][0]["attempts"],
           results=holdings(node).results(), final_state=shown["state"])
