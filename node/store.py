"""Durable storage of received instances: bytes on disk as received, then their rows in SQL.

An instance is acknowledged only after :meth:`InstanceStore.store` returns: by then its file
is written, fsynced and renamed into place, its directory fsynced, and its row committed.
Anything that fails before that leaves neither file nor row behind. The rows are prepared while
the file is written (one instance's SQL work overlaps its disk flushes), but committed only once
the file is durable, so a committed row always has its file.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import struct
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, cast

from pydicom import Dataset
from pydicom.errors import BytesLengthException
from pydicom.dataelem import RawDataElement
from pydicom.uid import UID
from sqlalchemy import Connection, Engine, Table, insert, select, update
from sqlalchemy.exc import OperationalError

from node.config import Settings
from node.db import dialect_insert, insert_ignore, writer_lock
from node.groupcommit import GroupCommitter
from node.schema import Event, Instance, Series, Study, StudyState, utcnow
from node.series import RoleDecision, SeriesRole, classify_series

LOGGER = logging.getLogger(__name__)

#: Longest wait of a commit for a handler to report its file durable (a stalled disk fails the
#: instance instead of stopping every commit of the process).
ON_DISK_TIMEOUT_S = 60.0

#: Folder below storage_dir where instances are written before being renamed into place.
INCOMING = ".incoming"


class InvalidInstance(ValueError):
    """The dataset cannot be stored as it is (missing or malformed identifiers)."""


class UndecodableInstance(ValueError):
    """The bytes received do not form a complete dataset (truncated or malformed)."""


class OutOfResources(OSError):
    """The storage disk is at its free-space watermark (or full), or the database is unreachable."""


#: What pydicom raises when a header element cannot be converted (a wrong or unknown VR, a value
#: of the wrong length): the instance cannot be understood.
UNCONVERTIBLE = (EOFError, ValueError, KeyError, TypeError, OverflowError, NotImplementedError, struct.error,
                 BytesLengthException)


def header_text(ds: Dataset, keyword: str) -> str:
    """A header element's value as text ("" when absent); one pydicom cannot convert raises
    UndecodableInstance."""
    try:
        return str(ds.get(keyword, "") or "").strip()
    except UNCONVERTIBLE as exc:
        raise UndecodableInstance(f"{keyword} could not be decoded: {type(exc).__name__}") from exc


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
            value = header_text(ds, keyword)
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
    new_study: bool = False
    new_series: bool = False


class _Placement(NamedTuple):
    """Where an instance's rows go, and whether its study and series rows were just created."""

    study_id: int
    series_id: int
    new_study: bool = False
    new_series: bool = False


@dataclass(frozen=True)
class _Pending:
    """An instance to index; ``on_disk`` resolves once its file and directory entry are durable."""

    ids: Identifiers
    known: tuple[int, int] | None  # (study id, series id) when the series is already indexed
    series: dict[str, Any] | None  # the new series row (role decided) when it is not
    instance: dict[str, Any]  # the instance row, less study_id and series_id
    calling_ae_title: str
    on_disk: Future[None] = field(default_factory=Future, compare=False)


class InstanceStore:
    """Writes instances to ``storage_dir`` and indexes them; one per receiving process.

    Handler threads write and fsync files in parallel; meanwhile one group-commit thread writes
    their rows, one transaction per batch, and commits it once every file of the batch is durable.
    """

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.storage_dir = settings.storage_dir.resolve()
        self.min_free_bytes = settings.min_free_disk_mb * 1024 * 1024
        self.max_instance_bytes = settings.max_instance_bytes
        self.device_uid = settings.device_uid
        self.engine = engine
        self.incoming_dir = self.storage_dir / INCOMING
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self._known_series: dict[str, tuple[int, int]] = {}  # series UID -> (study id, series id)
        self._series_rows: dict[str, dict[str, Any]] = {}  # series UID -> its row, to place it again after a purge
        self._writer_lock = writer_lock(engine)  # receiving processes queue for SQLite without sleeping
        self._committer: GroupCommitter[_Pending, Stored] = GroupCommitter(self._commit, name="store-commit")

    def close(self) -> None:
        """Finish the commits under way; call before the process ends."""
        self._committer.close()

    def check_size(self, size: int) -> None:
        """Refuse (OutOfResources) an instance whose dataset of ``size`` bytes is over
        ``max_instance_bytes``; the handler asks before decoding it or copying it."""
        if self.max_instance_bytes and size > self.max_instance_bytes:
            raise OutOfResources(errno.EFBIG, f"instance of {size} bytes is over max_instance_bytes ({self.max_instance_bytes})")

    def store(self, ds: Dataset, encoded: bytes, transfer_syntax_uid: str, calling_ae_title: str) -> Stored:
        """Store one received instance durably; return only once file and row are committed.

        ``encoded`` is the instance as a DICOM file (preamble, file meta, dataset as received).
        The same SOPInstanceUID again is acknowledged without writing anything.
        """
        check_complete(ds)
        ids = Identifiers.from_dataset(ds)
        relative = ids.relative_path()
        path = self.storage_dir / relative
        if path.exists() and self._indexed_path(ids.sop_instance_uid) is not None:
            return Stored(ids, duplicate=True)
        known = self._known_series.get(ids.series_instance_uid)
        pending = _Pending(
            ids=ids,
            known=known,
            series=None if known else self._series_rows.setdefault(ids.series_instance_uid, self._series_row(ds, ids)),
            instance=_instance_row(ds, ids, relative, len(encoded), transfer_syntax_uid, calling_ae_title),
            calling_ae_title=calling_ae_title,
        )
        if self._committer.closed:
            raise OutOfResources(errno.ESHUTDOWN, "the node is shutting down")
        self._check_free_space(len(encoded))
        committed = self._committer.submit(pending)
        created = False
        try:
            try:
                created = write_durably(path, encoded, self.incoming_dir)
                fsync_dir(path.parent)
            except BaseException as exc:
                pending.on_disk.set_exception(exc)  # the batch rolls back; its other items are retried alone
                raise
            pending.on_disk.set_result(None)
            stored = committed.result()
        except BaseException as exc:
            if created and self._indexed_path_or_none(ids.sop_instance_uid) is None:
                path.unlink(missing_ok=True)
            if isinstance(exc, OperationalError):
                full = "disk is full" in str(exc.orig)
                raise OutOfResources(errno.ENOSPC if full else errno.EIO,
                                     "the database disk is full" if full else "the database is unreachable") from exc
            raise
        if stored.duplicate and created and self._indexed_path(ids.sop_instance_uid) != str(relative):
            path.unlink(missing_ok=True)  # the same SOP Instance UID is indexed under another study or series
        return stored

    def _series_row(self, ds: Dataset, ids: Identifiers) -> dict[str, Any]:
        """A new series row with its role decided (in the handler thread, off the commit path)."""
        try:
            decision = classify_series(ds, self.device_uid)
        except Exception as exc:  # a malformed header element must not refuse the instance
            LOGGER.warning("could not classify series %s: %s", ids.series_instance_uid, type(exc).__name__)
            decision = RoleDecision(SeriesRole.OTHER, f"header could not be read for classification ({type(exc).__name__})")
        return {
            "series_instance_uid": ids.series_instance_uid,
            "modality": str(ds.get("Modality", "") or "")[:16] or None,
            "series_number": _int_or_none(ds.get("SeriesNumber")),
            "series_description": str(ds.get("SeriesDescription", "") or "")[:64] or None,
            "role": decision.role.value,
            "role_reason": decision.reason,
        }

    def _indexed_path(self, sop_instance_uid: str) -> str | None:
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            return conn.scalar(select(INSTANCES.c.path).where(INSTANCES.c.sop_instance_uid == sop_instance_uid))

    def _indexed_path_or_none(self, sop_instance_uid: str) -> str | None:
        """:meth:`_indexed_path`, None when the database cannot be asked (the commit failed for
        that reason: the instance is not acknowledged, and a resend writes its file again)."""
        try:
            return self._indexed_path(sop_instance_uid)
        except OperationalError:
            return None

    def _commit(self, batch: list[_Pending]) -> list[Stored]:
        """Index a batch in one transaction, committed once every file of the batch is durable.

        Instances already indexed are skipped before anything is created for them. The studies
        are locked before their instances go in, so a readiness decision taken meanwhile either
        sees the new instances or is undone by the reopen below (PostgreSQL; SQLite serialises
        writers anyway).
        """
        learned: dict[str, tuple[int, int]] = {}
        with self._writer_lock, self.engine.begin() as conn:
            batch = self._forget_purged(conn, batch)
            unplaced = [p.ids.sop_instance_uid for p in batch if p.known is None]
            indexed = set(conn.scalars(select(INSTANCES.c.sop_instance_uid).where(INSTANCES.c.sop_instance_uid.in_(unplaced)))
                          ) if unplaced else set()
            fresh = [p for p in batch if p.ids.sop_instance_uid not in indexed]
            placed = {p.ids.sop_instance_uid: self._place(conn, p, learned) for p in fresh}
            inserted = self._insert_instances(conn, fresh, placed) if fresh else {}
            self._reopen(conn, sorted(set(inserted.values())))
            for p in batch:
                p.on_disk.result(ON_DISK_TIMEOUT_S)  # a failed or stalled write rolls the batch back
        self._known_series.update(learned)
        results = []
        for p in batch:
            place = placed.get(p.ids.sop_instance_uid)
            results.append(Stored(p.ids, p.ids.sop_instance_uid not in inserted,
                                  new_study=bool(place and place.new_study), new_series=bool(place and place.new_series)))
        return results

    def _forget_purged(self, conn: Connection, batch: list[_Pending]) -> list[_Pending]:
        """Series this process placed before whose rows are gone (retention purged the study) are
        placed again, as new, from their remembered rows."""
        known = {p.known[1] for p in batch if p.known}
        alive = set(conn.scalars(select(SERIES.c.id).where(SERIES.c.id.in_(known)))) if known else set()
        if alive == known:
            return batch
        gone = [p.ids.series_instance_uid for p in batch if p.known and p.known[1] not in alive]
        for uid in gone:
            self._known_series.pop(uid, None)
        return [replace(p, known=None, series=self._series_rows[p.ids.series_instance_uid])
                if p.ids.series_instance_uid in gone else p for p in batch]

    @staticmethod
    def _insert_instances(conn: Connection, fresh: list[_Pending], placed: dict[str, _Placement]) -> dict[str, int]:
        """Lock the studies, insert the rows; return the SOP Instance UIDs inserted, with their study ids."""
        study_ids = sorted({placed[p.ids.sop_instance_uid].study_id for p in fresh})
        conn.execute(select(STUDIES.c.id).where(STUDIES.c.id.in_(study_ids)).order_by(STUDIES.c.id).with_for_update())
        rows = [{**p.instance, "study_id": placed[p.ids.sop_instance_uid].study_id,
                 "series_id": placed[p.ids.sop_instance_uid].series_id} for p in fresh]
        statement = (
            dialect_insert(conn, INSTANCES)
            .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
            .returning(INSTANCES.c.sop_instance_uid, INSTANCES.c.study_id)
        )
        return {sop: study for sop, study in conn.execute(statement, rows)}  # one cached statement, many rows

    @staticmethod
    def _reopen(conn: Connection, study_ids: list[int]) -> None:
        """Studies past RECEIVING that got new instances go back to RECEIVING."""
        if not study_ids:
            return
        reopened = conn.scalars(
            update(STUDIES)
            .where(STUDIES.c.id.in_(study_ids), STUDIES.c.state != StudyState.RECEIVING.value)
            .values(state=StudyState.RECEIVING.value, updated_at=utcnow())
            .returning(STUDIES.c.id)
        ).all()
        _add_events(conn, [(i, "reopened", "a new instance re-opened the study", {}) for i in reopened])

    def _place(self, conn: Connection, pending: _Pending, learned: dict[str, tuple[int, int]]) -> _Placement:
        """The (study id, series id) of an instance, creating study and series rows if new."""
        ids = pending.ids
        if pending.known or ids.series_instance_uid in learned:
            return _Placement(*(pending.known or learned[ids.series_instance_uid]))
        study_id = insert_ignore(conn, STUDIES, {"study_instance_uid": ids.study_instance_uid}, "study_instance_uid")
        new_study = study_id is not None
        if study_id is None:
            study_id = conn.scalars(select(STUDIES.c.id).where(STUDIES.c.study_instance_uid == ids.study_instance_uid)).one()
        else:
            _add_events(conn, [(study_id, "study_created", f"first instance from {pending.calling_ae_title}", {})])
        assert pending.series is not None
        series_id = insert_ignore(conn, SERIES, {**pending.series, "study_id": study_id}, "series_instance_uid")
        new_series = series_id is not None
        if series_id is None:
            series_id = conn.scalars(select(SERIES.c.id).where(SERIES.c.series_instance_uid == ids.series_instance_uid)).one()
        else:
            series = pending.series
            _add_events(conn, [(study_id, "series_added",
                                f"series {series['series_number']} is {series['role']}: {series['role_reason']}",
                                {"series_instance_uid": ids.series_instance_uid, "role": series["role"]})])
        learned[ids.series_instance_uid] = (study_id, series_id)
        return _Placement(study_id, series_id, new_study, new_series)

    def _check_free_space(self, incoming: int) -> None:
        free = shutil.disk_usage(self.storage_dir).free
        if free - incoming < self.min_free_bytes:
            raise OutOfResources(errno.ENOSPC, f"free disk {free // 2**20} MiB is under the watermark")


STUDIES = cast(Table, Study.__table__)
SERIES = cast(Table, Series.__table__)
INSTANCES = cast(Table, Instance.__table__)
EVENTS = cast(Table, Event.__table__)


def _instance_row(ds: Dataset, ids: Identifiers, relative: Path, size: int, transfer_syntax_uid: str,
                  calling_ae_title: str) -> dict[str, Any]:
    return {
        "sop_instance_uid": ids.sop_instance_uid,
        "sop_class_uid": ids.sop_class_uid,
        "transfer_syntax_uid": transfer_syntax_uid,
        "instance_number": _int_or_none(ds.get("InstanceNumber")),
        "number_of_frames": _int_or_none(ds.get("NumberOfFrames")) or 1,
        "path": str(relative),
        "size_bytes": size,
        "calling_ae_title": calling_ae_title[:16],
        "received_at": utcnow(),
    }


def _add_events(conn: Connection, events: list[tuple[int, str, str, dict[str, Any]]]) -> None:
    if events:
        conn.execute(insert(EVENTS), [
            {"study_id": study_id, "kind": kind, "message": message, "details": details, "at": utcnow(), "actor": "node"}
            for study_id, kind, message, details in events
        ])


def check_complete(ds: Dataset) -> None:
    """Raise UndecodableInstance if an element holds fewer bytes than its length says.

    pydicom reads a short final element without complaint, and answers an end of data inside an
    undefined-length element with an empty dataset and a warning; a sender that stops
    mid-dataset (a truncated file, a broken link) would otherwise be stored or misreported.
    """
    if len(ds) == 0:
        raise UndecodableInstance("no data elements could be read (truncated or not DICOM)")
    for tag in ds.keys():
        elem = ds.get_item(tag, keep_deferred=True)  # as read: converting it could fail on a bad VR
        if isinstance(elem, RawDataElement) and elem.value is not None and elem.length != 0xFFFFFFFF:
            if len(elem.value) != elem.length:
                raise UndecodableInstance(f"dataset truncated in {elem.tag}: {len(elem.value)} of {elem.length} bytes")


def write_durably(path: Path, data: bytes, incoming_dir: Path) -> bool:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename); the caller fsyncs the dir.

    The temp file lives in ``incoming_dir`` (same file system), which :func:`sweep_incoming`
    empties at start-up, so a crash mid-write leaves nothing in the store itself. Returns False
    if the file already existed (a concurrent duplicate); it is then replaced by identical
    bytes. A full disk raises :class:`OutOfResources`; nothing partial remains.
    """
    try:
        _make_dirs_durably(path.parent)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfResources(exc.errno, "storage disk is full") from exc
        raise
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
    fsync_dir(directory.parent)


def fsync_dir(directory: Path) -> None:
    """Make a directory's new or renamed entries durable."""
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
