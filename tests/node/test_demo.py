"""The demo flow as ``make demo`` runs it: generate, serve, send, grade in-process, deliver to a
local PACS, print the grades and render the pictures."""

from __future__ import annotations

from pathlib import Path

import pydicom
from rich.console import Console

from models.data.phantom import generate
from node.demo import DemoParts, run_demo
from worker.render import render_result_objects
from worker.tasks import Context


def test_demo_grades_a_study_and_its_results_come_back(tmp_path: Path) -> None:
    """The phantom study is received, graded by the embedded worker with every stage timed, its
    SR, presentation states and key images reach the local PACS, the grades are printed with the
    research-only marking, and the pictures are rendered where the output says."""
    console = Console(record=True, width=240)
    parts = DemoParts(lambda folder: generate(folder, 1, 0, progress=False, axial="single")[0],
                      lambda settings: Context(settings, actor="embedded").run, render_result_objects)
    code = run_demo(parts, tmp_path / "demo", console, timeout_s=240)
    shown = console.export_text()
    assert code == 0, shown
    assert "0 refused" in shown and "state DELIVERED" in shown
    for stage in ("volumes", "detect", "extract", "grade", "report", "store"):
        assert f"{stage} " in shown
    assert "research use only" in shown and "L5-S1" in shown
    received = sorted((tmp_path / "demo" / "pacs").glob("*.dcm"))
    modalities = {str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in received}
    assert modalities == {"SR", "PR", "OT"}
    pngs = sorted((tmp_path / "demo" / "png").glob("*.png"))
    assert pngs and f"pictures ({len(pngs)} PNGs" in shown and str(tmp_path / "demo" / "png") in shown
