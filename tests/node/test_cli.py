"""The admin command line as an operator runs it: exit codes, tables, JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread

from node.config import load_settings
from node.db import make_engine, migrate
from node.store import InstanceStore
from tests.support.dicomgen import make_study
from tests.support.services import NodeProcess


def test_admin_commands(sqlite_url: str, tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, sqlite_url)  # its config only; nothing is served
    settings = load_settings(node.config)
    migrate(settings.database_url)
    store = InstanceStore(settings, make_engine(settings.database_url))
    study = make_study(tmp_path / "study", roles=("T1_SAG", "T2_SAG"), slices=1)
    for path in study.files:
        ds = dcmread(path)
        store.store(ds, path.read_bytes(), ds.file_meta.TransferSyntaxUID, "PACS")

    unknown = node.cli("show", "1.2.3.999", check=False)
    assert unknown.returncode == 1 and "no study 1.2.3.999" in unknown.stderr

    table = node.cli("studies").stdout
    assert study.study_instance_uid[:20] in table and "RECEIVING" in table
    assert node.cli("studies", "--state", "READY", "--json").stdout.strip() == "[]"
    bad_state = node.cli("studies", "--state", "NOPE", check=False)
    assert bad_state.returncode == 2 and "invalid" in bad_state.stderr

    detail = node.cli("show", study.study_instance_uid).stdout
    assert "T1_SAG" in detail and "missing: T2_AX" in detail

    requeued = node.cli("requeue", study.study_instance_uid)
    assert "job 1 written" in requeued.stdout
    shown = json.loads(node.cli("show", study.study_instance_uid, "--json").stdout)
    assert shown["state"] == "READY"
    assert shown["jobs"][0]["partial"] is True and shown["jobs"][0]["missing_roles"] == ["T2_AX"]
    assert shown["timeline"][-1]["kind"] == "requeued" and shown["timeline"][-1]["actor"].startswith("cli:")


def test_phantom_commands(tmp_path: Path) -> None:
    def run(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "1 studies written" in run("phantom", "--out", str(tmp_path / "p"), "--studies", "1", "--seed", "3",
                                      "--omit", "STIR_SAG", "--axial", "single")
    [study] = [p for p in (tmp_path / "p").iterdir() if p.is_dir()]
    truth = json.loads((study / "truth.json").read_text())
    assert set(truth["levels"]) == {"L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"}
    assert len([p for p in study.iterdir() if p.is_dir()]) == 3  # T1, T2 sagittal and axial T2
    run("phantom-sheet", str(study), "--out", str(tmp_path / "sheet.png"))
    assert (tmp_path / "sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
