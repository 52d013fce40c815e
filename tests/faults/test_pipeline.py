"""Faults between READY and delivered, in the production shape (PostgreSQL, a Redis started here,
real ``spine-node worker`` processes): the node killed while its jobs sit in the broker, Redis
restarted empty, a worker killed while it sends results to a PACS. Each ends with one result per
study, delivered, and a timeline that says what happened. (A worker killed mid-grade and Redis
down while a study arrives are in tests/worker/test_celery.py; a PACS down in test_delivery.py.)"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComprehensiveSRStorage, GrayscaleSoftcopyPresentationStateStorage, SecondaryCaptureImageStorage,
)

from tests.faults.conftest import holdings, study_uid
from tests.support.services import NodeProcess, RedisServer, WorkerProcess, events, free_port, store, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[[NodeProcess], WorkerProcess]]:
    """``workers(node)`` starts a ``spine-node worker`` on the node's config; all are killed at the end."""
    started: list[WorkerProcess] = []

    def start(node: NodeProcess) -> WorkerProcess:
        started.append(WorkerProcess(node.config, tmp_path / f"worker-{len(started) + 1}.log").start())
        return started[-1]

    yield start
    for worker in started:
        worker.kill()


def test_node_killed_with_its_job_in_the_broker(production: Callable[..., tuple[NodeProcess, str]],
                                                workers: Callable[[NodeProcess], WorkerProcess], phantom_study: Path,
                                                watch: Any, figure: Callable[..., None]) -> None:
    """SIGKILL the node right after it handed the grading job to Redis (no worker yet): the
    restarted node publishes its QUEUED jobs again, the worker grades the study once and drops
    the second message."""
    node, url = production()
    assert store(node.port, sorted(phantom_study.rglob("*.dcm"))).returncode == 0
    study = watch(url, study_uid(phantom_study))
    wait_for(lambda: [j["state"] for j in study.show()["jobs"]] == ["QUEUED"], 60, "the job to be handed to the broker")
    node.kill()
    node.start()
    wait_for(lambda: events(study.show(), "job-republished"), 30, "the restarted node to publish the job again")
    worker = workers(node)
    shown = study.wait_state("GRADED", "DELIVERED", "FAILED", timeout=240)
    assert shown["state"] == "GRADED", shown["timeline"]
    dropped = wait_for(lambda: worker.log.read_text().count("message dropped"), 60, "the second message to be dropped")
    results = holdings(node).results()
    assert results == 1 and shown["jobs"][0]["attempts"] == 1
    figure("node SIGKILL during dispatch (job in the broker)", republished=len(events(shown, "job-republished")),
           messages_dropped=dropped, grade_attempts=shown["jobs"][0]["attempts"], results=results, final_state=shown["state"])


def test_redis_restarted_empty_with_a_job_queued(production: Callable[..., tuple[NodeProcess, str]],
                                                 redis_server: RedisServer, workers: Callable[[NodeProcess], WorkerProcess],
                                                 phantom_study: Path, watch: Any, figure: Callable[..., None]) -> None:
    """Redis (no persistence) restarts while a grading job waits in it: the message is gone; the
    node sees the new server and publishes its QUEUED jobs again at once (not after the
    visibility timeout), and a worker started afterwards grades the study once."""
    node, url = production()
    assert store(node.port, sorted(phantom_study.rglob("*.dcm"))).returncode == 0
    study = watch(url, study_uid(phantom_study))
    wait_for(lambda: [j["state"] for j in study.show()["jobs"]] == ["QUEUED"], 60, "the job to be handed to the broker")
    waiting = redis.Redis(port=redis_server.port).llen("grade")
    redis_server.stop()
    redis_server.start()
    assert waiting == 1 and redis.Redis(port=redis_server.port).llen("grade") == 0  # the message is gone
    wait_for(lambda: events(study.show(), "job-republished"), 30, "the node to publish the job again")
    wait_for(lambda: [j["state"] for j in study.show()["jobs"]] == ["QUEUED"], 30, "the job to be queued again")
    workers(node)
    shown = study.wait_state("GRADED", "DELIVERED", "FAILED", timeout=240)
    assert shown["state"] == "GRADED", shown["timeline"]
    assert "the broker restarted" in events(shown, "job-republished")[0]["message"]
    figure("Redis restarted empty with a job queued", messages_lost=waiting, republished=len(events(shown, "job-republished")),
           results=holdings(node).results(), final_state=shown["state"])


class SlowPacs:
    """A PACS (pynetdicom SCP) that takes the first result object and then holds the second
    C-STORE unanswered until :attr:`release` is set: a delivery caught in the middle."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self.release = threading.Event()
        self.holding = threading.Event()
        ae = AE(ae_title="SLOWPACS")
        for context in (COMPREHENSIVE_3D_SR, ComprehensiveSRStorage, GrayscaleSoftcopyPresentationStateStorage,
                        SecondaryCaptureImageStorage):
            ae.add_supported_context(context)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        if len(self.received) == 2:
            self.holding.set()
            self.release.wait(120)
        return 0x0000

    def destination(self) -> dict[str, Any]:
        return {"ae_title": "SLOWPACS", "host": "127.0.0.1", "port": self.port, "confirm": False}

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


def test_worker_killed_during_delivery(production: Callable[..., tuple[NodeProcess, str]],
                                       workers: Callable[[NodeProcess], WorkerProcess], phantom_study: Path,
                                       watch: Any, figure: Callable[..., None]) -> None:
    """SIGKILL the worker while the PACS holds its second C-STORE: the delivery job's lease lapses,
    a second worker sends every object not yet acknowledged, and the PACS ends up with every
    result object; the study is graded once."""
    pacs = SlowPacs()
    try:
        node, url = production(destinations=[pacs.destination()], delivery_retry_s=1.0)
        first = workers(node)
        assert store(node.port, sorted(phantom_study.rglob("*.dcm"))).returncode == 0
        study = watch(url, study_uid(phantom_study))
        assert pacs.holding.wait(240), "the worker to start delivering"
        first.kill()
        pacs.release.set()
        workers(node)
        shown = study.wait_state("DELIVERED", "FAILED", timeout=180)
        assert shown["state"] == "DELIVERED", shown["timeline"]
        made = {d["sop_instance_uid"] for d in shown["deliveries"]}
        assert set(pacs.received) == made and all(d["state"] == "SENT" for d in shown["deliveries"])
        deliver = [j for j in shown["jobs"] if j["kind"] == "deliver"]
        assert len(deliver) == 1 and deliver[0]["attempts"] == 2 and holdings(node).results() == 1
        figure("worker SIGKILL during delivery", objects_made=len(made), objects_in_pacs=len(set(pacs.received)),
               sent_twice=len(pacs.received) - len(set(pacs.received)), delivery_attempts=deliver[0]["attempts"],
               results=holdings(node).results(), final_state=shown["state"])
    finally:
        pacs.close()
