"""Soak: many senders for a fixed time; nothing lost, each study graded once and delivered, resources flat.

Run it from the repository root::

    .venv/bin/python -m bench.soak --minutes 10                # or: make soak
    .venv/bin/python -m bench.soak --seconds 30 --senders 2 --json bench/out/soak.json
    .venv/bin/python -m bench.soak --minutes 10 --embedded     # SQLite, grading in the node's process

The production shape, started by the script on this machine: a scratch PostgreSQL cluster
(fsync on), a fresh redis-server, ``spine-node serve`` (``receivers`` = 2, ``quiet_period_s`` =
2 s) publishing jobs to it, one ``spine-node worker`` (Celery, one pool process) grading and
delivering, and Orthanc as the PACS the results go to (C-STORE, confirmed by C-FIND).
``--embedded``: the node alone on SQLite, grading in its own process.

Load: ``--senders`` threads, each sending one study per run of dcmtk's storescu (``-R``,
TCP_NODELAY, one association per study). Every study is a copy of one of four phantom studies
(about 85 instances, 16 MB; rendered once into bench/out/latency) with fresh Study, Series and
SOP Instance UIDs. So that grading keeps up on 2 CPUs, a sender starts a study only while fewer
than ``--backlog`` studies (2 x senders by default) are open, sent but not yet delivered; once
the backlog is full the senders wait until it is down to ``backlog - senders`` and start
together: waves of ``--senders`` associations at once, arriving while the studies before them
are graded and delivered. A warm-up study goes first, alone (the worker loads its models), and
is checked like the others but left out of the rates, the latencies and the resource baseline.

After ``--minutes`` no new study starts; the script waits (with a deadline) until every study
is delivered or failed, then checks and prints:

- instances: acknowledged (storescu's verbose log: a Success or Warning response to the file),
  indexed (an ``instances`` row with that SOP Instance UID), on disk (the file the row names,
  with the row's size); lost = acknowledged but not indexed and on disk. Must be 0.
- studies: sent, graded exactly once (one ``results`` row), delivered (state DELIVERED and the
  result's SR among the study's instances in Orthanc, asked over its REST API), failed.
- load: the most associations open at one instant (storescu runs overlapping).
- rates: instances/s = acknowledged instances over the sending period (pauses included: the rate
  the whole system sustains, not the ingest ceiling of bench-ingest); studies/h = studies
  delivered over the first send to the last SR delivered.
- latency: p50 and p95 from a study's last acknowledged instance (its newest
  ``instances.received_at``) to its SR delivered (the SR's ``deliveries`` row turning SENT,
  ``updated_at``). It includes the quiet period, the wait behind up to ``--backlog`` studies
  and, the one worker taking both queues, the delivery's wait behind grade tasks already
  queued: it is not the one-study latency of bench-latency.
- resources: RSS (summed) and open file descriptors of the node and of the worker, each with
  all its descendants (receivers, Celery pool), sampled every 2 s: start, middle and end of the
  sending period, and the growth over its second half (least-squares slope x that half's
  length); the JSON keeps every sample as [seconds, processes, RSS bytes, fds]. Flat: RSS
  growth under 10 % and under 5 fds. By the middle the models are loaded and the connection
  pools and allocator arenas warm, so what still grows is a leak. 10 % leaves room for the
  allocator's ups and downs between studies of different sizes, yet of the worker's 1.8 GB over
  the ~45 studies of a 10-minute run's second half it is 4 MB a study, less than one series'
  volume kept by mistake; one fd leaked per study or association would add tens, while the
  associations open at a sampling instant come and go (the fit runs over every sample).

Exit status 1 on any lost or refused instance, a study not graded exactly once or not
delivered, or growth above the bounds; the working folder (node and worker logs, stored
instances, the SQLite database of --embedded) is then kept and named. The last line says what
share of the CPUs' time other processes took meanwhile: a busy machine's rates are not
comparable.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from bench.common import busy_cpu_s, interrupt, render, rounded
from bench.study import Template, stamp_copy
from node.db import make_engine, make_sessionmaker, reading
from node.schema import Delivery, DeliveryState, Instance, Result, ResultObject, Study, StudyState
from tests.support.orthanc import OrthancServer
from tests.support.services import NodeProcess, PostgresCluster, RedisServer, WorkerProcess, store

OUT_DIR = Path(__file__).resolve().parent / "out" / "soak"
TEMPLATES = 4
QUIET_S = 2.0
RECEIVERS = 2
SAMPLE_S = 2.0
RSS_BOUND = 0.10  # growth over the second half, as a share of the middle sample
FDS_BOUND = 5
CLOSED = (StudyState.DELIVERED.value, StudyState.FAILED.value, StudyState.INCOMPLETE.value)
ACKED = ("Success", "Warning")


@dataclass(frozen=True)
class SentStudy:
    """One study as a sender sent it: which SOP Instance UIDs were acknowledged, and when."""

    study_uid: str
    acknowledged: list[str]
    refused: int
    started: float  # time.time()
    ended: float
    warmup: bool = False
    error: str | None = None


@dataclass(frozen=True)
class Sample:
    """A process tree at one instant: processes, summed RSS (bytes) and open file descriptors."""

    at: float  # seconds since the sending period began
    processes: int
    rss: int
    fds: int


@dataclass
class Gate:
    """Lets senders start studies while fewer than ``high`` are open, then again from ``low`` on.

    ``closed`` (delivered or failed) comes from the node's database; the hysteresis makes the
    senders start together, so ``senders`` associations are open at once in every wave.
    """

    low: int
    high: int
    started: int = 0
    closed: int = 0
    stopped: bool = False
    is_open: bool = True
    cond: threading.Condition = field(default_factory=threading.Condition)

    def enter(self) -> bool:
        """Wait for room; True to send one more study, False once the soak stops."""
        with self.cond:
            self.cond.wait_for(lambda: self.stopped or (self.is_open and self.started - self.closed < self.high))
            if self.stopped:
                return False
            self.started += 1
            self.is_open = self.started - self.closed < self.high
            return True

    def update(self, closed: int) -> None:
        """Studies delivered or failed so far; reopens the gate at ``low`` open studies."""
        with self.cond:
            self.closed = closed
            if self.started - closed <= self.low:
                self.is_open = True
            self.cond.notify_all()

    def stop(self) -> None:
        """No sender starts another study."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


@dataclass
class Shape:
    """The services under test and what the checks need of them."""

    node: NodeProcess
    worker: WorkerProcess | None
    orthanc: OrthancServer
    sessions: sessionmaker[Session]
    postmaster: int | None  # PostgreSQL's main process, whose CPU is ours, not another user's

    def children(self) -> dict[str, NodeProcess | WorkerProcess]:
        """The processes whose resources are watched, by name."""
        return {"node": self.node, **({"worker": self.worker} if self.worker else {})}


def acknowledged(log: str) -> set[str]:
    """The files storescu's verbose log shows a Success or Warning response to."""
    done, current = set(), None
    for line in log.splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ")
        elif line.startswith("I: Received Store Response (") and current is not None:
            if line.removeprefix("I: Received Store Response (").startswith(ACKED):
                done.add(current)
            current = None
    return done


def send_study(port: int, template: Template, dest: Path, calling: str, warmup: bool = False) -> SentStudy:
    """A fresh-UID copy of ``template`` sent over one association; what was acknowledged."""
    study_uid, paths = stamp_copy(template, dest)
    sops = {str(p): str(dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID) for p in paths}
    started = time.time()
    try:
        result = store(port, paths, calling=calling, extra=["-v"])
        log, error = result.stdout + result.stderr, None if result.returncode == 0 else f"storescu exited {result.returncode}"
    except subprocess.TimeoutExpired as exc:  # what it logged before it was killed still counts
        log, error = _text(exc.stdout) + _text(exc.stderr), f"storescu still sending after {exc.timeout:.0f} s"
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    acked = [sops[p] for p in sorted(acknowledged(log))]
    return SentStudy(study_uid, acked, len(paths) - len(acked), started, time.time(), warmup, error)


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def sender(index: int, port: int, templates: list[Template], gate: Gate, workdir: Path, sent: list[SentStudy]) -> None:
    """One sending PACS: a study per association for as long as the gate lets it."""
    count = 0
    while gate.enter():
        template = templates[(index + count) % len(templates)]
        sent.append(send_study(port, template, workdir / f"send-{index}-{count}", f"SENDER{index}"))
        count += 1


def proc_stats() -> dict[int, list[str]]:
    """Every process's /proc/PID/stat fields after the command name (index 1: ppid, 11-14: CPU ticks, 21: RSS pages)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
    return stats


def tree(stats: dict[int, list[str]], root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return [pid for pid in found if pid in stats]


def open_fds(pid: int) -> int:
    """Open file descriptors of one process (0 if it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return 0


def sample(root: int, at: float) -> Sample:
    """The tree of ``root`` now: its processes, their summed RSS and open fds."""
    stats = proc_stats()
    pids = tree(stats, root)
    rss = sum(int(stats[pid][21]) for pid in pids) * os.sysconf("SC_PAGE_SIZE")
    return Sample(at, len(pids), rss, sum(open_fds(pid) for pid in pids))


def tree_cpu_s(roots: Iterable[int]) -> float:
    """CPU-seconds of these processes, their live descendants and every child they waited for."""
    stats = proc_stats()
    ticks = sum(sum(int(v) for v in stats[pid][11:15]) for root in roots for pid in tree(stats, root))
    return ticks / os.sysconf("SC_CLK_TCK")


def closed_studies(sessions: sessionmaker[Session]) -> int:
    """Studies delivered, failed or incomplete (the node's database holds only this soak's)."""
    with reading(sessions) as session:
        return int(session.scalar(select(func.count(Study.id)).where(Study.state.in_(CLOSED))) or 0)


def check_alive(shape: Shape) -> None:
    """Raise with the log's tail if the node or the worker has exited."""
    for name, child in shape.children().items():
        if child.proc is not None and child.proc.poll() is not None:
            log = child.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the {name} exited with {child.proc.returncode}:\n{log}")


def postmaster_pid(cluster: PostgresCluster) -> int:
    """The PostgreSQL server's main process (first line of postmaster.pid)."""
    return int((cluster.dir / "data" / "postmaster.pid").read_text().split()[0])


def start_shape(workdir: Path, embedded: bool, stack: ExitStack) -> Shape:
    """Orthanc, then PostgreSQL + Redis + node + worker (or the embedded node); all stopped by ``stack``."""
    orthanc = OrthancServer().start()
    stack.callback(orthanc.close)
    destination = {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.port}
    settings: dict[str, Any] = {"quiet_period_s": QUIET_S, "study_timeout_s": 600.0, "receivers": RECEIVERS,
                                "destinations": [destination]}
    postmaster = None
    if embedded:
        database_url, settings["broker_url"] = f"sqlite:///{workdir / 'node.db'}", ""
    else:
        cluster = PostgresCluster(durable=True)
        stack.callback(cluster.stop)
        redis = RedisServer().start()
        stack.callback(redis.close)
        database_url, settings["broker_url"], postmaster = cluster.create_database(), redis.url, postmaster_pid(cluster)
    node = NodeProcess(workdir, database_url, **settings)
    stack.callback(node.stop)
    node.start()
    worker = None
    if not embedded:
        worker = WorkerProcess(node.config, workdir / "worker.log")
        stack.callback(worker.stop)
        worker.start()
    engine = make_engine(database_url)
    stack.callback(engine.dispose)
    return Shape(node, worker, orthanc, make_sessionmaker(engine), postmaster)


@dataclass
class Sampler:
    """The watched process trees (node, worker), sampled from ``began`` on (seconds since the epoch)."""

    shape: Shape
    began: float = field(default_factory=time.time)
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def tick(self) -> None:
        """Take one sample of each tree, failing at once if the node or the worker has exited."""
        check_alive(self.shape)
        for name, child in self.shape.children().items():
            assert child.proc is not None
            self.samples.setdefault(name, []).append(sample(child.proc.pid, time.time() - self.began))


def wait_closed(shape: Shape, count: int, timeout: float, tick: Callable[[], None]) -> bool:
    """Wait until ``count`` studies are delivered or failed, calling ``tick`` every sample; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_alive(shape)
        if closed_studies(shape.sessions) >= count:
            return True
        tick()
        time.sleep(SAMPLE_S)
    return False


def run_senders(sampler: Sampler, templates: list[Template], senders: int, gate: Gate, seconds: float, workdir: Path,
                sent: list[SentStudy]) -> float:
    """``senders`` sending threads for ``seconds``, sampling meanwhile; the sending period (until the last send ended)."""
    shape = sampler.shape
    with ThreadPoolExecutor(senders) as pool:
        running = [pool.submit(sender, i, shape.node.port, templates, gate, workdir, sent) for i in range(senders)]
        while time.time() - sampler.began < seconds:
            sampler.tick()
            gate.update(closed_studies(shape.sessions))
            time.sleep(SAMPLE_S)
        gate.stop()
        stopped = time.time()
        while not all(future.done() for future in running):
            sampler.tick()
            time.sleep(SAMPLE_S)
        for future in running:
            future.result()  # a sender's exception is the soak's
    return max(stopped, *(s.ended for s in sent)) - sampler.began


def soak(shape: Shape, templates: list[Template], senders: int, backlog: int, seconds: float, workdir: Path,
         console: Console) -> tuple[list[SentStudy], dict[str, list[Sample]], float, bool]:
    """The warm-up, ``seconds`` of senders, the drain; what was sent, the samples, the sending period, and if all closed."""
    sent = [send_study(shape.node.port, templates[0], workdir / "send-warmup", "WARMUP", warmup=True)]
    if not wait_closed(shape, 1, 600, lambda: None):
        raise TimeoutError("the warm-up study was not delivered within 10 minutes")
    console.print(f"warm-up study delivered; {senders} senders for {seconds:.0f} s (backlog {backlog})")
    sampler, gate = Sampler(shape), Gate(backlog - senders, backlog, started=1, closed=1)  # the warm-up is closed
    period = run_senders(sampler, templates, senders, gate, seconds, workdir, sent)
    open_now = len(sent) - closed_studies(shape.sessions)
    console.print(f"sending stopped after {period:.0f} s; waiting for {open_now} open studies")
    done = wait_closed(shape, len(sent), 120 + 30 * open_now, sampler.tick)
    return sent, sampler.samples, period, done


@dataclass(frozen=True)
class StudyRow:
    """One study as the node's database holds it at the end."""

    state: str
    results: int
    last_received: dt.datetime | None
    sr_sop: str | None
    sr_delivered: dt.datetime | None


def study_rows(sessions: sessionmaker[Session]) -> dict[str, StudyRow]:
    """Per StudyInstanceUID: state, results, newest instance received, the SR and when it was delivered."""
    with reading(sessions) as session:
        studies = session.execute(select(Study.id, Study.study_instance_uid, Study.state)).all()
        results = dict(session.execute(select(Result.study_id, func.count(Result.id)).group_by(Result.study_id)).all())
        received = dict(session.execute(
            select(Instance.study_id, func.max(Instance.received_at)).group_by(Instance.study_id)).all())
        srs = {row.study_id: row for row in session.execute(
            select(Delivery.study_id, Delivery.sop_instance_uid, Delivery.updated_at)
            .join(ResultObject, ResultObject.sop_instance_uid == Delivery.sop_instance_uid)
            .where(ResultObject.kind == "SR", Delivery.state == DeliveryState.SENT.value))}
    return {uid: StudyRow(state, int(results.get(sid, 0)), received.get(sid),
                          srs[sid].sop_instance_uid if sid in srs else None, srs[sid].updated_at if sid in srs else None)
            for sid, uid, state in studies}


def stored_instances(sessions: sessionmaker[Session], storage: Path) -> tuple[set[str], set[str]]:
    """SOP Instance UIDs indexed, and those whose file is on disk with the row's size."""
    with reading(sessions) as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.path, Instance.size_bytes)).all()
    on_disk = {sop for sop, path, size in rows if (storage / path).is_file() and (storage / path).stat().st_size == size}
    return {sop for sop, _, _ in rows}, on_disk


def in_orthanc(orthanc: OrthancServer, study_uid: str, sop: str) -> bool:
    """True if Orthanc holds the instance ``sop`` under the study (REST: lookup, then the study's instances)."""
    found = [item["ID"] for item in orthanc.rest("/tools/lookup", study_uid.encode()) if item["Type"] == "Study"]
    instances = orthanc.rest(f"/studies/{found[0]}/instances") if found else []
    return any(i["MainDicomTags"].get("SOPInstanceUID") == sop for i in instances)


def peak_associations(sent: list[SentStudy]) -> int:
    """The most studies being sent at one instant (one association each)."""
    edges = sorted((t, step) for s in sent for t, step in ((s.started, 1), (s.ended, -1)))
    return int(max(np.cumsum([step for _, step in edges]), default=0))


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation); NaN for no values."""
    return float(np.percentile(values, q)) if values else float("nan")


def growth(samples: list[Sample], key: str, period: float) -> float:
    """Least-squares slope of ``key`` over the second half of the sending period, times that half's length."""
    half = [s for s in samples if period / 2 <= s.at <= period]
    if len(half) < 3:
        return 0.0
    slope = np.polyfit([s.at for s in half], [getattr(s, key) for s in half], 1)[0]
    return float(slope) * period / 2


def resources(samples: list[Sample], period: float) -> dict[str, Any]:
    """Start, middle and end samples of the sending period, second-half growth, and whether it is flat."""
    during = [s for s in samples if s.at <= period]
    middle = min(during, key=lambda s: abs(s.at - period / 2))
    rss_growth, fds_growth = growth(during, "rss", period), growth(during, "fds", period)
    return {"start": _point(during[0]), "middle": _point(middle), "end": _point(during[-1]),
            "rss_growth_bytes": round(rss_growth), "rss_growth_share": round(rss_growth / middle.rss, 4),
            "fds_growth": round(fds_growth, 2), "flat": rss_growth / middle.rss < RSS_BOUND and fds_growth < FDS_BOUND,
            "samples": [list(_point(s).values()) for s in samples]}


def _point(sample: Sample) -> dict[str, Any]:
    return {**asdict(sample), "at": round(sample.at, 1)}


def instance_figures(shape: Shape, sent: list[SentStudy]) -> dict[str, int]:
    """Instances acknowledged, indexed, on disk, lost (acknowledged, not both) and refused."""
    indexed, on_disk = stored_instances(shape.sessions, shape.node.workdir / "storage")
    acked = [sop for s in sent for sop in s.acknowledged]
    return {"acknowledged": len(acked), "indexed": sum(sop in indexed for sop in acked),
            "on_disk": sum(sop in on_disk for sop in acked), "lost": sum(sop not in indexed or sop not in on_disk for sop in acked),
            "refused": sum(s.refused for s in sent)}


def study_figures(shape: Shape, sent: list[SentStudy]) -> tuple[dict[str, int], list[tuple[dt.datetime, dt.datetime]]]:
    """Studies sent, graded once or more, delivered (SR in Orthanc) and failed; the timed ones'
    (last instance received, SR delivered)."""
    by_uid = study_rows(shape.sessions)
    rows = [(s, by_uid.get(s.study_uid)) for s in sent]
    delivered = [(s, row) for s, row in rows if row is not None and row.state == StudyState.DELIVERED.value
                 and row.sr_sop is not None and in_orthanc(shape.orthanc, s.study_uid, row.sr_sop)]
    timed = [(row.last_received, row.sr_delivered) for s, row in delivered
             if not s.warmup and row.last_received is not None and row.sr_delivered is not None]
    return {"sent": len(sent), "graded_once": sum(row is not None and row.results == 1 for _, row in rows),
            "graded_more": sum(row is not None and row.results > 1 for _, row in rows),
            "not_graded": sum(row is None or row.results == 0 for _, row in rows), "delivered": len(delivered),
            "failed": sum(row is not None and row.state == StudyState.FAILED.value for _, row in rows)}, timed


def check(shape: Shape, sent: list[SentStudy], samples: dict[str, list[Sample]], period: float) -> dict[str, Any]:
    """Every figure of the soak, and the problems that fail it."""
    studies, timed = study_figures(shape, sent)
    latencies = [(sr - ack).total_seconds() for ack, sr in timed]
    first = min(s.started for s in sent if not s.warmup)
    span = max((sr.timestamp() for _, sr in timed), default=first) - first
    figures: dict[str, Any] = {
        "instances": instance_figures(shape, sent), "studies": studies,
        "peak_associations": peak_associations([s for s in sent if not s.warmup]),
        "instances_per_s": sum(len(s.acknowledged) for s in sent if not s.warmup) / period,
        "studies_per_h": 3600 * len(timed) / span if span > 0 else 0.0,
        "ack_to_sr_p50_s": percentile(latencies, 50), "ack_to_sr_p95_s": percentile(latencies, 95),
        "ack_to_sr_max_s": max(latencies, default=float("nan")),
        "resources": {name: resources(s, period) for name, s in samples.items()},
    }
    figures["problems"] = problems(figures, sent)
    return figures


def problems(figures: dict[str, Any], sent: list[SentStudy]) -> list[str]:
    """What fails the soak, in words."""
    found = [f"sender: {s.study_uid}: {s.error}" for s in sent if s.error]
    instances, studies = figures["instances"], figures["studies"]
    if instances["lost"]:
        found.append(f"{instances['lost']} acknowledged instances lost (not indexed or not on disk)")
    if instances["refused"]:
        found.append(f"{instances['refused']} instances not acknowledged")
    if studies["graded_once"] != studies["sent"]:
        found.append(f"{studies['sent'] - studies['graded_once']} studies not graded exactly once "
                     f"({studies['graded_more']} more than once, {studies['not_graded']} not at all)")
    if studies["delivered"] != studies["sent"]:
        found.append(f"{studies['sent'] - studies['delivered']} studies not delivered ({studies['failed']} failed)")
    found += [f"{name}: not flat (RSS {r['rss_growth_share']:+.1%}, fds {r['fds_growth']:+.1f} over the second half)"
              for name, r in figures["resources"].items() if not r["flat"]]
    return found


def report(figures: dict[str, Any], shape_name: str, senders: int, period: float, console: Console) -> None:
    """The checks table, the rates, the resources table and the verdict."""
    i, s = figures["instances"], figures["studies"]
    table = Table("instances acknowledged", "indexed", "on disk", "lost", "refused", "studies sent", "graded once",
                  "graded twice+", "delivered (SR in Orthanc)", "failed",
                  title=f"soak: {shape_name}, {senders} senders, {period:.0f} s")
    table.add_row(*(str(v) for v in (i["acknowledged"], i["indexed"], i["on_disk"], i["lost"], i["refused"], s["sent"],
                                      s["graded_once"], s["graded_more"], s["delivered"], s["failed"])))
    console.print(table)
    console.print(f"associations at once: up to {figures['peak_associations']}   instances/s {figures['instances_per_s']:.1f}   "
                  f"studies/h {figures['studies_per_h']:.0f}   last instance -> SR delivered: "
                  f"p50 {figures['ack_to_sr_p50_s']:.1f} s, p95 {figures['ack_to_sr_p95_s']:.1f} s, "
                  f"max {figures['ack_to_sr_max_s']:.1f} s")
    table = Table("process tree", "processes", "RSS MB start / middle / end", "RSS growth, 2nd half", "fds start / middle / end",
                  "fds growth, 2nd half", f"flat (< {RSS_BOUND:.0%}, < {FDS_BOUND} fds)")
    for name, r in figures["resources"].items():
        points = (r["start"], r["middle"], r["end"])
        table.add_row(name, " / ".join(str(p["processes"]) for p in points),
                      " / ".join(f"{p['rss'] / 2**20:.0f}" for p in points),
                      f"{r['rss_growth_bytes'] / 2**20:+.1f} MB ({r['rss_growth_share']:+.1%})",
                      " / ".join(str(p["fds"]) for p in points), f"{r['fds_growth']:+.1f}",
                      "yes" if r["flat"] else "[red]no[/red]")
    console.print(table)
    for problem in figures["problems"]:
        console.print(f"[red]{problem}[/red]")


def main() -> int:
    """Start the shape, soak it, check and print; exit 1 on any loss, double grading, undelivered study or growth."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long the senders send (default 10)")
    length.add_argument("--seconds", type=float, help="the same in seconds, for short runs")
    parser.add_argument("--senders", type=int, default=8, help="concurrent sending associations")
    parser.add_argument("--backlog", type=int,
                        help="most studies open (sent, not yet delivered) before the senders wait; default 2 x senders")
    parser.add_argument("--embedded", action="store_true", help="the node alone on SQLite, grading in its process")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes if args.minutes is not None else 10)
    backlog = args.backlog if args.backlog is not None else 2 * args.senders
    if args.senders < 1 or backlog < args.senders or seconds <= 0:
        parser.error("need --senders >= 1, --backlog >= --senders and a positive duration")
    signal.signal(signal.SIGTERM, interrupt)
    cpus = sorted(os.sched_getaffinity(0))
    busy_before, wall_before = busy_cpu_s(cpus), time.monotonic()
    templates = [Template(study, sorted(study.rglob("*.dcm"))) for study in render(TEMPLATES)]
    console = Console(width=160)
    shape_name = "embedded (SQLite, grading in the node)" if args.embedded else "PostgreSQL + Redis + node + worker"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=OUT_DIR))
    try:
        with ExitStack() as stack:
            shape = start_shape(workdir, args.embedded, stack)
            sent, samples, period, done = soak(shape, templates, args.senders, backlog, seconds, workdir, console)
            figures = check(shape, sent, samples, period)
            if not done:
                figures["problems"].insert(0, "timed out waiting for every study to be delivered or failed")
            ours = tree_cpu_s([os.getpid(), *([shape.postmaster] if shape.postmaster else [])])
            others = (busy_cpu_s(cpus) - busy_before - ours) / (len(cpus) * (time.monotonic() - wall_before))
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted; services stopped, files kept in {workdir}[/yellow]")
        return 130
    report(figures, shape_name, args.senders, period, console)
    console.print(f"other processes used {max(others, 0.0):.0%} of the {len(cpus)} CPUs' time during the run"
                  + ("[red]: the rates above are not those of an idle machine[/red]" if others > 0.05 else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "shape": "embedded" if args.embedded else "production", "senders": args.senders, "backlog": backlog,
            "seconds": round(period, 1), "quiet_period_s": QUIET_S, "others_cpu_share": round(others, 3),
            "bounds": {"rss_growth_share": RSS_BOUND, "fds_growth": FDS_BOUND}, **rounded(figures),
        }, indent=1))
    if figures["problems"]:
        console.print(f"[red]soak failed; logs and database kept in {workdir}[/red]")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
