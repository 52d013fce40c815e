"""The demo flow (generate, serve, send, decide, grade in-process) as ``make demo`` runs it."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from models.data.phantom import generate
from node.demo import run_demo
from worker.tasks import Context


def test_demo_sends_a_study_and_grades_it_in_process(tmp_path: Path) -> None:
    """The phantom study is received, READY, graded by the embedded worker with every stage
    timed, and its grades printed with the research-only marking."""
    console = Console(record=True, width=240)
    code = run_demo(lambda folder: generate(folder, 1, 0, progress=False, axial="single")[0],
                    lambda settings: Context(settings, actor="embedded").run, tmp_path / "demo", console, timeout_s=240)
    shown = console.export_text()
    assert code == 0, shown
    assert "0 refused" in shown and "state GRADED" in shown
    for stage in ("volumes", "detect", "extract", "grade", "store"):
        assert f"{stage} " in shown
    assert "research use only" in shown and "L5-S1" in shown
    assert (tmp_path / "demo" / "storage").is_dir()
