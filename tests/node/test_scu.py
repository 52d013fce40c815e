"""The node's SCU against a real receiver (the node itself) and against peers that say no."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from node.scu import AssociationFailed, Sent, send_files
from tests.support.dicomgen import make_study
from tests.support.services import NodeProcess, free_port


def test_every_instance_is_sent_and_confirmed(node_factory: Callable[..., NodeProcess], sqlite_url: str, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", slices=2)
    node = node_factory(sqlite_url)
    progress: list[Sent] = []
    results = send_files(study.files, "127.0.0.1", node.port, "SPINENODE", on_sent=progress.append)
    assert [r.ok for r in results] == [True] * 6 and progress == results
    assert '"instances": 6' in node.cli("studies", "--json").stdout


def test_unreachable_and_rejecting_peers_raise(node_factory: Callable[..., NodeProcess], sqlite_url: str, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=1)
    with pytest.raises(AssociationFailed, match="unreachable"):
        send_files(study.files, "127.0.0.1", free_port(), "NOBODY")
    node = node_factory(sqlite_url)
    with pytest.raises(AssociationFailed, match="rejected"):
        send_files(study.files, "127.0.0.1", node.port, "WRONGAE")


def test_a_refused_instance_is_reported_not_dropped(node_factory: Callable[..., NodeProcess], sqlite_url: str, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", roles=("T2_AX",), slices=1)
    node = node_factory(sqlite_url, min_free_disk_mb=2**40)
    [result] = send_files(study.files, "127.0.0.1", node.port, "SPINENODE")
    assert not result.ok and result.status == 0xA700 and "watermark" in (result.error or "")
