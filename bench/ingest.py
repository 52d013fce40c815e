"""C-STORE receive rate of spine-node, against dcmtk storescp and Orthanc in the same script.

Run it from the repository root::

    .venv/bin/python -m bench.ingest                  # or: make bench-ingest
    .venv/bin/python -m bench.ingest --quick          # 1 run of a 60-instance study
    .venv/bin/python -m bench.ingest --runs 5 --postgres --json bench/out/ingest.json

The load is one lumbar MR study of 300 instances, 512x512 16-bit, uncompressed Explicit VR
Little Endian (about 158 MB), generated once into ``bench/out/`` and given fresh UIDs for
every run. dcmtk's ``storescu`` sends it over one association (x1) and over four in parallel,
a quarter of the files each (x4). The receivers, each started here on a free port:

- spine-node with ``receivers=1`` and ``receivers=2`` (SQLite, WAL, synchronous=FULL; with
  ``--postgres`` also on a scratch PostgreSQL cluster with fsync on): every instance fsynced
  and its row committed before success is returned.
- dcmtk ``storescp`` and ``storescp --fork``: C++, files only, no fsync, no index: the ceiling.
- Orthanc (Debian package): files plus its SQLite index, synced (its defaults).

Time is the wall clock from starting the storescu processes until the last one exits.
A run counts only if every storescu exits 0 and the receiver then holds exactly all the
study's instances; the table shows the median of the counted runs.

Reading the ratios: ``vs Orthanc`` is the receiver's rate divided by Orthanc's in the same
column. The node's goal is >= 1.00 on both x1 and x4: as fast as a widely deployed PACS
while keeping every acknowledged instance durable. ``vs storescp`` shows the distance to
what the network and a C++ receiver allow on this machine (no durability, so < 1 is expected).
Ratios between rows of one run of this script are meaningful; absolute numbers move with
the machine. With 2 cores, four senders and the receivers share the CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.table import Table

from bench.servers import CALLING_AET, NodeReceiver, OrthancReceiver, Receiver, StorescpReceiver
from bench.study import Template, ensure_template, stamp_copy
from tests.support.services import DCMTK_ENV, PostgresCluster

STORESCU = "/usr/bin/storescu"
OUT_DIR = Path(__file__).resolve().parent / "out"
TARGETS = ("node-r1", "node-r2", "storescp", "storescp-fork", "orthanc")
PARALLEL = (1, 4)


@dataclass
class Result:
    """Every run of one receiver with one number of parallel associations."""

    receiver: str
    associations: int
    instances: int
    bytes: int
    seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def images_per_s(self) -> float | None:
        return self.instances / self.median_s if self.median_s else None

    @property
    def mb_per_s(self) -> float | None:
        return self.bytes / 1e6 / self.median_s if self.median_s else None


def send(files: list[Path], receiver: Receiver, associations: int) -> tuple[float, list[str]]:
    """storescu over ``associations`` parallel associations; return seconds and the failures."""
    chunks = [files[i * len(files) // associations:(i + 1) * len(files) // associations] for i in range(associations)]
    argv = [STORESCU, "-R", "-aet", CALLING_AET, "-aec", receiver.ae_title, "127.0.0.1", str(receiver.port)]
    start = time.perf_counter()
    procs = [subprocess.Popen([*argv, *map(str, chunk)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=DCMTK_ENV) for chunk in chunks]
    errors = [proc.communicate(timeout=600)[1] for proc in procs]
    elapsed = time.perf_counter() - start
    failures = [f"storescu exited {proc.returncode}: {err.decode(errors='replace')[-300:].strip()}"
                for proc, err in zip(procs, errors) if proc.returncode != 0]
    return elapsed, failures


def run_once(template: Template, receiver: Receiver, associations: int, scratch: Path) -> tuple[float, list[str]]:
    """One run on a fresh copy of the study; the failures are empty if it counts."""
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=scratch))
    try:
        study_uid, files = stamp_copy(template, folder / "study")
        _flush(files)  # the copy's writeback must not compete with the receiver's fsyncs while timed
        elapsed, failures = send(files, receiver, associations)
        held = receiver.received(study_uid)
        if held != len(files):
            failures.append(f"{receiver.name} holds {held} of {len(files)} instances")
        return elapsed, failures
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _flush(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def measure(template: Template, receiver: Receiver, runs: int, scratch: Path, console: Console) -> list[Result]:
    """``runs`` runs of x1 and of x4 against one started receiver."""
    results = []
    for associations in PARALLEL:
        result = Result(receiver.name, associations, len(template.files), template.size_bytes)
        for _ in range(runs):
            elapsed, failures = run_once(template, receiver, associations, scratch)
            if failures:
                result.failures.extend(failures)
            else:
                result.seconds.append(elapsed)
            rate = len(template.files) / elapsed
            console.log(f"{receiver.name} x{associations}: {rate:.0f} images/s" + (" [red]not counted[/red]" if failures else ""))
        results.append(result)
    return results


def make_receivers(targets: list[str], workdir: Path, stack: ExitStack, postgres: bool) -> list[Receiver]:
    """The receivers named in ``targets`` (plus the node on PostgreSQL if asked), in order."""
    receivers: list[Receiver] = []
    for target in targets:
        if target.startswith("node-r"):
            count = int(target.removeprefix("node-r"))
            receivers.append(NodeReceiver(workdir / target, count, f"sqlite:///{workdir / target / 'node.db'}", "SQLite"))
        elif target.startswith("storescp"):
            receivers.append(StorescpReceiver(workdir / target, fork=target.endswith("fork")))
        elif target == "orthanc":
            receivers.append(OrthancReceiver(workdir / target))
    if postgres:
        cluster = PostgresCluster(durable=True)
        stack.callback(cluster.stop)
        for target in (t for t in targets if t.startswith("node-r")):
            count = int(target.removeprefix("node-r"))
            receivers.append(NodeReceiver(workdir / f"{target}-pg", count, cluster.create_database(), "PostgreSQL"))
    return receivers


def benchmark(args: argparse.Namespace, console: Console) -> list[Result]:
    """Generate (or reuse) the study, then measure every receiver in turn, cleaning up after."""
    template = ensure_template(OUT_DIR, args.instances)
    console.log(f"study: {len(template.files)} instances, {template.size_bytes / 1e6:.0f} MB, cached in {template.folder}")
    results: list[Result] = []
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="work-", dir=OUT_DIR))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        for receiver in make_receivers(args.only, workdir, stack, args.postgres):
            stack.callback(receiver.stop)
            try:
                receiver.start()
            except (TimeoutError, RuntimeError) as exc:
                console.log(f"[red]{receiver.name} did not start: {exc}[/red]")
                receiver.stop()
                results.extend(_not_started(template, receiver.name, str(exc).splitlines()[0], args.runs))
                continue
            results.extend(measure(template, receiver, args.runs, workdir, console))
            receiver.stop()
    return results


def _not_started(template: Template, name: str, why: str, runs: int) -> list[Result]:
    """Results with every run failed, for a receiver that never answered."""
    return [Result(name, n, len(template.files), template.size_bytes, failures=[f"did not start: {why}"] * runs)
            for n in PARALLEL]


def _ratio(value: float | None, peer: float | None) -> str:
    return f"{value / peer:.2f}" if value and peer else "-"


def _rate(value: float | None) -> str:
    return f"{value:.0f}" if value else "-"


def report(results: list[Result], runs: int, console: Console) -> None:
    """One row per receiver and association count: rates and the ratios to Orthanc and storescp."""
    by_key = {(r.receiver, r.associations): r for r in results}
    orthanc = next((r.receiver for r in results if r.receiver.startswith("Orthanc")), None)
    table = Table(title=f"C-STORE receive rate, median of {runs} run(s), {results[0].instances} instances")
    for heading in ("receiver", "assocs", "images/s", "MB/s", "vs Orthanc", "vs storescp", "runs ok"):
        table.add_column(heading, justify="left" if heading == "receiver" else "right", no_wrap=True)
    for result in results:
        peer_orthanc = by_key.get((orthanc or "", result.associations))
        peer_storescp = by_key.get(("storescp", result.associations))
        table.add_row(result.receiver, f"x{result.associations}", _rate(result.images_per_s), _rate(result.mb_per_s),
                      _ratio(result.images_per_s, peer_orthanc.images_per_s if peer_orthanc else None),
                      _ratio(result.images_per_s, peer_storescp.images_per_s if peer_storescp else None),
                      f"{len(result.seconds)}/{len(result.seconds) + len(result.failures)}",
                      end_section=result.associations == PARALLEL[-1])
    console.print(table)
    for result in results:
        for failure in dict.fromkeys(result.failures):
            console.print(f"[red]{result.receiver} x{result.associations}: {failure}[/red]")


def write_json(path: Path, results: list[Result]) -> None:
    """The raw numbers: every run's seconds, the failures, the medians."""
    rows = [{**asdict(r), "images_per_s": r.images_per_s, "mb_per_s": r.mb_per_s} for r in results]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cpus": os.cpu_count(), "results": rows}, indent=2) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per receiver and association count (median)")
    parser.add_argument("--instances", type=int, default=300, help="instances in the study")
    parser.add_argument("--quick", action="store_true", help="1 run of a 60-instance study")
    parser.add_argument("--postgres", action="store_true", help="also measure the node on a scratch PostgreSQL")
    parser.add_argument("--only", type=lambda s: s.split(","), default=list(TARGETS),
                        help=f"comma-separated receivers to measure, of {','.join(TARGETS)} (node-rN for N receivers)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    return parser


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, optionally write the JSON; 1 if any run did not count."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.runs, args.instances = 1, 60
    unknown = [t for t in args.only if t not in TARGETS and not t.removeprefix("node-r").isdigit()]
    if unknown or args.runs < 1 or args.instances < 4:
        _parser().error(f"unknown receivers {unknown}" if unknown else "need --runs >= 1 and --instances >= 4")
    signal.signal(signal.SIGTERM, _interrupt)
    console = Console()
    try:
        results = benchmark(args, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; every server stopped and its files removed[/yellow]")
        return 130
    report(results, args.runs, console)
    if args.json:
        write_json(args.json, results)
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
