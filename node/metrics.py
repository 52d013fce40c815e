"""Prometheus metrics of the node and its workers, and the HTTP endpoint that serves them with a
health check (``/metrics``, ``/healthz``).

Two kinds of metric:

- **Counted where things happen**, in whichever process does them: instances received, refused
  instances and associations (node.scp), stage durations and job latency (worker.grading,
  worker.delivery), job runs and the models a process loaded (worker.tasks), delivery attempts
  (worker.delivery). They are defined here so the node and the workers share one vocabulary,
  and ``node`` never imports ``models``.
- **Read from the database at scrape time** (:class:`DatabaseCollector`): studies by state, jobs
  by kind and state, queue depth, deliveries by state (DEAD: dead letters), the newest result's
  model. They are right whichever process or host changed the rows; only the node serves them.

Several processes, one endpoint. ``spine-node serve`` may receive in child processes
(``receivers`` > 1) and ``spine-node worker`` runs its tasks in Celery's pool processes. The
process that serves creates an :class:`Exposition` before anything is counted: from then on
every value counted in it, or in any process it starts (spawned or forked), lives in a file per
process in a fresh directory, and ``/metrics`` sums them (prometheus_client's multiprocess
mode). Hence every metric here has labels: a labelled metric makes its values on first use,
never at import, so none is made before the switch.

No metric and no label carries a patient-identifying value; labels come from small fixed sets
(states, stages, statuses, transfer syntaxes, configured peers).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine, func, select, text

from node.schema import Delivery, DeliveryState, Job, JobKind, JobState, Result, Study, StudyState

LOGGER = logging.getLogger(__name__)

#: prometheus_client's switch to multiprocess mode; processes started later inherit it.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds; a pipeline stage takes from milliseconds (series) to minutes (a large study on CPU).
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Seconds; a job waits for a worker, may retry with backoff (deliveries: up to hours).
JOB_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


class Refusal(str, enum.Enum):
    """Why an association was refused (label ``reason``)."""

    CALLED_AE_TITLE = "called_ae_title"  # the caller asked for another AE title than ours
    CALLER_NOT_ALLOWED = "caller_not_allowed"  # calling AE title or host not on allowed_callers
    TOO_MANY_ASSOCIATIONS = "too_many_associations"  # max_associations reached in the receiving process
    TLS_HANDSHAKE = "tls_handshake"  # the TLS handshake failed (no or wrong client certificate, plain TCP)
    OTHER = "other"


INSTANCES_RECEIVED = Counter(
    "spine_node_instances_received", "Instances stored and acknowledged (duplicates not counted).", ["transfer_syntax"])
DUPLICATE_INSTANCES = Counter(
    "spine_node_duplicate_instances", "Instances acknowledged without storing: the SOP Instance UID was already held.",
    ["transfer_syntax"])
RECEIVED_BYTES = Counter(
    "spine_node_received_bytes", "Bytes of the instances stored (as written: preamble, file meta, dataset).",
    ["transfer_syntax"])
INSTANCES_REFUSED = Counter(
    "spine_node_instances_refused", "C-STORE requests answered with a failure status.", ["status"])
ASSOCIATIONS_REFUSED = Counter(
    "spine_node_associations_refused", "Associations refused, by reason.", ["reason"])
STAGE_SECONDS = Histogram(
    "spine_node_stage_duration_seconds", "Duration of each grading stage that succeeded.", ["stage"], buckets=STAGE_BUCKETS)
JOB_LATENCY = Histogram(
    "spine_node_job_latency_seconds",
    "From a job row being written (study READY, result stored) to the job finishing successfully: waiting, retries, work.",
    ["kind"], buckets=JOB_BUCKETS)
JOB_RUNS = Counter(
    "spine_node_job_runs", "Job runs claimed by a worker, by how they ended: done, waiting (a delivery until its next "
    "attempt), pending (an error, retried later), failed, lost (lease lost), cancelled.", ["kind", "outcome"])
DELIVERY_ATTEMPTS = Counter(
    "spine_node_delivery_attempts", "C-STORE attempts of one result object at one peer: sent, fallback (sent as the "
    "Comprehensive SR twin), failed (retried later), alternate (attempts used up, moved to the alternate), dead.",
    ["peer", "outcome"])
MODEL_INFO = Gauge(
    "spine_node_model_info", "Models loaded by a grading process (value 1).",
    ["name", "version", "detector_sha256", "grader_sha256", "device"], multiprocess_mode="max")


def refuse_association(reason: Refusal) -> None:
    """Count one refused association."""
    ASSOCIATIONS_REFUSED.labels(reason=reason.value).inc()


#: Check name -> "ok", or one line saying what is wrong.
Health = Callable[[], dict[str, str]]


class Exposition:
    """``/metrics`` and ``/healthz`` of one serving process, summing the metrics of every process
    it starts.

    Create it before anything is counted in this process (the constructor switches
    prometheus_client to multiprocess mode with a fresh directory); :meth:`serve` then starts
    the HTTP server once the health check has what it needs; :meth:`close` stops it and removes
    the directory.
    """

    def __init__(self) -> None:
        _sweep_stale(Path(tempfile.gettempdir()))
        self.directory = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
        os.environ[MULTIPROC_ENV] = str(self.directory)
        values.ValueClass = values.MultiProcessValue()  # type: ignore[misc]  # what the env var selects at import
        self.server: MetricsServer | None = None

    def serve(self, host: str, port: int, health: Health, collectors: Sequence[Collector] = ()) -> MetricsServer:
        """Start the HTTP server on ``host:port`` (0: a free port) with ``collectors`` beside the
        processes' metrics."""
        registry = CollectorRegistry()
        SettledFilesCollector(registry, path=str(self.directory))
        for collector in collectors:
            registry.register(collector)
        self.server = MetricsServer(host, port, registry, health)
        return self.server

    def process_ended(self, pid: int) -> None:
        """A process that counted has ended: its counts stay, its live gauges go."""
        mark_process_dead(pid, str(self.directory))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        shutil.rmtree(self.directory, ignore_errors=True)


_PREFIX = "spine-node-metrics-"


def _sweep_stale(parent: Path) -> None:
    """Remove the metrics directories of serving processes that are gone (killed, so they could
    not remove their own)."""
    for directory in parent.glob(f"{_PREFIX}*-*"):
        pid = directory.name[len(_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(directory, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class SettledFilesCollector(MultiProcessCollector):
    """prometheus_client's multi-process collector, minus the value files another process has
    created but not yet sized: prometheus_client reads such an empty file as a struct.error, and
    a scrape racing a process's first metric would answer 500."""

    def collect(self) -> Iterable[Metric]:
        """Merge every value file that has its header."""
        return self.merge([str(f) for f in Path(self._path).glob("*.db") if _sized(f)], accumulate=True)


def _sized(path: Path) -> bool:
    """True if the file exists and is not empty (it may vanish: a dead process's files are removed)."""
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


class MetricsServer:
    """A small threaded HTTP server: ``GET /metrics`` (Prometheus text format) and
    ``GET /healthz`` (200 or 503 with a JSON body naming each check)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        self.httpd = _HTTPServer((host, port), registry, health)
        threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True).start()
        LOGGER.info("metrics on http://%s:%d/metrics, health on /healthz", host, self.port)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, health: Health) -> None:
        super().__init__(address, _Handler)
        self.registry, self.health = registry, health


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = urlsplit(self.path).path
        if path == "/metrics":
            try:
                body = generate_latest(self.server.registry)
            except Exception:  # noqa: BLE001 - a scrape must answer, not drop the connection
                LOGGER.exception("metrics could not be collected")
                self._reply(500, "text/plain; charset=utf-8", b"metrics could not be collected\n")
                return
            self._reply(200, CONTENT_TYPE_LATEST, body)
        elif path == "/healthz":
            checks = self._checks()
            healthy = all(value == "ok" for value in checks.values())
            body = json.dumps({"status": "ok" if healthy else "unhealthy", "checks": checks}).encode()
            self._reply(200 if healthy else 503, "application/json", body)
        else:
            self._reply(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

    def _checks(self) -> dict[str, str]:
        try:
            return self.server.health()
        except Exception as exc:  # noqa: BLE001 - a failing check is an unhealthy answer
            LOGGER.exception("health check failed")
            return {"health_check": problem(exc)}

    def _reply(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        """Requests go to our log at DEBUG, not to stderr."""
        LOGGER.debug("metrics http: " + format, *args)


def problem(exc: BaseException) -> str:
    """One line naming an error, for a health check's answer."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _reading(engine: Engine) -> Connection:
    """A connection that only reads (on SQLite: BEGIN DEFERRED, so no write lock is taken)."""
    return engine.connect().execution_options(sqlite_begin="DEFERRED")


def database_check(engine: Engine) -> str:
    """"ok" if the database answers ``SELECT 1``, else what went wrong."""
    try:
        with _reading(engine) as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means the database does not answer
        return problem(exc)
    return "ok"


class DatabaseCollector(Collector):
    """Gauges read from the database at each scrape, so they hold whichever process or host
    changed the rows: studies by state, jobs by kind and state, queue depth, deliveries by
    state, and the model of the newest result. ``spine_node_database_up`` is 0 when the queries
    failed (and then nothing else is reported)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> Iterable[Metric]:
        """Nothing: registering must not query the database."""
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("spine_node_database_up", "1 if the database answered this scrape's queries.")
        try:
            with _reading(self.engine) as conn:
                families = self._read(conn)
        except Exception as exc:  # noqa: BLE001 - a scrape reports the database down instead of failing
            LOGGER.warning("metrics: the database did not answer: %s", problem(exc))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self, conn: Connection) -> list[Metric]:
        studies = _counts(conn, [Study.state], [(s.value,) for s in StudyState])
        jobs = _counts(conn, [Job.kind, Job.state], [(k.value, s.value) for k in JobKind for s in JobState])
        deliveries = _counts(conn, [Delivery.state], [(s.value,) for s in DeliveryState])
        families: list[Metric] = [
            _gauge("spine_node_studies", "Studies by state.", ["state"], studies),
            _gauge("spine_node_jobs", "Jobs by kind and state.", ["kind", "state"], jobs),
            _gauge("spine_node_queue_depth", "Jobs waiting for a worker (PENDING or QUEUED), by kind.", ["kind"],
                   {(k.value,): jobs.get((k.value, JobState.PENDING.value), 0) + jobs.get((k.value, JobState.QUEUED.value), 0)
                    for k in JobKind}),
            _gauge("spine_node_deliveries", "Result objects at destinations by state (DEAD: dead letters).", ["state"],
                   deliveries),
        ]
        newest = conn.execute(select(Result.model_name, Result.model_version, Result.weights_sha256, Result.payload)
                              .order_by(Result.id.desc()).limit(1)).first()
        if newest is not None:
            detector = str(((newest.payload or {}).get("model") or {}).get("detector_sha256") or "")
            families.append(_gauge("spine_node_newest_result_model_info", "The models of the newest result (value 1).",
                                   ["name", "version", "grader_sha256", "detector_sha256"],
                                   {(newest.model_name, newest.model_version, newest.weights_sha256, detector): 1}))
        return families


def _counts(conn: Connection, columns: list[object], known: list[tuple[str, ...]]) -> dict[tuple[str, ...], int]:
    """Row counts grouped by ``columns``, with a zero for every ``known`` combination."""
    counts = dict.fromkeys(known, 0)
    for *key, count in conn.execute(select(*columns, func.count()).group_by(*columns)):  # type: ignore[call-overload]
        counts[tuple(str(k) for k in key)] = int(count)
    return counts


def _gauge(name: str, documentation: str, labels: list[str], samples: dict[tuple[str, ...], int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for key, value in samples.items():
        family.add_metric(list(key), value)
    return family
