"""``spine-node demo``: the main job end to end on one machine, embedded defaults.

A phantom study is generated, a node is started in this process (SQLite, no broker: the
grading runs in-process), the study is sent to it over C-STORE like a PACS would, and what the
node stored, decided and graded is printed. The study generator and the job runner are passed
in by the composition root (node never imports models or the worker).
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from rich.console import Console
from rich.progress import Progress

from node.admin import show_study
from node.config import Settings, load_settings
from node.db import make_engine, make_sessionmaker
from node.scu import send_files
from node.service import serve
from node.views import print_result, print_study

#: Makes one study under the given folder and returns the study's folder.
StudyMaker = Callable[[Path], Path]
#: Makes the embedded job runner for the demo's settings.
RunnerMaker = Callable[[Settings], Callable[[int], object]]

#: States a study rests in until something new happens.
SETTLED = {"GRADED", "DELIVERED", "FAILED", "INCOMPLETE"}


def run_demo(make_study: StudyMaker, make_runner: RunnerMaker, workdir: Path, console: Console, timeout_s: float = 300.0) -> int:
    """Run the demo in ``workdir`` (emptied first); return 0 if the study was graded."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    with console.status("generating a phantom lumbar spine study"):
        study_dir = make_study(workdir / "incoming")
    files = sorted(p for p in study_dir.rglob("*.dcm"))
    console.print(f"phantom study: {len(files)} instances in {study_dir}")

    settings = demo_settings(workdir)
    stop, started = threading.Event(), threading.Event()
    node = threading.Thread(target=serve, args=(settings, stop, started, make_runner(settings)), name="node", daemon=True)
    node.start()
    try:
        if not started.wait(timeout_s):
            raise TimeoutError("the node did not start; see the log above")
        console.print(f"node {settings.ae_title} listening on 127.0.0.1:{settings.port} (embedded: SQLite, no broker)")
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("C-STORE to the node", total=len(files))
            sent = send_files(files, "127.0.0.1", settings.port, settings.ae_title, calling_ae_title="DEMOPACS",
                              on_sent=lambda _: progress.advance(task))
        refused = [s for s in sent if not s.ok]
        console.print(f"sent {len(sent)} instances, {len(refused)} refused")
        study_uid = _study_uid(files[0])
        sessions = make_sessionmaker(make_engine(settings.database_url))
        with console.status(f"waiting {settings.quiet_period_s:.0f} s of quiet, then grading in this process"):
            _wait_until(lambda: _settled(show_study(sessions, study_uid)), timeout_s)
        study = show_study(sessions, study_uid)
        print_study(study, console)
        if study["result"]:
            print_result(study["result"], console)
        console.print(f"stored files: {settings.storage_dir}\ndatabase: {settings.database_url}\n"
                      f"look again with: spine-node --config {workdir / 'demo.toml'} show {study_uid}\n"
                      f"see what a radiologist sees: spine-node --config {workdir / 'demo.toml'} render {study_uid} --out {workdir / 'png'}")
        return 0 if study["state"] == "GRADED" and study["result"] and not refused else 1
    finally:
        stop.set()
        node.join(60)


def demo_settings(workdir: Path) -> Settings:
    """Embedded defaults in ``workdir``, a free port, a short quiet period; also written as TOML."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    values = {
        "host": "127.0.0.1",
        "port": port,
        "database_url": f"sqlite:///{workdir / 'node.db'}",
        "storage_dir": str(workdir / "storage"),
        "quiet_period_s": 2.0,
        "study_timeout_s": 30.0,
        "min_free_disk_mb": 100,
    }
    (workdir / "demo.toml").write_text("".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in values.items()))
    return load_settings(workdir / "demo.toml")


def _settled(study: dict[str, object]) -> bool:
    """The study rests and none of its jobs is waiting or running (so the timeline is complete)."""
    jobs = study["jobs"]
    assert isinstance(jobs, list)
    return study["state"] in SETTLED and all(j["state"] in {"DONE", "FAILED", "CANCELLED"} for j in jobs)


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``condition`` until true; give up quietly at the deadline (the caller reports state)."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def _study_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)
