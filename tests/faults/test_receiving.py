"""Faults while a PACS sends: the node killed with SIGKILL mid-association, the disk reaching the
watermark, PostgreSQL restarted. Each proves the same promise with its own figure: every
instance the node acknowledged is indexed and on disk, byte for byte, and the study then ends
where ``show`` says it does."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import Pacs, by_uid, holdings, study_uid
from tests.support.services import NodeProcess, PostgresCluster, store, wait_for

pytestmark = pytest.mark.faults


def _free_mb(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize // 2**20


@pytest.mark.parametrize("receivers", [1, 2])
def test_node_killed_during_receive(node_factory: Callable[..., NodeProcess], database_url: str, phantom_study: Path,
                                    watch: Any, figure: Callable[..., None], receivers: int) -> None:
    """SIGKILL the node (and its receiving processes) a third of the way into a study: every
    acknowledged instance survives the crash byte for byte, the half-written one leaves no temp
    file after restart, and the PACS's resend completes the study with one grading job."""
    node = node_factory(database_url, receivers=receivers)
    files = by_uid(phantom_study)
    pacs = Pacs(node.port)
    sender = threading.Thread(target=pacs.send, args=(list(files.values()),))
    sender.start()
    wait_for(lambda: len(pacs.acknowledged) >= len(files) // 3, 120, "a third of the study to be acknowledged")
    node.kill()
    sender.join(60)
    acknowledged = set(pacs.acknowledged)
    assert pacs.aborted == 1 and 0 < len(acknowledged) < len(files)

    node.start()
    held = holdings(node)
    lost = held.lost(acknowledged, files)
    temp_files = held.temp_files()
    assert lost == [] and temp_files == []

    assert store(node.port, list(files.values())).returncode == 0  # the PACS sends the study again
    shown = watch(database_url, study_uid(phantom_study)).wait_state("READY")
    assert len(held.instances()) == len(files)
    assert [(j["kind"], j["state"]) for j in shown["jobs"]] == [("grade", "PENDING")]
    figure(f"node SIGKILL during receive (receivers={receivers}, {'SQLite' if database_url.startswith('sqlite') else 'PostgreSQL'})",
           acknowledged_before_kill=len(acknowledged), lost=len(lost), temp_files_after_restart=len(temp_files),
           instances_after_resend=len(held.instances()), grade_jobs=len(shown["jobs"]))


def test_disk_reaching_the_watermark_mid_study(node_factory: Callable[..., NodeProcess], sqlite_url: str,
                                              phantom_study: Path, tmp_path: Path, watch: Any,
                                              figure: Callable[..., None]) -> None:
    """Free space falls under ``min_free_disk_mb`` while a study arrives (a ballast file takes it):
    the next instances get 0xA700 and are not stored; what was acknowledged stays; once space is
    back the PACS's resend completes the study."""
    if _free_mb(tmp_path) < 4096:
        pytest.skip("needs 4 GiB of free disk to place a watermark and a ballast under it")
    watermark_mb = _free_mb(tmp_path) - 1024  # 1 GiB of head room at start
    node = node_factory(sqlite_url, min_free_disk_mb=watermark_mb)
    files = by_uid(phantom_study)
    paths = list(files.values())
    pacs = Pacs(node.port)
    assert pacs.send(paths[:20]) == []
    ballast = tmp_path / "ballast"
    with open(ballast, "wb") as out:  # sized now: other writers on this disk moved the free space meanwhile
        os.posix_fallocate(out.fileno(), 0, (_free_mb(tmp_path) - watermark_mb + 512) * 2**20)  # 512 MiB under it
    try:
        refused = pacs.send(paths[20:])
    finally:
        ballast.unlink()
    held = holdings(node)
    assert pacs.statuses["0xA700"] == len(paths) - 20 and refused == []
    assert held.lost(pacs.acknowledged, files) == [] and len(held.instances()) == 20 and held.temp_files() == []

    assert store(node.port, paths).returncode == 0
    shown = watch(sqlite_url, study_uid(phantom_study)).wait_state("READY")
    assert len(held.instances()) == len(files) and len(shown["jobs"]) == 1
    figure("disk reaching the watermark mid-study", acknowledged=20, refused_0xA700=pacs.statuses["0xA700"],
           lost=0, stored_after_resend=len(held.instances()), grade_jobs=len(shown["jobs"]))


def test_postgresql_restarted_while_a_study_arrives(node_factory: Callable[..., NodeProcess], phantom_study: Path,
                                                    watch: Any, figure: Callable[..., None]) -> None:
    """PostgreSQL (durable, its own cluster) restarts in the middle of a study: instances that
    arrive while it is down get a failure status, never success; the node reconnects by itself;
    the PACS resends what failed, and the study is graded once."""
    cluster = PostgresCluster(durable=True)
    try:
        url = cluster.create_database()
        node = node_factory(url, broker_url="")
        files = by_uid(phantom_study)
        paths = list(files.values())
        pacs = Pacs(node.port)
        assert pacs.send(paths[:25]) == []
        cluster.stop_server()
        pacs.send(paths[25:35])
        cluster.start_server()
        failed_while_down = sum(n for status, n in pacs.statuses.items() if status not in ("0x0000", "aborted"))
        assert len(pacs.acknowledged) == 25 and pacs.statuses["0xA700"] == failed_while_down == 10  # out of resources: retry
        assert pacs.send(paths[25:]) == []  # the PACS retries what failed, and sends the rest
        held = holdings(node)
        assert held.lost(pacs.acknowledged, files) == [] and len(held.instances()) == len(files)
        shown = watch(url, study_uid(phantom_study)).wait_state("GRADED", "FAILED", timeout=240)
        assert shown["state"] == "GRADED" and held.results() == 1
        figure("PostgreSQL restarted while a study arrives", acknowledged=len(pacs.acknowledged),
               refused_while_down=failed_while_down, aborted_while_down=pacs.aborted, lost=0, results=held.results())
    finally:
        cluster.stop()
