"""The benchmarks still run end to end (smoke runs: no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_bench(module: str, tmp_path: Path, *args: str, codes: tuple[int, ...] = (0, 1)) -> Any:
    """Run ``python -m bench.<module> ARGS --json FILE`` from the repository root; the JSON it wrote.
    Exit 1 means a goal was missed, still a valid run."""
    out = tmp_path / f"{module}.json"
    result = subprocess.run([sys.executable, "-m", f"bench.{module}", *args, "--json", str(out)],
                            cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert result.returncode in codes, result.stdout + result.stderr
    return json.loads(out.read_text())


def test_ingest_benchmark_smoke_run(tmp_path: Path) -> None:
    """Every run counts, with its rate and the receiver's CPU; under strace the node syncs each
    instance's file, its directory and its commit, the bare SCP and storescp nothing."""
    written = run_bench("ingest", tmp_path, "--runs", "1", "--instances", "8", "--only", "node-r1,pynetdicom,storescp", "--syncs", codes=(0,))
    rows = written["results"]
    assert {(r["receiver"], r["associations"]) for r in rows} == {
        (name, n) for name in ("node r=1 SQLite", "pynetdicom (bare)", "storescp") for n in (1, 4)}
    assert all(r["failures"] == [] and r["images_per_s"] > 0 and r["cpu_ms_per_image"] >= 0 for r in rows)
    assert all(r["cpu_ms_per_image"] > 0 for r in rows if r["receiver"].startswith("node"))  # storescp's may be under a tick
    syncs = written["syncs_per_instance"]
    assert syncs["node r=1 SQLite"]["fsync"] >= 2 and syncs["node r=1 SQLite"]["fdatasync"] >= 1
    assert syncs["pynetdicom (bare)"] == syncs["storescp"] == {}


def test_pipeline_benchmark_smoke_run(tmp_path: Path) -> None:
    """The pipeline benchmark renders its study, times every stage and writes its JSON."""
    rows = run_bench("pipeline", tmp_path, "--studies", "1", "--runs", "1")["results"]
    assert len(rows) == 1 and all(rows[0][k] > 0 for k in ("volumes", "detect", "extract", "grade", "grade_paper", "decode_only"))


def test_grader_benchmark_smoke_run(tmp_path: Path) -> None:
    """The throughput sweep times each batch size that fits (fp32 only on the CPU) and names the best."""
    written = run_bench("grader", tmp_path, "--device", "cpu", "--batches", "1,2", "--runs", "1", "--shipped", codes=(0,))
    assert [r["studies"] for r in written["results"]] == [1, 2] and all(r["fp32"] > 0 and "bf16" not in r for r in written["results"])
    assert written["best_batch"] in (1, 2) and written["model"] == "shipped"


def test_study_latency_benchmark_smoke_run(tmp_path: Path) -> None:
    """The latency benchmark runs a node, grades a warm-up, one timed study and a queue of two, and writes its JSON."""
    written = run_bench("study_latency", tmp_path, "--runs", "1", "--queue", "2")
    latency, queue = written["latency"], written["queue"]
    assert len(latency["runs"]) == 1 and len(queue["runs"]) == 2 and queue["studies"] == 2
    assert all(latency[row][k] > 0 for row in ("median", "cold") for k in (
        "quiet_wait", "dispatch", "detect", "extract", "grade", "store", "ready_to_result", "ack_to_result", "beyond_quiet",
        "offline", "vs_offline"))
    assert latency["cold"]["models"] > 0 and latency["median"]["quiet_wait"] >= written["quiet_period_s"]
    assert all(queue[k] > 0 for k in ("send_s", "seconds", "studies_per_min", "ack_to_result_median_s", "ack_to_result_max_s",
                                      "offline_studies_per_min", "vs_offline"))


def test_soak_smoke_run(tmp_path: Path) -> None:
    """The soak runs the production shape with two senders for 15 s: nothing lost, every study
    graded once and delivered, and its JSON written."""
    written = run_bench("soak", tmp_path, "--seconds", "15", "--senders", "2", "--backlog", "2")
    instances, studies = written["instances"], written["studies"]
    assert instances["lost"] == 0 and instances["refused"] == 0
    assert instances["acknowledged"] == instances["indexed"] == instances["on_disk"] > 0
    assert studies["sent"] >= 2 and studies["sent"] == studies["graded_once"] == studies["delivered"] and studies["graded_more"] == 0
    assert all(written[k] > 0 for k in ("peak_associations", "instances_per_s", "studies_per_h", "ack_to_sr_p50_s", "ack_to_sr_p95_s"))
    assert set(written["resources"]) == {"node", "worker"}
    assert all({"start", "middle", "end", "rss_growth_share", "fds_growth", "flat"} <= set(r) for r in written["resources"].values())
    assert all("not flat" in problem for problem in written["problems"])  # fifteen seconds say little about growth
