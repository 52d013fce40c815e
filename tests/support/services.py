"""Real services for the tests: a scratch PostgreSQL cluster, a running node, dcmtk's tools.

Nothing here relies on services the machine may already run: each test session starts its own
PostgreSQL on a free port, and each node runs as a real ``spine-node serve`` process.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
#: Nothing listens on TCP port 1: publishing fails at once and jobs stay PENDING.
UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_stats() -> list[tuple[int, list[str]]]:
    """(pid, fields of /proc/PID/stat after the command name) of every process still there."""
    stats = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            stats.append((int(stat.parent.name), stat.read_text().rpartition(")")[2].split()))
        except OSError:
            continue  # exited meanwhile
    return stats


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc), multiprocessing's helper excluded."""
    found = []
    for child, fields in proc_stats():
        if int(fields[1]) == pid:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"resource_tracker" not in cmdline:
                found.append(child)
    return sorted(found)


def events(shown: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The events of one kind in a study's timeline, as ``show --json`` gives it."""
    return [e for e in shown["timeline"] if e["kind"] == kind]


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class PostgresCluster:
    """A throw-away PostgreSQL cluster in a temp dir, on a free port, trust auth.

    ``durable=False`` (tests) turns fsync off for speed; the benchmark keeps it on.
    """

    def __init__(self, durable: bool = False) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.bin = Path(bins[-1])
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="spine-node-pg-"))
        self.as_user: list[str] = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        self.durable = durable
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", *([] if durable else ["--no-sync"]))
        self.start_server()
        self._databases = 0

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True, capture_output=True)

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        self._databases += 1
        name = f"test_{self._databases}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop_server(self) -> None:
        """Shut the server down (fast: sessions are cut), keeping the cluster for :meth:`start_server`."""
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def start_server(self) -> None:
        """Start the server again on the same port and data."""
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "start",
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync={'on' if self.durable else 'off'}")

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def echo(port: int, called: str = "SPINENODE", calling: str = "ECHOSCU", extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """dcmtk's echoscu against 127.0.0.1:``port``."""
    return subprocess.run([ECHOSCU, "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=60)


def store(port: int, paths: list[Path] | Path, called: str = "SPINENODE", calling: str = "STORESCU",
          extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu sending files (or a folder, recursively), proposing what they need (-R)."""
    targets = [str(p) for p in (paths if isinstance(paths, list) else [paths])]
    return subprocess.run(
        [STORESCU, "-R", "+sd", "+r", "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1", str(port), *targets],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=120,
    )


def send_raw(port: int, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> int:
    """Send a file's dataset bytes exactly as they are on disk; return the C-STORE status.

    Unlike storescu, this sends truncated or odd files too: nothing is decoded on the way.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream the file, never decode and re-encode it
    ae = AE(ae_title="RAWSENDER")
    ae.add_requested_context(read_file_meta_info(path).MediaStorageSOPClassUID, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINENODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta group: what travelled over the network."""
    data = path.read_bytes()
    return data[132 + 12 + int(read_file_meta_info(path).FileMetaInformationGroupLength):]


class ChildProcess:
    """A child process in its own session, logging to a file: ``kill`` ends its whole group (a
    crash), ``terminate`` asks it to stop and waits."""

    proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            self.proc = None

    def terminate(self) -> int:
        """SIGTERM and wait; returns the exit code (0 if it was not running)."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.proc = None
        return code


class NodeProcess(ChildProcess):
    """``spine-node serve`` as a real process with a TOML config written for the test."""

    def __init__(self, workdir: Path, database_url: str, echo_as: str = "ECHOSCU",
                 echo_extra: list[str] | None = None, **settings: Any) -> None:
        self.workdir = workdir
        self.echo_as, self.echo_extra = echo_as, echo_extra
        self.port = settings.pop("port", None) or free_port()
        self.settings = {
            "port": self.port,
            "host": "127.0.0.1",
            "database_url": database_url,
            "storage_dir": str(workdir / "storage"),
            "quiet_period_s": 0.5,
            "study_timeout_s": 60.0,
            "min_free_disk_mb": 0,
            **settings,
        }
        self.config = workdir / "spine-node.toml"
        self.config.write_text(toml_text(self.settings))
        self.log = workdir / "node.log"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run another ``spine-node`` subcommand against this node's config."""
        result = subprocess.run([sys.executable, "-m", "node.cli", "--config", str(self.config), *args],
                                capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"spine-node {' '.join(args)} failed:\n{result.stderr}")
        return result

    def start(self) -> NodeProcess:
        """Start serving and wait until C-ECHO succeeds; a node that never answers is killed, so
        a failed start (echoscu missing, say) leaves no server running after the tests."""
        self.spawn([sys.executable, "-m", "node.cli", "--config", str(self.config), "serve"], self.log)

        def answering() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log.read_text()}")
            return echo(self.port, calling=self.echo_as, extra=self.echo_extra).returncode == 0

        try:
            wait_for(answering, 60, "the node to answer C-ECHO")
        except BaseException:
            if self.proc is not None and self.proc.poll() is None:
                self.kill()
            raise
        return self

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        return self.terminate()


def toml_text(values: dict[str, Any]) -> str:
    """Enough TOML for our test and benchmark configs (scalars, tables, lists of tables with sub-tables)."""
    lines, tables = [], []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append(f"[{key}]\n" + "".join(f"{k} = {_scalar(v)}\n" for k, v in value.items()))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                scalars = {k: v for k, v in item.items() if not isinstance(v, dict)}
                tables.append(f"[[{key}]]\n" + "".join(f"{k} = {_scalar(v)}\n" for k, v in scalars.items())
                              + "".join(f"[{key}.{k}]\n" + "".join(f"{kk} = {_scalar(vv)}\n" for kk, vv in v.items())
                                        for k, v in item.items() if isinstance(v, dict)))
        else:
            lines.append(f"{key} = {_scalar(value)}")
    return "\n".join(lines) + "\n\n" + "\n".join(tables)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisServer:
    """A throw-away redis-server on a free port, no persistence; ``stop``/``start`` keep the port,
    so a test can take the broker away and bring it back."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="spine-node-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, 20, "redis-server to answer")
        return self

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.exceptions.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(20)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class WorkerProcess(ChildProcess):
    """``spine-node worker`` (a real Celery worker) against a node's config file; ``kill`` takes
    its pool processes too, as a crashed host would; ``stop`` is Celery's warm shutdown."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log

    def start(self) -> WorkerProcess:
        self.spawn([sys.executable, "-m", "node.cli", "--config", str(self.config), "worker", "--concurrency", "1"], self.log)
        return self

    def stop(self) -> None:
        """Warm shutdown (SIGTERM): the running task finishes first."""
        self.terminate()
