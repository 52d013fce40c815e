"""What the fault tests share: a PACS that notes every acknowledgement, and counts read from the
node's own database and storage folder."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE, _config
from pynetdicom.sop_class import EnhancedMRImageStorage, MRImageStorage
from sqlalchemy import func, select

from node.db import make_engine, make_sessionmaker
from node.schema import Instance, Result
from tests.support.services import NodeProcess, dataset_bytes

SUCCESS = 0x0000


def study_uid(study: Path) -> str:
    return str(json.loads((study / "truth.json").read_text())["study_instance_uid"])


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


@dataclass
class Pacs:
    """A sending PACS (pynetdicom, one association at a time, file bytes sent as they are) that
    records every SOP Instance UID the node acknowledged with success, and every status it got."""

    port: int
    acknowledged: set[str] = field(default_factory=set)
    statuses: Counter[str] = field(default_factory=Counter)
    aborted: int = 0

    def send(self, paths: Iterable[Path], stop: threading.Event | None = None) -> list[Path]:
        """Send until done, aborted or ``stop`` is set; return the files not acknowledged."""
        _config.STORE_SEND_CHUNKED_DATASET = True  # the bytes on disk, never decoded and re-encoded
        ae = AE(ae_title="FAULTPACS")
        for context in (MRImageStorage, EnhancedMRImageStorage):
            ae.add_requested_context(context)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        todo = list(paths)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="SPINENODE")
        if not assoc.is_established:
            self.statuses["association refused"] += 1
            return todo
        try:
            while todo and not (stop and stop.is_set()):
                status = assoc.send_c_store(todo[0])
                if not assoc.is_established or "Status" not in status:
                    self.aborted += 1
                    self.statuses["aborted"] += 1
                    return todo
                code = int(status.Status)
                self.statuses[f"0x{code:04X}"] += 1
                if code == SUCCESS:
                    self.acknowledged.add(sop_uid(todo[0]))
                todo.pop(0)
        finally:
            if assoc.is_established:
                assoc.release()
        return todo


@dataclass
class Holdings:
    """What a node holds, read from its database and storage folder."""

    database_url: str
    storage_dir: Path

    def instances(self) -> dict[str, Path]:
        """SOP Instance UID -> stored file, for every indexed instance."""
        engine = make_engine(self.database_url)
        try:
            with make_sessionmaker(engine)() as session:
                return {uid: self.storage_dir / path for uid, path in session.execute(select(Instance.sop_instance_uid, Instance.path))}
        finally:
            engine.dispose()

    def results(self) -> int:
        engine = make_engine(self.database_url)
        try:
            with make_sessionmaker(engine)() as session:
                return int(session.scalar(select(func.count(Result.id))) or 0)
        finally:
            engine.dispose()

    def lost(self, acknowledged: set[str], sent: dict[str, Path]) -> list[str]:
        """Acknowledged instances not indexed, missing on disk, or not byte-identical to what was sent."""
        held = self.instances()
        return sorted(uid for uid in acknowledged
                      if uid not in held or not held[uid].exists() or dataset_bytes(held[uid]) != dataset_bytes(sent[uid]))

    def temp_files(self) -> list[Path]:
        return sorted((self.storage_dir / ".incoming").glob("*"))


def holdings(node: NodeProcess) -> Holdings:
    return Holdings(str(node.settings["database_url"]), Path(node.settings["storage_dir"]))


def by_uid(study: Path) -> dict[str, Path]:
    """Every file of a study folder by its SOP Instance UID, in series order."""
    return {sop_uid(p): p for p in sorted(study.rglob("*.dcm"))}
