"""The production shape with real parts: PostgreSQL, a redis-server started here, the node
publishing to it, and ``spine-node worker`` processes (real Celery) grading. Faults are real
too: a worker killed with SIGKILL mid-grade, and the broker gone while studies arrive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from node.config import load_settings
from node.dispatch import CeleryPublisher
from node.schema import JobKind, Result
from tests.support.services import NodeProcess, RedisServer, WorkerProcess, events, store, wait_for

pytestmark = pytest.mark.postgres


def _send(port: int, study: Path) -> None:
    assert store(port, sorted(study.rglob("*.dcm"))).returncode == 0


def _uid(study: Path) -> str:
    return str(json.loads((study / "truth.json").read_text())["study_instance_uid"])


def _results(watch: Any) -> int:
    with watch.sessions() as session:
        return int(session.scalar(select(func.count(Result.id))) or 0)


@pytest.mark.faults
def test_a_worker_killed_mid_grade_leaves_the_job_to_another(production: Callable[..., tuple[NodeProcess, str]],
                                                             phantom_study: Path, tmp_path: Path, watch: Any,
                                                             figure: Callable[..., None]) -> None:
    """SIGKILL the worker (and its pool process) while it grades: the lease lapses, the node
    returns the job, a second worker completes it, and there is exactly one result."""
    node, url = production()
    first = WorkerProcess(node.config, tmp_path / "worker-1.log").start()
    _send(node.port, phantom_study)
    study = watch(url, _uid(phantom_study))
    wait_for(lambda: any(s["stage"] == "models" for s in study.show()["stages"]), 180, "the first worker to start grading")
    first.kill()
    shown = study.show()
    assert shown["state"] == "GRADING" and shown["jobs"][0]["state"] == "RUNNING"  # killed before it finished
    assert _results(study) == 0
    second = WorkerProcess(node.config, tmp_path / "worker-2.log").start()
    try:
        shown = study.wait_state("GRADED", "FAILED", timeout=180)
        assert shown["state"] == "GRADED", shown["timeline"]
        grade = shown["jobs"][0]
        assert grade["state"] == "DONE" and grade["attempts"] == 2
        assert any("stopped renewing its lease" in e["message"] for e in events(shown, "grade-retry"))
        assert _results(study) == 1
        wait_for(lambda: [j["state"] for j in study.show()["jobs"]] == ["DONE", "DONE"], 60, "the delivery job")
        publisher = CeleryPublisher(load_settings(node.config))  # the killed worker's message, delivered again
        publisher.publish(grade["id"], JobKind.GRADE)
        publisher.close()
        wait_for(lambda: f"job {grade['id']} is DONE; message dropped" in second.log.read_text(), 60, "the duplicate to be dropped")
    finally:
        second.stop()
    assert _results(study) == 1
    figure("worker SIGKILL during grade", attempts=grade["attempts"], results=_results(study),
           duplicate_messages_dropped=1, final_state=study.show()["state"])


@pytest.mark.faults
def test_studies_wait_in_the_database_while_the_broker_is_down(production: Callable[..., tuple[NodeProcess, str]],
                                                               redis_server: RedisServer, phantom_study: Path,
                                                               tmp_path: Path, watch: Any, figure: Callable[..., None]) -> None:
    """Redis stops while a study arrives: every instance is acknowledged and stored, the study is
    READY with its job PENDING; when Redis is back, the job goes out and a running worker grades it."""
    node, url = production()
    worker = WorkerProcess(node.config, tmp_path / "worker.log").start()
    try:
        redis_server.stop()
        _send(node.port, phantom_study)
        study = watch(url, _uid(phantom_study))
        shown = study.wait_state("READY", "GRADED", "FAILED")
        assert shown["state"] == "READY" and [j["state"] for j in shown["jobs"]] == ["PENDING"]
        wait_for(lambda: "jobs wait in the database" in node.log.read_text(), 30, "the node to say the broker is down")
        assert study.show()["jobs"][0]["state"] == "PENDING"
        redis_server.start()
        shown = study.wait_state("GRADED", "FAILED", timeout=240)
        assert shown["state"] == "GRADED", shown["timeline"]
        stored = sum(s["instances"] for s in shown["series"])
        assert stored == len(list(phantom_study.rglob("*.dcm")))
        assert _results(study) == 1
        figure("Redis stopped while a study arrives, then started", instances_acknowledged=stored, lost=0,
               job_waited_in="database (PENDING)", results=_results(study))
    finally:
        worker.kill()


def test_the_worker_command_needs_a_broker(tmp_path: Path) -> None:
    """``spine-node worker`` without broker_url says so and exits 2 (embedded mode grades in serve)."""
    result = subprocess.run([sys.executable, "-m", "node.cli", "worker"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SPINE_NODE_BROKER_URL": ""}, cwd=tmp_path)
    assert result.returncode == 2 and "needs broker_url" in result.stderr


def test_tasks_are_routed_acknowledged_late_and_time_limited() -> None:
    """Both tasks: their queue, late acknowledgement, given back when the worker is lost, hard
    and soft time limits, and a visibility timeout above the longest grade."""
    from node.config import Settings
    from worker.app import make_app, worker_argv

    settings = Settings(broker_url="redis://127.0.0.1:1/0", grade_time_limit_s=100.0)
    app, _ = make_app(settings)
    grade, deliver = app.tasks["spine_node.grade_study"], app.tasks["spine_node.deliver"]
    assert app.conf.task_routes == {"spine_node.grade_study": {"queue": "grade"}, "spine_node.deliver": {"queue": "deliver"}}
    assert grade.acks_late and grade.reject_on_worker_lost and deliver.acks_late and deliver.reject_on_worker_lost
    assert (grade.time_limit, grade.soft_time_limit) == (100.0, 90.0)
    assert app.conf.broker_transport_options["visibility_timeout"] > grade.time_limit
    assert app.conf.worker_prefetch_multiplier == 1
    argv = worker_argv(settings, ["grade"], None)
    assert argv[argv.index("--concurrency") + 1] == "1"  # no GPU here: one process
    assert argv[argv.index("--queues") + 1] == "grade"
    app.close()
