"""The admin command line as an operator runs it: exit codes, tables, JSON."""

from __future__ import annotations

import json
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
