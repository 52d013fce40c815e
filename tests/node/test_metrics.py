"""Metrics and health, scraped over HTTP as Prometheus and the compose health checks do: a node
grading in embedded mode, a node receiving in two processes, a real Celery worker; and the
server and collectors on their own."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from models.data.phantom import generate
from node.admin import show_study
from node.db import make_engine, make_sessionmaker, migrate
from node.metrics import DatabaseCollector, MetricsServer, SettledFilesCollector
from node.schema import Instance
from node.service import NodeHealth
from tests.support.dicomgen import make_study
from tests.support.services import NodeProcess, RedisServer, WorkerProcess, echo, free_port, send_raw, store, wait_for

STAGES = ["series", "models", "read", "volumes", "detect", "extract", "grade", "report", "store"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One phantom study (all four roles, one axial stack)."""
    return generate(tmp_path_factory.mktemp("phantom"), 1, 4711, progress=False, axial="single")[0]


def scrape(port: int) -> list[Sample]:
    """Every sample ``/metrics`` answers, parsed as Prometheus parses it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def named(samples: list[Sample], name: str) -> list[Sample]:
    return [s for s in samples if s.name == name]


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    """``/healthz``: the status code and the JSON body; 0 while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return 0, {}
        raise


def study_uid(study: Path) -> str:
    return str(json.loads((study / "truth.json").read_text())["study_instance_uid"])


class Watch:
    """A study's ``show`` document, read from the node's database."""

    def __init__(self, database_url: str, uid: str) -> None:
        self.engine = make_engine(database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.uid = uid

    def show(self) -> dict[str, Any] | None:
        try:
            return show_study(self.sessions, self.uid)
        except LookupError:
            return None

    def until(self, condition: Callable[[dict[str, Any]], bool], what: str, timeout: float = 180.0) -> dict[str, Any]:
        return wait_for(lambda: (shown := self.show()) is not None and condition(shown) and shown, timeout, what)

    def stored_bytes(self) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.sum(Instance.size_bytes))) or 0)


@pytest.fixture
def watches() -> Iterator[Callable[[str, str], Watch]]:
    made: list[Watch] = []

    def make(database_url: str, uid: str) -> Watch:
        made.append(Watch(database_url, uid))
        return made[-1]

    yield make
    for watch in made:
        watch.engine.dispose()


def test_an_embedded_node_counts_what_it_receives_refuses_and_grades(
        node_factory: Callable[..., NodeProcess], sqlite_url: str, phantom: Path, tmp_path: Path,
        watches: Callable[[str, str], Watch]) -> None:
    """A study over storescu, graded in-process: instances and bytes as sent, the study GRADED,
    one observation per stage, the jobs done, the models named; then refusals of each kind are
    counted by reason or status, a duplicate as a duplicate; /healthz answers 200."""
    port = free_port()
    node = node_factory(sqlite_url, broker_url="", metrics_port=port, quiet_period_s=0.5,
                        allowed_callers=[{"ae_title": "STORESCU"}, {"ae_title": "ECHOSCU"}, {"ae_title": "RAWSENDER"}])
    assert healthz(port) == (200, {"status": "ok", "checks": {"database": "ok", "loop": "ok", "receivers": "ok"}})
    files = sorted(phantom.rglob("*.dcm"))
    assert store(node.port, files).returncode == 0
    watch = watches(sqlite_url, study_uid(phantom))
    shown = watch.until(lambda s: [j["state"] for j in s["jobs"]] == ["DONE", "DONE"], "grading and delivery")
    assert shown["state"] == "GRADED"

    samples = scrape(port)
    assert total(samples, "spine_node_instances_received_total") == len(files)
    assert total(samples, "spine_node_received_bytes_total") == watch.stored_bytes() > sum(p.stat().st_size for p in files) // 2
    assert total(samples, "spine_node_studies", state="GRADED") == 1
    assert total(samples, "spine_node_studies") == 1
    for stage in STAGES:
        assert total(samples, "spine_node_stage_duration_seconds_count", stage=stage) == 1, stage
    assert total(samples, "spine_node_stage_duration_seconds_sum", stage="grade") > 0
    assert total(samples, "spine_node_job_runs_total", kind="grade", outcome="done") == 1
    assert total(samples, "spine_node_job_runs_total", kind="deliver", outcome="done") == 1
    assert total(samples, "spine_node_job_latency_seconds_count", kind="grade") == 1
    assert total(samples, "spine_node_queue_depth") == 0
    assert total(samples, "spine_node_jobs", kind="grade", state="DONE") == 1
    model = shown["result"]["model"]
    [loaded] = named(samples, "spine_node_model_info")
    assert loaded.value == 1 and loaded.labels["grader_sha256"] == model["weights_sha256"]
    assert loaded.labels["detector_sha256"] == model["detector_sha256"] and loaded.labels["version"] == model["version"]
    [newest] = named(samples, "spine_node_newest_result_model_info")
    assert newest.labels == {"name": model["name"], "version": model["version"], "grader_sha256": model["weights_sha256"],
                             "detector_sha256": model["detector_sha256"]}
    assert total(samples, "spine_node_associations_refused_total") == 0

    assert echo(node.port, called="WRONG").returncode != 0
    assert echo(node.port, calling="INTRUDER").returncode != 0
    bad = make_study(tmp_path / "bad", roles=("T2_AX",), slices=1)
    ds = pydicom.dcmread(bad.files[0])
    del ds.SOPInstanceUID
    ds.save_as(bad.files[0])
    assert send_raw(node.port, bad.files[0]) == 0xA900
    assert store(node.port, files[:1]).returncode == 0
    # pynetdicom's own rejections are counted just after the reject is sent: the sender may be done first
    samples = wait_for(lambda: total(s := scrape(port), "spine_node_associations_refused_total") >= 2 and s, 10, "the refusals")
    assert total(samples, "spine_node_associations_refused_total", reason="called_ae_title") == 1
    assert total(samples, "spine_node_associations_refused_total", reason="caller_not_allowed") == 1
    assert total(samples, "spine_node_associations_refused_total") == 2  # each counted once
    assert total(samples, "spine_node_instances_refused_total", status="0xA900") == 1
    assert total(samples, "spine_node_duplicate_instances_total") == 1
    assert total(samples, "spine_node_instances_received_total") == len(files)
    assert healthz(port)[0] == 200


def test_instances_received_by_two_processes_are_counted_once_each(
        node_factory: Callable[..., NodeProcess], sqlite_url: str, tmp_path: Path) -> None:
    """``receivers = 2``: four senders at once, handed to both receiving processes; the node's
    /metrics sums what each counted, and the database gauges show four READY studies waiting."""
    port = free_port()
    for i in range(4):
        make_study(tmp_path / f"study{i}", slices=4)
    node = node_factory(sqlite_url, receivers=2, metrics_port=port, quiet_period_s=0.2)
    senders = [subprocess.Popen(["/usr/bin/storescu", "-R", "+sd", "+r", "-aec", "SPINENODE", "127.0.0.1", str(node.port),
                                 str(tmp_path / f"study{i}")], stderr=subprocess.PIPE, text=True) for i in range(4)]
    assert all(p.wait(120) == 0 for p in senders)
    log = node.log.read_text()
    assert min(log.count(f"handed to receiver-{i}") for i in (1, 2)) >= 2  # both processes received

    samples = scrape(port)
    stored = sorted(p for p in (node.workdir / "storage").rglob("*.dcm") if ".incoming" not in p.parts)
    assert total(samples, "spine_node_instances_received_total", transfer_syntax="ExplicitVRLittleEndian") == len(stored) == 48
    assert total(samples, "spine_node_received_bytes_total") == sum(p.stat().st_size for p in stored)
    samples = wait_for(lambda: total(s := scrape(port), "spine_node_studies", state="READY") == 4 and s, 30, "four READY studies")
    assert total(samples, "spine_node_queue_depth", kind="grade") == 4  # no broker: the jobs wait in the outbox
    assert total(samples, "spine_node_jobs", kind="grade", state="PENDING") == 4
    assert healthz(port) == (200, {"status": "ok", "checks": {"database": "ok", "loop": "ok", "receivers": "ok"}})


def test_an_association_over_the_limit_is_counted(node_factory: Callable[..., NodeProcess], sqlite_url: str) -> None:
    """``max_associations = 1``: while one association is open, the next is refused and counted."""
    port = free_port()
    node = node_factory(sqlite_url, max_associations=1, metrics_port=port)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title="SPINENODE")
    assert held.is_established
    try:
        assert echo(node.port).returncode != 0
    finally:
        held.release()
    refused = wait_for(lambda: total(scrape(port), "spine_node_associations_refused_total", reason="too_many_associations"),
                       10, "the refusal to be counted")
    assert refused == 1 and total(scrape(port), "spine_node_associations_refused_total") == 1


@pytest.mark.parametrize("receivers", [1, 2])
def test_failed_tls_handshakes_are_counted(node_factory: Callable[..., NodeProcess], sqlite_url: str, tmp_path: Path,
                                           receivers: int) -> None:
    """A node that speaks only TLS: a plain echo is refused and counted as a TLS handshake."""
    key, cert = tmp_path / "node.key", tmp_path / "node.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=spine-node-test"], check=True, capture_output=True)
    port = free_port()
    node = node_factory(sqlite_url, echo_extra=["+tls", str(key), str(cert), "+cf", str(cert)], receivers=receivers,
                        metrics_port=port, tls={"cert_file": str(cert), "key_file": str(key)})
    assert echo(node.port).returncode != 0
    refused = wait_for(lambda: total(scrape(port), "spine_node_associations_refused_total", reason="tls_handshake"), 10,
                       "the refusal to be counted")
    assert refused == 1


@pytest.mark.postgres
def test_a_worker_serves_what_its_pool_processes_counted_and_its_health(
        node_factory: Callable[..., NodeProcess], postgres: Any, phantom: Path, tmp_path: Path,
        watches: Callable[[str, str], Watch]) -> None:
    """``spine-node worker`` with ``worker_metrics_port``: /healthz 200 once it consumes, the
    stages and jobs its (forked) pool process ran, the models it loaded; 503 naming the broker
    while Redis is away, 200 again when it is back. Its log is JSON lines (but for the notice
    Celery itself prints when told to stop)."""
    redis = RedisServer().start()
    worker: WorkerProcess | None = None
    try:
        url = postgres.create_database()
        port = free_port()
        node = node_factory(url, broker_url=redis.url, quiet_period_s=0.5, worker_metrics_port=port, log_format="json")
        worker = WorkerProcess(node.config, tmp_path / "worker.log").start()
        wait_for(lambda: healthz(port)[0] == 200, 120, "the worker to be healthy")
        assert healthz(port)[1]["checks"] == {"database": "ok", "broker": "ok"}
        assert store(node.port, sorted(phantom.rglob("*.dcm"))).returncode == 0
        watch = watches(url, study_uid(phantom))
        shown = watch.until(lambda s: [j["state"] for j in s["jobs"]] == ["DONE", "DONE"], "grading and delivery", 240)
        assert shown["state"] == "GRADED"

        samples = scrape(port)
        for stage in STAGES:
            assert total(samples, "spine_node_stage_duration_seconds_count", stage=stage) == 1, stage
        assert total(samples, "spine_node_job_runs_total", kind="grade", outcome="done") == 1
        assert total(samples, "spine_node_job_runs_total", kind="deliver", outcome="done") == 1
        [loaded] = named(samples, "spine_node_model_info")
        assert loaded.labels["grader_sha256"] == shown["result"]["model"]["weights_sha256"]
        assert named(samples, "spine_node_studies") == []  # the database's gauges are the node's to serve

        redis.stop()
        code, body = wait_for(lambda: (h := healthz(port))[0] == 503 and h, 60, "the worker to report the broker gone")
        assert body["status"] == "unhealthy" and body["checks"]["broker"] != "ok" and body["checks"]["database"] == "ok"
        redis.start()
        wait_for(lambda: healthz(port)[0] == 200, 120, "the worker to reconnect")
    finally:
        if worker is not None:
            worker.stop()
        redis.close()
    lines = (tmp_path / "worker.log").read_text().splitlines()
    celery_says = {"", "worker: Warm shutdown (MainProcess)"}  # Celery writes this to stdout itself on SIGTERM
    assert len(lines) > 10 and all(isinstance(json.loads(line), dict) for line in lines if line not in celery_says)


def test_healthz_answers_503_naming_what_is_wrong(tmp_path: Path) -> None:
    """The node's checks through the real server: the loop not started, then healthy, then a
    database that does not answer; an unknown path is 404."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    migrate(url)
    health = NodeHealth(make_engine(url))
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), health)
    try:
        assert healthz(server.port) == (503, {"status": "unhealthy",
                                              "checks": {"database": "ok", "loop": "not started", "receivers": "ok"}})
        health.beat()
        assert healthz(server.port)[0] == 200
        health.engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone")
        code, body = healthz(server.port)
        assert code == 503 and body["checks"]["database"].startswith("OperationalError")
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/nothing", timeout=10)
        assert missing.value.code == 404
    finally:
        server.close()


def test_the_database_gauges_say_when_the_database_is_down(tmp_path: Path) -> None:
    """A scrape still answers when the database does not: ``spine_node_database_up`` 0."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone")))
    samples = [s for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples]
    assert [(s.name, s.value) for s in samples] == [("spine_node_database_up", 0.0)]


def test_every_process_metric_has_labels() -> None:
    """Multiprocess mode is switched on at start, after ``node.metrics`` is imported: a metric
    without labels would make its value at import, in this process's memory, and never be
    served. So importing the module makes no sample at all."""
    code = ("import node.metrics, prometheus_client as p; "
            "print(sum(len(f.samples) for f in p.REGISTRY.collect() if f.name.startswith('spine_node')), "
            "sum(1 for f in p.REGISTRY.collect() if f.name.startswith('spine_node')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    samples, families = map(int, done.stdout.split())
    assert samples == 0 and families >= 9


def test_a_value_file_not_yet_sized_does_not_fail_the_scrape(tmp_path: Path) -> None:
    """A process that has just created its value file (still empty) while a scrape reads the
    directory: prometheus_client's own collector fails on it, ours leaves it for the next scrape."""
    (tmp_path / "counter_4242.db").touch()
    plain = CollectorRegistry()
    MultiProcessCollector(plain, path=str(tmp_path))
    with pytest.raises(Exception, match="unpack"):
        generate_latest(plain)
    settled = CollectorRegistry()
    SettledFilesCollector(settled, path=str(tmp_path))
    assert generate_latest(settled) == b""
