"""C-STORE receive rate of spine-node, against dcmtk storescp and Orthanc in the same script.

Run it from the repository root::

    .venv/bin/python -m bench.ingest                  # or: make bench-ingest
    .venv/bin/python -m bench.ingest --quick          # 1 run of a 60-instance study
    .venv/bin/python -m bench.ingest --runs 5 --postgres --json bench/out/ingest.json
    .venv/bin/python -m bench.ingest --syncs          # also count sync calls per instance (strace)

The load is one lumbar MR study of 300 instances, 512x512 16-bit, uncompressed Explicit VR
Little Endian (about 158 MB), generated once into ``bench/out/`` and given fresh UIDs for
every run. dcmtk's ``storescu`` sends it over one association (x1) and over four in parallel,
a quarter of the files each (x4). The receivers, each started here on a free port:

- spine-node with ``receivers=1`` and ``receivers=2`` (SQLite, WAL, synchronous=FULL; with
  ``--postgres`` also on a scratch PostgreSQL cluster with fsync on): every instance fsynced
  and its row committed before success is returned.
- ``pynetdicom``: the node's own SCP with nothing behind it (bench.bare_scp): each dataset written
  as received, no fsync, no index; the floor of any receiver built on pynetdicom.
- dcmtk ``storescp`` and ``storescp --fork``: C++, files only, no fsync, no index: the ceiling.
- Orthanc (Debian package): files plus its SQLite index, synced (its defaults).

Time is the wall clock from starting the storescu processes until the last one exits; CPU is
what the receiver's processes used meanwhile (user plus system, from /proc), per instance.
``--syncs`` adds one untimed x1 run per receiver under strace, counting its fsync/fdatasync
calls per instance (bench.syncs): one association waits for each of them in turn.
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

from bench.servers import CALLING_AET, BareScpReceiver, NodeReceiver, OrthancReceiver, Receiver, StorescpReceiver
from bench.study import Template, ensure_template, stamp_copy
from bench.syncs import SYNC_CALLS, count_syncs
from tests.support.services import DCMTK_ENV, PostgresCluster

STORESCU = "/usr/bin/storescu"
OUT_DIR = Path(__file__).resolve().parent / "out"
TARGETS = ("node-r1", "node-r2", "pynetdicom", "storescp", "storescp-fork", "orthanc")
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
    cpu_ms: list[float] = field(default_factory=list)  # the receiver's CPU per instance, each counted run

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def images_per_s(self) -> float | None:
        return self.instances / self.median_s if self.median_s else None

    @property
    def mb_per_s(self) -> float | None:
        return self.bytes / 1e6 / self.median_s if self.median_s else None

    @property
    def cpu_ms_per_image(self) -> float | None:
        return statistics.median(self.cpu_ms) if self.cpu_ms else None


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
            cpu_before = receiver.cpu_seconds()
            elapsed, failures = run_once(template, receiver, associations, scratch)
            if failures:
                result.failures.extend(failures)
            else:
                result.seconds.append(elapsed)
                result.cpu_ms.append(1000 * (receiver.cpu_seconds() - cpu_before) / len(template.files))
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
        elif target == "pynetdicom":
            receivers.append(BareScpReceiver(workdir / target))
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


def sync_counts(template: Template, receiver: Receiver, scratch: Path) -> dict[str, float]:
    """Sync calls per instance (those made at all) in one untimed x1 run under strace."""
    failures: list[str] = []
    counts = count_syncs(receiver.pids(), lambda: failures.extend(run_once(template, receiver, 1, scratch)[1]),
                         scratch / "strace-summary.txt")
    if failures:
        raise RuntimeError(f"{receiver.name}: the run under strace failed: {failures[0]}")
    return {call: n / len(template.files) for call, n in counts.items() if n}


def benchmark(args: argparse.Namespace, console: Console) -> tuple[list[Result], dict[str, dict[str, float]]]:
    """Generate (or reuse) the study, then measure every receiver in turn, cleaning up after;
    with ``--syncs`` also count each receiver's sync calls per instance."""
    template = ensure_template(OUT_DIR, args.instances)
    console.log(f"study: {len(template.files)} instances, {template.size_bytes / 1e6:.0f} MB, cached in {template.folder}")
    results: list[Result] = []
    syncs: dict[str, dict[str, float]] = {}
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
            if args.syncs:
                try:
                    syncs[receiver.name] = sync_counts(template, receiver, workdir)
                except (RuntimeError, OSError) as exc:
                    console.log(f"[red]{receiver.name}: sync calls not counted: {exc}[/red]")
            receiver.stop()
    return results, syncs


def _not_started(template: Template, name: str, why: str, runs: int) -> list[Result]:
    """Results with every run failed, for a receiver that never answered."""
    return [Result(name, n, len(template.files), template.size_bytes, failures=[f"did not start: {why}"] * runs)
            for n in PARALLEL]


def _ratio(value: float | None, peer: float | None) -> str:
    return f"{value / peer:.2f}" if value and peer else "-"


def _rate(value: float | None) -> str:
    return f"{value:.0f}" if value else "-"


def report(results: list[Result], syncs: dict[str, dict[str, float]], runs: int, console: Console) -> None:
    """One row per receiver and association count: rates, the ratios to Orthanc and storescp and
    the receiver's CPU per instance; then the sync calls per instance, if counted."""
    by_key = {(r.receiver, r.associations): r for r in results}
    orthanc = next((r.receiver for r in results if r.receiver.startswith("Orthanc")), None)
    table = Table(title=f"C-STORE receive rate, median of {runs} run(s), {results[0].instances} instances")
    for heading in ("receiver", "assocs", "images/s", "MB/s", "vs Orthanc", "vs storescp", "CPU ms/image", "runs ok"):
        table.add_column(heading, justify="left" if heading == "receiver" else "right", no_wrap=True)
    for result in results:
        peer_orthanc = by_key.get((orthanc or "", result.associations))
        peer_storescp = by_key.get(("storescp", result.associations))
        table.add_row(result.receiver, f"x{result.associations}", _rate(result.images_per_s), _rate(result.mb_per_s),
                      _ratio(result.images_per_s, peer_orthanc.images_per_s if peer_orthanc else None),
                      _ratio(result.images_per_s, peer_storescp.images_per_s if peer_storescp else None),
                      f"{result.cpu_ms_per_image:.2f}" if result.cpu_ms_per_image is not None else "-",
                      f"{len(result.seconds)}/{len(result.seconds) + len(result.failures)}",
                      end_section=result.associations == PARALLEL[-1])
    console.print(table)
    if syncs:
        counted = Table(title="Sync calls per instance, one x1 run under strace (untimed)")
        counted.add_column("receiver", no_wrap=True)
        made = [call for call in SYNC_CALLS if any(call in per_instance for per_instance in syncs.values())]
        for call in made:
            counted.add_column(call, justify="right")
        for name, per_instance in syncs.items():
            counted.add_row(name, *(f"{per_instance.get(call, 0):.2f}" for call in made))
        console.print(counted)
    for result in results:
        for failure in dict.fromkeys(result.failures):
            console.print(f"[red]{result.receiver} x{result.associations}: {failure}[/red]")


def write_json(path: Path, results: list[Result], syncs: dict[str, dict[str, float]]) -> None:
    """The raw numbers: every run's seconds and CPU, the failures, the medians, the sync counts."""
    rows = [{**asdict(r), "images_per_s": r.images_per_s, "mb_per_s": r.mb_per_s, "cpu_ms_per_image": r.cpu_ms_per_image}
            for r in results]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cpus": os.cpu_count(), "results": rows, "syncs_per_instance": syncs}, indent=2) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per receiver and association count (median)")
    parser.add_argument("--instances", type=int, default=300, help="instances in the study")
    parser.add_argument("--quick", action="store_true", help="1 run of a 60-instance study")
    parser.add_argument("--postgres", action="store_true", help="also measure the node on a scratch PostgreSQL")
    parser.add_argument("--only", type=lambda s: s.split(","), default=list(TARGETS),
                        help=f"comma-separated receivers to measure, of {','.join(TARGETS)} (node-rN for N receivers)")
    parser.add_argument("--syncs", action="store_true", help="also count each receiver's sync calls per instance (strace, one extra x1 run)")
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
        results, syncs = benchmark(args, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; every server stopped and its files removed[/yellow]")
        return 130
    report(results, syncs, args.runs, console)
    if args.json:
        write_json(args.json, results, syncs)
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
