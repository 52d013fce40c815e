"""The receivers under test, each started on a free port and stopped with its whole process group.

Every receiver answers ``received(study_uid)``: how many instances of that study it holds, read
from its own index (the node's ``studies --json``, Orthanc's REST API) or its output folder
(storescp), so a run counts only when every instance really arrived.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from bench.bare_scp import AE_TITLE
from tests.support.services import DCMTK_ENV, echo, free_port, proc_stats, toml_text, wait_for

STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
CALLING_AET = "BENCH"


class Receiver(Protocol):
    """A C-STORE SCP under test."""

    name: str
    ae_title: str
    port: int

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def received(self, study_uid: str) -> int: ...

    def pids(self) -> list[int]: ...

    def cpu_seconds(self) -> float: ...


def answers(port: int, called: str) -> bool:
    """True if dcmtk's echoscu gets a C-ECHO success from 127.0.0.1:``port``."""
    return echo(port, called=called, calling=CALLING_AET).returncode == 0


def group_members(pgid: int) -> list[int]:
    """Pids of the live processes of process group ``pgid``, read from /proc."""
    return [pid for pid, fields in proc_stats() if int(fields[2]) == pgid]


def group_cpu_seconds(pgid: int) -> float:
    """User plus system CPU seconds of process group ``pgid``: its live processes and the children
    they have reaped (``storescp --fork`` reaps one per association)."""
    ticks = sum(sum(int(f) for f in fields[11:15]) for _, fields in proc_stats() if int(fields[2]) == pgid)
    return ticks / os.sysconf("SC_CLK_TCK")


class Process:
    """A child process in its own session, logging to a file; stop() ends its whole group."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.argv, self.log, self.env, self.cwd = argv, log, env, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.cwd, start_new_session=True)

    def until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait for ``condition``, failing at once (with the log's tail) if the process exits."""
        wait_for(lambda: self.check_alive() or condition(), timeout, what)

    def check_alive(self) -> bool:
        """False while running; raise with the log's tail if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}:\n{tail}")
        return False

    def pids(self) -> list[int]:
        """The live processes of its group (the receiving processes of a node included)."""
        return group_members(self.proc.pid) if self.proc else []

    def cpu_seconds(self) -> float:
        """CPU seconds its group has used so far."""
        return group_cpu_seconds(self.proc.pid) if self.proc else 0.0

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if still there after 15 s."""
        if self.proc is None:
            return
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(grace)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None


class ProcessReceiver:
    """A receiver that is one child process, ready once it answers C-ECHO on its port."""

    name: str
    ae_title: str
    port: int
    process: Process

    def start(self) -> None:
        """Start and wait until C-ECHO succeeds (failing at once if the process exits)."""
        self.process.start()
        self.process.until(lambda: answers(self.port, self.ae_title), 60, f"{self.name} to answer C-ECHO")

    def stop(self) -> None:
        self.process.stop()

    def pids(self) -> list[int]:
        return self.process.pids()

    def cpu_seconds(self) -> float:
        return self.process.cpu_seconds()


class NodeReceiver(ProcessReceiver):
    """``spine-node serve`` with its own TOML config, storage and database."""

    def __init__(self, workdir: Path, receivers: int, database_url: str, label: str) -> None:
        self.name = f"node r={receivers} {label}"
        self.ae_title, self.port = "SPINENODE", free_port()
        workdir.mkdir(parents=True)
        self.config = workdir / "spine-node.toml"
        self.config.write_text(toml_text({
            "ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port, "receivers": receivers,
            "database_url": database_url, "storage_dir": str(workdir / "storage"),
            # Long enough that no study becomes READY (and gets graded) while the benchmark runs.
            "quiet_period_s": 3600.0, "study_timeout_s": 7200.0,
        }))
        argv = [sys.executable, "-m", "node.cli", "--config", str(self.config), "serve"]
        self.process = Process(argv, workdir / "node.log")

    def received(self, study_uid: str) -> int:
        """Instances of the study in the node's index (``spine-node studies --json``)."""
        result = subprocess.run([sys.executable, "-m", "node.cli", "--config", str(self.config), "studies", "--json"],
                                capture_output=True, text=True, timeout=120, check=True)
        rows = [row for row in json.loads(result.stdout) if row["study_instance_uid"] == study_uid]
        return int(rows[0]["instances"]) if rows else 0


class FilesReceiver(ProcessReceiver):
    """A receiver that writes one file per instance into ``out`` and keeps no index."""

    out: Path

    def received(self, study_uid: str) -> int:
        """Files written since the last call (the folder is emptied after counting)."""
        files = [path for path in self.out.iterdir() if path.is_file()]
        for path in files:
            path.unlink()
        return len(files)


class StorescpReceiver(FilesReceiver):
    """dcmtk's storescp (optionally ``--fork``): files only, no index, no fsync; the ceiling."""

    def __init__(self, workdir: Path, fork: bool) -> None:
        self.name = "storescp --fork" if fork else "storescp"
        self.ae_title, self.port = "STORESCP", free_port()
        self.out = workdir / "storage"
        self.out.mkdir(parents=True)
        argv = [STORESCP, *(["--fork"] if fork else []), "-aet", self.ae_title, "-od", str(self.out), str(self.port)]
        self.process = Process(argv, workdir / "storescp.log", env=DCMTK_ENV)


class BareScpReceiver(FilesReceiver):
    """The node's pynetdicom SCP with nothing behind it (bench.bare_scp): files only, no fsync,
    no index; the floor of a receiver built on pynetdicom."""

    def __init__(self, workdir: Path) -> None:
        self.name = "pynetdicom (bare)"
        self.ae_title, self.port = AE_TITLE, free_port()
        self.out = workdir / "storage"
        self.out.mkdir(parents=True)
        argv = [sys.executable, "-m", "bench.bare_scp", "--port", str(self.port), "--out", str(self.out)]
        self.process = Process(argv, workdir / "bare_scp.log")


class OrthancReceiver(ProcessReceiver):
    """Orthanc with its own storage and SQLite index (synced, its default), REST on localhost."""

    def __init__(self, workdir: Path) -> None:
        self.name = "Orthanc " + _orthanc_version()
        self.ae_title, self.port, self.http_port = "ORTHANC", free_port(), free_port()
        workdir.mkdir(parents=True)
        config = workdir / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "spine-node-bench", "DicomAet": self.ae_title, "DicomPort": self.port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "StorageDirectory": str(workdir / "storage"), "IndexDirectory": str(workdir / "index"),
            "DicomCheckCalledAet": False, "StorageCompression": False, "Plugins": [],
            "DicomModalities": {}, "SaveJobs": False,
        }, indent=2))
        self.process = Process([ORTHANC, str(config)], workdir / "orthanc.log", env=DCMTK_ENV, cwd=workdir)

    def received(self, study_uid: str) -> int:
        """Instances of the study in Orthanc's index (``/tools/lookup`` then its statistics)."""
        found = self._rest("/tools/lookup", study_uid.encode())
        studies = [item["ID"] for item in found if item["Type"] == "Study"]
        return int(self._rest(f"/studies/{studies[0]}/statistics")["CountInstances"]) if studies else 0

    def _rest(self, path: str, body: bytes | None = None) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", data=body, timeout=30) as reply:
            return json.load(reply)


def _orthanc_version() -> str:
    result = subprocess.run([ORTHANC, "--version"], capture_output=True, text=True, timeout=30)
    words = result.stdout.split()
    return words[1] if len(words) > 1 else "?"
