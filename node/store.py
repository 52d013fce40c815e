"""Durable storage of received instances: bytes on disk as received, then their rows in SQL.

An instance is acknowledged only after :meth:`InstanceStore.store` returns: by then its file
is written, fsynced and renamed into place, and its row is committed. Anything that fails
before that leaves neither file nor row behind.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.uid import UID
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db import insert_ignore, transaction
from node.schema import Event, Instance, Series, Study, StudyState
from node.series import RoleDecision, classify_series

LOGGER = logging.getLogger(__name__)


#: Folder below storage_dir where instances are written before being renamed into place.
INCOMING = ".incoming"


class InvalidInstance(ValueError):
    """The dataset cannot be stored as it is (missing or malformed identifiers)."""


class UndecodableInstance(ValueError):
    """The bytes received do not form a complete dataset (truncated or malformed)."""


class OutOfResources(OSError):
    """The storage disk is at its free-space watermark (or full)."""


@dataclass(frozen=True)
class Identifiers:
    """The UIDs that place an instance in the study/series/instance hierarchy."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str

    @classmethod
    def from_dataset(cls, ds: Dataset) -> Identifiers:
        """Read and check the four UIDs; a missing or malformed one raises InvalidInstance."""
        values = {}
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            value = str(ds.get(keyword, "") or "").strip()
            if not value:
                raise InvalidInstance(f"{keyword} is missing")
            if not UID(value).is_valid:
                raise InvalidInstance(f"{keyword} is not a valid UID")
            values[keyword] = value
        return cls(*values.values())

    def relative_path(self) -> Path:
        """Where the instance lives below storage_dir (valid UIDs are safe path parts)."""
        return Path(self.study_instance_uid, self.series_instance_uid, f"{self.sop_instance_uid}.dcm")


@dataclass(frozen=True)
class Stored:
    """What storing one instance did."""

    identifiers: Identifiers
    duplicate: bool
    new_study: bool
    new_series: bool


class InstanceStore:
    """Writes instances to ``storage_dir`` and indexes them; one per receiving process."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.storage_dir = settings.storage_dir.resolve()
        self.min_free_bytes = settings.min_free_disk_mb * 1024 * 1024
        self.device_uid = settings.device_uid
        self.sessions = sessions
        self.incoming_dir = self.storage_dir / INCOMING
        self.incoming_dir.mkdir(parents=True, exist_ok=True)

    def store(self, ds: Dataset, encoded: bytes, transfer_syntax_uid: str, calling_ae_title: str) -> Stored:
        """Store one received instance durably; return only once file and row are committed.

        ``encoded`` is the instance as a DICOM file (preamble, file meta, dataset as received).
        The same SOPInstanceUID again is acknowledged without writing anything.
        """
        check_complete(ds)
        ids = Identifiers.from_dataset(ds)
        with self.sessions() as session:
            if session.scalar(select(Instance.id).where(Instance.sop_instance_uid == ids.sop_instance_uid)):
                return Stored(ids, duplicate=True, new_study=False, new_series=False)
            series_known = session.scalar(
                select(Series.id).where(Series.series_instance_uid == ids.series_instance_uid)
            )
        decision = None if series_known else classify_series(ds, self.device_uid)
        path = self.storage_dir / ids.relative_path()
        self._check_free_space(len(encoded))
        created = write_durably(path, encoded, self.incoming_dir)
        try:
            with transaction(self.sessions) as session:
                return self._index(session, ds, ids, decision, path, len(encoded), transfer_syntax_uid, calling_ae_title)
        except BaseException:
            if created:
                self._discard(path, ids)
            raise

    def _index(
        self,
        session: Session,
        ds: Dataset,
        ids: Identifiers,
        decision: RoleDecision | None,
        path: Path,
        size: int,
        transfer_syntax_uid: str,
        calling_ae_title: str,
    ) -> Stored:
        study_id = insert_ignore(session, Study, {"study_instance_uid": ids.study_instance_uid}, "study_instance_uid")
        new_study = study_id is not None
        if study_id is None:
            study_id = session.scalars(select(Study.id).where(Study.study_instance_uid == ids.study_instance_uid)).one()
            self._reopen(session, study_id)
        else:
            session.add(Event(study_id=study_id, kind="study_created", message=f"first instance from {calling_ae_title}"))
        series_id, new_series = self._series_id(session, ds, ids, study_id, decision)
        instance_id = insert_ignore(
            session,
            Instance,
            {
                "study_id": study_id,
                "series_id": series_id,
                "sop_instance_uid": ids.sop_instance_uid,
                "sop_class_uid": ids.sop_class_uid,
                "transfer_syntax_uid": transfer_syntax_uid,
                "instance_number": _int_or_none(ds.get("InstanceNumber")),
                "number_of_frames": _int_or_none(ds.get("NumberOfFrames")) or 1,
                "path": str(path.relative_to(self.storage_dir)),
                "size_bytes": size,
                "calling_ae_title": calling_ae_title[:16],
            },
            "sop_instance_uid",
        )
        return Stored(ids, duplicate=instance_id is None, new_study=new_study, new_series=new_series)

    def _series_id(
        self, session: Session, ds: Dataset, ids: Identifiers, study_id: int, decision: RoleDecision | None
    ) -> tuple[int, bool]:
        """The series row's id and whether this call created it (with its role and reason)."""
        if decision is None:
            decision = classify_series(ds, self.device_uid)
        values = {
            "study_id": study_id,
            "series_instance_uid": ids.series_instance_uid,
            "modality": str(ds.get("Modality", "") or "")[:16] or None,
            "series_number": _int_or_none(ds.get("SeriesNumber")),
            "series_description": str(ds.get("SeriesDescription", "") or "")[:64] or None,
            "role": decision.role.value,
            "role_reason": decision.reason,
        }
        series_id = insert_ignore(session, Series, values, "series_instance_uid")
        if series_id is None:
            return session.scalars(select(Series.id).where(Series.series_instance_uid == ids.series_instance_uid)).one(), False
        session.add(
            Event(
                study_id=study_id,
                kind="series_added",
                message=f"series {values['series_number']} is {values['role']}: {values['role_reason']}",
                details={"series_instance_uid": ids.series_instance_uid, "role": values["role"]},
            )
        )
        return series_id, True

    @staticmethod
    def _reopen(session: Session, study_id: int) -> None:
        """A study past RECEIVING that gets a new instance goes back to RECEIVING."""
        previous = session.scalar(select(Study.state).where(Study.id == study_id))
        if previous == StudyState.RECEIVING.value:
            return
        session.execute(update(Study).where(Study.id == study_id).values(state=StudyState.RECEIVING.value))
        session.add(Event(study_id=study_id, kind="reopened", message=f"new instance arrived in state {previous}"))

    def _check_free_space(self, incoming: int) -> None:
        free = shutil.disk_usage(self.storage_dir).free
        if free - incoming < self.min_free_bytes:
            raise OutOfResources(errno.ENOSPC, f"free disk {free // 2**20} MiB is under the watermark")

    def _discard(self, path: Path, ids: Identifiers) -> None:
        """Remove a file whose row was not committed, unless another receiver indexed it meanwhile."""
        with self.sessions() as session:
            if session.scalar(select(Instance.id).where(Instance.sop_instance_uid == ids.sop_instance_uid)):
                return
        path.unlink(missing_ok=True)


def check_complete(ds: Dataset) -> None:
    """Raise UndecodableInstance if an element holds fewer bytes than its length says.

    pydicom reads a short final element without complaint, and answers an end of data inside an
    undefined-length element with an empty dataset and a warning; a sender that stops
    mid-dataset (a truncated file, a broken link) would otherwise be stored or misreported.
    """
    if len(ds) == 0:
        raise UndecodableInstance("no data elements could be read (truncated or not DICOM)")
    for elem in ds.elements():
        if isinstance(elem, RawDataElement) and elem.value is not None and elem.length != 0xFFFFFFFF:
            if len(elem.value) != elem.length:
                raise UndecodableInstance(f"dataset truncated in {elem.tag}: {len(elem.value)} of {elem.length} bytes")


def write_durably(path: Path, data: bytes, incoming_dir: Path) -> bool:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, fsync dir).

    The temp file lives in ``incoming_dir`` (same file system), which :func:`sweep_incoming`
    empties at start-up, so a crash mid-write leaves nothing in the store itself. Returns False
    if the file already existed (a concurrent duplicate); it is then replaced by identical
    bytes. A full disk raises :class:`OutOfResources`; nothing partial remains.
    """
    _make_dirs_durably(path.parent)
    existed = path.exists()
    tmp = incoming_dir / f"{path.name}.{os.getpid()}.{threading.get_ident():x}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfResources(exc.errno, "storage disk is full") from exc
        raise
    _fsync_dir(path.parent)
    return not existed


def sweep_incoming(storage_dir: Path) -> int:
    """Remove what a crash left half-written (never acknowledged); run before receivers start."""
    incoming = storage_dir / INCOMING
    leftovers = [p for p in incoming.iterdir() if p.is_file()] if incoming.is_dir() else []
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    if leftovers:
        LOGGER.warning("removed %d half-written files left by an earlier crash", len(leftovers))
    return len(leftovers)


def _make_dirs_durably(directory: Path) -> None:
    """Create ``directory`` and its missing parents, fsyncing each parent's new entry."""
    if directory.is_dir():
        return
    _make_dirs_durably(directory.parent)
    try:
        directory.mkdir()
    except FileExistsError:
        return
    _fsync_dir(directory.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
