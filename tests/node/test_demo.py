"""The demo flow (generate, serve, send, decide) with the tests' small study generator."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from node.demo import run_demo
from tests.support.dicomgen import make_study


def test_demo_sends_a_study_and_shows_it_ready(tmp_path: Path) -> None:
    def small_study(folder: Path) -> Path:
        make_study(folder, slices=2)
        return folder

    console = Console(record=True, width=200)
    assert run_demo(small_study, tmp_path / "demo", console, timeout_s=60) == 0
    shown = console.export_text()
    assert "sent 6 instances, 0 refused" in shown
    assert "state READY" in shown and "T2_AX" in shown and "T1_SAG" in shown
    assert len(list((tmp_path / "demo" / "storage").rglob("*.dcm"))) == 6
