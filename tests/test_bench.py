"""The ingest benchmark still runs end to end (a smoke run: no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path


def test_ingest_benchmark_smoke_run(tmp_path: Path) -> None:
    root = Path(__file__).parents[1]
    out = tmp_path / "ingest.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.ingest", "--runs", "1", "--instances", "8", "--only", "node-r1,storescp",
         "--json", str(out)],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["results"]
    assert {(r["receiver"], r["associations"]) for r in rows} == {
        ("node r=1 SQLite", 1), ("node r=1 SQLite", 4), ("storescp", 1), ("storescp", 4)}
    assert all(r["failures"] == [] and r["images_per_s"] > 0 for r in rows)


def test_pipeline_benchmark_smoke_run(tmp_path: Path) -> None:
    """The pipeline benchmark renders its study, times every stage and writes its JSON."""
    root = Path(__file__).parents[1]
    out = tmp_path / "pipeline.json"
    result = subprocess.run([sys.executable, "-m", "bench.pipeline", "--studies", "1", "--runs", "1", "--json", str(out)],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: goal missed, still a valid run
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 1 and all(rows[0][k] > 0 for k in ("volumes", "detect", "extract", "grade", "grade_paper", "decode_only"))


def test_study_latency_benchmark_smoke_run(tmp_path: Path) -> None:
    """The latency benchmark runs a node, grades a warm-up, one timed study and a queue of two, and writes its JSON."""
    root = Path(__file__).parents[1]
    out = tmp_path / "latency.json"
    result = subprocess.run([sys.executable, "-m", "bench.study_latency", "--runs", "1", "--queue", "2", "--json", str(out)],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: goal missed, still a valid run
    written = json.loads(out.read_text())
    latency, queue = written["latency"], written["queue"]
    assert len(latency["runs"]) == 1 and len(queue["runs"]) == 2 and queue["studies"] == 2
    assert all(latency[row][k] > 0 for row in ("median", "cold") for k in (
        "quiet_wait", "dispatch", "detect", "extract", "grade", "store", "ready_to_result", "ack_to_result", "beyond_quiet",
        "offline", "vs_offline"))
    assert latency["cold"]["models"] > 0 and latency["median"]["quiet_wait"] >= written["quiet_period_s"]
    assert all(queue[k] > 0 for k in ("send_s", "seconds", "studies_per_min", "ack_to_result_median_s", "ack_to_result_max_s",
                                      "offline_studies_per_min", "vs_offline"))
