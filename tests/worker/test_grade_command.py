"""``spine-node grade DIR`` as a user runs it: JSON in DESIGN.md's shape, debug pictures, and
clear refusals for folders it cannot grade."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.data.pathology import CONDITIONS, LEVELS
from models.data.phantom import generate


def grade(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the command line in a fresh process, as an operator would."""
    return subprocess.run([sys.executable, "-m", "node.cli", "grade", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One held-out phantom study with its series in shuffled sub-folders."""
    return generate(tmp_path_factory.mktemp("grade"), 1, 4711, progress=False, axial="multi")[0]


def test_grade_json_has_every_level_near_the_truth(study: Path, tmp_path: Path) -> None:
    """Five levels with centres within 4 mm of the truth, confidence, views from all four series,
    five graded conditions with probabilities, every graded series used, research-only marking;
    the debug pictures are written."""
    result = grade(study, "--json", "--debug-dir", tmp_path / "debug")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    truth = json.loads((study / "truth.json").read_text())
    assert out["study_instance_uid"] == truth["study_instance_uid"]
    assert out["not_for_diagnostic_use"] is True
    assert len(out["model"]["detector_sha256"]) == 64
    assert set(out["levels"]) == set(LEVELS)
    for level, lv in out["levels"].items():
        assert np.linalg.norm(np.array(lv["center"]) - truth["levels"][level]["center"]) < 4.0
        assert 0.5 < lv["confidence"] <= 1.0
        assert sorted(v["role"] for v in lv["views"]) == ["STIR_SAG", "T1_SAG", "T2_AX", "T2_SAG"]
        assert set(lv["conditions"]) == set(CONDITIONS)
        for graded in lv["conditions"].values():
            probs = graded["probabilities"]
            assert set(probs) == {"normal_mild", "moderate", "severe"} and sum(probs.values()) == pytest.approx(1.0, abs=1e-3)
            assert graded["grade"] == max(probs, key=probs.__getitem__)
    assert len(out["model"]["weights_sha256"]) == 64
    assert sorted((s["role"], s["used"]) for s in out["series"]) == [("STIR_SAG", True), ("T1_SAG", True), ("T2_AX", True), ("T2_SAG", True)]
    assert out["warnings"] == []
    pictures = {p.name for p in (tmp_path / "debug").iterdir()}
    assert {"sagittal_T2_SAG.png", "montage.png", *(f"axial_{lv}.png" for lv in LEVELS)} <= pictures


def test_grade_without_axial_warns_and_keeps_the_sagittal_views(study: Path, tmp_path: Path) -> None:
    """No axial series: sagittal views only, and the warning DESIGN.md names."""
    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    axial = next(s["folder"] for s in json.loads((copy / "truth.json").read_text())["series"] if s["role"] == "T2_AX")
    shutil.rmtree(copy / axial)
    result = grade(copy, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "no T2_AX series: subarticular grades from sagittal views only" in out["warnings"]
    assert all(v["view"] == "sagittal" for lv in out["levels"].values() for v in lv["views"])


def test_grade_table_for_people(study: Path) -> None:
    """Without --json: a table naming every level with its grades, and the research-only line."""
    result = grade(study)
    assert result.returncode == 0, result.stderr
    assert all(level in result.stdout for level in LEVELS) and "SCS" in result.stdout
    assert "not for diagnosis" in result.stdout


def test_grade_refuses_what_it_cannot_grade(study: Path, tmp_path: Path) -> None:
    """A missing folder, a folder without DICOM, and two studies in one folder: exit 1, one line."""
    assert "is not a folder" in grade(tmp_path / "nowhere").stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.bin").write_bytes(b"not dicom")
    empty = grade(tmp_path / "empty")
    assert empty.returncode == 1 and "no DICOM files found" in empty.stderr
    two = tmp_path / "two"
    shutil.copytree(study, two / "a")
    generate(two / "b", 1, 4712, progress=False, omit="T1_SAG,STIR_SAG,T2_AX")
    both = grade(two)
    assert both.returncode == 1 and "2 studies" in both.stderr
