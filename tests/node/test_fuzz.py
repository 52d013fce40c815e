"""A bounded fuzzing campaign against a real node (bench/fuzz.py): nothing crashes, hangs, leaks
or is lost, and every family of hostile traffic is tried."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.fuzz import FAMILIES


def test_a_bounded_campaign_loses_and_leaks_nothing(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    result = subprocess.run([sys.executable, "-m", "bench.fuzz", "--cases", "90", "--seed", "11", "--json", str(out)],
                            cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(out.read_text())
    assert summary["ok"] and summary["failures"] == []
    assert (summary["crashes"], summary["hung"], summary["lost"], summary["orphans"]) == (0, 0, [], [])
    assert (summary["fd_excess"], summary["temp_files"], summary["stop_exit_code"]) == ({}, [], 0)
    assert all(sum(summary["cases"][family].values()) == 30 for family in FAMILIES)
    assert summary["acknowledged"] >= 90 and set(summary["wellformed"]) == {"0x0000"}
    assert any(status != "0x0000" for status in summary["outcomes"]["dataset"])  # hostile ones refused too
