"""``spine-node demo``: the main job end to end on one machine, embedded defaults.

A phantom study is generated; a node is started in this process (SQLite, no broker: grading
runs in-process) with a small local PACS as its destination; the study is sent to the node
over C-STORE like a PACS would; the node grades it and sends back its SR, presentation states
and key images, which the local PACS writes to disk; the grades are printed and the pictures
rendered. The study generator, the job runner and the renderer come from the composition root
(node never imports models or the worker).
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.events import Event
from rich.console import Console
from rich.progress import Progress

from node.admin import show_study
from node.config import Settings, load_settings
from node.db import make_engine, make_sessionmaker
from node.scu import send_files
from node.service import serve
from node.views import print_result, print_study

#: States a study rests in until something new happens.
SETTLED = {"GRADED", "DELIVERED", "FAILED", "INCOMPLETE"}
PACS_AE_TITLE = "DEMOPACS"


@dataclass(frozen=True)
class DemoParts:
    """What the composition root lends the demo: a study maker, the job runner, the renderer."""

    make_study: Callable[[Path], Path]  # writes one study under the folder, returns the study's folder
    make_runner: Callable[[Settings], Callable[[int], object]]
    render: Callable[[list[Path], Path, Path], list[Path]]  # (object files, source folder, out folder) -> PNGs


class LocalPacs:
    """A minimal C-STORE destination that writes what it receives under ``folder``, as a PACS would keep it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.received: list[Dataset] = []
        ae = AE(ae_title=PACS_AE_TITLE)
        ae.supported_contexts = StoragePresentationContexts
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None  # block=False returns the running server
        self.server = server
        self.port = int(server.server_address[1])

    def _store(self, event: Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(self.folder / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        self.received.append(ds)
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


def run_demo(parts: DemoParts, workdir: Path, console: Console, timeout_s: float = 300.0) -> int:
    """Run the demo in ``workdir`` (emptied first); return 0 if the results came back to the local PACS."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    with console.status("generating a phantom lumbar spine study"):
        study_dir = parts.make_study(workdir / "incoming")
    files = sorted(p for p in study_dir.rglob("*.dcm"))
    console.print(f"phantom study: {len(files)} instances in {study_dir}")

    pacs = LocalPacs(workdir / "pacs")
    settings = demo_settings(workdir, pacs.port)
    stop, started = threading.Event(), threading.Event()
    node = threading.Thread(target=serve, args=(settings, stop, started, parts.make_runner(settings)), name="node", daemon=True)
    node.start()
    try:
        if not started.wait(timeout_s):
            raise TimeoutError("the node did not start; see the log above")
        console.print(f"node {settings.ae_title} listening on 127.0.0.1:{settings.port} (embedded: SQLite, no broker); "
                      f"results go to {PACS_AE_TITLE} on 127.0.0.1:{pacs.port}")
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("C-STORE to the node", total=len(files))
            sent = send_files(files, "127.0.0.1", settings.port, settings.ae_title, calling_ae_title=PACS_AE_TITLE,
                              on_sent=lambda _: progress.advance(task))
        refused = [s for s in sent if not s.ok]
        console.print(f"sent {len(sent)} instances, {len(refused)} refused")
        study_uid = _study_uid(files[0])
        sessions = make_sessionmaker(make_engine(settings.database_url))
        with console.status(f"waiting {settings.quiet_period_s:.0f} s of quiet, grading in this process, sending the results back"):
            _wait_until(lambda: _settled(show_study(sessions, study_uid)), timeout_s)
        study = show_study(sessions, study_uid)
        print_study(study, console)
        if study["result"]:
            print_result(study["result"], console)
        pictures = _pictures(parts, pacs, settings, study_uid, workdir / "png", console)
        console.print(f"stored files: {settings.storage_dir}\ndatabase: {settings.database_url}\n"
                      f"received by {PACS_AE_TITLE}: {len(pacs.received)} objects in {pacs.folder}\n"
                      f"pictures ({len(pictures)} PNGs, what a radiologist sees): {workdir / 'png'}\n"
                      f"look again with: spine-node --config {workdir / 'demo.toml'} show {study_uid}")
        return 0 if study["state"] == "DELIVERED" and pacs.received and pictures and not refused else 1
    finally:
        stop.set()
        node.join(60)
        pacs.close()


def _pictures(parts: DemoParts, pacs: LocalPacs, settings: Settings, study_uid: str, out: Path, console: Console) -> list[Path]:
    """PNGs of the key images and presentation states the local PACS received, on the stored source images."""
    with console.status("rendering the key images and the overlays"):
        return parts.render(sorted(pacs.folder.glob("*.dcm")), settings.storage_dir / study_uid, out) if pacs.received else []


def demo_settings(workdir: Path, pacs_port: int) -> Settings:
    """Embedded defaults in ``workdir``, a free port, a short quiet period, the local PACS as the
    destination; also written as ``demo.toml`` so the other commands can look at the demo's node."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "database_url": f"sqlite:///{workdir / 'node.db'}",
        "storage_dir": str(workdir / "storage"),
        "quiet_period_s": 2.0,
        "study_timeout_s": 30.0,
        "min_free_disk_mb": 100,
    }
    destination = {"ae_title": PACS_AE_TITLE, "host": "127.0.0.1", "port": pacs_port, "confirm": False}
    text = "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
    text += "\n[[destinations]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in destination.items())
    (workdir / "demo.toml").write_text(text)
    return load_settings(workdir / "demo.toml")


def _toml(value: object) -> str:
    """A TOML scalar (the demo writes strings, numbers and booleans only)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, (int, float)) else '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


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
