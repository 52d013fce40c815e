"""From a study's last acknowledged instance to its stored result, per stage, through a running node.

Run it from the repository root::

    .venv/bin/python -m bench.study_latency                 # or: make bench-latency
    .venv/bin/python -m bench.study_latency --runs 1 --queue 2 --json bench/out/latency.json

A real ``spine-node serve`` in embedded mode (no broker: READY studies are graded in the node's
process, one at a time, by the job runner the Celery worker uses) on SQLite, with
``quiet_period_s`` = 1 s. This process, the node and storescu are pinned to ``--threads`` CPUs
(2 by default, the machine this project targets) and torch gets as many threads (the node
through ``OMP_NUM_THREADS``). The load is phantom studies (four series, one axial stack),
rendered once into ``bench/out/latency`` and sent by dcmtk's storescu. The last line says what
share of those CPUs' time other processes took meanwhile: a busy machine's numbers are not comparable.

- Latency: one study at a time on an idle node. A warm-up study first (``cold``: its ``models``
  stage loads the models), then ``--runs`` studies, whose median is kept. From the node's
  database: the last instance's ``received_at`` (written in the commit that precedes its
  acknowledgement), the ``ready`` event, the grade job's claim, every stage event, and the
  result row's ``created_at``. ``beyond quiet`` is ack -> result less the quiet period; the
  goal is under 5 s on 2 cores.
- Queue: ``--queue`` studies (20 by default) sent back to back; studies per minute from the
  first READY to the last result stored, and the median and worst ack -> result.

The peer, timed in this process in the same run on the same folders while the node is idle, is
the offline pipeline (``analyse_folder``, what ``spine-node grade DIR`` runs) with the models
already loaded (``cold``: loading them included): the same work without network, database, jobs
or timeline. ``vs offline`` is the node's READY -> result over the offline time (latency), and
the node's rate over the offline rate (queue): what the node's path costs beyond the models.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from bench.common import PHANTOM_DIR, busy_cpu_s, interrupt, own_cpu_s, render, rounded
from bench.servers import Process, answers
from models.detect import DEFAULT_WEIGHTS, Detector
from models.grade import DEFAULT_GRADER, GraderModel
from node.admin import show_study
from node.config import DEFAULT_DEVICE_UID
from node.db import make_engine, make_sessionmaker, reading
from node.schema import Instance, Job, JobState, Result, Study
from tests.support.services import free_port, store, toml_text
from worker.pipeline import analyse_folder

AE_TITLE = "SPINENODE"
QUIET_S = 1.0
GOAL_BEYOND_QUIET_S = 5.0
OPEN_JOBS = (JobState.PENDING.value, JobState.QUEUED.value, JobState.RUNNING.value)
Models = tuple[Detector, GraderModel]


@dataclass(frozen=True)
class Timing:
    """One study's path through the node, as its database recorded it."""

    study: str
    ack: dt.datetime  # the last instance received (and acknowledged right after)
    ready: dt.datetime
    claimed: dt.datetime
    result: dt.datetime
    stages: dict[str, float]

    def row(self, offline_s: float) -> dict[str, float]:
        """Seconds of each step, the stages in the order they ran, and the ratio to the peer."""
        ready_to_result = (self.result - self.ready).total_seconds()
        ack_to_result = (self.result - self.ack).total_seconds()
        return {"quiet_wait": (self.ready - self.ack).total_seconds(), "dispatch": (self.claimed - self.ready).total_seconds(),
                **self.stages, "ready_to_result": ready_to_result, "ack_to_result": ack_to_result,
                "beyond_quiet": ack_to_result - QUIET_S, "offline": offline_s, "vs_offline": ready_to_result / offline_s}


@dataclass
class Node:
    """The node under test: its process, port and a session factory on its database."""

    process: Process
    port: int
    sessions: sessionmaker[Session]


def start_node(workdir: Path, threads: int, stack: ExitStack) -> Node:
    """``spine-node serve`` in embedded mode on a free port; stopped (its process group) by ``stack``."""
    port, database_url = free_port(), f"sqlite:///{workdir / 'node.db'}"
    config = workdir / "spine-node.toml"
    config.write_text(toml_text({
        "ae_title": AE_TITLE, "host": "127.0.0.1", "port": port, "database_url": database_url,
        "storage_dir": str(workdir / "storage"), "broker_url": "", "quiet_period_s": QUIET_S, "min_free_disk_mb": 0,
    }))
    process = Process([sys.executable, "-m", "node.cli", "--config", str(config), "serve"], workdir / "node.log",
                      env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    stack.callback(process.stop)
    process.start()
    process.until(lambda: answers(port, AE_TITLE), 60, "the node to answer C-ECHO")
    engine = make_engine(database_url)
    stack.callback(engine.dispose)
    return Node(process, port, make_sessionmaker(engine))


def send(node: Node, study: Path) -> None:
    """storescu sends the study's DICOM files (not its truth.json) over one association."""
    sent = store(node.port, sorted(study.rglob("*.dcm")), called=AE_TITLE)
    if sent.returncode != 0:
        raise RuntimeError(f"storescu exited {sent.returncode}: {sent.stderr[-500:]}")


def graded(sessions: sessionmaker[Session], results: int) -> bool:
    """True once ``results`` results are stored and no job waits or runs; raises if a job failed."""
    with reading(sessions) as session:
        error = session.scalar(select(Job.error).where(Job.state == JobState.FAILED.value).limit(1))
        if error is not None:
            raise RuntimeError(f"a job failed: {error}")
        stored = session.scalar(select(func.count(Result.id)))
        running = session.scalar(select(func.count(Job.id)).where(Job.state.in_(OPEN_JOBS)))
    return stored == results and running == 0


def wait_graded(node: Node, results: int, timeout: float) -> None:
    """Wait until the node holds ``results`` results and is idle (failing at once if it exits)."""
    node.process.until(lambda: graded(node.sessions, results), timeout, f"{results} studies graded")


def timing(sessions: sessionmaker[Session], study: Path) -> Timing:
    """The study's timestamps and stage durations, read back from the node's database."""
    uid = str(json.loads((study / "truth.json").read_text())["study_instance_uid"])
    shown = show_study(sessions, uid)
    with reading(sessions) as session:
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == uid))
        ack = session.scalar(select(func.max(Instance.received_at)).where(Instance.study_id == study_id))
        result = session.scalar(select(Result.created_at).where(Result.study_id == study_id).order_by(Result.id).limit(1))
    if ack is None or result is None:
        raise RuntimeError(f"{study.name}: the node holds no instances or no result of it")
    ready = next(e["at"] for e in shown["timeline"] if e["kind"] == "ready")
    claimed = next(j["started_at"] for j in shown["jobs"] if j["kind"] == "grade")
    return Timing(study.name, ack, dt.datetime.fromisoformat(ready), dt.datetime.fromisoformat(claimed), result,
                  {s["stage"]: s["duration_s"] for s in shown["stages"]})


def offline(study: Path, models: Models) -> float:
    """Seconds of the offline pipeline on the study's folder (the peer)."""
    started = time.perf_counter()
    analyse_folder(study, *models, DEFAULT_DEVICE_UID)
    return time.perf_counter() - started


def load_models() -> tuple[Models, float]:
    """The shipped detector and grader, and the seconds loading them took."""
    started = time.perf_counter()
    models = (Detector.load(DEFAULT_WEIGHTS), GraderModel.load(DEFAULT_GRADER))
    return models, time.perf_counter() - started


def latency(node: Node, studies: list[Path]) -> tuple[dict[str, float], list[dict[str, Any]], Models]:
    """The cold study (models loaded on both sides), then each study alone; the rows and the models."""
    send(node, studies[0])
    wait_graded(node, 1, 300)
    models, loading_s = load_models()
    cold = timing(node.sessions, studies[0]).row(loading_s + offline(studies[0], models))
    rows: list[dict[str, Any]] = []
    for done, study in enumerate(studies[1:], start=2):
        send(node, study)
        wait_graded(node, done, 300)
        rows.append({"study": study.name, **timing(node.sessions, study).row(offline(study, models))})
    return cold, rows, models


def queue(node: Node, studies: list[Path], models: Models, already: int) -> dict[str, Any]:
    """Send every study back to back, wait for all results; the rate and the peer's."""
    started = time.perf_counter()
    for study in studies:
        send(node, study)
    send_s = time.perf_counter() - started
    wait_graded(node, already + len(studies), 120 + 30 * len(studies))
    timings = [timing(node.sessions, study) for study in studies]
    rows: list[dict[str, Any]] = [{"study": t.study, **t.row(offline(study, models))} for study, t in zip(studies, timings)]
    seconds = (max(t.result for t in timings) - min(t.ready for t in timings)).total_seconds()
    offline_s = sum(r["offline"] for r in rows)
    latencies = [r["ack_to_result"] for r in rows]
    return {"studies": len(studies), "send_s": send_s, "seconds": seconds, "studies_per_min": 60 * len(studies) / seconds,
            "ack_to_result_median_s": statistics.median(latencies), "ack_to_result_max_s": max(latencies),
            "offline_s": offline_s, "offline_studies_per_min": 60 * len(studies) / offline_s,
            "vs_offline": offline_s / seconds, "runs": rows}


LABELS = {"quiet_wait": "last ack -> READY (quiet period)", "dispatch": "READY -> claimed", "ready_to_result": "READY -> result",
          "ack_to_result": "last ack -> result", "beyond_quiet": f"beyond quiet (goal < {GOAL_BEYOND_QUIET_S:.0f} s)",
          "offline": "offline pipeline (peer)", "vs_offline": "READY -> result / offline"}


def report(cold: dict[str, float], rows: list[dict[str, Any]], median: dict[str, float], rate: dict[str, Any], threads: int,
           console: Console) -> None:
    """The latency table (one column per study, stages as rows) and the queue table."""
    table = Table("seconds", "cold", *(f"run {i}" for i in range(1, len(rows) + 1)), "median",
                  title=f"one study at a time, embedded node, {threads} threads (cold: models loaded; median of the runs)")
    keys = list(median)
    ends = {"dispatch", keys[keys.index("ready_to_result") - 1], "beyond_quiet"}  # after the claim, the stages, the goal
    for key in keys:
        table.add_row(LABELS.get(key, f"  stage {key}"), *(f"{r[key]:.3f}" for r in (cold, *rows, median)), end_section=key in ends)
    console.print(table)
    table = Table("studies", "send s", "first READY -> last result s", "studies/min", "ack -> result median s",
                  "ack -> result max s", "offline studies/min", "vs offline", title="a queue of studies sent back to back (vs offline: the node's rate / the offline pipeline's)")
    table.add_row(str(rate["studies"]), *(f"{rate[k]:.2f}" for k in ("send_s", "seconds", "studies_per_min", "ack_to_result_median_s",
                                                                      "ack_to_result_max_s", "offline_studies_per_min", "vs_offline")))
    console.print(table)


def main() -> int:
    """Render (once), run the node, time and print the tables; exit 1 if the goal is missed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="studies timed one at a time after the warm-up (median kept)")
    parser.add_argument("--queue", type=int, default=20, help="studies sent back to back for the sustained rate")
    parser.add_argument("--threads", type=int, default=2, help="CPUs everything is pinned to, and torch threads")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.runs < 1 or args.queue < 1:
        parser.error("need --runs >= 1 and --queue >= 1")
    signal.signal(signal.SIGTERM, interrupt)
    cpus = sorted(os.sched_getaffinity(0))[: args.threads]
    os.sched_setaffinity(0, cpus)  # children (node, storescu) inherit it
    torch.set_num_threads(args.threads)
    busy_before, own_before, started = busy_cpu_s(cpus), own_cpu_s(), time.monotonic()
    studies = render(1 + args.runs + args.queue)
    console = Console(width=160)
    try:
        with ExitStack() as stack:
            workdir = Path(tempfile.mkdtemp(prefix="node-", dir=PHANTOM_DIR))
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            node = start_node(workdir, args.threads, stack)
            cold, rows, models = latency(node, studies[: 1 + args.runs])
            rate = queue(node, studies[1 + args.runs:], models, 1 + args.runs)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; the node stopped and its files removed[/yellow]")
        return 130
    others = (busy_cpu_s(cpus) - busy_before - (own_cpu_s() - own_before)) / (len(cpus) * (time.monotonic() - started))
    median = {k: statistics.median(r[k] for r in rows) for k in cold}
    report(cold, rows, median, rate, args.threads, console)
    console.print(f"other processes used {max(others, 0.0):.0%} of the {len(cpus)} CPUs' time during the run"
                  + ("[red]: the numbers above are not those of an idle machine[/red]" if others > 0.05 else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "threads": args.threads, "others_cpu_share": round(others, 3), "quiet_period_s": QUIET_S, "goal_beyond_quiet_s": GOAL_BEYOND_QUIET_S,
            "latency": {"median": rounded(median), "cold": rounded(cold), "runs": [rounded(r) for r in rows]},
            "queue": {**rounded(rate), "runs": [rounded(r) for r in rate["runs"]]},
        }, indent=1))
    return 0 if median["beyond_quiet"] < GOAL_BEYOND_QUIET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
